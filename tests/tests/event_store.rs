//! The event store and the global stream, one suite run against both engines: Postgres (a
//! fresh database per test) and the embedded SQLite store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateError, DomainEvent};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use petstore_event_store::subscription::StreamReader;
use petstore_tests::{on_both_engines, Engine, Storage};
use petstore_web::CorrelationId;
use serde::{Deserialize, Serialize};

/// A test aggregate that accepts any number of events, to load the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CounterCommand {
    Increment,
    IncrementTwice,
    Refuse,
    /// Records a note and counts nothing.
    Note(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum CounterEvent {
    Incremented { to: u64 },
    Noted { note: String },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> String {
        match self {
            Self::Incremented { .. } => "Incremented",
            Self::Noted { .. } => "Noted",
        }
        .to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("refused")]
struct Refused;

impl Aggregate for Counter {
    const TYPE: &'static str = "Counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: CounterCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Refused> {
        let times = match command {
            CounterCommand::Increment => 1,
            CounterCommand::IncrementTwice => 2,
            CounterCommand::Refuse => return Err(Refused),
            CounterCommand::Note(note) => {
                sink.write(CounterEvent::Noted { note }, self).await;
                return Ok(());
            }
        };
        for _ in 0..times {
            let to = self.value + 1;
            sink.write(CounterEvent::Incremented { to }, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: CounterEvent) {
        if let CounterEvent::Incremented { to } = event {
            self.value = to;
        }
    }
}

fn metadata() -> EventMetadata {
    EventMetadata::new(CorrelationId::generate(), "tester")
}

/// The whole stream once it holds at least `count` events. On Postgres an event becomes
/// visible to readers only when every older transaction in the cluster has ended (other
/// tests run in parallel), so a read right after an append may lag for a moment.
async fn read_at_least(store: &EventStore, count: usize) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = stream::read_after(store.database(), StreamPosition::START, 100_000)
            .await
            .expect("read the stream");
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} events became visible",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows in the events table, whether stream readers see them yet or not.
async fn stored_event_count(store: &EventStore) -> i64 {
    const SQL: &str = "SELECT count(*) FROM events";
    match store.database() {
        Database::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
    }
    .expect("count events")
}

on_both_engines!(
    appended_events_load_back_with_their_metadata,
    a_refused_command_appends_nothing,
    concurrent_commands_on_one_aggregate_all_land_in_sequence,
    conflicts_beyond_the_retry_budget_are_reported,
    checkpoints_are_durable,
    concurrent_writers_and_a_tailing_reader_see_every_event_exactly_once,
    stores_of_two_processes_see_each_others_appends,
    an_owned_copy_is_trusted_until_the_owner_is_told_of_a_later_event,
    staged_appends_are_written_together_or_not_at_all,
    refusals_and_provider_attempts_are_recorded_and_pruned_after_their_retention,
);

/// A refused command is recorded (in the background, by the record writer) under its
/// correlation id; provider attempts and Kafka coordinates are written and read back; a
/// prune deletes exactly the records older than the retention.
async fn refusals_and_provider_attempts_are_recorded_and_pruned_after_their_retention(
    engine: Engine,
) {
    use petstore_domain::OrderId;
    use petstore_event_store::published::{self, Published};
    use petstore_event_store::records::{
        self, AttemptOutcome, Operation, Provider, ProviderAttempt, Record, Recorder,
    };

    let storage = Storage::new(engine).await;
    let database = storage.database().await;
    let (recorder, writer) = Recorder::new(database.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let writing = tokio::spawn(writer.run(async move {
        let _ = stopped.await;
    }));
    let store = EventStore::new(database.clone(), 8).with_recorder(recorder.clone());
    let metadata = metadata();
    let correlation_id = metadata.correlation_id.to_string();
    let result = store
        .execute::<Counter>("c-1", CounterCommand::Refuse, &(), &metadata)
        .await;
    assert!(matches!(result, Err(AggregateError::UserError(Refused))));
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusals = loop {
        let refusals = records::refusals_of(&database, &correlation_id)
            .await
            .expect("read");
        if !refusals.is_empty() {
            break refusals;
        }
        assert!(Instant::now() < deadline, "the refusal was never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].command, "Refuse");
    assert_eq!(refusals[0].aggregate_type, "Counter");
    assert_eq!(refusals[0].aggregate_id, "c-1");
    assert_eq!(refusals[0].reason, "refused");
    assert_eq!(refusals[0].subject.as_deref(), Some("tester"));

    let order_id = OrderId::parse("6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90").expect("an order id");
    let now = chrono::Utc::now();
    let old = now - chrono::Duration::days(10);
    let attempt = |number: u32, started_at| ProviderAttempt {
        order_id,
        correlation_id: correlation_id.clone(),
        provider: Provider::Payment,
        operation: Operation::Charge,
        idempotency_key: "key-1".to_owned(),
        attempt: number,
        outcome: AttemptOutcome::Failed,
        error: Some("unavailable: down".to_owned()),
        started_at,
        duration: Duration::from_millis(12),
    };
    records::write(
        &database,
        &[
            Record::Attempt(attempt(1, old)),
            Record::Attempt(attempt(2, now)),
        ],
    )
    .await
    .expect("written");
    let coordinates = |global_position, at| Published {
        global_position,
        topic: "orders".to_owned(),
        partition: 3,
        offset: global_position * 10,
        at,
    };
    // Two acknowledged batches, a week and more apart.
    for batch in [coordinates(1, old), coordinates(2, now)] {
        published::save_checkpoint_with(&database, "kafka", StreamPosition::START, None, &[batch])
            .await
            .expect("recorded");
    }
    let attempts = records::attempts_of(&database, &order_id)
        .await
        .expect("read");
    assert_eq!(
        attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(attempts[1].error.as_deref(), Some("unavailable: down"));
    assert_eq!(attempts[1].duration, Duration::from_millis(12));

    let deleted = records::prune(&database, now - chrono::Duration::days(7))
        .await
        .expect("pruned");
    assert_eq!(deleted, 2, "the old attempt and the old coordinates");
    let attempts = records::attempts_of(&database, &order_id)
        .await
        .expect("read");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].attempt, 2);
    let kept = published::of_positions(&database, &[1, 2])
        .await
        .expect("read");
    assert_eq!(kept.len(), 1);
    assert_eq!((kept[0].global_position, kept[0].offset), (2, 20));
    assert_eq!(
        records::refusals_of(&database, &correlation_id)
            .await
            .expect("read")
            .len(),
        1,
        "a recent refusal is kept"
    );
    assert_eq!(recorder.dropped(), 0);
    let _ = stop.send(());
    writing.await.expect("the writer stops");
    storage.remove().await;
}

/// A work that stages its appends decides each command on what it staged before, shows
/// nobody (not even another task of its process) anything until it flushes, and then
/// writes everything at once, the deadlines it staged too; on a conflict, only the commands
/// decided before the conflicting one are written, and no deadline; what is still staged
/// when the work ends is dropped.
async fn staged_appends_are_written_together_or_not_at_all(engine: Engine) {
    use petstore_domain::OrderId;
    use petstore_event_store::deadlines::{self, Deadline, DeadlineKind};

    let storage = Storage::new(engine).await;
    let (owner, other) = (
        EventStore::new(storage.database().await, 8),
        EventStore::new(storage.database().await, 8),
    );
    let run = |store: &EventStore, id: &'static str, command: CounterCommand| {
        let store = store.clone();
        async move {
            store
                .execute::<Counter>(id, command, &(), &metadata())
                .await
                .expect("decided")
        }
    };
    let value = |store: &EventStore, id: &'static str| {
        let store = store.clone();
        async move { store.load::<Counter>(id).await.expect("loaded").value }
    };
    let database = owner.database().clone();
    let now = chrono::Utc::now();
    let order = OrderId::random();
    let deadline = |kind, due_at| Deadline {
        order_id: order,
        kind,
        due_at,
        correlation_id: "staged".into(),
    };
    // As stored: (kind, due at), the earliest first.
    let stored_deadlines = || {
        let database = database.clone();
        async move {
            let due = deadlines::due(&database, now + chrono::Duration::days(1), 10)
                .await
                .expect("deadlines");
            due.into_iter()
                .map(|deadline| (deadline.kind, deadline.due_at.timestamp_millis()))
                .collect::<Vec<_>>()
        }
    };
    let (soon, later, latest) = (
        now - chrono::Duration::seconds(3),
        now - chrono::Duration::seconds(2),
        now - chrono::Duration::seconds(1),
    );

    owner
        .staged(async {
            assert_eq!(run(&owner, "x", CounterCommand::Increment).await.len(), 1);
            assert_eq!(
                run(&owner, "y", CounterCommand::IncrementTwice).await.len(),
                2
            );
            let staged = run(&owner, "x", CounterCommand::Increment).await;
            assert_eq!(staged[0].sequence, 2, "decided on the staged copy");
            assert_eq!(value(&owner, "x").await, 2, "the work sees what it staged");
            // The stage is the task's: other tasks, of this process or another, see nothing.
            let elsewhere = tokio::spawn(value(&owner, "x"));
            assert_eq!(
                elsewhere.await.expect("task"),
                0,
                "another task sees nothing"
            );
            let elsewhere = tokio::spawn(value(&other, "x"));
            assert_eq!(
                elsewhere.await.expect("task"),
                0,
                "another process sees nothing"
            );
            // Deadlines staged as the writes in turn would leave them: a schedule keeps the
            // one staged before it, a re-arm moves it.
            let (payment, hold) = (
                DeadlineKind::Step(petstore_domain::SagaStep::Payment),
                DeadlineKind::PaymentHold,
            );
            for (kind, due_at, rearm) in [
                (payment, soon, false),
                (payment, latest, false),
                (hold, soon, false),
                (hold, later, true),
                (hold, latest, false),
            ] {
                let write = if rearm {
                    owner.rearm_deadline(&deadline(kind, due_at)).await
                } else {
                    owner.schedule_deadline(&deadline(kind, due_at)).await
                };
                write.expect("staged");
            }
            assert_eq!(stored_event_count(&owner).await, 0);
            assert_eq!(stored_deadlines().await, [], "no deadline written yet");
            owner.flush().await.expect("written");
            assert_eq!(stored_event_count(&owner).await, 4);
            assert_eq!(
                stored_deadlines().await,
                [
                    (payment, soon.timestamp_millis()),
                    (hold, later.timestamp_millis())
                ],
                "written with the events"
            );
            owner.flush().await.expect("nothing left to write");
        })
        .await;
    let events = read_at_least(&owner, 4).await;
    let positions: Vec<i64> = events
        .iter()
        .map(|event| event.position.global_position)
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{positions:?}"
    );
    assert_eq!(value(&other, "x").await, 2);
    assert_eq!(value(&other, "y").await, 2);
    assert_eq!(
        owner.load_owned::<Counter>("y").await.expect("kept").value,
        2,
        "the written copies are kept"
    );

    // Another writer takes a sequence the work staged: the commands decided before the
    // conflicting one are written (as if each had been written when decided), the
    // conflicting one and all after it are not.
    let outcome = owner
        .staged(async {
            run(&owner, "y", CounterCommand::Increment).await;
            owner
                .rearm_deadline(&deadline(DeadlineKind::PaymentHold, latest))
                .await
                .expect("staged");
            run(&owner, "x", CounterCommand::Increment).await;
            run(&owner, "y", CounterCommand::Increment).await;
            tokio::spawn(run(&other, "x", CounterCommand::Note("first".into())))
                .await
                .expect("the other's append");
            owner.flush().await
        })
        .await;
    assert!(
        matches!(outcome, Err(AggregateError::AggregateConflict)),
        "{outcome:?}"
    );
    assert_eq!(
        stored_event_count(&owner).await,
        6,
        "the other's note, y's first"
    );
    assert_eq!(
        tokio::spawn(value(&other, "y")).await.expect("task"),
        3,
        "y's command before the conflict is written, the one after it is not"
    );
    assert_eq!(
        stored_deadlines().await[1],
        (DeadlineKind::PaymentHold, later.timestamp_millis()),
        "the staged deadline is not written"
    );
    // What the owner knew of the staged aggregates is forgotten: it decides on the stored.
    assert_eq!(value(&owner, "y").await, 3);
    let written = run(&owner, "x", CounterCommand::Increment).await;
    assert_eq!(written[0].sequence, 4);

    // Staged and never flushed: dropped with the work.
    owner
        .staged(async {
            run(&owner, "y", CounterCommand::Increment).await;
        })
        .await;
    assert_eq!(value(&owner, "y").await, 3);
    assert_eq!(stored_event_count(&owner).await, 7);
    storage.remove().await;
}

/// An owner's copy (proven current by its own append or read) is used without reading,
/// until the owner is told of a later event (another process appended), or distrusts every
/// copy; a command decided on a stale copy still conflicts and is decided again.
async fn an_owned_copy_is_trusted_until_the_owner_is_told_of_a_later_event(engine: Engine) {
    let storage = Storage::new(engine).await;
    let (owner, other) = (
        EventStore::new(storage.database().await, 8),
        EventStore::new(storage.database().await, 8),
    );
    let increment = |store: &EventStore| {
        let store = store.clone();
        async move {
            store
                .execute::<Counter>("owned", CounterCommand::Increment, &(), &metadata())
                .await
                .expect("appended");
        }
    };
    let value = |store: &EventStore| {
        let store = store.clone();
        async move {
            store
                .load_owned::<Counter>("owned")
                .await
                .expect("loaded")
                .value
        }
    };
    increment(&owner).await;
    increment(&other).await;
    // Trusted: what the owner's own append left, read from nothing.
    assert_eq!(value(&owner).await, 1);
    assert_eq!(owner.load::<Counter>("owned").await.expect("load").value, 2);
    // A plain load proved the copy current again.
    assert_eq!(value(&owner).await, 2);
    increment(&other).await;
    assert_eq!(value(&owner).await, 2, "not told yet");
    owner.observe(Counter::TYPE, "owned", 2);
    assert_eq!(value(&owner).await, 2, "an event it holds changes nothing");
    owner.observe(Counter::TYPE, "owned", 3);
    assert_eq!(value(&owner).await, 3, "told of a later event, it reads");
    increment(&other).await;
    owner.distrust_all();
    assert_eq!(value(&owner).await, 4, "distrusted, it reads");
    // A command on a stale trusted copy conflicts and is decided again on the stored one.
    increment(&other).await;
    increment(&owner).await;
    assert_eq!(value(&other).await, 5, "the other's own copy");
    assert_eq!(owner.load::<Counter>("owned").await.expect("load").value, 6);
    storage.remove().await;
}

/// Each store keeps what it knows of the aggregates it loaded or appended to; another
/// process's appends make that stale, and neither a load nor a command may act on it.
async fn stores_of_two_processes_see_each_others_appends(engine: Engine) {
    let storage = Storage::new(engine).await;
    let one = EventStore::new(storage.database().await, 8);
    let other = EventStore::new(storage.database().await, 8);
    let increment = |store: &EventStore, metadata: EventMetadata| {
        let store = store.clone();
        async move {
            store
                .execute::<Counter>("c-1", CounterCommand::Increment, &(), &metadata)
                .await
                .expect("append")
                .len()
        }
    };
    let first = metadata();
    assert_eq!(increment(&one, first.clone()).await, 1);
    assert_eq!(increment(&one, metadata()).await, 1);
    assert_eq!(increment(&other, metadata()).await, 1);
    let loaded: Counter = one.load("c-1").await.expect("load");
    assert_eq!(
        loaded.value, 3,
        "a load reads what the other store appended"
    );

    // `one` knows 3; the other appends a fourth: `one`'s next command conflicts on its
    // stale copy and is decided again on the stored aggregate.
    assert_eq!(increment(&other, metadata()).await, 1);
    assert_eq!(increment(&one, metadata()).await, 1);
    let loaded: Counter = other.load("c-1").await.expect("load");
    assert_eq!(loaded.value, 5);
    assert_eq!(stored_event_count(&one).await, 5);

    // A command handled by one store is a no-op in the other.
    assert_eq!(
        increment(&other, first).await,
        0,
        "handled before, by the other store"
    );
    let seen_twice = metadata();
    assert_eq!(increment(&other, seen_twice.clone()).await, 1);
    assert_eq!(increment(&one, seen_twice).await, 0);
    assert_eq!(stored_event_count(&one).await, 6);
    let loaded: Counter = one.load("c-1").await.expect("load");
    assert_eq!(loaded.value, 6);
    storage.remove().await;
}

async fn appended_events_load_back_with_their_metadata(engine: Engine) {
    let storage = Storage::new(engine).await;
    let store = EventStore::new(storage.database().await, 8);
    let metadata = metadata();
    let appended = store
        .execute::<Counter>("c-1", CounterCommand::IncrementTwice, &(), &metadata)
        .await
        .expect("append");
    assert_eq!(appended.len(), 2);
    assert_eq!(appended[1].sequence, 2);

    let counter: Counter = store.load("c-1").await.expect("load");
    assert_eq!(counter.value, 2);

    let events = read_at_least(&store, 2).await;
    assert_eq!(events.len(), 2);
    let event = &events[1];
    assert_eq!(event.aggregate_type, "Counter");
    assert_eq!(event.aggregate_id, "c-1");
    assert_eq!(event.sequence, 2);
    assert_eq!(event.event_type, "Incremented");
    assert_eq!(event.event_version, "1.0");
    assert_eq!(
        event.payload.to_value().expect("JSON"),
        serde_json::json!({"Incremented": {"to": 2}})
    );
    assert_eq!(
        event.metadata.correlation_id().expect("a correlation id"),
        metadata.correlation_id.as_str()
    );
    assert_eq!(event.metadata.subject().expect("a subject"), "tester");
    assert_eq!(
        event.metadata.command_id.expect("a command id").to_string(),
        metadata.command_id.to_string()
    );
    assert!(event
        .metadata
        .causation_id
        .as_deref()
        .is_some_and(|id| !id.is_empty()));
    assert!(event
        .metadata
        .timestamp()
        .expect("a timestamp")
        .ends_with('Z'));
    assert!(
        events[0].position < events[1].position,
        "stream order follows append order"
    );
    storage.remove().await;
}

async fn a_refused_command_appends_nothing(engine: Engine) {
    let storage = Storage::new(engine).await;
    let store = EventStore::new(storage.database().await, 8);
    let result = store
        .execute::<Counter>("c-1", CounterCommand::Refuse, &(), &metadata())
        .await;
    assert!(matches!(result, Err(AggregateError::UserError(Refused))));
    assert_eq!(stored_event_count(&store).await, 0);
    storage.remove().await;
}

async fn concurrent_commands_on_one_aggregate_all_land_in_sequence(engine: Engine) {
    let storage = Storage::new(engine).await;
    let store = EventStore::new(storage.database().await, 100);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .execute::<Counter>("hot", CounterCommand::Increment, &(), &metadata())
                    .await
                    .map(|events| events.len())
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(
            task.await.expect("task").expect("retried until it landed"),
            1
        );
    }
    let counter: Counter = store.load("hot").await.expect("load");
    assert_eq!(counter.value, 16, "no increment lost");
    let sequences: Vec<i64> = read_at_least(&store, 16)
        .await
        .iter()
        .map(|event| event.sequence)
        .collect();
    assert_eq!(sequences, (1..=16).collect::<Vec<_>>());
    storage.remove().await;
}

