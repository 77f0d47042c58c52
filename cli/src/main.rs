//! `petstore`: run the service, or migrate its database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use petstore_cli::{Application, Role};
use petstore_platform::database::Database;
use petstore_platform::settings::Settings;
use petstore_platform::telemetry;

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
    /// Apply pending database migrations and exit.
    Migrate {
        /// Folder of the embedded store (overrides storage.data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
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
