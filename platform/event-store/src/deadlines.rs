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

/// Records `deadline` unless one exists for the same order and step.
pub async fn schedule(database: &Database, deadline: &Deadline) -> Result<(), CheckError> {
    const SQL: &str = "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id)
                       VALUES ($1, $2, $3, $4) ON CONFLICT (order_id, step) DO NOTHING";
    static POSTGRES: LazyLock<String> = LazyLock::new(|| {
        leases::fenced(
            concat!(
                "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id)
                 SELECT $1, $2, $3, $4 FROM ",
                lazily_durable!(),
                " WHERE FENCED ON CONFLICT (order_id, step) DO NOTHING"
            ),
            5,
        )
    });
    write(database, (&POSTGRES, SQL), deadline).await
}

/// Records `deadline`, or moves the one for the same order and step to its new time (and
/// arms it again if it fired): a held payment's next look, an extended payment deadline.
pub async fn rearm(database: &Database, deadline: &Deadline) -> Result<(), CheckError> {
    const SQL: &str = "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id)
                       VALUES ($1, $2, $3, $4)
                       ON CONFLICT (order_id, step)
                       DO UPDATE SET due_at_ms = excluded.due_at_ms, fired_at_ms = NULL";
    static POSTGRES: LazyLock<String> = LazyLock::new(|| {
        leases::fenced(
            concat!(
                "INSERT INTO saga_deadlines (order_id, step, due_at_ms, correlation_id)
                 SELECT $1, $2, $3, $4 FROM ",
                lazily_durable!(),
                " WHERE FENCED ON CONFLICT (order_id, step)
                 DO UPDATE SET due_at_ms = excluded.due_at_ms, fired_at_ms = NULL"
            ),
            5,
        )
    });
    write(database, (&POSTGRES, SQL), deadline).await
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

/// Runs a deadline's write (on Postgres, fenced by the work's [`Fence`](leases::Fence), if
/// any), `deadline`'s order, step, time and correlation id bound as `$1` to `$4`.
async fn write(
    database: &Database,
    (postgres, sqlite): (&'static str, &'static str),
    deadline: &Deadline,
) -> Result<(), CheckError> {
    macro_rules! bound {
        ($query:expr) => {
            $query
                .bind(deadline.order_id.to_string())
                .bind(deadline.kind.as_str())
                .bind(deadline.due_at.timestamp_millis())
                .bind(&deadline.correlation_id)
        };
    }
    match database {
        Database::Postgres(pool) => {
            leases::execute_fenced(pool, bound!(sqlx::query_scalar(postgres))).await
        }
        Database::Sqlite(pool) => {
            bound!(sqlx::query(sqlite)).execute(pool).await?;
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
