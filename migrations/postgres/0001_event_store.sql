-- The event store: postgres-es's events and snapshots tables plus a global order.
--
-- postgres-es keys events by (aggregate_type, aggregate_id, sequence), which is not a global
-- order. global_position (identity) and transaction_id (the writing transaction's xid8) give
-- one: readers take events whose transaction_id is below the oldest still-running
-- transaction (pg_snapshot_xmin) ordered by (transaction_id, global_position), so an event
-- committed late by a slow transaction is never skipped. See docs/adr/0001-global-order.md.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         jsonb                        NOT NULL,
    metadata        jsonb                        NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_order ON events (transaction_id, global_position);
CREATE INDEX events_correlation_id ON events ((metadata ->> 'correlation_id'));

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          jsonb                                NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Durable positions of global-stream subscribers.
CREATE TABLE stream_checkpoints
(
    name            text PRIMARY KEY,
    transaction_id  bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Wakes stream readers (LISTEN petstore_events) when events commit; readers also poll.
CREATE FUNCTION notify_events_appended() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('petstore_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION notify_events_appended();
