//! One checkpointed subscription to the global stream, for every consumer of it (the saga
//! runner and each projection): [`Subscription`] follows from a checkpoint in batches
//! ([`StreamReader`]), knows when it has caught up with what was committed when it
//! (re)started, acknowledges what it handled (its checkpoint saved, fenced while it holds a
//! lock: one process at a time is a subscriber's active instance, [`become_active`]), measures its lag ([`LagSampler`]), and retries the dead letters an operator asked
//! to retry ([`retry_dead_letters`]). A subscriber whose events fall into independent lanes
//! (the saga runner: one per order) runs them side by side and acknowledges only the handled
//! prefix ([`run_in_lanes`], [`Arrivals`]).

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;

mod arrivals;
mod lanes;

pub use arrivals::{Arrivals, Ticket};
pub use lanes::{run_in_lanes, Arrived, LaneLimits, Lanes, RecentEvents, Route};
use tokio::sync::watch;

use crate::database::{Database, DatabaseError, ExclusiveLock, Fence};
use crate::dead_letters::{self, DeadLetter, DeadLetterStatus};
use crate::store::{EventStore, EVENTS_CHANNEL};
use crate::stream::{
    self, read_after, Lag, RecordedEvent, StreamError, StreamPosition, LAG_SAMPLE_INTERVAL,
};

/// A consumer's place in the global stream, from where it resumed.
pub struct Subscription {
    name: &'static str,
    database: Database,
    reader: StreamReader,
    start: StreamPosition,
    head: StreamPosition,
}

impl Subscription {
    /// The subscription `name` to `store`'s stream, resuming after `start` (the consumer's
    /// checkpoint: [`Subscription::at_checkpoint`] loads it from the event store; a consumer
    /// that keeps its checkpoint with its own writes says where it is). Reads `batch_size`
    /// events at most at a time and, at the head, polls every `poll_interval` besides being
    /// woken by appends.
    pub async fn open(
        store: &EventStore,
        name: &'static str,
        start: StreamPosition,
        batch_size: u32,
        poll_interval: Duration,
    ) -> Result<Self, StreamError> {
        // Caught up means: at or past what was committed when the subscription (re)started.
        // An empty read does not prove it: on Postgres an older open transaction anywhere in
        // the cluster hides newer events until it ends.
        let head = stream::head_position(store.database()).await?;
        Ok(Self {
            name,
            database: store.database().clone(),
            reader: StreamReader::new(store, start, batch_size, poll_interval),
            start,
            head,
        })
    }

    /// The subscription `name`, resuming after its checkpoint in the event store.
    pub async fn at_checkpoint(
        store: &EventStore,
        name: &'static str,
        batch_size: u32,
        poll_interval: Duration,
    ) -> Result<Self, StreamError> {
        let start = stream::load_checkpoint(store.database(), name).await?;
        Self::open(store, name, start, batch_size, poll_interval).await
    }

    /// Where it resumed.
    pub fn start(&self) -> StreamPosition {
        self.start
    }

    /// Whether handling up to `position` catches up with what was committed when it
    /// (re)started.
    pub fn caught_up_at(&self, position: StreamPosition) -> bool {
        position >= self.head
    }

    /// The next events, waiting until at least one is there.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, StreamError> {
        self.reader.next_batch().await
    }

    /// The next events, or `None` after waiting once when it is at the head.
    pub async fn next_batch_or_idle(&mut self) -> Result<Option<Vec<RecordedEvent>>, StreamError> {
        self.reader.next_batch_or_idle().await
    }

    /// The batches, as a stream that is never cancelled mid-read (a batch being taken is
    /// not lost), its errors made `E`.
    pub fn batches<E: From<StreamError>>(
        self,
    ) -> impl futures::Stream<Item = Result<Vec<RecordedEvent>, E>> {
        futures::stream::unfold(self, |mut subscription| async move {
            let batch = subscription.next_batch().await;
            Some((batch.map_err(E::from), subscription))
        })
    }

    /// How it acknowledges what it handled: what [`Acknowledger::acknowledge`] saves.
    pub fn acknowledger(&self) -> Acknowledger {
        Acknowledger {
            name: self.name,
            database: self.database.clone(),
        }
    }
}

/// How long a standby waits between attempts to become the active instance.
pub const TAKEOVER_INTERVAL: Duration = Duration::from_secs(1);

