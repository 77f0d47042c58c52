//! The ownership cases of `petstore chaos saga` (Postgres only): two saga runners, real
//! processes of this binary (`petstore serve --roles saga`), share the saga partitions
//! through their leases and call the simulated providers over HTTP; the owner of the first
//! order to reach a step is killed (`kill -9`) or paused (`SIGSTOP`) past its lease, and the
//! other takes its partitions over. Checks, besides the log's: each effect the events record
//! was made once by the providers, asked for under one key; a paused owner, woken, notices
//! its lost leases and calls no provider for the orders its successor settled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cqrs_es::Aggregate;
use petstore_domain::delivery::Delivery;
use petstore_domain::order::{Order, OrderStatus};
use petstore_domain::partition::Partitions;
use petstore_domain::{OrderId, SimulatedFailure};
use petstore_event_store::leases::Leases;
use petstore_event_store::store::EventStore;

use super::{add_pets, check, place, CaseReport};
use crate::provider_simulator::{Behaviour, Simulator};

/// The lease timeout the runners of these cases use: a takeover within a few seconds.
const LEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What is done to the owner.
#[derive(Debug, Clone, Copy)]
pub(super) enum Blow {
    /// `kill -9` once the first order reaches this status.
    Kill(OrderStatus),
    /// `SIGSTOP` once the first order reaches this status, `SIGCONT` after its successor
    /// settled every order.
    Pause(OrderStatus),
}

impl Blow {
    /// The cases, in order.
    pub(super) const ALL: [Blow; 2] = [
        Blow::Kill(OrderStatus::Paid),
        Blow::Pause(OrderStatus::Reserved),
    ];

    pub(super) fn name(self) -> String {
        match self {
            Blow::Kill(status) => format!("owner process killed at {}", status.as_str()),
            Blow::Pause(status) => {
                format!("owner process paused past its lease at {}", status.as_str())
            }
        }
    }

    fn at(self) -> OrderStatus {
        match self {
            Blow::Kill(status) | Blow::Pause(status) => status,
        }
    }
}

/// How to start this binary as a saga runner.
#[derive(Debug, Clone)]
pub struct Runners {
    /// The `petstore` binary.
    pub program: PathBuf,
    /// The `--config-dir` the check itself was given, passed on.
    pub config_dir: Option<PathBuf>,
}

/// A saga runner process, its last log lines kept.
struct Process {
    id: String,
    child: Child,
    lines: Arc<Mutex<VecDeque<String>>>,
}

/// How many of a runner's log lines are kept (shown when a case fails).
const KEPT_LINES: usize = 200;

impl Process {
    fn start(runners: &Runners, id: String, providers: &str) -> anyhow::Result<Self> {
        let mut command = Command::new(&runners.program);
        if let Some(config_dir) = &runners.config_dir {
            command.arg("--config-dir").arg(config_dir);
        }
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--roles",
                "saga",
                "--no-migrate",
            ])
            .env("PETSTORE__SAGA__RUNNER_ID", &id)
            .env(
                "PETSTORE__SAGA__LEASE_TIMEOUT_MS",
                LEASE_TIMEOUT.as_millis().to_string(),
            )
            .env("PETSTORE__PROVIDERS__PAYMENT__URL", providers)
            .env("PETSTORE__PROVIDERS__DELIVERY__URL", providers)
            .env("PETSTORE__PROVIDERS__ALLOW_SIMULATED_FAILURES", "true")
            // Its warnings are what the pause case reads.
            .env("PETSTORE__LOG__FILTER", "warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                anyhow::anyhow!("starting {} serve: {error}", runners.program.display())
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut lines = sink.lock().unwrap_or_else(PoisonError::into_inner);
                if lines.len() == KEPT_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        Ok(Self { id, child, lines })
    }

    fn said(&self, text: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|line| line.contains(text))
    }

    /// Its last `count` log lines.
    fn log(&self, count: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = lines.len().saturating_sub(count);
        lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -{signal} {} failed", self.id);
        Ok(())
    }

    /// Whether it has exited (and how).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it with SIGTERM (handing its partitions over), 30 s at most, then SIGKILL.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.signal("CONT");
        self.signal("TERM")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.exited().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("runner {} did not stop within 30 s of SIGTERM", self.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The case's runners and what watches them.
struct Case<'a> {
    store: &'a EventStore,
    leases: Leases,
    partitions: Partitions,
    report: CaseReport,
}

