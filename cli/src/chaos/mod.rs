//! `petstore chaos saga`: drives orders through the saga while failing each step in turn
//! (the seed's `X-Simulate-Failure`) and crashing the saga runner between steps (the runner
//! is aborted, as `kill -9` would, and started again), then checks that everything
//! converged: every order settled, each completed order charged once, each charge of a
//! cancelled order refunded once, each reservation of a cancelled order released, no pet
//! sold twice, the gateway charged once per recorded payment.
//!
//! It runs in this process against the configured store (a temporary embedded store unless
//! `DATABASE_URL` is set; with `KAFKA_BROKERS` the runner consumes Kafka, fed by a relay in
//! this process), with pets of its own, so it can point at any deployment's backends
//! without touching their orders. On Postgres it then runs the [`ownership`] cases: two
//! runner processes, one killed or paused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use petstore_domain::order::{Order, OrderCommand, OrderRequest, OrderStatus};
use petstore_domain::payment::Payment;
use petstore_domain::pet::{Pet, PetCommand, PetDetails};
use petstore_domain::{CustomerId, Money, OrderId, PetCategory, PetId, SimulatedFailure};
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::{self, RecordedEvent};
use petstore_live_settings::Live;
use petstore_saga::providers::{SimulatedDeliveryProvider, SimulatedPaymentGateway};
use petstore_saga::SagaRunner;
use petstore_settings::Settings;
use petstore_telemetry::metrics::Metrics;
use petstore_web::CorrelationId;

use crate::{Application, Role};

mod ownership;

pub use ownership::{Runners, NOTICED_A_LOST_LEASE};

/// One scenario of the run.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// Nothing fails.
    Baseline,
    /// This step fails (`X-Simulate-Failure`).
    Fail(SimulatedFailure),
    /// The runner is killed once the first order reaches this status, then restarted.
    CrashAfter(OrderStatus),
    /// The delivery fails and the runner is killed while the order compensates.
    CrashWhileCompensating,
}

impl Case {
    /// Every case. No kill at `scheduled`: the owner writes the delivery's scheduling with
    /// the sale and the completion, in one commit, so no order is ever stored at it.
    const ALL: [Case; 7] = [
        Case::Baseline,
        Case::Fail(SimulatedFailure::InventoryService),
        Case::Fail(SimulatedFailure::PaymentService),
        Case::Fail(SimulatedFailure::DeliveryService),
        Case::CrashAfter(OrderStatus::Reserved),
        Case::CrashAfter(OrderStatus::Paid),
        Case::CrashWhileCompensating,
    ];

    fn name(self) -> String {
        match self {
            Case::Baseline => "nothing fails".to_owned(),
            Case::Fail(step) => format!("{} fails", step.as_str()),
            Case::CrashAfter(status) => format!("runner killed at {}", status.as_str()),
            Case::CrashWhileCompensating => "runner killed while compensating".to_owned(),
        }
    }

    fn failure(self) -> Option<SimulatedFailure> {
        match self {
            Case::Fail(step) => Some(step),
            Case::CrashWhileCompensating => Some(SimulatedFailure::DeliveryService),
            Case::Baseline | Case::CrashAfter(_) => None,
        }
    }

    /// Whether the case kills the runner (and fails if it never did).
    fn strikes(self) -> bool {
        matches!(self, Case::CrashAfter(_) | Case::CrashWhileCompensating)
    }

    /// Whether an order at `order` is where the runner is to be killed.
    fn crash_point(self, order: &Order) -> bool {
        match self {
            Case::CrashAfter(status) => order.status() == Some(status),
            Case::CrashWhileCompensating => {
                order.status() == Some(OrderStatus::Cancelled) && !order.is_settled()
            }
            Case::Baseline | Case::Fail(_) => false,
        }
    }
}

/// What one case came to.
#[derive(Debug, Default)]
pub struct CaseReport {
    /// The case.
    pub name: String,
    /// Orders placed.
    pub orders: usize,
    /// Orders completed.
    pub completed: usize,
    /// Orders cancelled (and settled).
    pub cancelled: usize,
    /// Payments recorded as captured.
    pub captured: usize,
    /// Payments refunded.
    pub refunded: usize,
    /// Reservations of cancelled orders released.
    pub released: usize,
    /// Times the runner was killed.
    pub crashes: usize,
    /// Times the runner was paused.
    pub pauses: usize,
    /// Why the case was not run, when it was not.
    pub skipped: Option<String>,
    /// What did not converge; empty when the case passed.
    pub problems: Vec<String>,
}

/// The whole run.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// Each case.
    pub cases: Vec<CaseReport>,
}

impl ChaosReport {
    /// Whether every case converged.
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|case| case.problems.is_empty())
    }
}

