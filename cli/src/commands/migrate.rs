//! `petstore migrate`: apply the pending migrations of the configured store and exit.

use std::path::PathBuf;

use anyhow::Context;
use petstore_event_store::database::Database;
use petstore_settings::Settings;

/// `petstore migrate`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of the embedded store (overrides storage.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Migrates the store.
pub async fn run(args: Args, mut settings: Settings) -> anyhow::Result<()> {
    if let Some(data_dir) = args.data_dir {
        settings.storage.data_dir = data_dir;
    }
    let database = Database::connect(&settings.database, &settings.storage).await?;
    database.migrate().await.context("migrating")?;
    tracing::info!(engine = database.engine(), "migrations applied");
    database.close().await;
    Ok(())
}
