//! The event store: loading aggregates and appending the events their commands decide.
//!
//! Both engines sit behind cqrs-es's [`PersistedEventRepository`]: postgres-es for Postgres
//! and sqlite-es for the embedded store, selected at run time by [`EventRepository`]. Above
//! it, [`EventStore::execute`] runs one command with optimistic concurrency: a conflicting
//! append (another writer took the same sequence number) reloads the aggregate and decides
//! again, a bounded number of times, before it is reported as a conflict.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{
    EventStoreAggregateContext, EventUpcaster, PersistedEventRepository, PersistedEventStore,
    PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore as _};
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlite_es::SqliteEventRepository;
use tokio::sync::watch;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::database::Database;
use crate::deadlines::{self, Deadline, Write};
use crate::leases::{CheckError, Fence};
use crate::records::{Record, Recorder, RefusedCommand};

pub use crate::metadata::{
    parse_feature_flags, EventMetadata, FEATURE_FLAGS_KEY, SETTINGS_VERSION_KEY, TRACEPARENT_KEY,
};

mod group_commit;
mod known;
mod stage;

use group_commit::GroupCommit;
use known::{Known, KnownAggregates};
use petstore_telemetry::metrics::Metrics;

/// The Postgres notification channel appends are announced on (the stream listens to it).
pub const EVENTS_CHANNEL: &str = "petstore_events";

/// The cqrs-es repository of whichever engine the service runs on.
enum EventRepository {
    /// postgres-es, and the group commit of appends.
    Postgres(PostgresEventRepository, Arc<GroupCommit>),
    /// sqlite-es, and the pool for the cancellation-safe append.
    Sqlite(SqliteEventRepository, sqlx::SqlitePool),
}

impl EventRepository {
    /// The repository for `database`, on the `events` and `snapshots` tables.
    fn new(database: &Database) -> Self {
        match database {
            Database::Postgres(pool) => Self::Postgres(
                PostgresEventRepository::new(pool.clone()),
                Arc::new(GroupCommit::new(pool.clone())),
            ),
            Database::Sqlite(pool) => {
                Self::Sqlite(SqliteEventRepository::new(pool.clone()), pool.clone())
            }
        }
    }
}

