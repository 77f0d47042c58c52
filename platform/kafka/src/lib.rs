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
//! Topics are bound to the event store whose events they carry: [`check_topic_owner`] refuses
//! topics whose latest messages are another store's, and a [`KafkaSubscriber`] skips (and
//! logs) any message not stamped with its store's identity.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use petstore_event_store::stream::{Delivery, Payload, RecordedEvent, StreamPosition};
use petstore_resilience::{AttemptFailure, CallError, Policy, Rejection};
use petstore_settings::KafkaSettings;
use petstore_telemetry::metrics::Metrics;

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

/// The JSON value of every message: the event and where it stands in the global stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The event's stable id.
    pub event_id: String,
    /// `Order`, `Pet`, `Payment` or `Delivery`.
    pub aggregate_type: String,
    /// The aggregate's id (also the message key).
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1.
    pub sequence: i64,
    /// The event type, e.g. `OrderCreated`.
    pub event_type: String,
    /// The event's schema version.
    pub event_version: String,
    /// The event's place in the global stream.
    pub position: StreamPosition,
    /// Correlation id, causation id, subject, command id, timestamp, traceparent.
    pub metadata: HashMap<String, String>,
    /// The event as the domain serialized it.
    pub payload: Payload,
}

impl From<&RecordedEvent> for Envelope {
    fn from(event: &RecordedEvent) -> Self {
        Self {
            event_id: event.event_id().to_string(),
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            position: event.position,
            metadata: event.metadata.clone(),
            payload: event.payload.clone(),
        }
    }
}

/// An [`Envelope`] borrowing its event, serialized the same way (without copying the
/// payload and metadata per message).
#[derive(Serialize)]
struct EnvelopeOf<'a> {
    event_id: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    position: StreamPosition,
    metadata: &'a HashMap<String, String>,
    payload: &'a Payload,
}

impl<'a> From<&'a RecordedEvent> for EnvelopeOf<'a> {
    fn from(event: &'a RecordedEvent) -> Self {
        Self {
            event_id: event.event_id().to_string(),
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            sequence: event.sequence,
            event_type: &event.event_type,
            event_version: &event.event_version,
            position: event.position,
            metadata: &event.metadata,
            payload: &event.payload,
        }
    }
}

impl From<Envelope> for RecordedEvent {
    fn from(envelope: Envelope) -> Self {
        Self {
            position: envelope.position,
            aggregate_type: envelope.aggregate_type,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            event_type: envelope.event_type,
            event_version: envelope.event_version,
            payload: envelope.payload,
            metadata: envelope.metadata,
            delivery: None,
        }
    }
}

/// The topic of an aggregate type: `Order` → `{prefix}.orders`.
pub fn topic_for(prefix: &str, aggregate_type: &str) -> String {
    let plural = match aggregate_type {
        "Delivery" => "deliveries".to_owned(),
        petstore_live_settings::AGGREGATE_TYPE => "settings".to_owned(),
        other => format!("{}s", other.to_lowercase()),
    };
    format!("{prefix}.{plural}")
}

/// The topics the service creates and consumes.
pub fn topics(prefix: &str) -> Vec<String> {
    [
        petstore_domain::order::AGGREGATE_TYPE,
        petstore_domain::pet::AGGREGATE_TYPE,
        petstore_domain::payment::AGGREGATE_TYPE,
        petstore_domain::delivery::AGGREGATE_TYPE,
        petstore_live_settings::AGGREGATE_TYPE,
    ]
    .into_iter()
    .map(|aggregate_type| topic_for(prefix, aggregate_type))
    .collect()
}

fn brokers(settings: &KafkaSettings) -> Result<&str, BusError> {
    settings.brokers.as_deref().ok_or(BusError::NotConfigured)
}

/// Publishes events to Kafka.
#[derive(Clone)]
pub struct KafkaBus {
    producer: FutureProducer,
    settings: KafkaSettings,
    store_id: Arc<str>,
    policy: Policy,
    metrics: Option<Metrics>,
}

