-- What an operator asks of a deadline besides when it is due (`petstore explain`, the
-- order timeline): when it was last armed, how often it was armed (a re-arm extends a step
-- or schedules a retry's next try), and whether its saga settled it (cancelled: the order
-- ended before it fell due) rather than it firing. `fired_at_ms` stays the time the
-- deadline stopped being armed either way, so the deadline loop's queries are unchanged.
-- Rows written before this migration have no arming time.
ALTER TABLE saga_deadlines ADD COLUMN armed_at_ms bigint;
ALTER TABLE saga_deadlines ADD COLUMN times_armed integer NOT NULL DEFAULT 1;
ALTER TABLE saga_deadlines ADD COLUMN settled boolean NOT NULL DEFAULT false;
