//! `petstore config check`: validate the configuration of an environment without starting
//! anything, and say which layer each key came from.

use std::io::Write;
use std::path::Path;

use petstore_settings::Settings;

/// `petstore config ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate the configuration without starting anything: print each key's value
    /// (secrets redacted) and the layer it came from, and exit 0, or the refused key and
    /// exit 1.
    Check {
        /// The environment to check (default: PETSTORE_ENV, else local).
        #[arg(long)]
        env: Option<String>,
    },
}

/// Runs `command` with the config folder in use.
pub fn run(command: &Command, config_dir: Option<&Path>) -> anyhow::Result<()> {
    match command {
        Command::Check { env } => check(config_dir, env.as_deref()),
    }
}

/// `config check`: each key of the effective settings with its value (secrets redacted) and
/// the layer it came from, then the verdict.
fn check(config_dir: Option<&Path>, env: Option<&str>) -> anyhow::Result<()> {
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
