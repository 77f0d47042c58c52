//! The read models: the views queries answer from (order status, the pet catalog), how
//! events fold into them, where they live (Postgres tables, or memory behind a snapshot in
//! the embedded store's file, and a copy in Redis), the queries on them, and rebuilding them
//! from the log.
//!
//! Owns the views' shapes, their stores and their queries. The projector writes through it
//! (`petstore-projector` runs the loop that keeps them current) and the query API reads
//! through it. Must not know HTTP, decide business outcomes, or follow the stream itself.
//!
//! # Layout
//! - [`views`]: the read-model documents and how events fold into them.
//! - [`store`]: where the views live (Postgres tables or memory) and the queries on them.
//! - `browse`: the browse query's filters and its pages of results.
//! - [`listing`]: listing orders for operators (by status, customer, time placed, stuck).
//! - `changes`: the notices of changed order views and the feed that delivers them.
//! - `snapshot`: the embedded read models' snapshot in the SQLite file.
//! - [`redis`]: the same views in Redis, and the browse cache.
//! - [`refold`]: the views a dead letter concerns, folded again from the log.
//! - [`timeline`]: an order's timeline (`petstore explain`, the admin timeline route).
//! - [`rebuild`]: rebuilding the read models or Redis's views into shadow copies and
//!   swapping them in.

use petstore_event_store::stream::StreamError;
use petstore_redis::CacheError;

mod browse;
mod changes;
pub mod listing;
pub mod progress;
pub mod rebuild;
pub mod redis;
pub mod refold;
mod snapshot;
pub mod store;
pub mod timeline;
pub mod views;

pub use progress::Progress;
pub use redis::{BrowseSlot, CachedBrowse, Owner, RedisViews};
pub use store::{
    BrowseFilter, BrowsePage, OrderChangeFeed, OrderChanges, PremiumFilter, ReadModels,
};
pub use views::{DecodeError, MoneyView, OrderStatusView, PetView, StatusChange};

/// A read model could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    /// The database failed.
    #[error("read model query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Saving the checkpoint failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Redis failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A stored document does not match the view's shape.
    #[error("stored read-model document is malformed: {0}")]
    Document(#[from] serde_json::Error),
}

impl ReadModelError {
    /// Whether the write was refused because the projection's lock passed to another holder.
    pub fn is_fenced(&self) -> bool {
        match self {
            ReadModelError::Stream(error) => error.is_fenced(),
            ReadModelError::Cache(error) => error.is_fenced(),
            _ => false,
        }
    }
}

/// What retrying a dead letter of a read model came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refolded {
    /// The views it concerns were folded again, it included.
    Done,
    /// It still cannot be folded: why.
    StillFailing(String),
}
