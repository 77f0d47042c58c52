//! The seed's "Security Patterns Demo" against the real binary with the shipped config
//! (`config/local.yaml`'s users): log in as the seed does, use the token, meet the rate limit,
//! and find neither a password nor a token in any log line.

use crate::common;

use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_security_demo_works_as_written_and_logs_no_secret() {
    let data = tempfile::tempdir().expect("temp dir");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    let service = common::Service::start(&[
        ("PETSTORE_CONFIG_DIR", config.to_owned()),
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data.path().display().to_string(),
        ),
        (
            "PETSTORE__SECURITY__AUTHENTICATION_REQUIRED",
            "true".to_owned(),
        ),
        (
            "PETSTORE__SECURITY__RATE_LIMITS__ENABLED",
            "true".to_owned(),
        ),
    ])
    .await;
    let client = reqwest::Client::new();
    // `curl -X POST .../auth/login -d '{"username":"demo","password":"demo"}'`: curl -d sends
    // application/x-www-form-urlencoded.
    let login = |username: &str, password: &str| {
        client
            .post(service.url("/auth/login"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(json!({"username": username, "password": password}).to_string())
            .send()
    };
    let demo: Value = login("demo", "demo")
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let token = demo["token"].as_str().expect("a token").to_owned();
    assert_eq!(demo["token_type"], "Bearer");
    assert!(demo["expires_in"]
        .as_u64()
        .is_some_and(|seconds| seconds > 0));
    let refused = login("demo", "not-the-password-4711")
        .await
        .expect("answered");
    assert_eq!(refused.status(), 401);

    // The seed's order body works with the demo user's token (subject customer-001).
    let placed = client
        .post(service.url("/petstore-domain/orders"))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(placed.status(), 202);
    assert_eq!(placed.headers()["cache-control"], "no-store");
    assert_eq!(placed.headers()["x-content-type-options"], "nosniff");
    let without = client
        .post(service.url("/petstore-domain/orders"))
        .json(&json!({"customer_id": "customer-001", "pet_id": "beagle-001"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(without.status(), 401);

    // The admin reads the security trail; the demo customer may not.
    let admin: Value = login("admin", "admin")
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    let admin_token = admin["token"].as_str().expect("a token").to_owned();
    let trail = |token: &str| {
        client
            .get(service.url("/petstore-domain/admin/audit/security"))
            .header("Authorization", format!("Bearer {token}"))
            .send()
    };
    assert_eq!(trail(&token).await.expect("answered").status(), 403);
    let page: Value = trail(&admin_token)
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert!(page["entries"]
        .as_array()
        .is_some_and(|entries| !entries.is_empty()));

    // `for i in {1..150}; do curl .../pets/browse; done` meets 429s (100 a minute per address).
    let mut statuses = Vec::new();
    for _ in 0..150 {
        let response = client
            .get(service.url("/petstore-domain/pets/browse"))
            .send()
            .await
            .expect("answered");
        statuses.push(response.status().as_u16());
    }
    let limited = statuses.iter().filter(|status| **status == 429).count();
    assert!(limited >= 20, "{limited} of 150 were 429: {statuses:?}");
    assert!(statuses[..90].iter().all(|status| *status == 200));

    let lines = service.lines();
    service.stop().await;

    // `petstore audit --security` reads the same trail from the store.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_petstore"))
        .args(["audit", "--security", "--kind", "login", "--format", "json"])
        .args(["--data-dir", &data.path().display().to_string()])
        .env("PETSTORE_CONFIG_DIR", config)
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let entries: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON entries");
    let outcomes: Vec<(&str, &str)> = entries
        .iter()
        .map(|entry| {
            (
                entry["subject"].as_str().unwrap_or_default(),
                entry["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for expected in [
        ("customer-001", "success"),
        ("demo", "failure"),
        ("admin", "success"),
    ] {
        assert!(outcomes.contains(&expected), "{expected:?} in {outcomes:?}");
    }
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_petstore"))
        .args([
            "audit",
            "--security",
            "--data-dir",
            &data.path().display().to_string(),
        ])
        .env("PETSTORE_CONFIG_DIR", config)
        .output()
        .expect("the binary runs");
    assert!(String::from_utf8_lossy(&table.stdout).contains("token_rejected"));
    for secret in [
        "not-the-password-4711",
        token.as_str(),
        admin_token.as_str(),
    ] {
        assert!(
            !lines.iter().any(|line| line.contains(secret)),
            "a log line holds a secret"
        );
    }
    assert!(
        lines.iter().any(|line| line.contains("security event")),
        "security events are logged"
    );
}
