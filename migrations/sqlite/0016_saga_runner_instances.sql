-- Which process runs under each saga runner id now: a process started with the id of a
-- live one (the same saga.runner_id configured twice) takes it over, and the earlier one,
-- finding another instance in the row at its next heartbeat, stops its saga runner.
ALTER TABLE saga_runners ADD COLUMN instance TEXT;
