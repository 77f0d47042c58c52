//! `append-bench`: events appended per second through the event store, beside a baseline
//! of plain INSERTs measured in the same run, over the same pool.
//!
//! For each engine (Postgres, the embedded SQLite store) and each number of concurrent
//! writers, the benchmark runs two workloads for the same wall-clock time:
//!
//! - **baseline**: one autocommit `INSERT` per operation into `bench_baseline`, a plain table
//!   with the event table's columns and no index but its primary key, with rows of the same
//!   size as a real `OrderCreated` event and its metadata;
//! - **event store**: [`EventStore::execute_on_new`] of `PlaceOrder` on a fresh Order
//!   aggregate, the path of `POST /orders`: decide on the empty aggregate, then append one
//!   event at sequence 1 with optimistic concurrency, metadata and a global position, while
//!   [`EventStore::notify_appends`] wakes other processes as it does in the service;
//!
//! and reports throughput, p50/p99 latency and the ratio event store / baseline. `--breakdown`
//! adds the steps in between (a transaction, the `events` table, the load) and
//! [`EventStore::execute`], the path of every command on an existing aggregate (load, decide,
//! append), so the cost of each can be read off; `--ablate` drops parts of the `events` schema
//! in the throw-away bench database and `--with-notify-trigger` puts back the NOTIFY trigger
//! of the first schema, to measure what each one costs. They only serve the analysis in
//! `bench/README.md`.
//!
//! The benchmark only ever talks to a database on the loopback interface: it creates a fresh
//! Postgres database `petstore_bench_<random hex>` and drops it at the end, and keeps the
//! SQLite store in a temporary directory.
//!
//! # Layout
//! - [`Args`], [`Engine`], [`Ablation`]: the command line.
//! - [`Workload`], [`SqlSteps`]: what one operation does.
//! - [`BenchDatabase`]: creating, preparing and dropping the database of one engine.
//! - [`Appender`]: one operation of each workload.
//! - [`measure`]: N writers for a fixed time, with warm-up; a [`Measurement`].
//! - [`Report`]: the results table.

// The results table on stdout is what this binary is for.
#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, ValueEnum};
use cqrs_es::{Aggregate as _, DomainEvent as _};
use hdrhistogram::Histogram;
use petstore_domain::order::{Order, OrderCommand, OrderEvent, OrderRequest};
use petstore_domain::{CustomerId, Money, OrderId, PetId, SpecialInstructions};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_settings::{DatabaseSettings, StorageSettings};
use petstore_web::CorrelationId;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hosts the benchmark agrees to create and drop databases on.
const LOOPBACK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "::1"];

/// Appends per second through the event store vs plain INSERTs, at several concurrencies.
#[derive(Debug, Parser)]
#[command(name = "append-bench", version, about)]
struct Args {
    /// Postgres URL of a role allowed to CREATE DATABASE; must point at the loopback
    /// interface. The benchmark works in a fresh database it drops at the end.
    #[arg(
        long,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,

    /// Engines to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "postgres,sqlite"
    )]
    engines: Vec<Engine>,

    /// Numbers of concurrent writers.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    writers: Vec<u32>,

    /// Measured seconds of each workload at each concurrency.
    #[arg(long, default_value_t = 5)]
    seconds: u64,

    /// Seconds each workload runs, unmeasured, before its measurement.
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,

    /// Also measure the steps between the baseline and the event store (analysis).
    #[arg(long)]
    breakdown: bool,

    /// Connections in the pool (default: the largest number of writers). SQLite's pool
    /// holds at most 8 whatever is asked.
    #[arg(long)]
    pool_size: Option<u32>,

    /// Parts of the `events` schema to drop in the bench database before measuring
    /// (analysis only: the service needs all of them).
    #[arg(long, value_enum, value_delimiter = ',')]
    ablate: Vec<Ablation>,

    /// Postgres: re-create the statement trigger of migration 0001 that ran `pg_notify` in
    /// every append (migration 0004 dropped it), to measure what it cost.
    #[arg(long)]
    with_notify_trigger: bool,
}

/// A database engine the event store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// Postgres through postgres-es.
    Postgres,
    /// The embedded SQLite store through sqlite-es.
    Sqlite,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// A part of the `events` schema that `--ablate` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ablation {
    /// Both: the expression index on `metadata ->> 'correlation_id'`.
    CorrelationIndex,
    /// Postgres: the `global_position` identity and `transaction_id` xid8 columns and their
    /// unique index. Not on SQLite, where the position is the rowid (migration 0012).
    GlobalOrder,
}

