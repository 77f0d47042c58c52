//! The seed's "Feature Flags in Action" against the real binary, and the configuration folder
//! watched: an edit saved the way editors save (write a new file, rename it over the old
//! one) changes the running service and is recorded as a change by `file`; an edit that does
//! not validate changes nothing.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

async fn config(client: &reqwest::Client, service: &common::Service) -> Value {
    client
        .get(service.url("/petstore-domain/admin/config"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json")
}

/// Saves `text` as `path` the way editors do: a new file renamed over the old one.
fn save_by_rename(path: &std::path::Path, text: &str) {
    let temporary = path.with_extension("yaml.swp");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flag_demo_works_and_file_edits_apply_live() {
    let data = tempfile::tempdir().expect("temp dir");
    let folder = tempfile::tempdir().expect("config dir");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    for name in ["base.yaml", "local.yaml"] {
        std::fs::copy(format!("{shipped}/{name}"), folder.path().join(name)).expect("copy");
    }
    let service = common::Service::start(&[
        ("PETSTORE_CONFIG_DIR", folder.path().display().to_string()),
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data.path().display().to_string(),
        ),
    ])
    .await;
    let client = reqwest::Client::new();

    // `curl http://localhost:8080/petstore-domain/admin/config` (demo mode: no token).
    let before = config(&client, &service).await;
    assert_eq!(before["version"], 0);
    assert_eq!(
        before["settings"]["feature_flags"]["pet_personalization"],
        false
    );
    // The seed's PUT, as written.
    let response = client
        .put(service.url("/petstore-domain/admin/config"))
        .header("Content-Type", "application/json")
        .body(r#"{"feature_flags":{"pet_personalization":true}}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    let after: Value = response.json().await.expect("json");
    assert_eq!(after["version"], 1);
    assert_eq!(
        after["settings"]["feature_flags"]["pet_personalization"],
        true
    );

    // An editor saves local.yaml with a live key changed.
    let local = folder.path().join("local.yaml");
    let original = std::fs::read_to_string(&local).expect("read");
    save_by_rename(
        &local,
        &format!("{original}\nfeature_flags:\n  premium_filters: false\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let edited = loop {
        let current = config(&client, &service).await;
        if current["version"] == 2 {
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "the edit was not applied: {current}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        edited["settings"]["feature_flags"]["premium_filters"],
        false
    );
    assert_eq!(
        edited["settings"]["feature_flags"]["pet_personalization"], true,
        "the API's change stays"
    );
    assert_eq!(edited["updated_by"], "file");
    let history: Value = client
        .get(service.url("/petstore-domain/admin/config/history"))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert_eq!(history["changes"][0]["source"], "file");
    assert_eq!(
        history["changes"][0]["changes"],
        json!([{"key": "feature_flags.premium_filters", "old": true, "new": false}])
    );

    // An edit that does not validate is refused, loudly, and changes nothing.
    save_by_rename(
        &local,
        &format!("{original}\nfeature_flags:\n  premium_filterz: false\n"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !service
        .lines()
        .iter()
        .any(|line| line.contains("the edited configuration is refused"))
    {
        assert!(Instant::now() < deadline, "the bad edit was not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unchanged = config(&client, &service).await;
    assert_eq!(unchanged["version"], 2);

    // A restart keeps every change (the file's last valid edit included).
    save_by_rename(
        &local,
        &format!("{original}\nfeature_flags:\n  premium_filters: false\n"),
    );
    assert!(service.stop().await.success());
    let service = common::Service::start(&[
        ("PETSTORE_CONFIG_DIR", folder.path().display().to_string()),
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data.path().display().to_string(),
        ),
    ])
    .await;
    let restarted = config(&client, &service).await;
    assert_eq!(restarted["version"], 2, "{restarted}");
    assert_eq!(
        restarted["settings"]["feature_flags"]["pet_personalization"],
        true
    );
    assert!(service.stop().await.success());
}
