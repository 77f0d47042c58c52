//! The saga bench: time from `POST /orders` to `completed`, at several numbers of concurrent
//! clients, against the real service on Postgres, with the layers a production deployment
//! runs optionally on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use petstore_cli::{Application, Role};
use petstore_event_store::database::Database;
use petstore_event_store::store::EventStore;
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_security::auth::TokenVerifier;
use petstore_settings::{FlagSetting, LogFormat, RoleName, Settings};
use petstore_telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::Value;

use crate::common::{add_pets, millis, BenchDatabase};
use crate::{Args, Bench};

/// A layer `saga --layers` turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Layer {
    Tracing,
    Auth,
    RateLimits,
    All,
}

/// The layers a saga bench runs with.
#[derive(Debug, Clone, Copy)]
struct Layers {
    tracing: bool,
    auth: bool,
    rate_limits: bool,
}

impl Layers {
    fn of(layers: &[Layer]) -> Self {
        let on = |layer| layers.contains(&layer) || layers.contains(&Layer::All);
        Self {
            tracing: on(Layer::Tracing),
            auth: on(Layer::Auth),
            rate_limits: on(Layer::RateLimits),
        }
    }

    fn describe(self) -> String {
        let on_off = |on: bool| if on { "on" } else { "off" };
        format!(
            "tracing export {} (every trace), authentication {} (bearer tokens verified), \
             rate limits {} (far above the load)",
            on_off(self.tracing),
            on_off(self.auth),
            on_off(self.rate_limits)
        )
    }
}

/// The customer every saga bench order is placed for (and, with the layers on, the subject
/// of the clients' token).
const BENCH_CUSTOMER: &str = "bench";

pub(crate) async fn saga(args: &Args) -> anyhow::Result<()> {
    let Bench::Saga {
        clients,
        orders,
        provider_latency_ms: latency_ms,
        with_redis,
        distributed,
        wait,
        policies,
        providers,
        layers,
    } = &args.bench
    else {
        anyhow::bail!("not the saga bench");
    };
    let (orders, latency_ms, with_redis, distributed) =
        (*orders, *latency_ms, *with_redis, *distributed);
    let layers = Layers::of(layers);
    // The tracing subscriber is global: installed once, before the first service starts.
    let telemetry = if layers.tracing {
        let receiver = petstore_bench::otlp::Receiver::start_on_own_thread()?;
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                std::env::remove_var(name);
            }
        }
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint);
        let mut log = Settings::default().log;
        log.format = LogFormat::Text;
        log.filter = "warn".to_owned();
        let telemetry = petstore_telemetry::init(&log)?;
        anyhow::ensure!(telemetry.exporting(), "spans are not exported");
        Some((telemetry, receiver))
    } else {
        None
    };
    let updates = match wait.as_str() {
        "updates" => true,
        "poll" => false,
        other => anyhow::bail!("--wait {other:?}: updates or poll"),
    };
    let policy_modes: &[bool] = match policies.as_str() {
        "on" => &[true],
        "off" => &[false],
        "both" => &[false, true],
        other => anyhow::bail!("--policies {other:?}: on, off or both"),
    };
    let provider_modes: &[bool] = match providers.as_str() {
        "in-process" => &[false],
        "http" => &[true],
        "both" => &[false, true],
        other => anyhow::bail!("--providers {other:?}: in-process, http or both"),
    };
    let modes: Vec<(bool, bool)> = provider_modes
        .iter()
        .flat_map(|http| policy_modes.iter().map(move |policies| (*http, *policies)))
        .collect();
    let compared = if provider_modes.len() == 2 {
        "http / in-process"
    } else {
        "on / off"
    };
    let with_redis = with_redis || distributed;
    let reads = if with_redis {
        "Redis"
    } else {
        "the Postgres read model"
    };
    let kafka = if distributed {
        anyhow::ensure!(
            args.kafka_brokers != "none",
            "--distributed needs a broker (--kafka-brokers)"
        );
        format!(", saga driven through Kafka at {}", args.kafka_brokers)
    } else {
        String::new()
    };
    let how = if updates {
        format!("pushed on its live-update stream (SSE) from {reads}")
    } else {
        format!("its status polled every 10 ms from {reads}")
    };
    println!("saga latency: POST /orders until `completed` is seen ({how}{kafka})");
    println!("simulated provider latency {latency_ms} ms per call (2 calls per saga); {orders} orders per level");
    println!("layers: {}", layers.describe());
    println!();
    println!(
        "| clients | providers | policies | orders | completed/s | p50 ms | p99 ms | max ms |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for &level in clients.iter() {
        let mut measured = Vec::new();
        for &(http, enabled) in &modes {
            let (elapsed, histogram) = saga_level(
                args,
                level,
                orders,
                latency_ms,
                (with_redis, distributed, updates),
                (enabled, layers, http),
            )
            .await?;
            let throughput = orders as f64 / elapsed;
            let p99 = millis(&histogram, 0.99);
            measured.push((throughput, p99));
            println!(
                "| {level} | {} | {} | {orders} | {throughput:.0} | {:.1} | {p99:.1} | {:.1} |",
                if http { "http" } else { "in-process" },
                if enabled { "on" } else { "off" },
                millis(&histogram, 0.5),
                histogram.max() as f64 / 1000.0
            );
        }
        if let [(before, before_p99), (after, after_p99)] = measured[..] {
            println!(
                "| {level} | **{compared}** | | | **{:.2}** | | **{:.2}** | |",
                after / before,
                after_p99 / before_p99
            );
        }
    }
    if let Some((telemetry, receiver)) = telemetry {
        telemetry.shutdown().await;
        println!();
        println!("spans received by the OTLP receiver: {}", receiver.spans());
    }
    Ok(())
}