impl Ablation {
    fn name(self) -> &'static str {
        match self {
            Self::CorrelationIndex => "correlation-index",
            Self::GlobalOrder => "global-order",
        }
    }

    /// The statements that remove this part on `engine`.
    fn statements(self, engine: Engine) -> &'static [&'static str] {
        match (self, engine) {
            (Self::CorrelationIndex, _) => &["DROP INDEX events_correlation_id"],
            (Self::GlobalOrder, Engine::Postgres) => {
                &["ALTER TABLE events DROP COLUMN transaction_id, DROP COLUMN global_position"]
            }
            (Self::GlobalOrder, Engine::Sqlite) => &[],
        }
    }
}

/// What one operation does. The first and last are the benchmark; the others, measured with
/// `--breakdown`, add one cost at a time on the way from one to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// The benchmark's baseline: one autocommit INSERT into the plain `bench_baseline` table.
    Baseline,
    /// Plain SQL, to isolate one cost of the append path.
    Sql(SqlSteps),
    /// [`EventStore::execute`] of `PlaceOrder` on a fresh order: the path of every command on
    /// an existing aggregate (and of `POST /orders` with an `Idempotency-Key`), which loads
    /// the aggregate before it decides.
    EventStoreLoading,
    /// The benchmark: [`EventStore::execute_on_new`] of `PlaceOrder` on a fresh order.
    EventStore,
}

/// The SQL steps of one operation that is not the event store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SqlSteps {
    /// INSERT into `events` (with its indexes and global-order columns) instead of
    /// `bench_baseline`.
    into_events: bool,
    /// First SELECT the aggregate's events, as loading an aggregate does.
    load_first: bool,
    /// Wrap the INSERT in BEGIN ... COMMIT, as postgres-es and sqlite-es do (the service
    /// appends to Postgres in one statement instead).
    in_transaction: bool,
}

impl SqlSteps {
    const BASELINE: SqlSteps = SqlSteps {
        into_events: false,
        load_first: false,
        in_transaction: false,
    };
}

impl Workload {
    const BREAKDOWN: [Workload; 8] = [
        Self::Baseline,
        Self::sql(false, false, true),
        Self::sql(true, false, false),
        Self::sql(true, false, true),
        Self::sql(true, true, false),
        Self::sql(true, true, true),
        Self::EventStoreLoading,
        Self::EventStore,
    ];

    const fn sql(into_events: bool, load_first: bool, in_transaction: bool) -> Self {
        Self::Sql(SqlSteps {
            into_events,
            load_first,
            in_transaction,
        })
    }

    fn name(self) -> String {
        let steps = match self {
            Self::EventStoreLoading => return "event store: execute(PlaceOrder)".to_owned(),
            Self::EventStore => return "event store: execute_on_new(PlaceOrder)".to_owned(),
            Self::Baseline => SqlSteps::BASELINE,
            Self::Sql(steps) => steps,
        };
        let table = if steps.into_events {
            "events"
        } else {
            "baseline"
        };
        let select = if steps.load_first { "SELECT; " } else { "" };
        let insert = if steps.in_transaction {
            "BEGIN; INSERT; COMMIT"
        } else {
            "INSERT"
        };
        format!("{table}: {select}{insert}")
    }
}

/// The per-append NOTIFY of migration 0001, which migration 0004 replaced by
/// [`EventStore::notify_appends`].
const OLD_NOTIFY_TRIGGER: [&str; 2] = [
    "CREATE FUNCTION notify_events_appended() RETURNS trigger LANGUAGE plpgsql AS \
     $$ BEGIN PERFORM pg_notify('petstore_events', ''); RETURN NULL; END $$",
    "CREATE TRIGGER events_appended AFTER INSERT ON events FOR EACH STATEMENT \
     EXECUTE FUNCTION notify_events_appended()",
];

/// The SQL of one engine's workloads.
struct Statements {
    create_baseline: &'static str,
    insert_baseline: &'static str,
    /// As postgres-es / sqlite-es 0.5 write it.
    insert_event: &'static str,
    /// As postgres-es / sqlite-es 0.5 write it.
    select_events: &'static str,
}

