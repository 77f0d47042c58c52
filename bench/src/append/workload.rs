//! What one operation of each workload does: the workloads, the SQL of each engine, the
//! order and the row every operation writes, and [`Appender`], which runs one operation.

use anyhow::ensure;
use cqrs_es::{Aggregate as _, DomainEvent as _};
use petstore_domain::order::{Order, OrderCommand, OrderEvent, OrderRequest};
use petstore_domain::{CustomerId, Money, OrderId, PetId, SpecialInstructions};
use petstore_event_store::database::Database;
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_web::CorrelationId;
use serde_json::Value;
use uuid::Uuid;

/// What one operation does. The first and last are the benchmark; the others, measured with
/// `--breakdown`, add one cost at a time on the way from one to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    /// The benchmark's baseline: one autocommit INSERT into the plain `bench_baseline` table.
    Baseline,
    /// Plain SQL, to isolate one cost of the append path.
    Sql(SqlSteps),
    /// [`EventStore::execute`] of `PlaceOrder` on a fresh order: the path of every command on
    /// an existing aggregate (and of `POST /orders` with an `Idempotency-Key`), which loads
    /// the aggregate before it decides.
    EventStoreLoading,
    /// The benchmark: [`EventStore::execute_on_new`] of `PlaceOrder` on a fresh order.
    EventStore,
}

/// The SQL steps of one operation that is not the event store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SqlSteps {
    /// INSERT into `events` (with its indexes and global-order columns) instead of
    /// `bench_baseline`.
    into_events: bool,
    /// First SELECT the aggregate's events, as loading an aggregate does.
    load_first: bool,
    /// Wrap the INSERT in BEGIN ... COMMIT, as postgres-es and sqlite-es do (the service
    /// appends to Postgres in one statement instead).
    in_transaction: bool,
}

impl SqlSteps {
    const BASELINE: SqlSteps = SqlSteps {
        into_events: false,
        load_first: false,
        in_transaction: false,
    };
}

impl Workload {
    pub(crate) const BREAKDOWN: [Workload; 8] = [
        Self::Baseline,
        Self::sql(false, false, true),
        Self::sql(true, false, false),
        Self::sql(true, false, true),
        Self::sql(true, true, false),
        Self::sql(true, true, true),
        Self::EventStoreLoading,
        Self::EventStore,
    ];

    const fn sql(into_events: bool, load_first: bool, in_transaction: bool) -> Self {
        Self::Sql(SqlSteps {
            into_events,
            load_first,
            in_transaction,
        })
    }

    pub(crate) fn name(self) -> String {
        let steps = match self {
            Self::EventStoreLoading => return "event store: execute(PlaceOrder)".to_owned(),
            Self::EventStore => return "event store: execute_on_new(PlaceOrder)".to_owned(),
            Self::Baseline => SqlSteps::BASELINE,
            Self::Sql(steps) => steps,
        };
        let table = if steps.into_events {
            "events"
        } else {
            "baseline"
        };
        let select = if steps.load_first { "SELECT; " } else { "" };
        let insert = if steps.in_transaction {
            "BEGIN; INSERT; COMMIT"
        } else {
            "INSERT"
        };
        format!("{table}: {select}{insert}")
    }
}

/// The SQL of one engine's workloads.
pub(crate) struct Statements {
    pub(crate) create_baseline: &'static str,
    insert_baseline: &'static str,
    /// As postgres-es / sqlite-es 0.5 write it.
    insert_event: &'static str,
    /// As postgres-es / sqlite-es 0.5 write it.
    select_events: &'static str,
}

pub(crate) const POSTGRES_STATEMENTS: Statements = Statements {
    create_baseline: "CREATE TABLE bench_baseline (id bigserial PRIMARY KEY, aggregate_type text, \
        aggregate_id text, sequence bigint, event_type text, event_version text, payload jsonb, \
        metadata jsonb)",
    insert_baseline: "INSERT INTO bench_baseline (aggregate_type, aggregate_id, sequence, \
        event_type, event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    insert_event: "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
        event_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    select_events: "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
        payload, metadata FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
        ORDER BY sequence",
};

pub(crate) const SQLITE_STATEMENTS: Statements = Statements {
    create_baseline: "CREATE TABLE bench_baseline (id integer PRIMARY KEY AUTOINCREMENT, \
        aggregate_type text, aggregate_id text, sequence integer, event_type text, \
        event_version text, payload text, metadata text) STRICT",
    insert_baseline: "INSERT INTO bench_baseline (aggregate_type, aggregate_id, sequence, \
        event_type, event_version, payload, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
    insert_event: "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
        event_version, payload, metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
    select_events: "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, \
        payload, metadata FROM events WHERE aggregate_type = ? AND aggregate_id = ? \
        ORDER BY sequence",
};

/// The row every SQL workload writes: a real `OrderCreated` event and its metadata,
/// serialized once. Only the aggregate id changes between operations.
pub(crate) struct RowTemplate {
    event_type: String,
    event_version: String,
    payload: Value,
    metadata: Value,
}

