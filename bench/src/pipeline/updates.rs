//! The updates bench: live order updates fanned out to many WebSocket subscribers, beside
//! the same orders followed by one subscriber each, on the embedded store and on Postgres.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use petstore_cli::{Application, Role};
use petstore_event_store::database::Database;
use petstore_event_store::store::EventStore;
use petstore_settings::{FlagSetting, LogFormat, RoleName, Settings};
use secrecy::SecretString;
use serde_json::Value;

use crate::common::{add_pets, millis, BenchDatabase};
use crate::Args;

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

pub(crate) async fn updates(
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
