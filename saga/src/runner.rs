//! The runner: follows the stream (or Kafka), hands each order's events to its lane, and
//! acknowledges what is handled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use petstore_domain::providers::{DeliveryProvider, PaymentGateway};
use petstore_domain::saga::SagaPolicy;
use petstore_domain::OrderId;
use petstore_event_store::dead_letters::{self};
use petstore_event_store::deadlines::{self};
use petstore_event_store::store::EventStore;
use petstore_event_store::stream::{Lag, RecordedEvent, StreamPosition};
use petstore_event_store::subscription::{
    Acknowledger, Arrivals, LagSampler, Subscription, Ticket,
};
use petstore_kafka::KafkaSubscriber;
use petstore_live_settings::Live;
use petstore_resilience::Policies;
use petstore_settings::{Flag, KafkaSettings, SagaSettings};
use petstore_telemetry::metrics::Metrics;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::*;
use crate::events::*;

/// The checkpoint name of the saga runner's subscription.
pub const CHECKPOINT: &str = "saga";
/// The subject saga commands act as.
pub const SUBJECT: &str = "saga";

/// How often a held payment looks whether `payment_processing` is on again.
pub(crate) const PAYMENT_HOLD_RECHECK: chrono::Duration = chrono::Duration::seconds(1);

/// Attempts at handling one event before it is set aside as a dead letter.
pub(crate) const HANDLING_ATTEMPTS: u32 = 3;

/// How often, at most, the runner acknowledges (saves its checkpoint, commits its offsets)
/// while events keep coming: after a crash, what was handled since is handled again
/// (harmlessly), and one acknowledgement covers many events.
pub(crate) const ACKNOWLEDGE_EVERY: Duration = Duration::from_millis(50);

/// Namespace of the ids of commands the saga issues.
pub(crate) const COMMAND_NAMESPACE: Uuid =
    Uuid::from_u128(0x9d2c_41a7_63e8_4f0b_8a5d_1c3e_6b7f_2a90);

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
    pub(crate) store: EventStore,
    pub(crate) kafka: Option<KafkaSettings>,
    pub(crate) settings: SagaSettings,
    pub(crate) policies: Policies,
    pub(crate) payments: Arc<P>,
    pub(crate) deliveries: Arc<D>,
    pub(crate) metrics: Metrics,
    pub(crate) live: Live,
    pub(crate) progress: watch::Sender<SagaProgress>,
    pub(crate) in_flight: Arc<std::sync::Mutex<std::collections::HashSet<OrderId>>>,
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

/// An arrived event, as far as acknowledging it goes.
pub(crate) struct Arrived {
    pub(crate) position: StreamPosition,
    /// Its Kafka topic and partition, and offset.
    pub(crate) delivery: Option<((String, i32), i64)>,
}

