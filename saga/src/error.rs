//! Why the saga runner failed to handle an event: retried from the checkpoint, or, when the
//! event itself cannot be read, set aside.

use cqrs_es::AggregateError;
use petstore_event_store::leases::{CheckError, LeaseLost};
use petstore_event_store::stream;
use petstore_kafka::BusError;

/// Why handling a batch failed; the runner retries it from the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// The event store failed.
    #[error("event store: {0}")]
    Store(String),
    /// Another writer appended to an aggregate the step decided on, before the step's
    /// events were written (none of them was).
    #[error("event store: {0}")]
    Conflict(String),
    /// Reading the stream or the checkpoint failed.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// The deadline table failed.
    #[error("deadlines: {0}")]
    Deadlines(#[from] sqlx::Error),
    /// The runner's lease on the order's partition is lost: another runner owns it now, and
    /// this one must not act on its orders.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// Kafka failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The dead-letter store failed.
    #[error("dead letters: {0}")]
    DeadLetters(String),
    /// An aggregate's stored events cannot be read (one of them is malformed, of an
    /// unknown type or version).
    #[error("unreadable history: {0}")]
    Unreadable(String),
    /// A stored event lacks metadata the saga needs (its time, its correlation id).
    #[error(transparent)]
    Metadata(#[from] petstore_event_store::metadata::MissingMetadata),
    /// A stored event cannot be decoded.
    #[error("cannot decode {event_type} of {aggregate_id}: {source}")]
    Decode {
        /// The event type.
        event_type: String,
        /// The aggregate.
        aggregate_id: String,
        /// Why.
        source: Box<petstore_domain::upcasting::DecodeFailure>,
    },
}

pub(crate) fn store_error<E: std::error::Error>(error: AggregateError<E>) -> SagaError {
    match error {
        AggregateError::DeserializationError(_) => SagaError::Unreadable(error.to_string()),
        AggregateError::UnexpectedError(error) if error.is::<LeaseLost>() => {
            match error.downcast::<LeaseLost>() {
                Ok(lost) => SagaError::LeaseLost(*lost),
                Err(error) => SagaError::Store(error.to_string()),
            }
        }
        AggregateError::AggregateConflict => SagaError::Conflict(error.to_string()),
        other => SagaError::Store(other.to_string()),
    }
}

impl From<CheckError> for SagaError {
    fn from(error: CheckError) -> Self {
        match error {
            CheckError::Lost(lost) => SagaError::LeaseLost(lost),
            CheckError::Database(error) => SagaError::Deadlines(error),
            CheckError::Checkpoint(error) => SagaError::Stream(error),
        }
    }
}

impl From<petstore_event_store::subscription::DeadLetterStoreError> for SagaError {
    fn from(error: petstore_event_store::subscription::DeadLetterStoreError) -> Self {
        SagaError::DeadLetters(error.0.to_string())
    }
}

impl SagaError {
    /// Whether the failure is the event's own (it or its aggregate's history cannot be
    /// read): set aside rather than retried for ever.
    pub(crate) fn is_poison(&self) -> bool {
        matches!(
            self,
            SagaError::Decode { .. } | SagaError::Unreadable(_) | SagaError::Metadata(_)
        )
    }
}
