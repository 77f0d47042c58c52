-- What the order timeline (`petstore explain`) shows besides events, deadlines and dead
-- letters, each kept for `timeline.retention_hours` and then pruned:
-- * where the Kafka relay published each event, recorded after the broker acknowledged it,
--   in the transaction that moves the relay's checkpoint (a row per batch);
-- * every attempt of a call to a provider (the payment gateway, the delivery provider);
-- * commands an aggregate refused, found by the correlation id they ran under.
-- One row per acknowledged relay batch (a row per event cost the relay a fifth of its
-- throughput): `entries` is a JSON array of runs of consecutive offsets,
-- [topic, partition, first offset, [global positions]], the i-th event at the first
-- offset + i; `first_position` and `last_position` bound the batch's positions (a batch is
-- in stream order, which global positions follow but for concurrent transactions), and the
-- GiST index finds the batches holding a position.
CREATE TABLE kafka_published
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_position  bigint NOT NULL,
    last_position   bigint NOT NULL,
    published_at_ms bigint NOT NULL,
    entries         text   NOT NULL
);
CREATE INDEX kafka_published_positions
    ON kafka_published USING gist (int8range(first_position, last_position, '[]'));
CREATE INDEX kafka_published_at ON kafka_published (published_at_ms);

CREATE TABLE provider_attempts
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id        text    NOT NULL,
    correlation_id  text    NOT NULL,
    provider        text    NOT NULL,
    operation       text    NOT NULL,
    idempotency_key text    NOT NULL,
    attempt         integer NOT NULL,
    outcome         text    NOT NULL,
    error           text,
    started_at_ms   bigint  NOT NULL,
    duration_ms     bigint  NOT NULL
);
CREATE INDEX provider_attempts_order ON provider_attempts (order_id);
CREATE INDEX provider_attempts_started ON provider_attempts (started_at_ms);

CREATE TABLE refused_commands
(
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    correlation_id text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    command        text   NOT NULL,
    subject        text,
    causation_id   text,
    reason         text   NOT NULL,
    refused_at_ms  bigint NOT NULL
);
CREATE INDEX refused_commands_correlation ON refused_commands (correlation_id);
CREATE INDEX refused_commands_refused ON refused_commands (refused_at_ms);
