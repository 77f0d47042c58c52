//! The database of one engine for one run: created (a fresh Postgres database on the
//! loopback interface, or the SQLite store in a temporary directory), prepared, described
//! for the report, and dropped.

use std::str::FromStr;

use anyhow::{bail, ensure, Context as _};
use petstore_event_store::database::Database;
use petstore_settings::{DatabaseSettings, StorageSettings};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

use crate::workload::{Statements, POSTGRES_STATEMENTS, SQLITE_STATEMENTS};
use crate::{Args, Engine};

/// Hosts the benchmark agrees to create and drop databases on.
const LOOPBACK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "::1"];

/// The per-append NOTIFY of migration 0001, which migration 0004 replaced by
/// [`EventStore::notify_appends`](petstore_event_store::store::EventStore::notify_appends).
const OLD_NOTIFY_TRIGGER: [&str; 2] = [
    "CREATE FUNCTION notify_events_appended() RETURNS trigger LANGUAGE plpgsql AS \
     $$ BEGIN PERFORM pg_notify('petstore_events', ''); RETURN NULL; END $$",
    "CREATE TRIGGER events_appended AFTER INSERT ON events FOR EACH STATEMENT \
     EXECUTE FUNCTION notify_events_appended()",
];

/// The database of one engine, created for this run.
pub(crate) struct BenchDatabase {
    pub(crate) engine: Engine,
    pub(crate) database: Database,
    /// Postgres: the admin URL and the name of the database to drop at the end.
    postgres: Option<(String, String)>,
    /// SQLite: the directory of the store, removed on drop.
    _sqlite_dir: Option<tempfile::TempDir>,
}

impl BenchDatabase {
    pub(crate) async fn create(
        engine: Engine,
        args: &Args,
        pool_size: u32,
    ) -> anyhow::Result<Self> {
        match engine {
            Engine::Postgres => {
                let name = format!(
                    "petstore_bench_{}",
                    &Uuid::new_v4().simple().to_string()[..12]
                );
                let admin_url = args.postgres_url.as_str();
                execute_as_admin(admin_url, &format!("CREATE DATABASE \"{name}\"")).await?;
                let settings = DatabaseSettings {
                    url: Some(SecretString::from(with_database(admin_url, &name)?)),
                    max_connections: pool_size,
                    migrate_on_start: true,
                };
                match Database::connect(&settings, &StorageSettings::default()).await {
                    Ok(database) => Ok(Self {
                        engine,
                        database,
                        postgres: Some((admin_url.to_owned(), name)),
                        _sqlite_dir: None,
                    }),
                    Err(error) => {
                        execute_as_admin(admin_url, &drop_database_statement(&name)).await?;
                        Err(error.into())
                    }
                }
            }
            Engine::Sqlite => {
                let directory = tempfile::Builder::new()
                    .prefix("petstore-bench-")
                    .tempdir()?;
                let storage = StorageSettings {
                    data_dir: directory.path().to_owned(),
                };
                let settings = DatabaseSettings {
                    url: None,
                    max_connections: pool_size,
                    migrate_on_start: true,
                };
                Ok(Self {
                    engine,
                    database: Database::connect(&settings, &storage).await?,
                    postgres: None,
                    _sqlite_dir: Some(directory),
                })
            }
        }
    }

    /// Migrates, applies `--ablate` and `--with-notify-trigger`, and creates the baseline
    /// table.
    pub(crate) async fn prepare(&self, args: &Args) -> anyhow::Result<()> {
        self.database.migrate().await?;
        let statements = self.statements();
        let mut script: Vec<&str> = Vec::new();
        for ablation in &args.ablate {
            let statements = ablation.statements(self.engine);
            anyhow::ensure!(
                !statements.is_empty(),
                "--ablate {} has nothing to drop on {:?}",
                ablation.name(),
                self.engine
            );
            script.extend(statements);
        }
        if args.with_notify_trigger && self.engine == Engine::Postgres {
            script.extend(OLD_NOTIFY_TRIGGER);
        }
        script.push(statements.create_baseline);
        for statement in script {
            match &self.database {
                Database::Postgres(pool) => sqlx::query(statement).execute(pool).await?,
                Database::Sqlite(pool) => {
                    sqlx::query(statement).execute(pool).await?;
                    continue;
                }
            };
        }
        Ok(())
    }