/// Tries to become the one active instance of the subscriber `name` (a Postgres advisory
/// lock; on SQLite the one process always is): `None` while another process is. The lock's
/// fence goes with every write the instance makes, refused once a successor holds it.
pub async fn try_become_active(
    database: &Database,
    name: &str,
) -> Result<Option<ExclusiveLock>, DatabaseError> {
    database.try_lock(&format!("projection:{name}")).await
}

/// Waits to become the active instance of the subscriber `name`, standing by while another
/// process is (trying again every [`TAKEOVER_INTERVAL`], so a standby takes over when the
/// active one dies); `None` once `shutdown` resolves first.
pub async fn become_active(
    database: &Database,
    name: &str,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<ExclusiveLock> {
    loop {
        match try_become_active(database, name).await {
            Ok(Some(lock)) => return Some(lock),
            Ok(None) => tracing::debug!(subscriber = name, "standby: another instance is active"),
            Err(error) => {
                tracing::warn!(subscriber = name, %error, "cannot take the subscriber's lock")
            }
        }
        tokio::select! {
            () = shutdown.as_mut() => return None,
            () = tokio::time::sleep(TAKEOVER_INTERVAL) => {}
        }
    }
}

/// Saves a subscription's checkpoint: everything up to a position is handled.
#[derive(Clone)]
pub struct Acknowledger {
    name: &'static str,
    database: Database,
}

impl Acknowledger {
    /// Everything up to `position` is handled; with `fence`, only while it is still the
    /// subscription's lock token (checked with the write).
    pub async fn acknowledge(
        &self,
        position: StreamPosition,
        fence: Option<&Fence>,
    ) -> Result<(), StreamError> {
        stream::save_checkpoint(&self.database, self.name, position, fence).await
    }
}

/// Measures a subscription's lag every [`LAG_SAMPLE_INTERVAL`].
pub struct LagSampler {
    database: Database,
}

impl LagSampler {
    /// A sampler over `database`'s stream.
    pub fn new(database: &Database) -> Self {
        Self {
            database: database.clone(),
        }
    }

    /// Measures how far behind the log `position()` is (when it knows one), gives each
    /// measure to `record`, and runs `also` after each round; never returns.
    pub async fn run<Also, Done>(
        &self,
        name: &str,
        position: impl Fn() -> Option<StreamPosition>,
        mut record: impl FnMut(Lag),
        mut also: Also,
    ) where
        Also: FnMut() -> Done,
        Done: Future<Output = ()>,
    {
        loop {
            if let Some(position) = position() {
                match stream::lag(&self.database, position).await {
                    Ok(lag) => record(lag),
                    Err(error) => {
                        tracing::debug!(subscription = name, %error, "measuring the lag failed")
                    }
                }
            }
            also().await;
            tokio::time::sleep(LAG_SAMPLE_INTERVAL).await;
        }
    }
}

/// The dead-letter store failed while retrying.
#[derive(Debug, thiserror::Error)]
#[error("dead letters: {0}")]
pub struct DeadLetterStoreError(#[from] pub sqlx::Error);

/// What handling a dead letter again came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// Handled: it is resolved.
    Handled,
    /// It still fails, for this reason: pending again, with the error.
    Failed(String),
}

/// Handles again each of `consumer`'s dead letters an operator asked to retry
/// (`petstore dead-letters retry`, `POST /admin/dead-letters/{id}/retry`) with `handle`:
/// resolved when handled, pending again with the new error when not. Answers how many it
/// tried.
pub async fn retry_dead_letters<F, Fut, E>(
    database: &Database,
    consumer: &str,
    mut handle: F,
) -> Result<usize, E>
where
    F: FnMut(DeadLetter) -> Fut,
    Fut: Future<Output = Result<Retried, E>>,
    E: From<DeadLetterStoreError>,
{
    let store_failed = |error: sqlx::Error| E::from(DeadLetterStoreError(error));
    let letters = dead_letters::retrying(database, consumer)
        .await
        .map_err(store_failed)?;
    let tried = letters.len();
    for letter in letters {
        let id = letter.id;
        match handle(letter).await? {
            Retried::Handled => {
                dead_letters::transition(
                    database,
                    id,
                    &[DeadLetterStatus::Retrying],
                    DeadLetterStatus::Resolved,
                )
                .await
                .map_err(store_failed)?;
                tracing::info!(consumer, dead_letter = id, "dead letter handled on retry");
            }
            Retried::Failed(error) => {
                dead_letters::fail_again(database, id, &error)
                    .await
                    .map_err(store_failed)?;
                tracing::warn!(consumer, dead_letter = id, %error, "dead letter still fails");
            }
        }
    }
    Ok(tried)
}

/// When a consumer that is idle at the head looks for dead letters to retry.
pub struct RetryCheck {
    every: Duration,
    last: Instant,
}

impl RetryCheck {
    /// Due every `every`.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            last: Instant::now(),
        }
    }

    /// Whether a check is due now (and, if so, the next one in `every`).
    pub fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= self.every;
        if due {
            self.last = Instant::now();
        }
        due
    }
}

