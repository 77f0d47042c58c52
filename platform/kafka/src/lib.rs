//! Kafka: publishing the global stream and consuming it in a consumer group.
//!
//! Every event goes to the topic of its aggregate type (`{prefix}.orders`, `.pets`,
//! `.payments`, `.deliveries`), keyed by aggregate id (so one aggregate's events stay in
//! order in one partition), with headers `event_id`, `event_type`, `event_version`,
//! `correlation_id`, `causation_id`, `traceparent` (of the message's producer span, a child
//! of the append that stored the event), `store_id` (the event store's identity), and an
//! [`Envelope`] as JSON value. The producer is idempotent with `acks=all`;
//! [`KafkaBus::publish`] returns only once every message of the batch is acknowledged, so a
//! caller may move its checkpoint after it; [`InFlight`] keeps several batches in flight and
//! tells which prefix is acknowledged. Each batch goes through the `kafka` resilience policy.
//!
//! Topics are bound to the event store whose events they carry: [`check_topics`] refuses
//! topics whose latest messages are another store's, and a [`KafkaSubscriber`] skips (and
//! logs) any message not stamped with its store's identity.
//!
//! Owns every Kafka client of the service. Must not decide what a message means: the
//! projector publishes, the saga runner consumes.
//!
//! # Layout
//! - `envelope`: a message's value, its topic and its headers.
//! - `publish`: [`KafkaBus`] (the idempotent producer) and [`InFlight`] batches.
//! - `topics`: creating the topics (one partition per saga partition) and [`check_topics`].
//! - `subscribe`: [`KafkaSubscriber`], a consumer of the topics (in a group, or assigned).

mod envelope;
mod publish;
mod subscribe;
mod topics;

pub use envelope::{topic_for, topics, Envelope, STORE_HEADER};
pub use publish::{Delivered, Handed, InFlight, KafkaBus, Trace, MAX_BATCHES_IN_FLIGHT};
pub use subscribe::KafkaSubscriber;
pub use topics::check_topics;

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use petstore_resilience::{AttemptFailure, CallError, Rejection};
use petstore_settings::KafkaSettings;

/// Kafka failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Kafka is not configured.
    #[error("kafka.brokers is not set")]
    NotConfigured,
    /// The client or broker failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A delivery report never came.
    #[error("kafka delivery was cancelled")]
    Cancelled,
    /// Creating a topic failed.
    #[error("creating topic {topic} failed: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// The `kafka` policy made no call (its breaker is open, its bulkhead full).
    #[error("kafka is not called now: {0}")]
    Rejected(Rejection),
    /// A batch was not acknowledged within the policy's attempt timeout.
    #[error("kafka did not acknowledge the batch within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The service's topics hold another event store's events.
    #[error(
        "the Kafka topic {topic} (kafka.topic_prefix {prefix:?}) holds {found} (its latest message, partition {partition}), not this event store's ({store}): give this deployment a kafka.topic_prefix (and kafka.consumer_group) of its own, or delete the topics under {prefix:?} to let it take them"
    )]
    ForeignTopics {
        /// The topic.
        topic: String,
        /// The topic prefix.
        prefix: String,
        /// Its partition.
        partition: i32,
        /// Whose events it holds.
        found: String,
        /// This store's identity.
        store: String,
    },
    /// A topic of the service has other partitions than the store's saga partitions.
    #[error(
        "the Kafka topic {topic} has {found} partitions, not one per saga partition \
         (saga.partitions = {partitions}): Kafka partitions are saga partitions; delete the topics \
         under {prefix:?} to let them be made again, or give this deployment a \
         kafka.topic_prefix of its own"
    )]
    PartitionCount {
        /// The topic.
        topic: String,
        /// The topic prefix.
        prefix: String,
        /// Its partitions.
        found: usize,
        /// The store's saga partitions.
        partitions: u32,
    },
    /// A consumed message is not an envelope.
    #[error("message at {topic}/{partition}@{offset} is not an event envelope: {source}")]
    Envelope {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Why.
        source: serde_json::Error,
    },
}

fn brokers(settings: &KafkaSettings) -> Result<&str, BusError> {
    settings.brokers.as_deref().ok_or(BusError::NotConfigured)
}

impl BusError {
    /// Whether Kafka failed (counted by its breaker), rather than the message being unfit.
    fn is_failure(&self) -> bool {
        matches!(
            self,
            BusError::Kafka(_) | BusError::Cancelled | BusError::Timeout(_)
        )
    }
}

impl From<CallError<BusError>> for BusError {
    fn from(error: CallError<BusError>) -> Self {
        match error {
            CallError::Refused(error)
            | CallError::Failed {
                failure: AttemptFailure::Error(error),
                ..
            } => error,
            CallError::Failed {
                failure: AttemptFailure::TimedOut(after),
                ..
            } => BusError::Timeout(after),
            CallError::Rejected(rejection) => BusError::Rejected(rejection),
        }
    }
}
