//! `read-bench`: what a read of an order costs on the status route of a running service, for
//! an order that exists (200) and for an id nobody placed (404), over HTTP from `--clients`
//! concurrent clients. The two kinds alternate round by round, so that drift on a shared
//! machine spreads over both; the figure to read is the 404's latency as a ratio of the 200's,
//! compared between two builds of the service measured one after the other.
//!
//! With `--timeline-entries N` it measures the admin timeline route instead
//! (`GET /admin/orders/{id}/timeline`, what `petstore explain` prints): one order is placed
//! and completed, then paid again until its timeline holds N entries (each refused payment
//! is one entry), and the timeline's latency alternates with the same order's status read.
//!
//! ```text
//! read-bench --url http://127.0.0.1:8080 [--username admin --password admin] [--orders 200]
//! read-bench --url http://127.0.0.1:8080 --timeline-entries 200
//! ```

// The results on stdout are what this binary is for.
#![allow(clippy::print_stdout)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(name = "read-bench", about)]
struct Args {
    /// The service, `http://host:port`.
    #[arg(long)]
    url: String,
    /// A user of the service (an admin reads every order).
    #[arg(long, default_value = "admin")]
    username: String,
    /// That user's password.
    #[arg(long, default_value = "admin")]
    password: String,
    /// Orders placed first, whose statuses are read.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Seconds each kind of read is measured per round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds: each measures both kinds once, in alternating order.
    #[arg(long, default_value_t = 6)]
    rounds: u32,
    /// Measure the timeline of one order with this many entries against its status read.
    #[arg(long)]
    timeline_entries: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A placed order's status: 200.
    Known,
    /// A random UUIDv7 nobody placed: 404.
    Unknown,
    /// The first order's timeline (admin): 200.
    Timeline,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn status(&self, order_id: &str) -> anyhow::Result<reqwest::StatusCode> {
        self.get(&format!("/petstore-domain/orders/{order_id}/status"))
            .await
    }

