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
//! - [`Args`], [`Engine`], [`Ablation`]: the command line (here, with [`main`]).
//! - `workload`: [`Workload`], [`SqlSteps`]: what one operation does; [`Appender`]: one
//!   operation of each workload.
//! - `database`: [`BenchDatabase`]: creating, preparing and dropping the database of one
//!   engine.
//! - `measure`: [`measure`]: N writers for a fixed time, with warm-up; a [`Measurement`].
//! - `report`: [`Report`]: the results table.
//!
//! [`SqlSteps`]: workload::SqlSteps
//! [`Measurement`]: measure::Measurement

// The results table on stdout is what this binary is for.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use clap::{Parser, ValueEnum};
use petstore_event_store::store::EventStore;

#[path = "append/database.rs"]
mod database;
#[path = "append/measure.rs"]
mod measure;
#[path = "append/report.rs"]
mod report;
#[path = "append/workload.rs"]
mod workload;

use database::{ensure_loopback, BenchDatabase};
use measure::measure;
use report::{machine, BreakdownRow, Report, Row};
use workload::{Appender, OrderTemplate, Workload};

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