/// The simulated providers over HTTP (`petstore providers serve`), answering after
/// `latency_ms`, on a thread and runtime of their own (as a provider would be another
/// process); their base URL. They run until the bench exits.
fn serve_providers(latency_ms: u64) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    let router =
        petstore_cli::provider_simulator::router(petstore_cli::provider_simulator::Behaviour {
            latency_ms,
            failure_rate: 0.0,
        });
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the providers");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, router)
                .await
                .expect("the providers serve");
        });
    });
    Ok(url)
}

/// Places an order for `pet` and waits until it is `completed`: on its live-update stream
/// (`updates`), or polling its status every 10 ms. Every request carries `token` if given.
async fn order_until_completed(
    client: &reqwest::Client,
    base: &str,
    pet: &str,
    updates: bool,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let begin = Instant::now();
    let authorized = |request: reqwest::RequestBuilder| match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let accepted = authorized(client.post(format!("{base}/petstore-domain/orders")))
        .json(&serde_json::json!({"customer_id": BENCH_CUSTOMER, "pet_id": pet}))
        .send()
        .await?;
    anyhow::ensure!(
        accepted.status() == 202,
        "POST /orders answered {}: {}",
        accepted.status(),
        accepted.text().await.unwrap_or_default()
    );
    let token = accepted
        .headers()
        .get("x-consistency-token")
        .cloned()
        .context("a consistency token")?;
    let accepted: Value = accepted.json().await?;
    let order_id = accepted["order_id"]
        .as_str()
        .context("order id")?
        .to_owned();
    if updates {
        let url = format!("{base}/petstore-domain/orders/{order_id}/updates");
        let stream = authorized(client.get(url))
            .header("accept", "text/event-stream")
            .header("x-consistency-token", token)
            .send();
        return tokio::time::timeout(Duration::from_secs(60), until_completed(stream))
            .await
            .context("order stuck")?;
    }
    loop {
        let response =
            authorized(client.get(format!("{base}/petstore-domain/orders/{order_id}/status")))
                .send()
                .await?;
        if response.status() == 200 {
            let view: Value = response.json().await?;
            match view["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("cancelled") => anyhow::bail!("order cancelled: {view}"),
                _ => {}
            }
        }
        anyhow::ensure!(begin.elapsed() < Duration::from_secs(60), "order stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads an order's SSE update stream until its terminal update: `completed`, or an error.
async fn until_completed(
    stream: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> anyhow::Result<()> {
    let mut response = stream.await?;
    anyhow::ensure!(
        response.status() == 200,
        "updates answered {}",
        response.status()
    );
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await? {
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for data in event.lines().filter_map(|line| line.strip_prefix("data: ")) {
                let update: Value = serde_json::from_str(data)?;
                match update["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some("cancelled") => anyhow::bail!("order cancelled: {update}"),
                    _ => {}
                }
            }
        }
    }
    anyhow::bail!("the update stream ended before the order completed")
}

/// One level of the saga bench: `orders` orders by `level` clients against a fresh service;
/// the seconds it took and each order's latency.
async fn saga_level(
    args: &Args,
    level: usize,
    orders: usize,
    latency_ms: u64,
    (with_redis, distributed, updates): (bool, bool, bool),
    (policies, layers, http_providers): (bool, Layers, bool),
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let database = BenchDatabase::create(&args.postgres_url).await?;
    let mut settings = database.settings();
    settings.catalog.seed_demo_pets = false;
    settings.providers.payment.latency_ms = latency_ms;
    settings.providers.delivery.latency_ms = latency_ms;
    if http_providers {
        let url = serve_providers(latency_ms)?;
        settings.providers.payment.url = Some(url.clone());
        settings.providers.delivery.url = Some(url);
    }
    settings.resilience.payment.enabled = policies;
    settings.resilience.delivery.enabled = policies;
    settings.feature_flags.real_time_order_updates = FlagSetting::On;
    settings.http.order_updates.max_connections_per_subject = 10_000;
    if layers.auth {
        settings.security.authentication_required = true;
        settings.security.jwt.secret = Some(SecretString::from(
            "pipeline-bench-secret-of-32-bytes-or-more".to_owned(),
        ));
    }
    if layers.rate_limits {
        // Limits far above the load: every request is counted, none refused.
        let limits = &mut settings.security.rate_limits;
        limits.enabled = true;
        limits.default_per_minute = 100_000_000;
        for limit in limits.routes.values_mut() {
            *limit = 100_000_000;
        }
    }
    let token = if layers.auth {
        TokenVerifier::new(&settings.security.jwt, Vec::new())?
            .issue(BENCH_CUSTOMER, RoleName::Customer)
            .map(|(token, _)| token)
    } else {
        None
    };
    let token = token.as_deref();
    if with_redis {
        settings.redis.url = Some(SecretString::from(args.redis_url.clone()));
        settings.redis.key_prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    }
    if distributed {
        let prefix = format!("bench_{}", uuid::Uuid::new_v4().simple());
        settings.kafka.brokers = Some(args.kafka_brokers.clone());
        settings.kafka.consumer_group = format!("{prefix}.saga");
        settings.kafka.topic_prefix = prefix;
        if let Some(wait) = args.kafka_fetch_wait_ms {
            settings.kafka.fetch_wait_max_ms = wait;
        }
        if let Some(linger) = args.kafka_linger_ms {
            settings.kafka.linger_ms = linger;
        }
    }
    let application = Application::build(settings.clone(), &Role::all()).await?;
    let base = format!("http://127.0.0.1:{}", application.port());
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    let connected = Database::connect(&settings.database, &settings.storage).await?;
    let store = EventStore::new(connected, 8);
    let mut pets = add_pets(&store, orders + 1).await?;
    let client = reqwest::Client::new();
    // One order first, unmeasured: connections, and with Kafka the consumer group's join.
    let warm_up = pets.pop().context("a pet")?;
    order_until_completed(&client, &base, &warm_up, updates, token).await?;
    let pets = Arc::new(pets);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..level).map(|_| {
        let (client, base, pets, next) = (client.clone(), base.clone(), pets.clone(), next.clone());
        let token = token.map(str::to_owned);
        async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(pet) = pets.get(index) else {
                    return anyhow::Ok(histogram);
                };
                let begin = Instant::now();
                order_until_completed(&client, &base, pet, updates, token.as_deref()).await?;
                histogram.record(begin.elapsed().as_micros() as u64)?;
            }
        }
    });
    let mut histogram = Histogram::<u64>::new(3)?;
    for result in futures::future::join_all(workers).await {
        histogram.add(result?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.trigger();
    server.await??;
    store.database().close().await;
    if with_redis {
        Cache::connect(
            &settings.redis,
            Policies::fixed(&settings.resilience, &Metrics::new()).redis,
        )?
        .delete_namespace(&settings.redis.key_prefix)
        .await?;
    }
    database.drop().await?;
    Ok((elapsed, histogram))
}
