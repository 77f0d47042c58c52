//! Connecting to the database that holds events (and, on Postgres, read models) and running
//! the migrations of `migrations/postgres` or `migrations/sqlite`.

use petstore_telemetry::health::{ComponentHealth, HealthCheck};
use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use petstore_domain::partition::Partitions;
use petstore_settings::{DatabaseSettings, StorageSettings};

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
    /// The store was initialised with other saga partitions than this process asks for.
    #[error(
        "the event store was initialised with saga.partitions = {stored}, and this process is \
         configured with {configured}: a store's partitions are fixed (set saga.partitions to \
         {stored}, or start a new store)"
    )]
    PartitionsMismatch {
        /// The store's.
        stored: u32,
        /// This process's.
        configured: u32,
    },
}

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// Whether `error` means the database cannot be reached (as opposed to a failed statement).
pub fn unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // connection exceptions, too many connections, shutting down or starting up
            code.starts_with("08") || code == "53300" || code.starts_with("57P")
        }),
        _ => false,
    }
}

/// One statement on whichever engine `database` is, its bind chain written once: `$body`
/// runs with `$pool` bound to the Postgres or the SQLite pool (each expansion typed for its
/// engine). Where the SQL differs between engines, [`Database::sql`] picks it.
#[macro_export]
macro_rules! with_pool {
    ($database:expr, |$pool:ident| $body:expr) => {
        match $database {
            $crate::database::Database::Postgres($pool) => $body,
            $crate::database::Database::Sqlite($pool) => $body,
        }
    };
}
pub use with_pool;

/// Postgres: a one-row `FROM` item that lets the statement's own transaction commit without
/// waiting for the WAL flush (`synchronous_commit` off for that transaction only), for writes
/// derived from events that are written again should a database crash lose them (deadlines,
/// checkpoints, read models). Never for events. WAL order still holds: whatever commits
/// flushed after them (an event append) makes them durable first.
macro_rules! lazily_durable {
    () => {
        "(SELECT set_config('synchronous_commit', 'off', true)) AS lazily_durable"
    };
}
pub(crate) use lazily_durable;

/// Postgres: lets the transaction on `connection` commit without waiting for the WAL flush,
/// as [`lazily_durable!`] does for one statement.
pub async fn commit_lazily(connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(connection)
        .await?;
    Ok(())
}

/// Begins a transaction on a connection from `pool` (either engine), safely even if the
/// caller is cancelled.
///
/// sqlx 0.8 sends `BEGIN` and only then counts the transaction: a future dropped while it
/// waits for the answer (a task aborted, a `select!` or timeout) leaves a pooled connection
/// inside a transaction sqlx does not know about. Every later autocommit statement on that
/// connection then runs uncommitted, and its transaction id holds back the stream horizon of
/// every reader on the cluster. Here the `BEGIN` runs in a task of its own that always
/// finishes: if nobody waits for the transaction any more, it is dropped there and rolled
/// back properly.
pub async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
    let pool = pool.clone();
    // The one place `Pool::begin` may run: in a task of its own that always finishes.
    #[allow(clippy::disallowed_methods)]
    to_completion(async move { pool.begin().await }).await
}

/// Runs database work in a task of its own, so that it finishes (or fails) as a whole even
/// when the caller is cancelled: what a cancelled caller no longer waits for is dropped in
/// that task, where sqlx cleans it up properly.
pub async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, sqlx::Error>> + Send + 'static,
) -> Result<T, sqlx::Error> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(join) => {
            tracing::error!(error = %join, "a database task failed");
            Err(sqlx::Error::WorkerCrashed)
        }
    }
}

/// A pooled connection idle longer than this is pinged before it is handed out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(5);

/// URL parameters that ask for TLS settings explicitly.
const TLS_PARAMETERS: [&str; 5] = ["sslmode", "ssl-mode", "sslrootcert", "sslcert", "sslkey"];

/// TLS to a server on this machine protects nothing and costs CPU on both ends of every
/// round trip (a fifth of the saga throughput on two cores), so a loopback or Unix-socket
/// connection goes without it, unless the URL sets any TLS parameter or `PGSSLMODE` is set
/// (`env_sslmode`).
fn without_loopback_tls(
    options: PgConnectOptions,
    url: &str,
    env_sslmode: bool,
) -> PgConnectOptions {
    let explicit = env_sslmode
        || url.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|pair| {
                let key = pair.split_once('=').map_or(pair, |(key, _)| key);
                TLS_PARAMETERS.contains(&key)
            })
        });
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    if local && !explicit {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    }
}