async fn conflicts_beyond_the_retry_budget_are_reported(engine: Engine) {
    let storage = Storage::new(engine).await;
    let store = EventStore::new(storage.database().await, 0);
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .execute::<Counter>("hot", CounterCommand::Increment, &(), &metadata())
                    .await
            })
        })
        .collect();
    let mut landed = 0;
    let mut conflicts = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => landed += 1,
            Err(AggregateError::AggregateConflict) => conflicts += 1,
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    let counter: Counter = store.load("hot").await.expect("load");
    assert_eq!(
        counter.value, landed,
        "every success is stored, nothing else"
    );
    assert_eq!(landed + conflicts, 12);
    storage.remove().await;
}

async fn checkpoints_are_durable(engine: Engine) {
    let storage = Storage::new(engine).await;
    let database = storage.database().await;
    assert_eq!(
        stream::load_checkpoint(&database, "reader")
            .await
            .expect("load"),
        StreamPosition::START
    );
    let position = StreamPosition {
        transaction_id: 0,
        global_position: 42,
    };
    stream::save_checkpoint(&database, "reader", position, None)
        .await
        .expect("save");
    let later = StreamPosition {
        transaction_id: 0,
        global_position: 43,
    };
    stream::save_checkpoint(&database, "reader", later, None)
        .await
        .expect("overwrite");
    database.close().await;
    let reopened = storage.database().await;
    assert_eq!(
        stream::load_checkpoint(&reopened, "reader")
            .await
            .expect("load"),
        later
    );
    storage.remove().await;
}

