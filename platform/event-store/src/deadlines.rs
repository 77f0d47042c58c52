//! Durable deadlines of saga steps, in the event store's database (`saga_deadlines`).
//!
//! Scheduling is idempotent per (order, step), so a replayed event schedules nothing new.
//! A deadline is marked fired only after its command ran: a crash in between fires it again,
//! and the command (derived from the deadline) is a no-op the second time.
//!
//! On Postgres these writes commit without waiting for the WAL flush ([`lazily_durable!`](crate::database)):
//! they are derived from events, and the saga checkpoint that covers a deadline's event is
//! written after it, so a database crash that loses one loses that checkpoint too, and the
//! event is handled again. Any event append (always flushed) flushes them first.
//!
//! Work that stages its appends (the owner of a saga partition reacting,
//! [`EventStore::staged`](crate::store::EventStore::staged)) stages its scheduling,
//! re-arming and settling with them ([`Writes`]), through the store's
//! [`schedule_deadline`](crate::store::EventStore::schedule_deadline) and its kin: they are
//! written in the statement (or SQLite transaction) that writes the staged events, all or
//! nothing.

use chrono::{DateTime, TimeZone, Utc};
use petstore_domain::{OrderId, SagaStep};

use std::sync::LazyLock;

use crate::database::{lazily_durable, with_pool, Database};
use crate::leases::{self, CheckError};

/// What a deadline is for: stored as its name in the `step` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineKind {
    /// A saga step's deadline (`reservation`, `payment`, `delivery`): when it falls due
    /// first, the order is cancelled.
    Step(SagaStep),
    /// A waiting payment's next look (`payment_hold`: payments held, or the gateway not
    /// called while its breaker is open).
    PaymentHold,
    /// A delivery waiting for its provider's breaker: its next try (`delivery_retry`).
    DeliveryRetry,
    /// A compensation (refund, delivery cancellation) a provider did not take yet: its next
    /// try (`compensation_retry`).
    CompensationRetry,
}

impl DeadlineKind {
    /// The kind's name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step(step) => step.as_str(),
            Self::PaymentHold => "payment_hold",
            Self::DeliveryRetry => "delivery_retry",
            Self::CompensationRetry => "compensation_retry",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "payment_hold" => Some(Self::PaymentHold),
            "delivery_retry" => Some(Self::DeliveryRetry),
            "compensation_retry" => Some(Self::CompensationRetry),
            step => SagaStep::parse(step).ok().map(Self::Step),
        }
    }
}

impl std::fmt::Display for DeadlineKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One deadline of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    /// The order.
    pub order_id: OrderId,
    /// What it is for.
    pub kind: DeadlineKind,
    /// When it is due.
    pub due_at: DateTime<Utc>,
    /// The order's correlation id, carried by the command the deadline fires.
    pub correlation_id: String,
}

/// How a deadline's write treats the order's deadline of the same kind, if one is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Leaves it as it is ([`schedule`]).
    Schedule,
    /// Moves it to the new time and arms it again ([`rearm`]).
    Rearm,
}

impl Write {
    /// The statement on SQLite, `$1` to `$4` the deadline's order, kind, time and
    /// correlation id.
    fn sqlite(self) -> &'static str {
        static SQLITE: LazyLock<[String; 2]> = LazyLock::new(|| {
            [Write::Schedule, Write::Rearm].map(|write| {
                format!(
                    "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id, armed_at_ms)
                     VALUES ($1, $2, $3, $4, {}) {}",
                    leases::NOW_MS[1],
                    write.on_conflict()
                )
            })
        });
        &SQLITE[usize::from(self == Self::Rearm)]
    }

    /// What the write does on a recorded deadline (the same on both engines).
    fn on_conflict(self) -> &'static str {
        match self {
            Self::Schedule => "ON CONFLICT (order_id, step) DO NOTHING",
            Self::Rearm => {
                "ON CONFLICT (order_id, step)
                 DO UPDATE SET due_at_ms = excluded.due_at_ms, fired_at_ms = NULL,
                               armed_at_ms = excluded.armed_at_ms,
                               times_armed = saga_deadlines.times_armed + 1, settled = false"
            }
        }
    }
}