impl Database {
    /// The statement for this engine: `postgres` on Postgres, `sqlite` on SQLite (for the
    /// statements whose text differs, such as those that commit lazily on Postgres).
    pub fn sql(&self, postgres: &'static str, sqlite: &'static str) -> &'static str {
        match self {
            Database::Postgres(_) => postgres,
            Database::Sqlite(_) => sqlite,
        }
    }

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
                let options = without_loopback_tls(
                    options,
                    url.expose_secret(),
                    std::env::var_os("PGSSLMODE").is_some(),
                )
                // A transaction left open (a cancelled task, a bug) would hold back the
                // cluster-wide horizon every stream reader waits on: end it quickly.
                .options([("idle_in_transaction_session_timeout", "5s")]);
                let pool = PgPoolOptions::new()
                    .max_connections(database.max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    // No ping before every checkout (a third of the round trips of a query):
                    // only a connection idle for a while is checked, since the server may
                    // have dropped it (restart, idle timeout). One dropped under load fails
                    // its query instead: sqlx discards it, and callers retry or answer 503.
                    .test_before_acquire(false)
                    .before_acquire(|connection, meta| {
                        Box::pin(async move {
                            if meta.idle_for > IDLE_BEFORE_PING {
                                sqlx::Connection::ping(connection).await?;
                            }
                            Ok(true)
                        })
                    })
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

    /// The event store's identity, made with its schema (`store_identity`): what projections
    /// kept elsewhere (Redis) record, to tell this store's views from another's.
    pub async fn store_id(&self) -> Result<String, DatabaseError> {
        Ok(match self {
            Self::Postgres(pool) => {
                sqlx::query_scalar("SELECT store_id::text FROM store_identity")
                    .fetch_one(pool)
                    .await?
            }
            Self::Sqlite(pool) => {
                sqlx::query_scalar("SELECT store_id FROM store_identity")
                    .fetch_one(pool)
                    .await?
            }
        })
    }

    /// The store's saga partitions: `configured` when the store has none recorded yet (it
    /// is new, or older than partitions), which it then keeps; a store with others is
    /// [`DatabaseError::PartitionsMismatch`].
    pub async fn saga_partitions(
        &self,
        configured: Partitions,
    ) -> Result<Partitions, DatabaseError> {
        const RECORD: &str =
            "UPDATE store_identity SET saga_partitions = $1 WHERE saga_partitions IS NULL";
        const READ: &str = "SELECT saga_partitions FROM store_identity";
        let count = i32::try_from(configured.count()).expect("at most MAX_PARTITIONS");
        let stored: i32 = with_pool!(self, |pool| {
            sqlx::query(RECORD).bind(count).execute(pool).await?;
            sqlx::query_scalar(READ).fetch_one(pool).await?
        });
        if stored == count {
            return Ok(configured);
        }
        Err(DatabaseError::PartitionsMismatch {
            stored: u32::try_from(stored).unwrap_or(u32::MAX),
            configured: configured.count(),
        })
    }

    /// The store's saga partitions as recorded; `None` before a saga runner or server
    /// recorded them.
    pub async fn stored_saga_partitions(&self) -> Result<Option<Partitions>, sqlx::Error> {
        const READ: &str = "SELECT saga_partitions FROM store_identity";
        let stored: Option<i32> = with_pool!(self, |pool| sqlx::query_scalar(READ)
            .fetch_one(pool)
            .await?);
        Ok(stored
            .and_then(|count| u32::try_from(count).ok())
            .and_then(|count| Partitions::new(count).ok()))
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

    /// The engine's name in OpenTelemetry's `db.system.name`.
    pub fn semconv_system(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgresql",
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

/// Proof that this process is the one active instance of something (a projection): a
/// Postgres advisory lock held on a connection of its own, released when dropped or when the
/// process dies (its connection closes), so a standby takes over. Each holder gets a fencing
/// token one above its predecessor's ([`Fence`]). On SQLite every process keeps its own
/// read models, so the lock is always granted and has no fence.
#[derive(Debug)]
pub struct ExclusiveLock {
    connection: Option<tokio::sync::Mutex<sqlx::PgConnection>>,
    fence: Option<Fence>,
}

/// A lock holder's fencing token: writes made in its name check, in their own transaction,
/// that it is still the lock's current token (`lock_fences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lock's name (`projection:read_models`).
    pub name: String,
    /// This holder's token.
    pub token: i64,
}

/// The current fencing token of every exclusive lock ever taken (Postgres; none on SQLite,
/// where one process holds everything): how many times each changed hands.
pub async fn fence_tokens(
    database: &Database,
) -> Result<std::collections::BTreeMap<String, i64>, sqlx::Error> {
    match database {
        Database::Postgres(pool) => Ok(sqlx::query_as::<_, (String, i64)>(
            "SELECT name, token FROM lock_fences",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect()),
        Database::Sqlite(_) => Ok(Default::default()),
    }
}

/// How often a lock holder checks that its lock connection is alive.
pub const LOCK_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl ExclusiveLock {
    /// The holder's fencing token; `None` on SQLite.
    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// Resolves once the lock is lost: its connection fails, or does not answer, a check made
    /// every [`LOCK_CHECK_INTERVAL`]. Never on SQLite.
    pub async fn lost(&self) {
        let Some(connection) = &self.connection else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(LOCK_CHECK_INTERVAL).await;
            let mut connection = connection.lock().await;
            let check = sqlx::query("SELECT 1").execute(&mut *connection);
            match tokio::time::timeout(LOCK_CHECK_INTERVAL * 2, check).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "the lock connection failed: the lock is lost");
                    return;
                }
                Err(_) => {
                    tracing::error!("the lock connection stopped answering: the lock is lost");
                    return;
                }
            }
        }
    }
}

