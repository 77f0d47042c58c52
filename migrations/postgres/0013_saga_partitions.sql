-- P, the saga partitions every order belongs to one of: fixed when the store is initialised
-- (the first start after this migration records the configured one), since changing it would
-- move orders between owners. A start asking for another P is refused.
ALTER TABLE store_identity
    ADD COLUMN saga_partitions integer CHECK (saga_partitions > 0);
