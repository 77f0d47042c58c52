//! `petstore providers serve`: the simulated payment gateway and delivery provider over HTTP
//! ([`petstore_cli::provider_simulator`]), until SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use petstore_cli::provider_simulator::{self, Behaviour};

/// `petstore providers`' subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve the simulated providers: point `providers.payment.url` and
    /// `providers.delivery.url` at it.
    Serve(ServeArgs),
}

/// `petstore providers serve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:4010")]
    listen: SocketAddr,
    /// Latency of each answer, in milliseconds (each varies by up to ±50 %).
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Share of calls answered 503 (transient failures), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = failure_rate)]
    failure_rate: f64,
}

fn failure_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("{value} is not a share between 0.0 and 1.0")),
    }
}

/// Runs `command`.
pub async fn run(command: Command) -> anyhow::Result<()> {
    let Command::Serve(args) = command;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr()?;
    let router = provider_simulator::router(Behaviour {
        latency_ms: args.latency_ms,
        failure_rate: args.failure_rate,
    });
    tracing::info!(%address, "simulated providers listening");
    // Said on standard output too, for scripts that started it on port 0.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "providers listening on http://{address}")?;
        stdout.flush()?;
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(super::serve::wait_for_signal())
        .await
        .context("serving the simulated providers")
}