impl Arrived {
    pub(crate) fn of(event: &RecordedEvent) -> Self {
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
pub(crate) struct Work {
    pub(crate) ticket: Ticket,
    pub(crate) event: RecordedEvent,
    pub(crate) decoded: Decoded,
}

/// A lane's run (or an event being set aside): its order, and the tickets and ids of the
/// events handled, or why one failed.
pub(crate) type Step<'a> = BoxFuture<'a, (Option<OrderId>, Result<Vec<(Ticket, Uuid)>, SagaError>)>;

/// How the runner acknowledges what it handled.
pub(crate) enum Acknowledge<'a> {
    /// Following the event store: its checkpoint.
    Checkpoint(Acknowledger),
    /// Consuming Kafka: the group's offsets.
    Offsets(&'a KafkaSubscriber),
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
    pub(crate) fn handled(&self, position: Option<StreamPosition>) {
        self.metrics.saga_stalled.set(0);
        self.progress.send_modify(|progress| {
            progress.failing = false;
            if let Some(handled) = position {
                progress.position = Some(progress.position.map_or(handled, |at| at.max(handled)));
            }
        });
    }

    /// Records a failure: the runner is stalled until it has handled an event again.
    pub(crate) fn failed(&self) {
        self.metrics.saga_failures.inc();
        self.metrics.saga_stalled.set(1);
        self.progress
            .send_modify(|progress| progress.failing = true);
    }

    /// Measures, every [`stream::LAG_SAMPLE_INTERVAL`], how far behind the log the runner
    /// is and how many deadlines wait, into the progress and the metrics. Never returns.
    pub(crate) async fn measure(&self) {
        let (database, metrics, in_flight) =
            (self.store.database(), &self.metrics, &self.in_flight);
        LagSampler::new(database)
            .run(
                CHECKPOINT,
                || self.progress.borrow().position,
                |lag| {
                    self.metrics.saga_lag(lag.events, lag.seconds);
                    self.progress.send_modify(|progress| progress.lag = lag);
                },
                move || async move {
                    match deadlines::backlog(database, Utc::now()).await {
                        Ok((pending, overdue)) => {
                            metrics.deadlines_pending.set(pending);
                            metrics.deadlines_overdue.set(overdue);
                        }
                        Err(error) => tracing::debug!(%error, "counting deadlines failed"),
                    }
                    match dead_letters::open_counts(database).await {
                        Ok(counts) => metrics.dead_letters_open(&counts),
                        Err(error) => tracing::debug!(%error, "counting dead letters failed"),
                    }
                    let in_flight = in_flight.lock().map_or(0, |orders| orders.len());
                    metrics
                        .sagas_in_flight
                        .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
                },
            )
            .await;
    }

    /// Consume the events from Kafka, in the configured consumer group, instead of following
    /// the event store: several runners then share the work, and a dead runner's partitions
    /// move to the others.
    pub fn with_kafka(mut self, kafka: KafkaSettings) -> Self {
        self.kafka = Some(kafka);
        self
    }

    /// The policy in force now, for an order of `customer` (a rollout buckets by them).
    pub(crate) fn policy(&self, customer: &str) -> SagaPolicy {
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

    pub(crate) async fn follow_stream(&self, mut stopped: watch::Receiver<bool>) {
        while let Err(error) = self.follow_from_checkpoint(&mut stopped).await {
            self.failed();
            tracing::error!(%error, "saga step failed; retrying from the checkpoint");
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    pub(crate) async fn follow_kafka(
        &self,
        kafka: &KafkaSettings,
        mut stopped: watch::Receiver<bool>,
    ) {
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
    pub(crate) async fn consume_kafka(
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
    pub(crate) async fn follow_from_checkpoint(
        &self,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<(), SagaError> {
        let subscription = Subscription::at_checkpoint(
            &self.store,
            CHECKPOINT,
            self.settings.batch_size,
            Duration::from_millis(100),
        )
        .await?;
        // Where it resumes is what it has handled, as far as lag goes.
        let start = subscription.start();
        self.progress
            .send_modify(|progress| progress.position = Some(start));
        let acknowledger = subscription.acknowledger();
        let mut seen = RecentEvents::new(0);
        self.pipeline(
            subscription.batches(),
            stopped,
            &mut seen,
            Acknowledge::Checkpoint(acknowledger),
        )
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
    pub(crate) async fn pipeline(
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
    pub(crate) async fn lane(
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
    pub(crate) async fn acknowledge(
        &self,
        how: &Acknowledge<'_>,
        handled: Vec<Arrived>,
        finally: bool,
    ) -> Result<(), SagaError> {
        let furthest = handled.iter().map(|arrived| arrived.position).max();
        match how {
            Acknowledge::Checkpoint(acknowledger) => {
                // In stream order: the last is the furthest.
                if let Some(position) = furthest {
                    acknowledger.acknowledge(position, None).await?;
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
}

/// The ids of the events handled most recently, to drop redeliveries cheaply (the command
/// ids make a redelivered event harmless anyway).
pub(crate) struct RecentEvents {
    pub(crate) capacity: usize,
    pub(crate) order: std::collections::VecDeque<Uuid>,
    pub(crate) ids: std::collections::HashSet<Uuid>,
}

impl RecentEvents {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: std::collections::VecDeque::new(),
            ids: std::collections::HashSet::new(),
        }
    }

    /// Whether the event was handled.
    pub(crate) fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Remembers an event as handled, forgetting the oldest beyond the capacity.
    pub(crate) fn record(&mut self, id: Uuid) {
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

pub(crate) fn millis(value: u64) -> chrono::Duration {
    chrono::Duration::milliseconds(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The span of one saga step: a consumer span in the order's trace, a child of the span that
/// published the event (Kafka) or of the append that stored it (following the event store).
pub(crate) fn step_span(order_id: OrderId, event: &RecordedEvent) -> tracing::Span {
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
        correlation_id = event.metadata.correlation_id.as_deref(),
    );
    if let Some(delivery) = &event.delivery {
        span.record("messaging.system", "kafka");
        span.record("messaging.operation.type", "process");
        span.record("messaging.destination.name", delivery.topic.as_str());
        span.record("messaging.destination.partition.id", delivery.partition);
        span.record("messaging.kafka.offset", delivery.offset);
        span.record("messaging.kafka.message.key", event.aggregate_id.as_str());
    }
    petstore_telemetry::continue_trace(&span, event.traceparent());
    span
}

#[cfg(test)]
mod tests {
    use petstore_event_store::stream::Payload;

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
            metadata: Default::default(),
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
