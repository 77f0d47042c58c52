//! The projection loop: become the active instance of a projection (a Postgres advisory
//! lock; a standby waits and takes over when the active one dies), read the global stream
//! from the projection's checkpoint, apply each batch, repeat. Errors are logged and retried
//! from the last checkpoint, so a projection never skips an event. Every write carries the
//! lock's fencing token and is refused once a successor holds the lock; an instance whose
//! lock connection fails (checked every second) or whose write is refused stops and stands
//! by.

use std::future::Future;
use std::time::Duration;

use petstore_event_store::database::Fence;
use petstore_event_store::store::EventStore;
use petstore_event_store::stream::{self, Lag, StreamPosition};
use petstore_settings::ProjectorSettings;
use petstore_telemetry::metrics::Metrics;
use petstore_telemetry::CorrelationId;
use tokio::sync::watch;
use tracing::Instrument;

use petstore_event_store::subscription::{
    become_active, retry_dead_letters, LagSampler, Retried, RetryCheck, Subscription,
};

use crate::projection::{Projection, ProjectionError, Refolded};

/// How often an idle projection looks for dead letters to retry.
const RETRY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a failing projection waits before retrying from its checkpoint.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopping projection waits for the batches it has in flight.
const SETTLE_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// How far a projection has come.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProjectorProgress {
    /// The position the projection reflects.
    pub position: StreamPosition,
    /// Whether it has reached what was committed when it (re)started; stays true afterwards.
    pub caught_up: bool,
    /// Whether this process is the active instance (not a standby).
    pub active: bool,
    /// Whether the last attempt failed (the projection is stalled until it succeeds).
    pub failing: bool,
    /// How far behind the log it was when last measured (every
    /// [`stream::LAG_SAMPLE_INTERVAL`] while active).
    pub lag: Lag,
}

/// Keeps one projection current.
pub struct Projector<P> {
    store: EventStore,
    projection: P,
    settings: ProjectorSettings,
    progress: watch::Sender<ProjectorProgress>,
    metrics: Option<Metrics>,
}

impl<P: Projection> Projector<P> {
    /// A projector of `store`'s stream into `projection`.
    pub fn new(store: EventStore, projection: P, settings: ProjectorSettings) -> Self {
        Self {
            store,
            projection,
            settings,
            progress: watch::Sender::new(ProjectorProgress::default()),
            metrics: None,
        }
    }

