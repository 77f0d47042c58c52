//! `petstore`: run the service, print audit trails, replay projections, or migrate. This
//! file parses the command line, loads the settings and dispatches; each subcommand lives in
//! a module of its own (`commands`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use petstore_settings::Settings;

mod commands;

use commands::{
    audit, chaos, config, dead_letters, explain, hash_password, migrate, providers, replay, serve,
};

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
    Serve(serve::Args),
    /// Print the audit trail of an order or a correlation id: every event, in order, with
    /// its metadata.
    Audit(audit::Args),
    /// What happened to an order and what it waits for: its timeline (commands, events,
    /// saga steps, compensations, deadlines, dead letters) and where it stands now. Exits 0
    /// when terminal, 3 in flight, 4 stuck, 2 for an unknown order.
    Explain(explain::Args),
    /// Rebuild projections from the event log (into shadow copies, swapped in atomically), or
    /// republish the log to Kafka. Stop the projector role of running services first.
    Replay(replay::Args),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(config::Command),
    /// Read a password on standard input and print its Argon2id hash, for the
    /// `security.users` list of a config file.
    HashPassword,
    /// Events a consumer could not decode or apply and set aside: list them, have one
    /// handled again after a fix, or discard one.
    DeadLetters(dead_letters::Args),
    /// Check that sagas converge under failures and crashes.
    #[command(subcommand)]
    Chaos(chaos::Command),
    /// Apply pending database migrations and exit.
    Migrate(migrate::Args),
    /// The payment gateway and delivery provider, simulated, over HTTP.
    #[command(subcommand)]
    Providers(providers::Command),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config_dir = petstore_settings::config_dir(cli.config_dir.clone())?;
    // These two need no settings (and no telemetry).
    match &cli.command {
        Command::HashPassword => return hash_password::run().map(|()| ExitCode::SUCCESS),
        Command::Config(command) => {
            return config::run(command, config_dir.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        _ => {}
    }
    let settings = Settings::load(config_dir.as_deref())?;
    let telemetry = petstore_telemetry::init(&settings.log).context("setting up telemetry")?;
    if telemetry.exporting() {
        tracing::info!("exporting spans over OTLP");
    }
    let outcome = run(cli.command, settings, config_dir).await;
    // Export the spans still buffered, whatever the outcome.
    telemetry.shutdown().await;
    outcome
}

async fn run(
    command: Command,
    settings: Settings,
    config_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if let Command::Explain(args) = command {
        return explain::run(args, settings).await;
    }
    let outcome = match command {
        Command::Serve(args) => serve::run(args, settings).await,
        Command::Audit(args) => audit::run(args, settings).await,
        Command::Replay(args) => replay::run(args, settings).await,
        Command::DeadLetters(args) => dead_letters::run(args, settings).await,
        Command::Chaos(command) => chaos::run(command, settings, config_dir).await,
        Command::Migrate(args) => migrate::run(args, settings).await,
        Command::Providers(command) => providers::run(command).await,
        Command::HashPassword | Command::Config(_) | Command::Explain(_) => {
            unreachable!("handled before")
        }
    };
    outcome.map(|()| ExitCode::SUCCESS)
}
