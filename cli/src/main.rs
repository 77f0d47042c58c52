//! `petstore`: run the service, print audit trails, replay projections, or migrate.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use petstore_cli::{Application, Role};
use petstore_domain::OrderId;
use petstore_platform::bus::KafkaBus;
use petstore_platform::cache::Cache;
use petstore_platform::database::Database;
use petstore_platform::metrics::Metrics;
use petstore_platform::resilience::Policies;
use petstore_platform::security_audit::{
    SecurityAudit, SecurityAuditEntry, SecurityAuditFilter, SecurityEventKind,
};
use petstore_platform::settings::{self, Settings};
use petstore_platform::stream;
use petstore_platform::telemetry;
use petstore_projector::{replay, RedisViews};
use petstore_query_api::audit;

/// mimalloc instead of the system allocator: the event pipeline allocates and frees many
/// small strings and JSON nodes per event, where glibc's malloc spent a third of a replay's
/// CPU (bench/README section 3).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The petstore order platform.
#[derive(Debug, Parser)]
#[command(name = "petstore", version, about)]
struct Cli {
    /// Folder with base.yaml and {PETSTORE_ENV}.yaml (default: ./config when it exists;
    /// without one, compiled defaults and the built-in local settings).
    #[arg(long, global = true, env = "PETSTORE_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service. With no configuration: every role, embedded store under ./data.
    Serve {
        /// Address to listen on (overrides http.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Roles to run, comma-separated; default all.
        #[arg(long, value_enum, value_delimiter = ',')]
        roles: Vec<Role>,
        /// Do not migrate the database at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Print the audit trail of an order or a correlation id: every event, in order, with
    /// its metadata.
    Audit {
        /// The order whose trail to print.
        #[arg(
            long,
            conflicts_with_all = ["correlation_id", "security"],
            required_unless_present_any = ["correlation_id", "security"]
        )]
        order: Option<String>,
        /// The correlation id whose trail to print.
        #[arg(long, conflicts_with = "security")]
        correlation_id: Option<String>,
        /// Print the security audit trail instead (logins, refusals, rate-limit trips, admin
        /// actions, key-set fetches), newest first.
        #[arg(long)]
        security: bool,
        /// With --security: only this subject's entries.
        #[arg(long, requires = "security")]
        subject: Option<String>,
        /// With --security: only this kind (login, token_rejected, forbidden, rate_limited,
        /// admin_action, key_set_rotation).
        #[arg(long, requires = "security")]
        kind: Option<String>,
        /// With --security: only entries at or after this RFC 3339 time.
        #[arg(long, requires = "security")]
        since: Option<String>,
        /// With --security: at most this many entries.
        #[arg(long, default_value_t = 100, requires = "security")]
        limit: u32,
        /// `table` (default) or `json`.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Rebuild projections from the event log (into shadow copies, swapped in atomically), or
    /// republish the log to Kafka. Stop the projector role of running services first.
    Replay {
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
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Read a password on standard input and print its Argon2id hash, for the
    /// `security.users` list of a config file.
    HashPassword,
    /// Events a consumer could not decode or apply and set aside: list them, have one
    /// handled again after a fix, or discard one.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterCommand,
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// Check that sagas converge under failures and crashes.
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// Apply pending database migrations and exit.
    Migrate {
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// `petstore chaos ...`.
#[derive(Debug, Subcommand)]
enum ChaosCommand {
    /// Fail each saga step in turn and kill the saga runner between steps, then check that
    /// every order settled with nothing done twice or left undone; prints a table, exits 0
    /// when every case converged, 1 when one did not.
    Saga {
        /// Orders per case.
        #[arg(long, default_value_t = 5)]
        orders: usize,
        /// Seconds each case may take to settle.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Folder of the embedded store (default: a temporary one, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// `petstore dead-letters ...`.
#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// The dead letters, newest first.
    List {
        /// Only those with this status: pending, retrying, resolved or skipped.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// `table` (default) or `json`.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Have a running saga runner handle the event again; waits for the outcome and exits 0
    /// when it was handled, 1 when it failed again (or no runner took it in time).
    Retry {
        /// The dead letter.
        id: i64,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
    /// Discard the dead letter: its consumer never handles the event.
    Skip {
        /// The dead letter.
        id: i64,
    },
}

/// `petstore config ...`.
#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration without starting anything: print the effective settings
    /// (secrets redacted) and exit 0, or the refused key and exit 1.
    Check {
        /// The environment to check (default: PETSTORE_ENV, else local).
        #[arg(long)]
        env: Option<String>,
    },
}

/// A projection `replay` can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProjectionName {
    /// The Postgres read models (order status, pet catalog).
    #[value(name = "read_models", alias = "read-models")]
    ReadModels,
    /// The Redis views.
    Redis,
    /// Every projection configured.
    All,
}

/// How `audit` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// An aligned table.
    Table,
    /// The same JSON as `GET /petstore-domain/orders/{id}/audit`.
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config_dir = settings::config_dir(cli.config_dir.clone())?;
    match &cli.command {
        Command::HashPassword => return hash_password(),
        Command::Config(ConfigCommand::Check { env }) => {
            return config_check(config_dir.as_deref(), env.as_deref());
        }
        _ => {}
    }
    let settings = Settings::load(config_dir.as_deref())?;
    let telemetry = telemetry::init(&settings.log).context("setting up telemetry")?;
    if telemetry.exporting() {
        tracing::info!("exporting spans over OTLP");
    }
    let outcome = run(cli.command, settings).await;
    // Export the spans still buffered, whatever the outcome.
    telemetry.shutdown().await;
    outcome
}

async fn run(command: Command, mut settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            listen,
            data_dir,
            roles,
            no_migrate,
        } => {
            if let Some(listen) = listen {
                settings.http.listen = listen;
            }
            if let Some(data_dir) = data_dir {
                settings.storage.data_dir = data_dir;
            }
            if no_migrate {
                settings.database.migrate_on_start = false;
            }
            let roles: BTreeSet<Role> = if roles.is_empty() {
                Role::all()
            } else {
                roles.into_iter().collect()
            };
            let application = Application::build(settings, &roles)
                .await
                .context("starting the service")?;
            tracing::info!(port = application.port(), ?roles, "listening");
            let shutdown = application.shutdown_handle();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                shutdown.trigger();
            });
            application.run_until_stopped().await?;
        }
        Command::Audit {
            order,
            correlation_id,
            security,
            subject,
            kind,
            since,
            limit,
            format,
            data_dir,
        } => {
            if let Some(data_dir) = data_dir {
                settings.storage.data_dir = data_dir;
            }
            let database = Database::connect(&settings.database, &settings.storage).await?;
            if security {
                let filter = SecurityAuditFilter {
                    subject,
                    kind: kind
                        .map(|kind| {
                            SecurityEventKind::parse(&kind)
                                .with_context(|| format!("--kind: no kind is called {kind}"))
                        })
                        .transpose()?,
                    since_ms: since
                        .map(|since| {
                            chrono::DateTime::parse_from_rfc3339(&since)
                                .map(|time| time.timestamp_millis())
                                .with_context(|| format!("--since: {since} is not RFC 3339"))
                        })
                        .transpose()?,
                    limit,
                    ..SecurityAuditFilter::default()
                };
                let entries = SecurityAudit::new(database.clone()).query(&filter).await?;
                database.close().await;
                let mut stdout = std::io::stdout().lock();
                match format {
                    Format::Json => {
                        writeln!(stdout, "{}", serde_json::to_string_pretty(&entries)?)?;
                    }
                    Format::Table => writeln!(stdout, "{}", security_table(&entries))?,
                }
                return Ok(());
            }
            let trail = match (order, correlation_id) {
                (Some(order), _) => {
                    let order_id = OrderId::parse(&order)?;
                    audit::by_order(&database, &order_id)
                        .await?
                        .with_context(|| format!("order {order_id} does not exist"))?
                }
                (None, Some(correlation_id)) => {
                    audit::by_correlation(&database, &correlation_id).await?
                }
                (None, None) => anyhow::bail!("give --order or --correlation-id"),
            };
            database.close().await;
            let mut stdout = std::io::stdout().lock();
            match format {
                Format::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&trail)?)?,
                Format::Table => writeln!(stdout, "{}", audit_table(&trail))?,
            }
        }
        Command::Replay {
            projection,
            to_kafka,
            from_position,
            dry_run,
            batch_size,
        } => {
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
                        replay::rebuild_read_models(&database, batch_size, dry_run, &mut |n| {
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
                        replay::rebuild_redis(&database, &views, batch_size, dry_run, &mut |n| {
                            progress.advance(n)
                        })
                        .await?
                    }
                    ReplayTask::Kafka => {
                        let bus = KafkaBus::new(
                            &settings.kafka,
                            &database.store_id().await?,
                            policies.kafka.clone(),
                        )?;
                        replay::republish(
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
        }
        Command::HashPassword => hash_password()?,
        Command::Config(_) => unreachable!("handled before the settings are loaded"),
        Command::DeadLetters { action, data_dir } => {
            if let Some(data_dir) = data_dir {
                settings.storage.data_dir = data_dir;
            }
            let database = Database::connect(&settings.database, &settings.storage).await?;
            let outcome = dead_letter_command(&database, action).await;
            database.close().await;
            outcome?;
        }
        Command::Chaos(ChaosCommand::Saga {
            orders,
            timeout,
            data_dir,
        }) => {
            anyhow::ensure!(orders > 0, "--orders must be above 0");
            let temporary = match data_dir {
                Some(data_dir) => {
                    settings.storage.data_dir = data_dir;
                    None
                }
                None => {
                    let dir = tempfile::tempdir().context("a temporary data folder")?;
                    settings.storage.data_dir = dir.path().to_path_buf();
                    Some(dir)
                }
            };
            let report = petstore_cli::chaos::saga(
                settings,
                orders,
                std::time::Duration::from_secs(timeout),
            )
            .await?;
            drop(temporary);
            use std::io::Write as _;
            let mut out = std::io::stdout();
            writeln!(out, "{}", petstore_cli::chaos::table(&report))?;
            anyhow::ensure!(report.passed(), "the sagas did not converge");
            writeln!(out, "every case converged")?;
        }
        Command::Migrate { data_dir } => {
            if let Some(data_dir) = data_dir {
                settings.storage.data_dir = data_dir;
            }
            let database = Database::connect(&settings.database, &settings.storage).await?;
            database.migrate().await.context("migrating")?;
            tracing::info!(engine = database.engine(), "migrations applied");
            database.close().await;
        }
    }
    Ok(())
}

async fn dead_letter_command(database: &Database, action: DeadLetterCommand) -> anyhow::Result<()> {
    use petstore_platform::dead_letters::{self, PENDING, RESOLVED, RETRYING, SKIPPED};
    use std::io::Write as _;
    let mut out = std::io::stdout();
    match action {
        DeadLetterCommand::List {
            status,
            limit,
            format,
        } => {
            if let Some(status) = &status {
                anyhow::ensure!(
                    [PENDING, RETRYING, RESOLVED, SKIPPED].contains(&status.as_str()),
                    "--status {status:?}: pending, retrying, resolved or skipped"
                );
            }
            anyhow::ensure!(limit > 0, "--limit must be above 0");
            let letters = dead_letters::list(database, status.as_deref(), limit).await?;
            match format {
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&letters)?)?,
                Format::Table => {
                    let mut table = comfy_table::Table::new();
                    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
                    table.set_header([
                        "id",
                        "status",
                        "consumer",
                        "event",
                        "aggregate",
                        "order",
                        "attempts",
                        "error",
                    ]);
                    for letter in &letters {
                        table.add_row([
                            letter.id.to_string(),
                            letter.status.clone(),
                            letter.consumer.clone(),
                            format!("{} {}", letter.event_type, letter.event_version),
                            format!(
                                "{} {} #{}",
                                letter.aggregate_type, letter.aggregate_id, letter.sequence
                            ),
                            letter.order_id.clone().unwrap_or_default(),
                            letter.attempts.to_string(),
                            letter.error.clone(),
                        ]);
                    }
                    writeln!(out, "{table}")?;
                    writeln!(out, "{} dead letters", letters.len())?;
                }
            }
        }
        DeadLetterCommand::Retry { id, wait } => {
            dead_letters::act(database, id, RETRYING).await?;
            writeln!(out, "dead letter {id}: retrying")?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
            loop {
                let letter = dead_letters::get(database, id)
                    .await?
                    .with_context(|| format!("dead letter {id} vanished"))?;
                match letter.status.as_str() {
                    RESOLVED => {
                        writeln!(out, "dead letter {id}: resolved")?;
                        return Ok(());
                    }
                    PENDING => anyhow::bail!("dead letter {id} failed again: {}", letter.error),
                    _ => {}
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "dead letter {id} is still retrying after {wait} s: is a saga runner running against this store?"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        DeadLetterCommand::Skip { id } => {
            dead_letters::act(database, id, SKIPPED).await?;
            writeln!(out, "dead letter {id}: skipped")?;
        }
    }
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

/// `config check`: each key of the effective settings with its value (secrets redacted) and
/// the layer it came from, then the verdict.
fn config_check(config_dir: Option<&std::path::Path>, env: Option<&str>) -> anyhow::Result<()> {
    let (environment, keys) = Settings::provenance(config_dir, env)?;
    let mut stdout = std::io::stdout().lock();
    match config_dir {
        Some(dir) => writeln!(stdout, "configuration folder: {}", dir.display())?,
        None => writeln!(
            stdout,
            "configuration folder: none (./config does not exist here)"
        )?,
    }
    for key in &keys {
        writeln!(stdout, "{} = {}   # {}", key.key, key.value, key.layer)?;
    }
    writeln!(
        stdout,
        "the configuration of environment {environment} is valid"
    )?;
    Ok(())
}

fn hash_password() -> anyhow::Result<()> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let hash = petstore_platform::auth::login::hash_password(password)
        .map_err(|error| anyhow::anyhow!("hashing failed: {error}"))?;
    writeln!(std::io::stdout().lock(), "{hash}")?;
    Ok(())
}

fn security_table(entries: &[SecurityAuditEntry]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "id",
        "at",
        "kind",
        "outcome",
        "subject",
        "client",
        "route",
        "correlation",
        "detail",
    ]);
    for entry in entries {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        table.add_row([
            entry.id.to_string(),
            entry.at.clone(),
            entry.kind.clone(),
            entry.outcome.clone(),
            text(&entry.subject),
            text(&entry.client_ip),
            format!("{} {}", text(&entry.method), text(&entry.route)),
            text(&entry.correlation_id),
            entry.detail.clone(),
        ]);
    }
    table
}

fn audit_table(trail: &audit::AuditTrail) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "#",
        "timestamp",
        "aggregate",
        "seq",
        "event",
        "ver",
        "subject",
        "causation",
        "event id",
    ]);
    for entry in &trail.events {
        table.add_row([
            entry.global_position.to_string(),
            entry.timestamp.clone(),
            format!("{} {}", entry.aggregate_type, entry.aggregate_id),
            entry.sequence.to_string(),
            entry.event_type.clone(),
            entry.event_version.clone(),
            entry.subject.clone(),
            entry.causation_id.clone(),
            entry.event_id.clone(),
        ]);
    }
    table
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
