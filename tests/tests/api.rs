//! The HTTP API, black-box, against the real service on port 0, on both engines.

use petstore_tests::{assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

on_both_engines!(
    health_reports_every_component,
    browse_filters_and_pages_the_demo_catalog,
    browse_rejects_bad_filters,
    pet_details_and_their_unhappy_paths,
    an_order_is_accepted_tracked_and_carries_the_correlation_id,
    an_idempotency_key_makes_a_retry_return_the_same_order,
    bad_orders_are_clear_problems_and_write_nothing,
    order_status_unhappy_paths,
    unknown_routes_and_methods_are_problems,
    the_openapi_document_describes_every_route,
    legacy_aliases_answer_like_the_new_routes,
);

async fn spawn(engine: Engine) -> (Storage, TestApp) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    (storage, app)
}

async fn finish(storage: Storage, app: TestApp) {
    app.stop().await;
    storage.remove().await;
}

async fn health_reports_every_component(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let response = app.get("/petstore-domain/health").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-correlation-id"));
    let health: Value = response.json().await.expect("json");
    assert_eq!(health["status"], "up");
    let expected_store = if engine == Engine::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(health["components"]["event_store"]["kind"], expected_store);
    assert_eq!(health["components"]["read_models"]["status"], "up");
    assert_eq!(
        health["components"]["projection:read_models"]["status"],
        "up"
    );
    for path in [
        "/petstore-domain/health/live",
        "/petstore-domain/health/ready",
        "/health",
        "/health/live",
    ] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    finish(storage, app).await;
}

