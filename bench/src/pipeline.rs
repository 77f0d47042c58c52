//! `pipeline-bench`: how fast events travel after they are appended.
//!
//! - `saga`: time from `POST /orders` to `completed` in the read model, at several numbers of
//!   concurrent clients, against the real service on Postgres (port 0), with the simulated
//!   providers at a given latency. The floor it cannot beat is two provider calls.
//! - `projector`: throughput of each projection (Postgres read models, Redis, Kafka) over a
//!   preloaded log of at least 100,000 events (distinct orders' `OrderCreated`, or whole
//!   sagas), beside a baseline measured in the same run:
//!   reading the same stream without applying it. Then the rebuild (`replay`) speed, and the
//!   end-to-end lag (append to visible in the Redis read model) at a steady order rate.
//! - `updates`: live order updates fanned out to many WebSocket subscribers: deliveries per
//!   second and the delay from each status change's event to its arrival at a client, beside
//!   the same orders followed by one subscriber each, on the embedded store and on Postgres.
//!
//! Everything runs against 127.0.0.1 only, in a fresh database `petstore_bench_<hex>` that is
//! dropped at the end, with its own Redis key prefix and Kafka topic prefix.

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use petstore_bench::saga_log::Template;
use petstore_cli::{Application, Role};
use petstore_domain::order::{OrderEvent, OrderRequest};
use petstore_domain::pet::{Pet, PetCommand, PetDetails};
use petstore_domain::{CustomerId, Money, OrderId, PetCategory, PetId};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::{self, StreamPosition, StreamReader};
use petstore_kafka::KafkaBus;
use petstore_projector::{KafkaProjection, Projection};
use petstore_read_models::rebuild;
use petstore_read_models::{ReadModels, RedisViews};
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_security::auth::TokenVerifier;
use petstore_settings::{FlagSetting, KafkaSettings, LogFormat, RoleName, Settings};
use petstore_telemetry::metrics::Metrics;
use petstore_web::CorrelationId;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::{Connection as _, PgConnection};

// The service's allocator, as the `petstore` binary runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "pipeline-bench", about)]
struct Args {
    /// Admin URL of the loopback Postgres server the bench database is created on.
    #[arg(
        long,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Redis on loopback.
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    redis_url: String,
    /// Kafka-protocol broker on loopback; `none` to skip Kafka.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// `kafka.fetch_wait_max_ms` for the service under test (its default when not given).
    #[arg(long)]
    kafka_fetch_wait_ms: Option<u64>,
    /// `kafka.linger_ms` for the service under test (its default when not given).
    #[arg(long)]
    kafka_linger_ms: Option<u64>,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Order-to-completed latency at several concurrencies.
    Saga {
        /// Concurrent clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,50")]
        clients: Vec<usize>,
        /// Orders per level.
        #[arg(long, default_value_t = 300)]
        orders: usize,
        /// Simulated latency of each provider call, in ms.
        #[arg(long, default_value_t = 20)]
        provider_latency_ms: u64,
        /// Serve the status polls from Redis (as the distributed mode does) instead of the
        /// read-model tables.
        #[arg(long)]
        with_redis: bool,
        /// The distributed mode in one process: Redis as `--with-redis`, and Kafka
        /// (`--kafka-brokers`): the relay publishes, the saga runner consumes its group.
        #[arg(long)]
        distributed: bool,
        /// How a client learns its order completed: `updates` (the order's live-update
        /// stream, SSE: the service pushes) or `poll` (its status every 10 ms, 100 requests
        /// a second per client).
        #[arg(long, default_value = "updates")]
        wait: String,
        /// The providers' resilience policies: `on`, `off` (called directly), or `both`
        /// (off then on at each level, with the ratio).
        #[arg(long, default_value = "on")]
        policies: String,
        /// The observability and security layers to turn on, as a production deployment runs
        /// them, comma-separated: `tracing` (every trace sampled, its spans exported over
        /// OTLP/HTTP to a receiver in this process, on a thread of its own), `auth` (every
        /// request carries a bearer token that is verified), `rate-limits` (every request
        /// counted against limits far above the load), or `all`. Off by default: spans not
        /// exported, demo mode (no token), rate limits off.
        #[arg(long, value_delimiter = ',')]
        layers: Vec<Layer>,
    },
    /// Projection throughput, replay speed and end-to-end lag.
    Projector {
        /// Events to preload.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// What the log holds: `orders` (OrderCreated events of distinct orders: every event
        /// a new view) or `sagas` (whole sagas of ten events, one real order cloned).
        #[arg(long, default_value = "orders")]
        log: String,
        /// Orders per second for the lag measurement.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds of the lag measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Events per projection batch (`projector.batch_size`; its default when not given).
        #[arg(long)]
        batch: Option<u32>,
    },
    /// Live order updates: fan-out to many WebSocket subscribers.
    Updates {
        /// WebSocket subscribers, spread evenly over the orders.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Orders followed; the baseline follows each with one subscriber.
        #[arg(long, default_value_t = 100)]
        orders: usize,
        /// `embedded`, `postgres` or `both`.
        #[arg(long, default_value = "both")]
        engine: String,
    },
}

