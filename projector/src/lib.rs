//! The projector: streams every event, in global order, into the read models, Redis and
//! Kafka.
//!
//! It owns the loop that keeps each projection current (one active instance per
//! projection, fenced by its lock), what a projection is, and the Kafka relay. The views,
//! their stores and their queries are `petstore-read-models`'s: the projector writes through
//! them. It never decides business outcomes: it only records what the events say. On
//! Postgres each batch of events and the projector's checkpoint commit in one transaction,
//! so a crash never applies an event twice or skips one.
//!
//! # Layout
//! - [`projection`]: what a projection is: a stream consumer with its own checkpoint.
//! - `read_models`: the read models and Redis's views as projections.
//! - [`kafka`]: publishing the stream to Kafka.
//! - [`replay`]: republishing the log to Kafka.
//! - [`runner`]: the projection loop (one active instance per projection), its progress and lag.
//! - [`health`]: health checks of the read models, Redis and each projection.

pub mod health;
pub mod kafka;
pub mod projection;
mod read_models;
pub mod replay;
pub mod runner;

pub use kafka::KafkaProjection;
pub use projection::{Projection, ProjectionError};
pub use runner::{Projector, ProjectorProgress};
