//! `petstore chaos saga`: fail each saga step in turn and kill the saga runner between
//! steps, then check that every order settled (`petstore_cli::chaos` runs the cases).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use petstore_settings::Settings;

/// `petstore chaos ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
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

/// Runs the check and prints its table; an error when a case did not converge. The
/// ownership cases start this binary, with `config_dir`, as saga runners.
pub async fn run(
    command: Command,
    mut settings: Settings,
    config_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let Command::Saga {
        orders,
        timeout,
        data_dir,
    } = command;
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
    let runners = petstore_cli::chaos::Runners {
        program: std::env::current_exe().context("the path of this binary")?,
        config_dir,
    };
    let timeout = std::time::Duration::from_secs(timeout);
    let report = petstore_cli::chaos::saga(settings, orders, timeout, &runners).await?;
    drop(temporary);
    let mut out = std::io::stdout();
    writeln!(out, "{}", petstore_cli::chaos::table(&report))?;
    anyhow::ensure!(report.passed(), "the sagas did not converge");
    writeln!(out, "every case converged")?;
    Ok(())
}
