-- The saga runners alive now: each renews its row while it runs (expiry by the database's
-- clock, in ms since the epoch) and deletes it when it stops. The partitions are shared
-- evenly among them: ceil(P / runners) each.
CREATE TABLE saga_runners
(
    owner         TEXT   PRIMARY KEY,
    expires_at_ms BIGINT NOT NULL
);
