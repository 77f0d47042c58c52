//! One module per `petstore` subcommand: its arguments and what it does. `main` only parses
//! the command line, loads the settings and dispatches here.
//!
//! # Layout
//! - [`serve`]: run the service (`Application`) until a signal.
//! - [`audit`]: an order's, a correlation id's or the security audit trail.
//! - [`explain`]: an order's timeline and what it waits for; the exit code says where it stands.
//! - [`replay`]: rebuild projections, or republish the log to Kafka, with progress.
//! - [`dead_letters`]: list, retry or skip events consumers set aside.
//! - [`chaos`]: the saga convergence check (`petstore_cli::chaos` runs it).
//! - [`config`]: `config check`, each key with the layer it came from.
//! - [`migrate`]: apply the migrations.
//! - [`providers`]: `providers serve`, the simulated providers over HTTP.
//! - [`hash_password`]: the Argon2id hash of a password read on standard input.

pub mod audit;
pub mod chaos;
pub mod config;
pub mod dead_letters;
pub mod explain;
pub mod hash_password;
pub mod migrate;
pub mod providers;
pub mod replay;
pub mod serve;

/// How `audit` and `dead-letters list` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// The same JSON as the HTTP API answers.
    Json,
}
