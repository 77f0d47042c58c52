//! `trace-bench`: what tracing costs. Request throughput, latency and the service process's
//! CPU time per request (from `/proc`) of the real service with spans exported over OTLP/HTTP
//! to a local receiver (all traces, or 10 % sampled), as a ratio of the same service with no
//! exporter configured (the default: spans carry ids for logs and propagation but are not
//! recorded), and of one with OpenTelemetry disabled altogether (`OTEL_SDK_DISABLED=true`).
//!
//! Each configuration runs in a process of its own (the tracing subscriber is global): this
//! binary re-runs itself as the service, embedded store in a fresh temporary folder, on a
//! free loopback port. The configurations alternate round by round so that drift on a
//! shared machine spreads over all of them. The receiver, a process of its own as a collector
//! or agent would be, decodes every export request with the OpenTelemetry protocol's own
//! message types and counts the spans.

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use petstore_bench::otlp::Receiver;
use petstore_cli::{Application, Role};
use petstore_settings::{LogFormat, Settings};

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "trace-bench", about)]
struct Args {
    /// Seconds each configuration is measured per round (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds: each runs every configuration once.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Run as the service (internal: the bench starts itself this way).
    #[arg(long, hide = true)]
    serve: Option<std::path::PathBuf>,
    /// Run as the OTLP receiver (internal: the bench starts itself this way).
    #[arg(long, hide = true)]
    receive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Disabled,
    NotExported,
    Exported,
    ExportedSampled,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Disabled => "OpenTelemetry disabled",
            Self::NotExported => "no exporter (default)",
            Self::Exported => "exported over OTLP",
            Self::ExportedSampled => "exported, 10 % of traces sampled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `GET /petstore-domain/pets/{id}`.
    Reads,
    /// `POST /petstore-domain/orders`, each starting a saga (spans in the background too).
    Orders,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(data_dir) = &args.serve {
        return serve(data_dir).await;
    }
    if args.receive {
        return receive().await;
    }
    // The receiver is a process of its own, as a collector or agent would be.
    let mut receiver_process = Command::new(std::env::current_exe()?)
        .arg("--receive")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut receiver_output =
        std::io::BufReader::new(receiver_process.stdout.take().context("piped stdout")?);
    let receiver = {
        use std::io::BufRead;
        let mut line = String::new();
        receiver_output.read_line(&mut line)?;
        line.trim()
            .strip_prefix("ENDPOINT ")
            .context("the receiver did not start")?
            .to_owned()
    };
    println!(
        "trace-bench: {} s per configuration and round, {} rounds, {} clients, embedded store",
        args.seconds, args.rounds, args.clients
    );
    let modes = [
        Mode::NotExported,
        Mode::Exported,
        Mode::ExportedSampled,
        Mode::Disabled,
    ];
    for workload in [Workload::Reads, Workload::Orders] {
        let mut results: Vec<(Mode, Measurement)> = Vec::new();
        for _ in 0..args.rounds {
            for mode in modes {
                let service = BenchService::start(mode, &receiver).await?;
                let measured = drive(&service.base, workload, &args, service.child.id()).await?;
                service.stop();
                results.push((mode, measured));
            }
        }
        println!("\n{workload:?}:");
        println!(
            "| configuration | requests/s | p50 ms | p99 ms | ratio to no exporter | service CPU µs/request | ratio |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let baseline = mean_of(&results, Mode::NotExported, |measured| measured.rate);
        let baseline_cpu = mean_of(&results, Mode::NotExported, |measured| {
            measured.cpu_per_request
        });
        for mode in modes {
            let rate = mean_of(&results, mode, |measured| measured.rate);
            let cpu = mean_of(&results, mode, |measured| measured.cpu_per_request);
            let (p50, p99) = percentiles(&results, mode);
            println!(
                "| {} | {rate:.0} | {p50:.2} | {p99:.2} | **{:.2}** | {:.1} | {:.2} |",
                mode.name(),
                rate / baseline,
                cpu * 1e6,
                cpu / baseline_cpu
            );
        }
        for mode in modes {
            let rates: Vec<String> = results
                .iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, measured)| format!("{:.0}", measured.rate))
                .collect();
            println!("  {} per round: {}", mode.name(), rates.join(" / "));
        }
    }
    // Closing its stdin asks the receiver for its count.
    drop(receiver_process.stdin.take());
    let mut count = String::new();
    std::io::BufRead::read_line(&mut receiver_output, &mut count)?;
    let _ = receiver_process.wait();
    println!("\nspans received by the OTLP receiver: {}", count.trim());
    Ok(())
}

/// The OTLP receiver process: prints its endpoint, receives until its stdin closes, then
/// prints how many spans it decoded.
async fn receive() -> anyhow::Result<()> {
    let receiver = Receiver::start().await?;
    println!("ENDPOINT {}", receiver.endpoint);
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await?;
    println!("{}", receiver.spans());
    Ok(())
}

