//! Saga partitions: P is fixed when the event store is initialised, and a start with another
//! is refused naming both, on either engine.

use std::process::Output;

use crate::common::{self, FreshDatabase, Service};

/// `petstore serve` with `env` and P = `partitions`, run until it exits (a refused start
/// exits at once).
fn refused_start(env: &[(&str, String)], partitions: u32) -> Output {
    let mut env = env.to_vec();
    env.push(("PETSTORE__SAGA__PARTITIONS", partitions.to_string()));
    common::petstore_command(&env)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("the binary runs")
}

async fn a_store_keeps_the_partitions_it_was_initialised_with(env: Vec<(&str, String)>) {
    let mut first = env.clone();
    first.push(("PETSTORE__SAGA__PARTITIONS", "8".to_owned()));
    let service = Service::start(&first).await;
    assert!(service.stop().await.success());

    for other in [4, 16] {
        let refused = refused_start(&env, other);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "P = {other} must be refused");
        assert!(
            stderr.contains("saga.partitions = 8")
                && stderr.contains(&format!("configured with {other}")),
            "names both: {stderr}"
        );
    }

    // The same P starts again.
    let service = Service::start(&first).await;
    assert!(service.stop().await.success());
}

#[tokio::test]
async fn postgres_refuses_a_start_with_other_partitions_naming_both() {
    let database = FreshDatabase::create().await;
    a_store_keeps_the_partitions_it_was_initialised_with(vec![(
        "DATABASE_URL",
        database.url.clone(),
    )])
    .await;
    database.drop().await;
}

#[tokio::test]
async fn the_embedded_store_refuses_a_start_with_other_partitions_naming_both() {
    let data = tempfile::tempdir().expect("a data dir");
    a_store_keeps_the_partitions_it_was_initialised_with(vec![(
        "PETSTORE__STORAGE__DATA_DIR",
        data.path().display().to_string(),
    )])
    .await;
}

#[test]
fn partitions_out_of_range_are_refused_by_the_settings() {
    for (value, key) in [("0", "saga.partitions"), ("1025", "saga.partitions")] {
        let refused = refused_start(&[], value.parse().expect("a number"));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "P = {value}");
        assert!(stderr.contains(key), "{value}: {stderr}");
    }
    let mut env = vec![("PETSTORE__KAFKA__PARTITIONS", "3".to_owned())];
    env.push(("PETSTORE__SAGA__PARTITIONS", "16".to_owned()));
    let refused = common::petstore_command(&env)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("kafka.partitions") && stderr.contains("saga.partitions (16)"),
        "{stderr}"
    );
}
