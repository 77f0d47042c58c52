//! The providers over HTTP: the HTTP adapters against `petstore providers serve`'s simulator
//! (on port 0, in-process), its protocol's unhappy paths, and whole sagas calling it: every
//! charge, refund, booking and cancellation asked for with one idempotency key, each made
//! once.

use std::collections::HashMap;
use std::time::Duration;

use petstore_cli::provider_simulator::{self, Behaviour, Call, Effects};
use petstore_domain::providers::{
    CancelRequest, ChargeRequest, DeliveryProvider, DeliveryRequest, PaymentGateway, ProviderError,
    RefundRequest,
};
use petstore_domain::{CustomerId, Money, OrderId, PetId};
use petstore_saga::providers::{HttpDeliveryProvider, HttpPaymentGateway};
use petstore_tests::{Engine, Storage, TestApp};
use serde_json::{json, Value};

/// The simulator on a port of its own; its base URL.
async fn simulator(behaviour: Behaviour) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, provider_simulator::router(behaviour))
            .await
            .expect("serve");
    });
    format!("http://{address}")
}

async fn effects(base: &str) -> Effects {
    reqwest::get(format!("{base}/effects"))
        .await
        .expect("effects")
        .json()
        .await
        .expect("json")
}

async fn calls(base: &str) -> Vec<Call> {
    let body: Value = reqwest::get(format!("{base}/calls"))
        .await
        .expect("calls")
        .json()
        .await
        .expect("json");
    serde_json::from_value(body["calls"].clone()).expect("calls")
}

/// A charge of one order (a repeated key must come with the same request).
fn charge(key: &str) -> ChargeRequest {
    ChargeRequest {
        order_id: OrderId::parse("0192f0c4-3b1e-7c6a-9d2e-5f8a1b3c4d5e").expect("order"),
        customer_id: CustomerId::parse("customer-001").expect("customer"),
        amount: Money::usd(12_500).expect("amount"),
        idempotency_key: key.to_owned(),
        simulate_failure: false,
    }
}

#[tokio::test]
async fn the_http_adapters_speak_the_protocol_and_a_repeated_key_is_one_effect() {
    let base = simulator(Behaviour::default()).await;
    let gateway = HttpPaymentGateway::new("providers.payment.url", &base, "test").expect("url");
    let first = gateway.charge(charge("charge-1")).await.expect("charged");
    let again = gateway.charge(charge("charge-1")).await.expect("replayed");
    assert_eq!(first, again, "a repeated key answers the first charge");
    let refund = |key: &str, reference: &str| RefundRequest {
        order_id: OrderId::random(),
        charge_reference: reference.to_owned(),
        amount: Money::usd(12_500).expect("amount"),
        idempotency_key: key.to_owned(),
    };
    let refunded = gateway
        .refund(refund("refund-1", &first.reference))
        .await
        .expect("refunded");
    assert_eq!(
        gateway
            .refund(refund("refund-1", &first.reference))
            .await
            .expect("replayed"),
        refunded
    );
    // Refunding more than is left, or an unknown charge, is a refusal (not retried).
    let over = gateway.refund(refund("refund-2", &first.reference)).await;
    assert!(matches!(over, Err(ProviderError::Refused(_))), "{over:?}");
    let unknown = gateway.refund(refund("refund-3", "ch_nope")).await;
    assert!(
        matches!(&unknown, Err(ProviderError::Refused(reason)) if reason.contains("404")),
        "{unknown:?}"
    );
    // The order's X-Simulate-Failure is forwarded: the gateway fails (retryable).
    let failing = gateway
        .charge(ChargeRequest {
            simulate_failure: true,
            ..charge("charge-2")
        })
        .await;
    assert!(
        matches!(failing, Err(ProviderError::Unavailable(_))),
        "{failing:?}"
    );

    let deliveries =
        HttpDeliveryProvider::new("providers.delivery.url", &base, "test").expect("url");
    let booking = |key: &str| DeliveryRequest {
        order_id: OrderId::random(),
        pet_id: PetId::parse("beagle-001").expect("pet"),
        customer_id: CustomerId::parse("customer-001").expect("customer"),
        idempotency_key: key.to_owned(),
        simulate_failure: false,
    };
    let booked = deliveries.book(booking("book-1")).await.expect("booked");
    assert!(booked.estimated_arrival > chrono::Utc::now());
    let cancel = |key: &str, reference: &str| CancelRequest {
        order_id: OrderId::random(),
        booking_reference: reference.to_owned(),
        idempotency_key: key.to_owned(),
    };
    deliveries
        .cancel(cancel("cancel-1", &booked.reference))
        .await
        .expect("cancelled");
    deliveries
        .cancel(cancel("cancel-1", &booked.reference))
        .await
        .expect("replayed");
    let unknown = deliveries.cancel(cancel("cancel-2", "dl_nope")).await;
    assert!(
        matches!(unknown, Err(ProviderError::Refused(_))),
        "{unknown:?}"
    );

    assert_eq!(
        effects(&base).await,
        Effects {
            charges: 1,
            refunds: 1,
            deliveries: 1,
            cancellations: 1
        }
    );
    let replayed = calls(&base)
        .await
        .iter()
        .filter(|call| call.replayed)
        .count();
    assert_eq!(
        replayed, 3,
        "the charge, the refund and the cancellation repeated"
    );

    // Nothing listening: unavailable (retried by the policy), not refused.
    let closed = HttpPaymentGateway::new("providers.payment.url", "http://127.0.0.1:9", "test")
        .expect("url")
        .charge(charge("charge-3"))
        .await;
    assert!(
        matches!(closed, Err(ProviderError::Unavailable(_))),
        "{closed:?}"
    );
    for url in ["ftp://127.0.0.1/", "127.0.0.1:4010", "http://"] {
        assert!(
            HttpPaymentGateway::new("providers.payment.url", url, "test").is_err(),
            "{url} accepted"
        );
    }
}