/// The service, as a child process of this bench.
async fn serve(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut settings = Settings::default();
    settings.http.listen = ([127, 0, 0, 1], 0).into();
    settings.storage.data_dir = data_dir.to_path_buf();
    settings.log.format = LogFormat::Json;
    settings.log.filter = "warn".to_owned();
    settings.providers.payment.latency_ms = 0;
    settings.providers.delivery.latency_ms = 0;
    // Demo mode, no rate limits: this bench measures tracing, not auth.
    settings.security.authentication_required = false;
    settings.security.rate_limits.enabled = false;
    let telemetry = petstore_telemetry::init(&settings.log)?;
    let application = Application::build(settings, &Role::all()).await?;
    println!("PORT {}", application.port());
    let shutdown = application.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.trigger();
    });
    application.run_until_stopped().await?;
    telemetry.shutdown().await;
    Ok(())
}

struct BenchService {
    child: Child,
    base: String,
    _data: tempfile::TempDir,
}

impl BenchService {
    async fn start(mode: Mode, receiver: &str) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--serve")
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        match mode {
            Mode::Disabled => {
                command.env("OTEL_SDK_DISABLED", "true");
            }
            Mode::NotExported => {}
            Mode::Exported => {
                command.env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver);
            }
            Mode::ExportedSampled => {
                command
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
                    .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
                    .env("OTEL_TRACES_SAMPLER_ARG", "0.1");
            }
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let port = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| {
                    line.strip_prefix("PORT ")
                        .and_then(|port| port.parse::<u16>().ok())
                })
        })
        .await?
        .context("the service did not start")?;
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .map_or(true, |response| response.status() != 200)
        {
            anyhow::ensure!(Instant::now() < deadline, "the service never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            base,
            _data: data,
        })
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Measurement {
    rate: f64,
    latency: Histogram<u64>,
    /// CPU seconds the service process used (user and system) per request measured.
    cpu_per_request: f64,
}

/// CPU seconds a process has used (user and system), from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after_name = stat.rsplit_once(')').context("a stat line")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .context("utime and stime")?
        .iter()
        .map(|field| field.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    // The kernel's USER_HZ, 100 on Linux.
    Ok(ticks as f64 / 100.0)
}

async fn drive(
    base: &str,
    workload: Workload,
    args: &Args,
    service: u32,
) -> anyhow::Result<Measurement> {
    let client = reqwest::Client::new();
    let warm_up = Instant::now() + Duration::from_secs(1);
    let end = warm_up + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for client_index in 0..args.clients {
        let client = client.clone();
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3)?;
            let mut count = 0_u64;
            let mut sequence = 0_u64;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                sequence += 1;
                let response = match workload {
                    Workload::Reads => {
                        client
                            .get(format!("{base}/petstore-domain/pets/golden-retriever-001"))
                            .send()
                            .await?
                    }
                    Workload::Orders => {
                        client
                            .post(format!("{base}/petstore-domain/orders"))
                            .json(&serde_json::json!({
                                "customer_id": format!("customer-{client_index}-{sequence}"),
                                "pet_id": "beagle-001",
                            }))
                            .send()
                            .await?
                    }
                };
                anyhow::ensure!(
                    response.status().is_success(),
                    "unexpected status {}",
                    response.status()
                );
                response.bytes().await?;
                if started >= warm_up {
                    count += 1;
                    latency
                        .record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
                }
            }
            anyhow::Ok((count, latency))
        }));
    }
    tokio::time::sleep_until(warm_up.into()).await;
    let cpu_before = cpu_seconds(service)?;
    tokio::time::sleep_until(end.into()).await;
    let cpu = cpu_seconds(service)? - cpu_before;
    let mut total = 0;
    let mut latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        let (count, histogram) = task.await??;
        total += count;
        latency.add(histogram)?;
    }
    Ok(Measurement {
        rate: total as f64 / args.seconds as f64,
        latency,
        cpu_per_request: cpu / total.max(1) as f64,
    })
}

fn mean_of(
    results: &[(Mode, Measurement)],
    mode: Mode,
    value: impl Fn(&Measurement) -> f64,
) -> f64 {
    let values: Vec<f64> = results
        .iter()
        .filter(|(m, _)| *m == mode)
        .map(|(_, measured)| value(measured))
        .collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn percentiles(results: &[(Mode, Measurement)], mode: Mode) -> (f64, f64) {
    let mut merged = Histogram::<u64>::new(3).expect("a valid histogram");
    for (_, measured) in results.iter().filter(|(m, _)| *m == mode) {
        let _ = merged.add(&measured.latency);
    }
    (
        merged.value_at_quantile(0.5) as f64 / 1000.0,
        merged.value_at_quantile(0.99) as f64 / 1000.0,
    )
}
