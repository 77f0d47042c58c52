//! The petstore's event store: everything the service keeps in its one database.
//!
//! Owns the database (Postgres or embedded SQLite) and its migrations, loading aggregates and
//! appending their events (optimistic concurrency, group commit), the global gap-free stream
//! with durable checkpoints, the saga's durable deadlines and the dead letters. Must not know
//! HTTP, Kafka or Redis, and decides no business outcome: that is `petstore-domain`'s job.
//!
//! # Layout
//! - [`database`]: connecting to Postgres or SQLite, the migrations, locks and fencing.
//! - [`store`]: loading aggregates and appending their events.
//! - [`metadata`]: what each event records about its command, written and read typed.
//! - [`stream`]: the global, gap-free event stream, durable checkpoints, audit queries.
//! - [`subscription`]: one checkpointed subscription to the stream, for every consumer.
//! - [`deadlines`]: durable saga step deadlines.
//! - [`leases`]: the saga partitions' leases and the fence every write for one checks.
//! - [`replay`]: reading the whole log once, in batches, to rebuild or republish.
//! - [`dead_letters`]: events a consumer set aside, and what an operator does with them.
//! - [`records`]: provider attempts and refused commands, kept to explain orders, and their
//!   retention.
//! - [`published`]: where the Kafka relay published each event.
//! - [`operator`]: what operators did through the console, as events.

pub mod database;
pub mod dead_letters;
pub mod deadlines;
pub mod leases;
pub mod metadata;
pub mod operator;
pub mod published;
pub mod records;
pub mod replay;
pub mod store;
pub mod stream;
pub mod subscription;
