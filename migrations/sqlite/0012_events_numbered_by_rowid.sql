-- The events table numbered by its rowid: global_position becomes the table's INTEGER PRIMARY
-- KEY (an alias of the rowid, which SQLite sets to the largest one plus 1 inside the inserting
-- transaction, and which VACUUM never renumbers) instead of a trigger that updated every
-- inserted row, plus a unique index beside it. One writer at a time, so the numbers are still
-- gap-free and in commit order. (aggregate_type, aggregate_id, sequence) stays unique: a taken
-- one is the optimistic-concurrency conflict (SQLITE_CONSTRAINT_UNIQUE now, 2067).
CREATE TABLE events_numbered
(
    global_position integer PRIMARY KEY,
    aggregate_type  text                          NOT NULL,
    aggregate_id    text                          NOT NULL,
    sequence        integer CHECK (sequence >= 0) NOT NULL,
    event_type      text                          NOT NULL,
    event_version   text                          NOT NULL,
    payload         text                          NOT NULL,
    metadata        text                          NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT;

INSERT INTO events_numbered (global_position, aggregate_type, aggregate_id, sequence, event_type,
                             event_version, payload, metadata)
SELECT global_position, aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
       metadata
  FROM events
 ORDER BY global_position;

DROP TABLE events;
ALTER TABLE events_numbered RENAME TO events;
CREATE INDEX events_correlation_id ON events (json_extract(metadata, '$.correlation_id'));
