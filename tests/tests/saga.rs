//! The order-fulfilment saga, black-box, on both engines: happy path, failures and their
//! compensations, deadlines (also across a restart), contention for one pet, the payments
//! API, and a saga runner killed at random points.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use petstore_cli::Role;
use petstore_event_store::database::Database;
use petstore_event_store::deadlines;
use petstore_event_store::leases::Leases;
use petstore_event_store::store::EventStore;
use petstore_live_settings::Live;
use petstore_saga::providers::{SimulatedDeliveryProvider, SimulatedPaymentGateway};
use petstore_saga::SagaRunner;
use petstore_settings::{FlagSetting, Settings};
use petstore_telemetry::metrics::Metrics;
use petstore_tests::{add_pets, assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

on_both_engines!(
    an_order_completes_and_its_audit_trail_shows_the_whole_chain,
    a_failing_payment_cancels_the_order_and_frees_the_pet,
    a_failing_delivery_refunds_the_payment_and_frees_the_pet,
    a_failing_inventory_service_cancels_the_order,
    a_step_that_times_out_is_compensated,
    a_deadline_survives_a_restart_and_fires_once,
    twenty_orders_for_one_pet_sell_it_once,
    customers_pay_through_the_payments_api_when_express_processing_is_off,
    the_payments_api_refuses_what_it_cannot_do,
    a_saga_runner_killed_at_random_points_loses_and_doubles_nothing,
    a_reservation_deadline_fires_though_no_runner_ever_handled_the_order,
);

/// The reservation deadline is scheduled when the order is placed, not only when a saga
/// runner handles `OrderCreated`: an order whose events no runner takes (a Kafka partition
/// nobody consumes) is still cancelled when its step times out, by any runner's deadline
/// loop.
async fn a_reservation_deadline_fires_though_no_runner_ever_handled_the_order(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.saga.reservation_timeout_ms = 300;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;
    let order_id = app.post_order("budgie-001", None).await;

    let store = EventStore::new(storage.database().await, 4);
    let live = Live::start(store.clone(), &settings, Metrics::new())
        .await
        .expect("live settings");
    let runner = SagaRunner::new(
        store.clone(),
        settings.saga.clone(),
        live.policies(&Metrics::new()),
        Arc::new(SimulatedPaymentGateway::new(live.clone())),
        Arc::new(SimulatedDeliveryProvider::new(live.clone())),
        Metrics::new(),
        live,
    );
    // Only the deadline loop's work, never the stream: the order's events stay unhandled.
    let deadline = Instant::now() + Duration::from_secs(30);
    while runner.fire_due_deadlines().await.expect("deadlines") == 0 {
        assert!(
            Instant::now() < deadline,
            "the reservation deadline never fell due"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = app
        .wait_for_order(&order_id, |view| {
            view["cancellation_reason"] == "step-timed-out"
        })
        .await;
    // Nothing was reserved; the compensation is recorded once a runner handles the
    // cancellation.
    assert_eq!(view["status"], "compensating", "{view}");
    assert_eq!(storage.count_events("PetReserved").await, 0);
    app.stop().await;
    storage.remove().await;
}

async fn spawn_with(engine: Engine, configure: impl FnOnce(&mut Settings)) -> (Storage, TestApp) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    configure(&mut settings);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    (storage, app)
}

/// Saga runners over one store, sharing one simulated gateway and delivery provider (what
/// each order was charged is counted in one place), started on demand.
struct Runners {
    store: EventStore,
    settings: Settings,
    live: Live,
    payments: Arc<SimulatedPaymentGateway>,
    deliveries: Arc<SimulatedDeliveryProvider>,
}

impl Runners {
    async fn new(store: &EventStore, settings: &Settings) -> Self {
        let live = Live::start(store.clone(), settings, Metrics::new())
            .await
            .expect("live settings");
        Self {
            store: store.clone(),
            settings: settings.clone(),
            payments: Arc::new(SimulatedPaymentGateway::new(live.clone())),
            deliveries: Arc::new(SimulatedDeliveryProvider::new(live.clone())),
            live,
        }
    }

    /// Waits (30 s at most) until `accept` says yes to how many partitions each runner
    /// holds (live leases, by the database's clock); `what` names the wait when it fails.
    async fn wait_for_owners(&self, what: &str, accept: impl Fn(&BTreeMap<String, usize>) -> bool) {
        let leases = Leases::new(
            self.store.database(),
            "test-observer",
            Duration::from_secs(1),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut owners = BTreeMap::new();
            for state in leases.states().await.expect("leases") {
                if let (false, Some(owner)) = (state.free, state.owner) {
                    *owners.entry(owner).or_insert(0) += 1;
                }
            }
            if accept(&owners) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {owners:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a runner (with the settings' `saga.runner_id`, else an id of its own).
    fn start(&self) -> tokio::task::JoinHandle<()> {
        let runner = SagaRunner::new(
            self.store.clone(),
            self.settings.saga.clone(),
            self.live.policies(&Metrics::new()),
            self.payments.clone(),
            self.deliveries.clone(),
            Metrics::new(),
            self.live.clone(),
        );
        tokio::spawn(runner.run(futures::future::pending()))
    }
}

async fn audit_types(app: &TestApp, order_id: &str) -> Vec<String> {
    let trail: Value = app
        .get(&format!("/petstore-domain/orders/{order_id}/audit"))
        .await
        .json()
        .await
        .expect("json");
    trail["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["event_type"].as_str().expect("type").to_owned())
        .collect()
}

async fn wait_for_pet(app: &TestApp, pet_id: &str, availability: &str) {
    app.wait_for_json(&format!("/petstore-domain/pets/{pet_id}"), |pet| {
        pet["availability"] == availability
    })
    .await;
}

fn step<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|step| step["name"] == name)
        .expect("step present")
}

async fn an_order_completes_and_its_audit_trail_shows_the_whole_chain(engine: Engine) {
    let (storage, app) = spawn_with(engine, |_| {}).await;
    let order_id = app.post_order("golden-retriever-001", None).await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["status"], "completed");
    for name in ["reservation", "payment", "delivery", "completion"] {
        let step = step(&view, name);
        assert_eq!(step["state"], "succeeded", "{name}: {step}");
        assert!(step["started_at"].is_string() && step["finished_at"].is_string());
    }
    wait_for_pet(&app, "golden-retriever-001", "sold").await;

    let trail: Value = app
        .get(&format!("/petstore-domain/orders/{order_id}/audit"))
        .await
        .json()
        .await
        .expect("json");
    let events = trail["events"].as_array().expect("events");
    let types: Vec<&str> = events
        .iter()
        .map(|event| event["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "PetReserved",
            "OrderPetReserved",
            "PaymentProcessed",
            "OrderPaid",
            "DeliveryScheduled",
            "OrderDeliveryScheduled",
            "PetSold",
            "OrderCompleted",
        ]
    );
    let mut positions = Vec::new();
    for event in events {
        assert_eq!(event["correlation_id"], view["correlation_id"]);
        for field in [
            "event_id",
            "event_version",
            "aggregate_type",
            "aggregate_id",
            "causation_id",
            "subject",
            "command_id",
            "timestamp",
        ] {
            assert!(
                event[field].as_str().is_some_and(|value| !value.is_empty()),
                "{field} in {event}"
            );
        }
        positions.push(event["global_position"].as_i64().expect("position"));
    }
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "in stream order"
    );
    if engine == Engine::Postgres {
        // The owner writes the steps between two provider calls as one commit each: the
        // reservation with its confirmation, the payment with the order's, the delivery
        // with the sale and the completion.
        let Database::Postgres(pool) = storage.database().await else {
            panic!("Postgres")
        };
        let commits: Vec<(i64, String)> = sqlx::query_as(
            "SELECT global_position, transaction_id::text FROM events
              WHERE global_position = ANY($1) ORDER BY global_position",
        )
        .bind(&positions)
        .fetch_all(&pool)
        .await
        .expect("the events' transactions");
        let mut grouped: Vec<(String, Vec<&str>)> = Vec::new();
        for ((_, transaction), event_type) in commits.into_iter().zip(&types) {
            match grouped.last_mut() {
                Some((last, types)) if *last == transaction => types.push(event_type),
                _ => grouped.push((transaction, vec![event_type])),
            }
        }
        let grouped: Vec<Vec<&str>> = grouped.into_iter().map(|(_, types)| types).collect();
        assert_eq!(
            grouped,
            [
                vec!["OrderCreated"],
                vec!["PetReserved", "OrderPetReserved"],
                vec!["PaymentProcessed", "OrderPaid"],
                vec![
                    "DeliveryScheduled",
                    "OrderDeliveryScheduled",
                    "PetSold",
                    "OrderCompleted"
                ],
            ]
        );
    }
    // The subject comes from the token (the test client's is an admin's).
    assert_eq!(events[0]["subject"], "admin");
    assert_eq!(events[1]["subject"], "saga");
    assert_eq!(
        events[1]["causation_id"], events[0]["event_id"],
        "each step names its cause"
    );

    // The runner counts the saga when it reads OrderCompleted back, which may be just after
    // the read model showed it.
    app.wait_for_text("/metrics", |metrics| {
        metrics.contains(r#"petstore_saga_completed_total{outcome="completed",reason=""} 1"#)
    })
    .await;
    // The saga ended: none of its step deadlines is left to fire (they were settled in the
    // commit that completed the order).
    let database = storage.database().await;
    let armed = deadlines::due(&database, Utc::now() + chrono::Duration::days(1), 100)
        .await
        .expect("deadlines");
    assert_eq!(armed, [], "no deadline armed after the saga ended");
    if let Database::Postgres(pool) = &database {
        let steps: Vec<String> = sqlx::query_scalar(
            "SELECT step FROM saga_deadlines
              WHERE order_id = $1 AND fired_at_ms IS NOT NULL ORDER BY step",
        )
        .bind(&order_id)
        .fetch_all(pool)
        .await
        .expect("deadlines");
        assert_eq!(steps, ["delivery", "payment", "reservation"]);
    }
    app.stop().await;
    storage.remove().await;
}

async fn a_failing_payment_cancels_the_order_and_frees_the_pet(engine: Engine) {
    let (storage, app) = spawn_with(engine, |_| {}).await;
    let order_id = app.post_order("beagle-001", Some("payment-service")).await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["cancellation_reason"], "payment-failed");
    assert_eq!(step(&view, "payment")["state"], "failed");
    wait_for_pet(&app, "beagle-001", "available").await;
    let types = audit_types(&app, &order_id).await;
    assert!(types.contains(&"PaymentDeclined".to_owned()));
    assert!(types.contains(&"PetReleased".to_owned()));
    assert!(
        !types.iter().any(|t| t.starts_with("Delivery")),
        "no delivery: {types:?}"
    );
    assert_eq!(storage.count_events("PaymentProcessed").await, 0);
    app.stop().await;
    storage.remove().await;
}

async fn a_failing_delivery_refunds_the_payment_and_frees_the_pet(engine: Engine) {
    let (storage, app) = spawn_with(engine, |_| {}).await;
    let order_id = app.post_order("corgi-001", Some("delivery-service")).await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["cancellation_reason"], "delivery-failed");
    let view = app
        .wait_for_order(&order_id, |view| {
            step(view, "payment")["state"] == "compensated"
                && step(view, "reservation")["state"] == "compensated"
        })
        .await;
    assert_eq!(step(&view, "delivery")["state"], "failed");
    wait_for_pet(&app, "corgi-001", "available").await;
    let types = audit_types(&app, &order_id).await;
    let refunded = types
        .iter()
        .position(|t| t == "PaymentRefunded")
        .expect("refunded");
    let released = types
        .iter()
        .position(|t| t == "PetReleased")
        .expect("released");
    assert!(
        refunded < released,
        "compensations run in reverse order: {types:?}"
    );
    app.stop().await;
    storage.remove().await;
}

async fn a_failing_inventory_service_cancels_the_order(engine: Engine) {
    let (storage, app) = spawn_with(engine, |_| {}).await;
    let order_id = app
        .post_order("budgie-001", Some("inventory-service"))
        .await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["cancellation_reason"], "inventory-failed");
    wait_for_pet(&app, "budgie-001", "available").await;
    let unknown = app
        .client
        .post(app.url("/petstore-domain/orders"))
        .header("X-Simulate-Failure", "dns-service")
        .json(&json!({"customer_id": "c", "pet_id": "budgie-001"}))
        .send()
        .await
        .expect("answered");
    assert_problem(unknown, 422).await;
    app.stop().await;
    storage.remove().await;
}

async fn a_step_that_times_out_is_compensated(engine: Engine) {
    let (storage, app) = spawn_with(engine, |settings| {
        // The gateway answers after the payment step's deadline.
        // (simulated latency varies by up to half: at least 1.5 s against a 0.2 s deadline)
        settings.providers.payment.latency_ms = 3_000;
        settings.resilience.payment.timeout_ms = 20_000;
        settings.resilience.payment.attempt_timeout_ms = 20_000;
        settings.saga.payment_timeout_ms = 200;
        settings.saga.deadline_poll_interval_ms = 20;
    })
    .await;
    let order_id = app.post_order("maine-coon-001", None).await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["cancellation_reason"], "step-timed-out");
    // The late charge is refunded when it lands, and the pet is freed.
    app.wait_for_order(&order_id, |view| {
        step(view, "payment")["state"] == "compensated"
    })
    .await;
    wait_for_pet(&app, "maine-coon-001", "available").await;
    assert_eq!(storage.count_events("PaymentRefunded").await, 1);
    assert_eq!(storage.count_events("OrderCompleted").await, 0);
    app.stop().await;
    storage.remove().await;
}