/// The order every event-store operation places (with a fresh order id).
pub(crate) struct OrderTemplate {
    customer_id: CustomerId,
    pet_id: PetId,
    amount: Money,
    special_instructions: SpecialInstructions,
}

impl OrderTemplate {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            customer_id: CustomerId::parse("customer-001")?,
            pet_id: PetId::parse("golden-retriever-001")?,
            amount: Money::usd(120_000)?,
            special_instructions: SpecialInstructions::parse("Leave with the neighbour if out")?,
        })
    }

    fn request(&self, order_id: OrderId) -> OrderRequest {
        OrderRequest {
            order_id,
            customer_id: self.customer_id.clone(),
            pet_id: self.pet_id.clone(),
            amount: self.amount,
            special_instructions: Some(self.special_instructions.clone()),
            simulated_failure: None,
            express_processing: None,
        }
    }

    /// Serializes one event and its metadata the way cqrs-es stores them.
    pub(crate) fn row(&self) -> anyhow::Result<RowTemplate> {
        let event = OrderEvent::OrderCreated(self.request(OrderId::random()));
        let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
        Ok(RowTemplate {
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: serde_json::to_value(&event)?,
            metadata: serde_json::to_value(metadata.to_map())?,
        })
    }
}

/// Runs one operation of any workload against one database.
pub(crate) struct Appender {
    pub(crate) database: Database,
    pub(crate) store: EventStore,
    pub(crate) statements: &'static Statements,
    pub(crate) order: OrderTemplate,
    pub(crate) row: RowTemplate,
}

/// One INSERT of the template row under a fresh aggregate id, at sequence 1.
macro_rules! insert_row {
    ($sql:expr, $row:expr, $aggregate_id:expr, $executor:expr) => {
        sqlx::query($sql)
            .bind(Order::TYPE)
            .bind($aggregate_id)
            .bind(1_i64)
            .bind($row.event_type.as_str())
            .bind($row.event_version.as_str())
            .bind(&$row.payload)
            .bind(&$row.metadata)
            .execute($executor)
            .await?
    };
}

/// One operation of `$steps` on `$pool`; the two engines differ in types, not in steps.
macro_rules! run_steps {
    ($pool:expr, $appender:expr, $steps:expr) => {{
        let (pool, appender, steps): (_, &Appender, SqlSteps) = ($pool, $appender, $steps);
        let row = &appender.row;
        // Keyed as the event store's appends are (`OrderId::random`, a UUIDv7).
        let aggregate_id = Uuid::now_v7().to_string();
        let aggregate_id = aggregate_id.as_str();
        if steps.load_first {
            let loaded = sqlx::query(appender.statements.select_events)
                .bind(Order::TYPE)
                .bind(aggregate_id)
                .fetch_all(pool)
                .await?;
            ensure!(loaded.is_empty(), "a fresh aggregate already has events");
        }
        let insert = if steps.into_events {
            appender.statements.insert_event
        } else {
            appender.statements.insert_baseline
        };
        let inserted = if steps.in_transaction {
            // The baseline's own transaction, as a plain client would open it (never
            // cancelled: the bench awaits every operation).
            #[allow(clippy::disallowed_methods)]
            let mut transaction = pool.begin().await?;
            let inserted = insert_row!(insert, row, aggregate_id, &mut *transaction);
            transaction.commit().await?;
            inserted
        } else {
            insert_row!(insert, row, aggregate_id, pool)
        };
        ensure!(
            inserted.rows_affected() == 1,
            "an insert wrote {} rows",
            inserted.rows_affected()
        );
        Ok(())
    }};
}

impl Appender {
    pub(crate) async fn append(&self, workload: Workload) -> anyhow::Result<()> {
        let steps = match workload {
            Workload::EventStore => return self.place_new_order(false).await,
            Workload::EventStoreLoading => return self.place_new_order(true).await,
            Workload::Baseline => SqlSteps::BASELINE,
            Workload::Sql(steps) => steps,
        };
        match &self.database {
            Database::Postgres(pool) => run_steps!(pool, self, steps),
            Database::Sqlite(pool) => run_steps!(pool, self, steps),
        }
    }

    /// The service's own append path for a new order (`POST /orders`):
    /// [`EventStore::execute_on_new`] decides on the empty aggregate and appends one event at
    /// sequence 1 in a single statement; with `load_first`, [`EventStore::execute`] loads the
    /// (empty) aggregate first, as every command on an existing aggregate does. A fresh order
    /// id means no writer ever conflicts with another.
    async fn place_new_order(&self, load_first: bool) -> anyhow::Result<()> {
        let order_id = OrderId::random();
        let aggregate_id = order_id.to_string();
        let command = OrderCommand::PlaceOrder(self.order.request(order_id));
        let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
        let appended = if load_first {
            self.store
                .execute::<Order>(&aggregate_id, command, &(), &metadata)
                .await?
        } else {
            self.store
                .execute_on_new::<Order>(&aggregate_id, command, &(), &metadata)
                .await?
        };
        ensure!(
            appended.len() == 1,
            "placing an order appended {} events",
            appended.len()
        );
        Ok(())
    }
}