/// Records `deadline` unless one exists for the same order and step. (Work whose appends
/// are staged stages its deadlines with them: [`EventStore::schedule_deadline`](crate::store::EventStore::schedule_deadline).)
pub async fn schedule(database: &Database, deadline: &Deadline) -> Result<(), CheckError> {
    write(database, deadline, Write::Schedule).await
}

/// Records `deadline`, or moves the one for the same order and step to its new time (and
/// arms it again if it fired): a held payment's next look, an extended payment deadline.
pub async fn rearm(database: &Database, deadline: &Deadline) -> Result<(), CheckError> {
    write(database, deadline, Write::Rearm).await
}

/// Writes `deadline` (on Postgres, fenced by the work's [`Fence`](leases::Fence), if any).
async fn write(database: &Database, deadline: &Deadline, write: Write) -> Result<(), CheckError> {
    static POSTGRES: LazyLock<[String; 2]> = LazyLock::new(|| {
        [Write::Schedule, Write::Rearm].map(|write| {
            leases::fenced(
                &format!(
                    "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id, armed_at_ms)
                     SELECT $1, $2, $3, $4, {} FROM {} WHERE FENCED {}",
                    leases::NOW_MS[0],
                    lazily_durable!(),
                    write.on_conflict()
                ),
                5,
            )
        })
    });
    match database {
        Database::Postgres(pool) => {
            let statement = &POSTGRES[usize::from(write == Write::Rearm)];
            let query = sqlx::query_scalar(statement)
                .bind(deadline.order_id.to_string())
                .bind(deadline.kind.as_str())
                .bind(deadline.due_at.timestamp_millis())
                .bind(&deadline.correlation_id);
            leases::execute_fenced(pool, query).await
        }
        Database::Sqlite(pool) => {
            let mut writes = Writes::default();
            writes.add(deadline, write);
            writes.write_sqlite(&mut *pool.acquire().await?).await?;
            Ok(())
        }
    }
}

/// Marks every armed deadline of `order_id` fired: its saga ended, and none has anything
/// left to do.
pub async fn settle(database: &Database, order_id: &OrderId) -> Result<(), CheckError> {
    let mut writes = Writes::default();
    writes.settle(*order_id);
    match database {
        Database::Postgres(pool) => {
            static POSTGRES: LazyLock<String> = LazyLock::new(|| {
                leases::fenced(&settling(1, concat!("FROM ", lazily_durable!())), 3)
            });
            let query = writes.bind_settled(sqlx::query_scalar(&POSTGRES));
            leases::execute_fenced(pool, query).await
        }
        Database::Sqlite(pool) => {
            writes.write_sqlite(&mut *pool.acquire().await?).await?;
            Ok(())
        }
    }
}

/// The fenced statement settling the deadlines of the orders bound at `$first + 1` (an
/// array), marked fired at `$first` (those fired already keep their time), `from` the tables
/// named. Found by the primary key alone: a condition on `fired_at_ms IS NULL` would let the
/// planner pick the pending deadlines' index instead, and read every pending deadline (and
/// every one settled since the last vacuum) to settle one order's.
fn settling(first: usize, from: &str) -> String {
    format!(
        "UPDATE saga_deadlines SET settled = settled OR fired_at_ms IS NULL,
                                   fired_at_ms = coalesce(fired_at_ms, ${first}) {from}
          WHERE order_id = ANY(${}::text[]) AND FENCED",
        first + 1
    )
}

/// Deadline writes staged to be written with staged events, in the same statement or
/// transaction: each as the writes in turn would leave the order's deadline of its kind, and
/// the orders whose deadlines are settled.
#[derive(Debug, Clone, Default)]
pub(crate) struct Writes {
    writes: Vec<(Deadline, Write)>,
    settled: Vec<OrderId>,
}