/// Appends a command's events to Postgres in one statement, atomic on its own (no
/// BEGIN/COMMIT), where postgres-es sends BEGIN, one INSERT per event and COMMIT. One event
/// (most commands decide one) joins the group commit of concurrent appends. A taken
/// (aggregate, sequence) is the optimistic-concurrency conflict, as in postgres-es. Under a
/// saga partition's [`Fence`], the append is written only while its lease holds.
/// `deadlines` (staged with the events) are written in the same statement.
async fn append_postgres(
    group_commit: &Arc<GroupCommit>,
    events: &[(&'static str, SerializedEvent)],
    deadlines: &deadlines::Writes,
) -> Result<(), PersistenceError> {
    let fence = Fence::current();
    match events {
        [] if deadlines.is_empty() => Ok(()),
        [(aggregate_type, event)] if deadlines.is_empty() => {
            group_commit
                .append(aggregate_type, event.clone(), fence)
                .await
        }
        events => {
            let held = append_many(group_commit.pool(), events, deadlines, fence.as_ref())
                .await
                .map_err(|error| persistence_error(error, "23505"))?;
            match fence {
                Some(fence) if !held => Err(group_commit::lease_lost(&fence)),
                _ => Ok(()),
            }
        }
    }
}

/// How cqrs-es sees a failed append: `conflict_code` (the engine's unique-violation code for
/// a taken (aggregate, sequence)) is the optimistic-concurrency conflict.
fn persistence_error(error: sqlx::Error, conflict_code: &str) -> PersistenceError {
    match error {
        sqlx::Error::Database(error) if error.code().as_deref() == Some(conflict_code) => {
            PersistenceError::OptimisticLockError
        }
        error if crate::database::unreachable(&error) => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        error => PersistenceError::UnknownError(Box::new(error)),
    }
}

/// Several events (of one aggregate or of several) and `deadlines` in one statement, all or
/// nothing, under `fence` if any: answers whether it held (and everything was written).
async fn append_many(
    pool: &sqlx::PgPool,
    events: &[(&'static str, SerializedEvent)],
    deadlines: &deadlines::Writes,
    fence: Option<&Fence>,
) -> Result<bool, sqlx::Error> {
    static INSERT: LazyLock<String> = LazyLock::new(|| {
        let [schedule, rearm, settle] = deadlines::Writes::statements(11);
        crate::leases::fenced_writes(
            &[
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                 SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata
                   FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
                        AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                  WHERE FENCED",
                &schedule,
                &rearm,
                &settle,
            ],
            8,
        )
    });
    let mut kinds = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut sequences = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut metadata = Vec::with_capacity(events.len());
    for (kind, event) in events {
        kinds.push(*kind);
        ids.push(event.aggregate_id.as_str());
        sequences.push(i64::try_from(event.sequence).unwrap_or(i64::MAX));
        types.push(event.event_type.as_str());
        versions.push(event.event_version.as_str());
        payloads.push(&event.payload);
        metadata.push(&event.metadata);
    }
    let (partition, owner, epoch) = Fence::binds(fence);
    let query = sqlx::query_scalar(&INSERT)
        .bind(&kinds)
        .bind(&ids)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(partition)
        .bind(owner)
        .bind(epoch);
    deadlines.bind(query).fetch_one(pool).await
}

/// Appends events (a command's, or everything a work staged) to SQLite, in a task of its own: a
/// caller cancelled mid-way (a client that hung up) can neither leave a pooled connection
/// inside a transaction, which would hold SQLite's only write lock, nor half an append. One
/// event is one `INSERT` (atomic by itself, its global position the rowid); several share a
/// transaction, with `deadlines` (staged with them). A taken (aggregate, sequence) is the
/// optimistic-concurrency conflict: a unique-constraint violation (2067; a primary-key one
/// before migration 0012).
async fn append_sqlite(
    pool: &sqlx::SqlitePool,
    events: &[(&'static str, SerializedEvent)],
    deadlines: &deadlines::Writes,
) -> Result<(), PersistenceError> {
    const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES (?, ?, ?, ?, ?, ?, ?)";
    let pool = pool.clone();
    let events = events.to_vec();
    let deadlines = deadlines.clone();
    crate::database::to_completion(async move {
        let insert = |(aggregate_type, event): &(&'static str, SerializedEvent)| {
            sqlx::query(INSERT)
                .bind(*aggregate_type)
                .bind(event.aggregate_id.clone())
                .bind(i64::try_from(event.sequence).unwrap_or(i64::MAX))
                .bind(event.event_type.clone())
                .bind(event.event_version.clone())
                .bind(event.payload.to_string())
                .bind(event.metadata.to_string())
        };
        match events.as_slice() {
            [] if deadlines.is_empty() => Ok(()),
            [event] if deadlines.is_empty() => insert(event).execute(&pool).await.map(|_| ()),
            events => {
                // Inside `to_completion`: this task always finishes what it begins.
                #[allow(clippy::disallowed_methods)]
                let mut transaction = pool.begin().await?;
                for event in events {
                    insert(event).execute(&mut *transaction).await?;
                }
                deadlines.write_sqlite(&mut transaction).await?;
                transaction.commit().await
            }
        }
    })
    .await
    .map_err(|error| persistence_error(error, "2067"))
}

/// Shares one [`EventRepository`] between the per-command cqrs-es stores.
#[derive(Clone)]
struct SharedRepository(Arc<EventRepository>);

macro_rules! delegate {
    ($self:ident, $repo:ident => $call:expr) => {
        match $self.0.as_ref() {
            EventRepository::Postgres($repo, _) => $call.await,
            EventRepository::Sqlite($repo, _) => $call.await,
        }
    };
}

impl SharedRepository {
    /// Writes `events` (each with its aggregate's type) and `deadlines` all or nothing,
    /// under the work's fence, if any.
    async fn append(
        &self,
        events: &[(&'static str, SerializedEvent)],
        deadlines: &deadlines::Writes,
    ) -> Result<(), PersistenceError> {
        match self.0.as_ref() {
            EventRepository::Postgres(_, group_commit) => {
                append_postgres(group_commit, events, deadlines).await
            }
            EventRepository::Sqlite(_, pool) => append_sqlite(pool, events, deadlines).await,
        }
    }
}

impl PersistedEventRepository for SharedRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, repo => repo.get_events::<A>(aggregate_id))
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, repo => repo.get_last_events::<A>(aggregate_id, last_sequence))
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        delegate!(self, repo => repo.get_snapshot::<A>(aggregate_id))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_none() && stage::stage(A::TYPE, events) {
            // Written with the rest of the stage, by `EventStore::flush`.
            return Ok(());
        }
        match snapshot_update {
            None => {
                let events: Vec<_> = events
                    .iter()
                    .map(|event| (A::TYPE, event.clone()))
                    .collect();
                self.append(&events, &deadlines::Writes::default()).await
            }
            snapshot_update => {
                delegate!(self, repo => repo.persist::<A>(events, snapshot_update))
            }
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, repo => repo.stream_events::<A>(aggregate_id))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, repo => repo.stream_all_events::<A>())
    }
}

/// Pause between two notifications of other processes.
const NOTIFY_COALESCE: Duration = Duration::from_millis(2);

/// Loads aggregates and appends their events, on either engine.
#[derive(Clone)]
pub struct EventStore {
    database: Database,
    repository: SharedRepository,
    max_conflict_retries: u32,
    appended: watch::Sender<u64>,
    metrics: Option<Metrics>,
    settings_version: Arc<AtomicU64>,
    known: KnownAggregates,
    recorder: Option<Recorder>,
}

impl EventStore {
    /// A store over `database`, retrying conflicting appends up to `max_conflict_retries` times.
    pub fn new(database: Database, max_conflict_retries: u32) -> Self {
        let repository = SharedRepository(Arc::new(EventRepository::new(&database)));
        Self {
            database,
            repository,
            max_conflict_retries,
            appended: watch::Sender::new(0),
            metrics: None,
            settings_version: Arc::default(),
            known: KnownAggregates::default(),
            recorder: None,
        }
    }

    /// Records each command an aggregate refuses ([`crate::records`]), for the order
    /// timeline.
    pub fn with_recorder(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Where this store's timeline records go, if anywhere (the saga records its provider
    /// attempts there too).
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// Counts appended events in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Stamps `version` (the live settings in force) on every event appended from now on, by
    /// every clone of this store.
    pub fn set_settings_version(&self, version: u64) {
        self.settings_version.store(version, Ordering::Relaxed);
    }

    /// The database underneath.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Ticks after every append from this process; stream readers wait on it.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Wakes stream readers in other processes after appends from this one: one
    /// `NOTIFY petstore_events` per burst, sent after the appends committed (not from a
    /// trigger inside each append, which would serialize every commit on the notification
    /// queue's lock). Readers poll as well, so a lost notification only delays them. Runs
    /// until `shutdown` resolves; does nothing on SQLite, where one process writes.
    pub async fn notify_appends(self, shutdown: impl std::future::Future<Output = ()>) {
        let Database::Postgres(pool) = &self.database else {
            return;
        };
        let mut appended = self.appended.subscribe();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                changed = appended.changed() => if changed.is_err() { return },
            }
            appended.borrow_and_update();
            if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(EVENTS_CHANNEL)
                .execute(pool)
                .await
            {
                tracing::debug!(%error, "notifying other processes failed; they will poll");
            }
            // Coalesce: appends during this pause share the next notification.
            tokio::time::sleep(NOTIFY_COALESCE).await;
        }
    }

    fn cqrs_store<A: Aggregate>(&self) -> PersistedEventStore<SharedRepository, A> {
        PersistedEventStore::new_event_store(self.repository.clone())
            .with_upcasters(vec![Box::new(DomainUpcaster)])
    }

    /// The aggregate as it stands in the store (a default one if it has no events): what
    /// this process knew of it, with the events appended since (by any process), or rebuilt
    /// from all of its events.
    pub async fn load<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<A, AggregateError<A::Error>> {
        Ok(self.current::<A>(aggregate_id).await?.aggregate)
    }

    /// [`Self::load`] for an owner told of every event appended to the aggregate (the saga
    /// runner, for its partitions' aggregates): the copy this process proved current, if it
    /// is still trusted, without reading anything; else as [`Self::load`]. The owner must
    /// tell the store of the events it is told of ([`Self::observe`]), and distrust every
    /// copy when what it owns changes ([`Self::distrust_all`]).
    pub async fn load_owned<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<A, AggregateError<A::Error>> {
        if let Some(known) =
            stage::copy::<A>(aggregate_id).or_else(|| self.known.trusted::<A>(aggregate_id))
        {
            return Ok(known.aggregate);
        }
        self.load(aggregate_id).await
    }

    /// For an owner that knows the aggregate has no events yet (nobody but itself could
    /// have made it, and it has not): trusts an empty copy, so that [`Self::load_owned`]
    /// reads nothing. Nothing changes if a copy with events is kept. Should the owner be
    /// wrong, the first append conflicts and the aggregate is read.
    pub fn trust_new<A: Aggregate + Clone + 'static>(&self, aggregate_id: &str) {
        self.known.put(aggregate_id, Known::<A>::default());
    }

    /// Tells the store that the aggregate has an event at `sequence`: a copy of it that
    /// does not hold that event is no longer trusted (and is read again when next needed).
    pub fn observe(&self, aggregate_type: &str, aggregate_id: &str, sequence: i64) {
        self.known.observe(
            aggregate_type,
            aggregate_id,
            usize::try_from(sequence).unwrap_or(usize::MAX),
        );
    }

    /// Trusts no copy kept so far ([`Self::load_owned`] reads each again once).
    pub fn distrust_all(&self) {
        self.known.distrust_all();
    }

    /// Runs `work` with its appends staged: each command it executes is decided on the
    /// aggregate as its earlier staged events leave it, and the events it decides wait in
    /// the work's stage, seen by nobody else (not by this process's other tasks either),
    /// until [`Self::flush`] writes them; so do the deadlines it schedules, moves or settles
    /// ([`Self::schedule_deadline`], [`Self::rearm_deadline`], [`Self::settle_deadlines`]).
    /// Whatever is still staged when `work` ends is dropped unwritten: the work flushes
    /// before it ends, and before it does anything that depends on what it staged having
    /// happened (a provider call).
    pub async fn staged<F: std::future::Future>(&self, work: F) -> F::Output {
        stage::scope(work).await
    }

    /// [`deadlines::schedule`], staged if the work running now stages its appends
    /// ([`Self::staged`]).
    pub async fn schedule_deadline(&self, deadline: &Deadline) -> Result<(), CheckError> {
        if stage::deadlines(|staged| staged.add(deadline, Write::Schedule)) {
            return Ok(());
        }
        deadlines::schedule(&self.database, deadline).await
    }

    /// [`deadlines::rearm`], staged if the work running now stages its appends.
    pub async fn rearm_deadline(&self, deadline: &Deadline) -> Result<(), CheckError> {
        if stage::deadlines(|staged| staged.add(deadline, Write::Rearm)) {
            return Ok(());
        }
        deadlines::rearm(&self.database, deadline).await
    }

    /// [`deadlines::settle`], staged if the work running now stages its appends.
    pub async fn settle_deadlines(
        &self,
        order_id: &petstore_domain::OrderId,
    ) -> Result<(), CheckError> {
        if stage::deadlines(|staged| staged.settle(*order_id)) {
            return Ok(());
        }
        deadlines::settle(&self.database, order_id).await
    }

    /// Writes everything the work running now has staged ([`Self::staged`]), events and
    /// deadlines, in one statement, all or nothing, under the work's fence, if any (nothing
    /// to do when it staged nothing, or does not stage). Written, the staged copies of the
    /// aggregates are kept as current.
    ///
    /// Should another writer have taken a sequence staged here (a conflict), the staged
    /// commands are written one by one instead, in the order they were decided, up to the
    /// first that conflicts: what each was decided on is then written before it, as if each
    /// had been written when decided, and nothing decided on a conflicting copy is. So
    /// what a command recorded of the world outside (a provider's answer) is kept though a
    /// later command of the stage conflicted; the staged deadlines are not written (the work,
    /// run again, schedules them again). The conflict is returned all the same. Not
    /// written (a conflict; the fence no longer held; the database failed), the stage is
    /// empty all the same and this process forgets what it knew of the staged aggregates:
    /// the work decides again on them as stored.
    pub async fn flush(&self) -> Result<(), AggregateError<std::convert::Infallible>> {
        let staged = stage::take();
        if staged.events.is_empty() && staged.deadlines.is_empty() {
            return Ok(());
        }
        let mut written: Vec<(&'static str, usize)> = Vec::new();
        for (aggregate_type, _) in &staged.events {
            match written.iter_mut().find(|(kind, _)| kind == aggregate_type) {
                Some((_, count)) => *count += 1,
                None => written.push((aggregate_type, 1)),
            }
        }
        match self
            .repository
            .append(&staged.events, &staged.deadlines)
            .instrument(self.insert_span(staged.events.len(), staged.deadlines.len()))
            .await
        {
            Ok(()) => {
                if !written.is_empty() {
                    self.written(&written);
                }
                staged.keep_copies(&self.known);
                Ok(())
            }
            Err(error) => {
                if matches!(error, PersistenceError::OptimisticLockError) {
                    for command in staged.commands() {
                        let Some((aggregate_type, _)) = command.first() else {
                            continue;
                        };
                        let outcome = self
                            .repository
                            .append(command, &deadlines::Writes::default())
                            .instrument(self.insert_span(command.len(), 0))
                            .await;
                        if outcome.is_err() {
                            break;
                        }
                        self.written(&[(aggregate_type, command.len())]);
                    }
                }
                for (aggregate_type, id) in staged.aggregates() {
                    self.known.forget_key(aggregate_type, id);
                }
                Err(error.into())
            }
        }
    }

    /// The client span of a write of `events` staged events and `deadlines` staged deadlines.
    fn insert_span(&self, events: usize, deadlines: usize) -> tracing::Span {
        tracing::info_span!(
            "append",
            otel.name = "INSERT events",
            otel.kind = "client",
            db.system.name = self.database.semconv_system(),
            db.operation.name = "INSERT",
            db.collection.name = "events",
            events,
            deadlines,
        )
    }

    /// What is known of the aggregate: as the work's staged events leave it, else as this
    /// process last saw it.
    fn kept<A: Aggregate + Clone + 'static>(&self, aggregate_id: &str) -> Option<Known<A>> {
        stage::copy::<A>(aggregate_id).or_else(|| self.known.get::<A>(aggregate_id))
    }

    /// [`Self::load`], with the sequence and command ids.
    async fn current<A: Aggregate + Clone + 'static>(
        &self,
        aggregate_id: &str,
    ) -> Result<Known<A>, AggregateError<A::Error>> {
        if let Some(staged) = stage::copy::<A>(aggregate_id) {
            // What the store holds beyond it could only conflict with the flush.
            return Ok(staged);
        }
        let mut known = self.known.get::<A>(aggregate_id).unwrap_or_default();
        let newer = if known.sequence == 0 {
            self.cqrs_store::<A>().load_events(aggregate_id).await?
        } else {
            let stored = self
                .repository
                .get_last_events::<A>(aggregate_id, known.sequence)
                .await?;
            stored
                .into_iter()
                .map(|event| {
                    let event =
                        if DomainUpcaster.can_upcast(&event.event_type, &event.event_version) {
                            DomainUpcaster.upcast(event)
                        } else {
                            event
                        };
                    EventEnvelope::<A>::try_from(event)
                })
                .collect::<Result<_, _>>()?
        };
        for envelope in newer {
            known.apply(envelope);
        }
        self.known.put(aggregate_id, known.clone());
        Ok(known)
    }

    /// Like [`Self::execute`], for an aggregate whose id was just made up (a random UUID):
    /// there is nothing to load, so the command is decided on an empty aggregate and appended
    /// at sequence 1 in one round trip. Should the id exist after all, the append conflicts
    /// and the command runs through [`Self::execute`].
    pub async fn execute_on_new<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>>
    where
        A: Aggregate + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        match self
            .decide_on(
                aggregate_id,
                Known::default(),
                command.clone(),
                services,
                metadata,
            )
            .await
        {
            Err(AggregateError::AggregateConflict) => {
                self.execute::<A>(aggregate_id, command, services, metadata)
                    .await
            }
            outcome => outcome,
        }
    }

    /// Hands `command` to the loaded aggregate and commits what it decides (nothing when it
    /// decides nothing), then wakes this process's stream readers.
    async fn decide_and_commit<A: Aggregate>(
        &self,
        store: &PersistedEventStore<SharedRepository, A>,
        mut context: EventStoreAggregateContext<A>,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let sink = EventSink::default();
        context
            .aggregate
            .handle(command, services, &sink)
            .await
            .map_err(AggregateError::UserError)?;
        let events = sink.collect().await;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // The append is a client span of the command's trace; its context is stored with
        // the events, so whatever handles them later (projector, saga) continues the trace.
        // A staged append is an internal span (the flush that writes it is the client's).
        let staged = stage::active();
        let span = if staged {
            tracing::info_span!(
                "stage",
                otel.name = %format_args!("stage {}", A::TYPE),
                otel.kind = "internal",
                aggregate_type = A::TYPE,
                aggregate_id = %context.aggregate_id,
                events = events.len(),
            )
        } else {
            tracing::info_span!(
                "append",
                otel.name = %format_args!("INSERT {}", A::TYPE),
                otel.kind = "client",
                db.system.name = self.database.semconv_system(),
                db.operation.name = "INSERT",
                db.collection.name = "events",
                aggregate_type = A::TYPE,
                aggregate_id = %context.aggregate_id,
                events = events.len(),
            )
        };
        let mut stored = metadata.to_map();
        stored.insert(
            SETTINGS_VERSION_KEY.to_owned(),
            self.settings_version.load(Ordering::Relaxed).to_string(),
        );
        if let Some(traceparent) = petstore_telemetry::traceparent_of(&span.context()) {
            stored.insert(TRACEPARENT_KEY.to_owned(), traceparent);
        }
        let committed = store
            .commit(events, context, stored)
            .instrument(span)
            .await?;
        if !staged {
            self.written(&[(A::TYPE, committed.len())]);
        }
        Ok(committed)
    }

    /// Counts `written` events (so many of each aggregate type) and wakes this process's
    /// stream readers.
    fn written(&self, written: &[(&'static str, usize)]) {
        if let Some(metrics) = &self.metrics {
            for (aggregate_type, count) in written {
                metrics.events_appended(aggregate_type, *count);
            }
        }
        self.appended
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Runs `command` against the aggregate and appends the events it decides, with
    /// `metadata`. Returns the appended events; none when the command changed nothing, or
    /// when the aggregate already holds events of a command with the same
    /// `metadata.command_id` (the command was handled before: saga commands derive their id
    /// from the event that caused them, so a replayed event never acts twice).
    ///
    /// The command is first decided on what this process knows of the aggregate, reading
    /// nothing: an append that goes through proves that copy current. Any other outcome (a
    /// conflict, a refusal, nothing to do) is decided again on the aggregate as it stands in
    /// the store. A lost optimistic-concurrency race there reloads and decides again, with
    /// jittered backoff, up to the configured number of retries.
    pub async fn execute<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>>
    where
        A: Aggregate + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        let command_id = metadata.command_id.to_string();
        if let Some(known) = self.kept::<A>(aggregate_id) {
            if !known.command_ids.contains(&command_id) {
                match self
                    .decide_on(aggregate_id, known, command.clone(), services, metadata)
                    .await
                {
                    Ok(committed) if !committed.is_empty() => return Ok(committed),
                    Ok(_)
                    | Err(AggregateError::UserError(_) | AggregateError::AggregateConflict) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        let mut attempt = 0;
        loop {
            let known = self.current::<A>(aggregate_id).await?;
            if known.command_ids.contains(&command_id) {
                return Ok(Vec::new());
            }
            match self
                .decide_on(aggregate_id, known, command.clone(), services, metadata)
                .await
            {
                Err(AggregateError::AggregateConflict) if self.retry_after_conflict(attempt) => {
                    attempt += 1;
                    tracing::debug!(attempt, aggregate_id, "append conflicted; retrying");
                    Self::back_off(attempt).await;
                }
                Err(AggregateError::UserError(error)) => {
                    self.record_refusal::<A>(aggregate_id, &command, metadata, &error);
                    return Err(AggregateError::UserError(error));
                }
                outcome => return outcome,
            }
        }
    }

    /// Records that the aggregate refused `command`, when a recorder is attached.
    fn record_refusal<A: Aggregate>(
        &self,
        aggregate_id: &str,
        command: &A::Command,
        metadata: &EventMetadata,
        error: &A::Error,
    ) where
        A::Command: std::fmt::Debug,
    {
        let Some(recorder) = &self.recorder else {
            return;
        };
        // The variant's name: what `Debug` prints before its fields.
        let command = format!("{command:?}");
        let name = command
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default();
        recorder.record(Record::Refusal(RefusedCommand {
            correlation_id: metadata.correlation_id.to_string(),
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            command: name.to_owned(),
            subject: Some(metadata.subject.clone()),
            causation_id: Some(metadata.causation_id.clone()),
            reason: error.to_string(),
            refused_at: chrono::Utc::now(),
        }));
    }

    /// Whether work that conflicted `attempt` times so far may try again: at most
    /// `max_conflict_retries` times.
    pub fn retry_after_conflict(&self, attempt: u32) -> bool {
        attempt < self.max_conflict_retries
    }

    /// Waits before the `attempt`th try after a conflict: a jittered pause of up to 2^attempt
    /// ms (64 at most), so that racing writers spread out.
    pub async fn back_off(attempt: u32) {
        let ceiling = 2_u64.saturating_pow(attempt.min(6));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=ceiling))).await;
    }

    /// Decides `command` on `known` and commits it; what is known of the aggregate follows:
    /// the events committed applied, or forgotten when the append failed (it may have gone
    /// through, or the copy was stale).
    async fn decide_on<A>(
        &self,
        aggregate_id: &str,
        mut known: Known<A>,
        command: A::Command,
        services: &A::Services,
        metadata: &EventMetadata,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>>
    where
        A: Aggregate + Clone + 'static,
    {
        let context = EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_owned(),
            aggregate: known.aggregate.clone(),
            current_sequence: known.sequence,
            current_snapshot: None,
        };
        let outcome = self
            .decide_and_commit(
                &self.cqrs_store::<A>(),
                context,
                command,
                services,
                metadata,
            )
            .await;
        match &outcome {
            Ok(committed) if !committed.is_empty() => {
                for envelope in committed {
                    known.apply(envelope.clone());
                }
                if stage::active() {
                    stage::keep(aggregate_id, known);
                } else {
                    self.known.put(aggregate_id, known);
                }
            }
            Ok(_) | Err(AggregateError::UserError(_)) => {}
            Err(_) => self.known.forget::<A>(aggregate_id),
        }
        outcome
    }
}

/// Brings the domain's events stored in an older shape to today's as aggregates load them
/// ([`petstore_domain::upcasting`]). One that cannot be upcast is left as stored: decoding it
/// then fails, and the load reports it.
struct DomainUpcaster;

impl cqrs_es::persist::EventUpcaster for DomainUpcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        petstore_domain::upcasting::is_outdated(event_type, event_version)
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        match petstore_domain::upcasting::upcast(
            &event.aggregate_type,
            &event.event_type,
            &event.event_version,
            &mut event.payload,
        ) {
            Ok(version) => event.event_version = version.to_owned(),
            Err(error) => {
                tracing::error!(%error, aggregate_id = %event.aggregate_id, "a stored event cannot be upcast")
            }
        }
        event
    }
}