/// 8 writers append 5,000 events to 100 contended aggregates while a reader tails the stream;
/// the reader is dropped part-way and recreated from its checkpoint.
async fn concurrent_writers_and_a_tailing_reader_see_every_event_exactly_once(engine: Engine) {
    const WRITERS: usize = 8;
    const EVENTS_PER_WRITER: usize = 625;
    const TOTAL: usize = WRITERS * EVENTS_PER_WRITER;
    let storage = Storage::new(engine).await;
    let store = EventStore::new(storage.database().await, 1_000);

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..EVENTS_PER_WRITER {
                    let aggregate = format!("counter-{}", fastrand::usize(0..100));
                    store
                        .execute::<Counter>(&aggregate, CounterCommand::Increment, &(), &metadata())
                        .await
                        .expect("append");
                }
            })
        })
        .collect();

    let seen = Arc::new(tokio::sync::Mutex::new(Vec::<RecordedEvent>::new()));
    let deadline = Instant::now() + Duration::from_secs(240);
    // First reader: until at least 2,000 events, then save the checkpoint and drop it.
    let mut reader =
        StreamReader::new(&store, StreamPosition::START, 97, Duration::from_millis(20));
    while seen.lock().await.len() < 2_000 {
        assert!(Instant::now() < deadline, "the reader stalled");
        let batch = reader.next_batch().await.expect("read");
        seen.lock().await.extend(batch);
    }
    stream::save_checkpoint(store.database(), "suite", reader.position(), None)
        .await
        .expect("save");
    drop(reader);

    let resume = stream::load_checkpoint(store.database(), "suite")
        .await
        .expect("load");
    let mut reader = StreamReader::new(&store, resume, 97, Duration::from_millis(20));
    while seen.lock().await.len() < TOTAL {
        assert!(
            Instant::now() < deadline,
            "the reader stalled after resuming"
        );
        let batch = tokio::time::timeout(Duration::from_secs(30), reader.next_batch())
            .await
            .expect("events keep arriving")
            .expect("read");
        seen.lock().await.extend(batch);
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    // Nothing more arrives after the writers are done.
    let extra = stream::read_after(store.database(), reader.position(), 10)
        .await
        .expect("read");
    assert!(extra.is_empty(), "the reader saw every event");

    let seen = seen.lock().await;
    assert_eq!(seen.len(), TOTAL);
    let unique: HashSet<(String, i64)> = seen
        .iter()
        .map(|event| (event.aggregate_id.clone(), event.sequence))
        .collect();
    assert_eq!(unique.len(), TOTAL, "no event delivered twice");
    assert!(
        seen.windows(2)
            .all(|pair| pair[0].position < pair[1].position),
        "positions strictly increase"
    );
    let mut last_sequence: HashMap<&str, i64> = HashMap::new();
    for event in seen.iter() {
        let last = last_sequence.entry(&event.aggregate_id).or_insert(0);
        assert_eq!(
            event.sequence,
            *last + 1,
            "{} out of sequence",
            event.aggregate_id
        );
        *last = event.sequence;
    }
    storage.remove().await;
}