const POSTGRES_STATEMENTS: Statements = Statements {
    create_baseline: "CREATE TABLE bench_baseline (id bigserial PRIMARY KEY, aggregate_type text, \
        aggregate_id text, sequence bigint, event_type text, event_version text, payload jsonb, \
        metadata jsonb)",
    insert_baseline: "INSERT INTO bench_baseline (aggregate_type, aggregate_id, sequence, \
        event_type, event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    insert_event: "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
        event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    select_events: "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
        payload, metadata FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
        ORDER BY sequence",
};

const SQLITE_STATEMENTS: Statements = Statements {
    create_baseline: "CREATE TABLE bench_baseline (id integer PRIMARY KEY AUTOINCREMENT, \
        aggregate_type text, aggregate_id text, sequence integer, event_type text, \
        event_version text, payload text, metadata text) STRICT",
    insert_baseline: "INSERT INTO bench_baseline (aggregate_type, aggregate_id, sequence, \
        event_type, event_version, payload, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
    insert_event: "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
        event_version, payload, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
    select_events: "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
        payload, metadata FROM events WHERE aggregate_type = ? AND aggregate_id = ? \
        ORDER BY sequence",
};

/// The row every SQL workload writes: a real `OrderCreated` event and its metadata,
/// serialized once. Only the aggregate id changes between operations.
struct RowTemplate {
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
}

/// The order every event-store operation places (with a fresh order id).
struct OrderTemplate {
    customer_id: CustomerId,
    pet_id: PetId,
    amount: Money,
    special_instructions: SpecialInstructions,
}

impl OrderTemplate {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            customer_id: CustomerId::parse("customer-001")?,
            pet_id: PetId::parse("golden-retriever-001")?,
            amount: Money::usd(120_000)?,
            special_instructions: SpecialInstructions::parse("Leave with the neighbour if out")?,
        })
    }

    fn request(&self, order_id: OrderId) -> OrderRequest {
        OrderRequest {
            order_id,
            customer_id: self.customer_id.clone(),
            pet_id: self.pet_id.clone(),
            amount: self.amount,
            special_instructions: Some(self.special_instructions.clone()),
            simulated_failure: None,
            express_processing: None,
        }
    }

    /// Serializes one event and its metadata the way cqrs-es stores them.
    fn row(&self) -> anyhow::Result<RowTemplate> {
        let event = OrderEvent::OrderCreated(self.request(OrderId::random()));
        let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
        Ok(RowTemplate {
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: serde_json::to_value(&event)?,
            metadata: serde_json::to_value(metadata.to_map())?,
        })
    }
}

/// Runs one operation of any workload against one database.
struct Appender {
    database: Database,
    store: EventStore,
    statements: &'static Statements,
    order: OrderTemplate,
    row: RowTemplate,
}

/// One INSERT of the template row under a fresh aggregate id, at sequence 1.
macro_rules! insert_row {
    ($sql:expr, $row:expr, $aggregate_id:expr, $executor:expr) => {
        sqlx::query($sql)
            .bind(Order::TYPE)
            .bind($aggregate_id)
            .bind(1_i64)
            .bind($row.event_type.as_str())
            .bind($row.event_version.as_str())
            .bind(&$row.payload)
            .bind(&$row.metadata)
            .execute($executor)
            .await?
    };
}

/// One operation of `$steps` on `$pool`; the two engines differ in types, not in steps.
macro_rules! run_steps {
    ($pool:expr, $appender:expr, $steps:expr) => {{
        let (pool, appender, steps): (_, &Appender, SqlSteps) = ($pool, $appender, $steps);
        let row = &appender.row;
        // Keyed as the event store's appends are (`OrderId::random`, a UUIDv7).
        let aggregate_id = Uuid::now_v7().to_string();
        let aggregate_id = aggregate_id.as_str();
        if steps.load_first {
            let loaded = sqlx::query(appender.statements.select_events)
                .bind(Order::TYPE)
                .bind(aggregate_id)
                .fetch_all(pool)
                .await?;
            ensure!(loaded.is_empty(), "a fresh aggregate already has events");
        }
        let insert = if steps.into_events {
            appender.statements.insert_event
        } else {
            appender.statements.insert_baseline
        };
        let inserted = if steps.in_transaction {
            let mut transaction = pool.begin().await?;
            let inserted = insert_row!(insert, row, aggregate_id, &mut *transaction);
            transaction.commit().await?;
            inserted
        } else {
            insert_row!(insert, row, aggregate_id, pool)
        };
        ensure!(
            inserted.rows_affected() == 1,
            "an insert wrote {} rows",
            inserted.rows_affected()
        );
        Ok(())
    }};
}

