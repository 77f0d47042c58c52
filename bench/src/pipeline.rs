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
//!
//! # Layout
//! - [`Args`], [`Bench`]: the command line; [`main`] runs the bench it names.
//! - `common`: what the benches share: the bench database, pets, quantiles in milliseconds.
//! - `saga`: the saga bench, and the layers it may turn on.
//! - `projector`: the projector bench: throughput, replay and end-to-end lag.
//! - `updates`: the updates bench: fan-out to WebSocket subscribers.

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};

#[path = "pipeline/common.rs"]
mod common;
#[path = "pipeline/projector.rs"]
mod projector;
#[path = "pipeline/saga.rs"]
mod saga;
#[path = "pipeline/updates.rs"]
mod updates;

use projector::projector;
use saga::{saga, Layer};
use updates::updates;

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
        /// Where the providers are: `in-process` (simulated in the service), `http` (the
        /// simulator `petstore providers serve` runs, in this process on a thread of its own,
        /// called over HTTP on 127.0.0.1), or `both` (in-process then http at each level,
        /// with the ratio).
        #[arg(long, default_value = "in-process")]
        providers: String,
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
