//! Saga ownership across real processes: several `petstore serve --roles saga` processes on
//! one Postgres share the saga partitions through their leases, against one `petstore
//! providers serve`; one killed (`kill -9`) or paused (`SIGSTOP`) mid-burst loses its
//! partitions to the others, its late writes refused by the fence, and every order ends with
//! each charge, refund, booking and cancellation made once; the only process of a Kafka
//! deployment killed mid-burst and started again resumes at once, twenty times in a row.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use petstore_cli::chaos::NOTICED_A_LOST_LEASE;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::common::{FreshDatabase, Providers, Service};

/// The demo catalog's pets.
const PETS: [&str; 14] = [
    "golden-retriever-001",
    "labrador-001",
    "beagle-001",
    "corgi-001",
    "persian-cat-001",
    "siamese-cat-001",
    "maine-coon-001",
    "budgie-001",
    "cockatiel-001",
    "african-grey-001",
    "goldfish-001",
    "betta-001",
    "clownfish-001",
    "leopard-gecko-001",
];

/// Places an order for `pet` (its delivery made to fail when `failing`); its id.
async fn place(front: &Service, pet: &str, failing: bool) -> String {
    let mut request = reqwest::Client::new()
        .post(front.url("/petstore-domain/orders"))
        .json(&json!({"customer_id": "customer-001", "pet_id": pet}));
    if failing {
        request = request.header("X-Simulate-Failure", "delivery-service");
    }
    let response = request.send().await.expect("answered");
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("json");
    accepted["order_id"].as_str().expect("order id").to_owned()
}

/// Who holds how many partitions now, by the database's clock.
async fn owners(database: &FreshDatabase) -> HashMap<String, i64> {
    let mut connection = database.connect().await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT owner, count(*) FROM saga_leases
          WHERE owner IS NOT NULL
            AND expires_at_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint
          GROUP BY owner",
    )
    .fetch_all(&mut connection)
    .await
    .expect("leases");
    connection.close().await.expect("close");
    rows.into_iter().collect()
}

