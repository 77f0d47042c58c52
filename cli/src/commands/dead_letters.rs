//! `petstore dead-letters`: the events consumers set aside: list them, have one handled
//! again after a fix (and wait for the outcome), or discard one.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use petstore_event_store::database::Database;
use petstore_event_store::dead_letters::{self, DeadLetterStatus};
use petstore_settings::Settings;

use super::Format;

/// `petstore dead-letters`' arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Command,
    /// Folder of the embedded store (overrides storage.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

/// `petstore dead-letters ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
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

/// Connects to the store and does what `args` asks.
pub async fn run(args: Args, mut settings: Settings) -> anyhow::Result<()> {
    if let Some(data_dir) = args.data_dir {
        settings.storage.data_dir = data_dir;
    }
    let database = Database::connect(&settings.database, &settings.storage).await?;
    let outcome = act(&database, args.action).await;
    database.close().await;
    outcome
}

async fn act(database: &Database, action: Command) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match action {
        Command::List {
            status,
            limit,
            format,
        } => {
            let status = status
                .map(|status| {
                    DeadLetterStatus::parse(&status).with_context(|| {
                        format!("--status {status:?}: pending, retrying, resolved or skipped")
                    })
                })
                .transpose()?;
            anyhow::ensure!(limit > 0, "--limit must be above 0");
            let letters = dead_letters::list(database, status, limit).await?;
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
                            letter.status.to_string(),
                            letter.consumer.clone(),
                            format!("{} {}", letter.event_type, letter.event_version),
                            format!(
                                "{} {} #{}",
                                letter.aggregate_type, letter.aggregate_id, letter.sequence
                            ),
                            letter.order_id.map(|id| id.to_string()).unwrap_or_default(),
                            letter.attempts.to_string(),
                            letter.error.clone(),
                        ]);
                    }
                    writeln!(out, "{table}")?;
                    writeln!(out, "{} dead letters", letters.len())?;
                }
            }
        }
        Command::Retry { id, wait } => {
            dead_letters::act(database, id, DeadLetterStatus::Retrying).await?;
            writeln!(out, "dead letter {id}: retrying")?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
            loop {
                let letter = dead_letters::get(database, id)
                    .await?
                    .with_context(|| format!("dead letter {id} vanished"))?;
                match letter.status {
                    DeadLetterStatus::Resolved => {
                        writeln!(out, "dead letter {id}: resolved")?;
                        return Ok(());
                    }
                    DeadLetterStatus::Pending => {
                        anyhow::bail!("dead letter {id} failed again: {}", letter.error)
                    }
                    DeadLetterStatus::Retrying | DeadLetterStatus::Skipped => {}
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "dead letter {id} is still retrying after {wait} s: is a saga runner running against this store?"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Command::Skip { id } => {
            dead_letters::act(database, id, DeadLetterStatus::Skipped).await?;
            writeln!(out, "dead letter {id}: skipped")?;
        }
    }
    Ok(())
}