struct BenchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            admin_url.contains("@127.0.0.1") || admin_url.contains("@localhost"),
            "the bench only runs against a loopback Postgres"
        );
        let name = format!("petstore_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("connect to Postgres")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }

    fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.http.listen = ([127, 0, 0, 1], 0).into();
        settings.log.format = LogFormat::Text;
        settings.log.filter = "warn".to_owned();
        settings.database.url = Some(SecretString::from(self.url.clone()));
        settings.database.max_connections = 32;
        settings.projector.poll_interval_ms = 50;
        // Demo mode, no rate limits: this bench measures the saga pipeline, not auth.
        settings.security.authentication_required = false;
        settings.security.rate_limits.enabled = false;
        settings
    }
}

/// A layer `saga --layers` turns on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layer {
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

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

async fn add_pets(store: &EventStore, count: usize) -> anyhow::Result<Vec<String>> {
    let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
    let mut pets = Vec::with_capacity(count);
    for index in 0..count {
        let pet_id = format!("bench-pet-{index:06}");
        let details = PetDetails {
            pet_id: PetId::parse(&pet_id)?,
            name: format!("Bench {index}"),
            category: PetCategory::Fish,
            breed: "Guppy".to_owned(),
            age_months: 1,
            vaccinated: false,
            price: Money::usd(1_000)?,
            description: "bench".to_owned(),
        };
        store
            .execute::<Pet>(&pet_id, PetCommand::AddPet(details), &(), &metadata)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        pets.push(pet_id);
    }
    Ok(pets)
}

