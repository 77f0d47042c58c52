//! The embedded read models are written behind to a snapshot in the SQLite file: a start loads
//! it and folds only the events after it; a snapshot that cannot be used is dropped and the
//! views are rebuilt from the log; `replay --projection read_models` rebuilds it.

use std::time::{Duration, Instant};

use petstore_event_store::database::Database;
use petstore_event_store::store::EventStore;
use petstore_event_store::stream;
use petstore_read_models::rebuild;
use petstore_tests::{add_pets, Engine, Storage, TestApp};
use serde_json::Value;
use sqlx::SqlitePool;

fn pool(database: &Database) -> &SqlitePool {
    let Database::Sqlite(pool) = database else {
        panic!("the embedded store");
    };
    pool
}

/// The snapshot's global position, if one is stored.
async fn snapshot_position(database: &Database) -> Option<i64> {
    sqlx::query_scalar("SELECT global_position FROM read_model_snapshot")
        .fetch_optional(pool(database))
        .await
        .expect("the snapshot header")
}

/// Waits until the log stops growing and the snapshot holds all of it.
async fn until_snapshot_at_head(database: &Database) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let head = stream::head_position(database)
            .await
            .expect("head")
            .global_position;
        if snapshot_position(database).await == Some(head) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if stream::head_position(database)
                .await
                .expect("head")
                .global_position
                == head
            {
                return head;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot never reached the head"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events the read models of `app` applied since it started.
async fn applied(app: &TestApp) -> u64 {
    let metrics = app
        .get("/metrics")
        .await
        .text()
        .await
        .expect("metrics text");
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("petstore_projected_events_total{projection=\"read_models\"} ")
        })
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// What the read models serve for `orders` and the whole catalog.
async fn served(app: &TestApp, orders: &[String]) -> Vec<Value> {
    let mut paths: Vec<String> = orders
        .iter()
        .map(|order_id| format!("/petstore-domain/orders/{order_id}/status"))
        .collect();
    paths.push("/petstore-domain/pets/browse?limit=100".to_owned());
    let mut documents = Vec::new();
    for path in paths {
        let response = app.get(&path).await;
        assert_eq!(response.status(), 200, "{path}");
        documents.push(response.json().await.expect("json"));
    }
    documents
}

async fn place_orders(app: &TestApp) -> Vec<String> {
    let mut orders = Vec::new();
    for pet in ["golden-retriever-001", "beagle-001"] {
        let accepted = app.place_order(pet).await;
        orders.push(accepted["order_id"].as_str().expect("an id").to_owned());
    }
    for order_id in &orders {
        app.wait_for_terminal(order_id).await;
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_loads_the_snapshot_and_folds_only_the_events_after_it() {
    let storage = Storage::new(Engine::Embedded).await;
    let settings = storage.settings();
    let database = storage.database().await;
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let orders = place_orders(&app).await;
    let head = until_snapshot_at_head(&database).await;
    let before = served(&app, &orders).await;
    app.stop().await;

    // Events appended while no process serves the read models: the tail the next start folds.
    let store = EventStore::new(database.clone(), 4);
    let pets = add_pets(&store, "snapshot-tail", 3).await;
    let tail = stream::head_position(&database)
        .await
        .expect("head")
        .global_position
        - head;
    assert_eq!(tail, 3, "one event per pet");

    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    assert_eq!(applied(&app).await, 3, "only the events after the snapshot");
    let after = served(&app, &orders).await;
    assert_eq!(&after[..orders.len()], &before[..orders.len()]);
    for pet in &pets {
        let view = app.get_json(&format!("/petstore-domain/pets/{pet}")).await;
        assert_eq!(view["id"], pet.as_str(), "{view}");
    }
    let before = served(&app, &orders).await;
    let head = until_snapshot_at_head(&database).await;
    app.stop().await;

    // A snapshot of another format, one past the log's head, or one whose views do not decode
    // is dropped: the views are rebuilt from the whole log, the same as before.
    for damage in [
        "UPDATE read_model_snapshot SET format = format + 1",
        "UPDATE read_model_snapshot SET global_position = global_position + 1000",
        "UPDATE read_model_snapshot_orders SET view = '{\"order_id\": 7}'",
    ] {
        sqlx::query(damage)
            .execute(pool(&database))
            .await
            .expect("damage");
        let app = TestApp::start(settings.clone()).await;
        app.wait_until_ready().await;
        assert_eq!(applied(&app).await, head as u64, "rebuilt after: {damage}");
        assert_eq!(served(&app, &orders).await, before, "after: {damage}");
        assert_eq!(until_snapshot_at_head(&database).await, head);
        app.stop().await;
    }
    database.close().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_rebuilds_the_embedded_snapshot() {
    let storage = Storage::new(Engine::Embedded).await;
    let settings = storage.settings();
    let database = storage.database().await;
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let orders = place_orders(&app).await;
    let head = until_snapshot_at_head(&database).await;
    let before = served(&app, &orders).await;
    app.stop().await;

    // A view that decodes but is wrong: a start serves the snapshot as it is...
    let order_id = &orders[0];
    sqlx::query(
        "UPDATE read_model_snapshot_orders SET view = json_set(view, '$.status', 'lost')
          WHERE order_id = $1",
    )
    .bind(order_id)
    .execute(pool(&database))
    .await
    .expect("damage");
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let status = app
        .get_json(&format!("/petstore-domain/orders/{order_id}/status"))
        .await;
    assert_eq!(
        status["status"], "lost",
        "the snapshot is what a start loads"
    );
    assert_eq!(applied(&app).await, 0);
    app.stop().await;

    // ...a dry run writes nothing, and a rebuild from the log repairs it.
    let dry = rebuild::rebuild_read_models(&database, 7, true, &mut |_| {})
        .await
        .expect("dry run");
    assert_eq!((dry.events, dry.applied), (head as u64, 0));
    let damaged: String =
        sqlx::query_scalar("SELECT view FROM read_model_snapshot_orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(pool(&database))
            .await
            .expect("view");
    assert!(damaged.contains("\"lost\""), "{damaged}");
    let report = rebuild::rebuild_read_models(&database, 7, false, &mut |_| {})
        .await
        .expect("rebuild");
    assert_eq!((report.events, report.applied), (head as u64, head as u64));
    assert_eq!(snapshot_position(&database).await, Some(head));

    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    assert_eq!(applied(&app).await, 0, "nothing after the rebuilt snapshot");
    assert_eq!(served(&app, &orders).await, before);
    app.stop().await;
    database.close().await;
    storage.remove().await;
}