    pub(crate) fn statements(&self) -> &'static Statements {
        match self.engine {
            Engine::Postgres => &POSTGRES_STATEMENTS,
            Engine::Sqlite => &SQLITE_STATEMENTS,
        }
    }

    /// The engine's version, durability settings, pool and schema, for the report.
    pub(crate) async fn describe(&self) -> anyhow::Result<String> {
        const LATEST_MIGRATION: &str = "SELECT max(version) FROM _sqlx_migrations";
        let migration: Option<i64> = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query_scalar(LATEST_MIGRATION).fetch_one(pool).await?
            }
            Database::Sqlite(pool) => sqlx::query_scalar(LATEST_MIGRATION).fetch_one(pool).await?,
        };
        let schema = match migration {
            Some(version) => format!("schema at migration {version}"),
            None => "no migrations".to_owned(),
        };
        let engine = match &self.database {
            Database::Postgres(pool) => {
                let (version, synchronous_commit, fsync): (String, String, String) = sqlx::query_as(
                    "SELECT current_setting('server_version'), current_setting('synchronous_commit'), \
                     current_setting('fsync')",
                )
                .fetch_one(pool)
                .await?;
                format!(
                    "PostgreSQL {version} (synchronous_commit={synchronous_commit}, fsync={fsync}), \
                     pool of {} connections",
                    pool.options().get_max_connections()
                )
            }
            Database::Sqlite(pool) => {
                let (version,): (String,) = sqlx::query_as("SELECT sqlite_version()")
                    .fetch_one(pool)
                    .await?;
                format!(
                    "SQLite {version} (WAL, synchronous=NORMAL), pool of {} connections",
                    pool.options().get_max_connections()
                )
            }
        };
        Ok(format!("{engine}, {schema}"))
    }

    /// Writes out what earlier workloads left in the WAL, so that their checkpoint does not
    /// land in the next measurement.
    pub(crate) async fn settle(&self) -> anyhow::Result<()> {
        match &self.database {
            Database::Postgres(pool) => {
                sqlx::query("CHECKPOINT")
                    .execute(pool)
                    .await
                    .context("CHECKPOINT needs a superuser or the pg_checkpoint role")?;
            }
            Database::Sqlite(pool) => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Closes the pool and, on Postgres, drops the database.
    pub(crate) async fn drop_database(&self) -> anyhow::Result<()> {
        self.database.close().await;
        if let Some((admin_url, name)) = &self.postgres {
            execute_as_admin(admin_url, &drop_database_statement(name)).await?;
        }
        Ok(())
    }
}

/// Runs one statement on a fresh connection to the admin database.
async fn execute_as_admin(admin_url: &str, statement: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to {}", describe_url(admin_url)))?;
    sqlx::query(statement)
        .execute(&mut admin)
        .await
        .with_context(|| format!("running `{statement}`"))?;
    admin.close().await?;
    Ok(())
}

fn drop_database_statement(name: &str) -> String {
    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
}

/// `url` with its database name replaced by `database`; user, password, host, port and
/// parameters are kept as they are.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, parameters) = match url.split_once('?') {
        Some((base, parameters)) => (base, Some(parameters)),
        None => (url, None),
    };
    let Some(authority_start) = base.find("://").map(|index| index + 3) else {
        bail!("the postgres URL has no scheme");
    };
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |index| authority_start + index);
    let mut replaced = format!("{}/{database}", &base[..authority_end]);
    if let Some(parameters) = parameters {
        replaced.push('?');
        replaced.push_str(parameters);
    }
    Ok(replaced)
}

/// Refuses any Postgres server that is not on this machine: the benchmark creates and
/// force-drops databases.
pub(crate) fn ensure_loopback(url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(url).context("--postgres-url does not parse")?;
    let host = options.get_host();
    let local = LOOPBACK_HOSTS.contains(&host) || host.starts_with('/');
    ensure!(
        local,
        "--postgres-url points at {host}; the benchmark only runs against 127.0.0.1"
    );
    Ok(())
}

/// Host, port and database of a URL, without its credentials.
fn describe_url(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(options) => format!(
            "postgres at {}:{} database {}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default)")
        ),
        Err(_) => "postgres (unparsable URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        let replaced = with_database(
            "postgres://user:secret@127.0.0.1:5432/postgres?sslmode=disable",
            "bench",
        )
        .expect("a valid URL");
        assert_eq!(
            replaced,
            "postgres://user:secret@127.0.0.1:5432/bench?sslmode=disable"
        );
        let replaced =
            with_database("postgres://postgres@127.0.0.1", "bench").expect("a valid URL");
        assert_eq!(replaced, "postgres://postgres@127.0.0.1/bench");
    }

    #[test]
    fn only_loopback_servers_are_accepted() {
        ensure_loopback("postgres://postgres@127.0.0.1:5432/postgres").expect("loopback");
        ensure_loopback("postgres://postgres@localhost/postgres").expect("loopback");
        assert!(ensure_loopback("postgres://postgres@db.example.com/postgres").is_err());
    }
}