async fn a_deadline_survives_a_restart_and_fires_once(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.feature_flags.express_order_processing = FlagSetting::Off; // the saga waits for the customer
    settings.saga.payment_timeout_ms = 1_500;
    settings.saga.deadline_poll_interval_ms = 20;
    let app = TestApp::start(settings.clone()).await;
    app.wait_until_ready().await;
    let order_id = app.post_order("cockatiel-001", None).await;
    app.wait_for_order(&order_id, |view| view["status"] == "reserved")
        .await;
    app.stop().await;

    tokio::time::sleep(Duration::from_millis(1_600)).await; // the deadline passes while down
    let app = TestApp::start(settings).await;
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["cancellation_reason"], "step-timed-out");
    wait_for_pet(&app, "cockatiel-001", "available").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        storage.count_events("OrderCancelled").await,
        1,
        "fired once"
    );
    app.stop().await;
    storage.remove().await;
}

async fn twenty_orders_for_one_pet_sell_it_once(engine: Engine) {
    let (storage, app) = spawn_with(engine, |_| {}).await;
    let app = Arc::new(app);
    let orders: Vec<String> = futures::future::join_all((0..20).map(|_| {
        let app = app.clone();
        async move { app.post_order("african-grey-001", None).await }
    }))
    .await;
    let mut completed = 0;
    for order_id in &orders {
        let view = app.wait_for_terminal(order_id).await;
        match view["status"].as_str() {
            Some("completed") => completed += 1,
            _ => assert_eq!(view["cancellation_reason"], "pet-unavailable", "{view}"),
        }
    }
    assert_eq!(completed, 1, "exactly one order gets the pet");
    assert_eq!(
        storage.count_events("PaymentProcessed").await,
        1,
        "exactly one payment"
    );
    assert_eq!(storage.count_events("PetSold").await, 1);
    wait_for_pet(&app, "african-grey-001", "sold").await;
    let app = Arc::try_unwrap(app).ok().expect("no other handle");
    app.stop().await;
    storage.remove().await;
}

