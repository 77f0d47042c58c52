//! The projector: streams every event, in global order, into the read models, Redis and
//! Kafka.
//!
//! It owns the read models (their shapes, how events fold into them, and where they live)
//! and the loop that keeps them current. It never decides business outcomes: it only records
//! what the events say. On Postgres each batch of events and the projector's checkpoint
//! commit in one transaction, so a crash never applies an event twice or skips one. In the
//! embedded mode the read models live in memory, written behind to a snapshot in the SQLite
//! file; a start loads it and folds the events after it.
//!
//! # Layout
//! - [`views`]: the read-model documents and how events fold into them.
//! - [`projection`]: what a projection is: a stream consumer with its own checkpoint.
//! - [`read_models`]: where the views live (Postgres tables or memory) and the queries on them.
//! - `snapshot`: the embedded read models' snapshot in the SQLite file.
//! - [`redis_views`]: the same views in Redis, and the browse cache.
//! - [`kafka`]: publishing the stream to Kafka.
//! - [`replay`]: rebuilding projections into shadow copies and swapping them in; republishing.
//! - [`runner`]: the projection loop (one active instance per projection), its progress and lag.
//! - [`health`]: health checks of the read models, Redis and each projection.

pub mod health;
pub mod kafka;
pub mod projection;
pub mod read_models;
pub mod redis_views;
pub mod refold;
pub mod replay;
pub mod runner;
mod snapshot;
pub mod views;

pub use kafka::KafkaProjection;
pub use projection::{Projection, ProjectionError};
pub use read_models::{
    BrowseFilter, BrowsePage, OrderChangeFeed, OrderChanges, PremiumFilter, ReadModelError,
    ReadModels,
};
pub use redis_views::{BrowseSlot, CachedBrowse, Owner, RedisViews};
pub use runner::{Projector, ProjectorProgress};
pub use views::{MoneyView, OrderStatusView, PetView, StatusChange};