/// A slow transaction that appends before a fast one but commits after it: the reader must
/// not move past the fast one's event while the slow one is open, or it would skip the slow
/// one's event for ever.
#[tokio::test]
async fn postgres_reader_never_skips_an_event_committed_late() {
    let storage = Storage::new(Engine::Postgres).await;
    let store = EventStore::new(storage.database().await, 8);
    let database = storage.postgres().expect("postgres");

    let mut slow = database.connect().await;
    sqlx::query("BEGIN")
        .execute(&mut slow)
        .await
        .expect("begin");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Counter', 'slow', 1, 'Incremented', '1.0', '{\"Incremented\":{\"to\":1}}', '{}')",
    )
    .execute(&mut slow)
    .await
    .expect("slow insert");

    store
        .execute::<Counter>("fast", CounterCommand::Increment, &(), &metadata())
        .await
        .expect("fast append commits");
    let visible = stream::read_after(store.database(), StreamPosition::START, 10)
        .await
        .expect("read");
    assert!(
        visible.is_empty(),
        "nothing is delivered past an open older transaction: {visible:?}"
    );

    sqlx::query("COMMIT")
        .execute(&mut slow)
        .await
        .expect("commit");
    let visible = read_at_least(&store, 2).await;
    let ids: Vec<&str> = visible
        .iter()
        .map(|event| event.aggregate_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["slow", "fast"],
        "both delivered, in commit-safe order"
    );
    storage.remove().await;
}