impl Writes {
    /// Whether there is nothing to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.settled.is_empty()
    }

    /// How many writes there are.
    pub(crate) fn len(&self) -> usize {
        self.writes.len() + self.settled.len()
    }

    /// Adds `write` of `deadline`. A schedule leaves the order's deadline of that kind as
    /// staged before it; a re-arm moves it.
    pub(crate) fn add(&mut self, deadline: &Deadline, write: Write) {
        let staged = self.writes.iter_mut().find(|(staged, _)| {
            staged.order_id == deadline.order_id && staged.kind == deadline.kind
        });
        match (staged, write) {
            (Some(_), Write::Schedule) => {}
            (Some(staged), Write::Rearm) => *staged = (deadline.clone(), Write::Rearm),
            (None, write) => self.writes.push((deadline.clone(), write)),
        }
    }

    /// Settles every deadline of `order_id`: those staged before are dropped unwritten.
    pub(crate) fn settle(&mut self, order_id: OrderId) {
        self.writes
            .retain(|(staged, _)| staged.order_id != order_id);
        if !self.settled.contains(&order_id) {
            self.settled.push(order_id);
        }
    }

    /// The writes, as the common table expressions of a [`leases::fenced_writes`] statement
    /// (scheduling, re-arming, settling) binding their arrays at `$first` to `$first + 6`
    /// ([`Self::bind`]).
    pub(crate) fn statements(first: usize) -> [String; 3] {
        let arrays = format!(
            "UNNEST(${first}::text[], ${}::text[], ${}::bigint[], ${}::text[], ${}::boolean[])
                AS d(order_id, step, due_at_ms, correlation_id, rearm)",
            first + 1,
            first + 2,
            first + 3,
            first + 4
        );
        let [schedule, rearm] = [Write::Schedule, Write::Rearm].map(|write| {
            format!(
                "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id, armed_at_ms)
                 SELECT order_id, step, due_at_ms, correlation_id, {} FROM {arrays}
                  WHERE rearm = {} AND FENCED {}",
                leases::NOW_MS[0],
                write == Write::Rearm,
                write.on_conflict()
            )
        });
        [schedule, rearm, settling(first + 5, "")]
    }

    /// Binds the arrays to `query`, in the order of [`Self::statements`].
    pub(crate) fn bind<'q, O>(
        &self,
        query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let count = self.writes.len();
        let (mut orders, mut kinds, mut due_at_ms, mut correlation_ids, mut rearms) = (
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
            Vec::with_capacity(count),
        );
        for (deadline, write) in &self.writes {
            orders.push(deadline.order_id.to_string());
            kinds.push(deadline.kind.as_str());
            due_at_ms.push(deadline.due_at.timestamp_millis());
            correlation_ids.push(deadline.correlation_id.clone());
            rearms.push(*write == Write::Rearm);
        }
        let query = query
            .bind(orders)
            .bind(kinds)
            .bind(due_at_ms)
            .bind(correlation_ids)
            .bind(rearms);
        self.bind_settled(query)
    }

    /// Binds the settling's time and orders.
    fn bind_settled<'q, O>(
        &self,
        query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let settled: Vec<String> = self.settled.iter().map(ToString::to_string).collect();
        query.bind(Utc::now().timestamp_millis()).bind(settled)
    }

    /// Writes them on SQLite, on `connection` (in the caller's transaction, if any).
    pub(crate) async fn write_sqlite(
        &self,
        connection: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        for (deadline, write) in &self.writes {
            sqlx::query(write.sqlite())
                .bind(deadline.order_id.to_string())
                .bind(deadline.kind.as_str())
                .bind(deadline.due_at.timestamp_millis())
                .bind(&deadline.correlation_id)
                .execute(&mut *connection)
                .await?;
        }
        let now = Utc::now().timestamp_millis();
        for order_id in &self.settled {
            sqlx::query(
                "UPDATE saga_deadlines SET settled = settled OR fired_at_ms IS NULL,
                                           fired_at_ms = coalesce(fired_at_ms, $1)
                  WHERE order_id = $2",
            )
            .bind(now)
            .bind(order_id.to_string())
            .execute(&mut *connection)
            .await?;
        }
        Ok(())
    }
}

