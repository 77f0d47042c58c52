//! An order is readable on its own routes from the moment `POST /orders` accepts it: its
//! status (the 202's `Location`), its live updates and its audit trail, without the
//! `X-Consistency-Token`, on Postgres and distributed (a query-only process reading Postgres
//! views and Redis). A read that reaches the order before the projection does waits for it,
//! bounded; an id the event store does not hold is 404 at once.

use std::collections::BTreeSet;
use std::time::Duration;

use petstore_cli::Role;
use petstore_settings::{FlagSetting, RoleName, Settings};
use petstore_tests::{
    assert_problem, on_both_engines, redis_url, unique_name, with_kafka, with_redis, Engine,
    Storage, TestApp,
};
use serde_json::{json, Value};

const ORDERS: usize = 200;
const LANES: usize = 4;

fn settings(storage: &Storage) -> Settings {
    let mut settings = storage.settings();
    settings.feature_flags.real_time_order_updates = FlagSetting::On;
    settings
}

/// Places `ORDERS` orders as customer-001 through `command`, in `LANES` lanes of one order
/// after another, each followed at once by a GET of the 202's `Location`, an SSE
/// subscription and the audit trail at `query`. Returns every answer that was not a 200.
async fn place_and_read_at_once(command: &TestApp, query: &TestApp) -> Vec<String> {
    let token = command.token("customer-001", RoleName::Customer);
    let client = reqwest::Client::new();
    let lanes = (0..LANES).map(|lane| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let mut failures = Vec::new();
            for index in 0..ORDERS / LANES {
                let pet = if index % 2 == 0 {
                    "golden-retriever-001"
                } else {
                    "persian-cat-001"
                };
                let placed = client
                    .post(command.url("/petstore-domain/orders"))
                    .bearer_auth(&token)
                    .json(&json!({"pet_id": pet}))
                    .send()
                    .await
                    .expect("POST is answered");
                assert_eq!(placed.status(), 202, "lane {lane}, order {index}");
                let location = placed.headers()["location"]
                    .to_str()
                    .expect("a location")
                    .to_owned();
                let accepted: Value = placed.json().await.expect("json");
                let order_id = accepted["order_id"].as_str().expect("an id").to_owned();
                let status = client
                    .get(query.url(&location))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("GET is answered");
                if status.status() != 200 {
                    failures.push(format!("{location}: {}", status.status()));
                }
                let mut updates = client
                    .get(query.url(&format!("/petstore-domain/orders/{order_id}/updates")))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("the subscription is answered");
                if updates.status() == 200 {
                    // Its first event is the order's current status.
                    let first = tokio::time::timeout(Duration::from_secs(10), updates.chunk())
                        .await
                        .expect("a first event within 10 s")
                        .expect("a body chunk")
                        .expect("not the end");
                    let text = String::from_utf8_lossy(&first);
                    assert!(text.contains("event: status"), "{text}");
                } else {
                    failures.push(format!("updates of {order_id}: {}", updates.status()));
                }
                let audit = client
                    .get(query.url(&format!("/petstore-domain/orders/{order_id}/audit")))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("GET is answered");
                if audit.status() != 200 {
                    failures.push(format!("audit of {order_id}: {}", audit.status()));
                }
            }
            failures
        }
    });
    futures::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Ids the event store does not hold: 404 on every route, without waiting.
async fn unknown_orders_are_404(query: &TestApp) {
    for _ in 0..20 {
        let order_id = uuid::Uuid::now_v7();
        for path in [
            format!("/petstore-domain/orders/{order_id}/status"),
            format!("/petstore-domain/orders/{order_id}/updates"),
            format!("/petstore-domain/orders/{order_id}/audit"),
        ] {
            assert_problem(query.get(&path).await, 404).await;
        }
    }
}

on_both_engines!(an_accepted_order_is_never_404);

async fn an_accepted_order_is_never_404(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(settings(&storage)).await;
    app.wait_until_ready().await;
    let failures = place_and_read_at_once(&app, &app).await;
    assert!(
        failures.is_empty(),
        "{} not 200: {failures:#?}",
        failures.len()
    );
    unknown_orders_are_404(&app).await;
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_an_accepted_order_is_never_404_at_a_query_only_process() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = settings(&storage);
    with_kafka(&mut settings);
    with_redis(
        &mut settings,
        &redis_url(),
        &unique_name("read-after-accept"),
    );
    let workers: BTreeSet<Role> = [Role::Command, Role::Projector, Role::Saga].into();
    let command = TestApp::start_with_roles(settings.clone(), &workers).await;
    command.wait_until_ready().await;
    let query = TestApp::start_with_roles(settings, &[Role::Query].into()).await;
    query.wait_until_ready().await;
    let failures = place_and_read_at_once(&command, &query).await;
    assert!(
        failures.is_empty(),
        "{} not 200: {failures:#?}",
        failures.len()
    );
    unknown_orders_are_404(&query).await;
    query.stop().await;
    command.stop().await;
    storage.remove().await;
}
