//! Dead letters: events a consumer could not decode or apply, set aside in the event store's
//! database (`dead_letters`) with the error, so that the consumer's stream moves on.
//!
//! A dead letter is `pending` until someone acts: `retrying` asks the consumer to handle the
//! event again (it becomes `resolved`, or `pending` again with the new error), `skipped`
//! discards it. One row per consumer and event: setting the same event aside again updates the
//! row (and counts the attempt).

use petstore_telemetry::health::{ComponentHealth, HealthCheck};
use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::Utc;
use petstore_domain::OrderId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::database::{with_pool, Database};
use crate::leases::{self, CheckError, Fence};
use crate::stream::{RecordedEvent, StreamPosition};

/// Where a dead letter stands: stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStatus {
    /// Not handled yet.
    Pending,
    /// To be handled again by its consumer.
    Retrying,
    /// Handled after a retry.
    Resolved,
    /// Discarded.
    Skipped,
}

impl DeadLetterStatus {
    /// Every status, in its life's order.
    pub const ALL: [Self; 4] = [Self::Pending, Self::Retrying, Self::Resolved, Self::Skipped];

    /// The status's name, as stored and as the API and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Retrying => "retrying",
            Self::Resolved => "resolved",
            Self::Skipped => "skipped",
        }
    }

    /// The status named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == name)
    }

    /// Whether nothing is left to do for the letter (resolved or skipped).
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Resolved | Self::Skipped)
    }
}

impl std::fmt::Display for DeadLetterStatus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One event set aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    /// Its id (`petstore dead-letters retry ID`).
    pub id: i64,
    /// Who could not handle it: `saga`.
    pub consumer: String,
    /// The event's id.
    #[schema(value_type = String, format = Uuid)]
    pub event_id: Uuid,
    /// Where it stands in the stream.
    #[schema(value_type = Object)]
    pub position: StreamPosition,
    /// Its aggregate type.
    pub aggregate_type: String,
    /// Its aggregate.
    pub aggregate_id: String,
    /// Its number in the aggregate.
    pub sequence: i64,
    /// Its type.
    pub event_type: String,
    /// Its version.
    pub event_version: String,
    /// The order it concerns, when known.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub order_id: Option<OrderId>,
    /// The last error.
    pub error: String,
    /// How often it failed.
    pub attempts: i64,
    /// `pending`, `retrying`, `resolved` or `skipped`.
    pub status: DeadLetterStatus,
    /// When it was last set aside (ms since the epoch).
    pub failed_at_ms: i64,
    /// When it was resolved or skipped.
    pub resolved_at_ms: Option<i64>,
}

type Row = (
    i64,
    String,
    String,
    i64,
    i64,
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    String,
    i64,
    String,
    i64,
    Option<i64>,
);

const COLUMNS: &str = "id, consumer, event_id, transaction_id, global_position, aggregate_type,
    aggregate_id, sequence, event_type, event_version, order_id, error, attempts, status,
    failed_at_ms, resolved_at_ms";

fn from_row(row: Row) -> Result<DeadLetter, sqlx::Error> {
    let (
        id,
        consumer,
        event_id,
        transaction_id,
        global_position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        order_id,
        error,
        attempts,
        status,
        failed_at_ms,
        resolved_at_ms,
    ) = row;
    let malformed =
        |what: String| sqlx::Error::Decode(format!("dead letter {id} has {what}").into());
    let status = DeadLetterStatus::parse(&status)
        .ok_or_else(|| malformed(format!("no known status: {status:?}")))?;
    let event_id = Uuid::try_parse(&event_id)
        .map_err(|_| malformed(format!("a malformed event id: {event_id:?}")))?;
    let order_id = order_id
        .map(|order_id| {
            OrderId::parse(&order_id)
                .map_err(|_| malformed(format!("a malformed order id: {order_id:?}")))
        })
        .transpose()?;
    Ok(DeadLetter {
        id,
        consumer,
        event_id,
        position: StreamPosition {
            transaction_id,
            global_position,
        },
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        order_id,
        error,
        attempts,
        status,
        failed_at_ms,
        resolved_at_ms,
    })
}