async fn browse_filters_and_pages_the_demo_catalog(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let dogs: Value = app
        .get("/petstore-domain/pets/browse?category=dog")
        .await
        .json()
        .await
        .expect("json");
    let pets = dogs["pets"].as_array().expect("pets");
    assert!(pets.len() >= 3);
    assert!(pets.iter().all(|pet| pet["category"] == "dog"));
    assert!(pets.iter().any(|pet| pet["id"] == "golden-retriever-001"));
    assert_eq!(dogs["count"], pets.len());

    let all: Value = app
        .get("/petstore-domain/pets/browse?limit=100")
        .await
        .json()
        .await
        .expect("json");
    let all = all["pets"].as_array().expect("pets").clone();
    assert!(all.len() >= 12, "the demo catalog has at least 12 pets");
    for category in ["dog", "cat", "bird", "fish"] {
        assert!(
            all.iter().any(|pet| pet["category"] == category),
            "{category}"
        );
    }

    let cheap: Value = app
        .get("/petstore-domain/pets/browse?min_price=2000&max_price=10000")
        .await
        .json()
        .await
        .expect("json");
    let cheap = cheap["pets"].as_array().expect("pets");
    assert!(!cheap.is_empty());
    assert!(cheap.iter().all(|pet| {
        let price = pet["price"]["amount_minor"]
            .as_i64()
            .expect("integer minor units");
        (2000..=10000).contains(&price)
    }));

    // Paging with a cursor walks the whole catalog once, in id order.
    let mut walked = Vec::new();
    let mut path = "/petstore-domain/pets/browse?limit=5".to_owned();
    loop {
        let page: Value = app.get(&path).await.json().await.expect("json");
        let pets = page["pets"].as_array().expect("pets");
        assert!(pets.len() <= 5);
        walked.extend(
            pets.iter()
                .map(|pet| pet["id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/petstore-domain/pets/browse?limit=5&cursor={cursor}"),
            None => break,
        }
    }
    let ids: Vec<String> = all
        .iter()
        .map(|pet| pet["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(walked, ids);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    finish(storage, app).await;
}

async fn browse_rejects_bad_filters(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    for query in [
        "category=dragon",
        "min_price=abc",
        "min_price=-1",
        "limit=0",
        "limit=101",
        "availability=maybe",
        "cursor=Not%20A%20Cursor",
        "colour=red",
    ] {
        let problem = assert_problem(
            app.get(&format!("/petstore-domain/pets/browse?{query}"))
                .await,
            422,
        )
        .await;
        assert_eq!(
            problem["instance"], "/petstore-domain/pets/browse",
            "{query}"
        );
    }
    // An empty price range is a valid filter that no pet matches.
    let empty = app
        .get_json("/petstore-domain/pets/browse?min_price=10&max_price=5")
        .await;
    assert_eq!(empty["count"], 0, "{empty}");
    finish(storage, app).await;
}

async fn pet_details_and_their_unhappy_paths(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let pet: Value = app
        .get("/petstore-domain/pets/golden-retriever-001")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(pet["id"], "golden-retriever-001");
    assert_eq!(pet["category"], "dog");
    assert_eq!(pet["availability"], "available");
    assert!(pet["price"]["amount_minor"].is_i64());
    assert_problem(app.get("/petstore-domain/pets/no-such-pet").await, 404).await;
    assert_problem(app.get("/petstore-domain/pets/Bad%20Id").await, 400).await;
    finish(storage, app).await;
}

async fn an_order_is_accepted_tracked_and_carries_the_correlation_id(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let response = app
        .client
        .post(app.url("/petstore-domain/orders"))
        .header("X-Correlation-ID", "demo-correlation-42")
        .json(&json!({
            "customer_id": "customer-001",
            "pet_id": "golden-retriever-001",
            "special_instructions": "Please include vaccination records"
        }))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.headers()["x-correlation-id"],
        "demo-correlation-42"
    );
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let accepted: Value = response.json().await.expect("json");
    let order_id = accepted["order_id"].as_str().expect("order id").to_owned();
    assert_eq!(accepted["status"], "pending");
    assert_eq!(accepted["correlation_id"], "demo-correlation-42");
    assert_eq!(
        location,
        format!("/petstore-domain/orders/{order_id}/status")
    );

    let view = app.wait_for_order(&order_id, |_| true).await;
    assert_eq!(view["order_id"], order_id);
    assert_eq!(view["customer_id"], "customer-001");
    assert_eq!(view["pet_id"], "golden-retriever-001");
    assert_eq!(
        view["amount"],
        json!({"amount_minor": 120000, "currency": "USD"})
    );
    assert_eq!(
        view["special_instructions"],
        "Please include vaccination records"
    );
    assert_eq!(
        view["correlation_id"], "demo-correlation-42",
        "the event metadata carries it"
    );
    let status = view["status"].as_str().expect("status");
    assert!(status.chars().all(|c| c.is_ascii_lowercase()), "{status}");
    finish(storage, app).await;
}

async fn an_idempotency_key_makes_a_retry_return_the_same_order(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let body = json!({"customer_id": "customer-7", "pet_id": "persian-cat-001"});
    let post = |key: &'static str, body: Value| {
        let request = app
            .client
            .post(app.url("/petstore-domain/orders"))
            .header("Idempotency-Key", key)
            .json(&body);
        async move { request.send().await.expect("answered") }
    };
    let first: Value = post("key-1", body.clone())
        .await
        .json()
        .await
        .expect("json");
    let retry = post("key-1", body.clone()).await;
    assert_eq!(retry.status(), 202);
    let retry: Value = retry.json().await.expect("json");
    assert_eq!(retry["order_id"], first["order_id"]);
    assert_eq!(
        retry["correlation_id"], first["correlation_id"],
        "the id the order's events carry"
    );
    let other: Value = post("key-2", body.clone())
        .await
        .json()
        .await
        .expect("json");
    assert_ne!(other["order_id"], first["order_id"]);
    assert_eq!(
        storage.count_events("OrderCreated").await,
        2,
        "the retry placed no second order"
    );

    let reused = post(
        "key-1",
        json!({"customer_id": "customer-7", "pet_id": "betta-001"}),
    )
    .await;
    let problem = assert_problem(reused, 422).await;
    assert!(problem["detail"]
        .as_str()
        .expect("detail")
        .contains("Idempotency-Key"));
    finish(storage, app).await;
}

async fn bad_orders_are_clear_problems_and_write_nothing(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let url = app.url("/petstore-domain/orders");
    let send = |body: String, content_type: &'static str| {
        let request = app
            .client
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        async move { request.send().await.expect("answered") }
    };
    let good = r#"{"customer_id":"c","pet_id":"golden-retriever-001"}"#;

    let malformed = assert_problem(
        send("{\"customer_id\":".into(), "application/json").await,
        400,
    )
    .await;
    assert_eq!(malformed["instance"], "/petstore-domain/orders");
    assert_problem(send(good.into(), "text/plain").await, 415).await;
    assert_problem(
        send(
            format!("{{\"customer_id\":\"{}\"}}", "x".repeat(100_000)),
            "application/json",
        )
        .await,
        413,
    )
    .await;
    let unknown_pet = assert_problem(
        send(
            r#"{"customer_id":"c","pet_id":"unicorn-001"}"#.into(),
            "application/json",
        )
        .await,
        404,
    )
    .await;
    assert!(unknown_pet["detail"]
        .as_str()
        .expect("detail")
        .contains("unicorn-001"));
    for body in [
        r#"{"customer_id":"c"}"#.to_owned(),
        r#"{"customer_id":"c","pet_id":"Golden Retriever"}"#.to_owned(),
        r#"{"customer_id":"","pet_id":"golden-retriever-001"}"#.to_owned(),
        r#"{"customer_id":"c","pet_id":"golden-retriever-001","colour":"red"}"#.to_owned(),
        r#"{"customer_id":"c","pet_id":"golden-retriever-001","special_instructions":42}"#
            .to_owned(),
        format!(
            r#"{{"customer_id":"c","pet_id":"golden-retriever-001","special_instructions":"{}"}}"#,
            "x".repeat(501)
        ),
        "[]".to_owned(),
    ] {
        assert_problem(send(body.clone(), "application/json").await, 422).await;
    }
    let bad_key = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .header("Idempotency-Key", "")
        .body(good)
        .send()
        .await
        .expect("answered");
    assert_problem(bad_key, 400).await;
    let bad_correlation = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .header("X-Correlation-ID", "has spaces and ümlauts")
        .body(good)
        .send()
        .await
        .expect("answered");
    assert_problem(bad_correlation, 400).await;
    assert_eq!(
        storage.count_events("OrderCreated").await,
        0,
        "no refused request wrote an event"
    );
    finish(storage, app).await;
}

