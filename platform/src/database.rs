//! Connecting to the database that holds events (and, on Postgres, read models) and running
//! the migrations of `migrations/postgres` or `migrations/sqlite`.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::settings::{DatabaseSettings, StorageSettings};

/// A connection pool to one of the two supported engines.
#[derive(Debug, Clone)]
pub enum Database {
    /// Postgres: events, checkpoints and read models.
    Postgres(PgPool),
    /// Embedded SQLite: events and checkpoints; read models live in memory.
    Sqlite(SqlitePool),
}

/// The database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The URL does not parse.
    #[error("database.url is not a valid postgres URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The data directory cannot be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
}

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

impl Database {
    /// Connects to Postgres when `database.url` is set, else opens (creating it if need be)
    /// the embedded store `petstore.db` in `storage.data_dir`.
    pub async fn connect(
        database: &DatabaseSettings,
        storage: &StorageSettings,
    ) -> Result<Self, DatabaseError> {
        match &database.url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url.expose_secret())
                    .map_err(DatabaseError::InvalidUrl)?;
                let pool = PgPoolOptions::new()
                    .max_connections(database.max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await
                    .map_err(DatabaseError::Connect)?;
                Ok(Self::Postgres(pool))
            }
            None => {
                std::fs::create_dir_all(&storage.data_dir).map_err(|source| {
                    DatabaseError::DataDir {
                        path: storage.data_dir.display().to_string(),
                        source,
                    }
                })?;
                let options = SqliteConnectOptions::new()
                    .filename(storage.data_dir.join("petstore.db"))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(database.max_connections.clamp(1, 8))
                    .connect_with(options)
                    .await
                    .map_err(DatabaseError::Connect)?;
                Ok(Self::Sqlite(pool))
            }
        }
    }

    /// Applies the engine's pending migrations (idempotent; concurrent runs are serialized
    /// by sqlx's migration lock).
    pub async fn migrate(&self) -> Result<(), DatabaseError> {
        match self {
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
            Self::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// Checks that the events table answers, for health checks.
    pub async fn ping(&self) -> Result<(), DatabaseError> {
        const SQL: &str = "SELECT 1 FROM events LIMIT 1";
        match self {
            Self::Postgres(pool) => sqlx::query(SQL).execute(pool).await?,
            Self::Sqlite(pool) => {
                sqlx::query(SQL).execute(pool).await?;
                return Ok(());
            }
        };
        Ok(())
    }

    /// `postgres` or `sqlite`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}
