//! The real binary on Postgres: `DATABASE_URL` selects it, `migrate` builds the schema,
//! `replay --dry-run` reads without writing.

use std::process::{Command, Output};

use sqlx::{Connection, PgConnection};

fn admin_url() -> String {
    std::env::var("PETSTORE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database of this test's own (the test script drops leftovers by this prefix).
struct FreshDatabase {
    name: String,
    url: String,
}

impl FreshDatabase {
    async fn create() -> Self {
        let admin = admin_url();
        let name = format!("petstore_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(&admin).await.expect("postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("create");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Self { name, url }
    }

    async fn tables(&self) -> Vec<String> {
        let mut connection = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .fetch_all(&mut connection)
        .await
        .expect("tables")
    }

    async fn drop(self) {
        let mut connection = PgConnection::connect(&admin_url()).await.expect("postgres");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut connection)
        .await
        .expect("drop");
    }
}

fn petstore(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petstore"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("REDIS_URL")
        .env_remove("KAFKA_BROKERS")
        .env("PETSTORE_CONFIG_DIR", "/nonexistent")
        .env("PETSTORE__LOG__FORMAT", "text")
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
