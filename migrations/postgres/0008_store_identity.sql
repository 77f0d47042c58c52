-- The event store's identity, made once with its schema. Projections kept outside this
-- database (the Redis views) record it, so that a Redis prefix left by another event store is
-- rebuilt or refused, never served.
CREATE TABLE store_identity
(
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    store_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO store_identity DEFAULT VALUES;