    /// Records failures, stalls, lag and applied events in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        // Its series read 0 from the start rather than appearing with the first failure.
        metrics.projection_attempt(self.projection.name(), Ok(0));
        metrics
            .projection_failures
            .get_or_create(&petstore_telemetry::metrics::ProjectionLabels {
                projection: self.projection.name().to_owned(),
            })
            .inc_by(0);
        self.metrics = Some(metrics);
        self
    }

    /// Follows the projection's progress.
    pub fn progress(&self) -> watch::Receiver<ProjectorProgress> {
        self.progress.subscribe()
    }

    /// Projects until `shutdown` resolves. A batch being applied when it does still commits.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let name = self.projection.name();
        loop {
            let Some(lock) = become_active(self.store.database(), name, shutdown.as_mut()).await
            else {
                return;
            };
            let token = lock.fence().map(|fence| fence.token);
            tracing::info!(projection = name, fencing_token = token, "active");
            self.progress.send_modify(|progress| progress.active = true);
            let work = async {
                loop {
                    let Err(error) = self.follow(&mut shutdown, lock.fence()).await else {
                        return true;
                    };
                    if error.is_fenced() {
                        tracing::error!(projection = name, %error, "another instance took over: this one stops writing");
                        return false;
                    }
                    tracing::error!(projection = name, %error, "projecting failed; resuming from the checkpoint");
                    self.progress
                        .send_modify(|progress| progress.failing = true);
                    if let Some(metrics) = &self.metrics {
                        metrics.projection_attempt(name, Err(()));
                    }
                    tokio::select! {
                        () = &mut shutdown => return true,
                        () = tokio::time::sleep(RETRY_INTERVAL) => {}
                    }
                }
            };
            let stopped = tokio::select! {
                stopped = work => stopped,
                () = self.measure_lag() => true,
                () = lock.lost() => {
                    tracing::error!(projection = name, "lost the projection lock: this instance stops and stands by");
                    false
                }
            };
            self.progress
                .send_modify(|progress| progress.active = false);
            drop(lock);
            if stopped {
                return;
            }
        }
    }

    /// Retries the dead letters of this projection someone asked to retry
    /// (`petstore dead-letters retry`): refolds the views each concerns; `resolved` when that
    /// works, `pending` again with the error when not.
    async fn retry_dead_letters(&self, fence: Option<&Fence>) -> Result<(), ProjectionError> {
        let database = self.store.database();
        retry_dead_letters(database, self.projection.name(), |letter| async move {
            Ok::<_, ProjectionError>(
                match self.projection.refold(database, &letter, fence).await? {
                    Refolded::Done => Retried::Handled,
                    Refolded::StillFailing(error) => Retried::Failed(error),
                },
            )
        })
        .await?;
        Ok(())
    }

    /// Measures how far behind the log the projection is, every
    /// [`stream::LAG_SAMPLE_INTERVAL`], into its progress and metrics. Never returns.
    async fn measure_lag(&self) {
        let name = self.projection.name();
        LagSampler::new(self.store.database())
            .run(
                name,
                || Some(self.progress.borrow().position),
                |lag| {
                    self.progress.send_modify(|progress| progress.lag = lag);
                    if let Some(metrics) = &self.metrics {
                        metrics.projection_lag(name, lag.events, lag.seconds);
                    }
                },
                || async {},
            )
            .await;
    }

    /// Records that the projection durably reflects the stream up to `position`.
    fn progressed(&self, position: StreamPosition, subscription: &Subscription) {
        self.progress.send_modify(|progress| {
            progress.position = position;
            progress.caught_up |= subscription.caught_up_at(position);
        });
    }

    /// Projects from the checkpoint until stopped (`Ok`) or until something fails (`Err`).
    async fn follow(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        fence: Option<&Fence>,
    ) -> Result<(), ProjectionError> {
        let start = self.projection.position().await?;
        if let Some(fence) = fence {
            self.projection.raise_fence(fence).await?;
        }
        let mut subscription = Subscription::open(
            &self.store,
            self.projection.name(),
            start,
            self.settings.batch_size,
            self.settings.poll_interval(),
        )
        .await?;
        self.progressed(start, &subscription);
        let mut retry_check = RetryCheck::every(RETRY_CHECK_INTERVAL);
        loop {
            let batch = tokio::select! {
                () = shutdown.as_mut() => {
                    // Batches still in flight get a moment to settle; what does not is
                    // applied again after the restart.
                    let settled = tokio::time::timeout(
                        SETTLE_AT_SHUTDOWN,
                        self.projection.settle(fence),
                    )
                    .await;
                    if let Ok(settled) = settled {
                        settled?;
                    }
                    return Ok(());
                }
                batch = subscription.next_batch_or_idle() => batch?,
            };
            let Some(events) = batch else {
                // At the head: what is still in flight settles before the projection counts
                // as caught up or recovered.
                if let Some(position) = self.projection.settle(fence).await? {
                    self.progressed(position, &subscription);
                }
                if retry_check.due() {
                    self.retry_dead_letters(fence).await?;
                }
                // Nothing left to apply: whatever failed before holds nothing back now.
                let recovered = self
                    .progress
                    .send_if_modified(|progress| std::mem::replace(&mut progress.failing, false));
                if recovered {
                    if let Some(metrics) = &self.metrics {
                        metrics.projection_attempt(self.projection.name(), Ok(0));
                    }
                }
                continue;
            };
            // A batch is a unit of work of its own: a new trace, linked to the traces of the
            // events it applies, and a correlation id for its log lines.
            let span = tracing::info_span!(
                parent: None,
                "project",
                otel.name = %format_args!("project {}", self.projection.name()),
                projection = self.projection.name(),
                events = events.len(),
                first_position = events.first().map_or(0, |event| event.position.global_position),
                correlation_id = %CorrelationId::generate(),
            );
            petstore_telemetry::link_to_all(
                &span,
                events.iter().filter_map(stream::RecordedEvent::traceparent),
            );
            let applied = self
                .projection
                .apply(&events, fence)
                .instrument(span)
                .await?;
            let name = self.projection.name();
            // A batch handed over but not yet settled (Kafka) proves nothing about an outage:
            // the projection counts as recovered once its checkpoint moves.
            if let Some(position) = applied {
                if let Some(metrics) = &self.metrics {
                    metrics.projection_attempt(name, Ok(events.len() as u64));
                }
                self.progress
                    .send_modify(|progress| progress.failing = false);
                self.progressed(position, &subscription);
            } else if let Some(metrics) = &self.metrics {
                metrics.projected(name, events.len() as u64);
            }
            tracing::debug!(
                projection = self.projection.name(),
                events = events.len(),
                "projected"
            );
        }
    }
}