impl Appender {
    async fn append(&self, workload: Workload) -> anyhow::Result<()> {
        let steps = match workload {
            Workload::EventStore => return self.place_new_order(false).await,
            Workload::EventStoreLoading => return self.place_new_order(true).await,
            Workload::Baseline => SqlSteps::BASELINE,
            Workload::Sql(steps) => steps,
        };
        match &self.database {
            Database::Postgres(pool) => run_steps!(pool, self, steps),
            Database::Sqlite(pool) => run_steps!(pool, self, steps),
        }
    }

    /// The service's own append path for a new order (`POST /orders`):
    /// [`EventStore::execute_on_new`] decides on the empty aggregate and appends one event at
    /// sequence 1 in a single statement; with `load_first`, [`EventStore::execute`] loads the
    /// (empty) aggregate first, as every command on an existing aggregate does. A fresh order
    /// id means no writer ever conflicts with another.
    async fn place_new_order(&self, load_first: bool) -> anyhow::Result<()> {
        let order_id = OrderId::random();
        let aggregate_id = order_id.to_string();
        let command = OrderCommand::PlaceOrder(self.order.request(order_id));
        let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
        let appended = if load_first {
            self.store
                .execute::<Order>(&aggregate_id, command, &(), &metadata)
                .await?
        } else {
            self.store
                .execute_on_new::<Order>(&aggregate_id, command, &(), &metadata)
                .await?
        };
        ensure!(
            appended.len() == 1,
            "placing an order appended {} events",
            appended.len()
        );
        Ok(())
    }
}

/// Throughput and latency of one workload at one concurrency.
#[derive(Clone)]
struct Measurement {
    operations: u64,
    elapsed: Duration,
    /// Latency per operation, in microseconds.
    latency: Histogram<u64>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn quantile_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 100 s at 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 100_000_000, 3)?)
}