/// Runs a query returning rows on either engine ([`with_pool!`] with its binds in a row).
macro_rules! fetch {
    ($database:expr, $sql:expr, $method:ident $(, $bind:expr)*) => {
        with_pool!($database, |pool| sqlx::query_as($sql)$(.bind($bind))*.$method(pool).await)
    };
}

/// `query` ([`RECORD`] or a statement made of it) with a dead letter's columns bound as `$1`
/// to `$12`.
macro_rules! letter {
    ($query:expr, $consumer:expr, $event:expr, $order_id:expr, $error:expr) => {
        $query
            .bind($consumer)
            .bind($event.event_id().to_string())
            .bind($event.position.transaction_id)
            .bind($event.position.global_position)
            .bind(&$event.aggregate_type)
            .bind(&$event.aggregate_id)
            .bind($event.sequence)
            .bind(&$event.event_type)
            .bind(&$event.event_version)
            .bind($order_id.map(OrderId::to_string))
            .bind($error)
            .bind(Utc::now().timestamp_millis())
    };
}

/// Sets `event` aside for `consumer` with `error`; answers its id. The same event set aside
/// again is the same dead letter, `pending` again, one attempt more.
pub async fn record(
    database: &Database,
    consumer: &str,
    event: &RecordedEvent,
    order_id: Option<&OrderId>,
    error: &str,
) -> Result<i64, sqlx::Error> {
    let (id,): (i64,) = with_pool!(database, |pool| {
        letter!(sqlx::query_as(RECORD), consumer, event, order_id, error)
            .fetch_one(pool)
            .await
    })?;
    Ok(id)
}

/// [`record`] for work under a saga partition's lease ([`Fence::current`]): on Postgres the
/// letter is written only while the lease holds, checked in the same statement
/// ([`CheckError::Lost`] when it does not: the partition's new owner handles the event).
pub async fn record_fenced(
    database: &Database,
    consumer: &str,
    event: &RecordedEvent,
    order_id: Option<&OrderId>,
    error: &str,
) -> Result<i64, CheckError> {
    let (Database::Postgres(pool), Some(fence)) = (database, Fence::current()) else {
        return Ok(record(database, consumer, event, order_id, error).await?);
    };
    static FENCED: LazyLock<String> = LazyLock::new(|| {
        leases::fenced_with(
            &RECORD.replace(
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 WHERE FENCED",
            ),
            13,
            Some("(SELECT id FROM written)"),
        )
    });
    let (partition, owner, epoch) = Fence::binds(Some(&fence));
    let (held, id): (bool, Option<i64>) =
        letter!(sqlx::query_as(&FENCED), consumer, event, order_id, error)
            .bind(partition)
            .bind(owner)
            .bind(epoch)
            .fetch_one(pool)
            .await?;
    match (held, id) {
        (true, Some(id)) => Ok(id),
        _ => Err(CheckError::Lost(fence.lost())),
    }
}

const RECORD: &str = "INSERT INTO dead_letters (consumer, event_id, transaction_id,
    global_position, aggregate_type, aggregate_id, sequence, event_type, event_version,
    order_id, error, failed_at_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (consumer, event_id) DO UPDATE
       SET error = excluded.error, attempts = dead_letters.attempts + 1,
           status = 'pending', failed_at_ms = excluded.failed_at_ms, resolved_at_ms = NULL
    RETURNING id";

/// [`record`] on a Postgres connection, inside the transaction of the write that skipped the
/// event: both commit together.
pub async fn record_in(
    connection: &mut sqlx::PgConnection,
    consumer: &str,
    event: &RecordedEvent,
    order_id: Option<&OrderId>,
    error: &str,
) -> Result<i64, sqlx::Error> {
    let (id,): (i64,) = letter!(sqlx::query_as(RECORD), consumer, event, order_id, error)
        .fetch_one(connection)
        .await?;
    Ok(id)
}

