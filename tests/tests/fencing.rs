//! Fenced projectors: a holder of a projection lock whose connection is killed
//! (`pg_terminate_backend`) notices within seconds; a successor takes the lock with a higher
//! fencing token; the old holder's writes (Postgres read models and checkpoint, Redis views)
//! are refused, and the read models stay equal to a fold of the log. A running projector
//! whose lock connection is killed stops, stands by, and takes over again. The read models'
//! progress follows their commits across a lost listening connection.

use std::time::{Duration, Instant};

use petstore_event_store::database::{Database, ExclusiveLock};
use petstore_event_store::store::EventStore;
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use petstore_event_store::subscription::StreamReader;
use petstore_projector::{Projection, Projector};
use petstore_read_models::views::ViewBatch;
use petstore_read_models::{ReadModels, RedisViews};
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_settings::ProjectorSettings;
use petstore_telemetry::metrics::Metrics;
use petstore_tests::{add_pets, redis_url, unique_name, Engine, Storage};

const LOCK: &str = "projection:read_models";

/// The log's first `count` events, in order. (The stream shows an event once no older
/// transaction anywhere on the server is open: under a loaded suite that takes a moment.)
async fn whole_log(store: &EventStore, count: usize) -> Vec<RecordedEvent> {
    let mut reader = StreamReader::new(store, StreamPosition::START, 1_000, Duration::ZERO);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while events.len() < count {
        match reader.next_batch_or_idle().await.expect("read") {
            Some(batch) => events.extend(batch),
            None => {
                assert!(
                    Instant::now() < deadline,
                    "the log shows {} events",
                    events.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    events
}

/// Kills the backend holding this database's advisory locks, as a dropped connection would.
async fn kill_lock_connection(database: &Database) {
    let Database::Postgres(pool) = database else {
        panic!("Postgres only")
    };
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
          WHERE locktype = 'advisory' AND granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(pool)
    .await
    .expect("terminate");
    assert_eq!(killed, vec![true], "one lock connection");
}

async fn take(database: &Database) -> ExclusiveLock {
    database
        .try_lock(LOCK)
        .await
        .expect("lock")
        .expect("granted")
}

async fn notices_the_loss(lock: &ExclusiveLock) {
    tokio::time::timeout(Duration::from_secs(15), lock.lost())
        .await
        .expect("the holder notices its lost lock within seconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_holder_cannot_write_the_read_models_after_a_successor_took_over() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let store = EventStore::new(database.clone(), 4);
    add_pets(&store, "fenced-pup", 6).await;
    let log = whole_log(&store, 6).await;
    let (first, rest) = log.split_at(log.len() / 2);
    let read_models = ReadModels::open(&database).await.expect("read models");

    let old = take(&database).await;
    let old_fence = old.fence().expect("a fence on Postgres").clone();
    read_models
        .apply(first, Some(&old_fence))
        .await
        .expect("the holder writes");
    kill_lock_connection(&database).await;
    notices_the_loss(&old).await;
    let new = take(&database).await;
    let new_fence = new.fence().expect("a fence").clone();
    assert!(
        new_fence.token > old_fence.token,
        "{new_fence:?} after {old_fence:?}"
    );

    // The old holder, unaware (paused), tries to write the next batch: refused whole.
    let refused = read_models
        .apply(rest, Some(&old_fence))
        .await
        .expect_err("fenced");
    assert!(
        matches!(&refused, petstore_read_models::ReadModelError::Stream(error) if error.is_fenced()),
        "{refused}"
    );
    let checkpoint = stream::load_checkpoint(&database, "read_models")
        .await
        .expect("checkpoint");
    assert_eq!(checkpoint, first.last().expect("events").position);
    read_models
        .apply(rest, Some(&new_fence))
        .await
        .expect("the successor writes");

    // The read models are what a fold of the whole log gives.
    let (_, pet_ids) = ViewBatch::ids(&log);
    let mut fold = ViewBatch {
        pets: pet_ids.into_iter().map(|id| (id, None)).collect(),
        ..ViewBatch::default()
    };
    assert!(fold.fold(&log).is_empty(), "every event folds");
    assert_eq!(fold.pets.len(), 6);
    for (pet, view) in fold.pets {
        assert_eq!(read_models.pet(&pet).await.expect("pet"), view);
    }
    drop(new);
    database.close().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_holder_cannot_write_the_redis_views_after_a_successor_took_over() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let store = EventStore::new(database.clone(), 4);
    add_pets(&store, "fenced-kit", 4).await;
    let log = whole_log(&store, 4).await;
    let (first, rest) = log.split_at(log.len() / 2);
    let mut settings = storage.settings();
    settings.redis.url = Some(secrecy::SecretString::from(redis_url()));
    settings.redis.key_prefix = unique_name("fence");
    let cache = Cache::connect(
        &settings.redis,
        Policies::fixed(&settings.resilience, &Metrics::new()).redis,
    )
    .expect("redis");
    let views = RedisViews::new(cache.clone(), Duration::from_secs(30));

    let name = "projection:redis";
    let old = database
        .try_lock(name)
        .await
        .expect("lock")
        .expect("granted");
    let old_fence = old.fence().expect("fence").clone();
    views.raise_fence(&old_fence).await.expect("raised");
    views
        .apply(first, Some(&old_fence))
        .await
        .expect("the holder writes");
    drop(old);
    // Dropped, the lock's connection closes; the server frees the lock once its backend
    // sees that, a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(new) = database.try_lock(name).await.expect("lock") {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped lock was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_fence = new.fence().expect("fence").clone();
    views.raise_fence(&new_fence).await.expect("raised");
    // The old holder can neither write nor take the fence back.
    let refused = views
        .apply(rest, Some(&old_fence))
        .await
        .expect_err("fenced");
    assert!(refused.is_fenced(), "{refused}");
    assert!(views
        .raise_fence(&old_fence)
        .await
        .expect_err("fenced")
        .is_fenced());
    assert_eq!(
        Projection::position(&views).await.expect("position"),
        first.last().expect("events").position,
        "nothing of the refused batch was written"
    );
    views
        .apply(rest, Some(&new_fence))
        .await
        .expect("the successor writes");
    assert_eq!(
        Projection::position(&views).await.expect("position"),
        log.last().expect("events").position
    );
    cache
        .delete_namespace(&settings.redis.key_prefix)
        .await
        .expect("cleaned");
    drop(new);
    database.close().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_whose_lock_connection_dies_stops_and_takes_over_again() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let store = EventStore::new(database.clone(), 4);
    let projector = Projector::new(
        store.clone(),
        ReadModels::open(&database).await.expect("read models"),
        ProjectorSettings::default(),
    );
    let mut progress = projector.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(projector.run(async {
        let _ = stopped.await;
    }));
    let wait = |want: bool| {
        let mut progress = progress.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(15),
                progress.wait_for(|progress| progress.active == want),
            )
            .await
            .expect("within seconds")
            .expect("progress");
        }
    };
    wait(true).await;
    kill_lock_connection(&database).await;
    wait(false).await;
    wait(true).await;
    // Active again, with a new token: it projects what comes next.
    add_pets(&store, "fenced-cub", 2).await;
    let head = stream::head_position(&database).await.expect("head");
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.borrow_and_update().position < head {
        assert!(Instant::now() < deadline, "projects again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await.expect("stopped");
    database.close().await;
    storage.remove().await;
}

/// The read models' progress (what a query waiting for a write waits on) follows their
/// commits as Postgres notifies them, carries on after its listening connection is
/// killed, and never says a position is reached before a commit got there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_read_models_progress_follows_their_commits_across_a_lost_connection() {
    let storage = Storage::new(Engine::Postgres).await;
    let database = storage.database().await;
    let store = EventStore::new(database.clone(), 4);
    add_pets(&store, "progress-pup", 6).await;
    let log = whole_log(&store, 6).await;
    let (first, rest) = log.split_at(log.len() / 2);
    let read_models = ReadModels::open(&database).await.expect("read models");
    let progress = read_models.progress().await.expect("progress");
    assert_eq!(progress.current(), StreamPosition::START);
    let soon = || tokio::time::Instant::now() + Duration::from_millis(300);
    let within = || tokio::time::Instant::now() + Duration::from_secs(15);
    let head = log.last().expect("events").position;
    assert!(!progress.reached(head, soon()).await, "nothing applied yet");

    read_models.apply(first, None).await.expect("apply");
    let applied = first.last().expect("events").position;
    assert!(
        progress.reached(applied, within()).await,
        "told of the commit"
    );
    assert_eq!(progress.current(), applied);
    assert!(!progress.reached(head, soon()).await, "not past the commit");

    // Its listening connection dies: the next commit is still told (read again once the
    // listener reconnects, or notified to it).
    let Database::Postgres(pool) = &database else {
        panic!("Postgres only")
    };
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%progress%'",
    )
    .fetch_all(pool)
    .await
    .expect("terminate");
    assert_eq!(killed, vec![true], "one listening connection");
    read_models.apply(rest, None).await.expect("apply");
    assert!(
        progress.reached(head, within()).await,
        "told after reconnecting"
    );
    assert_eq!(progress.current(), head);
    drop(progress);
    database.close().await;
    storage.remove().await;
}