impl Database {
    /// Tries to become the active holder of `name`; `None` while another process holds it.
    pub async fn try_lock(&self, name: &str) -> Result<Option<ExclusiveLock>, DatabaseError> {
        use sqlx::Connection;
        let Self::Postgres(pool) = self else {
            return Ok(Some(ExclusiveLock {
                connection: None,
                fence: None,
            }));
        };
        let mut connection = sqlx::PgConnection::connect_with(&pool.connect_options())
            .await
            .map_err(DatabaseError::Connect)?;
        let key = lock_key(name);
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut connection)
            .await?;
        if !acquired {
            return Ok(None);
        }
        let token: i64 = sqlx::query_scalar(
            "INSERT INTO lock_fences (name, token) VALUES ($1, 1)
             ON CONFLICT (name) DO UPDATE SET token = lock_fences.token + 1
             RETURNING token",
        )
        .bind(name)
        .fetch_one(&mut connection)
        .await?;
        Ok(Some(ExclusiveLock {
            connection: Some(tokio::sync::Mutex::new(connection)),
            fence: Some(Fence {
                name: name.to_owned(),
                token,
            }),
        }))
    }
}

/// A stable 64-bit advisory-lock key for a name.
fn lock_key(name: &str) -> i64 {
    let digest = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("petstore:{name}").as_bytes(),
    );
    let bytes = digest.as_bytes();
    i64::from_be_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// The event store's database answers.
pub struct EventStoreHealth(pub Database);

impl HealthCheck for EventStoreHealth {
    fn name(&self) -> String {
        "event_store".to_owned()
    }

    fn essential(&self) -> bool {
        true
    }

    fn check(&self) -> futures::future::BoxFuture<'_, ComponentHealth> {
        Box::pin(async {
            match self.0.ping().await {
                Ok(()) => ComponentHealth::up(self.0.engine(), None),
                Err(error) => {
                    tracing::warn!(%error, "event store health check failed");
                    ComponentHealth::down(self.0.engine(), "unreachable")
                }
            }
        })
    }
}

impl petstore_telemetry::metrics::PoolState for Database {
    fn pool_state(&self) -> (u32, u32, u32) {
        fn state<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> (u32, u32, u32) {
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
            (pool.size(), idle, pool.options().get_max_connections())
        }
        match self {
            Self::Postgres(pool) => state(pool),
            Self::Sqlite(pool) => state(pool),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        let options = PgConnectOptions::from_str(url).expect("valid url");
        without_loopback_tls(options, url, false).get_ssl_mode()
    }

    #[test]
    fn loopback_goes_without_tls_unless_the_url_or_environment_asks_for_it() {
        assert!(matches!(
            mode("postgres://u@127.0.0.1:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(mode("postgres://u@[::1]/db"), PgSslMode::Disable));
        assert!(matches!(
            mode("postgres://u@localhost/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?ssl-mode=require"),
            PgSslMode::Require
        ));
        // A certificate asks for TLS too (sqlx's default mode then applies).
        assert!(!matches!(
            mode("postgres://u@127.0.0.1/db?sslrootcert=/etc/ca.pem"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@db.internal/db"),
            PgSslMode::Prefer
        ));
        let url = "postgres://u@127.0.0.1/db";
        let options = PgConnectOptions::from_str(url).expect("valid url");
        assert!(!matches!(
            without_loopback_tls(options, url, true).get_ssl_mode(),
            PgSslMode::Disable
        ));
    }
}