    async fn timeline(&self, order_id: &str) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let response = self
            .http
            .get(format!(
                "{}/petstore-domain/admin/orders/{order_id}/timeline",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// GETs `path` and reads the whole body: its status.
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::StatusCode> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        Ok(status)
    }
}

/// Completes `order_id`'s saga, then pays it again (each refused, one timeline entry) until
/// its timeline holds at least `entries` entries: how many it holds (refusals are written in
/// batches, so a few more may land).
async fn grow_timeline(client: &Client, order_id: &str, entries: usize) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, timeline) = client.timeline(order_id).await?;
        let total = timeline["total_entries"].as_u64().unwrap_or(0) as usize;
        if timeline["now"]["verdict"] == "terminal" && total >= entries {
            return Ok(total);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the timeline never grew: {timeline}"
        );
        if timeline["now"]["verdict"] != "terminal" {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Refusals are written in batches: pay no more than the entries missing, then look.
        for _ in total..entries.min(total + 50) {
            let response = client
                .http
                .post(format!("{}/petstore-domain/payments", client.base))
                .bearer_auth(&client.token)
                .json(&json!({"order_id": order_id}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == reqwest::StatusCode::CONFLICT,
                "a second payment answered {}",
                response.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn login(http: &reqwest::Client, args: &Args) -> anyhow::Result<String> {
    let answer: Value = http
        .post(format!("{}/auth/login", args.url))
        .json(&json!({"username": args.username, "password": args.password}))
        .send()
        .await?
        .json()
        .await?;
    answer["token"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no token for {}: {answer}", args.username))
}

/// Places `count` orders and waits until each one's status reads 200.
async fn place(client: &Client, count: usize) -> anyhow::Result<Vec<String>> {
    let mut placed = Vec::with_capacity(count);
    for index in 0..count {
        let answer: Value = client
            .http
            .post(format!("{}/petstore-domain/orders", client.base))
            .bearer_auth(&client.token)
            .json(&json!({"customer_id": format!("bench-{}", index % 50), "pet_id": "golden-retriever-001"}))
            .send()
            .await?
            .json()
            .await?;
        placed.push(
            answer["order_id"]
                .as_str()
                .with_context(|| format!("no order id: {answer}"))?
                .to_owned(),
        );
    }
    for order_id in &placed {
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.status(order_id).await? != reqwest::StatusCode::OK {
            anyhow::ensure!(Instant::now() < deadline, "order {order_id} never showed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(placed)
}

/// Reads of `kind` from `clients` clients for `duration`: their latencies (µs).
async fn measure(
    client: &Arc<Client>,
    orders: &Arc<Vec<String>>,
    kind: Kind,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + duration;
    let tasks = (0..clients).map(|_| {
        let (client, orders, next) = (client.clone(), orders.clone(), next.clone());
        tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            while Instant::now() < deadline {
                let order_id = match kind {
                    Kind::Known => {
                        orders[next.fetch_add(1, Ordering::Relaxed) % orders.len()].clone()
                    }
                    Kind::Unknown => uuid::Uuid::now_v7().to_string(),
                    Kind::Timeline => orders[0].clone(),
                };
                let started = Instant::now();
                let status = match kind {
                    Kind::Timeline => {
                        client
                            .get(&format!(
                                "/petstore-domain/admin/orders/{order_id}/timeline"
                            ))
                            .await?
                    }
                    Kind::Known | Kind::Unknown => client.status(&order_id).await?,
                };
                histogram.record(u64::try_from(started.elapsed().as_micros())?)?;
                let expected = match kind {
                    Kind::Known | Kind::Timeline => reqwest::StatusCode::OK,
                    Kind::Unknown => reqwest::StatusCode::NOT_FOUND,
                };
                anyhow::ensure!(status == expected, "{kind:?} {order_id}: {status}");
            }
            anyhow::Ok(histogram)
        })
    });
    let mut total = Histogram::<u64>::new(3)?;
    for task in futures::future::join_all(tasks).await {
        total.add(task??)?;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::new();
    let token = login(&http, &args).await?;
    let client = Arc::new(Client {
        http,
        base: args.url.clone(),
        token,
    });
    let (orders, kinds, names) = match args.timeline_entries {
        Some(entries) => {
            let orders = place(&client, 1).await?;
            let held = grow_timeline(&client, &orders[0], entries).await?;
            println!("one order, its timeline of {held} entries");
            (
                orders,
                [Kind::Known, Kind::Timeline],
                ["the order's status", "its timeline"],
            )
        }
        None => (
            place(&client, args.orders).await?,
            [Kind::Known, Kind::Unknown],
            ["known order (200)", "unknown id (404)"],
        ),
    };
    let orders = Arc::new(orders);
    // Warm-up: connections, caches, the query plans.
    for kind in kinds {
        measure(&client, &orders, kind, args.clients, Duration::from_secs(1)).await?;
    }
    let duration = Duration::from_secs(args.seconds);
    let mut known = Histogram::<u64>::new(3)?;
    let mut unknown = Histogram::<u64>::new(3)?;
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            kinds
        } else {
            [kinds[1], kinds[0]]
        };
        for kind in order {
            let histogram = measure(&client, &orders, kind, args.clients, duration).await?;
            match kind {
                Kind::Known => known.add(histogram)?,
                Kind::Unknown | Kind::Timeline => unknown.add(histogram)?,
            }
        }
    }
    let seconds = f64::from(args.rounds) * duration.as_secs_f64();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>12}",
        "read", "reads/s", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, histogram) in [(names[0], &known), (names[1], &unknown)] {
        println!(
            "{:<24} {:>10.0} {:>10.3} {:>10.3} {:>12.3}",
            name,
            histogram.len() as f64 / seconds,
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0,
            histogram.mean() / 1000.0,
        );
    }
    println!(
        "{} / {}: p50 {:.2}, p99 {:.2}, mean {:.2} ({} clients, {} rounds of {} s)",
        names[1],
        names[0],
        unknown.value_at_quantile(0.5) as f64 / known.value_at_quantile(0.5) as f64,
        unknown.value_at_quantile(0.99) as f64 / known.value_at_quantile(0.99) as f64,
        unknown.mean() / known.mean(),
        args.clients,
        args.rounds,
        args.seconds,
    );
    Ok(())
}