async fn customers_pay_through_the_payments_api_when_express_processing_is_off(engine: Engine) {
    let (storage, app) = spawn_with(engine, |settings| {
        settings.feature_flags.express_order_processing = FlagSetting::Off;
    })
    .await;
    let order_id = app.post_order("siamese-cat-001", None).await;
    let view = app
        .wait_for_order(&order_id, |view| view["status"] == "reserved")
        .await;
    assert_eq!(step(&view, "payment")["state"], "in_progress");
    let paid = app
        .post_json(
            "/petstore-domain/payments",
            &json!({"order_id": order_id, "amount": {"amount_minor": 65000, "currency": "USD"}}),
        )
        .await;
    assert_eq!(paid.status(), 200);
    let paid: Value = paid.json().await.expect("json");
    assert_eq!(paid["status"], "processed");
    assert!(paid["provider_reference"]
        .as_str()
        .is_some_and(|r| r.starts_with("ch_")));
    let view = app.wait_for_terminal(&order_id).await;
    assert_eq!(view["status"], "completed");
    // The customer's payment is part of the order's audit trail.
    assert!(audit_types(&app, &order_id)
        .await
        .contains(&"PaymentProcessed".to_owned()));
    // Paying again is refused, not charged twice (also through the legacy alias).
    let again = app
        .post_json(
            "/petstore-domain/process-payment",
            &json!({"order_id": order_id}),
        )
        .await;
    assert_problem(again, 409).await;
    assert_eq!(storage.count_events("PaymentProcessed").await, 1);
    app.stop().await;
    storage.remove().await;
}