/// Concurrent one-event appends share statements (group commit), yet each keeps its own
/// outcome: a row Postgres refuses (`\u0000` in a jsonb payload) fails its own append and
/// no other, every other append lands exactly once, and appends of one aggregate that race
/// for the same sequence still leave one winner and the rest retried behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_appends_keep_their_own_outcomes() {
    let storage = Storage::new(Engine::Postgres).await;
    let store = EventStore::new(storage.database().await, 100);
    let tasks: Vec<_> = (0..240)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let outcome = match n % 3 {
                    0 => store
                        .execute::<Counter>("hot", CounterCommand::Increment, &(), &metadata())
                        .await
                        .map(|events| events.len()),
                    _ => {
                        let note = if n % 12 == 1 { "bad \0 note" } else { "fine" };
                        store
                            .execute_on_new::<Counter>(
                                &format!("new-{n}"),
                                CounterCommand::Note(note.to_owned()),
                                &(),
                                &metadata(),
                            )
                            .await
                            .map(|events| events.len())
                    }
                };
                (n, outcome)
            })
        })
        .collect();
    let mut noted = 0;
    for task in tasks {
        let (n, outcome) = task.await.expect("task");
        match (n % 3, n % 12 == 1, outcome) {
            (0, _, Ok(1)) => {}
            (_, false, Ok(1)) => noted += 1,
            (_, true, Err(AggregateError::UnexpectedError(_))) => {}
            (_, bad, outcome) => panic!("append {n} (bad row: {bad}) ended {outcome:?}"),
        }
    }
    assert_eq!(noted, 140, "every good append landed");
    let counter: Counter = store.load("hot").await.expect("load");
    assert_eq!(counter.value, 80, "no increment lost or doubled");
    assert_eq!(
        stored_event_count(&store).await,
        80 + 140,
        "nothing but the landed appends is stored"
    );
    let hot: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = 'hot' ORDER BY sequence",
    )
    .fetch_all(match store.database() {
        Database::Postgres(pool) => pool,
        Database::Sqlite(_) => unreachable!("a Postgres test"),
    })
    .await
    .expect("sequences");
    assert_eq!(hot, (1..=80).collect::<Vec<_>>());
    storage.remove().await;
}

