//! `petstore providers serve` as the README runs it: the service pointed at it over HTTP
//! completes an order, charging and booking through it once; bad arguments and provider URLs
//! are refused at start-up.

use serde_json::{json, Value};

use crate::common::{self, Providers, Service};

#[tokio::test]
async fn the_service_calls_the_simulated_providers_over_http() {
    let providers = Providers::start(0);
    let base = providers.base.clone();
    let data = tempfile::tempdir().expect("a data dir");
    let service = Service::start(&[
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data.path().display().to_string(),
        ),
        ("PETSTORE__PROVIDERS__PAYMENT__URL", base.clone()),
        ("PETSTORE__PROVIDERS__DELIVERY__URL", base.clone()),
    ])
    .await;
    let client = reqwest::Client::new();
    let accepted: Value = client
        .post(service.url("/petstore-domain/orders"))
        .json(&json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let order_id = accepted["order_id"].as_str().expect("order id");
    let view = service.wait_for_terminal(order_id).await;
    assert_eq!(view["status"], "completed", "{view}");
    let effects: Value = client
        .get(format!("{base}/effects"))
        .send()
        .await
        .expect("effects")
        .json()
        .await
        .expect("json");
    assert_eq!(
        effects,
        json!({"charges": 1, "refunds": 0, "deliveries": 1, "cancellations": 0})
    );
    assert!(service.stop().await.success());
}

#[test]
fn bad_arguments_and_provider_urls_are_refused_naming_them() {
    let refused = common::petstore_command(&[])
        .args(["providers", "serve", "--failure-rate", "2"])
        .output()
        .expect("the binary runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--failure-rate"), "{stderr}");

    let data = tempfile::tempdir().expect("a data dir");
    let refused = common::petstore_command(&[
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data.path().display().to_string(),
        ),
        (
            "PETSTORE__PROVIDERS__DELIVERY__URL",
            "ftp://127.0.0.1/".to_owned(),
        ),
    ])
    .args(["serve", "--listen", "127.0.0.1:0"])
    .output()
    .expect("the binary runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("providers.delivery.url"), "{stderr}");
}
