-- The event store's identity, made once with its schema. Projections kept outside this
-- database (the Redis views) record it, so that a Redis prefix left by another event store is
-- rebuilt or refused, never served.
CREATE TABLE store_identity
(
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    store_id   TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

INSERT INTO store_identity (singleton, store_id)
VALUES (1, lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-' || hex(randomblob(2))
              || '-' || hex(randomblob(2)) || '-' || hex(randomblob(6))));