/// The dead letters, newest first: all, or those with `status`.
pub async fn list(
    database: &Database,
    status: Option<DeadLetterStatus>,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let status = status.map(DeadLetterStatus::as_str);
    let sql = format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE ($1 IS NULL OR status = $1)
          ORDER BY id DESC LIMIT $2"
    );
    let rows: Vec<Row> = fetch!(database, &sql, fetch_all, status, limit)?;
    rows.into_iter().map(from_row).collect()
}

/// One dead letter.
pub async fn get(database: &Database, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1");
    let row: Option<Row> = fetch!(database, &sql, fetch_optional, id)?;
    row.map(from_row).transpose()
}

/// Moves dead letter `id` to `status` if it is in one of `from`; answers whether it moved.
pub async fn transition(
    database: &Database,
    id: i64,
    from: &[DeadLetterStatus],
    status: DeadLetterStatus,
) -> Result<bool, sqlx::Error> {
    let resolved_at = status.is_settled().then(|| Utc::now().timestamp_millis());
    let sql = "UPDATE dead_letters SET status = $2, resolved_at_ms = $3
                WHERE id = $1 AND status IN ($4, $5, $6) RETURNING id";
    let slot = |index: usize| from.get(index).map_or("", |status| status.as_str());
    let moved: Option<(i64,)> = fetch!(
        database,
        sql,
        fetch_optional,
        id,
        status.as_str(),
        resolved_at,
        slot(0),
        slot(1),
        slot(2)
    )?;
    Ok(moved.is_some())
}

/// A retried dead letter failed again: `pending`, with the new error, one attempt more.
pub async fn fail_again(database: &Database, id: i64, error: &str) -> Result<(), sqlx::Error> {
    let sql = "UPDATE dead_letters SET status = 'pending', error = $2, attempts = attempts + 1,
                      failed_at_ms = $3 WHERE id = $1";
    with_pool!(database, |pool| {
        sqlx::query(sql)
            .bind(id)
            .bind(error)
            .bind(Utc::now().timestamp_millis())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
    })?;
    Ok(())
}

/// The dead letters of `consumer` waiting to be handled again, oldest first.
pub async fn retrying(database: &Database, consumer: &str) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE consumer = $1 AND status = 'retrying'
          ORDER BY id LIMIT 100"
    );
    let rows: Vec<Row> = fetch!(database, &sql, fetch_all, consumer)?;
    rows.into_iter().map(from_row).collect()
}

/// How many dead letters wait for someone (`pending` or `retrying`), by consumer.
pub async fn open_counts(database: &Database) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let sql = "SELECT consumer, count(*) FROM dead_letters
                WHERE status IN ('pending', 'retrying') GROUP BY consumer";
    let rows: Vec<(String, i64)> = fetch!(database, sql, fetch_all)?;
    Ok(rows.into_iter().collect())
}

/// The orders with an open dead letter (at most `limit`, the oldest letter first).
pub async fn open_orders(database: &Database, limit: i64) -> Result<Vec<OrderId>, sqlx::Error> {
    let sql = "SELECT order_id FROM dead_letters
                WHERE order_id IS NOT NULL AND status IN ('pending', 'retrying')
                GROUP BY order_id ORDER BY min(id) LIMIT $1";
    let rows: Vec<(String,)> = fetch!(database, sql, fetch_all, limit)?;
    Ok(rows
        .iter()
        .filter_map(|(id,)| OrderId::parse(id).ok())
        .collect())
}

/// The open dead letters of an order.
pub async fn open_for_order(
    database: &Database,
    order_id: &OrderId,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {COLUMNS} FROM dead_letters
              WHERE order_id = $1 AND status IN ('pending', 'retrying') ORDER BY id"
        )
    });
    let rows: Vec<Row> = fetch!(database, &*SQL, fetch_all, order_id.to_string())?;
    rows.into_iter().map(from_row).collect()
}

