//! Kafka, against the real Kafka-protocol broker (`KAFKA_BROKERS`, started by
//! scripts/test.sh): every event published with its key and headers in per-key order, a
//! projector killed while orders pour in, and sagas shared by two runners in one group.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use petstore_cli::Role;
use petstore_event_store::store::EventStore;
use petstore_event_store::stream::{self, StreamPosition};
use petstore_kafka::{Envelope, KafkaBus};
use petstore_live_settings::Live;
use petstore_projector::{KafkaProjection, Projector};
use petstore_read_models::views::ViewBatch;
use petstore_read_models::{ReadModels, RedisViews};
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_saga::providers::{SimulatedDeliveryProvider, SimulatedPaymentGateway};
use petstore_saga::SagaRunner;
use petstore_telemetry::metrics::Metrics;
use petstore_tests::{
    add_pets, kafka_brokers, redis_url, unique_name, with_kafka, with_redis, Engine, Storage,
    TestApp,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::Value;

/// Where the messages keyed `key` are in `prefix`'s topics (read from the start for at
/// most `within`): topic, partition, offset, event type.
async fn messages_keyed(
    prefix: &str,
    key: &str,
    within: Duration,
) -> Vec<(String, i32, i64, String)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("diagnosis"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topics = petstore_kafka::topics(prefix);
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).expect("subscribe");
    let deadline = Instant::now() + within;
    let mut found = Vec::new();
    while let Ok(Ok(message)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        consumer.recv(),
    )
    .await
    {
        if message.key() == Some(key.as_bytes()) {
            let event_type =
                serde_json::from_slice::<Envelope>(message.payload().unwrap_or_default())
                    .map_or_else(|_| "?".to_owned(), |envelope| envelope.event_type);
            found.push((
                message.topic().to_owned(),
                message.partition(),
                message.offset(),
                event_type,
            ));
        }
    }
    found
}

/// A consumed message: its partition, key, headers and envelope.
struct Consumed {
    partition: i32,
    key: String,
    headers: HashMap<String, String>,
    envelope: Envelope,
}

