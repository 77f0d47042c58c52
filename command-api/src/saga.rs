//! The saga runner: drives every order's fulfilment saga from the global event stream.
//!
//! It reads the stream from its own durable checkpoint (`saga`), asks the pure
//! [`petstore_domain::saga::react`] what each event calls for, and performs it: commands to
//! aggregates, calls to the payment gateway and delivery provider, deadlines. Events of
//! different orders are handled concurrently, each order's in its own lane (its events in
//! stream order), and the runner reads on while lanes run: one slow order holds up no other.
//! The checkpoint moves past an event once it and every event before it are handled, so a
//! crash replays what was in flight, and replaying is harmless: every command carries an id
//! derived from the event
//! that caused it (and the action's place in the reaction), and the event store drops a
//! command whose id the aggregate already holds. Provider calls are made only while the
//! payment or delivery has no recorded result, with an idempotency key derived the same way.
//!
//! With Kafka configured the runner consumes the events from the topics in a consumer group
//! instead (offsets committed, the same way, up to what is handled); several runners then
//! share the work.
//!
//! A second loop fires due deadlines: a step that has not finished in time cancels the order.
//!
//! The live settings decide as each step starts: the step timeouts, and `payment_processing`.
//! While that flag is off (for the order's customer) a payment is held: no call to the
//! gateway, a durable `payment_hold` entry instead, re-checked every second; when the flag is
//! on again the order's `OrderPetReserved` is handled anew (the same deterministic command ids,
//! so nothing is charged twice). A payment deadline that falls due while payments are held is
//! extended by `saga.payment_timeout_ms` instead of cancelling the order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, AggregateError};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use petstore_domain::delivery::{Delivery, DeliveryCommand, DeliveryEvent, DeliveryState};
use petstore_domain::order::{Order, OrderCommand, OrderEvent};
use petstore_domain::payment::{Payment, PaymentCommand, PaymentEvent, PaymentState};
use petstore_domain::pet::{Pet, PetEvent};
use petstore_domain::providers::{
    ChargeRequest, DeliveryProvider, DeliveryRequest, PaymentGateway,
};
use petstore_domain::saga::{self, SagaAction, SagaEvent, SagaOutcome, SagaPolicy};
use petstore_domain::{DomainError, OrderId, SagaStep};
use petstore_platform::bus::{BusError, KafkaSubscriber};
use petstore_platform::dead_letters::{self, DeadLetterStatus};
use petstore_platform::deadlines::{self, Deadline, DeadlineKind};
use petstore_platform::event_store::{EventMetadata, EventStore};
use petstore_platform::http::CorrelationId;
use petstore_platform::live::Live;
use petstore_platform::metrics::Metrics;
use petstore_platform::resilience::{CallError, Policies, Rejection};
use petstore_platform::settings::{Flag, KafkaSettings, SagaSettings};
use petstore_platform::stream::{self, Lag, RecordedEvent, StreamPosition, StreamReader};
use petstore_platform::telemetry;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::providers;

mod arrivals;

use arrivals::{Arrivals, Ticket};

/// The checkpoint name of the saga runner's subscription.
pub const CHECKPOINT: &str = "saga";
/// The subject saga commands act as.
pub const SUBJECT: &str = "saga";

/// How often a held payment looks whether `payment_processing` is on again.
const PAYMENT_HOLD_RECHECK: chrono::Duration = chrono::Duration::seconds(1);

/// Attempts at handling one event before it is set aside as a dead letter.
const HANDLING_ATTEMPTS: u32 = 3;

/// How often, at most, the runner acknowledges (saves its checkpoint, commits its offsets)
/// while events keep coming: after a crash, what was handled since is handled again
/// (harmlessly), and one acknowledgement covers many events.
const ACKNOWLEDGE_EVERY: Duration = Duration::from_millis(50);

/// Namespace of the ids of commands the saga issues.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x9d2c_41a7_63e8_4f0b_8a5d_1c3e_6b7f_2a90);

/// Why handling a batch failed; the runner retries it from the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// The event store failed.
    #[error("event store: {0}")]
    Store(String),
    /// Reading the stream or the checkpoint failed.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// The deadline table failed.
    #[error("deadlines: {0}")]
    Deadlines(#[from] sqlx::Error),
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

/// How far the saga runner has come.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SagaProgress {
    /// The last event handled: in the stream's order (following the event store: from the
    /// checkpoint it resumed at), or the furthest one (consuming Kafka, whose partitions
    /// interleave: `None` before the first).
    pub position: Option<StreamPosition>,
    /// Whether handling an event failed (the runner is stalled until it handles one again).
    pub failing: bool,
    /// How far behind the log it was when last measured.
    pub lag: Lag,
}

/// Runs the sagas.
pub struct SagaRunner<P, D> {
    store: EventStore,
    kafka: Option<KafkaSettings>,
    settings: SagaSettings,
    policies: Policies,
    payments: Arc<P>,
    deliveries: Arc<D>,
    metrics: Metrics,
    live: Live,
    progress: watch::Sender<SagaProgress>,
    in_flight: Arc<std::sync::Mutex<std::collections::HashSet<OrderId>>>,
}

impl<P, D> Clone for SagaRunner<P, D> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            kafka: self.kafka.clone(),
            settings: self.settings.clone(),
            policies: self.policies.clone(),
            payments: self.payments.clone(),
            deliveries: self.deliveries.clone(),
            metrics: self.metrics.clone(),
            live: self.live.clone(),
            progress: self.progress.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// A decoded event of interest to the saga.