/// Every dead letter of an order, open or settled, oldest first.
pub async fn of_order(
    database: &Database,
    order_id: &OrderId,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {COLUMNS} FROM dead_letters WHERE order_id = $1 ORDER BY id")
    });
    let rows: Vec<Row> = fetch!(database, &*SQL, fetch_all, order_id.to_string())?;
    rows.into_iter().map(from_row).collect()
}

/// Whether any dead letter is open, asked of the database at most once per
/// [`OPEN_CHECK_INTERVAL`]: the status route looks an order's dead letters up only then.
#[derive(Clone, Default)]
pub struct OpenGate {
    last: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, bool)>>>,
}

/// How long [`OpenGate`] trusts its last answer.
pub const OPEN_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl OpenGate {
    /// Whether some dead letter is `pending` or `retrying` (as of at most a second ago).
    pub async fn any_open(&self, database: &Database) -> Result<bool, sqlx::Error> {
        let cached = *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, open)) = cached {
            if at.elapsed() < OPEN_CHECK_INTERVAL {
                return Ok(open);
            }
        }
        let sql = "SELECT count(*) FROM (SELECT 1 FROM dead_letters
                    WHERE status IN ('pending', 'retrying') LIMIT 1) AS open";
        let (count,): (i64,) = fetch!(database, sql, fetch_one)?;
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), count > 0));
        Ok(count > 0)
    }
}

/// Dead letters waiting for someone: the service is `degraded` while there are any.
pub struct DeadLetterHealth(pub Database);

impl HealthCheck for DeadLetterHealth {
    fn name(&self) -> String {
        "dead_letters".to_owned()
    }

    fn essential(&self) -> bool {
        false
    }

    fn check(&self) -> futures::future::BoxFuture<'_, ComponentHealth> {
        Box::pin(async {
            match open_counts(&self.0).await {
                Ok(counts) if counts.is_empty() => {
                    ComponentHealth::up(self.0.engine(), Some("none".to_owned()))
                }
                Ok(counts) => {
                    let total: i64 = counts.values().sum();
                    let each: Vec<String> = counts
                        .iter()
                        .map(|(consumer, count)| format!("{consumer} {count}"))
                        .collect();
                    ComponentHealth::down(
                        self.0.engine(),
                        format!(
                            "{total} events set aside ({}): GET /petstore-domain/admin/dead-letters",
                            each.join(", ")
                        ),
                    )
                }
                Err(error) => {
                    ComponentHealth::down(self.0.engine(), format!("cannot count: {error}"))
                }
            }
        })
    }
}

/// Asks for dead letter `id` to be handled again, or discards it (`to`: retrying or
/// skipped); answers it after the change. The error names what is wrong: no such dead
/// letter, or one that is not open.
pub async fn act(
    database: &Database,
    id: i64,
    to: DeadLetterStatus,
) -> Result<DeadLetter, ActError> {
    // The letter as this change left it, in the same statement: a runner may take it up
    // (and resolve it) at once.
    let sql = format!(
        "UPDATE dead_letters SET status = $2, resolved_at_ms = $3
          WHERE id = $1 AND status IN ($4, $5) RETURNING {COLUMNS}"
    );
    let resolved_at = to.is_settled().then(|| Utc::now().timestamp_millis());
    let moved: Option<Row> = fetch!(
        database,
        &sql,
        fetch_optional,
        id,
        to.as_str(),
        resolved_at,
        DeadLetterStatus::Pending.as_str(),
        DeadLetterStatus::Retrying.as_str()
    )?;
    match moved {
        Some(row) => Ok(from_row(row)?),
        None => Err(match get(database, id).await? {
            None => ActError::NotFound(id),
            Some(letter) => ActError::NotOpen(letter.status),
        }),
    }
}

/// Why a dead letter could not be retried or skipped.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// No such dead letter.
    #[error("there is no dead letter {0}")]
    NotFound(i64),
    /// It is resolved or skipped already.
    #[error("the dead letter is {0} already")]
    NotOpen(DeadLetterStatus),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}