/// Reads every topic of `prefix` from the start until `count` distinct events arrived.
async fn consume_all(prefix: &str, count: usize) -> Vec<Consumed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topics = petstore_kafka::topics(prefix);
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut consumed = Vec::new();
    let mut distinct = HashSet::new();
    while distinct.len() < count {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events reached kafka", distinct.len()))
            .expect("message");
        let headers = message
            .headers()
            .map(|headers| {
                use rdkafka::message::Headers;
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let envelope: Envelope =
            serde_json::from_slice(message.payload().expect("value")).expect("envelope");
        distinct.insert(envelope.event_id.clone());
        consumed.push(Consumed {
            partition: message.partition(),
            key: String::from_utf8_lossy(message.key().expect("key")).into_owned(),
            headers,
            envelope,
        });
    }
    consumed
}

async fn stored_event_count(storage: &Storage) -> usize {
    let mut connection = storage.postgres().expect("postgres").connect().await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut connection)
        .await
        .expect("count");
    count as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_kafka_with_its_key_headers_and_per_key_order() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    let prefix = with_kafka(&mut settings);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let mut orders = Vec::new();
    for pet in [
        "golden-retriever-001",
        "golden-retriever-001",
        "persian-cat-001",
    ] {
        let accepted = app.place_order(pet).await;
        orders.push(accepted["order_id"].as_str().expect("id").to_owned());
    }
    for order_id in &orders {
        // The saga itself runs over Kafka here.
        app.wait_for_terminal(order_id).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = stored_event_count(&storage).await;
    let consumed = consume_all(&prefix, total).await;

    let mut last_sequence: HashMap<(String, String), i64> = HashMap::new();
    let mut seen = HashSet::new();
    for message in &consumed {
        let envelope = &message.envelope;
        assert_eq!(message.key, envelope.aggregate_id, "keyed by aggregate id");
        assert_eq!(message.headers["event_id"], envelope.event_id);
        assert_eq!(message.headers["event_type"], envelope.event_type);
        assert_eq!(message.headers["event_version"], envelope.event_version);
        assert_eq!(
            message.headers["correlation_id"],
            envelope
                .metadata
                .correlation_id()
                .expect("a correlation id")
        );
        assert_eq!(
            message.headers["causation_id"],
            envelope
                .metadata
                .causation_id
                .as_deref()
                .expect("a causation id")
        );
        assert!(
            message.headers["traceparent"].starts_with("00-"),
            "{:?}",
            message.headers
        );
        if !seen.insert(envelope.event_id.clone()) {
            continue; // a duplicate from a republished batch is allowed
        }
        let last = last_sequence
            .entry((
                envelope.aggregate_type.clone(),
                envelope.aggregate_id.clone(),
            ))
            .or_insert(0);
        assert_eq!(
            envelope.sequence,
            *last + 1,
            "per-key order, nothing missing"
        );
        *last = envelope.sequence;
    }
    assert_eq!(seen.len(), total);

    // The order's timeline says where the relay published each of its events, as a consumer
    // reads them.
    let order_id = &orders[0];
    let timeline = app
        .wait_for_json(
            &format!("/petstore-domain/admin/orders/{order_id}/timeline"),
            |timeline| {
                let entries = timeline["entries"].as_array().cloned().unwrap_or_default();
                let events = entries
                    .iter()
                    .filter(|entry| entry["event_id"].is_string())
                    .count();
                let published = entries
                    .iter()
                    .filter(|entry| entry["kind"] == "published")
                    .count();
                events > 0 && published == events
            },
        )
        .await;
    let read = messages_keyed(&prefix, order_id, Duration::from_secs(10)).await;
    let keyed_types: BTreeSet<&str> = read.iter().map(|(.., kind)| kind.as_str()).collect();
    let mut compared = 0;
    for entry in timeline["entries"].as_array().expect("entries") {
        let Some(event_type) = entry["event_type"].as_str() else {
            continue;
        };
        if entry["kind"] != "published" || !keyed_types.contains(event_type) {
            continue;
        }
        let coordinates = (
            entry["kafka"]["topic"].as_str().expect("topic").to_owned(),
            i32::try_from(entry["kafka"]["partition"].as_i64().expect("partition"))
                .expect("a partition"),
            entry["kafka"]["offset"].as_i64().expect("offset"),
            event_type.to_owned(),
        );
        assert!(
            read.contains(&coordinates),
            "{coordinates:?} is what a consumer reads: {read:?}"
        );
        compared += 1;
    }
    assert!(
        compared >= 3 && compared == keyed_types.len(),
        "each of the order's events a consumer read ({read:?}) is on the timeline: {timeline}"
    );
    let health: Value = app
        .get("/petstore-domain/health")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(health["components"]["projection:kafka"]["status"], "up");
    app.stop().await;
    storage.remove().await;
}

/// The projectors (read models, Redis, Kafka) are killed at random points while 1,000
/// orders are placed, then restarted: Kafka holds every event, and the read models equal a
/// fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projectors_killed_while_orders_pour_in_lose_nothing() {
    const ORDERS: usize = 1_000;
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    let prefix = with_kafka(&mut settings);
    with_redis(&mut settings, &redis_url(), &unique_name("redis"));
    settings.projector.batch_size = 50;
    settings.redis.operation_timeout_ms = 5_000; // a loaded machine; this test reads a lot
    let app = Arc::new(
        TestApp::start_with_roles(settings.clone(), &[Role::Command].into_iter().collect()).await,
    );

    let store = EventStore::new(storage.database().await, 16);
    let database = store.database().clone();
    let redis = RedisViews::new(
        Cache::connect(
            &settings.redis,
            Policies::fixed(&settings.resilience, &Metrics::new()).redis,
        )
        .expect("redis"),
        Duration::from_secs(30),
    );
    let store_id = database.store_id().await.expect("a store id");
    let bus = KafkaBus::new(
        &settings.kafka,
        &store_id,
        settings.saga.partitions().expect("partitions"),
        Policies::fixed(&settings.resilience, &Metrics::new()).kafka,
    )
    .expect("bus");
    let models = ReadModels::open(&database).await.expect("read models");
    let start_projectors = || {
        let read_models = Projector::new(store.clone(), models.clone(), settings.projector.clone());
        let redis = Projector::new(store.clone(), redis.clone(), settings.projector.clone());
        let kafka = Projector::new(
            store.clone(),
            KafkaProjection::new(bus.clone(), database.clone()),
            settings.projector.clone(),
        );
        vec![
            tokio::spawn(read_models.run(futures::future::pending())),
            tokio::spawn(redis.run(futures::future::pending())),
            tokio::spawn(kafka.run(futures::future::pending())),
        ]
    };

    let placing = {
        let app = app.clone();
        tokio::spawn(async move {
            let pets = [
                "golden-retriever-001",
                "labrador-001",
                "beagle-001",
                "corgi-001",
                "budgie-001",
            ];
            // Many clients at once, bounded like a real load generator's connection pool.
            futures::stream::iter(0..ORDERS).for_each_concurrent(32, |index| {
                let app = app.clone();
                async move {
                    let response = app
                        .post_json(
                            "/petstore-domain/orders",
                            &serde_json::json!({"customer_id": format!("c-{index}"), "pet_id": pets[index % pets.len()]}),
                        )
                        .await;
                    assert_eq!(response.status(), 202);
                }
            })
            .await;
        })
    };
    while !placing.is_finished() {
        let tasks = start_projectors();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
    placing.await.expect("orders placed");

    let tasks = start_projectors();
    let head = stream::head_position(&database).await.expect("head");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let postgres = stream::load_checkpoint(&database, "read_models")
            .await
            .expect("checkpoint");
        let kafka = stream::load_checkpoint(&database, "kafka")
            .await
            .expect("checkpoint");
        let redis_position = petstore_projector::Projection::position(&redis)
            .await
            .expect("redis");
        if postgres >= head && kafka >= head && redis_position >= head {
            break;
        }
        assert!(Instant::now() < deadline, "projections never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let events = stream::read_after(&database, StreamPosition::START, 1_000_000)
        .await
        .expect("log");
    assert_eq!(events.len(), stored_event_count(&storage).await);
    // Each event is on its saga partition: Kafka partitions are saga partitions.
    let partitions = settings.saga.partitions().expect("partitions");
    let mut used = HashSet::new();
    for message in consume_all(&prefix, events.len()).await {
        let expected = partitions.of_key(&message.envelope.aggregate_id);
        assert_eq!(message.partition, expected.kafka(), "{}", message.key);
        if message.envelope.aggregate_type == "Order" {
            let order = petstore_domain::OrderId::parse(&message.key).expect("an order id");
            assert_eq!(partitions.of_order(&order), expected);
            used.insert(message.partition);
        }
    }
    assert!(used.len() > 1, "orders spread over partitions: {used:?}");

    let mut expected = ViewBatch::default();
    assert!(expected.fold(&events).is_empty(), "every event folds");
    let (orders, pets) = expected.into_views();
    assert_eq!(orders.len(), ORDERS);
    let read_models = ReadModels::open(&database).await.expect("read models");
    for view in &orders {
        let order_id = view.order_id;
        assert_eq!(
            read_models.order(&order_id).await.expect("pg").as_ref(),
            Some(view)
        );
        assert_eq!(
            redis.order(&order_id).await.expect("redis").as_ref(),
            Some(view)
        );
    }
    for view in &pets {
        let pet_id = view.id.clone();
        assert_eq!(
            read_models.pet(&pet_id).await.expect("pg").as_ref(),
            Some(view)
        );
        assert_eq!(
            redis.pet(&pet_id).await.expect("redis").as_ref(),
            Some(view)
        );
    }
    for task in tasks {
        task.abort();
    }
    Arc::try_unwrap(app).ok().expect("sole owner").stop().await;
    storage.remove().await;
}

/// Two runners consuming Kafka share the saga partitions through their leases (each reads
/// only its partitions, assigned by itself, not by a group rebalance); one dies mid-run, and
/// the other takes its partitions over once their leases expire, resuming from the offsets
/// the dead one committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_saga_runners_on_kafka_share_the_partitions_and_one_can_die() {
    const ORDERS: usize = 20;
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    let prefix = with_kafka(&mut settings);
    // The three partitions this test was written with.
    settings.saga.partitions = 3;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;

    let store = EventStore::new(storage.database().await, 16);
    let pets = add_pets(&store, "kafka-kitten", ORDERS).await;
    let live = Live::start(store.clone(), &settings, Metrics::new())
        .await
        .expect("live settings");
    let payments = Arc::new(SimulatedPaymentGateway::new(live.clone()));
    let deliveries = Arc::new(SimulatedDeliveryProvider::new(live.clone()));
    let policies = live.policies(&Metrics::new());
    let runner = || {
        SagaRunner::new(
            store.clone(),
            settings.saga.clone(),
            policies.clone(),
            payments.clone(),
            deliveries.clone(),
            Metrics::new(),
            live.clone(),
        )
        .with_kafka(
            settings.kafka.clone(),
            settings.saga.partitions().expect("partitions"),
        )
    };
    let doomed = tokio::spawn(runner().run(futures::future::pending()));
    let survivor = tokio::spawn(runner().run(futures::future::pending()));

    let mut orders = Vec::new();
    for (index, pet) in pets.iter().enumerate() {
        let accepted = app.place_order(pet).await;
        orders.push(accepted["order_id"].as_str().expect("id").to_owned());
        if index == ORDERS / 2 {
            doomed.abort(); // one runner dies mid-run; the other takes its partitions over
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    for order_id in &orders {
        loop {
            let view: Value = app
                .get(&format!("/petstore-domain/orders/{order_id}/status"))
                .await
                .json()
                .await
                .unwrap_or(Value::Null);
            if view["status"] == "completed" {
                break;
            }
            if Instant::now() >= deadline {
                // Which orders are stuck, and where, tells a lost message from a partition
                // nobody consumes.
                let mut statuses = Vec::new();
                for order_id in &orders {
                    let view = app
                        .get_json(&format!("/petstore-domain/orders/{order_id}/status"))
                        .await;
                    statuses.push(format!("{order_id}: {}", view["status"]));
                }
                let in_kafka = messages_keyed(&prefix, order_id, Duration::from_secs(10)).await;
                panic!(
                    "saga stuck after losing a runner: {view}\nits messages in kafka (topic, \
                     partition, offset, event): {in_kafka:?}\nevery order: {}",
                    statuses.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        storage.count_events("PaymentProcessed").await,
        ORDERS as i64,
        "no double payment"
    );
    assert_eq!(payments.captured(), ORDERS);
    // The offsets are kept by the group, though no member joined it: every order partition
    // that carried an order has an offset committed.
    let group: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", &settings.kafka.consumer_group)
        .create()
        .expect("consumer");
    let topic = petstore_kafka::topic_for(&prefix, petstore_domain::order::AGGREGATE_TYPE);
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        list.add_partition(&topic, partition);
    }
    let committed = group
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    let used: HashSet<i32> = orders
        .iter()
        .map(|order| {
            settings
                .saga
                .partitions()
                .expect("partitions")
                .of_order(&petstore_domain::OrderId::parse(order).expect("order id"))
                .kafka()
        })
        .collect();
    for element in committed.elements() {
        if used.contains(&element.partition()) {
            assert!(
                matches!(element.offset(), rdkafka::Offset::Offset(offset) if offset > 0),
                "partition {} has no committed offset: {:?}",
                element.partition(),
                element.offset()
            );
        }
    }
    survivor.abort();
    app.stop().await;
    storage.remove().await;
}

/// Every event of `store`'s log, once the log shows `count` of them.
async fn log_of(
    store: &EventStore,
    count: usize,
) -> Vec<petstore_event_store::stream::RecordedEvent> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = stream::read_after(store.database(), StreamPosition::START, 100_000)
            .await
            .expect("log");
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "the log shows {} of {count}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_with_other_partitions_than_the_store_are_refused_naming_both() {
    let storage = Storage::new(Engine::Embedded).await;
    let store = EventStore::new(storage.database().await, 4);
    add_pets(&store, "kafka-parts", 2).await;
    let mut settings = storage.settings();
    let prefix = with_kafka(&mut settings);
    settings.saga.partitions = 5;
    let store_id = store.database().store_id().await.expect("a store id");
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    let five = settings.saga.partitions().expect("partitions");
    let bus = KafkaBus::new(&settings.kafka, &store_id, five, policies.kafka.clone()).expect("bus");
    bus.ensure_topics()
        .await
        .expect("topics of five partitions");
    bus.publish(&log_of(&store, 2).await, petstore_kafka::Trace::Continue)
        .await
        .expect("published");

    // The same topics for a store of three partitions: refused, naming both counts.
    let three = petstore_domain::partition::Partitions::new(3).expect("3");
    let other =
        KafkaBus::new(&settings.kafka, &store_id, three, policies.kafka.clone()).expect("bus");
    let error = other
        .ensure_topics()
        .await
        .expect_err("topics of five partitions");
    assert!(
        matches!(
            error,
            petstore_kafka::BusError::PartitionCount {
                found: 5,
                partitions: 3,
                ..
            }
        ),
        "{error}"
    );
    let message = error.to_string();
    for part in [prefix.as_str(), "5 partitions", "saga.partitions = 3"] {
        assert!(message.contains(part), "names {part}: {message}");
    }
    // So does a process started on them.
    settings.saga.partitions = 3;
    settings.database.migrate_on_start = true;
    let roles: BTreeSet<Role> = [Role::Query, Role::Projector].into();
    let refused = match petstore_cli::Application::build(settings, &roles).await {
        Ok(_) => panic!("a process must not start on topics of other partitions"),
        Err(error) => error.to_string(),
    };
    assert!(refused.contains("saga.partitions = 3"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_left_by_another_event_store_are_refused_and_their_messages_never_handled() {
    // Store A's events in the topics under a prefix.
    let old = Storage::new(Engine::Embedded).await;
    let old_store = EventStore::new(old.database().await, 4);
    add_pets(&old_store, "kafka-old", 3).await;
    let mut settings = old.settings();
    let prefix = with_kafka(&mut settings);
    let old_id = old_store.database().store_id().await.expect("a store id");
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    let old_bus = KafkaBus::new(
        &settings.kafka,
        &old_id,
        settings.saga.partitions().expect("partitions"),
        policies.kafka.clone(),
    )
    .expect("bus");
    old_bus
        .ensure_topics()
        .await
        .expect("topics of nobody's yet");
    old_bus
        .publish(
            &log_of(&old_store, 3).await,
            petstore_kafka::Trace::Continue,
        )
        .await
        .expect("published");

    // A new store under the same prefix: refused at start-up, naming both and the prefix.
    let new = Storage::new(Engine::Embedded).await;
    let mut new_settings = new.settings();
    new_settings.kafka = settings.kafka.clone();
    let new_store = EventStore::new(new.database().await, 4);
    let new_id = new_store.database().store_id().await.expect("a store id");
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector, Role::Saga].into();
    let refused = match petstore_cli::Application::build(new_settings.clone(), &roles).await {
        Ok(_) => panic!("a deployment on another store's topics must not start"),
        Err(error) => error.to_string(),
    };
    for part in [prefix.as_str(), &old_id, &new_id, "kafka.topic_prefix"] {
        assert!(refused.contains(part), "names {part}: {refused}");
    }
    // Its relay refuses them too.
    let new_bus = KafkaBus::new(
        &new_settings.kafka,
        &new_id,
        new_settings.saga.partitions().expect("partitions"),
        policies.kafka.clone(),
    )
    .expect("bus");
    let error = new_bus.ensure_topics().await.expect_err("foreign topics");
    assert!(
        matches!(error, petstore_kafka::BusError::ForeignTopics { .. }),
        "{error}"
    );

    // A consumer of the new store passes over the old store's messages.
    add_pets(&new_store, "kafka-new", 2).await;
    let new_events = log_of(&new_store, 2).await;
    new_bus
        .publish(&new_events, petstore_kafka::Trace::Continue)
        .await
        .expect("published");
    let subscriber = petstore_kafka::KafkaSubscriber::new(
        &new_settings.kafka,
        &unique_name("group"),
        &new_id,
        new_settings.saga.partitions().expect("partitions"),
    )
    .await
    .expect("subscriber");
    let wanted: HashSet<String> = new_events
        .iter()
        .map(|event| event.event_id().to_string())
        .collect();
    let mut received = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < wanted.len() {
        let batch = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            subscriber.next_batch(100, Duration::from_millis(200)),
        )
        .await
        .expect("the new store's events arrive")
        .expect("a batch");
        for event in batch {
            let id = event.event_id().to_string();
            assert!(
                wanted.contains(&id),
                "only this store's events: {} {}",
                event.event_type,
                event.aggregate_id
            );
            received.insert(id);
        }
    }
    old.remove().await;
    new.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_broker_opens_the_kafka_breaker_and_batches_are_refused_at_once() {
    let storage = Storage::new(Engine::Embedded).await;
    let store = EventStore::new(storage.database().await, 4);
    add_pets(&store, "kafka-down", 1).await;
    let events = log_of(&store, 1).await;
    let mut settings = storage.settings();
    with_kafka(&mut settings);
    settings.kafka.brokers = Some("127.0.0.1:1".to_owned());
    settings.kafka.message_timeout_ms = 300;
    // librdkafka scans for timed-out messages once a second, so the 300 ms message timeout
    // fires after up to about 1.3 s; the attempt timeout stays well above that.
    let policy = &mut settings.resilience.kafka;
    policy.attempt_timeout_ms = 5_000;
    policy.timeout_ms = 5_000;
    policy.breaker.minimum_calls = 2;
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    let store_id = store.database().store_id().await.expect("a store id");
    let bus = KafkaBus::new(
        &settings.kafka,
        &store_id,
        settings.saga.partitions().expect("partitions"),
        policies.kafka.clone(),
    )
    .expect("bus");
    for _ in 0..2 {
        let error = bus
            .publish(&events, petstore_kafka::Trace::Continue)
            .await
            .expect_err("no broker");
        assert!(
            matches!(error, petstore_kafka::BusError::Kafka(_)),
            "{error}"
        );
    }
    // Refused before any message reaches the producer.
    let error = bus
        .publish(&events, petstore_kafka::Trace::Continue)
        .await
        .expect_err("refused");
    assert!(
        matches!(error, petstore_kafka::BusError::Rejected(_)),
        "{error}"
    );
    assert_eq!(policies.kafka.status().await.state, "open");
    storage.remove().await;
}

/// The relay keeps several batches in flight: the checkpoint moves only over batches the
/// broker acknowledged, and once everything is settled every event is in Kafka, in per-key
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_in_flight_are_checkpointed_only_once_acknowledged() {
    use petstore_projector::Projection;
    let storage = Storage::new(Engine::Postgres).await;
    let store = EventStore::new(storage.database().await, 4);
    add_pets(&store, "in-flight", 60).await;
    let events = log_of(&store, 60).await;
    let mut settings = storage.settings();
    let prefix = with_kafka(&mut settings);
    let database = store.database().clone();
    let store_id = database.store_id().await.expect("a store id");
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    let bus = KafkaBus::new(
        &settings.kafka,
        &store_id,
        settings.saga.partitions().expect("partitions"),
        policies.kafka.clone(),
    )
    .expect("bus");
    let relay = KafkaProjection::new(bus, database.clone());
    assert_eq!(
        relay.position().await.expect("position"),
        StreamPosition::START
    );
    let mut reported = StreamPosition::START;
    for (number, batch) in events.chunks(5).enumerate() {
        let moved = relay.apply(batch, None).await.expect("handed over");
        let checkpoint = stream::load_checkpoint(&database, "kafka")
            .await
            .expect("checkpoint");
        if number == 0 {
            // Nothing can be acknowledged before it was handed over.
            assert_eq!(moved, None);
        }
        if let Some(position) = moved {
            assert!(position <= batch[batch.len() - 1].position);
            assert!(position > reported, "the acknowledged prefix only grows");
            reported = position;
        }
        assert_eq!(
            checkpoint, reported,
            "the checkpoint is the acknowledged prefix"
        );
    }
    let last = events[events.len() - 1].position;
    let settled = relay.settle(None).await.expect("settled");
    assert!(settled.is_some() || reported == last);
    assert_eq!(
        stream::load_checkpoint(&database, "kafka")
            .await
            .expect("checkpoint"),
        last
    );
    let consumed = consume_all(&prefix, events.len()).await;
    let mut last_sequence: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for message in &consumed {
        let envelope = &message.envelope;
        if seen.insert(envelope.event_id.clone()) {
            let previous = last_sequence
                .entry(envelope.aggregate_id.clone())
                .or_insert(0);
            assert_eq!(envelope.sequence, *previous + 1, "per-key order");
            *previous = envelope.sequence;
        }
    }
    assert_eq!(seen.len(), events.len());
    storage.remove().await;
}

/// Batches in flight to a broker that never answers: waiting for them fails, and every batch
/// in flight is forgotten (the relay publishes them again from its checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_in_flight_fails_the_whole_window() {
    let storage = Storage::new(Engine::Embedded).await;
    let store = EventStore::new(storage.database().await, 4);
    add_pets(&store, "in-flight-down", 4).await;
    let events = log_of(&store, 4).await;
    let mut settings = storage.settings();
    with_kafka(&mut settings);
    settings.kafka.brokers = Some("127.0.0.1:1".to_owned());
    settings.kafka.message_timeout_ms = 300;
    // librdkafka scans for timed-out messages once a second, so the 300 ms message timeout
    // fires after up to about 1.3 s; the attempt timeout stays well above that.
    let policy = &mut settings.resilience.kafka;
    policy.attempt_timeout_ms = 5_000;
    policy.timeout_ms = 5_000;
    let policies = Policies::fixed(&settings.resilience, &Metrics::new());
    let store_id = store.database().store_id().await.expect("a store id");
    let bus = KafkaBus::new(
        &settings.kafka,
        &store_id,
        settings.saga.partitions().expect("partitions"),
        policies.kafka.clone(),
    )
    .expect("bus");
    let mut in_flight = petstore_kafka::InFlight::new(bus);
    for batch in events.chunks(2) {
        in_flight
            .push(batch, petstore_kafka::Trace::Continue)
            .await
            .expect("queued with the producer");
    }
    assert!(!in_flight.is_empty());
    let error = in_flight.acknowledged(true).await.expect_err("no broker");
    assert!(
        matches!(error, petstore_kafka::BusError::Kafka(_)),
        "{error}"
    );
    assert!(in_flight.is_empty(), "a failure forgets the window");
    storage.remove().await;
}
