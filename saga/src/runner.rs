//! The runner: owns its partitions while it runs (the leases' keeper and the deadline loop
//! beside the events' loop, `following.rs`), routes each order's events to its lane, and
//! acknowledges what is handled.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use petstore_domain::partition::{Partition, Partitions};
use petstore_domain::providers::{DeliveryProvider, PaymentGateway};
use petstore_domain::saga::SagaPolicy;
use petstore_domain::OrderId;
use petstore_event_store::dead_letters::{self};
use petstore_event_store::deadlines::{self};
use petstore_event_store::leases::{Fence, Lease, Leases};
use petstore_event_store::store::EventStore;
use petstore_event_store::stream::{Lag, RecordedEvent, StreamPosition};
use petstore_event_store::subscription::{Arrived, LagSampler, Lanes, RecentEvents, Route};
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
use crate::ownership::{LeaseClock, Ownership};

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

/// How many events reacted to from memory a runner remembers: far more than arrive between
/// an append and its copy from the stream.
const REMEMBERED: usize = 100_000;

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
    pub(crate) kafka: Option<(KafkaSettings, Partitions)>,
    pub(crate) settings: SagaSettings,
    pub(crate) policies: Policies,
    pub(crate) payments: Arc<P>,
    pub(crate) deliveries: Arc<D>,
    pub(crate) metrics: Metrics,
    pub(crate) live: Live,
    pub(crate) progress: watch::Sender<SagaProgress>,
    pub(crate) in_flight: Arc<std::sync::Mutex<std::collections::HashSet<OrderId>>>,
    /// Who its leases name (`saga.runner_id`, else made up for this runner): a runner run
    /// again under the same id (after a crash of its task or of its process) takes its
    /// partitions back at once, fencing its earlier run.
    pub(crate) owner: Arc<str>,
    /// Until when its leases are valid by its own clock (no provider call past it).
    pub(crate) lease_clock: LeaseClock,
    /// The events it reacted to from memory (its own appends): their copies from the stream
    /// are only acknowledged.
    pub(crate) remembered: Arc<std::sync::Mutex<RecentEvents>>,
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
            owner: self.owner.clone(),
            lease_clock: self.lease_clock.clone(),
            remembered: self.remembered.clone(),
        }
    }
}

/// A saga lane: one order's, or an event alone that cannot be decoded (set aside).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    Order(OrderId),
    Undecodable(Uuid),
}

/// An event in its lane.
pub(crate) enum Work {
    /// A step of the order's saga.
    Step {
        order_id: OrderId,
        event: RecordedEvent,
        decoded: Decoded,
    },
    /// An event that cannot be decoded: set aside as a dead letter.
    Undecodable {
        event: RecordedEvent,
        error: SagaError,
    },
}

/// How the runner acknowledges what it handled.
pub(crate) enum Acknowledge<'a> {
    /// Following the event store: each owned partition's checkpoint, under its lease.
    Checkpoints,
    /// Consuming Kafka: the group's offsets of the partitions whose lease still holds.
    Offsets(&'a KafkaSubscriber),
}

/// The partitions a runner owns: their leases, and (following the event store) where each
/// one's checkpoint stood when the run began (its events up to there are handled).
pub(crate) struct Scope {
    pub(crate) partitions: Partitions,
    pub(crate) from: BTreeMap<Partition, (Lease, StreamPosition)>,
}

impl Scope {
    /// Whether `event`, of `partition` (its order's), is this runner's to handle now.
    /// Consuming Kafka, an event is handled by whoever consumes its Kafka partition, which
    /// is its aggregate's: a pet's event concerning an order may arrive at another runner
    /// than the order's owner (and is then handled unfenced, its commands deduplicated by
    /// their ids as before partitions).
    fn handles(&self, partition: Partition, event: &RecordedEvent) -> bool {
        let partition = match &event.delivery {
            Some(delivery) => self
                .from
                .keys()
                .find(|owned| owned.kafka() == delivery.partition)
                .copied(),
            None => Some(partition),
        };
        partition
            .and_then(|partition| self.from.get(&partition))
            .is_some_and(|(_, from)| event.position > *from)
    }
}

