//! `auth-bench`: what authentication and rate limiting cost. Request throughput of the real
//! service on a protected read (`GET /petstore-domain/orders/{id}/status`) with every request
//! carrying an HS256 bearer token that is verified, and counted against a per-subject quota
//! set far above the load, as a ratio of the same service in demo mode with rate limits off
//! (no token verified, no quota counted). Both run in this process on embedded stores, on
//! loopback ports; the two configurations alternate round by round so that drift on a shared
//! machine spreads over both.

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use petstore_cli::{Application, Role};
use petstore_security::auth::TokenVerifier;
use petstore_settings::{LogFormat, RoleName, Settings};
use secrecy::SecretString;

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "auth-bench", about)]
struct Args {
    /// Seconds each configuration is measured per round (after 1 s of warm-up).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds: each runs both configurations once, in alternating order.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

struct Service {
    base: String,
    order_id: String,
    token: Option<String>,
    _data: tempfile::TempDir,
}

async fn start(secured: bool) -> anyhow::Result<Service> {
    let data = tempfile::tempdir()?;
    let mut settings = Settings::default();
    settings.http.listen = ([127, 0, 0, 1], 0).into();
    settings.storage.data_dir = data.path().to_path_buf();
    settings.log.format = LogFormat::Text;
    settings.log.filter = "warn".to_owned();
    settings.providers.payment.latency_ms = 0;
    settings.providers.delivery.latency_ms = 0;
    settings.security.jwt.secret = Some(SecretString::from(
        "auth-bench-secret-of-32-bytes-or-more".to_owned(),
    ));
    if secured {
        // Limits far above the load: every request is counted, none refused.
        settings.security.rate_limits.default_per_minute = 100_000_000;
    } else {
        settings.security.authentication_required = false;
        settings.security.rate_limits.enabled = false;
    }
    let token = TokenVerifier::new(&settings.security.jwt, Vec::new())?
        .issue("customer-001", RoleName::Customer)
        .map(|(token, _)| token);
    let application = Application::build(settings, &Role::all()).await?;
    let base = format!("http://127.0.0.1:{}", application.port());
    tokio::spawn(application.run_until_stopped());
    let client = reqwest::Client::new();
    let mut order = client.post(format!("{base}/petstore-domain/orders")).json(
        &serde_json::json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}),
    );
    if let Some(token) = &token {
        order = order.bearer_auth(token);
    }
    let accepted: serde_json::Value = order.send().await?.error_for_status()?.json().await?;
    let order_id = accepted["order_id"].as_str().unwrap_or_default().to_owned();
    // Wait until the read model has the order.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut request = client.get(format!("{base}/petstore-domain/orders/{order_id}/status"));
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        if request.send().await?.status() == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the order never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Service {
        base,
        order_id,
        token: if secured { token } else { None },
        _data: data,
    })
}

/// Requests a second over `seconds`, after a second of warm-up.
async fn drive(service: &Service, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let url = format!(
        "{}/petstore-domain/orders/{}/status",
        service.base, service.order_id
    );
    let counted = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, token, counted, failures) = (
            url.clone(),
            service.token.clone(),
            counted.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let mut request = client.get(&url);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let ok = request
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == 200);
                if now >= start {
                    if ok {
                        counted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    anyhow::ensure!(
        failures.load(Ordering::Relaxed) == 0,
        "some requests failed"
    );
    Ok(counted.load(Ordering::Relaxed) as f64 / seconds as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let open = start(false).await?;
    let secured = start(true).await?;
    let (mut open_total, mut secured_total) = (0.0, 0.0);
    let mut ratios = Vec::new();
    println!("round | auth + rate limits req/s | demo mode, no limits req/s | ratio");
    for round in 1..=args.rounds {
        // Alternate which goes first, so that drift on a shared machine favours neither.
        let (on, off) = if round % 2 == 0 {
            let on = drive(&secured, args.clients, args.seconds).await?;
            (on, drive(&open, args.clients, args.seconds).await?)
        } else {
            let off = drive(&open, args.clients, args.seconds).await?;
            (drive(&secured, args.clients, args.seconds).await?, off)
        };
        open_total += off;
        secured_total += on;
        ratios.push(on / off);
        println!("{round} | {on:.0} | {off:.0} | {:.3}", on / off);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "total | {:.0} | {:.0} | {:.3} (median of rounds {:.3})",
        secured_total / f64::from(args.rounds),
        open_total / f64::from(args.rounds),
        secured_total / open_total,
        ratios[ratios.len() / 2]
    );
    Ok(())
}
