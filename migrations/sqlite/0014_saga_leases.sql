-- Leases on the saga partitions: who owns each partition, until when (by the database's
-- clock, in ms since the epoch), and the epoch every write for it is fenced with. A row is
-- made when its partition is first taken; taking it again raises the epoch.
CREATE TABLE saga_leases
(
    partition_number INTEGER PRIMARY KEY CHECK (partition_number >= 0),
    owner            TEXT,
    epoch            INTEGER NOT NULL CHECK (epoch > 0),
    expires_at_ms    INTEGER NOT NULL
);
