//! `petstore dead-letters`: the real binary serves the embedded store while a poison event
//! (an unknown type, inserted into the log directly) is set aside; the CLI lists it, a retry
//! fails again with the error (the type is still unknown), a skip discards it, and what it
//! cannot do is refused with a non-zero exit.

use crate::common;

use std::process::{Command, Output};

use serde_json::{json, Value};
use sqlx::Connection;

fn petstore(data_dir: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petstore"))
        .args(["dead-letters"])
        .args(args)
        .args(["--data-dir", data_dir])
        .env_remove("DATABASE_URL")
        .env_remove("PETSTORE_CONFIG_DIR")
        .env("PETSTORE__SECURITY__AUTHENTICATION_REQUIRED", "false")
        .output()
        .expect("the binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_retries_and_skips_dead_letters() {
    let data = tempfile::tempdir().expect("temp dir");
    let dir = data.path().to_str().expect("utf-8 path").to_owned();
    let service = common::Service::start(&[("PETSTORE__STORAGE__DATA_DIR", dir.clone())]).await;
    let order_id = uuid::Uuid::new_v4().to_string();
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{dir}/petstore.db"))
        .await
        .expect("the store");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Order', ?1, 1, 'OrderTeleported', '1.0', ?2, ?3)",
    )
    .bind(&order_id)
    .bind(json!({"OrderTeleported": {"to": "mars"}}).to_string())
    .bind(json!({"correlation_id": "poison", "timestamp": chrono::Utc::now().to_rfc3339()}).to_string())
    .execute(&mut connection)
    .await
    .expect("inserted");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let saga = loop {
        let listed = petstore(&dir, &["list", "--format", "json"]);
        assert!(listed.status.success(), "{}", text(&listed));
        let letters: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("JSON");
        if let Some(letter) = letters.iter().find(|letter| letter["consumer"] == "saga") {
            break letter.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never set aside: {letters:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(saga["order_id"], order_id.as_str());
    assert_eq!(saga["status"], "pending");
    let id = saga["id"].as_i64().expect("id").to_string();

    let table = petstore(&dir, &["list", "--status", "pending"]);
    assert!(table.status.success());
    assert!(text(&table).contains("OrderTeleported"), "{}", text(&table));

    // Still unknown: the running saga runner takes the retry and it fails again.
    let retried = petstore(&dir, &["retry", &id, "--wait", "20"]);
    assert!(!retried.status.success(), "{}", text(&retried));
    assert!(
        text(&retried).contains("failed again") && text(&retried).contains("OrderTeleported"),
        "{}",
        text(&retried)
    );

    let skipped = petstore(&dir, &["skip", &id]);
    assert!(skipped.status.success(), "{}", text(&skipped));
    assert!(text(&skipped).contains("skipped"));
    let again = petstore(&dir, &["skip", &id]);
    assert!(!again.status.success());
    assert!(text(&again).contains("skipped already"), "{}", text(&again));
    let unknown = petstore(&dir, &["retry", "999999"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("no dead letter 999999"),
        "{}",
        text(&unknown)
    );
    let bad = petstore(&dir, &["list", "--status", "lost"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("--status"), "{}", text(&bad));
    connection.close().await.expect("closed");
    service.stop().await;
}
