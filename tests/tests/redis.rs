//! Redis read models and the browse cache (Postgres as the source), Redis failures, and
//! read-your-writes tokens.

use std::time::Duration;

use petstore_tests::{
    assert_problem, on_both_engines, redis_url, unique_name, with_redis, Engine, OwnRedis, Storage,
    TestApp,
};
use redis::AsyncCommands;
use serde_json::{json, Value};

async fn place(app: &TestApp, pet_id: &str) -> String {
    let accepted = app.place_order(pet_id).await;
    accepted["order_id"].as_str().expect("id").to_owned()
}

async fn redis_get(url: &str, key: &str) -> Option<String> {
    let client = redis::Client::open(url).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    connection.get(key).await.expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_status_is_served_from_redis_and_equals_the_database_view() {
    let storage = Storage::new(Engine::Postgres).await;
    let prefix = unique_name("redis");
    let mut settings = storage.settings();
    with_redis(&mut settings, &redis_url(), &prefix);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let order_id = place(&app, "golden-retriever-001").await;
    let served = app.wait_for_terminal(&order_id).await;
    assert_eq!(served["status"], "completed");

    // The Redis projection holds the same document the database does, once caught up.
    let key = format!("{prefix}:order:{order_id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let in_redis: Value = loop {
        if let Some(text) = redis_get(&redis_url(), &key).await {
            let view: Value = serde_json::from_str(&text).expect("json");
            if view["status"] == "completed" {
                break view;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The status came from Redis: the database projection may still be a little behind.
    let mut connection = storage.postgres().expect("postgres").connect().await;
    let in_postgres: Value = loop {
        let document: Option<Value> =
            sqlx::query_scalar("SELECT document FROM order_status_view WHERE order_id = $1::uuid")
                .bind(&order_id)
                .fetch_optional(&mut connection)
                .await
                .expect("query");
        if let Some(document) = document.filter(|view| view["status"] == "completed") {
            break document;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database projection never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(in_redis, in_postgres);
    let health = app.get_json("/petstore-domain/health").await;
    assert_eq!(health["status"], "up");
    assert_eq!(health["components"]["redis"]["status"], "up");
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_during_reads_falls_back_to_postgres_and_catches_up_when_back() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut redis = OwnRedis::start().await;
    let prefix = unique_name("redis");
    let mut settings = storage.settings();
    with_redis(&mut settings, &redis.url(), &prefix);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let first = place(&app, "labrador-001").await;
    app.wait_for_terminal(&first).await;

    redis.stop();
    let health = app.get("/petstore-domain/health").await;
    assert_eq!(health.status(), 200, "degraded, not down");
    let health: Value = health.json().await.expect("json");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["components"]["redis"]["status"], "down");
    assert_eq!(app.get("/petstore-domain/health/ready").await.status(), 200);

    // Reads stay correct, from Postgres (once its projection has caught up with what Redis
    // served); new orders still complete.
    assert_eq!(app.wait_for_terminal(&first).await["status"], "completed");
    let second = place(&app, "corgi-001").await;
    assert_eq!(app.wait_for_terminal(&second).await["status"], "completed");
    let dogs: Value = app
        .get("/petstore-domain/pets/browse?category=dog")
        .await
        .json()
        .await
        .expect("json");
    let corgi = dogs["pets"]
        .as_array()
        .expect("pets")
        .iter()
        .find(|pet| pet["id"] == "corgi-001")
        .cloned();
    assert_eq!(corgi.expect("listed")["availability"], "sold");

    // Redis comes back empty: its projection rebuilds from the log and serves again.
    redis.restart().await;
    let key = format!("{prefix}:order:{second}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while redis_get(&redis.url(), &key).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis projection never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_for_json("/petstore-domain/health", |health| health["status"] == "up")
        .await;
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_redis_never_breaks_the_service() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    with_redis(
        &mut settings,
        "redis://127.0.0.1:1/0",
        &unique_name("redis"),
    );
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let order_id = place(&app, "persian-cat-001").await;
    assert_eq!(
        app.wait_for_terminal(&order_id).await["status"],
        "completed"
    );
    let pet: Value = app
        .get("/petstore-domain/pets/persian-cat-001")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(pet["availability"], "sold");
    let health: Value = app
        .get("/petstore-domain/health")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["components"]["redis"]["status"], "down");
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_browse_pages_are_invalidated_by_pet_events() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    let prefix = unique_name("redis");
    with_redis(&mut settings, &redis_url(), &prefix);
    settings.redis.browse_ttl_seconds = 3_600; // only invalidation can refresh a page
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let cached_pages = || async {
        let client = redis::Client::open(redis_url()).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis answers");
        let keys: Vec<String> = connection
            .keys(format!("{prefix}:browse:*"))
            .await
            .expect("KEYS");
        keys.len()
    };
    let availability = |page: &Value| {
        page["pets"]
            .as_array()
            .expect("pets")
            .iter()
            .find(|pet| pet["id"] == "beagle-001")
            .map(|pet| pet["availability"].clone())
    };
    let page: Value = app
        .get("/petstore-domain/pets/browse?category=dog")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(availability(&page), Some(json!("available")));
    assert_eq!(cached_pages().await, 1, "the page is cached in Redis");
    let order_id = place(&app, "beagle-001").await;
    app.wait_for_terminal(&order_id).await;
    app.wait_for_json("/petstore-domain/pets/browse?category=dog", |page| {
        availability(page) == Some(json!("sold"))
    })
    .await;
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_database_behind_reads_come_from_redis_and_no_stale_page_is_cached() {
    let storage = Storage::new(Engine::Postgres).await;
    let prefix = unique_name("redis");
    let mut settings = storage.settings();
    with_redis(&mut settings, &redis_url(), &prefix);
    // Only invalidation could refresh a page.
    settings.redis.browse_ttl_seconds = 3_600;
    // Hold the database projection's lock: this service's read-model projector stays on
    // standby, so the database read model lags behind the Redis projection.
    let database = storage.database().await;
    let held = database
        .try_lock("projection:read_models")
        .await
        .expect("lock")
        .expect("granted");
    let app = TestApp::start(settings).await;
    app.wait_for_json("/petstore-domain/health", |health| {
        health["components"]["projection:redis"]["detail"] == "caught up"
    })
    .await;
    let page: Value = app
        .get("/petstore-domain/pets/browse?category=dog")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        page["pets"],
        json!([]),
        "the database read model is still empty"
    );
    // Pets and order status are served from Redis: the database has neither.
    let pet = app.get("/petstore-domain/pets/golden-retriever-001").await;
    assert_eq!(pet.status(), 200);
    let order_id = place(&app, "golden-retriever-001").await;
    assert_eq!(
        app.wait_for_terminal(&order_id).await["status"],
        "completed"
    );
    drop(held);
    // Once the database has caught up, the catalog shows, although no pet changed since.
    app.wait_for_json("/petstore-domain/pets/browse?category=dog", |page| {
        page["pets"].as_array().is_some_and(|pets| !pets.is_empty())
    })
    .await;
    app.stop().await;
    database.close().await;
    storage.remove().await;
}

on_both_engines!(a_consistency_token_reads_your_own_write);

async fn a_consistency_token_reads_your_own_write(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    // Generous: a loaded machine may take a while; the wait ends as soon as the write shows.
    settings.http.consistency_wait_ms = 20_000;
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    for _ in 0..5 {
        let response = app
            .post_json(
                "/petstore-domain/orders",
                &json!({"customer_id": "c", "pet_id": "clownfish-001"}),
            )
            .await;
        assert_eq!(response.status(), 202);
        let token = response.headers()["x-consistency-token"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let accepted: Value = response.json().await.expect("json");
        let order_id = accepted["order_id"].as_str().expect("id");
        let read = app
            .get_with_token(
                &format!("/petstore-domain/orders/{order_id}/status"),
                &token,
            )
            .await;
        assert_eq!(
            read.status(),
            200,
            "the write is visible at once with its token"
        );
        for pet_path in [
            "/petstore-domain/pets/clownfish-001",
            "/petstore-domain/pets/browse?category=fish",
        ] {
            let read = app.get_with_token(pet_path, &token).await;
            assert_eq!(read.status(), 200, "{pet_path}");
        }
    }
    let status_path = "/petstore-domain/orders/6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90/status";
    app.stop().await;
    settings.http.consistency_wait_ms = 300;
    let app = TestApp::start(settings).await;
    for path in [
        status_path,
        "/petstore-domain/pets/clownfish-001",
        "/petstore-domain/pets/browse",
    ] {
        let malformed = app.get_with_token(path, "yesterday").await;
        assert_problem(malformed, 400).await;
        let unreachable = app
            .get_with_token(path, "t9000000000000p9000000000000")
            .await;
        assert!(unreachable.headers().contains_key("retry-after"));
        assert_problem(unreachable, 409).await;
    }
    app.stop().await;
    storage.remove().await;
}

/// A new deployment (fresh store, the demo catalog just seeded) on a Redis prefix that still
/// holds another store's views never serves them: a process that only queries refuses to
/// start, naming the prefix and both stores; one that projects deletes them and rebuilds
/// from its own log; a restart keeps what is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_left_by_another_event_store_is_rebuilt_or_refused_never_served() {
    let prefix = unique_name("redis-foreign");
    let pet = "/petstore-domain/pets/golden-retriever-001";
    let pet_key = format!("{prefix}:pet:golden-retriever-001");

    // The old deployment sells the pet.
    let old = Storage::new(Engine::Postgres).await;
    let mut settings = old.settings();
    with_redis(&mut settings, &redis_url(), &prefix);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let order_id = place(&app, "golden-retriever-001").await;
    assert_eq!(
        app.wait_for_terminal(&order_id).await["status"],
        "completed"
    );
    app.wait_for_json(pet, |view| view["availability"] == "sold")
        .await;
    let old_store = old.database().await.store_id().await.expect("a store id");
    app.stop().await;
    assert_eq!(
        redis_get(&redis_url(), &format!("{prefix}:store")).await,
        Some(old_store.clone())
    );

    // The new one, on a fresh database and the same prefix.
    let new = Storage::new(Engine::Postgres).await;
    let new_store = new.database().await.store_id().await.expect("a store id");
    assert_ne!(new_store, old_store);
    let mut settings = new.settings();
    with_redis(&mut settings, &redis_url(), &prefix);
    let refused = petstore_cli::Application::build(
        settings.clone(),
        &std::collections::BTreeSet::from([petstore_cli::Role::Query]),
    )
    .await;
    let error = match refused {
        Ok(_) => panic!("a query-only process served another store's Redis views"),
        Err(error) => error.to_string(),
    };
    for part in [prefix.as_str(), old_store.as_str(), new_store.as_str()] {
        assert!(error.contains(part), "{part} in: {error}");
    }

    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    assert_eq!(app.get_json(pet).await["availability"], "available");
    assert_eq!(
        redis_get(&redis_url(), &format!("{prefix}:store")).await,
        Some(new_store.clone())
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rebuilt = redis_get(&redis_url(), &pet_key)
            .await
            .map(|text| serde_json::from_str::<Value>(&text).expect("json"));
        if rebuilt.is_some_and(|view| view["availability"] == "available" && view["version"] == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis was never rebuilt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old order is not this store's.
    assert_problem(
        app.get(&format!("/petstore-domain/orders/{order_id}/status"))
            .await,
        404,
    )
    .await;
    let order_id = place(&app, "persian-cat-001").await;
    app.wait_for_terminal(&order_id).await;
    app.stop().await;

    // Its own views survive a restart, and a query-only process now starts.
    let app = TestApp::start_with_roles(
        settings,
        &std::collections::BTreeSet::from([petstore_cli::Role::Query]),
    )
    .await;
    assert_eq!(
        app.get_json(&format!("/petstore-domain/orders/{order_id}/status"))
            .await["status"],
        "completed"
    );
    app.stop().await;
    old.remove().await;
    new.remove().await;
}

fn metric_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|line| line.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_redis_opens_its_breaker_reads_skip_it_and_it_closes_when_redis_is_back() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut redis = OwnRedis::start().await;
    let mut settings = storage.settings();
    with_redis(&mut settings, &redis.url(), &unique_name("redis"));
    let breaker = &mut settings.resilience.redis.breaker;
    breaker.minimum_calls = 5;
    breaker.window_ms = 1_000;
    breaker.open_ms = 300;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let order_id = place(&app, "labrador-001").await;
    app.wait_for_terminal(&order_id).await;
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_eq!(breakers["redis"]["state"], "closed", "{breakers}");

    // The calls that served the order leave the breaker's window.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    redis.stop();
    // Every read is answered (from the database) while Redis fails, then while its breaker
    // refuses to call it.
    for _ in 0..20 {
        let pet = app.get("/petstore-domain/pets/labrador-001").await;
        assert_eq!(pet.status(), 200);
        let pet: Value = pet.json().await.expect("json");
        assert_eq!(pet["availability"], "sold");
    }
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_ne!(breakers["redis"]["state"], "closed", "{breakers}");
    let metrics = app
        .get("/metrics")
        .await
        .text()
        .await
        .expect("metrics text");
    let refused = metric_line(
        &metrics,
        "petstore_resilience_rejections_total{dependency=\"redis\",reason=\"breaker_open\"}",
    );
    assert!(
        refused.is_some_and(|line| !line.ends_with(" 0")),
        "reads were refused by the open breaker: {refused:?}"
    );
    assert!(
        metrics.contains("petstore_circuit_breaker_state{dependency=\"redis\"}"),
        "{metrics}"
    );
    let fallbacks = metric_line(
        &metrics,
        "petstore_cache_reads_total{view=\"pet\",result=\"fallback\"}",
    );
    assert!(fallbacks.is_some(), "the reads fell back: {metrics}");

    // Back: the breaker probes after its cool-down and closes; Redis serves again.
    redis.restart().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _read = app.get("/petstore-domain/pets/labrador-001").await;
        let breakers = app
            .get_json("/petstore-domain/admin/circuit-breakers")
            .await;
        if breakers["redis"]["state"] == "closed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the redis breaker never closed: {breakers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.wait_for_json("/petstore-domain/health", |health| health["status"] == "up")
        .await;
    app.stop().await;
    storage.remove().await;
}
