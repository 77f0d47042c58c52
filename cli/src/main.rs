//! `petstore`: run the service, print audit trails, or migrate the database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use petstore_cli::{Application, Role};
use petstore_domain::OrderId;
use petstore_platform::database::Database;
use petstore_platform::settings::Settings;
use petstore_platform::telemetry;
use petstore_query_api::audit;

/// The petstore order platform.
#[derive(Debug, Parser)]
#[command(name = "petstore", version, about)]
struct Cli {
    /// Folder with base.yaml and {PETSTORE_ENV}.yaml.
    #[arg(
        long,
        global = true,
        default_value = "config",
        env = "PETSTORE_CONFIG_DIR"
    )]
    config_dir: PathBuf,
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
            conflicts_with = "correlation_id",
            required_unless_present = "correlation_id"
        )]
        order: Option<String>,
        /// The correlation id whose trail to print.
        #[arg(long)]
        correlation_id: Option<String>,
        /// `table` (default) or `json`.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
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
    let mut settings = Settings::load(&cli.config_dir)?;
    telemetry::init(&settings.log);
    match cli.command {
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
            format,
            data_dir,
        } => {
            if let Some(data_dir) = data_dir {
                settings.storage.data_dir = data_dir;
            }
            let database = Database::connect(&settings.database, &settings.storage).await?;
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