#[tokio::test]
async fn the_simulator_refuses_what_the_protocol_does_not_allow() {
    let base = simulator(Behaviour::default()).await;
    let client = reqwest::Client::new();
    let post = |path: &str, key: Option<&str>, body: &str, simulate: Option<&str>| {
        let mut request = client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(simulate) = simulate {
            request = request.header("X-Simulate-Failure", simulate);
        }
        async move {
            let response = request.send().await.expect("answered");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("a JSON body");
            (status, body)
        }
    };
    let charge =
        json!({"order_id": "o-1", "customer_id": "c-1", "amount_minor": 100, "currency": "USD"})
            .to_string();
    let (status, body) = post("/charges", None, &charge, None).await;
    assert_eq!(
        (status, body["error"].is_string()),
        (400, true),
        "no key: {body}"
    );
    let (status, _) = post("/charges", Some("k-1"), "{not json", None).await;
    assert_eq!(status, 400);
    let (status, body) = post(
        "/charges",
        Some("k-2"),
        &json!({"order_id": "o-1"}).to_string(),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post("/charges", Some("k-3"), &charge, Some("card-declined")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (402, Some("card_declined"))
    );
    // A refusal is kept for its key; a 5xx is not, so a retry can go through.
    let (status, _) = post("/charges", Some("k-3"), &charge, None).await;
    assert_eq!(status, 402, "the first answer again");
    let (status, _) = post("/charges", Some("k-4"), &charge, Some("payment-service")).await;
    assert_eq!(status, 503);
    let (status, body) = post("/charges", Some("k-4"), &charge, None).await;
    assert_eq!(status, 201, "{body}");
    let other =
        json!({"order_id": "o-2", "customer_id": "c-1", "amount_minor": 100, "currency": "USD"})
            .to_string();
    let (status, _) = post("/charges", Some("k-4"), &other, None).await;
    assert_eq!(status, 422, "a key reused with another request");
    let delivery = json!({"order_id": "o-1", "pet_id": "p-1", "customer_id": "c-1"}).to_string();
    let (status, body) = post(
        "/deliveries",
        Some("d-1"),
        &delivery,
        Some("delivery-refused"),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = post("/deliveries/dl_nope/cancel", Some("x-1"), "", None).await;
    assert_eq!(status, 404);
    assert_eq!(
        effects(&base).await,
        Effects {
            charges: 1,
            ..Effects::default()
        }
    );
    // Every call is recorded, in order.
    let statuses: Vec<u16> = calls(&base).await.iter().map(|call| call.status).collect();
    assert_eq!(statuses, [400, 400, 400, 402, 402, 503, 201, 422, 422, 404]);
}

/// Whole sagas calling the providers over HTTP: completed orders charged and booked once,
/// an order whose delivery fails refunded once, each effect asked for under one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_call_the_providers_over_http_once_per_effect() {
    let base = simulator(Behaviour {
        latency_ms: 5,
        failure_rate: 0.2,
    })
    .await;
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    settings.providers.payment.url = Some(base.clone());
    settings.providers.delivery.url = Some(format!("{base}/"));
    // A fifth of calls fail: enough attempts that no charge or booking fails for good
    // (0.2 to the 6th) unless asked to.
    settings.resilience.payment.max_attempts = 6;
    settings.resilience.delivery.max_attempts = 6;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let place = |pet: &'static str, simulate: Option<&'static str>| app.post_order(pet, simulate);
    let completed = [
        place("golden-retriever-001", None).await,
        place("labrador-001", None).await,
        place("corgi-001", None).await,
    ];
    let cancelled = place("beagle-001", Some("delivery-service")).await;
    for order in &completed {
        let view = app.wait_for_terminal(order).await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    let view = app.wait_for_terminal(&cancelled).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    // The refund is recorded once the gateway made it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while effects(&base).await.refunds == 0 {
        assert!(std::time::Instant::now() < deadline, "no refund made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        effects(&base).await,
        Effects {
            charges: 4,
            refunds: 1,
            deliveries: 3,
            cancellations: 0
        }
    );
    // Each effect was asked for under one key (retries of transient failures included):
    // per operation, as many keys answered with success as effects made.
    let mut succeeded: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for call in calls(&base).await {
        if (200..300).contains(&call.status) {
            succeeded
                .entry(call.operation)
                .or_default()
                .insert(call.idempotency_key);
        }
    }
    let count = |operation: &str| succeeded.get(operation).map_or(0, |keys| keys.len());
    assert_eq!(
        (count("charge"), count("refund"), count("delivery")),
        (4, 1, 3)
    );
    assert_eq!(storage.count_events("PaymentRefunded").await, 1);
    app.stop().await;
    storage.remove().await;
}