enum Decoded {
    Order(OrderEvent),
    Pet(PetEvent),
    Payment(PaymentEvent),
    Delivery(DeliveryEvent),
}

/// An arrived event, as far as acknowledging it goes.
struct Arrived {
    position: StreamPosition,
    /// Its Kafka topic and partition, and offset.
    delivery: Option<((String, i32), i64)>,
}

impl Arrived {
    fn of(event: &RecordedEvent) -> Self {
        Self {
            position: event.position,
            delivery: event.delivery.as_ref().map(|delivery| {
                (
                    (delivery.topic.clone(), delivery.partition),
                    delivery.offset,
                )
            }),
        }
    }
}

/// An event waiting for, or in, its order's lane.
struct Work {
    ticket: Ticket,
    event: RecordedEvent,
    decoded: Decoded,
}

/// A lane's run (or an event being set aside): its order, and the tickets and ids of the
/// events handled, or why one failed.
type Step<'a> = BoxFuture<'a, (Option<OrderId>, Result<Vec<(Ticket, Uuid)>, SagaError>)>;

/// How the runner acknowledges what it handled.
enum Acknowledge<'a> {
    /// Following the event store: its checkpoint.
    Checkpoint,
    /// Consuming Kafka: the group's offsets.
    Offsets(&'a KafkaSubscriber),
}

/// Decodes an event in today's shape (an older version upcast first).
fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, SagaError> {
    petstore_domain::upcasting::decode(
        &event.aggregate_type,
        &event.event_type,
        &event.event_version,
        event.payload.raw(),
    )
    .map_err(|source| SagaError::Decode {
        event_type: event.event_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        source: Box::new(source),
    })
}

/// The order an event belongs to, and the event decoded; `None` for events no saga needs.
fn saga_event(event: &RecordedEvent) -> Result<Option<(OrderId, Decoded)>, SagaError> {
    let order_of_aggregate = || OrderId::parse(&event.aggregate_id).ok();
    Ok(match event.aggregate_type.as_str() {
        Order::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Order(e))))
            .transpose()?,
        Payment::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Payment(e))))
            .transpose()?,
        Delivery::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Delivery(e))))
            .transpose()?,
        Pet::TYPE => {
            let pet_event: PetEvent = decode(event)?;
            SagaEvent::order_of_pet_event(&pet_event).map(|id| (id, Decoded::Pet(pet_event)))
        }
        _ => None,
    })
}

fn store_error<E: std::error::Error>(error: AggregateError<E>) -> SagaError {
    match error {
        AggregateError::DeserializationError(_) => SagaError::Unreadable(error.to_string()),
        other => SagaError::Store(other.to_string()),
    }
}