/// One message, ready to hand to the producer.
struct Outgoing {
    topic: String,
    key: String,
    value: Vec<u8>,
    headers: OwnedHeaders,
    span: tracing::Span,
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

impl KafkaBus {
    /// A producer for the configured brokers (no connection is made yet), stamping
    /// `store_id` on every message and publishing through `policy` (the `kafka` one).
    pub fn new(settings: &KafkaSettings, store_id: &str, policy: Policy) -> Result<Self, BusError> {
        Ok(Self {
            producer: producer(settings)?,
            settings: settings.clone(),
            store_id: store_id.into(),
            policy,
            metrics: None,
        })
    }

    /// Counts failed deliveries and measures delivery latency in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A fresh producer with the same settings. After a failed batch the old producer may be
    /// wedged (a restarted broker that lost its idempotent-producer state rejects its
    /// sequence numbers); a new one starts a new producer id.
    pub fn renewed(&self) -> Result<Self, BusError> {
        Ok(Self {
            producer: producer(&self.settings)?,
            ..self.clone()
        })
    }

    /// Creates the service's topics with the configured partitions (existing ones are
    /// kept), then checks that they hold no other event store's events.
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        ensure_topics(&self.settings).await?;
        check_topic_owner(&self.settings, &self.store_id).await
    }

    /// Publishes `events` in order and waits until the broker acknowledged every one. Each
    /// message gets a producer span, in the event's trace (`Trace::Continue`) or in a new
    /// trace linked to it (`Trace::Link`, for replays), whose `traceparent` travels in the
    /// message headers.
    pub async fn publish(&self, events: &[RecordedEvent], trace: Trace) -> Result<(), BusError> {
        let (handed, _) = self.hand_over(events.to_vec(), trace, None);
        handed.acknowledged().await
    }

    /// Hands `events` to the producer, in order, in one call of the `kafka` policy, in a
    /// task of its own (so the caller reads the next batch meanwhile), and returns at once:
    /// the batch's acknowledgement and the signal that it is in the producer's queue. With
    /// `after` (the previous batch's signal) it is queued only once that batch is, and not at
    /// all when that one never was: batches reach the producer in the order handed over.
    fn hand_over(
        &self,
        events: Vec<RecordedEvent>,
        trace: Trace,
        after: Option<Queued>,
    ) -> (Handed, Queued) {
        let (queued, signal) = tokio::sync::oneshot::channel();
        let bus = self.clone();
        let call = tokio::spawn(
            async move {
                if let Some(after) = after {
                    after.0.await.map_err(|_| BusError::Cancelled)?;
                }
                let outgoing = Arc::new(
                    events
                        .iter()
                        .map(|event| bus.outgoing(event, trace))
                        .collect::<Result<Vec<_>, _>>()?,
                );
                // Only the first attempt signals; a retry (with more than one attempt
                // configured) queues the batch again behind whatever came after it.
                let queued = std::sync::Mutex::new(Some(queued));
                bus.policy
                    .call(BusError::is_failure, || {
                        send_all(
                            bus.producer.clone(),
                            Arc::clone(&outgoing),
                            bus.metrics.clone(),
                            queued.lock().ok().and_then(|mut slot| slot.take()),
                        )
                    })
                    .await
                    .map_err(BusError::from)
            }
            .in_current_span(),
        );
        (Handed(call), Queued(signal))
    }

    /// How many batches may wait for their acknowledgements at once: the `kafka` policy's
    /// bulkhead in force, at most [`MAX_BATCHES_IN_FLIGHT`].
    fn batches_in_flight(&self) -> usize {
        self.policy.max_concurrent().clamp(1, MAX_BATCHES_IN_FLIGHT)
    }