async fn saga(args: &Args) -> anyhow::Result<()> {
    let Bench::Saga {
        clients,
        orders,
        provider_latency_ms: latency_ms,
        with_redis,
        distributed,
        wait,
        policies,
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
    let modes: &[bool] = match policies.as_str() {
        "on" => &[true],
        "off" => &[false],
        "both" => &[false, true],
        other => anyhow::bail!("--policies {other:?}: on, off or both"),
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
    println!("| clients | policies | orders | completed/s | p50 ms | p99 ms | max ms |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &level in clients.iter() {
        let mut throughputs = Vec::new();
        for &enabled in modes {
            let (elapsed, histogram) = saga_level(
                args,
                level,
                orders,
                latency_ms,
                (with_redis, distributed, updates),
                (enabled, layers),
            )
            .await?;
            let throughput = orders as f64 / elapsed;
            throughputs.push(throughput);
            println!(
                "| {level} | {} | {orders} | {throughput:.0} | {:.1} | {:.1} | {:.1} |",
                if enabled { "on" } else { "off" },
                millis(&histogram, 0.5),
                millis(&histogram, 0.99),
                histogram.max() as f64 / 1000.0
            );
        }
        if let [off, on] = throughputs[..] {
            println!("| {level} | **on / off** | | **{:.2}** | | | |", on / off);
        }
    }
    if let Some((telemetry, receiver)) = telemetry {
        telemetry.shutdown().await;
        println!();
        println!("spans received by the OTLP receiver: {}", receiver.spans());
    }
    Ok(())
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
    (policies, layers): (bool, Layers),
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let database = BenchDatabase::create(&args.postgres_url).await?;
    let mut settings = database.settings();
    settings.catalog.seed_demo_pets = false;
    settings.providers.payment.latency_ms = latency_ms;
    settings.providers.delivery.latency_ms = latency_ms;
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

/// One fan-out measurement: what every subscriber received after payments resumed.
struct FanOut {
    deliveries: usize,
    /// From the resume to the last delivery.
    elapsed: Duration,
    /// Event timestamp to arrival, in microseconds.
    delay: Histogram<u64>,
}

/// Follows `orders` (held at `reserved`) with `subscribers` WebSockets, resumes payments and
/// collects every update until each socket closes after `completed`.
async fn fan_out(
    base: &str,
    token: &str,
    orders: &[String],
    subscribers: usize,
) -> anyhow::Result<FanOut> {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;
    let mut readers = Vec::with_capacity(subscribers);
    for index in 0..subscribers {
        let order_id = &orders[index % orders.len()];
        let url = format!(
            "{}/petstore-domain/orders/{order_id}/updates",
            base.replacen("http://", "ws://", 1)
        );
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        // The snapshot (`reserved`) first: every subscriber is in place before the resume.
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let update: Value = serde_json::from_str(&text)?;
                anyhow::ensure!(update["status"] == "reserved", "snapshot {update}");
            }
            other => anyhow::bail!("no snapshot: {other:?}"),
        }
        readers.push(tokio::spawn(async move {
            let mut received = Vec::new();
            while let Some(message) = socket.next().await {
                match message? {
                    Message::Text(text) => {
                        let update: Value = serde_json::from_str(&text)?;
                        received.push((chrono::Utc::now(), update));
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            anyhow::Ok(received)
        }));
    }
    let resumed = Instant::now();
    reqwest::Client::new()
        .put(format!("{base}/petstore-domain/admin/config"))
        .bearer_auth(token)
        .json(&serde_json::json!({"feature_flags": {"payment_processing": true}}))
        .send()
        .await?
        .error_for_status()?;
    let mut delay = Histogram::<u64>::new(3)?;
    let mut deliveries = 0;
    for reader in readers {
        let received = reader.await??;
        let statuses: Vec<&str> = received
            .iter()
            .map(|(_, update)| update["status"].as_str().unwrap_or_default())
            .collect();
        anyhow::ensure!(
            statuses == ["paid", "scheduled", "completed"],
            "a subscriber got {statuses:?}"
        );
        for (arrived, update) in &received {
            let at =
                chrono::DateTime::parse_from_rfc3339(update["at"].as_str().unwrap_or_default())?;
            let micros = (*arrived - at.to_utc())
                .num_microseconds()
                .unwrap_or(0)
                .max(0);
            delay.record(micros as u64)?;
            deliveries += 1;
        }
    }
    Ok(FanOut {
        deliveries,
        elapsed: resumed.elapsed(),
        delay,
    })
}

async fn updates(
    args: &Args,
    subscribers: usize,
    orders: usize,
    engine: &str,
) -> anyhow::Result<()> {
    let engines: &[&str] = match engine {
        "both" => &["embedded", "postgres"],
        "embedded" => &["embedded"],
        "postgres" => &["postgres"],
        other => anyhow::bail!("--engine is embedded, postgres or both, not {other:?}"),
    };
    println!("live order updates: {orders} orders held at `reserved`, then payments resume;");
    println!("each subscriber must get paid, scheduled, completed (3 updates per subscriber)");
    println!(
        "delay: from the event's timestamp (taken at its append) to its arrival at the client"
    );
    println!();
    println!("| store | subscribers | deliveries | deliveries/s | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for &engine in engines {
        for level in [orders, subscribers] {
            let data = tempfile::tempdir()?;
            let database = match engine {
                "postgres" => Some(BenchDatabase::create(&args.postgres_url).await?),
                _ => None,
            };
            let mut settings = match &database {
                Some(database) => database.settings(),
                None => {
                    let mut settings = Settings::default();
                    settings.http.listen = ([127, 0, 0, 1], 0).into();
                    settings.log.format = LogFormat::Text;
                    settings.log.filter = "warn".to_owned();
                    settings.storage.data_dir = data.path().to_path_buf();
                    settings
                }
            };
            settings.catalog.seed_demo_pets = false;
            settings.providers.payment.latency_ms = 0;
            settings.providers.delivery.latency_ms = 0;
            settings.feature_flags.real_time_order_updates = FlagSetting::On;
            settings.feature_flags.payment_processing = FlagSetting::Off;
            settings.http.order_updates.max_connections_per_subject = u32::try_from(level)? + 1;
            // Authenticated, as users run it; rate limits would only refuse the bench.
            settings.security.authentication_required = true;
            settings.security.rate_limits.enabled = false;
            settings.security.jwt.secret = Some(SecretString::from(
                "pipeline-bench-secret-of-32-bytes-or-more".to_owned(),
            ));
            let token =
                petstore_security::auth::TokenVerifier::new(&settings.security.jwt, Vec::new())?
                    .issue("bench-admin", RoleName::Admin)
                    .context("a token")?
                    .0;
            let application = Application::build(settings.clone(), &Role::all()).await?;
            let base = format!("http://127.0.0.1:{}", application.port());
            let shutdown = application.shutdown_handle();
            let server = tokio::spawn(application.run_until_stopped());
            let connected = Database::connect(&settings.database, &settings.storage).await?;
            let store = EventStore::new(connected, 8);
            let client = reqwest::Client::new();
            let mut followed = Vec::with_capacity(orders);
            for pet in add_pets(&store, orders).await? {
                let accepted: Value = client
                    .post(format!("{base}/petstore-domain/orders"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"customer_id": "bench", "pet_id": pet}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                followed.push(
                    accepted["order_id"]
                        .as_str()
                        .context("order id")?
                        .to_owned(),
                );
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            for order_id in &followed {
                loop {
                    let response = client
                        .get(format!("{base}/petstore-domain/orders/{order_id}/status"))
                        .bearer_auth(&token)
                        .send()
                        .await?;
                    if response.status() == 200 {
                        let view: Value = response.json().await?;
                        if view["status"] == "reserved" {
                            break;
                        }
                    }
                    anyhow::ensure!(Instant::now() < deadline, "orders never reached reserved");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let measured = fan_out(&base, &token, &followed, level).await?;
            println!(
                "| {engine} | {level} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
                measured.deliveries,
                measured.deliveries as f64 / measured.elapsed.as_secs_f64(),
                millis(&measured.delay, 0.5),
                millis(&measured.delay, 0.99),
                measured.delay.max() as f64 / 1000.0
            );
            shutdown.trigger();
            server.await??;
            store.database().close().await;
            if let Some(database) = database {
                database.drop().await?;
            }
        }
    }
    Ok(())
}

/// Inserts `count` OrderCreated events of distinct orders straight into the events table, in
/// batches: the log the projections are measured on.
async fn preload(database: &Database, count: usize) -> anyhow::Result<()> {
    let Database::Postgres(pool) = database else {
        anyhow::bail!("the projector bench runs on Postgres");
    };
    let metadata =
        serde_json::to_string(&EventMetadata::new(CorrelationId::generate(), "bench").to_map())?;
    let mut done = 0;
    while done < count {
        let size = (count - done).min(5_000);
        let mut ids = Vec::with_capacity(size);
        let mut payloads = Vec::with_capacity(size);
        for _ in 0..size {
            let order_id = OrderId::random();
            let event = OrderEvent::OrderCreated(OrderRequest {
                order_id,
                customer_id: CustomerId::parse("bench")?,
                pet_id: PetId::parse("bench-pet")?,
                amount: Money::usd(1_000)?,
                special_instructions: None,
                simulated_failure: None,
                express_processing: None,
            });
            ids.push(order_id.to_string());
            payloads.push(serde_json::to_string(&event)?);
        }
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'Order', id, 1, 'OrderCreated', '1.0', payload::jsonb, $3::jsonb
               FROM UNNEST($1::text[], $2::text[]) AS t(id, payload)",
        )
        .bind(&ids)
        .bind(&payloads)
        .bind(&metadata)
        .execute(pool)
        .await?;
        done += size;
    }
    Ok(())
}

/// The relay's baseline: the log's events as the relay sends them (topic, key, the envelope
/// as value, the same seven headers), read into memory first, then produced with a plain
/// rdkafka producer configured like the relay's to topics of their own; records/s from the
/// first send to the last acknowledgement.
async fn raw_produce(database: &Database, kafka: &KafkaSettings) -> anyhow::Result<f64> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut events = Vec::new();
    let mut position = StreamPosition::START;
    loop {
        let batch = stream::read_after(database, position, 1_000).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        events.extend(batch);
    }
    let prefix = format!("{}_raw", kafka.topic_prefix);
    let store_id = database.store_id().await?;
    let records: Vec<(String, String, Vec<u8>, OwnedHeaders)> = events
        .iter()
        .map(|event| {
            let envelope = petstore_kafka::Envelope::from(event);
            let value = serde_json::to_vec(&envelope)?;
            let topic = petstore_kafka::topic_for(&prefix, &event.aggregate_type);
            let mut headers = OwnedHeaders::new_with_capacity(7);
            for (key, value) in [
                ("event_id", envelope.event_id.as_str()),
                ("event_type", envelope.event_type.as_str()),
                ("event_version", envelope.event_version.as_str()),
                ("correlation_id", event.metadata_value("correlation_id")),
                ("causation_id", event.metadata_value("causation_id")),
                ("traceparent", event.metadata_value("traceparent")),
                ("store_id", store_id.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            Ok((topic, event.aggregate_id.clone(), value, headers))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut raw_settings = kafka.clone();
    raw_settings.topic_prefix = prefix;
    KafkaBus::new(
        &raw_settings,
        &store_id,
        Policies::fixed(&Settings::default().resilience, &Metrics::new()).kafka,
    )?
    .ensure_topics()
    .await?;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            kafka.brokers.as_deref().unwrap_or_default(),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("compression.type", "none")
        .create()?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(records.len());
    for (topic, key, value, headers) in &records {
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(value)
            .headers(headers.clone());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    for delivery in deliveries {
        delivery
            .await?
            .map_err(|(error, _)| anyhow::anyhow!("delivery failed: {error}"))?;
    }
    Ok(records.len() as f64 / started.elapsed().as_secs_f64())
}

/// Applies the whole log with `projection` from its checkpoint to the head; events/s.
async fn catch_up(
    store: &EventStore,
    projection: &impl Projection,
    batch_size: u32,
) -> anyhow::Result<f64> {
    let head = stream::head_position(store.database()).await?;
    let mut reader = StreamReader::new(
        store,
        projection.position().await?,
        batch_size,
        Duration::from_millis(10),
    );
    let started = Instant::now();
    let mut events = 0_usize;
    while reader.position() < head {
        let batch = reader.next_batch().await?;
        events += batch.len();
        projection.apply(&batch, None).await?;
    }
    projection.settle(None).await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

async fn projector(
    args: &Args,
    (events, log): (usize, &str),
    (rate, seconds): (u64, u64),
    batch: Option<u32>,
) -> anyhow::Result<()> {
    let template = match log {
        "orders" => None,
        "sagas" => {
            let database = BenchDatabase::create(&args.postgres_url).await?;
            let mut settings = database.settings();
            settings.providers.payment.latency_ms = 0;
            settings.providers.delivery.latency_ms = 0;
            let template = Template::record(&settings).await?;
            database.drop().await?;
            Some(template)
        }
        other => anyhow::bail!("--log is orders or sagas, not {other:?}"),
    };
    let database = BenchDatabase::create(&args.postgres_url).await?;
    let mut settings = database.settings();
    settings.redis.url = Some(SecretString::from(args.redis_url.clone()));
    settings.redis.key_prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let kafka = args.kafka_brokers != "none";
    if kafka {
        settings.kafka.brokers = Some(args.kafka_brokers.clone());
        settings.kafka.topic_prefix = format!("bench_{}", uuid::Uuid::new_v4().simple());
    }
    let connected = Database::connect(&settings.database, &settings.storage).await?;
    connected.migrate().await?;
    let store = EventStore::new(connected.clone(), 8);
    let started = Instant::now();
    let events = match &template {
        None => {
            preload(&connected, events).await?;
            println!(
                "preloaded {events} OrderCreated events in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            events
        }
        Some(template) => {
            let orders = events.div_ceil(template.rows.len());
            template.append(&connected, 0, orders).await?;
            let events = orders * template.rows.len();
            println!(
                "preloaded {events} events of {orders} whole sagas ({}) in {:.1}s",
                template.event_types(),
                started.elapsed().as_secs_f64()
            );
            events
        }
    };
    // Statistics and a visibility map, as a service's log has them once autovacuum has
    // passed; without them what is read first depends on whether it already came by.
    if let Database::Postgres(pool) = &connected {
        sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    }
    println!();
    // The floor: one sequential SELECT of the same rows, in global order, through psql.
    let begin = Instant::now();
    let output = tokio::process::Command::new("psql")
        .arg(&database.url)
        .args(["-Atq", "-o", "/dev/null", "-c"])
        .arg(
            "SELECT transaction_id::text, global_position, aggregate_type, aggregate_id, \
             sequence, event_type, event_version, payload, metadata FROM events \
             ORDER BY events.transaction_id, events.global_position",
        )
        .output()
        .await
        .context("psql runs")?;
    anyhow::ensure!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let psql = events as f64 / begin.elapsed().as_secs_f64();
    println!("| projection | events/s | ratio to the baseline |");
    println!("|---|---:|---:|");
    if let Some(batch) = batch {
        settings.projector.batch_size = batch;
    }
    let batch = settings.projector.batch_size;

    // Baseline: read the same stream, apply nothing.
    let head = stream::head_position(&connected).await?;
    let begin = Instant::now();
    let mut position = StreamPosition::START;
    let mut read = 0;
    while position < head {
        let events = stream::read_after(&connected, position, batch).await?;
        if let Some(last) = events.last() {
            position = last.position;
        }
        read += events.len();
    }
    let baseline = read as f64 / begin.elapsed().as_secs_f64();
    println!("| baseline: read the stream only | {baseline:.0} | 1.00 |");
    println!(
        "| one sequential SELECT of the same rows through psql | {psql:.0} | {:.2} (the stream reads at {:.2} of it) |",
        psql / baseline,
        baseline / psql
    );
    let read_models = ReadModels::open(&connected).await?;
    let rate_pg = catch_up(&store, &read_models, batch).await?;
    println!(
        "| Postgres read models | {rate_pg:.0} | {:.2} |",
        rate_pg / baseline
    );
    // Bound to the store, as the service's are: the service measured below finds its own
    // views and does not rebuild them.
    let redis = RedisViews::new(
        Cache::connect(
            &settings.redis,
            Policies::fixed(&settings.resilience, &Metrics::new()).redis,
        )?,
        Duration::from_secs(30),
    )
    .bound_to(&connected.store_id().await?);
    let rate_redis = catch_up(&store, &redis, batch).await?;
    println!(
        "| Redis views | {rate_redis:.0} | {:.2} |",
        rate_redis / baseline
    );
    if kafka {
        let projection = KafkaProjection::new(
            KafkaBus::new(
                &settings.kafka,
                &connected.store_id().await?,
                Policies::fixed(&settings.resilience, &Metrics::new()).kafka,
            )?,
            connected.clone(),
        );
        let rate_kafka = catch_up(&store, &projection, batch).await?;
        println!(
            "| Kafka (acks=all, idempotent) | {rate_kafka:.0} | {:.2} |",
            rate_kafka / baseline
        );
        let raw = raw_produce(&connected, &settings.kafka).await?;
        println!(
            "| raw rdkafka produce of the same records (acks=all, idempotent, all in flight, then every acknowledgement) | {raw:.0} | {:.2} (the relay publishes at {:.2} of it) |",
            raw / baseline,
            rate_kafka / raw
        );
    }
    let report = rebuild::rebuild_read_models(&connected, 1_000, false, &mut |_| {}).await?;
    let replay_rate = report.events as f64 / report.elapsed.as_secs_f64();
    println!(
        "| replay --projection read_models | {replay_rate:.0} | {:.2} |",
        replay_rate / baseline
    );

    // End-to-end lag at a steady rate: the whole service, orders placed by HTTP, each one
    // watched in Redis until its view appears.
    let mut service = settings.clone();
    service.catalog.seed_demo_pets = true;
    let roles = [Role::Command, Role::Query, Role::Projector]
        .into_iter()
        .collect();
    let application = Application::build(service, &roles).await?;
    let base = format!("http://127.0.0.1:{}", application.port());
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = reqwest::Client::new();
    let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let total = rate * seconds;
    let mut watchers = Vec::with_capacity(total as usize);
    for _ in 0..total {
        interval.tick().await;
        let (client, base, redis) = (client.clone(), base.clone(), redis.clone());
        watchers.push(tokio::spawn(async move {
            let begin = Instant::now();
            let accepted: Value = client
                .post(format!("{base}/petstore-domain/orders"))
                .json(
                    &serde_json::json!({"customer_id": "bench", "pet_id": "golden-retriever-001"}),
                )
                .send()
                .await?
                .json()
                .await?;
            let appended = begin.elapsed();
            let order_id = OrderId::parse(accepted["order_id"].as_str().context("id")?)?;
            let watch = Instant::now();
            while redis.order(&order_id).await?.is_none() {
                anyhow::ensure!(watch.elapsed() < Duration::from_secs(30), "never visible");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            anyhow::Ok((begin.elapsed() - appended).as_micros() as u64)
        }));
    }
    let mut lag = Histogram::<u64>::new(3)?;
    for watcher in watchers {
        lag.record(watcher.await??)?;
    }
    println!();
    println!(
        "end-to-end lag, POST answered to visible in the Redis read model, {rate} orders/s for {seconds}s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        millis(&lag, 0.5),
        millis(&lag, 0.99),
        lag.max() as f64 / 1000.0
    );
    shutdown.trigger();
    server.await??;
    connected.close().await;
    redis
        .cache()
        .delete_namespace(&settings.redis.key_prefix)
        .await?;
    database.drop().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.bench {
        Bench::Saga { .. } => saga(&args).await,
        Bench::Projector {
            events,
            log,
            rate,
            seconds,
            batch,
        } => projector(&args, (*events, log), (*rate, *seconds), *batch).await,
        Bench::Updates {
            subscribers,
            orders,
            engine,
        } => updates(&args, *subscribers, *orders, engine).await,
    }
}
