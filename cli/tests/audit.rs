//! `petstore audit`: the real binary prints an order's audit trail from the embedded store.

use std::process::Command;
use std::time::{Duration, Instant};

use petstore_cli::{Application, Role};
use petstore_settings::{LogFormat, Settings};
use serde_json::Value;

async fn completed_order(data_dir: &std::path::Path) -> (String, String) {
    let mut settings = Settings::default();
    settings.http.listen = ([127, 0, 0, 1], 0).into();
    settings.log.format = LogFormat::Text;
    settings.storage.data_dir = data_dir.to_path_buf();
    // The seed's demo mode: this test is about the audit command, not tokens.
    settings.security.authentication_required = false;
    settings.security.rate_limits.enabled = false;
    let application = Application::build(settings, &Role::all())
        .await
        .expect("starts");
    let base = format!("http://127.0.0.1:{}", application.port());
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    let client = reqwest::Client::new();
    let accepted: Value = client
        .post(format!("{base}/petstore-domain/orders"))
        .json(&serde_json::json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let order_id = accepted["order_id"].as_str().expect("id").to_owned();
    let correlation_id = accepted["correlation_id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value = client
            .get(format!("{base}/petstore-domain/orders/{order_id}/status"))
            .send()
            .await
            .expect("answered")
            .json()
            .await
            .unwrap_or(Value::Null);
        if status["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "order never completed: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.trigger();
    server.await.expect("joins").expect("stops cleanly");
    (order_id, correlation_id)
}

fn petstore(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_petstore"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PETSTORE_CONFIG_DIR")
        .env("PETSTORE__SECURITY__AUTHENTICATION_REQUIRED", "false")
        .output()
        .expect("the binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prints_the_trail_as_json_and_as_a_table() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (order_id, correlation_id) = completed_order(data_dir.path()).await;
    let dir = data_dir.path().to_str().expect("utf-8 path");

    let json = petstore(&[
        "audit",
        "--order",
        &order_id,
        "--format",
        "json",
        "--data-dir",
        dir,
    ]);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let trail: Value = serde_json::from_slice(&json.stdout).expect("JSON on stdout");
    assert_eq!(trail["correlation_id"], correlation_id.as_str());
    let types: Vec<&str> = trail["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(types.first(), Some(&"OrderCreated"));
    assert_eq!(types.last(), Some(&"OrderCompleted"));

    let by_correlation = petstore(&[
        "audit",
        "--correlation-id",
        &correlation_id,
        "--format",
        "json",
        "--data-dir",
        dir,
    ]);
    let same: Value = serde_json::from_slice(&by_correlation.stdout).expect("JSON on stdout");
    assert_eq!(same, trail);

    let table = petstore(&["audit", "--order", &order_id, "--data-dir", dir]);
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).expect("utf-8");
    assert!(
        text.contains("PaymentProcessed") && text.contains("DeliveryScheduled"),
        "{text}"
    );
    assert_eq!(text.matches("OrderCompleted").count(), 1);

    let unknown = petstore(&[
        "audit",
        "--order",
        "6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90",
        "--data-dir",
        dir,
    ]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("does not exist"));
    let malformed = petstore(&["audit", "--order", "nope", "--data-dir", dir]);
    assert!(!malformed.status.success());
    let neither = petstore(&["audit", "--data-dir", dir]);
    assert!(
        !neither.status.success(),
        "one of --order and --correlation-id is required"
    );
}
