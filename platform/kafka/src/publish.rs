//! Publishing: the idempotent producer, one batch or several in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use petstore_domain::partition::Partitions;
use petstore_event_store::stream::{RecordedEvent, StreamPosition};
use petstore_resilience::Policy;
use petstore_settings::KafkaSettings;
use petstore_telemetry::metrics::Metrics;

use crate::envelope::{topic_for, EnvelopeOf, STORE_HEADER};
use crate::topics::{check_topics, ensure_topics};
use crate::{brokers, BusError};

/// Publishes events to Kafka.
#[derive(Clone)]
pub struct KafkaBus {
    producer: FutureProducer,
    settings: KafkaSettings,
    partitions: Partitions,
    store_id: Arc<str>,
    policy: Policy,
    metrics: Option<Metrics>,
}

/// One message, ready to hand to the producer.
struct Outgoing {
    global_position: i64,
    topic: String,
    partition: i32,
    key: String,
    value: Vec<u8>,
    headers: OwnedHeaders,
    span: tracing::Span,
}

impl KafkaBus {
    /// A producer for the configured brokers (no connection is made yet), stamping
    /// `store_id` on every message, putting each on its aggregate's saga partition of
    /// `partitions` (the store's), and publishing through `policy` (the `kafka` one).
    pub fn new(
        settings: &KafkaSettings,
        store_id: &str,
        partitions: Partitions,
        policy: Policy,
    ) -> Result<Self, BusError> {
        Ok(Self {
            producer: producer(settings)?,
            settings: settings.clone(),
            partitions,
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

    /// Creates the service's topics, one partition per saga partition (existing ones are
    /// kept), then checks that they are this event store's ([`check_topics`]).
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        ensure_topics(&self.settings, self.partitions).await?;
        check_topics(&self.settings, &self.store_id, self.partitions).await
    }

    /// Publishes `events` in order and waits until the broker acknowledged every one. Each
    /// message gets a producer span, in the event's trace (`Trace::Continue`) or in a new
    /// trace linked to it (`Trace::Link`, for replays), whose `traceparent` travels in the
    /// message headers.
    pub async fn publish(&self, events: &[RecordedEvent], trace: Trace) -> Result<(), BusError> {
        let (handed, _) = self.hand_over(events.to_vec(), trace, None);
        handed.acknowledged().await.map(drop)
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
            correlation_id = event.metadata.correlation_id.as_deref(),
        );
        let stored = event.metadata.traceparent.as_deref();
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
        // An event without a correlation or causation id (not appended by the service) is
        // published without that header.
        for (key, value) in [
            ("event_id", Some(envelope.event_id.as_str())),
            ("event_type", Some(event.event_type.as_str())),
            ("event_version", Some(event.event_version.as_str())),
            ("correlation_id", event.metadata.correlation_id.as_deref()),
            ("causation_id", event.metadata.causation_id.as_deref()),
            ("traceparent", Some(traceparent.as_str())),
            (STORE_HEADER, Some(&*self.store_id)),
        ] {
            if let Some(value) = value {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        Ok(Outgoing {
            global_position: event.position.global_position,
            topic,
            // Its saga partition, not the client's partitioner's choice.
            partition: self.partitions.of_key(&event.aggregate_id).kafka(),
            key: event.aggregate_id.clone(),
            value,
            headers,
            span,
        })
    }
}

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

/// Where the broker put one event's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The event's global position.
    pub global_position: i64,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset in the partition.
    pub offset: i64,
}

/// Hands every message to the producer in order, then waits for every acknowledgement: where
/// each message went, in order.
async fn send_all(
    producer: FutureProducer,
    outgoing: Arc<Vec<Outgoing>>,
    metrics: Option<Metrics>,
    queued: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<Vec<Delivered>, BusError> {
    let mut deliveries = Vec::with_capacity(outgoing.len());
    for message in outgoing.iter() {
        let mut record = FutureRecord::to(&message.topic)
            .partition(message.partition)
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
        deliveries.push((delivery, message, Instant::now()));
    }
    if let Some(queued) = queued {
        // Whoever handed the batch over may go on; nobody waiting is fine.
        let _ = queued.send(());
    }
    let metrics = metrics.as_ref();
    try_join_all(
        deliveries
            .into_iter()
            .map(|(delivery, message, sent)| async move {
                let span = &message.span;
                let outcome = match delivery.await {
                    Ok(Ok(delivered)) => {
                        span.record("messaging.destination.partition.id", delivered.partition);
                        span.record("messaging.kafka.offset", delivered.offset);
                        Ok(Delivered {
                            global_position: message.global_position,
                            topic: message.topic.clone(),
                            partition: delivered.partition,
                            offset: delivered.offset,
                        })
                    }
                    Ok(Err((error, _))) => Err(BusError::Kafka(error)),
                    Err(_) => Err(BusError::Cancelled),
                };
                if outcome.is_err() {
                    span.record("otel.status_code", "ERROR");
                }
                if let Some(metrics) = metrics {
                    match &outcome {
                        Ok(_) => metrics.kafka_delivery.observe(sent.elapsed().as_secs_f64()),
                        Err(_) => {
                            metrics.kafka_publish_errors.inc();
                        }
                    }
                }
                outcome
            }),
    )
    .await
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
pub struct Handed(tokio::task::JoinHandle<Result<Vec<Delivered>, BusError>>);

/// Resolves once a batch handed over is in the producer's queue; fails if it never gets there.
struct Queued(tokio::sync::oneshot::Receiver<()>);

impl Handed {
    /// Waits until the broker acknowledged every message of the batch: where each went.
    pub async fn acknowledged(self) -> Result<Vec<Delivered>, BusError> {
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
    /// Where the messages of the batches acknowledged since the last [`Self::take_delivered`] went.
    delivered: Vec<Delivered>,
    /// The last batch's signal: the next one is queued after it.
    last_queued: Option<Queued>,
}

impl InFlight {
    /// Nothing in flight yet, publishing with `bus`.
    pub fn new(bus: KafkaBus) -> Self {
        Self {
            bus,
            batches: std::collections::VecDeque::new(),
            delivered: Vec::new(),
            last_queued: None,
        }
    }

    /// Where the messages of the batches acknowledged since the last call went, in order.
    pub fn take_delivered(&mut self) -> Vec<Delivered> {
        std::mem::take(&mut self.delivered)
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
        self.delivered.clear();
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
            Ok(delivered) => {
                self.delivered.extend(delivered);
                Ok(Some(position))
            }
            Err(error) => {
                self.forget();
                Err(error)
            }
        }
    }
}