/// A transaction whose `BEGIN` is cancelled mid-flight (an aborted task, a timeout) must not
/// leave a pooled connection inside a transaction: later autocommit statements on it would
/// stay uncommitted and hold back every stream reader on the server. (With sqlx's own
/// `pool.begin()` in place of `database::begin` this fails in about two runs of three.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_begin_leaves_no_pooled_connection_inside_a_transaction() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let Database::Postgres(pool) = &database else {
        unreachable!("a Postgres storage");
    };
    for attempt in 0..2_000_u32 {
        // Cancel after a varying number of polls: somewhere between sending BEGIN and
        // reading its answer, sometimes (timers are too coarse for that window).
        let yields = async {
            for _ in 0..attempt % 40 {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            biased;
            begun = petstore_event_store::database::begin(pool) => drop(begun),
            () = yields => {}
        }
    }
    assert_no_connection_left_inside_a_transaction(&storage).await;
    database.close().await;
    storage.remove().await;
}

/// Acknowledging (saving a checkpoint) runs inside subscribers that are cancelled at any
/// await, a stopped or aborted saga runner among them: a cancelled save must not leave a
/// pooled connection inside a transaction either. (With `pool.begin()` in `save_checkpoint`
/// a killed runner's later deadline writes held locks and every stream reader on the server
/// for 60 s; this test then fails in about one run of three.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_checkpoint_save_leaves_no_pooled_connection_inside_a_transaction() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    for attempt in 0..2_000_u32 {
        let yields = async {
            for _ in 0..attempt % 40 {
                tokio::task::yield_now().await;
            }
        };
        let position = StreamPosition {
            transaction_id: 0,
            global_position: i64::from(attempt),
        };
        tokio::select! {
            biased;
            saved = stream::save_checkpoint(&database, "cancelled", position, None) => {
                saved.expect("saved");
            }
            () = yields => {}
        }
    }
    assert_no_connection_left_inside_a_transaction(&storage).await;
    database.close().await;
    storage.remove().await;
}

