-- Audit trails only ever look correlation ids up by equality. A hash index serves that with
-- cheaper inserts than a b-tree of random UUID strings (bench/README.md measured the b-tree
-- at about a tenth of append throughput at 32 writers).
DROP INDEX events_correlation_id;
CREATE INDEX events_correlation_id ON events USING hash ((metadata ->> 'correlation_id'));