    fn outgoing(&self, event: &RecordedEvent, trace: Trace) -> Result<Outgoing, BusError> {
        let topic = topic_for(&self.settings.topic_prefix, &event.aggregate_type);
        let span = tracing::info_span!(
            "send",
            otel.name = %format_args!("send {topic}"),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = %topic,
            messaging.kafka.message.key = %event.aggregate_id,
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            event_type = %event.event_type,
            correlation_id = %event.metadata_value("correlation_id"),
        );
        let stored = event.metadata.get("traceparent").map(String::as_str);
        match trace {
            Trace::Continue => petstore_telemetry::continue_trace(&span, stored),
            Trace::Link => petstore_telemetry::link_to(&span, stored),
        }
        let traceparent = petstore_telemetry::traceparent_of(&span.context()).unwrap_or_default();
        let envelope = EnvelopeOf::from(event);
        let value = serde_json::to_vec(&envelope).map_err(|source| BusError::Envelope {
            topic: topic.clone(),
            partition: -1,
            offset: -1,
            source,
        })?;
        let mut headers = OwnedHeaders::new_with_capacity(7);
        for (key, value) in [
            ("event_id", envelope.event_id.as_str()),
            ("event_type", &event.event_type),
            ("event_version", &event.event_version),
            ("correlation_id", event.metadata_value("correlation_id")),
            ("causation_id", event.metadata_value("causation_id")),
            ("traceparent", traceparent.as_str()),
            (STORE_HEADER, &self.store_id),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        Ok(Outgoing {
            topic,
            key: event.aggregate_id.clone(),
            value,
            headers,
            span,
        })
    }
}

/// The header naming the event store a message's event comes from.
pub const STORE_HEADER: &str = "store_id";

fn producer(settings: &KafkaSettings) -> Result<FutureProducer, BusError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers(settings)?)
        .set(
            "enable.idempotence",
            settings.idempotent_producer.to_string(),
        )
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            settings.message_timeout_ms.to_string(),
        )
        .set("linger.ms", settings.linger_ms.to_string())
        .set("compression.type", "none")
        .create()?)
}

/// Hands every message to the producer in order, then waits for every acknowledgement.
async fn send_all(
    producer: FutureProducer,
    outgoing: Arc<Vec<Outgoing>>,
    metrics: Option<Metrics>,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), BusError> {
    let mut deliveries = Vec::with_capacity(outgoing.len());
    for message in outgoing.iter() {
        let mut record = FutureRecord::to(&message.topic)
            .key(&message.key)
            .payload(&message.value)
            .headers(message.headers.clone());
        // Enqueue in stream order; librdkafka keeps per-partition order with idempotence.
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => {
                    if let Some(metrics) = &metrics {
                        metrics.kafka_publish_errors.inc();
                    }
                    return Err(error.into());
                }
            }
        };
        deliveries.push((delivery, &message.span, Instant::now()));
    }
    if let Some(queued) = queued {
        // Whoever handed the batch over may go on; nobody waiting is fine.
        let _ = queued.send(());
    }
    let metrics = metrics.as_ref();
    try_join_all(
        deliveries
            .into_iter()
            .map(|(delivery, span, sent)| async move {
                let outcome = match delivery.await {
                    Ok(Ok(delivered)) => {
                        span.record("messaging.destination.partition.id", delivered.partition);
                        span.record("messaging.kafka.offset", delivered.offset);
                        Ok(())
                    }
                    Ok(Err((error, _))) => Err(BusError::Kafka(error)),
                    Err(_) => Err(BusError::Cancelled),
                };
                if outcome.is_err() {
                    span.record("otel.status_code", "ERROR");
                }
                if let Some(metrics) = metrics {
                    match &outcome {
                        Ok(()) => metrics.kafka_delivery.observe(sent.elapsed().as_secs_f64()),
                        Err(_) => {
                            metrics.kafka_publish_errors.inc();
                        }
                    }
                }
                outcome
            }),
    )
    .await?;
    Ok(())
}