impl Case<'_> {
    /// How many live partitions each runner holds, by the database's clock.
    async fn owners(&self) -> anyhow::Result<HashMap<String, usize>> {
        let mut owners = HashMap::new();
        for state in self.leases.states().await? {
            if let (false, Some(owner)) = (state.free, state.owner) {
                *owners.entry(owner).or_insert(0) += 1;
            }
        }
        Ok(owners)
    }

    /// Waits (until `deadline`) for `accept` to say yes to the owners; false when it never did.
    async fn wait_for_owners(
        &self,
        deadline: Instant,
        accept: impl Fn(&HashMap<String, usize>) -> bool,
    ) -> anyhow::Result<bool> {
        loop {
            if accept(&self.owners().await?) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn orders(&self, placed: &[OrderId]) -> anyhow::Result<Vec<Order>> {
        let mut loaded = Vec::with_capacity(placed.len());
        for order_id in placed {
            loaded.push(self.store.load::<Order>(&order_id.to_string()).await?);
        }
        Ok(loaded)
    }

    /// Waits (until `deadline`) for every order to settle; says which did not.
    async fn settle(&mut self, placed: &[OrderId], deadline: Instant) -> anyhow::Result<bool> {
        loop {
            let loaded = self.orders(placed).await?;
            if loaded.iter().all(Order::is_settled) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                for (order_id, order) in placed.iter().zip(&loaded) {
                    if !order.is_settled() {
                        self.report.problems.push(format!(
                            "order {order_id} did not settle: {}",
                            order.status().map_or("unknown", |status| status.as_str())
                        ));
                    }
                }
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs one ownership case with `orders` orders (every third failing its delivery, so
/// compensated), `timeout` for them to settle; `name` prefixes its pets and runner ids.
pub(super) async fn run(
    blow: Blow,
    store: &EventStore,
    partitions: Partitions,
    runners: &Runners,
    name: &str,
    orders: usize,
    timeout: Duration,
) -> anyhow::Result<CaseReport> {
    let simulator = Simulator::new(Behaviour {
        latency_ms: 60,
        failure_rate: 0.0,
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let providers = format!("http://{}", listener.local_addr()?);
    let router = simulator.router();
    let served = tokio::spawn(async move { axum::serve(listener, router).await });
    let mut case = Case {
        store,
        leases: Leases::new(store.database(), "chaos-observer", LEASE_TIMEOUT),
        partitions,
        report: CaseReport {
            name: blow.name(),
            orders,
            ..CaseReport::default()
        },
    };
    let mut processes = Vec::new();
    for runner in ["a", "b"] {
        processes.push(Process::start(
            runners,
            format!("{name}-{runner}"),
            &providers,
        )?);
    }
    let outcome = strike(blow, &mut case, &mut processes, &simulator, name, timeout).await;
    if !case.report.problems.is_empty() {
        for process in &processes {
            case.report.problems.push(format!(
                "runner {} said (last lines):\n{}",
                process.id,
                process.log(12)
            ));
        }
    }
    for process in processes {
        if let Err(error) = process.stop().await {
            case.report.problems.push(error.to_string());
        }
    }
    served.abort();
    outcome?;
    Ok(case.report)
}

/// Waits for the runners to share the partitions, places the orders, kills or pauses the
/// owner of the first to reach the case's step, waits for every order to settle and checks.
async fn strike(
    blow: Blow,
    case: &mut Case<'_>,
    processes: &mut Vec<Process>,
    simulator: &Simulator,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ids: Vec<String> = processes.iter().map(|process| process.id.clone()).collect();
    let started = Instant::now() + Duration::from_secs(30);
    let shared = case
        .wait_for_owners(started, |owners| {
            ids.iter()
                .all(|id| owners.get(id).is_some_and(|held| *held > 0))
        })
        .await?;
    if !shared {
        let owners = case.owners().await?;
        case.report.problems.push(format!(
            "the runners never shared the partitions within 30 s: {owners:?}"
        ));
        return Ok(());
    }
    let store = case.store;
    let pets = add_pets(store, name, case.report.orders).await?;
    let mut placed = Vec::with_capacity(pets.len());
    for (index, pet) in pets.iter().enumerate() {
        let failure = (index % 3 == 2).then_some(SimulatedFailure::DeliveryService);
        placed.push(place(store, pet, failure).await?);
    }
    let deadline = Instant::now() + timeout;
    let Some(victim) = owner_at(blow.at(), case, &placed, deadline).await? else {
        case.report.problems.push(format!(
            "no order was seen at {} (every order settled first, or the time ran out)",
            blow.at().as_str()
        ));
        return Ok(());
    };
    let Some(index) = processes.iter().position(|process| process.id == victim) else {
        case.report.problems.push(format!(
            "the order's partition is held by {victim}, not by this check's runners: stop \
             the deployment's saga role first"
        ));
        return Ok(());
    };
    match blow {
        Blow::Kill(_) => {
            let mut killed = processes.remove(index);
            let _ = killed.child.kill();
            let _ = killed.child.wait();
            case.report.crashes += 1;
        }
        Blow::Pause(_) => {
            processes[index].signal("STOP")?;
            case.report.pauses += 1;
        }
    }
    let survivor = ids.iter().find(|id| **id != victim).expect("two runners");
    let taken = case
        .wait_for_owners(deadline, |owners| {
            !owners.contains_key(&victim) && owners.contains_key(survivor)
        })
        .await?;
    if !taken {
        case.report.problems.push(format!(
            "{survivor} never took the partitions of {victim}: {:?}",
            case.owners().await?
        ));
        return Ok(());
    }
    let settled = case.settle(&placed, deadline).await?;
    if let (Blow::Pause(_), true) = (blow, settled) {
        woken(case, &processes[index], simulator).await?;
    }
    check(store, &placed, &pets, &mut case.report).await?;
    effects_once(case, &placed, simulator).await
}

/// The owner of the partition of the first order seen at `status`, waiting until
/// `deadline` (or until every order settled).
async fn owner_at(
    status: OrderStatus,
    case: &Case<'_>,
    placed: &[OrderId],
    deadline: Instant,
) -> anyhow::Result<Option<String>> {
    loop {
        let loaded = case.orders(placed).await?;
        if let Some((order_id, _)) = placed
            .iter()
            .zip(&loaded)
            .find(|(_, order)| order.status() == Some(status))
        {
            let partition = case.partitions.of_order(order_id).number();
            let owner = case
                .leases
                .states()
                .await?
                .into_iter()
                .find(|state| state.partition == partition && !state.free)
                .and_then(|state| state.owner);
            if owner.is_some() {
                return Ok(owner);
            }
        }
        if loaded.iter().all(Order::is_settled) || Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What a runner logs when it finds a lease of its gone: at its next renewal, or when the
/// fence refuses one of its writes first.
pub const NOTICED_A_LOST_LEASE: [&str; 2] = [
    "lost the lease on a saga partition",
    "a write was refused by its fence",
];

/// The paused owner, woken after its successor settled every order: it notices its lost
/// leases (within 10 s) and calls no provider from then on for orders it no longer owns.
async fn woken(case: &mut Case<'_>, paused: &Process, simulator: &Simulator) -> anyhow::Result<()> {
    let woken_at = chrono::Utc::now().timestamp_millis();
    paused.signal("CONT")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !NOTICED_A_LOST_LEASE.iter().any(|text| paused.said(text)) {
        if Instant::now() >= deadline {
            case.report.problems.push(format!(
                "{} never said it lost its leases within 10 s of waking",
                paused.id
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caller = format!("petstore ({})", paused.id);
    let late: Vec<String> = simulator
        .calls()
        .into_iter()
        .filter(|call| call.caller == caller && call.at_ms >= woken_at)
        .map(|call| format!("{} {}", call.operation, call.idempotency_key))
        .collect();
    if !late.is_empty() {
        case.report.problems.push(format!(
            "{} called the providers after waking, its orders settled by its successor: {}",
            paused.id,
            late.join(", ")
        ));
    }
    Ok(())
}

/// Each effect the events record was made once by the providers, and asked for under one
/// key: as many keys answered with success per operation as effects made.
async fn effects_once(
    case: &mut Case<'_>,
    placed: &[OrderId],
    simulator: &Simulator,
) -> anyhow::Result<()> {
    let (mut booked, mut called_off) = (0, 0);
    for order_id in placed {
        for event in super::events(case.store, Delivery::TYPE, &order_id.to_string()).await? {
            match event.event_type.as_str() {
                "DeliveryScheduled" => booked += 1,
                "DeliveryCancelled" => called_off += 1,
                _ => {}
            }
        }
    }
    let effects = simulator.effects();
    let report = &mut case.report;
    for (effect, made, recorded) in [
        ("charges", effects.charges, report.captured),
        ("refunds", effects.refunds, report.refunded),
        ("deliveries", effects.deliveries, booked),
        ("cancellations", effects.cancellations, called_off),
    ] {
        if made != recorded {
            report.problems.push(format!(
                "the providers made {made} {effect}, the events record {recorded}"
            ));
        }
    }
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for call in simulator.calls() {
        if (200..300).contains(&call.status) {
            keys.entry(call.operation)
                .or_default()
                .insert(call.idempotency_key);
        }
    }
    for (operation, made) in [
        ("charge", effects.charges),
        ("refund", effects.refunds),
        ("delivery", effects.deliveries),
        ("cancel", effects.cancellations),
    ] {
        let asked = keys.get(operation).map_or(0, HashSet::len);
        if asked != made {
            report.problems.push(format!(
                "{operation}: {asked} keys answered with success for {made} effects"
            ));
        }
    }
    Ok(())
}
