//! `startup-bench`: how long the embedded service takes to become ready over a long log.
//!
//! Builds an embedded store of about `--events` events of whole sagas (`saga_log`: one real
//! order run through the service to completion, then cloned). Then it measures from
//! `Application::build` to `/health/ready` answering 200, all roles in one process:
//!
//! 1. with no read-model snapshot: the views rebuilt from the whole log (the baseline);
//! 2. `--runs` times from the snapshot the first start wrote;
//! 3. from that snapshot with `--tail` more events appended after it.
//!
//! Each start is checked: the first and the last cloned orders read `completed`, and the
//! events the read models folded (`petstore_projected_events_total`) are reported.
//!
//! Everything runs in a temporary data directory on 127.0.0.1; nothing else is touched.

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use petstore_bench::saga_log::{order_status, token, until_ready, Template};
use petstore_cli::{Application, Role};
use petstore_event_store::database::Database;
use petstore_event_store::stream::{self, StreamPosition};
use petstore_settings::{LogFormat, Settings};
use secrecy::SecretString;
use sqlx::SqlitePool;

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "startup-bench", about)]
struct Args {
    /// Events in the embedded store (rounded up to whole cloned orders).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Starts from the snapshot.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events appended after the snapshot for the last start.
    #[arg(long, default_value_t = 10_000)]
    tail: usize,
}

fn settings(data: &Path) -> anyhow::Result<Settings> {
    let mut settings = Settings::default();
    settings.http.listen = ([127, 0, 0, 1], 0).into();
    settings.log.format = LogFormat::Text;
    settings.log.filter = "warn".to_owned();
    settings.storage.data_dir = data.to_path_buf();
    settings.providers.payment.latency_ms = 0;
    settings.providers.delivery.latency_ms = 0;
    // Authenticated, as users run it; rate limits would only refuse the readiness polls.
    settings.security.authentication_required = true;
    settings.security.rate_limits.enabled = false;
    settings.security.jwt.secret = Some(SecretString::from(
        "startup-bench-secret-of-32-bytes-or-more".to_owned(),
    ));
    Ok(settings)
}

async fn sqlite(settings: &Settings) -> anyhow::Result<SqlitePool> {
    match Database::connect(&settings.database, &settings.storage).await? {
        Database::Sqlite(pool) => Ok(pool),
        Database::Postgres(_) => anyhow::bail!("the start-up bench runs on the embedded store"),
    }
}

async fn head(pool: &SqlitePool) -> anyhow::Result<StreamPosition> {
    Ok(stream::head_position(&Database::Sqlite(pool.clone())).await?)
}

/// Appends clones `from..to` of the template; the first and last orders' ids. The cloned
/// orders are finished sagas: the saga runner starts after them, as it would have had it
/// handled them.
async fn load(
    pool: &SqlitePool,
    template: &Template,
    from: usize,
    to: usize,
) -> anyhow::Result<(String, String)> {
    let database = Database::Sqlite(pool.clone());
    let orders = template.append(&database, from, to).await?;
    stream::save_checkpoint(
        &database,
        petstore_saga::CHECKPOINT,
        head(pool).await?,
        None,
    )
    .await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(pool)
        .await?;
    Ok(orders)
}

/// One start, measured.
struct Start {
    /// `Application::build` (the snapshot loaded).
    built: Duration,
    /// Build to the first 200 from `/health/ready`.
    ready: Duration,
    /// Events the read models folded by then.
    folded: u64,
    /// From ready to a snapshot stored at the log's head.
    snapshot_at_head: Duration,
}

/// Starts the service, waits until it is ready, checks `orders` read `completed`, waits for
/// the snapshot to reach the log's head, and stops it.
async fn start(settings: &Settings, pool: &SqlitePool, orders: &[&str]) -> anyhow::Result<Start> {
    let head = head(pool).await?;
    let begin = Instant::now();
    let application = Application::build(settings.clone(), &Role::all()).await?;
    let built = begin.elapsed();
    let base = format!("http://127.0.0.1:{}", application.port());
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    let client = reqwest::Client::new();
    until_ready(&client, &base, Duration::from_secs(600)).await?;
    let ready = begin.elapsed();
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let folded = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("petstore_projected_events_total{projection=\"read_models\"} ")
        })
        .map_or(Ok(0), str::parse)
        .context("petstore_projected_events_total")?;
    let token = token(settings)?;
    for order in orders {
        let status = order_status(&client, &base, token.as_deref(), order).await?;
        anyhow::ensure!(
            status.as_deref() == Some("completed"),
            "order {order} reads {status:?} once ready"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT global_position FROM read_model_snapshot")
                .fetch_optional(pool)
                .await?;
        if stored >= Some(head.global_position) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the snapshot never reached the head"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot_at_head = begin.elapsed() - ready;
    shutdown.trigger();
    server.await??;
    Ok(Start {
        built,
        ready,
        folded,
        snapshot_at_head,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let settings = settings(data.path())?;
    let template = Template::record(&settings).await?;
    let pool = sqlite(&settings).await?;
    let clones = args.events.div_ceil(template.rows.len());
    let tail = args.tail.div_ceil(template.rows.len());
    let loading = Instant::now();
    let (first, last) = load(&pool, &template, 0, clones).await?;
    let events = head(&pool).await?.global_position;
    let file = std::fs::metadata(data.path().join("petstore.db")).map_or(0, |file| file.len());
    println!(
        "embedded store: {events} events ({clones} orders of {} events: {}), {:.0} MiB, loaded in {:.1} s",
        template.rows.len(),
        template.event_types(),
        file as f64 / 1_048_576.0,
        loading.elapsed().as_secs_f64()
    );
    println!("ready: from Application::build to the first 200 from /health/ready, all roles");
    println!();
    println!("| start | events in the log | folded at start | build s | ready s | ready / rebuild | snapshot at head after ready s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for table in [
        "read_model_snapshot",
        "read_model_snapshot_orders",
        "read_model_snapshot_pets",
    ] {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&pool)
            .await?;
    }
    let orders = [first.as_str(), last.as_str()];
    let rebuild = start(&settings, &pool, &orders).await?;
    let row = |name: &str, events: i64, run: &Start| {
        println!(
            "| {name} | {events} | {} | {:.2} | {:.2} | {:.3} | {:.2} |",
            run.folded,
            run.built.as_secs_f64(),
            run.ready.as_secs_f64(),
            run.ready.as_secs_f64() / rebuild.ready.as_secs_f64(),
            run.snapshot_at_head.as_secs_f64(),
        );
    };
    row("no snapshot: rebuilt from the log", events, &rebuild);
    for run in 1..=args.runs {
        let measured = start(&settings, &pool, &orders).await?;
        row(&format!("from the snapshot, run {run}"), events, &measured);
    }
    let (tail_first, tail_last) = load(&pool, &template, clones, clones + tail).await?;
    let events = head(&pool).await?.global_position;
    let measured = start(
        &settings,
        &pool,
        &[first.as_str(), last.as_str(), &tail_first, &tail_last],
    )
    .await?;
    row(
        &format!("from the snapshot, {tail} orders appended after it"),
        events,
        &measured,
    );
    pool.close().await;
    Ok(())
}