/// Marks `deadline` fired if it is still due at the time it had when read (one re-armed
/// since stays armed).
pub async fn mark_fired_at(database: &Database, deadline: &Deadline) -> Result<(), CheckError> {
    const SQL: &str = "UPDATE saga_deadlines SET fired_at_ms = $4
                        WHERE order_id = $1 AND step = $2 AND due_at_ms = $3 AND fired_at_ms IS NULL";
    static POSTGRES: LazyLock<String> = LazyLock::new(|| {
        leases::fenced(
            concat!(
                "UPDATE saga_deadlines SET fired_at_ms = $4 FROM ",
                lazily_durable!(),
                " WHERE order_id = $1 AND step = $2 AND due_at_ms = $3
                    AND fired_at_ms IS NULL AND FENCED"
            ),
            5,
        )
    });
    let now = Utc::now().timestamp_millis();
    macro_rules! bound {
        ($query:expr) => {
            $query
                .bind(deadline.order_id.to_string())
                .bind(deadline.kind.as_str())
                .bind(deadline.due_at.timestamp_millis())
                .bind(now)
        };
    }
    match database {
        Database::Postgres(pool) => {
            leases::execute_fenced(pool, bound!(sqlx::query_scalar(&POSTGRES))).await
        }
        Database::Sqlite(pool) => {
            bound!(sqlx::query(SQL)).execute(pool).await?;
            Ok(())
        }
    }
}

/// Up to `limit` unfired deadlines due at or before `now`, earliest first. A row that names
/// no order or no kind (written by hand, or by a release that knew other kinds) is logged
/// and marked fired, so it cannot hold up the others.
pub async fn due(
    database: &Database,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Deadline>, CheckError> {
    const SQL: &str = "SELECT order_id, step, due_at_ms, correlation_id FROM saga_deadlines
                        WHERE fired_at_ms IS NULL AND due_at_ms <= $1
                        ORDER BY due_at_ms LIMIT $2";
    let rows: Vec<(String, String, i64, String)> = with_pool!(database, |pool| {
        sqlx::query_as(SQL)
            .bind(now.timestamp_millis())
            .bind(limit)
            .fetch_all(pool)
            .await
    })?;
    let mut deadlines = Vec::with_capacity(rows.len());
    for (order_id, step, due_at_ms, correlation_id) in rows {
        let (Ok(order), Some(kind)) = (OrderId::parse(&order_id), DeadlineKind::parse(&step))
        else {
            tracing::error!(order_id, step, "malformed deadline; marking it fired");
            mark_row_fired(database, &order_id, &step).await?;
            continue;
        };
        deadlines.push(Deadline {
            order_id: order,
            kind,
            due_at: Utc
                .timestamp_millis_opt(due_at_ms)
                .single()
                .unwrap_or_else(Utc::now),
            correlation_id,
        });
    }
    Ok(deadlines)
}

/// The orders with a deadline still armed that fell due before `before` (at most `limit`,
/// the most overdue first).
pub async fn overdue_orders(
    database: &Database,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<OrderId>, sqlx::Error> {
    const SQL: &str = "SELECT order_id FROM saga_deadlines
                        WHERE fired_at_ms IS NULL AND due_at_ms < $1
                        GROUP BY order_id ORDER BY min(due_at_ms) LIMIT $2";
    let rows: Vec<String> = with_pool!(database, |pool| {
        sqlx::query_scalar(SQL)
            .bind(before.timestamp_millis())
            .bind(limit)
            .fetch_all(pool)
            .await
    })?;
    Ok(rows
        .iter()
        .filter_map(|id| OrderId::parse(id).ok())
        .collect())
}

/// When the earliest unfired deadline is due, if any.
pub async fn next_due(database: &Database) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    const SQL: &str = "SELECT min(due_at_ms) FROM saga_deadlines WHERE fired_at_ms IS NULL";
    let millis: Option<i64> = with_pool!(database, |pool| sqlx::query_scalar(SQL)
        .fetch_one(pool)
        .await)?;
    Ok(millis.and_then(|millis| Utc.timestamp_millis_opt(millis).single()))
}

/// Marks the order's deadline of `kind` fired so it is not fired again.
pub async fn mark_fired(
    database: &Database,
    order_id: &OrderId,
    kind: DeadlineKind,
) -> Result<(), CheckError> {
    mark_row_fired(database, &order_id.to_string(), kind.as_str()).await
}

/// Marks the row of (`order_id`, `step`) fired, as stored.
async fn mark_row_fired(database: &Database, order_id: &str, step: &str) -> Result<(), CheckError> {
    const SQL: &str = "UPDATE saga_deadlines SET fired_at_ms = $3
                        WHERE order_id = $1 AND step = $2 AND fired_at_ms IS NULL";
    static POSTGRES: LazyLock<String> = LazyLock::new(|| {
        leases::fenced(
            concat!(
                "UPDATE saga_deadlines SET fired_at_ms = $3 FROM ",
                lazily_durable!(),
                " WHERE order_id = $1 AND step = $2 AND fired_at_ms IS NULL AND FENCED"
            ),
            4,
        )
    });
    let now = Utc::now().timestamp_millis();
    match database {
        Database::Postgres(pool) => {
            let query = sqlx::query_scalar(&POSTGRES)
                .bind(order_id)
                .bind(step)
                .bind(now);
            leases::execute_fenced(pool, query).await
        }
        Database::Sqlite(pool) => {
            sqlx::query(SQL)
                .bind(order_id)
                .bind(step)
                .bind(now)
                .execute(pool)
                .await?;
            Ok(())
        }
    }
}

/// How many deadlines are unfired, and how many of those are already due at `now` (a
/// backlog that should stay near zero).
pub async fn backlog(database: &Database, now: DateTime<Utc>) -> Result<(i64, i64), sqlx::Error> {
    const SQL: &str =
        "SELECT count(*), coalesce(sum(CASE WHEN due_at_ms <= $1 THEN 1 ELSE 0 END), 0)
                         FROM saga_deadlines WHERE fired_at_ms IS NULL";
    with_pool!(database, |pool| {
        sqlx::query_as(SQL)
            .bind(now.timestamp_millis())
            .fetch_one(pool)
            .await
    })
}

/// One of an order's deadlines as recorded, armed or not: what the order timeline and
/// `petstore explain` show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineRecord {
    /// What it is for.
    pub kind: DeadlineKind,
    /// When it is (or was) due.
    pub due_at: DateTime<Utc>,
    /// When it was last armed (scheduled, or moved by a re-arm); `None` on rows written
    /// before arming times were recorded.
    pub armed_at: Option<DateTime<Utc>>,
    /// How often it was armed: 1 when scheduled once, one more per re-arm.
    pub times_armed: u32,
    /// Whether and how it stopped being armed.
    pub ended: Option<DeadlineEnd>,
}