impl SagaError {
    /// Whether the failure is the event's own (it or its aggregate's history cannot be
    /// read): set aside rather than retried for ever.
    fn is_poison(&self) -> bool {
        matches!(self, SagaError::Decode { .. } | SagaError::Unreadable(_))
    }
}

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// A runner over `store`, calling `payments` and `deliveries` through `policies`,
    /// deciding with the `live` settings.
    pub fn new(
        store: EventStore,
        settings: SagaSettings,
        policies: Policies,
        payments: Arc<P>,
        deliveries: Arc<D>,
        metrics: Metrics,
        live: Live,
    ) -> Self {
        Self {
            store,
            kafka: None,
            settings,
            policies,
            payments,
            deliveries,
            metrics,
            live,
            progress: watch::Sender::new(SagaProgress::default()),
            in_flight: Arc::default(),
        }
    }

    /// Follows the runner's progress (for health).
    pub fn progress(&self) -> watch::Receiver<SagaProgress> {
        self.progress.subscribe()
    }

    /// Records in the progress what is handled (with all before it).
    fn handled(&self, position: Option<StreamPosition>) {
        self.metrics.saga_stalled.set(0);
        self.progress.send_modify(|progress| {
            progress.failing = false;
            if let Some(handled) = position {
                progress.position = Some(progress.position.map_or(handled, |at| at.max(handled)));
            }
        });
    }

    /// Records a failure: the runner is stalled until it has handled an event again.
    fn failed(&self) {
        self.metrics.saga_failures.inc();
        self.metrics.saga_stalled.set(1);
        self.progress
            .send_modify(|progress| progress.failing = true);
    }

    /// Measures, every [`stream::LAG_SAMPLE_INTERVAL`], how far behind the log the runner
    /// is and how many deadlines wait, into the progress and the metrics. Never returns.
    async fn measure(&self) {
        let database = self.store.database();
        loop {
            let position = self.progress.borrow().position;
            if let Some(position) = position {
                match stream::lag(database, position).await {
                    Ok(lag) => {
                        self.metrics.saga_lag(lag.events, lag.seconds);
                        self.progress.send_modify(|progress| progress.lag = lag);
                    }
                    Err(error) => tracing::debug!(%error, "measuring the saga lag failed"),
                }
            }
            match deadlines::backlog(database, Utc::now()).await {
                Ok((pending, overdue)) => {
                    self.metrics.deadlines_pending.set(pending);
                    self.metrics.deadlines_overdue.set(overdue);
                }
                Err(error) => tracing::debug!(%error, "counting deadlines failed"),
            }
            match dead_letters::open_counts(database).await {
                Ok(counts) => self.metrics.dead_letters_open(&counts),
                Err(error) => tracing::debug!(%error, "counting dead letters failed"),
            }
            let in_flight = self.in_flight.lock().map_or(0, |orders| orders.len());
            self.metrics
                .sagas_in_flight
                .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
            tokio::time::sleep(stream::LAG_SAMPLE_INTERVAL).await;
        }
    }

    /// Consume the events from Kafka, in the configured consumer group, instead of following
    /// the event store: several runners then share the work, and a dead runner's partitions
    /// move to the others.
    pub fn with_kafka(mut self, kafka: KafkaSettings) -> Self {
        self.kafka = Some(kafka);
        self
    }

    /// The policy in force now, for an order of `customer` (a rollout buckets by them).
    fn policy(&self, customer: &str) -> SagaPolicy {
        let live = self.live.current();
        let saga = &live.settings.saga;
        SagaPolicy {
            express_payment: live.flag(Flag::ExpressOrderProcessing, customer),
            reservation_timeout: millis(saga.reservation_timeout_ms),
            payment_timeout: millis(saga.payment_timeout_ms),
            delivery_timeout: millis(saga.delivery_timeout_ms),
        }
    }

    /// Runs the stream loop and the deadline loop until `shutdown` resolves. A batch being
    /// handled when it does is finished first. Everything runs inside this future (nothing is
    /// spawned), so dropping it stops the runner at once, as a crash would.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let work = async {
            let events = async {
                match &self.kafka {
                    Some(kafka) => self.follow_kafka(kafka, stopped.clone()).await,
                    None => self.follow_stream(stopped.clone()).await,
                }
            };
            tokio::select! {
                _ = async { tokio::join!(self.fire_deadlines(stopped.clone()), events) } => {}
                () = self.measure() => {}
            }
        };
        tokio::pin!(work);
        tokio::select! {
            () = &mut work => {}
            () = shutdown => {
                let _ = stop.send(true);
                work.await;
            }
        }
    }

    async fn follow_stream(&self, mut stopped: watch::Receiver<bool>) {
        while let Err(error) = self.follow_from_checkpoint(&mut stopped).await {
            self.failed();
            tracing::error!(%error, "saga step failed; retrying from the checkpoint");
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn follow_kafka(&self, kafka: &KafkaSettings, mut stopped: watch::Receiver<bool>) {
        let mut seen = RecentEvents::new(100_000);
        while let Err(error) = self.consume_kafka(kafka, &mut stopped, &mut seen).await {
            // The consumer is dropped: it rejoins the group and resumes from the last
            // committed offsets, so what was not handled is delivered again.
            self.failed();
            tracing::error!(%error, "saga step from kafka failed; rejoining the group");
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Handles the consumer group's events until stopped (`Ok`) or until one fails. Offsets
    /// are committed only up to events handled with all before them.
    async fn consume_kafka(
        &self,
        kafka: &KafkaSettings,
        stopped: &mut watch::Receiver<bool>,
        seen: &mut RecentEvents,
    ) -> Result<(), SagaError> {
        let store_id = self
            .store
            .database()
            .store_id()
            .await
            .map_err(|error| SagaError::Store(error.to_string()))?;
        let subscriber = KafkaSubscriber::new(kafka, &kafka.consumer_group, &store_id).await?;
        let max = self.settings.batch_size as usize;
        // Polled from a stream, never cancelled: a batch being taken is not lost.
        let batches = futures::stream::unfold(&subscriber, |subscriber| async move {
            let batch = subscriber.next_batch(max, Duration::ZERO).await;
            Some((batch.map_err(SagaError::from), subscriber))
        });
        self.pipeline(batches, stopped, seen, Acknowledge::Offsets(&subscriber))
            .await
    }

    /// Handles the stream from the checkpoint until stopped (`Ok`) or until an event's
    /// handling fails (`Err`).
    async fn follow_from_checkpoint(
        &self,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<(), SagaError> {
        let start = stream::load_checkpoint(self.store.database(), CHECKPOINT).await?;
        // Where it resumes is what it has handled, as far as lag goes.
        self.progress
            .send_modify(|progress| progress.position = Some(start));
        let reader = StreamReader::new(
            &self.store,
            start,
            self.settings.batch_size,
            Duration::from_millis(100),
        );
        let batches = futures::stream::unfold(reader, |mut reader| async move {
            let batch = reader.next_batch().await;
            Some((batch.map_err(SagaError::from), reader))
        });
        let mut seen = RecentEvents::new(0);
        self.pipeline(batches, stopped, &mut seen, Acknowledge::Checkpoint)
            .await
    }

    /// Handles the events of `batches` until stopped (`Ok`, once what arrived is handled) or
    /// until one's handling fails (`Err`). Each order's events go, in order, through the
    /// order's lane; up to `saga.max_concurrent_orders` lanes run at once, and more events are
    /// read while they run (up to `saga.batch_size` unacknowledged), so one slow order holds
    /// up no other. What is handled with everything that arrived before it is acknowledged
    /// (the checkpoint saved, the offsets committed) every [`ACKNOWLEDGE_EVERY`] at most. An
    /// event that cannot be decoded, or whose handling keeps failing because its history
    /// cannot be read, is set aside as a dead letter and the runner moves on.
    async fn pipeline(
        &self,
        batches: impl futures::Stream<Item = Result<Vec<RecordedEvent>, SagaError>>,
        stopped: &mut watch::Receiver<bool>,
        seen: &mut RecentEvents,
        acknowledge: Acknowledge<'_>,
    ) -> Result<(), SagaError> {
        let mut batches = std::pin::pin!(batches);
        let lanes_at_most = self.settings.max_concurrent_orders.max(1);
        let outstanding_at_most = (self.settings.batch_size as usize).max(1);
        let mut arrivals = Arrivals::new();
        // Nothing below awaits outside these futures: a lane not polled while it holds a
        // database connection could starve whatever waits for one.
        let mut lanes: FuturesUnordered<Step<'_>> = FuturesUnordered::new();
        let mut acknowledging: Option<BoxFuture<'_, Result<(), SagaError>>> = None;
        // Events waiting for their order's lane; orders waiting for a lane, each once.
        let mut queued: HashMap<OrderId, Vec<Work>> = HashMap::new();
        let mut waiting: VecDeque<OrderId> = VecDeque::new();
        let mut running: HashSet<OrderId> = HashSet::new();
        let mut in_flight: HashSet<Uuid> = HashSet::new();
        let mut unacknowledged: Vec<Arrived> = Vec::new();
        let mut acknowledge_at: Option<tokio::time::Instant> = None;
        let mut stopping = false;
        loop {
            while lanes.len() < lanes_at_most {
                let Some(order_id) = waiting.pop_front() else {
                    break;
                };
                let work = queued.remove(&order_id).unwrap_or_default();
                running.insert(order_id);
                lanes.push(self.lane(order_id, work).boxed());
            }
            if stopping && lanes.is_empty() {
                if let Some(acknowledging) = acknowledging.take() {
                    acknowledging.await?;
                }
                unacknowledged.extend(arrivals.acknowledgeable());
                return self.acknowledge(&acknowledge, unacknowledged, true).await;
            }
            let room = !stopping && arrivals.outstanding() < outstanding_at_most;
            tokio::select! {
                // (The guard `wait_for` returns must not live on across the awaits below.)
                _ = async { stopped.wait_for(|stop| *stop).await.is_ok() }, if !stopping => stopping = true,
                batch = batches.next(), if room => {
                    let Some(batch) = batch else {
                        stopping = true;
                        continue;
                    };
                    for event in batch? {
                        let arrived = Arrived::of(&event);
                        let id = event.event_id();
                        // Kafka delivers at least once: a redelivery of an event handled
                        // or being handled needs nothing more.
                        if seen.contains(&id) || in_flight.contains(&id) {
                            arrivals.arrive(arrived, true);
                            continue;
                        }
                        let decoded = match saga_event(&event) {
                            Ok(decoded) => decoded,
                            Err(error) => {
                                let ticket = arrivals.arrive(arrived, false);
                                lanes.push(async move {
                                    let outcome = self.set_aside(&event, &error).await;
                                    (None, outcome.map(|()| vec![(ticket, id)]))
                                }.boxed());
                                continue;
                            }
                        };
                        let Some((order_id, decoded)) = decoded else {
                            arrivals.arrive(arrived, true);
                            continue;
                        };
                        in_flight.insert(id);
                        let ticket = arrivals.arrive(arrived, false);
                        let queue = queued.entry(order_id).or_default();
                        if queue.is_empty() && !running.contains(&order_id) {
                            waiting.push_back(order_id);
                        }
                        queue.push(Work { ticket, event, decoded });
                    }
                }
                Some((order_id, handled)) = lanes.next(), if !lanes.is_empty() => {
                    if let Some(order_id) = order_id {
                        running.remove(&order_id);
                        if queued.contains_key(&order_id) {
                            waiting.push_back(order_id);
                        }
                    }
                    for (ticket, id) in handled? {
                        arrivals.finish(ticket);
                        in_flight.remove(&id);
                        seen.record(id);
                    }
                }
                () = tokio::time::sleep_until(acknowledge_at.unwrap_or_else(tokio::time::Instant::now)), if acknowledge_at.is_some() && acknowledging.is_none() => {
                    acknowledge_at = None;
                    let handled = std::mem::take(&mut unacknowledged);
                    acknowledging = Some(self.acknowledge(&acknowledge, handled, false).boxed());
                }
                acknowledged = async { acknowledging.as_mut().expect("guarded").await }, if acknowledging.is_some() => {
                    acknowledging = None;
                    acknowledged?;
                }
            }
            let before = unacknowledged.len();
            unacknowledged.extend(arrivals.acknowledgeable());
            if unacknowledged.len() > before && acknowledge_at.is_none() {
                acknowledge_at = Some(tokio::time::Instant::now() + ACKNOWLEDGE_EVERY);
            }
        }
    }

    /// Handles one order's events in order: the tickets and ids of those handled, or why
    /// one failed.
    async fn lane(
        &self,
        order_id: OrderId,
        work: Vec<Work>,
    ) -> (Option<OrderId>, Result<Vec<(Ticket, Uuid)>, SagaError>) {
        let mut handled = Vec::with_capacity(work.len());
        for Work {
            ticket,
            event,
            decoded,
        } in work
        {
            let span = step_span(order_id, &event);
            let outcome = self
                .handle_persistently(order_id, &event, &decoded)
                .instrument(span)
                .await;
            if let Err(error) = outcome {
                return (Some(order_id), Err(error));
            }
            handled.push((ticket, event.event_id()));
        }
        (Some(order_id), Ok(handled))
    }

    /// Acknowledges `handled` (events handled with all that arrived before them): saves the
    /// checkpoint, or commits the offsets (waiting for the broker when `finally`).
    async fn acknowledge(
        &self,
        how: &Acknowledge<'_>,
        handled: Vec<Arrived>,
        finally: bool,
    ) -> Result<(), SagaError> {
        let furthest = handled.iter().map(|arrived| arrived.position).max();
        match how {
            Acknowledge::Checkpoint => {
                // In stream order: the last is the furthest.
                if let Some(position) = furthest {
                    stream::save_checkpoint(self.store.database(), CHECKPOINT, position, None)
                        .await?;
                }
            }
            Acknowledge::Offsets(subscriber) => {
                let mut offsets = HashMap::new();
                for (partition, offset) in
                    handled.into_iter().filter_map(|arrived| arrived.delivery)
                {
                    let at = offsets.entry(partition).or_insert(offset);
                    *at = offset.max(*at);
                }
                subscriber.commit(&offsets, finally)?;
            }
        }
        if furthest.is_some() {
            self.handled(furthest);
        }
        Ok(())
    }

    /// Handles one event, trying again a few times; one that keeps failing because an
    /// aggregate's stored history cannot be read is set aside (the failure is the events',
    /// not the infrastructure's).
    async fn handle_persistently(
        &self,
        order_id: OrderId,
        event: &RecordedEvent,
        decoded: &Decoded,
    ) -> Result<(), SagaError> {
        let mut attempt = 1;
        loop {
            let Err(error) = self.handle_event(order_id, event, decoded).await else {
                return Ok(());
            };
            tracing::Span::current().record("otel.status_code", "ERROR");
            tracing::error!(%error, attempt, "saga step failed");
            if attempt >= HANDLING_ATTEMPTS {
                // Only a failure of the event's own (its history cannot be read) is set
                // aside; anything else is the infrastructure's: the batch fails and is
                // retried from the checkpoint, the runner shows stalled.
                if !error.is_poison() {
                    return Err(error);
                }
                return self.set_aside(event, &error).await;
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            attempt += 1;
        }
    }

    /// Records `event` as a dead letter of the saga, with `error`.
    async fn set_aside(&self, event: &RecordedEvent, error: &SagaError) -> Result<(), SagaError> {
        let order_id = match event.aggregate_type.as_str() {
            Order::TYPE | Payment::TYPE | Delivery::TYPE => Some(event.aggregate_id.as_str()),
            _ => None,
        };
        let id = dead_letters::record(
            self.store.database(),
            CHECKPOINT,
            event,
            order_id,
            &error.to_string(),
        )
        .await
        .map_err(|error| SagaError::DeadLetters(error.to_string()))?;
        self.metrics.dead_letter_recorded(CHECKPOINT);
        tracing::warn!(
            dead_letter = id,
            %error,
            event_type = %event.event_type,
            aggregate_id = %event.aggregate_id,
            sequence = event.sequence,
            "event set aside as a dead letter; the saga moves on"
        );
        Ok(())
    }

    /// Handles again the saga's dead letters an operator asked to retry
    /// (`petstore dead-letters retry`): resolved when handled, pending again when not.
    pub async fn retry_dead_letters(&self) -> Result<usize, SagaError> {
        let database = self.store.database();
        let failed = |error: sqlx::Error| SagaError::DeadLetters(error.to_string());
        let letters = dead_letters::retrying(database, CHECKPOINT)
            .await
            .map_err(failed)?;
        for letter in &letters {
            let event = stream::aggregate_events_newest_first(
                database,
                &letter.aggregate_type,
                &letter.aggregate_id,
                letter.sequence..letter.sequence + 1,
                1,
            )
            .await?
            .into_iter()
            .next();
            let outcome = match &event {
                None => Err(SagaError::DeadLetters(
                    "the event is no longer in the log".into(),
                )),
                Some(event) => match saga_event(event) {
                    Ok(Some((order_id, decoded))) => {
                        self.handle_event(order_id, event, &decoded).await
                    }
                    Ok(None) => Ok(()),
                    Err(error) => Err(error),
                },
            };
            match (outcome, &event) {
                (Ok(()), _) => {
                    dead_letters::transition(
                        database,
                        letter.id,
                        &[DeadLetterStatus::Retrying],
                        DeadLetterStatus::Resolved,
                    )
                    .await
                    .map_err(failed)?;
                    tracing::info!(dead_letter = letter.id, "dead letter handled on retry");
                }
                (Err(error), Some(event)) => self.set_aside(event, &error).await?,
                (Err(error), None) => {
                    tracing::error!(dead_letter = letter.id, %error, "dead letter cannot be retried");
                    dead_letters::transition(
                        database,
                        letter.id,
                        &[DeadLetterStatus::Retrying],
                        DeadLetterStatus::Pending,
                    )
                    .await
                    .map_err(failed)?;
                }
            }
        }
        Ok(letters.len())
    }

    async fn handle_event(
        &self,
        order_id: OrderId,
        event: &RecordedEvent,
        decoded: &Decoded,
    ) -> Result<(), SagaError> {
        let order: Order = self
            .store
            .load(&order_id.to_string())
            .await
            .map_err(store_error)?;
        let occurred_at = DateTime::parse_from_rfc3339(event.metadata_value("timestamp"))
            .map_or_else(|_| Utc::now(), |at| at.with_timezone(&Utc));
        let saga_event = match decoded {
            Decoded::Order(inner) => SagaEvent::Order(inner),
            Decoded::Pet(inner) => SagaEvent::Pet(inner),
            Decoded::Payment(inner) => SagaEvent::Payment(inner),
            Decoded::Delivery(inner) => SagaEvent::Delivery(inner),
        };
        if matches!(decoded, Decoded::Order(OrderEvent::OrderCreated(_))) {
            self.metrics.sagas_started.inc();
            if let Ok(mut orders) = self.in_flight.lock() {
                orders.insert(order_id);
            }
        }
        let customer = order
            .request()
            .map(|request| request.customer_id.as_str().to_owned())
            .unwrap_or_default();
        let actions = saga::react(&order, saga_event, occurred_at, &self.policy(&customer));
        let correlation_id = CorrelationId::parse(event.metadata_value("correlation_id"))
            .unwrap_or_else(CorrelationId::generate);
        let cause = Cause {
            event_id: event.event_id(),
            correlation_id,
            order_id,
            customer,
        };
        for (position, action) in actions.into_iter().enumerate() {
            self.perform(&cause, position, action).await?;
        }
        Ok(())
    }

    async fn perform(
        &self,
        cause: &Cause,
        position: usize,
        action: SagaAction,
    ) -> Result<(), SagaError> {
        let order_key = cause.order_id.to_string();
        match action {
            SagaAction::Order(command) => {
                self.send::<Order>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Pet {
                pet_id,
                command,
                if_refused,
            } => {
                let refused = self
                    .send::<Pet>(pet_id.as_str(), command, cause.metadata(position, ""))
                    .await?;
                if let (Some(error), Some(reason)) = (refused, if_refused) {
                    tracing::info!(%error, reason = reason.as_str(), "pet refused; cancelling the order");
                    self.send::<Order>(
                        &order_key,
                        OrderCommand::CancelOrder { reason },
                        cause.metadata(position, "refused"),
                    )
                    .await?;
                }
            }
            SagaAction::Payment(command) => {
                self.send::<Payment>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Delivery(command) => {
                self.send::<Delivery>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::ChargePayment {
                amount,
                simulate_failure,
            } => {
                let payment: Payment = self.store.load(&order_key).await.map_err(store_error)?;
                if payment.state() != PaymentState::None {
                    return Ok(());
                }
                if !self.live.flag(Flag::PaymentProcessing, &cause.customer) {
                    tracing::info!("payment held: payment_processing is off");
                    deadlines::rearm(
                        self.store.database(),
                        &Deadline {
                            order_id: cause.order_id,
                            kind: DeadlineKind::PaymentHold,
                            due_at: Utc::now() + PAYMENT_HOLD_RECHECK,
                            correlation_id: cause.correlation_id.to_string(),
                        },
                    )
                    .await?;
                    return Ok(());
                }
                let metadata = cause
                    .metadata(position, "")
                    .with_flag(Flag::PaymentProcessing, true);
                let request = ChargeRequest {
                    order_id: cause.order_id,
                    amount,
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let gateway = Arc::clone(&self.payments);
                let result = providers::call(&self.policies.payment, move || {
                    let gateway = Arc::clone(&gateway);
                    let request = request.clone();
                    async move { gateway.charge(request).await }
                })
                .await;
                let command = match result {
                    Ok(receipt) => PaymentCommand::RecordPaymentProcessed {
                        order_id: cause.order_id,
                        amount,
                        provider_reference: receipt.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        return self
                            .retry_later(DeadlineKind::PaymentHold, cause, &rejection)
                            .await;
                    }
                    Err(error) => PaymentCommand::RecordPaymentDeclined {
                        order_id: cause.order_id,
                        amount,
                        reason: error.to_string(),
                    },
                };
                self.send::<Payment>(&order_key, command, metadata).await?;
            }
            SagaAction::BookDelivery {
                pet_id,
                simulate_failure,
            } => {
                let delivery: Delivery = self.store.load(&order_key).await.map_err(store_error)?;
                if delivery.state() != DeliveryState::None {
                    return Ok(());
                }
                let metadata = cause.metadata(position, "");
                let request = DeliveryRequest {
                    order_id: cause.order_id,
                    pet_id: pet_id.clone(),
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let provider = Arc::clone(&self.deliveries);
                let result = providers::call(&self.policies.delivery, move || {
                    let provider = Arc::clone(&provider);
                    let request = request.clone();
                    async move { provider.book(request).await }
                })
                .await;
                let command = match result {
                    Ok(booking) => DeliveryCommand::RecordDeliveryScheduled {
                        order_id: cause.order_id,
                        pet_id,
                        estimated_arrival: booking.estimated_arrival,
                        provider_reference: booking.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        return self
                            .retry_later(DeadlineKind::DeliveryRetry, cause, &rejection)
                            .await;
                    }
                    Err(error) => DeliveryCommand::RecordDeliveryFailed {
                        order_id: cause.order_id,
                        reason: error.to_string(),
                    },
                };
                self.send::<Delivery>(&order_key, command, metadata).await?;
            }
            SagaAction::ScheduleDeadline { step, due_at } => {
                deadlines::schedule(
                    self.store.database(),
                    &Deadline {
                        order_id: cause.order_id,
                        kind: DeadlineKind::Step(step),
                        due_at,
                        correlation_id: cause.correlation_id.to_string(),
                    },
                )
                .await?;
            }
            SagaAction::Finished(outcome) => {
                if let Ok(mut orders) = self.in_flight.lock() {
                    orders.remove(&cause.order_id);
                }
                match outcome {
                    SagaOutcome::Completed => self.metrics.saga_finished("completed", ""),
                    SagaOutcome::Cancelled(reason) => {
                        self.metrics.saga_finished("cancelled", reason.as_str())
                    }
                }
            }
        }
        Ok(())
    }

    /// A provider was not called (its breaker is open, its bulkhead full): the step waits
    /// and is tried again when the policy says it may be, through a durable deadline of
    /// `kind` (so a restart does not lose it).
    async fn retry_later(
        &self,
        kind: DeadlineKind,
        cause: &Cause,
        rejection: &Rejection,
    ) -> Result<(), SagaError> {
        let wait = chrono::Duration::from_std(rejection.retry_after())
            .unwrap_or(chrono::Duration::seconds(1));
        tracing::info!(%rejection, step = %kind, wait_ms = wait.num_milliseconds(), "provider not called; the step waits");
        deadlines::rearm(
            self.store.database(),
            &Deadline {
                order_id: cause.order_id,
                kind,
                due_at: Utc::now() + wait,
                correlation_id: cause.correlation_id.to_string(),
            },
        )
        .await?;
        Ok(())
    }

    /// Executes a saga command. A refusal by the domain is expected in races (the pet was
    /// taken, the order was cancelled meanwhile) and is returned, not raised.
    async fn send<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: EventMetadata,
    ) -> Result<Option<DomainError>, SagaError>
    where
        A: Aggregate<Error = DomainError, Services = ()> + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        match self
            .store
            .execute::<A>(aggregate_id, command, &(), &metadata)
            .await
        {
            Ok(_) => Ok(None),
            Err(AggregateError::UserError(error)) => {
                tracing::debug!(%error, aggregate_id, "saga command refused");
                Ok(Some(error))
            }
            Err(error) => Err(store_error(error)),
        }
    }

    async fn fire_deadlines(&self, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let poll = Duration::from_millis(self.settings.deadline_poll_interval_ms.max(10));
        loop {
            if let Err(error) = self.fire_due_deadlines().await {
                tracing::error!(%error, "firing deadlines failed; retrying");
            }
            if let Err(error) = self.retry_dead_letters().await {
                tracing::error!(%error, "retrying dead letters failed; trying again");
            }
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Fires every deadline that is due now: cancels the order if it still waits for that
    /// step, then marks the deadline fired.
    pub async fn fire_due_deadlines(&self) -> Result<usize, SagaError> {
        let database = self.store.database();
        let due = deadlines::due(database, Utc::now(), 100).await?;
        for deadline in &due {
            let span = tracing::info_span!(
                parent: None,
                "saga deadline",
                otel.name = "saga deadline",
                order_id = %deadline.order_id,
                step = %deadline.kind,
                correlation_id = %deadline.correlation_id,
            );
            self.fire_deadline(deadline).instrument(span).await?;
        }
        Ok(due.len())
    }

    /// Fires one due deadline.
    async fn fire_deadline(&self, deadline: &Deadline) -> Result<(), SagaError> {
        let database = self.store.database();
        let step = match deadline.kind {
            DeadlineKind::PaymentHold => {
                return self.resume_step(deadline, "OrderPetReserved").await
            }
            DeadlineKind::DeliveryRetry => return self.resume_step(deadline, "OrderPaid").await,
            DeadlineKind::Step(step) => step,
        };
        let order_id = deadline.order_id;
        let order_key = order_id.to_string();
        if step == SagaStep::Payment {
            let order: Order = self.store.load(&order_key).await.map_err(store_error)?;
            let customer = order
                .request()
                .map(|request| request.customer_id.as_str().to_owned())
                .unwrap_or_default();
            if !self.live.flag(Flag::PaymentProcessing, &customer) {
                let timeout = self.live.current().settings.saga.payment_timeout_ms;
                let extended = Utc::now() + millis(timeout);
                tracing::info!(%extended, "payments are held: the payment deadline is extended");
                deadlines::rearm(
                    database,
                    &Deadline {
                        due_at: extended,
                        ..deadline.clone()
                    },
                )
                .await?;
                return Ok(());
            }
        }
        let command_id = Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("deadline\u{0}{order_id}\u{0}{}", step.as_str()).as_bytes(),
        );
        let metadata = EventMetadata {
            causation_id: format!("deadline:{}:{}", order_id, step.as_str()),
            ..EventMetadata::caused_by(
                CorrelationId::parse(&deadline.correlation_id)
                    .unwrap_or_else(CorrelationId::generate),
                command_id,
                command_id,
                SUBJECT,
            )
        };
        self.send::<Order>(&order_key, OrderCommand::TimeOutStep { step }, metadata)
            .await?;
        deadlines::mark_fired(database, &order_id, deadline.kind).await?;
        Ok(())
    }
}

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// A waiting step is due for a look: a payment still held looks again later; else the
    /// order's `trigger` event (the one that started the step) is handled again, which calls
    /// the provider now (or makes the step wait anew). The step's own deadline still runs:
    /// when it falls due first, the order is cancelled and compensated as always.
    async fn resume_step(&self, deadline: &Deadline, trigger: &str) -> Result<(), SagaError> {
        let database = self.store.database();
        let order_id = deadline.order_id;
        let order_key = order_id.to_string();
        let order: Order = self.store.load(&order_key).await.map_err(store_error)?;
        let customer = order
            .request()
            .map(|request| request.customer_id.as_str().to_owned())
            .unwrap_or_default();
        if deadline.kind == DeadlineKind::PaymentHold
            && !self.live.flag(Flag::PaymentProcessing, &customer)
        {
            deadlines::rearm(
                database,
                &Deadline {
                    due_at: Utc::now() + PAYMENT_HOLD_RECHECK,
                    ..deadline.clone()
                },
            )
            .await?;
            return Ok(());
        }
        // Marked fired only at the time it fell due: held again meanwhile, it was re-armed
        // for later and stays.
        let started = stream::aggregate_events_newest_first(
            database,
            Order::TYPE,
            &order_key,
            1..i64::MAX,
            100,
        )
        .await?
        .into_iter()
        .find(|event| event.event_type == trigger);
        if let Some(event) = started {
            tracing::info!(order_id = %order_id, step = %deadline.kind, "resuming a waiting step");
            let decoded = Decoded::Order(decode(&event)?);
            self.handle_event(order_id, &event, &decoded).await?;
        }
        deadlines::mark_fired_at(database, deadline).await?;
        Ok(())
    }
}

fn millis(value: u64) -> chrono::Duration {
    chrono::Duration::milliseconds(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The ids of the events handled most recently, to drop redeliveries cheaply (the command
/// ids make a redelivered event harmless anyway).
struct RecentEvents {
    capacity: usize,
    order: std::collections::VecDeque<Uuid>,
    ids: std::collections::HashSet<Uuid>,
}

impl RecentEvents {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: std::collections::VecDeque::new(),
            ids: std::collections::HashSet::new(),
        }
    }

    /// Whether the event was handled.
    fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Remembers an event as handled, forgetting the oldest beyond the capacity.
    fn record(&mut self, id: Uuid) {
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }
}

/// The span of one saga step: a consumer span in the order's trace, a child of the span that
/// published the event (Kafka) or of the append that stored it (following the event store).
fn step_span(order_id: OrderId, event: &RecordedEvent) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "saga step",
        otel.name = %format_args!("saga {}", event.event_type),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = tracing::field::Empty,
        messaging.operation.type = tracing::field::Empty,
        messaging.destination.name = tracing::field::Empty,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        messaging.kafka.message.key = tracing::field::Empty,
        order_id = %order_id,
        event_type = %event.event_type,
        global_position = event.position.global_position,
        correlation_id = %event.metadata_value("correlation_id"),
    );
    if let Some(delivery) = &event.delivery {
        span.record("messaging.system", "kafka");
        span.record("messaging.operation.type", "process");
        span.record("messaging.destination.name", delivery.topic.as_str());
        span.record("messaging.destination.partition.id", delivery.partition);
        span.record("messaging.kafka.offset", delivery.offset);
        span.record("messaging.kafka.message.key", event.aggregate_id.as_str());
    }
    telemetry::continue_trace(&span, event.traceparent());
    span
}

/// The event a reaction answers.
struct Cause {
    event_id: Uuid,
    correlation_id: CorrelationId,
    order_id: OrderId,
    /// The order's customer: the subject flags are evaluated for.
    customer: String,
}

impl Cause {
    /// Metadata of the command at `position` of the reaction (`variant` tells apart several
    /// commands one action sends): its id is derived from the causing event, so a replay
    /// issues the very same command.
    fn metadata(&self, position: usize, variant: &str) -> EventMetadata {
        let command_id = Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("{}\u{0}{position}\u{0}{variant}", self.event_id).as_bytes(),
        );
        EventMetadata::caused_by(
            self.correlation_id.clone(),
            self.event_id,
            command_id,
            SUBJECT,
        )
    }
}

/// The saga runner in `/health`: `caught up`, `lagging`, `stalled` (handling an event failed:
/// down until one succeeds) or `down` (it stopped). Not essential: queries still work.
pub struct SagaRunnerHealth(pub watch::Receiver<SagaProgress>);

impl petstore_platform::health::HealthCheck for SagaRunnerHealth {
    fn name(&self) -> String {
        "saga_runner".to_owned()
    }

    fn essential(&self) -> bool {
        false
    }

    fn check(&self) -> futures::future::BoxFuture<'_, petstore_platform::health::ComponentHealth> {
        use petstore_platform::health::ComponentHealth;
        let progress = *self.0.borrow();
        let stopped = self.0.has_changed().is_err();
        Box::pin(async move {
            if stopped {
                ComponentHealth::down("in-process", "down: the saga runner stopped")
            } else if progress.failing {
                ComponentHealth::down(
                    "in-process",
                    "stalled: an event's handling failed; retrying from the checkpoint",
                )
            } else {
                let detail = progress.lag.lagging().unwrap_or_else(|| {
                    match progress.position {
                        Some(_) => "caught up",
                        None => "waiting for the first event",
                    }
                    .to_owned()
                });
                ComponentHealth::up("in-process", Some(detail))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use petstore_platform::stream::Payload;

    use super::*;

    fn event(sequence: i64) -> RecordedEvent {
        RecordedEvent {
            position: StreamPosition::START,
            aggregate_type: "Order".to_owned(),
            aggregate_id: "o".to_owned(),
            sequence,
            event_type: "OrderCreated".to_owned(),
            event_version: "1.0".to_owned(),
            payload: Payload::of(&serde_json::Value::Null).expect("a payload"),
            metadata: HashMap::new(),
            delivery: None,
        }
    }

    #[test]
    fn handled_events_are_remembered_up_to_the_capacity() {
        let mut seen = RecentEvents::new(2);
        let (one, two, three) = (event(1), event(2), event(3));
        assert!(!seen.contains(&one.event_id()));
        seen.record(one.event_id());
        seen.record(one.event_id());
        seen.record(two.event_id());
        assert!(seen.contains(&one.event_id()) && seen.contains(&two.event_id()));
        // The oldest are forgotten beyond the capacity.
        seen.record(three.event_id());
        assert!(!seen.contains(&one.event_id()));
        assert!(seen.contains(&three.event_id()));
    }
}