/// Waits (30 s at most) until `accept` says yes to the partitions' owners.
async fn wait_for_owners(database: &FreshDatabase, accept: impl Fn(&HashMap<String, i64>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = owners(database).await;
        if accept(&now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the owners never settled: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every order terminal, no pet sold twice, and each effect the events record made once by
/// the providers, asked for under one key.
async fn assert_settled_once(
    front: &Service,
    database: &FreshDatabase,
    providers: &Providers,
    orders: &[String],
) {
    let mut completed = 0;
    for order in orders {
        let view = front.wait_for_terminal(order).await;
        if view["status"] == "completed" {
            completed += 1;
        }
    }
    assert!(completed > 0, "no order completed");
    let mut connection = database.connect().await;
    let count = |event_type: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
    };
    // Compensations are recorded after the cancellation the view shows: wait for them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let effects = loop {
        let effects = providers.get("/effects").await;
        let mut recorded = HashMap::new();
        for (effect, event_type) in [
            ("charges", "PaymentProcessed"),
            ("refunds", "PaymentRefunded"),
            ("deliveries", "DeliveryScheduled"),
            ("cancellations", "DeliveryCancelled"),
        ] {
            let stored = count(event_type)
                .fetch_one(&mut connection)
                .await
                .expect("count");
            recorded.insert(effect, stored);
        }
        let matches = recorded
            .iter()
            .all(|(effect, stored)| effects[*effect].as_i64() == Some(*stored));
        if matches {
            break effects;
        }
        assert!(
            Instant::now() < deadline,
            "the providers' effects {effects} never matched the events {recorded:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        effects["charges"].as_i64(),
        Some(completed + effects["refunds"].as_i64().unwrap_or(0))
    );
    let sold_twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM events WHERE event_type = 'PetSold'
          GROUP BY aggregate_id HAVING count(*) > 1",
    )
    .fetch_all(&mut connection)
    .await
    .expect("sold");
    assert!(sold_twice.is_empty(), "pets sold twice: {sold_twice:?}");
    connection.close().await.expect("close");
    // Per operation, as many keys answered with success as effects made: no effect was
    // asked for under two keys.
    let calls = providers.get("/calls").await;
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for call in calls["calls"].as_array().expect("calls") {
        if (200..300).contains(&call["status"].as_u64().unwrap_or(0)) {
            keys.entry(call["operation"].as_str().expect("operation").to_owned())
                .or_default()
                .insert(call["idempotency_key"].as_str().expect("key").to_owned());
        }
    }
    for (operation, effect) in [
        ("charge", "charges"),
        ("refund", "refunds"),
        ("delivery", "deliveries"),
        ("cancel", "cancellations"),
    ] {
        let asked = keys.get(operation).map_or(0, HashSet::len) as i64;
        assert_eq!(
            Some(asked),
            effects[effect].as_i64(),
            "{operation}: {effects}"
        );
    }
}

#[tokio::test]
async fn three_saga_processes_share_the_partitions_and_survive_a_kill_9() {
    three_saga_processes_survive_a_kill_9(Vec::new()).await;
}

#[tokio::test]
async fn three_saga_processes_on_kafka_share_the_partitions_and_survive_a_kill_9() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let prefix = format!("ownership_{}", uuid::Uuid::new_v4().simple());
    three_saga_processes_survive_a_kill_9(vec![
        ("KAFKA_BROKERS", brokers),
        ("PETSTORE__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("PETSTORE__KAFKA__CONSUMER_GROUP", format!("{prefix}-saga")),
    ])
    .await;
}

/// Three saga processes (with `kafka` in the environment, consuming Kafka) share the
/// partitions; one is killed half-way through a burst of orders.
async fn three_saga_processes_survive_a_kill_9(kafka: Vec<(&'static str, String)>) {
    let database = FreshDatabase::create().await;
    let providers = Providers::start(5);
    let mut env = vec![
        ("DATABASE_URL", database.url.clone()),
        ("PETSTORE__SAGA__LEASE_TIMEOUT_MS", "2000".to_owned()),
        // Four processes per test, tests side by side: small pools, within the server's
        // connection limit.
        ("PETSTORE__DATABASE__MAX_CONNECTIONS", "6".to_owned()),
    ];
    env.extend(providers.env());
    env.extend(kafka);
    let front = Service::start_roles(&env, "command,query,projector").await;
    let mut sagas = Vec::new();
    for id in ["saga-a", "saga-b", "saga-c"] {
        let mut own = env.clone();
        own.push(("PETSTORE__SAGA__RUNNER_ID", id.to_owned()));
        sagas.push(Service::start_roles(&own, "saga").await);
    }
    wait_for_owners(&database, |owners| {
        owners.len() == 3 && owners.values().all(|count| (5..=6).contains(count))
    })
    .await;

    // Two orders for every pet (one of each pair cannot have it), a few failing delivery
    // (compensated: refunded); one saga process killed half-way.
    let mut orders = Vec::new();
    for round in 0..2 {
        for (index, pet) in PETS.iter().enumerate() {
            orders.push(place(&front, pet, round == 0 && index % 5 == 0).await);
        }
        if round == 0 {
            sagas.remove(0).kill();
        }
    }
    assert_settled_once(&front, &database, &providers, &orders).await;
    wait_for_owners(&database, |owners| {
        owners.len() == 2 && !owners.contains_key("saga-a") && owners.values().sum::<i64>() == 16
    })
    .await;
    for saga in sagas {
        assert!(saga.stop().await.success());
    }
    assert!(front.stop().await.success());
    database.drop().await;
}

#[tokio::test]
async fn a_paused_owner_is_fenced_and_calls_no_provider_after_losing_its_lease() {
    let database = FreshDatabase::create().await;
    // Slow providers: the paused owner is paused mid-call.
    let providers = Providers::start(600);
    let mut env = vec![
        ("DATABASE_URL", database.url.clone()),
        ("PETSTORE__SAGA__LEASE_TIMEOUT_MS", "2000".to_owned()),
        // Four processes per test, tests side by side: small pools, within the server's
        // connection limit.
        ("PETSTORE__DATABASE__MAX_CONNECTIONS", "6".to_owned()),
    ];
    env.extend(providers.env());
    let front = Service::start_roles(&env, "command,query,projector").await;
    let runner = |id: &str| {
        let mut own = env.clone();
        own.push(("PETSTORE__SAGA__RUNNER_ID", id.to_owned()));
        own
    };
    let paused = Service::start_roles(&runner("saga-a"), "saga").await;
    wait_for_owners(&database, |owners| owners.get("saga-a") == Some(&16)).await;

    let mut orders = Vec::new();
    for pet in &PETS[..6] {
        orders.push(place(&front, pet, false).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    paused.signal("STOP");
    let successor = Service::start_roles(&runner("saga-b"), "saga").await;
    wait_for_owners(&database, |owners| owners.get("saga-b") == Some(&16)).await;
    for order in &orders {
        let view = front.wait_for_terminal(order).await;
        assert_eq!(
            view["status"], "completed",
            "the new owner finished it: {view}"
        );
    }
    let woken = chrono::Utc::now().timestamp_millis();
    paused.signal("CONT");
    // Awake, it finds its leases gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paused.lines().iter().any(|line| {
        // At its next renewal (a third of the timeout), or when the fence refuses a
        // write of its first.
        NOTICED_A_LOST_LEASE.iter().any(|text| line.contains(text))
    }) {
        assert!(
            Instant::now() < deadline,
            "the paused owner never noticed: {:?}",
            paused.lines()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = providers.get("/calls").await;
    let late: Vec<&Value> = calls["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .filter(|call| {
            call["caller"] == "petstore (saga-a)" && call["at_ms"].as_i64() >= Some(woken)
        })
        .collect();
    assert!(
        late.is_empty(),
        "calls from the owner after it lost its leases: {late:?}"
    );
    assert_settled_once(&front, &database, &providers, &orders).await;
    // Each order's payment recorded once, whoever called the gateway first.
    let mut connection = database.connect().await;
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT aggregate_id FROM events WHERE event_type = 'PaymentProcessed'
                                GROUP BY aggregate_id HAVING count(*) > 1) AS twice",
    )
    .fetch_one(&mut connection)
    .await
    .expect("count");
    assert_eq!(doubled, 0);
    connection.close().await.expect("close");
    assert!(successor.stop().await.success());
    assert!(paused.stop().await.success());
    assert!(front.stop().await.success());
    database.drop().await;
}

#[tokio::test]
async fn the_only_process_killed_mid_burst_with_kafka_resumes_at_once_twenty_times() {
    let database = FreshDatabase::create().await;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let prefix = format!("ownership_{}", uuid::Uuid::new_v4().simple());
    let env = vec![
        ("DATABASE_URL", database.url.clone()),
        ("KAFKA_BROKERS", brokers),
        ("PETSTORE__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("PETSTORE__KAFKA__CONSUMER_GROUP", format!("{prefix}-saga")),
        ("PETSTORE__SAGA__RUNNER_ID", "solo".to_owned()),
        ("PETSTORE__DATABASE__MAX_CONNECTIONS", "6".to_owned()),
        ("PETSTORE__PROVIDERS__PAYMENT__LATENCY_MS", "5".to_owned()),
        ("PETSTORE__PROVIDERS__DELIVERY__LATENCY_MS", "5".to_owned()),
    ];
    let lease_timeout = Duration::from_secs(10); // the default
    let mut service = Service::start(&env).await;
    let mut pets = PETS.iter();
    for attempt in 1..=20 {
        // Orders mid-burst: the process dies right after accepting them.
        let mut burst = Vec::new();
        for _ in 0..2 {
            // Fourteen pets, forty orders: later ones find their pet sold (cancelled), which
            // ends their saga just as well.
            let pet = pets.next().copied().unwrap_or_else(|| {
                pets = PETS.iter();
                pets.next().copied().expect("a pet")
            });
            burst.push(place(&service, pet, false).await);
        }
        service.kill();
        let restarted = Instant::now();
        service = Service::start(&env).await;
        for order in &burst {
            service.wait_for_terminal(order).await;
        }
        let resumed = restarted.elapsed();
        assert!(
            resumed < lease_timeout,
            "attempt {attempt}: the sagas resumed {resumed:?} after the restart, not within the lease timeout"
        );
    }
    assert!(service.stop().await.success());
    database.drop().await;
}
