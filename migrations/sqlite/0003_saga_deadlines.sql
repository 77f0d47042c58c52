-- Durable saga deadlines: when a step of an order's saga must have finished. The saga
-- runner schedules one per (order, step) when the step starts; the deadline loop fires each
-- due one (cancelling the order if it still waits for that step) and then marks it fired.
CREATE TABLE saga_deadlines
(
    order_id       text   NOT NULL,
    step           text   NOT NULL,
    due_at_ms      bigint NOT NULL,
    correlation_id text   NOT NULL,
    fired_at_ms    bigint,
    PRIMARY KEY (order_id, step)
);

CREATE INDEX saga_deadlines_pending ON saga_deadlines (due_at_ms) WHERE fired_at_ms IS NULL;
