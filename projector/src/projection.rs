//! What the projector runs: a consumer of the global stream with its own checkpoint.

use std::future::Future;

use petstore_event_store::database::{Database, Fence};
use petstore_event_store::dead_letters::DeadLetter;
use petstore_event_store::stream::{RecordedEvent, StreamError, StreamPosition};
use petstore_kafka::BusError;

pub use petstore_read_models::{ReadModelError, Refolded};

/// A projection failed; the projector retries from the last checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// A read model (or Redis's views) failed.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
    /// Kafka failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The event stream or a checkpoint failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The dead-letter store failed.
    #[error(transparent)]
    DeadLetters(#[from] petstore_event_store::subscription::DeadLetterStoreError),
}

/// A consumer of the global stream that keeps its own checkpoint. `apply` must move the
/// checkpoint past the batch only once the batch's effect is durable.
pub trait Projection: Send + Sync + 'static {
    /// The checkpoint and lock name (`read_models`, `redis`, `kafka`).
    fn name(&self) -> &'static str;

    /// The position after the last applied event.
    fn position(&self) -> impl Future<Output = Result<StreamPosition, ProjectionError>> + Send;

    /// Applies a batch, in order, and moves the checkpoint past its last event; with
    /// `fence`, only while it is still the projection lock's token (checked with the write).
    /// Answers the position the projection now reflects durably, when it moved: past the
    /// batch, or, for a projection that keeps batches in flight (Kafka), past the last one
    /// settled.
    fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<Option<StreamPosition>, ProjectionError>> + Send;

    /// Waits for what `apply` left in flight and moves the checkpoint past it; the position
    /// it then reflects, when it moved. A projection that finishes each batch in `apply` has
    /// nothing in flight.
    fn settle(
        &self,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<Option<StreamPosition>, ProjectionError>> + Send {
        let _ = fence;
        async { Ok(None) }
    }

    /// Called once the projection's lock is taken, before anything is read or written:
    /// makes `fence` the one its store accepts writes from (a store outside the event
    /// store's database keeps a copy of the token). The event store's own database checks
    /// the lock's token directly: nothing to do.
    fn raise_fence(
        &self,
        fence: &Fence,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        let _ = fence;
        async { Ok(()) }
    }

    /// Retries one of this projection's dead letters: folds the views it concerns again from
    /// the log (`petstore_read_models::refold`) and writes them (with `fence`, like a batch). A projection
    /// that never sets events aside has none.
    fn refold(
        &self,
        database: &Database,
        letter: &DeadLetter,
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<Refolded, ProjectionError>> + Send {
        let _ = (database, fence);
        let refused = format!("the {} projection sets no events aside", letter.consumer);
        async move { Ok(Refolded::StillFailing(refused)) }
    }
}

impl ProjectionError {
    /// Whether the write was refused because the projection's lock passed to another holder.
    pub fn is_fenced(&self) -> bool {
        match self {
            ProjectionError::Stream(error) => error.is_fenced(),
            ProjectionError::ReadModels(error) => error.is_fenced(),
            _ => false,
        }
    }
}
