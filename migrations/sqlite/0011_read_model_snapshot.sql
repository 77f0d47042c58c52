-- The embedded read models live in memory; they are written behind to these tables with the
-- stream position they reflect, so a start loads them and folds only the rest of the log.
-- One header row: the snapshot's format (a release that changes a view's shape or the fold
-- raises it; a snapshot of another format is dropped and rebuilt from the log) and position.
CREATE TABLE read_model_snapshot
(
    singleton       integer PRIMARY KEY CHECK (singleton = 1),
    format          integer NOT NULL,
    global_position integer NOT NULL,
    written_at      text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

-- Each view as its JSON document, keyed by its id.
CREATE TABLE read_model_snapshot_orders
(
    order_id text PRIMARY KEY,
    view     text NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE read_model_snapshot_pets
(
    pet_id text PRIMARY KEY,
    view   text NOT NULL
) STRICT, WITHOUT ROWID;