/// Tails the global stream from a position, waiting for new events when it has read them all.
pub struct StreamReader {
    database: Database,
    position: StreamPosition,
    batch_size: u32,
    poll_interval: Duration,
    local_appends: watch::Receiver<u64>,
    listener: Option<PgListener>,
    /// Quick re-reads left after a wake-up that found nothing: new events can be committed
    /// yet hidden for a moment behind an older transaction still running.
    quick_retries: u32,
}

/// Quick re-reads after a wake-up that found nothing, and the pause between them: together
/// they cover the few milliseconds an older transaction takes to finish, without polling an
/// idle stream.
const QUICK_RETRIES: u32 = 200;
const QUICK_RETRY_PAUSE: Duration = Duration::from_micros(500);

impl StreamReader {
    /// A reader of `store`'s stream that starts after `position`.
    pub fn new(
        store: &EventStore,
        position: StreamPosition,
        batch_size: u32,
        poll_interval: Duration,
    ) -> Self {
        Self {
            database: store.database().clone(),
            position,
            batch_size,
            poll_interval,
            local_appends: store.appended(),
            listener: None,
            quick_retries: 0,
        }
    }

    /// The position after the last event returned.
    pub fn position(&self) -> StreamPosition {
        self.position
    }

    /// The next events, waiting until at least one is there. Each event is returned once;
    /// a reader recreated from a saved checkpoint resumes right after it.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>, StreamError> {
        loop {
            if let Some(batch) = self.next_batch_or_idle().await? {
                return Ok(batch);
            }
        }
    }

    /// The next events, or `None` after waiting once (for a notification, a local append or
    /// the poll interval) when the reader is at the head of the stream.
    pub async fn next_batch_or_idle(&mut self) -> Result<Option<Vec<RecordedEvent>>, StreamError> {
        self.local_appends.borrow_and_update();
        self.ensure_listening().await;
        let batch = read_after(&self.database, self.position, self.batch_size).await?;
        if let Some(last) = batch.last() {
            self.position = last.position;
            self.quick_retries = 0;
            return Ok(Some(batch));
        }
        if self.quick_retries > 0 {
            self.quick_retries -= 1;
            tokio::time::sleep(QUICK_RETRY_PAUSE).await;
            return Ok(None);
        }
        if self.wait().await {
            self.quick_retries = QUICK_RETRIES;
        }
        Ok(None)
    }

    async fn ensure_listening(&mut self) {
        let Database::Postgres(pool) = &self.database else {
            return;
        };
        if self.listener.is_some() {
            return;
        }
        match PgListener::connect_with(pool).await {
            Ok(mut listener) => match listener.listen(EVENTS_CHANNEL).await {
                Ok(()) => self.listener = Some(listener),
                Err(error) => tracing::warn!(%error, "listen failed; polling instead"),
            },
            Err(error) => tracing::warn!(%error, "listener connection failed; polling instead"),
        }
    }

    /// Waits for a notification, a local append or the poll interval, whichever comes first;
    /// true when something signalled new events.
    async fn wait(&mut self) -> bool {
        let poll = tokio::time::sleep(self.poll_interval);
        let local = self.local_appends.changed();
        match self.listener.as_mut() {
            Some(listener) => {
                tokio::select! {
                    received = listener.try_recv() => {
                        if let Err(error) = received {
                            tracing::warn!(%error, "event notifications lost; reconnecting");
                            self.listener = None;
                        }
                        true
                    }
                    _ = local => true,
                    () = poll => false,
                }
            }
            None => {
                tokio::select! {
                    _ = local => true,
                    () = poll => false,
                }
            }
        }
    }
}
