-- Events a consumer could not decode or apply, set aside so that its stream moves on
-- (`petstore dead-letters`). One row per consumer and event.
CREATE TABLE dead_letters
(
    id              integer PRIMARY KEY AUTOINCREMENT,
    consumer        text    NOT NULL,
    event_id        text    NOT NULL,
    transaction_id  integer NOT NULL,
    global_position integer NOT NULL,
    aggregate_type  text    NOT NULL,
    aggregate_id    text    NOT NULL,
    sequence        integer NOT NULL,
    event_type      text    NOT NULL,
    event_version   text    NOT NULL,
    order_id        text,
    error           text    NOT NULL,
    attempts        integer NOT NULL DEFAULT 1,
    status          text    NOT NULL DEFAULT 'pending',
    failed_at_ms    integer NOT NULL,
    resolved_at_ms  integer,
    UNIQUE (consumer, event_id)
) STRICT;

CREATE INDEX dead_letters_open ON dead_letters (status) WHERE status IN ('pending', 'retrying');
CREATE INDEX dead_letters_order ON dead_letters (order_id) WHERE order_id IS NOT NULL;