/// How a published message's span relates to the trace its event was stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trace {
    /// A child of the append that stored the event: the projector publishing live events.
    Continue,
    /// A new trace linked to it: a replay, which must never re-parent old traces.
    Link,
}

/// At most this many batches wait for their acknowledgements at once ([`InFlight`]).
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// A batch handed over, its acknowledgements still to come.
#[must_use = "a batch handed over is acknowledged or not: wait for it"]
pub struct Handed(tokio::task::JoinHandle<Result<(), BusError>>);

/// Resolves once a batch handed over is in the producer's queue; fails if it never gets there.
struct Queued(tokio::sync::oneshot::Receiver<()>);

impl Handed {
    /// Waits until the broker acknowledged every message of the batch.
    pub async fn acknowledged(self) -> Result<(), BusError> {
        self.0.await.unwrap_or(Err(BusError::Cancelled))
    }

    /// Whether its answer is in (acknowledged or failed).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Batches handed over whose acknowledgements are still to come, oldest first, each with the
/// stream position it ends at. Each batch is turned into messages and queued in a task of
/// its own, after the one before it, while the caller reads the next; and the next is handed
/// over while earlier ones are being acknowledged, so neither the encoding nor the broker's
/// round trip is paid in line with reading. Only the acknowledged
/// prefix counts as published. For ordering, the batches in flight are one large batch:
/// librdkafka keeps each partition's order (and after a failure, everything from the first
/// unacknowledged batch on is published again, as a failed batch is now).
pub struct InFlight {
    bus: KafkaBus,
    batches: std::collections::VecDeque<(Handed, StreamPosition)>,
    /// The last batch's signal: the next one is queued after it.
    last_queued: Option<Queued>,
}

impl InFlight {
    /// Nothing in flight yet, publishing with `bus`.
    pub fn new(bus: KafkaBus) -> Self {
        Self {
            bus,
            batches: std::collections::VecDeque::new(),
            last_queued: None,
        }
    }

    /// The bus it publishes with.
    pub fn bus(&self) -> &KafkaBus {
        &self.bus
    }

    /// Whether no batch is in flight.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Forgets the batches in flight (they may still be delivered): their events are to be
    /// published again.
    pub fn forget(&mut self) {
        self.batches.clear();
        self.last_queued = None;
    }

    /// Forgets the batches in flight and publishes with a fresh producer from now on (after
    /// a failure, see [`KafkaBus::renewed`]).
    pub fn restart(&mut self) -> Result<(), BusError> {
        self.forget();
        self.bus = self.bus.renewed()?;
        Ok(())
    }

    /// Hands `events` over (waiting for the oldest batches first while
    /// [`MAX_BATCHES_IN_FLIGHT`] or the policy's bulkhead are reached); the end of the
    /// acknowledged prefix, when it moved. An error forgets every batch in flight.
    pub async fn push(
        &mut self,
        events: &[RecordedEvent],
        trace: Trace,
    ) -> Result<Option<StreamPosition>, BusError> {
        let Some(last) = events.last() else {
            return Ok(None);
        };
        let mut acknowledged = None;
        while self.batches.len() >= self.bus.batches_in_flight() {
            acknowledged = self.settle_front().await?.or(acknowledged);
        }
        let ready = self.acknowledged(false).await?;
        let (handed, queued) = self
            .bus
            .hand_over(events.to_vec(), trace, self.last_queued.take());
        self.batches.push_back((handed, last.position));
        self.last_queued = Some(queued);
        Ok(ready.or(acknowledged))
    }

    /// The end of the acknowledged prefix, when it moved: of the batches acknowledged by now,
    /// or (`wait`) of all of them. An error forgets every batch in flight.
    pub async fn acknowledged(&mut self, wait: bool) -> Result<Option<StreamPosition>, BusError> {
        let mut acknowledged = None;
        while self
            .batches
            .front()
            .is_some_and(|(handed, _)| wait || handed.is_finished())
        {
            acknowledged = self.settle_front().await?.or(acknowledged);
        }
        Ok(acknowledged)
    }

