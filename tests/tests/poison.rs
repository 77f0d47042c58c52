//! Poison events, on both engines: events inserted into the log directly that no consumer can
//! read (an unknown type on a completed order, an `OrderCreated` of a version no release
//! wrote) are set aside as dead letters by the saga and the read models, which move on: an
//! order placed afterwards completes. The dead letters show in `/admin/dead-letters`,
//! `/health`, the metrics and the affected order's status; after the stored event is fixed a
//! retry completes the order; a skip discards a dead letter.

use std::time::{Duration, Instant};

use petstore_event_store::database::Database;
use petstore_tests::{assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

on_both_engines!(poison_events_are_set_aside_and_can_be_retried_or_skipped);

pub(crate) async fn insert_event(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
    (event_type, version): (&str, &str),
    payload: &Value,
) {
    let metadata = json!({
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "causation_id": "poison",
        "subject": "admin",
        "command_id": uuid::Uuid::new_v4().to_string(),
        "timestamp": chrono::Utc::now().to_rfc3339(),
    })
    .to_string();
    let payload = payload.to_string();
    let sql = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
               VALUES ($1, $2, $3, $4, $5, $6, $7)";
    match database {
        Database::Postgres(pool) => {
            sqlx::query(&sql.replace("$6, $7", "$6::jsonb, $7::jsonb"))
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(sequence)
                .bind(event_type)
                .bind(version)
                .bind(&payload)
                .bind(&metadata)
                .execute(pool)
                .await
                .expect("inserted");
        }
        Database::Sqlite(pool) => {
            sqlx::query(sql)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(sequence)
                .bind(event_type)
                .bind(version)
                .bind(&payload)
                .bind(&metadata)
                .execute(pool)
                .await
                .expect("inserted");
        }
    }
}

async fn dead_letters(app: &TestApp, query: &str) -> Vec<Value> {
    app.get_json(&format!("/petstore-domain/admin/dead-letters{query}"))
        .await["dead_letters"]
        .as_array()
        .expect("dead letters")
        .clone()
}

/// Polls until `accept` holds for the dead letters, or 30 s pass.
async fn wait_for_letters(app: &TestApp, accept: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let letters = dead_letters(app, "").await;
        if accept(&letters) {
            return letters;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters stuck at {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn act(app: &TestApp, id: i64, action: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!(
            "/petstore-domain/admin/dead-letters/{id}/{action}"
        )))
        .send()
        .await
        .expect("answered")
}

async fn poison_events_are_set_aside_and_can_be_retried_or_skipped(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    let first = app.place_order("golden-retriever-001").await;
    let completed = first["order_id"].as_str().expect("id").to_owned();
    assert_eq!(
        app.wait_for_terminal(&completed).await["status"],
        "completed"
    );
    let database = storage.database().await;

    // An event type nobody knows, on the completed order's payment.
    insert_event(
        &database,
        "Payment",
        &completed,
        2,
        ("PaymentTeleported", "1.0"),
        &json!({"PaymentTeleported": {"to": "mars"}}),
    )
    .await;
    // A new order's OrderCreated in a version no release wrote.
    let created: Value = {
        let trail = app
            .get_json(&format!("/petstore-domain/orders/{completed}/audit"))
            .await;
        trail["events"][0]["payload"].clone()
    };
    let poisoned = uuid::Uuid::new_v4().to_string();
    let mut payload = created.clone();
    payload["OrderCreated"]["order_id"] = json!(poisoned);
    payload["OrderCreated"]["pet_id"] = json!("beagle-001");
    insert_event(
        &database,
        "Order",
        &poisoned,
        1,
        ("OrderCreated", "9.0"),
        &payload,
    )
    .await;

    // The stream moves on: an order placed after the poison completes.
    let later = app.place_order("labrador-001").await;
    let later = later["order_id"].as_str().expect("id").to_owned();
    assert_eq!(app.wait_for_terminal(&later).await["status"], "completed");

    // Each consumer set each poison aside: the saga and the read models, twice.
    let letters = wait_for_letters(&app, |letters| letters.len() >= 4).await;
    for consumer in ["saga", "read_models"] {
        for event_type in ["PaymentTeleported", "OrderCreated"] {
            assert!(
                letters.iter().any(|letter| letter["consumer"] == consumer
                    && letter["event_type"] == event_type
                    && letter["status"] == "pending"),
                "{consumer} {event_type}: {letters:?}"
            );
        }
    }
    let teleported = letters
        .iter()
        .find(|letter| letter["event_type"] == "PaymentTeleported" && letter["consumer"] == "saga")
        .expect("letter");
    assert!(
        teleported["error"]
            .as_str()
            .expect("error")
            .contains("PaymentTeleported"),
        "{teleported}"
    );
    // The affected order says it needs attention; health and metrics count the letters.
    let status = app
        .wait_for_json(
            &format!("/petstore-domain/orders/{completed}/status"),
            |view| {
                view["attention"]
                    .as_array()
                    .is_some_and(|items| items.len() == 2)
            },
        )
        .await;
    assert_eq!(
        status["attention"][0]["event"], "PaymentTeleported 1.0",
        "{status}"
    );
    let health = app.get_json("/petstore-domain/health").await;
    assert_eq!(
        health["components"]["dead_letters"]["status"], "down",
        "{health}"
    );
    assert_eq!(health["status"], "degraded", "{health}");
    app.wait_for_text("/metrics", |text| {
        text.contains(r#"petstore_dead_letters{consumer="saga"} 2"#)
    })
    .await;

    // Discard the ones about the unknown type.
    for letter in letters
        .iter()
        .filter(|letter| letter["event_type"] == "PaymentTeleported")
    {
        let id = letter["id"].as_i64().expect("id");
        let skipped: Value = act(&app, id, "skip").await.json().await.expect("json");
        assert_eq!(skipped["status"], "skipped");
        assert_problem(act(&app, id, "retry").await, 409).await;
    }
    let status = app
        .get_json(&format!("/petstore-domain/orders/{completed}/status"))
        .await;
    // The gate trusts its answer for a second; the order's own letters are gone at once.
    assert!(status.get("attention").is_none(), "{status}");

    // Fix the stored event (as a migration of the data would), then retry both letters: the
    // read model shows the order and the saga completes it.
    let fix = "UPDATE events SET event_version = '1.0' WHERE aggregate_id = $1 AND sequence = 1";
    let fixed = match &database {
        Database::Postgres(pool) => sqlx::query(fix)
            .bind(&poisoned)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
        Database::Sqlite(pool) => sqlx::query(fix)
            .bind(&poisoned)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
    };
    assert_eq!(fixed.expect("fixed"), 1);
    for letter in letters
        .iter()
        .filter(|letter| letter["event_type"] == "OrderCreated")
    {
        let id = letter["id"].as_i64().expect("id");
        let retrying: Value = act(&app, id, "retry").await.json().await.expect("json");
        assert_eq!(retrying["status"], "retrying");
    }
    wait_for_letters(&app, |letters| {
        letters
            .iter()
            .filter(|letter| letter["event_type"] == "OrderCreated")
            .all(|letter| letter["status"] == "resolved")
    })
    .await;
    let view = app.wait_for_terminal(&poisoned).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert!(view.get("attention").is_none(), "{view}");

    // The refusals of the routes.
    assert_problem(act(&app, 999_999, "retry").await, 404).await;
    assert_problem(act(&app, 999_999, "skip").await, 404).await;
    assert_problem(
        app.get("/petstore-domain/admin/dead-letters?status=lost")
            .await,
        422,
    )
    .await;
    assert_problem(
        app.get("/petstore-domain/admin/dead-letters?limit=0").await,
        400,
    )
    .await;
    assert_problem(
        app.anonymous
            .get(app.url("/petstore-domain/admin/dead-letters"))
            .send()
            .await
            .expect("answered"),
        401,
    )
    .await;
    let health = app.get_json("/petstore-domain/health").await;
    assert_eq!(
        health["components"]["dead_letters"]["status"], "up",
        "{health}"
    );
    app.stop().await;
    database.close().await;
    storage.remove().await;
}