async fn the_payments_api_refuses_what_it_cannot_do(engine: Engine) {
    let (storage, app) = spawn_with(engine, |settings| {
        settings.feature_flags.express_order_processing = FlagSetting::Off;
    })
    .await;
    let order_id = app.post_order("goldfish-001", None).await;
    app.wait_for_order(&order_id, |view| view["status"] == "reserved")
        .await;
    let pay = |body: Value| {
        let request = app
            .client
            .post(app.url("/petstore-domain/payments"))
            .json(&body);
        async move { request.send().await.expect("answered") }
    };
    assert_problem(
        pay(json!({"order_id": "6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90"})).await,
        404,
    )
    .await;
    assert_problem(pay(json!({"order_id": "not-a-uuid"})).await, 422).await;
    assert_problem(pay(json!({})).await, 422).await;
    assert_problem(pay(json!({"order_id": order_id, "tip": 5})).await, 422).await;
    let wrong_amount =
        json!({"order_id": order_id, "amount": {"amount_minor": 1, "currency": "USD"}});
    assert_problem(pay(wrong_amount).await, 422).await;
    let bad_currency =
        json!({"order_id": order_id, "amount": {"amount_minor": 1500, "currency": "usd"}});
    assert_problem(pay(bad_currency).await, 422).await;
    let malformed = app
        .client
        .post(app.url("/petstore-domain/payments"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .expect("answered");
    assert_problem(malformed, 400).await;
    assert_eq!(
        storage.count_events("PaymentProcessed").await,
        0,
        "nothing charged"
    );
    app.stop().await;

    // With express processing on, the saga pays; customers cannot.
    let mut settings = storage.settings();
    settings.feature_flags.express_order_processing = FlagSetting::On;
    let app = TestApp::start(settings).await;
    let order_id = app.post_order("betta-001", None).await;
    app.wait_for_terminal(&order_id).await;
    let refused = app
        .post_json("/petstore-domain/payments", &json!({"order_id": order_id}))
        .await;
    assert_problem(refused, 409).await;
    app.stop().await;
    storage.remove().await;
}

/// Runs the application without its saga role and drives the sagas with a runner the test
/// starts and kills (drops mid-flight) over and over, then lets a last one finish.
async fn a_saga_runner_killed_at_random_points_loses_and_doubles_nothing(engine: Engine) {
    const ORDERS: usize = 30;
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.providers.payment.latency_ms = 10;
    settings.providers.delivery.latency_ms = 10;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;

    let store = EventStore::new(storage.database().await, 16);
    let pets = add_pets(&store, "test-puppy", ORDERS).await;
    let mut orders = Vec::new();
    for pet_id in &pets {
        orders.push(app.post_order(pet_id, None).await);
    }

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
    };
    for _ in 0..12 {
        let task = tokio::spawn(runner().run(futures::future::pending()));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..80))).await;
        task.abort();
        let _ = task.await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let last = tokio::spawn(runner().run(async {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + Duration::from_secs(60);
    for order_id in &orders {
        loop {
            let view: Value = app
                .get(&format!("/petstore-domain/orders/{order_id}/status"))
                .await
                .json()
                .await
                .expect("json");
            if view["status"] == "completed" {
                break;
            }
            assert_ne!(
                view["status"], "cancelled",
                "nothing should fail here: {view}"
            );
            assert!(Instant::now() < deadline, "saga stuck: {view}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let _ = stop.send(());
    last.await.expect("runner stops cleanly");

    let completed = storage.count_events("OrderCompleted").await;
    assert_eq!(completed, ORDERS as i64);
    assert_eq!(
        storage.count_events("PaymentProcessed").await,
        completed,
        "one payment per order"
    );
    assert_eq!(
        storage.count_events("DeliveryScheduled").await,
        completed,
        "one delivery per order"
    );
    assert_eq!(storage.count_events("PetSold").await, completed);
    assert_eq!(
        payments.captured(),
        ORDERS,
        "the gateway charged each order once"
    );
    assert_eq!(
        deliveries.booked(),
        ORDERS,
        "the provider booked each delivery once"
    );
    app.stop().await;
    storage.remove().await;
}

/// Two runners following one Postgres store (no Kafka) share the saga partitions through
/// leases: each order is handled by one of them, its payment charged by one call; when one
/// dies, the other takes its partitions over once their leases expire and finishes the
/// orders placed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_share_the_partitions_and_one_takes_over_when_the_other_dies() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    settings.saga.lease_timeout_ms = 1_000;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;
    let store = EventStore::new(storage.database().await, 4);
    let runners = Runners::new(&store, &settings).await;
    let start_runner = || runners.start();
    let payments = &runners.payments;
    let (first, second) = (start_runner(), start_runner());
    let shared = |owners: &BTreeMap<String, usize>| {
        owners.len() == 2 && owners.values().all(|count| *count == 8)
    };
    runners
        .wait_for_owners("the runners never shared", shared)
        .await;

    let pets = [
        "golden-retriever-001",
        "labrador-001",
        "beagle-001",
        "corgi-001",
        "budgie-001",
    ];
    let mut orders = Vec::new();
    for pet in pets {
        orders.push(app.post_order(pet, None).await);
    }
    for order in &orders {
        let view = app
            .wait_for_order(order, |view| view["status"] == "completed")
            .await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    assert_eq!(payments.calls(), orders.len(), "one charge call per order");

    // One runner dies: the other owns every partition once the leases expire.
    first.abort();
    let _ = first.await;
    runners
        .wait_for_owners("no takeover", |owners| {
            owners.len() == 1 && owners.values().all(|count| *count == 16)
        })
        .await;
    let more = ["persian-cat-001", "siamese-cat-001", "goldfish-001"];
    let mut later = Vec::new();
    for pet in more {
        later.push(app.post_order(pet, None).await);
    }
    for order in &later {
        app.wait_for_order(order, |view| view["status"] == "completed")
            .await;
    }
    assert_eq!(payments.calls(), orders.len() + later.len());
    second.abort();
    app.stop().await;
    storage.remove().await;
}

/// A runner started again under its `saga.runner_id` (its process killed: nothing handed
/// over) takes its partitions back at once, long before its leases expire; a second process
/// started with the same id while the first still runs takes the id over, and the first
/// stops owning anything. Orders complete throughout, each charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_restarted_under_its_id_takes_its_partitions_back_at_once() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    // Far longer than the test waits: only the same id can take the partitions back.
    settings.saga.lease_timeout_ms = 120_000;
    settings.saga.runner_id = Some("node-1".to_owned());
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;
    let store = EventStore::new(storage.database().await, 4);
    let runners = Runners::new(&store, &settings).await;
    let start_runner = || runners.start();
    let payments = &runners.payments;
    let petstore_event_store::database::Database::Postgres(pool) = store.database().clone() else {
        panic!("a Postgres store");
    };
    // (owner, epoch) of each partition held now, by the database's clock.
    let leases = || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT owner, epoch FROM saga_leases
              WHERE owner IS NOT NULL
                AND expires_at_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint
              ORDER BY partition_number",
        )
        .fetch_all(&pool)
        .await
        .expect("leases");
        rows
    };
    // Waits until node-1 holds all 16 partitions at epochs above `above`; answers them.
    let all_taken = |above: i64| {
        let leases = &leases;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let rows = leases().await;
                if rows.len() == 16
                    && rows
                        .iter()
                        .all(|(owner, epoch)| owner == "node-1" && *epoch > above)
                {
                    return rows;
                }
                assert!(
                    Instant::now() < deadline,
                    "node-1 never held every partition above epoch {above}: {rows:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut orders = Vec::new();
    let complete = async |pet: &str, orders: &mut Vec<String>| {
        let order = app.post_order(pet, None).await;
        let view = app
            .wait_for_order(&order, |view| view["status"] == "completed")
            .await;
        assert_eq!(view["status"], "completed", "{view}");
        orders.push(order);
    };

    let first = start_runner();
    let taken = all_taken(0).await;
    complete("golden-retriever-001", &mut orders).await;
    first.abort(); // killed: its leases stay until they expire, two minutes on
    let _ = first.await;
    let again = start_runner();
    let epoch = taken.iter().map(|(_, epoch)| *epoch).max().expect("16");
    all_taken(epoch).await;
    complete("labrador-001", &mut orders).await;

    // The same id started twice: the newer instance takes it over.
    let retaken = all_taken(0).await;
    let twin = start_runner();
    let epoch = retaken.iter().map(|(_, epoch)| *epoch).max().expect("16");
    all_taken(epoch).await;
    complete("beagle-001", &mut orders).await;
    let instances: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT owner, instance FROM saga_runners")
            .fetch_all(&pool)
            .await
            .expect("runners");
    assert_eq!(instances.len(), 1, "one row per runner id: {instances:?}");
    assert!(
        !again.is_finished(),
        "a displaced runner stalls, it does not exit"
    );
    assert_eq!(payments.calls(), orders.len(), "one charge call per order");
    again.abort();
    twin.abort();
    app.stop().await;
    storage.remove().await;
}

/// A second runner started while orders pour in takes half the partitions from the first
/// (handed over, not expired); every order completes, each charged once. (A partition handed
/// over mid-step may see its charge asked for again by the new owner, under the same key:
/// one charge.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_added_under_load_takes_partitions_and_nothing_is_lost_or_doubled() {
    const ORDERS: usize = 40;
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    // Long: the partitions move only by being handed over.
    settings.saga.lease_timeout_ms = 60_000;
    let roles: BTreeSet<Role> = [Role::Command, Role::Query, Role::Projector].into();
    let app = TestApp::start_with_roles(settings.clone(), &roles).await;
    app.wait_until_ready().await;
    let store = EventStore::new(storage.database().await, 8);
    let pets = add_pets(&store, "added-runner", ORDERS).await;
    let runners = Runners::new(&store, &settings).await;
    let start_runner = || runners.start();
    let payments = &runners.payments;
    let first = start_runner();
    let mut second = None;
    let mut orders = Vec::new();
    for (index, pet) in pets.iter().enumerate() {
        orders.push(app.post_order(pet, None).await);
        if index == ORDERS / 3 {
            second = Some(start_runner());
        }
    }
    runners
        .wait_for_owners("the partitions never moved", |owners| {
            owners.len() == 2 && owners.values().all(|count| *count == 8)
        })
        .await;
    for order in &orders {
        let view = app
            .wait_for_order(order, |view| view["status"] == "completed")
            .await;
        assert_eq!(view["status"], "completed", "{view}");
    }
    assert_eq!(payments.captured(), ORDERS, "one charge per order");
    assert_eq!(
        storage.count_events("PaymentProcessed").await,
        ORDERS as i64
    );
    assert_eq!(
        storage.count_events("DeliveryScheduled").await,
        ORDERS as i64
    );
    first.abort();
    if let Some(second) = second {
        second.abort();
    }
    app.stop().await;
    storage.remove().await;
}