async fn order_status_unhappy_paths(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    assert_problem(
        app.get("/petstore-domain/orders/not-a-uuid/status").await,
        400,
    )
    .await;
    let unknown = assert_problem(
        app.get("/petstore-domain/orders/6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90/status")
            .await,
        404,
    )
    .await;
    assert!(unknown["detail"]
        .as_str()
        .expect("detail")
        .contains("6f1e0b6c"));
    finish(storage, app).await;
}

async fn unknown_routes_and_methods_are_problems(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    assert_problem(app.get("/petstore-domain/nothing-here").await, 404).await;
    let wrong_method = app
        .client
        .delete(app.url("/petstore-domain/orders"))
        .send()
        .await
        .expect("answered");
    assert!(wrong_method.headers().contains_key("allow"));
    assert_problem(wrong_method, 405).await;
    finish(storage, app).await;
}

async fn the_openapi_document_describes_every_route(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let document: Value = app
        .get("/petstore-domain/openapi.json")
        .await
        .json()
        .await
        .expect("json");
    assert!(document["openapi"]
        .as_str()
        .expect("version")
        .starts_with("3.1"));
    for (path, method) in [
        ("/petstore-domain/orders", "post"),
        ("/petstore-domain/create-order", "post"),
        ("/petstore-domain/orders/{order_id}/status", "get"),
        ("/petstore-domain/pets/browse", "get"),
        ("/petstore-domain/browse-pets", "get"),
        ("/petstore-domain/pets/{pet_id}", "get"),
        ("/petstore-domain/health", "get"),
        ("/petstore-domain/health/live", "get"),
        ("/petstore-domain/health/ready", "get"),
        ("/petstore-domain/payments", "post"),
        ("/petstore-domain/process-payment", "post"),
        ("/petstore-domain/orders/{order_id}/audit", "get"),
        ("/petstore-domain/openapi.json", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    let schemas = &document["components"]["schemas"];
    for schema in [
        "PlaceOrderBody",
        "OrderAccepted",
        "OrderStatusView",
        "PetView",
        "ProblemDocument",
    ] {
        assert!(schemas[schema].is_object(), "{schema} missing");
    }
    let problem = &document["paths"]["/petstore-domain/orders"]["post"]["responses"]["422"];
    assert!(problem["content"]["application/problem+json"].is_object());
    finish(storage, app).await;
}

async fn legacy_aliases_answer_like_the_new_routes(engine: Engine) {
    let (storage, app) = spawn(engine).await;
    let new: Value = app
        .get("/petstore-domain/pets/browse?category=cat")
        .await
        .json()
        .await
        .expect("json");
    let legacy: Value = app
        .get("/petstore-domain/browse-pets?category=cat")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(new, legacy);
    let accepted = app
        .post_json(
            "/petstore-domain/create-order",
            &json!({"customer_id": "customer-001", "pet_id": "budgie-001"}),
        )
        .await;
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.expect("json");
    app.wait_for_order(accepted["order_id"].as_str().expect("id"), |_| true)
        .await;
    finish(storage, app).await;
}

/// An order placed on the embedded default is still there after the server restarts, and
/// the in-memory read models are rebuilt from the event log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_orders_survive_a_restart() {
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(storage.settings()).await;
    let accepted = app.place_order("golden-retriever-001").await;
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    let before = app.wait_for_order(&order_id, |_| true).await;
    app.stop().await;

    let restarted = TestApp::start(storage.settings()).await;
    restarted.wait_until_ready().await;
    let after = restarted.wait_for_order(&order_id, |_| true).await;
    assert_eq!(after["order_id"], before["order_id"]);
    assert_eq!(after["correlation_id"], before["correlation_id"]);
    let catalog: Value = restarted
        .get("/petstore-domain/pets/browse?limit=100")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(catalog["count"], 14, "the demo catalog is not seeded twice");
    restarted.stop().await;
}

/// Postgres read models persist with their checkpoint: a restarted service serves them at
/// once and does not re-apply old events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_read_models_resume_from_their_checkpoint() {
    let storage = Storage::new(Engine::Postgres).await;
    let app = TestApp::start(storage.settings()).await;
    let accepted = app.place_order("corgi-001").await;
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    // OrderCompleted is the saga's last event: once the read model shows it, the projector
    // has applied every event there is.
    app.wait_for_terminal(&order_id).await;
    app.stop().await;

    let database = storage.postgres().expect("postgres");
    let mut connection = database.connect().await;
    let (checkpoint,): (i64,) =
        sqlx::query_as("SELECT global_position FROM stream_checkpoints WHERE name = 'read_models'")
            .fetch_one(&mut connection)
            .await
            .expect("the checkpoint was committed");
    let (last,): (i64,) = sqlx::query_as("SELECT max(global_position) FROM events")
        .fetch_one(&mut connection)
        .await
        .expect("events");
    assert_eq!(checkpoint, last);

    // Query-only process: no projector, no seeding; it serves what the projector stored.
    let query_only = TestApp::start_with_roles(
        storage.settings(),
        &[petstore_cli::Role::Query].into_iter().collect(),
    )
    .await;
    let view: Value = query_only
        .get(&format!("/petstore-domain/orders/{order_id}/status"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(view["pet_id"], "corgi-001");
    assert_eq!(
        query_only.get("/petstore-domain/orders").await.status(),
        404,
        "no command routes in a query-only process"
    );
    query_only.stop().await;
    storage.remove().await;
}

/// The event store breaks under a running service: health says so, commands fail with a
/// problem that leaks nothing internal, and the read side keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_event_store_is_reported_not_hidden() {
    let storage = Storage::new(Engine::Postgres).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    let mut connection = storage.postgres().expect("postgres").connect().await;
    sqlx::query("DROP TABLE events CASCADE")
        .execute(&mut connection)
        .await
        .expect("break it");

    let health = app.get("/petstore-domain/health").await;
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.expect("json");
    assert_eq!(health["components"]["event_store"]["status"], "down");
    assert_problem(app.get("/petstore-domain/health/ready").await, 503).await;

    let response = app
        .post_json(
            "/petstore-domain/orders",
            &json!({"customer_id": "c", "pet_id": "golden-retriever-001"}),
        )
        .await;
    let problem = assert_problem(response, 500).await;
    let detail = problem["detail"].as_str().expect("detail");
    assert!(
        !detail.contains("events") && !detail.contains("exist"),
        "no internals leak: {detail}"
    );

    let pet = app.get("/petstore-domain/pets/golden-retriever-001").await;
    assert_eq!(pet.status(), 200, "reads still served from the read model");
    app.stop().await;
    storage.remove().await;
}
