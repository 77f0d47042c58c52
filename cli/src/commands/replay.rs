//! `petstore replay`: rebuild projections from the event log into shadow copies swapped in
//! atomically, or republish the log to Kafka; a progress bar on a terminal, a line a second
//! otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use petstore_event_store::database::Database;
use petstore_event_store::stream;
use petstore_kafka::KafkaBus;
use petstore_projector::replay::republish;
use petstore_read_models::rebuild;
use petstore_read_models::RedisViews;
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_settings::Settings;
use petstore_telemetry::metrics::Metrics;

/// `petstore replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which projection to rebuild.
    #[arg(
        long,
        value_enum,
        required_unless_present = "to_kafka",
        conflicts_with = "to_kafka"
    )]
    projection: Option<ProjectionName>,
    /// Republish events to Kafka instead.
    #[arg(long)]
    to_kafka: bool,
    /// With --to-kafka: only events after this global position.
    #[arg(long, default_value_t = 0, requires = "to_kafka")]
    from_position: i64,
    /// Read the log and count, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
}

/// A projection `replay` can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProjectionName {
    /// The Postgres read models (order status, pet catalog).
    #[value(name = "read_models", alias = "read-models")]
    ReadModels,
    /// The Redis views.
    Redis,
    /// Every projection configured.
    All,
}

/// Rebuilds or republishes what `args` names.
pub async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    let Args {
        projection,
        to_kafka,
        from_position,
        dry_run,
        batch_size,
    } = args;
    let database = Database::connect(&settings.database, &settings.storage).await?;
    if !dry_run {
        database.migrate().await?;
    }
    let total = stream::head_position(&database)
        .await?
        .global_position
        .max(0) as u64;
    let mut runs: Vec<(&str, ReplayTask)> = Vec::new();
    if to_kafka {
        runs.push(("kafka", ReplayTask::Kafka));
    }
    if matches!(
        projection,
        Some(ProjectionName::ReadModels | ProjectionName::All)
    ) {
        runs.push(("read_models", ReplayTask::ReadModels));
    }
    if matches!(
        projection,
        Some(ProjectionName::Redis | ProjectionName::All)
    ) {
        if settings.redis.url.is_some() {
            runs.push(("redis", ReplayTask::Redis));
        } else if projection == Some(ProjectionName::Redis) {
            anyhow::bail!("redis.url (REDIS_URL) is not set");
        } else {
            writeln!(
                std::io::stderr(),
                "redis: skipped (redis.url / REDIS_URL is not set)"
            )?;
        }
    }
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    for (name, task) in runs {
        let mut progress = Progress::new(name, total);
        let report = match task {
            ReplayTask::ReadModels => {
                rebuild::rebuild_read_models(&database, batch_size, dry_run, &mut |n| {
                    progress.advance(n)
                })
                .await?
            }
            ReplayTask::Redis => {
                let views = RedisViews::new(
                    Cache::connect(&settings.redis, policies.redis.clone())?,
                    Duration::from_secs(settings.redis.browse_ttl_seconds),
                )
                .with_dead_letters(database.clone());
                rebuild::rebuild_redis(&database, &views, batch_size, dry_run, &mut |n| {
                    progress.advance(n)
                })
                .await?
            }
            ReplayTask::Kafka => {
                let bus = KafkaBus::new(
                    &settings.kafka,
                    &database.store_id().await?,
                    database
                        .saga_partitions(settings.saga.partitions()?)
                        .await?,
                    policies.kafka.clone(),
                )?;
                republish(
                    &database,
                    &bus,
                    from_position,
                    batch_size,
                    dry_run,
                    &mut |n| progress.advance(n),
                )
                .await?
            }
        };
        progress.finish();
        let seconds = report.elapsed.as_secs_f64().max(1e-9);
        let mode = if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        };
        writeln!(
            std::io::stderr(),
            "{name}: {} events read, {} applied in {:.2}s ({:.0} events/s){mode}",
            report.events,
            report.applied,
            seconds,
            report.events as f64 / seconds
        )?;
    }
    database.close().await;
    Ok(())
}

enum ReplayTask {
    ReadModels,
    Redis,
    Kafka,
}

/// Replay progress: a progress bar with events/s on a terminal, a plain line a second
/// otherwise (logs, CI).
struct Progress {
    name: &'static str,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
    done: u64,
}

impl Progress {
    fn new(name: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {pos}/{len} events {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(name);
            bar
        });
        Self {
            name,
            bar,
            started: Instant::now(),
            last_line: Instant::now(),
            done: 0,
        }
    }

    fn advance(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(1) => {
                self.last_line = Instant::now();
                let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
                let _ = writeln!(
                    std::io::stderr(),
                    "{}: {done} events ({rate:.0} events/s)",
                    self.name
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