/// Runs `workload` on `writers` concurrent tasks: unmeasured for `warmup`, then measured for
/// `duration`. An operation counts when it starts inside the measured window; the window ends
/// when the last such operation finishes.
async fn measure(
    appender: &Arc<Appender>,
    workload: Workload,
    writers: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Measurement> {
    let measure_from = Instant::now() + warmup;
    let measure_until = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let appender = Arc::clone(appender);
        tasks.spawn(async move {
            let mut latency = new_histogram()?;
            let mut operations = 0_u64;
            let mut finished = measure_from;
            loop {
                let started = Instant::now();
                if started >= measure_until {
                    break;
                }
                appender.append(workload).await?;
                let now = Instant::now();
                if started >= measure_from {
                    let micros =
                        u64::try_from(now.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                    latency.saturating_record(micros.max(1));
                    operations += 1;
                    finished = now;
                }
            }
            anyhow::Ok((operations, finished, latency))
        });
    }
    let mut total = Measurement {
        operations: 0,
        elapsed: duration,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let (operations, finished, latency) = joined.context("a writer task panicked")??;
        total.operations += operations;
        total.elapsed = total.elapsed.max(finished.duration_since(measure_from));
        total.latency.add(&latency)?;
    }
    Ok(total)
}

/// The database of one engine, created for this run.
struct BenchDatabase {
    engine: Engine,
    database: Database,
    /// Postgres: the admin URL and the name of the database to drop at the end.
    postgres: Option<(String, String)>,
    /// SQLite: the directory of the store, removed on drop.
    _sqlite_dir: Option<tempfile::TempDir>,
}

impl BenchDatabase {
    async fn create(engine: Engine, args: &Args, pool_size: u32) -> anyhow::Result<Self> {
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
    async fn prepare(&self, args: &Args) -> anyhow::Result<()> {
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

    fn statements(&self) -> &'static Statements {
        match self.engine {
            Engine::Postgres => &POSTGRES_STATEMENTS,
            Engine::Sqlite => &SQLITE_STATEMENTS,
        }
    }

    /// The engine's version, durability settings, pool and schema, for the report.
    async fn describe(&self) -> anyhow::Result<String> {
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
    async fn settle(&self) -> anyhow::Result<()> {
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
    async fn drop_database(&self) -> anyhow::Result<()> {
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
fn ensure_loopback(url: &str) -> anyhow::Result<()> {
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

/// One line of the results table.
struct Row {
    engine: Engine,
    writers: u32,
    baseline: Measurement,
    event_store: Measurement,
}

/// One line of the breakdown table.
struct BreakdownRow {
    engine: Engine,
    writers: u32,
    workload: Workload,
    measurement: Measurement,
    baseline_per_second: f64,
}

/// Everything measured in this run.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    breakdown: Vec<BreakdownRow>,
}

impl Report {
    fn table(&self) -> String {
        let header = [
            "engine",
            "writers",
            "baseline ops/s",
            "baseline p50 ms",
            "baseline p99 ms",
            "event store ops/s",
            "event store p50 ms",
            "event store p99 ms",
            "ratio",
        ];
        let rows = self.rows.iter().map(|row| {
            vec![
                row.engine.name().to_owned(),
                row.writers.to_string(),
                format!("{:.0}", row.baseline.per_second()),
                format!("{:.2}", row.baseline.quantile_ms(0.5)),
                format!("{:.2}", row.baseline.quantile_ms(0.99)),
                format!("{:.0}", row.event_store.per_second()),
                format!("{:.2}", row.event_store.quantile_ms(0.5)),
                format!("{:.2}", row.event_store.quantile_ms(0.99)),
                format!(
                    "{:.2}",
                    row.event_store.per_second() / row.baseline.per_second()
                ),
            ]
        });
        markdown_table(&header, rows.collect())
    }

    fn breakdown_table(&self) -> String {
        let header = [
            "engine",
            "writers",
            "workload",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "/ baseline",
        ];
        let rows = self.breakdown.iter().map(|row| {
            vec![
                row.engine.name().to_owned(),
                row.writers.to_string(),
                row.workload.name(),
                format!("{:.0}", row.measurement.per_second()),
                format!("{:.2}", row.measurement.quantile_ms(0.5)),
                format!("{:.2}", row.measurement.quantile_ms(0.99)),
                format!(
                    "{:.2}",
                    row.measurement.per_second() / row.baseline_per_second
                ),
            ]
        });
        markdown_table(&header, rows.collect())
    }
}

/// A markdown table whose columns also line up as plain text; numbers are right-aligned.
fn markdown_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let is_text_column = |column: usize| rows.iter().any(|row| row[column].parse::<f64>().is_err());
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].len())
                .chain([header[column].len(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let mut table = String::new();
    let mut line = |cells: Vec<String>| {
        table.push('|');
        for cell in cells {
            let _ = write!(table, " {cell} |");
        }
        table.push('\n');
    };
    line(
        header
            .iter()
            .zip(&widths)
            .map(|(name, width)| format!("{name:<width$}"))
            .collect(),
    );
    line(
        widths
            .iter()
            .enumerate()
            .map(|(column, width)| {
                if is_text_column(column) {
                    "-".repeat(*width)
                } else {
                    format!("{}:", "-".repeat(width - 1))
                }
            })
            .collect(),
    );
    for row in &rows {
        line(
            row.iter()
                .zip(&widths)
                .enumerate()
                .map(|(column, (cell, width))| {
                    if is_text_column(column) {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect(),
        );
    }
    table
}

/// This machine, for the report: logical CPUs and their model.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} cores (nproc), {model}")
}

/// Measures every workload at every concurrency on one engine, prepared by
/// [`BenchDatabase::prepare`].
async fn run_engine(
    bench: &BenchDatabase,
    args: &Args,
    workloads: &[Workload],
    report: &mut Report,
) -> anyhow::Result<()> {
    let appender = Arc::new(Appender {
        database: bench.database.clone(),
        store: EventStore::new(bench.database.clone(), 8),
        statements: bench.statements(),
        order: OrderTemplate::new()?,
        row: OrderTemplate::new()?.row()?,
    });
    // As in the service: other processes learn of appends from one NOTIFY per burst. It stops
    // when `_stop_notifier` is dropped, however this function ends.
    let (_stop_notifier, notifier_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(appender.store.clone().notify_appends(async move {
        notifier_stopped.await.unwrap_or(());
    }));
    let warmup = Duration::from_secs(args.warmup_seconds);
    let duration = Duration::from_secs(args.seconds);
    for &writers in &args.writers {
        let mut measured = Vec::with_capacity(workloads.len());
        for &workload in workloads {
            bench.settle().await?;
            let measurement = measure(&appender, workload, writers, warmup, duration)
                .await
                .with_context(|| format!("{} at {writers} writers", workload.name()))?;
            eprintln!(
                "{:<8} {writers:>3} writers  {:<40} {:>8.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                bench.engine.name(),
                workload.name(),
                measurement.per_second(),
                measurement.quantile_ms(0.5),
                measurement.quantile_ms(0.99),
            );
            measured.push((workload, measurement));
        }
        let baseline_per_second = measured
            .iter()
            .find(|(workload, _)| *workload == Workload::Baseline)
            .map(|(_, measurement)| measurement.per_second())
            .context("the baseline is always measured")?;
        let mut baseline = None;
        let mut event_store = None;
        for (workload, measurement) in measured {
            if workloads.len() > 2 {
                report.breakdown.push(BreakdownRow {
                    engine: bench.engine,
                    writers,
                    workload,
                    measurement: measurement.clone(),
                    baseline_per_second,
                });
            }
            match workload {
                Workload::Baseline => baseline = Some(measurement),
                Workload::EventStore => event_store = Some(measurement),
                _ => {}
            }
        }
        report.rows.push(Row {
            engine: bench.engine,
            writers,
            baseline: baseline.context("the baseline is always measured")?,
            event_store: event_store.context("the event store is always measured")?,
        });
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(!args.engines.is_empty(), "--engines is empty");
    ensure!(
        !args.writers.is_empty() && args.writers.iter().all(|&writers| writers > 0),
        "--writers needs one or more counts above 0"
    );
    ensure!(args.seconds > 0, "--seconds must be above 0");
    if args.engines.contains(&Engine::Postgres) {
        ensure_loopback(&args.postgres_url)?;
    }
    let max_writers = args.writers.iter().copied().max().unwrap_or(1);
    let pool_size = args.pool_size.unwrap_or(max_writers);
    ensure!(pool_size > 0, "--pool-size must be above 0");
    let workloads: Vec<Workload> = if args.breakdown {
        Workload::BREAKDOWN.to_vec()
    } else {
        vec![Workload::Baseline, Workload::EventStore]
    };

    let mut header = vec![
        format!("date: {}", chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")),
        format!("machine: {}", machine()),
        format!(
            "each workload: {} s warm-up, then {} s measured; event store retries: 8; \
             EventStore::notify_appends running",
            args.warmup_seconds, args.seconds
        ),
    ];
    if args.with_notify_trigger {
        header.push("with the per-append NOTIFY trigger of migration 0001".to_owned());
    }
    if !args.ablate.is_empty() {
        let dropped: Vec<&str> = args.ablate.iter().map(|ablation| ablation.name()).collect();
        header.push(format!(
            "ablated (dropped from events): {}",
            dropped.join(", ")
        ));
    }

    let mut report = Report::default();
    for &engine in &args.engines {
        let bench = BenchDatabase::create(engine, &args, pool_size).await?;
        let described = match bench.prepare(&args).await {
            Ok(()) => bench.describe().await,
            Err(error) => Err(error),
        };
        let described = match described {
            Ok(described) => described,
            Err(error) => {
                bench.drop_database().await?;
                return Err(error);
            }
        };
        header.push(format!("{}: {described}", engine.name()));
        let outcome = tokio::select! {
            outcome = run_engine(&bench, &args, &workloads, &mut report) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let dropped = bench.drop_database().await;
        outcome?;
        dropped?;
    }

    println!("{}\n", header.join("\n"));
    println!("{}", report.table());
    if args.breakdown {
        println!("\n{}", report.breakdown_table());
    }
    Ok(())
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

    #[test]
    fn the_table_lines_up() {
        let table = markdown_table(
            &["engine", "ops/s"],
            vec![
                vec!["postgres".to_owned(), "12".to_owned()],
                vec!["sqlite".to_owned(), "3456".to_owned()],
            ],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[1], "| -------- | ----: |");
        assert_eq!(lines[3], "| sqlite   |  3456 |");
        assert!(lines.iter().all(|line| line.len() == lines[0].len()));
    }
}