    async fn settle_front(&mut self) -> Result<Option<StreamPosition>, BusError> {
        let Some((handed, position)) = self.batches.pop_front() else {
            return Ok(None);
        };
        match handed.acknowledged().await {
            Ok(()) => Ok(Some(position)),
            Err(error) => {
                self.forget();
                Err(error)
            }
        }
    }
}

/// Creates the service's topics with the configured partitions; existing ones are kept.
async fn ensure_topics(settings: &KafkaSettings) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers(settings)?)
        .create()?;
    let names = topics(&settings.topic_prefix);
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
                TopicReplication::Fixed(settings.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_millis(settings.message_timeout_ms)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// How long [`check_topic_owner`] may take.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that the service's topics hold this event store's events: the latest message of
/// every partition must carry `store_id` in its `store_id` header. Empty or missing topics
/// pass. A message of another store, or with no store at all (written before identities),
/// is [`BusError::ForeignTopics`].
pub async fn check_topic_owner(settings: &KafkaSettings, store_id: &str) -> Result<(), BusError> {
    let settings = settings.clone();
    let store_id = store_id.to_owned();
    tokio::task::spawn_blocking(move || check_owner_blocking(&settings, &store_id))
        .await
        .map_err(|_| BusError::Cancelled)?
}

fn check_owner_blocking(settings: &KafkaSettings, store_id: &str) -> Result<(), BusError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers(settings)?)
        // Assigned partitions only: it never joins or commits to this group.
        .set("group.id", format!("{}-owner-check", settings.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let deadline = Instant::now() + OWNER_CHECK_TIMEOUT;
    let metadata = consumer.fetch_metadata(None, OWNER_CHECK_TIMEOUT)?;
    let names: HashSet<String> = topics(&settings.topic_prefix).into_iter().collect();
    let mut latest = TopicPartitionList::new();
    let mut pending = HashSet::new();
    for topic in metadata.topics() {
        if !names.contains(topic.name()) {
            continue;
        }
        for partition in topic.partitions() {
            let (low, high) =
                consumer.fetch_watermarks(topic.name(), partition.id(), OWNER_CHECK_TIMEOUT)?;
            if high > low {
                latest.add_partition_offset(
                    topic.name(),
                    partition.id(),
                    Offset::Offset(high - 1),
                )?;
                pending.insert((topic.name().to_owned(), partition.id()));
            }
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    consumer.assign(&latest)?;
    while !pending.is_empty() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(BusError::Timeout(OWNER_CHECK_TIMEOUT));
        };
        let Some(message) = consumer.poll(left.min(Duration::from_millis(100))) else {
            continue;
        };
        let message = message?;
        if !pending.remove(&(message.topic().to_owned(), message.partition())) {
            continue;
        }
        let found = header(&message, STORE_HEADER);
        if found.as_deref() != Some(store_id) {
            return Err(BusError::ForeignTopics {
                topic: message.topic().to_owned(),
                prefix: settings.topic_prefix.clone(),
                partition: message.partition(),
                found: match found {
                    Some(other) => format!("events of the event store {other}"),
                    None => "events with no store identity (written before identities)".to_owned(),
                },
                store: store_id.to_owned(),
            });
        }
    }
    Ok(())
}

/// A header's value, as text.
fn header<M: Message>(message: &M, key: &str) -> Option<String> {
    let headers = message.headers()?;
    (0..headers.count())
        .map(|index| headers.get(index))
        .find(|header| header.key == key)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .map(str::to_owned)
}

/// A member of a consumer group over the service's topics.
pub struct KafkaSubscriber {
    consumer: StreamConsumer,
    store_id: String,
    /// The partitions where another store's message was skipped (each logged once).
    skipped: std::sync::Mutex<HashSet<(String, i32)>>,
}

impl KafkaSubscriber {
    /// Creates the service's topics if need be, joins `group` and subscribes to every topic,
    /// for the events of the store `store_id` (others' messages are skipped, each partition
    /// logged once). Offsets are committed only by [`Self::commit`]; a new group starts from
    /// the earliest offset. (Subscribing to a topic that does not exist yet would leave its
    /// partitions unassigned until the next metadata refresh, and the events published
    /// meanwhile unhandled for that long.)
    pub async fn new(
        settings: &KafkaSettings,
        group: &str,
        store_id: &str,
    ) -> Result<Self, BusError> {
        ensure_topics(settings).await?;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers(settings)?)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
            // Notice re-created topics within seconds, not the default five minutes.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create()?;
        let names = topics(&settings.topic_prefix);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        Ok(Self {
            consumer,
            store_id: store_id.to_owned(),
            skipped: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// Waits for one message, then takes whatever else arrives within `linger`, up to `max`.
    /// Not cancel-safe: a message taken by a cancelled call is lost to this consumer (poll
    /// it from a stream that keeps the call).
    pub async fn next_batch(
        &self,
        max: usize,
        linger: Duration,
    ) -> Result<Vec<RecordedEvent>, BusError> {
        let mut batch = Vec::new();
        while batch.is_empty() {
            let first = self.consumer.recv().await?;
            batch.extend(self.take(&first)?);
        }
        let until = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Ok(message) => {
                    let message = message?;
                    batch.extend(self.take(&message)?);
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// The message's event, or `None` for another store's message (passed over, not
    /// handled: a later commit on its partition covers it).
    fn take(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<Option<RecordedEvent>, BusError> {
        let store = header(message, STORE_HEADER);
        if store.as_deref() != Some(self.store_id.as_str()) {
            let first = self
                .skipped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((message.topic().to_owned(), message.partition()));
            if first {
                tracing::warn!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    found = store.as_deref().unwrap_or("none"),
                    store = %self.store_id,
                    "skipping messages of another event store on this partition (not handled)"
                );
            }
            return Ok(None);
        }
        let envelope: Envelope = serde_json::from_slice(message.payload().unwrap_or_default())
            .map_err(|source| BusError::Envelope {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                source,
            })?;
        let mut event = RecordedEvent::from(envelope);
        event.delivery = Some(Delivery {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            traceparent: header(message, "traceparent"),
        });
        Ok(Some(event))
    }

    /// Commits that everything up to `offsets` (topic, partition, last handled offset) is
    /// handled; `wait` for the broker's answer, else the commit goes out in the background
    /// (a lost one only means those messages are handled again, harmlessly).
    pub fn commit(
        &self,
        offsets: &HashMap<(String, i32), i64>,
        wait: bool,
    ) -> Result<(), BusError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::with_capacity(offsets.len());
        for ((topic, partition), offset) in offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
        }
        let mode = if wait {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        Ok(self.consumer.commit(&list, mode)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_envelope_reads_back_as_the_envelope() {
        let event = RecordedEvent {
            position: StreamPosition {
                transaction_id: 7,
                global_position: 42,
            },
            aggregate_type: "Order".to_owned(),
            aggregate_id: uuid::Uuid::new_v4().to_string(),
            sequence: 3,
            event_type: "OrderConfirmed".to_owned(),
            event_version: "1.0".to_owned(),
            payload: Payload::of(&serde_json::json!({"OrderConfirmed": {"note": "ä \"quoted\""}}))
                .expect("a payload"),
            metadata: HashMap::from([("correlation_id".to_owned(), "c-1".to_owned())]),
            delivery: None,
        };
        let bytes = serde_json::to_vec(&EnvelopeOf::from(&event)).expect("serialized");
        let read: Envelope = serde_json::from_slice(&bytes).expect("an envelope");
        assert_eq!(read, Envelope::from(&event));
    }
}