/// Runs every case with `orders` orders each, waiting at most `timeout` per case for them to
/// settle; the ownership cases start `runners`.
pub async fn saga(
    mut settings: Settings,
    orders: usize,
    timeout: Duration,
    runners: &Runners,
) -> anyhow::Result<ChaosReport> {
    // Slow enough providers that a kill lands while a call is in flight.
    settings.providers.payment.latency_ms = 60;
    settings.providers.delivery.latency_ms = 60;
    settings.providers.allow_simulated_failures = true;
    settings.http.listen = ([127, 0, 0, 1], 0).into();
    // The saga runs here, under this function's control; the application in this process
    // only relays to Kafka when configured (and serves its own health).
    let roles = [Role::Query, Role::Projector].into();
    let application = Application::build(settings.clone(), &roles).await?;
    let shutdown = application.shutdown_handle();
    let server = tokio::spawn(application.run_until_stopped());
    let database =
        petstore_event_store::database::Database::connect(&settings.database, &settings.storage)
            .await?;
    let store = EventStore::new(database.clone(), 8);
    let metrics = Metrics::new();
    let live = Live::start(store.clone(), &settings, metrics.clone()).await?;
    let payments = Arc::new(SimulatedPaymentGateway::new(live.clone()));
    let deliveries = Arc::new(SimulatedDeliveryProvider::new(live.clone()));
    let policies = live.policies(&metrics);
    let runner = {
        let runner = SagaRunner::new(
            store.clone(),
            settings.saga.clone(),
            policies,
            payments.clone(),
            deliveries,
            metrics,
            live,
        );
        match settings.kafka.brokers {
            Some(_) => runner.with_kafka(settings.kafka.clone(), settings.saga.partitions()?),
            None => runner,
        }
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut report = ChaosReport::default();
    let mut charged_before = payments.captured();
    for (index, case) in Case::ALL.into_iter().enumerate() {
        let pets = add_pets(&store, &format!("chaos-{}-{index}", &run[..8]), orders).await?;
        let start = || {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(runner.clone().run(async {
                let _ = stopped.await;
            }));
            (stop, task)
        };
        let mut task = Some(start());
        let mut placed = Vec::new();
        for pet in &pets {
            placed.push(place(&store, pet, case.failure()).await?);
        }
        let mut case_report = CaseReport {
            name: case.name(),
            orders,
            ..CaseReport::default()
        };
        let deadline = Instant::now() + timeout;
        loop {
            let mut loaded = Vec::with_capacity(placed.len());
            for order_id in &placed {
                loaded.push(store.load::<Order>(&order_id.to_string()).await?);
            }
            if case_report.crashes == 0 && loaded.iter().any(|order| case.crash_point(order)) {
                if let Some((_, task)) = task.take() {
                    task.abort();
                    let _ = task.await;
                }
                case_report.crashes += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                task = Some(start());
            }
            if loaded.iter().all(Order::is_settled) {
                break;
            }
            if Instant::now() >= deadline {
                for (order_id, order) in placed.iter().zip(&loaded) {
                    if !order.is_settled() {
                        case_report.problems.push(format!(
                            "order {order_id} did not settle within {} s: {}",
                            timeout.as_secs(),
                            order.status().map_or("unknown", |status| status.as_str())
                        ));
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A clean stop: the partitions are handed over at once (to the next case's runner,
        // or the ownership cases' processes).
        if let Some((stop, task)) = task.take() {
            let _ = stop.send(());
            task.await?;
        }
        if case.strikes() && case_report.crashes == 0 {
            case_report
                .problems
                .push("the runner was never killed: no order was seen where it was to be".into());
        }
        check(&store, &placed, &pets, &mut case_report).await?;
        let charged = payments.captured() - charged_before;
        charged_before = payments.captured();
        if charged != case_report.captured {
            case_report.problems.push(format!(
                "the gateway took {charged} charges for {} recorded payments",
                case_report.captured
            ));
        }
        report.cases.push(case_report);
    }
    let partitions = settings.saga.partitions()?;
    for (index, blow) in ownership::Blow::ALL.into_iter().enumerate() {
        if database.engine() != "postgres" {
            report.cases.push(CaseReport {
                name: blow.name(),
                skipped: Some(
                    "skipped: runner processes share a store only on Postgres (DATABASE_URL)"
                        .to_owned(),
                ),
                ..CaseReport::default()
            });
            continue;
        }
        let name = format!("chaos-{}-owner-{index}", &run[..8]);
        let case = ownership::run(blow, &store, partitions, runners, &name, orders, timeout);
        report.cases.push(case.await?);
    }
    shutdown.trigger();
    server.await??;
    database.close().await;
    Ok(report)
}

async fn add_pets(store: &EventStore, prefix: &str, count: usize) -> anyhow::Result<Vec<PetId>> {
    let metadata = EventMetadata::new(CorrelationId::generate(), "chaos");
    let mut pets = Vec::with_capacity(count);
    for index in 0..count {
        let pet_id = PetId::parse(&format!("{prefix}-{index:03}"))?;
        let details = PetDetails {
            pet_id: pet_id.clone(),
            name: format!("Chaos pet {index}"),
            category: PetCategory::Dog,
            breed: "Mixed".into(),
            age_months: 3,
            vaccinated: true,
            price: Money::usd(10_000)?,
            description: "placed by petstore chaos saga".into(),
        };
        store
            .execute::<Pet>(pet_id.as_str(), PetCommand::AddPet(details), &(), &metadata)
            .await
            .map_err(|error| anyhow::anyhow!("adding {pet_id}: {error}"))?;
        pets.push(pet_id);
    }
    Ok(pets)
}

/// Places an order as `POST /orders` does (express processing, so the saga charges it).
async fn place(
    store: &EventStore,
    pet_id: &PetId,
    failure: Option<SimulatedFailure>,
) -> anyhow::Result<OrderId> {
    let order_id = OrderId::random();
    let request = OrderRequest {
        order_id,
        customer_id: CustomerId::parse("chaos")?,
        pet_id: pet_id.clone(),
        amount: Money::usd(10_000)?,
        special_instructions: None,
        simulated_failure: failure,
        express_processing: Some(true),
    };
    let metadata = EventMetadata::new(CorrelationId::generate(), "chaos");
    store
        .execute_on_new::<Order>(
            &order_id.to_string(),
            OrderCommand::PlaceOrder(request),
            &(),
            &metadata,
        )
        .await
        .map_err(|error| anyhow::anyhow!("placing an order: {error}"))?;
    Ok(order_id)
}

async fn events(
    store: &EventStore,
    aggregate_type: &str,
    aggregate_id: &str,
) -> anyhow::Result<Vec<RecordedEvent>> {
    Ok(stream::aggregate_events_newest_first(
        store.database(),
        aggregate_type,
        aggregate_id,
        1..i64::MAX,
        10_000,
    )
    .await?)
}

fn names_order(event: &RecordedEvent, order_id: &str) -> bool {
    event.payload.variant_field("order_id").as_deref() == Some(order_id)
}

/// The convergence checks of one case, from the log.
async fn check(
    store: &EventStore,
    orders: &[OrderId],
    pets: &[PetId],
    report: &mut CaseReport,
) -> anyhow::Result<()> {
    let mut sold: BTreeMap<String, usize> = BTreeMap::new();
    for pet in pets {
        let pet_events = events(store, Pet::TYPE, pet.as_str()).await?;
        let count = pet_events
            .iter()
            .filter(|event| event.event_type == "PetSold")
            .count();
        sold.insert(pet.to_string(), count);
    }
    for order_id in orders {
        let key = order_id.to_string();
        let order: Order = store.load(&key).await?;
        let payment_events = events(store, Payment::TYPE, &key).await?;
        let count = |event_type: &str| {
            payment_events
                .iter()
                .filter(|event| event.event_type == event_type)
                .count()
        };
        let (captured, refunded) = (count("PaymentProcessed"), count("PaymentRefunded"));
        report.captured += captured;
        report.refunded += refunded;
        if captured > 1 {
            report
                .problems
                .push(format!("order {key} was charged {captured} times"));
        }
        match order.status() {
            Some(OrderStatus::Completed) => {
                report.completed += 1;
                if captured != 1 || refunded != 0 {
                    report.problems.push(format!(
                        "completed order {key}: {captured} charges, {refunded} refunds"
                    ));
                }
            }
            Some(OrderStatus::Cancelled) => {
                report.cancelled += 1;
                if refunded != captured {
                    report.problems.push(format!(
                        "cancelled order {key}: {captured} charges, {refunded} refunds"
                    ));
                }
                let Some(pet) = order.request().map(|request| request.pet_id.to_string()) else {
                    continue;
                };
                let pet_events = events(store, Pet::TYPE, &pet).await?;
                let of = |event_type: &str| {
                    pet_events
                        .iter()
                        .filter(|event| event.event_type == event_type && names_order(event, &key))
                        .count()
                };
                let (reserved, released) = (of("PetReserved"), of("PetReleased"));
                report.released += released;
                if reserved != released {
                    report.problems.push(format!(
                        "cancelled order {key}: pet {pet} reserved {reserved} times, released {released}"
                    ));
                }
            }
            _ => {}
        }
    }
    for (pet, count) in sold {
        if count > 1 {
            report
                .problems
                .push(format!("pet {pet} was sold {count} times"));
        }
    }
    Ok(())
}

/// The report as a table.
pub fn table(report: &ChaosReport) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "case",
        "orders",
        "completed",
        "cancelled",
        "charged",
        "refunded",
        "released",
        "runner kills",
        "runner pauses",
        "verdict",
    ]);
    for case in &report.cases {
        table.add_row([
            case.name.clone(),
            case.orders.to_string(),
            case.completed.to_string(),
            case.cancelled.to_string(),
            case.captured.to_string(),
            case.refunded.to_string(),
            case.released.to_string(),
            case.crashes.to_string(),
            case.pauses.to_string(),
            if let Some(skipped) = &case.skipped {
                skipped.clone()
            } else if case.problems.is_empty() {
                "converged".to_owned()
            } else {
                case.problems.join("; ")
            },
        ]);
    }
    table
}