/// How a deadline stopped being armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineEnd {
    /// It fell due and the deadline loop fired it, at this time.
    Fired(DateTime<Utc>),
    /// Its saga ended before it fell due and settled it, at this time.
    Settled(DateTime<Utc>),
}

/// Every deadline recorded for `order_id`, earliest due first. A row naming a kind this
/// release does not know is left out (logged).
pub async fn of_order(
    database: &Database,
    order_id: &OrderId,
) -> Result<Vec<DeadlineRecord>, sqlx::Error> {
    const SQL: &str = "SELECT step, due_at_ms, armed_at_ms, times_armed, fired_at_ms, settled
           FROM saga_deadlines WHERE order_id = $1 ORDER BY due_at_ms, step";
    type Row = (String, i64, Option<i64>, i32, Option<i64>, bool);
    let rows: Vec<Row> = with_pool!(database, |pool| {
        sqlx::query_as(SQL)
            .bind(order_id.to_string())
            .fetch_all(pool)
            .await
    })?;
    let at = |millis: i64| Utc.timestamp_millis_opt(millis).single();
    Ok(rows
        .into_iter()
        .filter_map(
            |(step, due_at_ms, armed_at_ms, times_armed, fired_at_ms, settled)| {
                let Some(kind) = DeadlineKind::parse(&step) else {
                    tracing::warn!(%order_id, step, "a deadline of an unknown kind; not shown");
                    return None;
                };
                let ended = fired_at_ms.and_then(at).map(|time| {
                    if settled {
                        DeadlineEnd::Settled(time)
                    } else {
                        DeadlineEnd::Fired(time)
                    }
                });
                Some(DeadlineRecord {
                    kind,
                    due_at: at(due_at_ms)?,
                    armed_at: armed_at_ms.and_then(at),
                    times_armed: u32::try_from(times_armed).unwrap_or(1),
                    ended,
                })
            },
        )
        .collect())
}
