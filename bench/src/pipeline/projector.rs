//! The projector bench: each projection's throughput over a preloaded log, beside reading
//! the stream alone, then the rebuild speed and the end-to-end lag at a steady order rate.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use petstore_bench::saga_log::Template;
use petstore_cli::{Application, Role};
use petstore_domain::order::{OrderEvent, OrderRequest};
use petstore_domain::{CustomerId, Money, OrderId, PetId};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::{self, StreamPosition};
use petstore_event_store::subscription::StreamReader;
use petstore_kafka::KafkaBus;
use petstore_projector::{KafkaProjection, Projection};
use petstore_read_models::rebuild;
use petstore_read_models::{ReadModels, RedisViews};
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_settings::{KafkaSettings, Settings};
use petstore_telemetry::metrics::Metrics;
use petstore_web::CorrelationId;
use secrecy::SecretString;
use serde_json::Value;

use crate::common::{millis, BenchDatabase};
use crate::Args;

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
            let metadata = &event.metadata;
            for (key, value) in [
                ("event_id", Some(envelope.event_id.as_str())),
                ("event_type", Some(envelope.event_type.as_str())),
                ("event_version", Some(envelope.event_version.as_str())),
                ("correlation_id", metadata.correlation_id.as_deref()),
                ("causation_id", metadata.causation_id.as_deref()),
                ("traceparent", metadata.traceparent.as_deref()),
                ("store_id", Some(store_id.as_str())),
            ] {
                if let Some(value) = value {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
            }
            Ok((topic, event.aggregate_id.clone(), value, headers))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut raw_settings = kafka.clone();
    raw_settings.topic_prefix = prefix;
    KafkaBus::new(
        &raw_settings,
        &store_id,
        Settings::default().saga.partitions()?,
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

pub(crate) async fn projector(
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
                settings.saga.partitions()?,
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