/// Fails unless every connection to `storage`'s database soon leaves its transaction.
/// Dropped transactions roll back in tasks of their own: they get a moment (less than the
/// server's 5 s idle-in-transaction timeout, which would hide a stuck connection).
async fn assert_no_connection_left_inside_a_transaction(storage: &Storage) {
    let mut observer = storage.postgres().expect("postgres").connect().await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stuck: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state LIKE 'idle in transaction%'
                AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut observer)
        .await
        .expect("query");
        if stuck == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stuck} pooled connections left inside a transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(observer);
}

/// Appends and deadline writes made under a saga partition's fence land while its lease
/// holds, and are refused with `LeaseLost` once another runner took the partition: alone, in
/// a group-commit batch beside unfenced appends, and several events at once. A refused
/// append leaves nothing stored; a concurrent conflict under a current lease is still a
/// conflict (retried), not a lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_a_lost_lease_are_refused() {
    use petstore_domain::partition::Partitions;
    use petstore_domain::OrderId;
    use petstore_event_store::dead_letters;
    use petstore_event_store::deadlines::{self, Deadline, DeadlineKind};
    use petstore_event_store::leases::{CheckError, Fence, LeaseLost, Leases};

    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let store = EventStore::new(database.clone(), 100);
    let partition = Partitions::default().all().nth(5).expect("partition 5");
    let timeout = Duration::from_secs(30);
    let (a, b) = (
        Leases::new(&database, "runner-a", timeout),
        Leases::new(&database, "runner-b", timeout),
    );
    let old = a.acquire(partition).await.expect("acquire").expect("free");
    let fence_a = Fence {
        owner: "runner-a".into(),
        lease: old,
    };
    let lost = |outcome: &Result<Vec<cqrs_es::EventEnvelope<Counter>>, AggregateError<Refused>>| {
        matches!(outcome, Err(AggregateError::UnexpectedError(error))
            if error.downcast_ref::<LeaseLost>().is_some_and(|lost| lost.epoch == old.epoch))
    };

    // Held: alone, several at once, and many concurrent appends on one aggregate (whose
    // conflicts are retried) all land.
    let outcome = fence_a
        .clone()
        .guard(store.execute::<Counter>("held", CounterCommand::Increment, &(), &metadata()))
        .await;
    assert_eq!(outcome.expect("held").len(), 1);
    let outcome = fence_a
        .clone()
        .guard(store.execute::<Counter>("held", CounterCommand::IncrementTwice, &(), &metadata()))
        .await;
    assert_eq!(outcome.expect("held").len(), 2);
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (store, fence) = (store.clone(), fence_a.clone());
            tokio::spawn(fence.guard(async move {
                store
                    .execute::<Counter>("held", CounterCommand::Increment, &(), &metadata())
                    .await
            }))
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("held").len(), 1);
    }
    let deadline = Deadline {
        order_id: OrderId::random(),
        kind: DeadlineKind::PaymentHold,
        due_at: chrono::Utc::now(),
        correlation_id: "c".into(),
    };
    fence_a
        .clone()
        .guard(deadlines::schedule(&database, &deadline))
        .await
        .expect("held");

    // b takes the partition over: a's fence is lost.
    assert!(a.release(&old).await.expect("release"));
    let new = b.acquire(partition).await.expect("acquire").expect("free");
    let fence_b = Fence {
        owner: "runner-b".into(),
        lease: new,
    };
    let outcome = fence_a
        .clone()
        .guard(store.execute::<Counter>("held", CounterCommand::Increment, &(), &metadata()))
        .await;
    assert!(lost(&outcome), "alone: {outcome:?}");
    let outcome = fence_a
        .clone()
        .guard(store.execute::<Counter>("held", CounterCommand::IncrementTwice, &(), &metadata()))
        .await;
    assert!(lost(&outcome), "several: {outcome:?}");
    // Staged appends of several aggregates, written at once.
    let outcome = fence_a
        .clone()
        .guard(store.staged(async {
            store
                .execute::<Counter>("held", CounterCommand::Increment, &(), &metadata())
                .await
                .expect("staged");
            store
                .execute::<Counter>("staged", CounterCommand::Increment, &(), &metadata())
                .await
                .expect("staged");
            // A deadline staged with them: refused with them (the count of due ones below).
            store
                .schedule_deadline(&Deadline {
                    order_id: OrderId::random(),
                    ..deadline.clone()
                })
                .await
                .expect("staged");
            store.flush().await
        }))
        .await;
    assert!(
        matches!(&outcome, Err(AggregateError::UnexpectedError(error))
            if error.downcast_ref::<LeaseLost>().is_some_and(|lost| lost.epoch == old.epoch)),
        "staged: {outcome:?}"
    );
    // Batched beside unfenced appends and b's: only a's are refused.
    let tasks: Vec<_> = (0..90)
        .map(|n| {
            let store = store.clone();
            let fence = [Some(fence_a.clone()), Some(fence_b.clone()), None][n % 3].clone();
            tokio::spawn(async move {
                let (id, metadata) = (format!("batch-{n}"), metadata());
                let append =
                    store.execute_on_new::<Counter>(&id, CounterCommand::Increment, &(), &metadata);
                match fence {
                    Some(fence) => fence.guard(append).await,
                    None => append.await,
                }
            })
        })
        .collect();
    for (n, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.expect("task");
        if n % 3 == 0 {
            assert!(lost(&outcome), "batched under a's fence: {outcome:?}");
        } else {
            assert_eq!(outcome.expect("landed").len(), 1, "append {n}");
        }
    }
    let refused = fence_a
        .clone()
        .guard(deadlines::rearm(&database, &deadline))
        .await;
    assert!(
        matches!(&refused, Err(CheckError::Lost(lost)) if lost.epoch == old.epoch),
        "{refused:?}"
    );
    let refused = fence_a
        .clone()
        .guard(deadlines::mark_fired(
            &database,
            &deadline.order_id,
            deadline.kind,
        ))
        .await;
    assert!(matches!(refused, Err(CheckError::Lost(_))), "{refused:?}");
    assert_eq!(
        deadlines::due(&database, chrono::Utc::now(), 10)
            .await
            .expect("due")
            .len(),
        1,
        "the refused mark left the deadline due"
    );
    // Dead letters too: a's is refused, b's recorded.
    let event = stream::aggregate_events_newest_first(&database, Counter::TYPE, "held", 1..2, 1)
        .await
        .expect("read")
        .remove(0);
    let set_aside = |fence: &Fence| {
        fence.clone().guard(dead_letters::record_fenced(
            &database, "saga", &event, None, "poison",
        ))
    };
    let refused = set_aside(&fence_a).await;
    assert!(
        matches!(&refused, Err(CheckError::Lost(lost)) if lost.epoch == old.epoch),
        "{refused:?}"
    );
    set_aside(&fence_b).await.expect("b's lease holds");
    let Database::Postgres(pool) = &database else {
        panic!("Postgres only")
    };
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(letters, 1, "a's refused dead letter left nothing");
    fence_b
        .guard(deadlines::mark_fired(
            &database,
            &deadline.order_id,
            deadline.kind,
        ))
        .await
        .expect("b's lease holds");

    let counter: Counter = store.load("held").await.expect("load");
    assert_eq!(counter.value, 43, "nothing refused is stored");
    assert_eq!(
        stored_event_count(&store).await,
        43 + 60,
        "a's refused appends left nothing"
    );
    storage.remove().await;
}
