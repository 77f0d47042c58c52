//! The built binary as a new user runs it: from an empty folder, with nothing configured (no
//! config folder, no variables), it serves the README's demo lines; a named environment
//! without its file still stops the start.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// `petstore` in `folder` with nothing configured: no `PETSTORE_*`, no `DATABASE_URL`,
/// `REDIS_URL`, `KAFKA_BROKERS`, `RUST_LOG` or `OTEL_*` from the test's own environment.
fn bare(folder: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_petstore"));
    command.current_dir(folder);
    for (name, _) in std::env::vars() {
        if name.starts_with("PETSTORE")
            || name.starts_with("OTEL_")
            || ["DATABASE_URL", "REDIS_URL", "KAFKA_BROKERS", "RUST_LOG"].contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command
}

async fn login(client: &reqwest::Client, base: &str, username: &str) -> String {
    // As the README's curl -d sends it.
    let answer: Value = client
        .post(format!("{base}/auth/login"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(json!({"username": username, "password": username}).to_string())
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    answer["token"]
        .as_str()
        .unwrap_or_else(|| panic!("a token for {username}: {answer}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_readme_demo_from_an_empty_folder() {
    let folder = tempfile::tempdir().expect("temp dir");
    let service = common::Service::start_command(bare(folder.path())).await;
    let client = reqwest::Client::new();
    let base = service.base.clone();
    let token = login(&client, &base, "demo").await;
    let placed = client
        .post(format!("{base}/petstore-domain/orders"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Idempotency-Key", "demo-order-1")
        .json(
            &json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001",
                      "special_instructions": "Include training guide"}),
        )
        .send()
        .await
        .expect("answered");
    assert_eq!(placed.status(), 202);
    let location = placed.headers()["location"]
        .to_str()
        .expect("a location")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let view: Value = client
            .get(format!("{base}{location}"))
            .header("Authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("answered")
            .json()
            .await
            .expect("json");
        if view["status"] == "completed" || view["status"] == "cancelled" {
            break view;
        }
        assert!(Instant::now() < deadline, "the order never ended: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["status"], "completed", "{status}");
    let admin = login(&client, &base, "admin").await;
    let trail = client
        .get(format!("{base}/petstore-domain/admin/audit/security"))
        .header("Authorization", format!("Bearer {admin}"))
        .send()
        .await
        .expect("answered");
    assert_eq!(trail.status(), 200);
    // The store and the generated token secret live in ./data of the folder it ran in.
    let data = folder.path().join("data");
    assert!(data.join("petstore.db").is_file());
    let secret = std::fs::read_to_string(data.join("jwt-secret")).expect("the kept secret");
    assert_eq!(secret.trim().len(), 64);
    assert!(
        service
            .lines()
            .iter()
            .all(|line| !line.contains(secret.trim())),
        "the secret is in no log line"
    );
    assert!(service.stop().await.success());

    // Started again in the same folder: the same secret, so the token still works.
    let again = common::Service::start_command(bare(folder.path())).await;
    let still = client
        .get(again.url(&location))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("answered");
    assert_eq!(still.status(), 200, "a token outlives a restart");
    assert!(again.stop().await.success());

    // Another folder makes another secret: the token is refused there.
    let other = tempfile::tempdir().expect("temp dir");
    let elsewhere = common::Service::start_command(bare(other.path())).await;
    let refused = client
        .get(elsewhere.url("/petstore-domain/admin/audit/security"))
        .header("Authorization", format!("Bearer {admin}"))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 401);
    assert!(elsewhere.stop().await.success());
}

#[test]
fn a_named_environment_without_its_file_stops_the_start_naming_it() {
    let folder = tempfile::tempdir().expect("temp dir");
    let output = bare(folder.path())
        .env("PETSTORE_ENV", "staging")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("staging") && stderr.contains("PETSTORE_CONFIG_DIR"),
        "{stderr}"
    );
    assert!(!folder.path().join("data").exists(), "nothing was written");

    let missing = bare(folder.path())
        .args(["--config-dir", "no-such-folder", "config", "check"])
        .output()
        .expect("the binary runs");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-folder"));
}

#[test]
fn config_check_names_the_layer_of_every_key() {
    let folder = tempfile::tempdir().expect("temp dir");
    let output = bare(folder.path())
        .env("PETSTORE__HTTP__LISTEN", "127.0.0.1:9000")
        .args(["config", "check"])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = |key: &str| {
        stdout
            .lines()
            .find(|line| line.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key} is listed:\n{stdout}"))
            .to_owned()
    };
    assert!(row("http.listen").contains("environment variable PETSTORE__HTTP__LISTEN"));
    assert!(row("kafka.topic_prefix").contains("compiled default"));
    assert!(row("security.users").contains("built-in local settings"));
    assert!(row("security.jwt.secret").contains("data/jwt-secret"));
    assert!(stdout.contains("configuration folder: none"));
    assert!(!stdout.contains("$argon2"), "no password hash");
    assert!(
        !folder.path().join("data").exists(),
        "a check writes nothing"
    );

    let shipped = bare(folder.path())
        .args([
            "--config-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../config"),
        ])
        .args(["config", "check"])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&shipped.stdout);
    assert!(shipped.status.success());
    let listen = stdout
        .lines()
        .find(|line| line.starts_with("http.listen"))
        .expect("listed");
    assert!(listen.contains("config/base.yaml"), "{listen}");
    let users = stdout
        .lines()
        .find(|line| line.starts_with("security.users"))
        .expect("listed");
    assert!(users.contains("config/local.yaml"), "{users}");
}
