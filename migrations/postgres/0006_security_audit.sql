-- The security audit trail: logins, token rejections, refusals (403), rate-limit trips,
-- admin actions and key-set rotations. Never a token or a password.
CREATE TABLE security_audit
(
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms          bigint NOT NULL,
    kind           text   NOT NULL,
    outcome        text   NOT NULL,
    subject        text,
    client_ip      text,
    method         text,
    route          text,
    correlation_id text,
    trace_id       text,
    detail         text   NOT NULL
);

CREATE INDEX security_audit_at ON security_audit (at_ms, id);
CREATE INDEX security_audit_subject ON security_audit (subject, at_ms);
