//! `startup-bench`: how long the embedded service takes to become ready over a long log.
//!
//! Builds an embedded store of about `--events` events: one real order run through the service
//! to completion, then cloned into the events table, each clone with a pet, an order and ids of
//! its own (the same event types, payloads and metadata otherwise). Then it measures from
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
use petstore_cli::{Application, Role};
use petstore_command_api::saga;
use petstore_platform::auth::TokenVerifier;
use petstore_platform::database::Database;
use petstore_platform::settings::{LogFormat, RoleName, Settings};
use petstore_platform::stream::{self, StreamPosition};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

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

/// The demo catalog's pet the template order buys.
const TEMPLATE_PET: &str = "golden-retriever-001";
/// Rows per INSERT statement (seven parameters each; SQLite allows 32,766).
const ROWS_PER_STATEMENT: usize = 1_000;
/// Rows per transaction of the bulk load.
const ROWS_PER_TRANSACTION: usize = 50_000;

/// One row of the events table, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
}

/// The events of one real order, from its pet's `PetAdded` to its completion, and the ids in
/// them that every clone replaces with its own.
struct Template {
    rows: Vec<Row>,
    order_id: String,
    uuids: Vec<String>,
}

impl Template {
    /// Clone `index`: its rows and its order id.
    fn instance(&self, index: usize) -> (Vec<Row>, String) {
        let mut replacements = vec![(TEMPLATE_PET.to_owned(), format!("startup-pet-{index:07}"))];
        replacements.extend(
            self.uuids
                .iter()
                .map(|uuid| (uuid.clone(), uuid::Uuid::new_v4().to_string())),
        );
        let replace = |text: &str| {
            replacements
                .iter()
                .fold(text.to_owned(), |text, (old, new)| text.replace(old, new))
        };
        let rows = self
            .rows
            .iter()
            .map(|row| Row {
                aggregate_id: replace(&row.aggregate_id),
                payload: replace(&row.payload),
                metadata: replace(&row.metadata),
                ..row.clone()
            })
            .collect();
        (rows, replace(&self.order_id))
    }
}

/// Every string in `value` that is a hyphenated UUID.
fn collect_uuids(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::String(text)
            if text.len() == 36 && uuid::Uuid::parse_str(text).is_ok() && !into.contains(text) =>
        {
            into.push(text.clone());
        }
        Value::Array(items) => items.iter().for_each(|item| collect_uuids(item, into)),
        Value::Object(fields) => fields.values().for_each(|item| collect_uuids(item, into)),
        _ => {}
    }
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

fn token(settings: &Settings) -> anyhow::Result<String> {
    Ok(TokenVerifier::new(&settings.security.jwt, Vec::new())?
        .issue("bench-admin", RoleName::Admin)
        .context("a token")?
        .0)
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

/// Runs one order for the demo catalog's golden retriever to completion and returns its
/// events, with the pet's `PetAdded`.
async fn template(settings: &Settings) -> anyhow::Result<Template> {
    let pool = sqlite(settings).await?;
    let application = Application::build(settings.clone(), &Role::all()).await?;
    let base = format!("http://127.0.0.1:{}", application.port());
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    let client = reqwest::Client::new();
    until_ready(&client, &base, Duration::from_secs(60)).await?;
    let before = head(&pool).await?;
    let token = token(settings)?;
    let accepted: Value = client
        .post(format!("{base}/petstore-domain/orders"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"customer_id": "startup-bench", "pet_id": TEMPLATE_PET}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let order_id = accepted["order_id"]
        .as_str()
        .context("an order id")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while order_status(&client, &base, &token, &order_id)
        .await?
        .as_deref()
        != Some("completed")
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the template order never completed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.trigger();
    server.await??;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata
           FROM events
          WHERE global_position > $1 OR (aggregate_id = $2 AND sequence = 1)
          ORDER BY global_position",
    )
    .bind(before.global_position)
    .bind(TEMPLATE_PET)
    .fetch_all(&pool)
    .await?;
    let mut uuids = Vec::new();
    for row in &rows {
        for text in [&row.payload, &row.metadata] {
            collect_uuids(&serde_json::from_str(text)?, &mut uuids);
        }
        collect_uuids(&Value::String(row.aggregate_id.clone()), &mut uuids);
    }
    anyhow::ensure!(
        uuids.contains(&order_id),
        "the template's events do not hold its order id"
    );
    pool.close().await;
    Ok(Template {
        rows,
        order_id,
        uuids,
    })
}

/// Appends clones `from..to` of the template; the ids of the first and the last order.
async fn load(
    pool: &SqlitePool,
    template: &Template,
    from: usize,
    to: usize,
) -> anyhow::Result<(String, String)> {
    let per_transaction = (ROWS_PER_TRANSACTION / template.rows.len()).max(1);
    let mut orders = Vec::new();
    let mut index = from;
    while index < to {
        let end = (index + per_transaction).min(to);
        let mut rows = Vec::with_capacity((end - index) * template.rows.len());
        for clone in index..end {
            let (clone_rows, order_id) = template.instance(clone);
            rows.extend(clone_rows);
            if clone == from || clone + 1 == to {
                orders.push(order_id);
            }
        }
        let mut transaction = pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ",
            );
            insert.push_values(chunk, |mut values, row| {
                values
                    .push_bind(&row.aggregate_type)
                    .push_bind(&row.aggregate_id)
                    .push_bind(row.sequence)
                    .push_bind(&row.event_type)
                    .push_bind(&row.event_version)
                    .push_bind(&row.payload)
                    .push_bind(&row.metadata);
            });
            insert.build().execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        index = end;
    }
    // The cloned orders are finished sagas: the saga runner starts after them, as it would
    // have had it handled them.
    let database = Database::Sqlite(pool.clone());
    stream::save_checkpoint(&database, saga::CHECKPOINT, head(pool).await?, None).await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(pool)
        .await?;
    let first = orders.first().context("at least one clone")?.clone();
    let last = orders.last().context("at least one clone")?.clone();
    Ok((first, last))
}

async fn until_ready(client: &reqwest::Client, base: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(response) = client
            .get(format!("{base}/petstore-domain/health/ready"))
            .send()
            .await
        {
            if response.status() == 200 {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the service was not ready in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn order_status(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    order_id: &str,
) -> anyhow::Result<Option<String>> {
    let response = client
        .get(format!("{base}/petstore-domain/orders/{order_id}/status"))
        .bearer_auth(token)
        .send()
        .await?;
    if response.status() == 404 {
        return Ok(None);
    }
    let view: Value = response.error_for_status()?.json().await?;
    Ok(view["status"].as_str().map(str::to_owned))
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
        let status = order_status(&client, &base, &token, order).await?;
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
    let template = template(&settings).await?;
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
        template
            .rows
            .iter()
            .map(|row| row.event_type.as_str())
            .collect::<Vec<_>>()
            .join(", "),
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
