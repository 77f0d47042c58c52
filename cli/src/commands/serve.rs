//! `petstore serve`: run the service until SIGINT or SIGTERM, then shut down gracefully.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use petstore_cli::{Application, Role};
use petstore_settings::Settings;

/// `petstore serve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
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
}

/// Runs the service with `args` over `settings` until a signal stops it.
pub async fn run(args: Args, mut settings: Settings) -> anyhow::Result<()> {
    if let Some(listen) = args.listen {
        settings.http.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        settings.storage.data_dir = data_dir;
    }
    if args.no_migrate {
        settings.database.migrate_on_start = false;
    }
    let roles: BTreeSet<Role> = if args.roles.is_empty() {
        Role::all()
    } else {
        args.roles.into_iter().collect()
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
    Ok(())
}

pub(crate) async fn wait_for_signal() {
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
