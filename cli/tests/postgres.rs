//! The real binary on Postgres: `DATABASE_URL` selects it, `migrate` builds the schema,
//! `replay --dry-run` reads without writing.

use crate::common;

use std::process::Output;

use crate::common::FreshDatabase;

fn petstore(database_url: &str, args: &[&str]) -> Output {
    common::petstore_command(&[
        ("DATABASE_URL", database_url.to_owned()),
        ("PETSTORE__LOG__FORMAT", "text".to_owned()),
    ])
    .args(args)
    .output()
    .expect("the binary runs")
}

#[tokio::test]
async fn database_url_selects_postgres_for_migrate_and_replay() {
    let database = FreshDatabase::create().await;

    // A dry run changes nothing, not even the schema: on an empty database it fails.
    let dry = petstore(
        &database.url,
        &["replay", "--projection", "all", "--dry-run"],
    );
    assert!(!dry.status.success(), "nothing to read yet");
    assert!(
        database.tables().await.is_empty(),
        "the dry run wrote nothing"
    );

    let migrate = petstore(&database.url, &["migrate"]);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let tables = database.tables().await;
    for table in [
        "events",
        "snapshots",
        "stream_checkpoints",
        "order_status_view",
    ] {
        assert!(
            tables.iter().any(|name| name == table),
            "{table} in {tables:?}"
        );
    }

    let dry = petstore(
        &database.url,
        &["replay", "--projection", "read_models", "--dry-run"],
    );
    let stderr = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{stderr}");
    assert!(stderr.contains("read_models: 0 events read"), "{stderr}");
    let dry = petstore(
        &database.url,
        &["replay", "--projection", "all", "--dry-run"],
    );
    let stderr = String::from_utf8_lossy(&dry.stderr);
    assert!(dry.status.success(), "{stderr}");
    assert!(
        stderr.contains("read_models: 0 events read, 0 applied"),
        "{stderr}"
    );
    assert!(stderr.contains("dry run"), "{stderr}");
    assert!(stderr.contains("redis: skipped"), "{stderr}");
    database.drop().await;
}
