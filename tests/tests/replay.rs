//! Rebuilding projections from the log gives byte-identical read models.

use std::time::{Duration, Instant};

use petstore_event_store::stream;
use petstore_projector::Projection;
use petstore_read_models::rebuild::{self, ReplayError};
use petstore_read_models::RedisViews;
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_telemetry::metrics::Metrics;
use petstore_tests::{redis_url, unique_name, Engine, Storage, TestApp};
use redis::AsyncCommands;
use secrecy::SecretString;
use serde_json::Value;

async fn postgres_documents(storage: &Storage) -> Vec<(String, String)> {
    let mut connection = storage.postgres().expect("postgres").connect().await;
    sqlx::query_as(
        "SELECT order_id::text, document::text FROM order_status_view
         UNION ALL SELECT pet_id, document::text FROM pet_catalog_view ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .expect("read models")
}

async fn redis_documents(prefix: &str) -> Vec<(String, String)> {
    let client = redis::Client::open(redis_url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut keys: Vec<String> = Vec::new();
    for pattern in [format!("{prefix}:order:*"), format!("{prefix}:pet:*")] {
        let found: Vec<String> = connection.keys(pattern).await.expect("KEYS");
        keys.extend(found);
    }
    keys.sort();
    let mut documents = Vec::new();
    for key in keys {
        let value: String = connection.get(&key).await.expect("GET");
        documents.push((key, value));
    }
    documents
}

async fn order_status(app: &TestApp, order_id: &str) -> String {
    let view: Value = app
        .get(&format!("/petstore-domain/orders/{order_id}/status"))
        .await
        .json()
        .await
        .expect("json");
    view["status"].as_str().expect("status").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_every_projection_gives_byte_identical_read_models() {
    let storage = Storage::new(Engine::Postgres).await;
    let prefix = unique_name("replay");
    let mut settings = storage.settings();
    settings.redis.url = Some(SecretString::from(redis_url()));
    settings.redis.key_prefix = prefix.clone();
    settings.redis.operation_timeout_ms = 5_000; // a loaded machine
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let mut orders = Vec::new();
    for (pet, failure) in [
        ("golden-retriever-001", None),
        ("beagle-001", Some("payment-service")),
        ("golden-retriever-001", None),
    ] {
        orders.push(app.post_order(pet, failure).await);
    }
    for order_id in &orders {
        app.wait_for_terminal(order_id).await;
    }
    // Let every projection and the saga reach the head of the log, and the log stop growing
    // (the saga's last compensations land after the order shows cancelled).
    let database = storage.database().await;
    let views = RedisViews::new(
        Cache::connect(
            &settings.redis,
            Policies::fixed(&settings.resilience, &Metrics::new()).redis,
        )
        .expect("redis"),
        Duration::from_secs(30),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let head = stream::head_position(&database).await.expect("head");
        let mut reached = vec![
            stream::load_checkpoint(&database, "read_models")
                .await
                .expect("checkpoint"),
            Projection::position(&views).await.expect("redis"),
        ];
        // The saga's: one per saga partition.
        for partition in settings.saga.partitions().expect("partitions").all() {
            let name = petstore_saga::partition_checkpoint(partition);
            reached.push(
                stream::load_checkpoint(&database, &name)
                    .await
                    .expect("checkpoint"),
            );
        }
        if reached.iter().all(|position| *position >= head) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream::head_position(&database).await.expect("head") == head {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the projections never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While the service runs, its projectors hold their locks: a rebuild is refused.
    let refused = rebuild::rebuild_read_models(&database, 100, false, &mut |_| {}).await;
    assert!(
        matches!(refused, Err(ReplayError::ProjectionActive(_))),
        "{refused:?}"
    );
    let mut live_statuses = Vec::new();
    for order_id in &orders {
        live_statuses.push(order_status(&app, order_id).await);
    }
    // Two orders raced for one pet: exactly one of them got it.
    let golden: Vec<&str> = [&live_statuses[0], &live_statuses[2]]
        .iter()
        .map(|status| status.as_str())
        .collect();
    assert!(
        golden == ["completed", "cancelled"] || golden == ["cancelled", "completed"],
        "{live_statuses:?}"
    );
    assert_eq!(live_statuses[1], "cancelled", "payment failed");
    app.stop().await;

    let live_postgres = postgres_documents(&storage).await;
    let live_redis = redis_documents(&prefix).await;
    assert!(live_postgres.len() >= 17, "3 orders and 14 pets");

    // Damage the live read models: only a real rebuild from the log repairs them.
    let mut connection = storage.postgres().expect("postgres").connect().await;
    sqlx::query("UPDATE order_status_view SET document = '{}'::jsonb")
        .execute(&mut connection)
        .await
        .expect("damage");
    sqlx::query("DELETE FROM pet_catalog_view WHERE pet_id = 'beagle-001'")
        .execute(&mut connection)
        .await
        .expect("damage");
    let client = redis::Client::open(redis_url()).expect("url");
    let mut redis_connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let () = redis_connection
        .set(format!("{prefix}:order:{}", orders[0]), "{}")
        .await
        .expect("damage");
    let () = redis_connection
        .set(format!("{prefix}:pet:stray-001"), "{}")
        .await
        .expect("damage");
    let damaged = postgres_documents(&storage).await;
    assert_ne!(damaged, live_postgres);

    let mut seen = 0;
    let dry = rebuild::rebuild_read_models(&database, 7, true, &mut |n| seen = n)
        .await
        .expect("dry run");
    assert_eq!(dry.applied, 0);
    assert_eq!(seen, dry.events);
    assert_eq!(
        postgres_documents(&storage).await,
        damaged,
        "a dry run writes nothing"
    );
    let report = rebuild::rebuild_read_models(&database, 7, false, &mut |_| {})
        .await
        .expect("rebuild");
    assert_eq!(report.events, report.applied);
    rebuild::rebuild_redis(&database, &views, 7, false, &mut |_| {})
        .await
        .expect("rebuild redis");

    assert_eq!(
        postgres_documents(&storage).await,
        live_postgres,
        "postgres read models identical"
    );
    assert_eq!(
        redis_documents(&prefix).await,
        live_redis,
        "redis views identical"
    );
    // One event per batch: the rebuild keeps only 10 views in memory, so views are written
    // out, read back when a later event touches them, and written again.
    rebuild::rebuild_read_models(&database, 1, false, &mut |_| {})
        .await
        .expect("rebuild, one event per batch");
    assert_eq!(
        postgres_documents(&storage).await,
        live_postgres,
        "postgres read models identical after views went out and came back"
    );

    // The service resumes on the rebuilt read models.
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    for (order_id, live) in orders.iter().zip(&live_statuses) {
        assert_eq!(&order_status(&app, order_id).await, live);
    }
    app.stop().await;
    database.close().await;
    storage.remove().await;
}
