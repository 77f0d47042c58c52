-- The embedded event store: sqlite-es's events and snapshots tables plus a global order.
--
-- SQLite has one writer at a time, so commit order is insertion order. The trigger numbers
-- each event max+1 inside the inserting transaction, which makes global_position gap-free and
-- equal to commit order. (A plain rowid is not used: VACUUM may renumber it.)
CREATE TABLE events
(
    aggregate_type  text                          NOT NULL,
    aggregate_id    text                          NOT NULL,
    sequence        integer CHECK (sequence >= 0) NOT NULL,
    event_type      text                          NOT NULL,
    event_version   text                          NOT NULL,
    payload         text                          NOT NULL,
    metadata        text                          NOT NULL,
    global_position integer,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE UNIQUE INDEX events_global_position ON events (global_position);
CREATE INDEX events_correlation_id ON events (json_extract(metadata, '$.correlation_id'));

CREATE TRIGGER events_number_globally
    AFTER INSERT ON events
BEGIN
    UPDATE events
    SET global_position = (SELECT coalesce(max(global_position), 0) + 1 FROM events)
    WHERE rowid = NEW.rowid;
END;

CREATE TABLE snapshots
(
    aggregate_type   text                                  NOT NULL,
    aggregate_id     text                                  NOT NULL,
    last_sequence    integer CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
    payload          text                                  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;

CREATE TABLE stream_checkpoints
(
    name            text PRIMARY KEY,
    transaction_id  integer NOT NULL,
    global_position integer NOT NULL,
    updated_at      text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