/// The name of a saga partition's checkpoint.
pub fn partition_checkpoint(partition: Partition) -> String {
    format!("{CHECKPOINT}:p{}", partition.number())
}

/// The saga runner's events in lanes, acknowledged one way.
pub(crate) struct SagaLanes<'a, P, D> {
    pub(crate) runner: &'a SagaRunner<P, D>,
    pub(crate) leases: &'a Leases,
    pub(crate) scope: &'a Scope,
    pub(crate) acknowledge: Acknowledge<'a>,
}

impl<P, D> SagaLanes<'_, P, D> {
    /// The fence of `order`'s partition, if this runner owns it (consuming Kafka, it may
    /// handle a pet's event of another runner's order).
    fn fence_of(&self, order: &OrderId) -> Option<Fence> {
        let (lease, _) = self
            .scope
            .from
            .get(&self.scope.partitions.of_order(order))?;
        Some(Fence {
            owner: Arc::clone(&self.runner.owner),
            lease: *lease,
        })
    }
}

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> Lanes for SagaLanes<'_, P, D> {
    type Key = Lane;
    type Work = Work;
    type Error = SagaError;

    fn route(&self, event: RecordedEvent) -> Route<Lane, Work> {
        let decoded = saga_event(&event);
        // An event is its order's partition's; one that cannot be decoded, its aggregate's
        // (so one runner sets it aside).
        let scope = self.scope;
        let partition = match &decoded {
            Ok(Some((order_id, _))) => scope.partitions.of_order(order_id),
            _ => scope.partitions.of_key(&event.aggregate_id),
        };
        if !scope.handles(partition, &event) {
            return Route::Done;
        }
        match decoded {
            Ok(Some((order_id, decoded))) => Route::Lane(
                Lane::Order(order_id),
                Work::Step {
                    order_id,
                    event,
                    decoded,
                },
            ),
            Ok(None) => Route::Done,
            Err(error) => Route::Lane(
                Lane::Undecodable(event.event_id()),
                Work::Undecodable { event, error },
            ),
        }
    }

    /// Handles one order's events in order (or sets an undecodable event aside).
    async fn handle(&self, _: Lane, work: Vec<Work>) -> Result<(), SagaError> {
        for work in work {
            match work {
                Work::Step {
                    order_id,
                    event,
                    decoded,
                } => {
                    // A copy of this aggregate that does not hold the event is stale.
                    self.runner.store.observe(
                        &event.aggregate_type,
                        &event.aggregate_id,
                        event.sequence,
                    );
                    if self.runner.reacted_from_memory(&event.event_id()) {
                        // Its reaction ran when this runner appended it.
                        continue;
                    }
                    let span = step_span(order_id, &event);
                    // Boxed: the step's future is deep, and the lanes' nest it further.
                    let step = Box::pin(
                        self.runner
                            .handle_persistently(order_id, &event, &decoded)
                            .instrument(span),
                    );
                    match self.fence_of(&order_id) {
                        // The order's partition's writes are fenced by its lease.
                        Some(fence) => fence.guard(step).await?,
                        None => step.await?,
                    }
                }
                Work::Undecodable { event, error } => {
                    self.runner.set_aside(&event, &error).await?;
                }
            }
        }
        Ok(())
    }

    /// Saves the checkpoint, or commits the offsets (waiting for the broker when `finally`).
    async fn acknowledge(&self, handled: Vec<Arrived>, finally: bool) -> Result<(), SagaError> {
        let furthest = handled.iter().map(|arrived| arrived.position).max();
        match &self.acknowledge {
            Acknowledge::Checkpoints => {
                if let Some(furthest) = furthest {
                    // Every owned partition's events up to the furthest are handled (or
                    // were before the run began).
                    let moved: Vec<_> = self
                        .scope
                        .from
                        .values()
                        .filter(|(_, from)| *from < furthest)
                        .map(|(lease, _)| (*lease, furthest))
                        .collect();
                    let lost = self
                        .leases
                        .save_checkpoints(&moved, partition_checkpoint)
                        .await
                        .map_err(|error| SagaError::Store(error.to_string()))?;
                    for partition in lost {
                        // Handed over (or taken) meanwhile: its new owner resumes from its
                        // last checkpoint and handles again what this run did not save.
                        tracing::info!(
                            partition = partition.number(),
                            "a saga partition's checkpoint is its new owner's"
                        );
                    }
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
                // Only the offsets of partitions still owned: a lost one's new owner
                // resumes from the offsets committed before it took over.
                let leases: Vec<Lease> =
                    self.scope.from.values().map(|(lease, _)| *lease).collect();
                let lost = self
                    .leases
                    .lost(&leases)
                    .await
                    .map_err(|error| SagaError::Store(error.to_string()))?;
                offsets.retain(|(_, partition), _| {
                    !lost.iter().any(|lost| lost.kafka() == *partition)
                });
                subscriber.commit(&offsets, finally)?;
            }
        }
        if furthest.is_some() {
            self.runner.handled(furthest);
        }
        Ok(())
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
        let owner = settings
            .runner_id
            .clone()
            .unwrap_or_else(|| format!("saga-{}", Uuid::new_v4().simple()))
            .into();
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
            owner,
            lease_clock: LeaseClock::default(),
            remembered: Arc::new(std::sync::Mutex::new(RecentEvents::new(REMEMBERED))),
        }
    }

    /// Remembers that the event `id` was reacted to from memory.
    pub(crate) fn remember(&self, id: Uuid) {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(id);
    }

    /// Whether the event `id` was reacted to from memory already.
    fn reacted_from_memory(&self, id: &Uuid) -> bool {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
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

    /// Consume the events from Kafka instead of following the event store: each runner reads
    /// the Kafka partitions of the saga partitions it owns, its offsets kept in the configured
    /// consumer group. The topics have one partition per saga partition of `partitions` (the
    /// store's).
    pub fn with_kafka(mut self, kafka: KafkaSettings, partitions: Partitions) -> Self {
        self.kafka = Some((kafka, partitions));
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
    /// spawned), so dropping it stops the runner at once, as a crash would. Following the
    /// event store, the runner owns a share of the saga partitions through leases and
    /// handles (and fires the deadlines of) only those; a clean stop hands them over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let ownership = match self.settings.partitions() {
            Ok(partitions) => {
                let timeout = Duration::from_millis(self.settings.lease_timeout_ms);
                Ownership::new(
                    Leases::new(self.store.database(), &*self.owner, timeout),
                    partitions,
                    self.lease_clock.clone(),
                    timeout,
                )
            }
            Err(error) => {
                // Refused at start-up already; a runner built around the settings check
                // stalls visibly rather than acting on every order.
                self.failed();
                tracing::error!(%error, "the saga runner cannot own partitions");
                return;
            }
        };
        // The leases outlive the events' loop: its last acknowledgement is made under them.
        let (events_done, keeping_stopped) = tokio::sync::watch::channel(false);
        let work = async {
            let events = async {
                self.follow(&ownership, stopped.clone()).await;
                let _ = events_done.send(true);
            };
            let every = Duration::from_millis(self.settings.lease_timeout_ms / 3)
                .max(Duration::from_millis(10));
            let keeping = async {
                if let Err(displaced) = ownership.keep(every, keeping_stopped.clone()).await {
                    // Owning nothing, the runner handles nothing more: stalled, loudly.
                    self.failed();
                    tracing::error!(%displaced, "the saga runner stops");
                }
            };
            tokio::select! {
                _ = async { tokio::join!(self.fire_deadlines(ownership.owned(), stopped.clone()), events, keeping) } => {}
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
