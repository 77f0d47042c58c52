//! Circuit breakers as users see them: the seed's demo (orders with
//! `X-Simulate-Failure: payment-service` open the payment breaker, visible in `/admin/config`
//! and `/metrics`; later orders are not sent to the gateway but wait for its cool-down and
//! complete once it recovers), `POST /payments` behind an open breaker (503 with
//! `Retry-After`, the order keeps waiting), a step whose deadline passes while its breaker is
//! open (cancelled and compensated, nothing charged), and the admin routes' refusals.

use petstore_settings::{RoleName, Settings};
use petstore_tests::{assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

/// A payment breaker that opens after 4 calls at half failures, stays open 1.5 s and
/// closes after one good probe; one attempt per call, so each failing order is one failure.
fn small_payment_breaker(settings: &mut Settings) {
    let payment = &mut settings.resilience.payment;
    payment.max_attempts = 1;
    payment.breaker.minimum_calls = 4;
    payment.breaker.open_ms = 1_500;
    payment.breaker.half_open_calls = 1;
    settings.saga.deadline_poll_interval_ms = 50;
}

async fn payment_breaker(app: &TestApp) -> Value {
    let config = app.get_json("/petstore-domain/admin/config").await;
    config["circuit_breakers"]["payment"].clone()
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics").await.text().await.expect("metrics")
}

async fn set_mode(app: &TestApp, dependency: &str, mode: &str) -> reqwest::Response {
    app.client
        .put(app.url(&format!(
            "/petstore-domain/admin/circuit-breakers/{dependency}"
        )))
        .json(&json!({ "mode": mode }))
        .send()
        .await
        .expect("answered")
}

async fn simulated_payment_failures_open_the_breaker_and_it_recovers(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    small_payment_breaker(&mut settings);
    let app = TestApp::start(settings).await;
    assert_eq!(payment_breaker(&app).await["state"], "closed");

    for _ in 0..4 {
        let order = app
            .post_order("golden-retriever-001", Some("payment-service"))
            .await;
        let view = app.wait_for_terminal(&order).await;
        assert_eq!(view["cancellation_reason"], "payment-failed", "{view}");
    }
    let breaker = payment_breaker(&app).await;
    assert_eq!(breaker["state"], "open", "{breaker}");
    assert_eq!(breaker["mode"], "automatic");
    assert!(breaker["retry_after_ms"].as_u64().is_some(), "{breaker}");
    let text = metrics(&app).await;
    assert!(
        text.contains(r#"petstore_circuit_breaker_state{dependency="payment"} 2"#),
        "{text}"
    );
    let calls_before = provider_calls(&text);

    // An order placed now is not sent to the gateway: it waits for the cool-down, then its
    // payment is the probe that closes the breaker.
    let order = app.post_order("labrador-001", None).await;
    let view = app.wait_for_terminal(&order).await;
    assert_eq!(view["status"], "completed", "{view}");
    let text = metrics(&app).await;
    assert!(
        text.contains(
            r#"petstore_resilience_rejections_total{dependency="payment",reason="breaker_open"}"#
        ),
        "the order's first try was refused without a call: {text}"
    );
    assert_eq!(
        provider_calls(&text),
        calls_before + 1,
        "one call: the probe"
    );
    assert!(
        text.contains(r#"petstore_circuit_breaker_state{dependency="payment"} 0"#),
        "{text}"
    );
    assert_eq!(payment_breaker(&app).await["state"], "closed");
    app.stop().await;
    storage.remove().await;
}

/// Calls made to the payment gateway, whatever their result.
fn provider_calls(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("petstore_provider_calls_total{provider=\"payment\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn a_step_whose_deadline_passes_behind_an_open_breaker_is_compensated(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    small_payment_breaker(&mut settings);
    settings.saga.payment_timeout_ms = 1_000;
    let app = TestApp::start(settings).await;
    assert_eq!(set_mode(&app, "payment", "forced_open").await.status(), 200);
    let order = app.post_order("beagle-001", None).await;
    let view = app.wait_for_terminal(&order).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["cancellation_reason"], "step-timed-out", "{view}");
    let pet = app.get_json("/petstore-domain/pets/beagle-001").await;
    assert_eq!(pet["availability"], "available", "released: {pet}");
    assert_eq!(provider_calls(&metrics(&app).await), 0, "nothing charged");
    app.stop().await;
    storage.remove().await;
}

on_both_engines!(
    simulated_payment_failures_open_the_breaker_and_it_recovers,
    a_step_whose_deadline_passes_behind_an_open_breaker_is_compensated,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_behind_an_open_breaker_is_503_with_retry_after_and_the_order_waits() {
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(storage.settings()).await;
    let changed = app
        .client
        .put(app.url("/petstore-domain/admin/config"))
        .json(&json!({"feature_flags": {"express_order_processing": false}}))
        .send()
        .await
        .expect("answered");
    assert_eq!(changed.status(), 200);
    let order = app.post_order("corgi-001", None).await;
    app.wait_for_order(&order, |view| view["status"] == "reserved")
        .await;

    let forced = set_mode(&app, "payment", "forced_open").await;
    assert_eq!(forced.status(), 200);
    let forced: Value = forced.json().await.expect("json");
    assert_eq!(forced["state"], "open");
    assert_eq!(forced["mode"], "forced_open");
    let pay = || {
        app.client
            .post(app.url("/petstore-domain/payments"))
            .json(&json!({ "order_id": order }))
            .send()
    };
    let refused = pay().await.expect("answered");
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    let problem = assert_problem(refused, 503).await;
    assert!(
        problem["type"]
            .as_str()
            .expect("a type")
            .ends_with("dependency-unavailable"),
        "{problem}"
    );
    let view = app
        .get_json(&format!("/petstore-domain/orders/{order}/status"))
        .await;
    assert_eq!(view["status"], "reserved", "still waits: {view}");

    assert_eq!(set_mode(&app, "payment", "automatic").await.status(), 200);
    assert_eq!(pay().await.expect("answered").status(), 200);
    let view = app.wait_for_terminal(&order).await;
    assert_eq!(view["status"], "completed", "{view}");
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_routes_and_settings_refuse_what_they_cannot_do() {
    let storage = Storage::new(Engine::Embedded).await;
    let settings = storage.settings();
    let app = TestApp::start(settings).await;
    let breakers = app
        .get_json("/petstore-domain/admin/circuit-breakers")
        .await;
    assert_eq!(breakers["payment"]["state"], "closed", "{breakers}");
    assert_eq!(breakers["delivery"]["max_concurrent"], 100, "{breakers}");

    let problem = assert_problem(set_mode(&app, "dns", "forced_open").await, 404).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("payment"),
        "{problem}"
    );
    assert_problem(set_mode(&app, "payment", "sideways").await, 422).await;
    let not_json = app
        .client
        .put(app.url("/petstore-domain/admin/circuit-breakers/payment"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("answered");
    assert_problem(not_json, 400).await;
    let customer = app.client_as("customer-001", RoleName::Customer);
    let forbidden = customer
        .put(app.url("/petstore-domain/admin/circuit-breakers/payment"))
        .json(&json!({"mode": "forced_open"}))
        .send()
        .await
        .expect("answered");
    assert_problem(forbidden, 403).await;
    let anonymous = app
        .anonymous
        .put(app.url("/petstore-domain/admin/circuit-breakers/payment"))
        .json(&json!({"mode": "forced_open"}))
        .send()
        .await
        .expect("answered");
    assert_problem(anonymous, 401).await;
    assert_eq!(
        app.get_json("/petstore-domain/admin/circuit-breakers")
            .await["payment"]["mode"],
        "automatic",
        "nothing refused changed anything"
    );

    // The policies are live settings, validated as a whole.
    let invalid = app
        .client
        .put(app.url("/petstore-domain/admin/config"))
        .json(&json!({"resilience": {"payment": {"breaker": {"failure_rate": 0}}}}))
        .send()
        .await
        .expect("answered");
    let problem = assert_problem(invalid, 422).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("resilience.payment.breaker.failure_rate"),
        "{problem}"
    );
    let changed = app
        .client
        .put(app.url("/petstore-domain/admin/config"))
        .json(&json!({"resilience": {"payment": {"bulkhead": {"max_concurrent": 7}}}}))
        .send()
        .await
        .expect("answered");
    assert_eq!(changed.status(), 200);
    let config: Value = changed.json().await.expect("json");
    assert_eq!(
        config["settings"]["resilience"]["payment"]["bulkhead"]["max_concurrent"],
        7
    );
    assert_eq!(
        config["circuit_breakers"]["payment"]["max_concurrent"], 7,
        "{config}"
    );
    app.stop().await;
    storage.remove().await;
}
