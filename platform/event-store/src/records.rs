//! Records kept to explain orders (the order timeline, `petstore explain`) that are not events:
//! every attempt of a provider call, and every command an aggregate refused. They are
//! diagnostics, written off the saga's and the requests' paths: [`Recorder::record`] queues
//! one without waiting, and [`RecordWriter::run`] writes what is queued in batches (one
//! statement per table and batch, committed without waiting for the WAL flush). A crash
//! loses at most the last batch not yet written ([`FLUSH_EVERY`]); a full queue drops the
//! newest records, counts and logs them ([`Recorder::dropped`]), never blocking a caller. Each table keeps [`prune`]'s retention, with the Kafka coordinates
//! ([`crate::published`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use petstore_domain::OrderId;
use tokio::sync::mpsc;

use crate::database::{with_pool, Database};

/// How often the writer writes what is queued, at most.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The most records queued before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 10_000;

/// The most records one batch writes.
const BATCH: usize = 1_000;

/// Which provider a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The payment gateway.
    Payment,
    /// The delivery provider.
    Delivery,
}

impl Provider {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payment => "payment",
            Self::Delivery => "delivery",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Payment, Self::Delivery]
            .into_iter()
            .find(|provider| provider.as_str() == name)
    }
}

/// What a provider call asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Charge the customer.
    Charge,
    /// Give a charge back.
    Refund,
    /// Book a delivery.
    Book,
    /// Call a booked delivery off.
    Cancel,
}

impl Operation {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Refund => "refund",
            Self::Book => "book",
            Self::Cancel => "cancel",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Charge, Self::Refund, Self::Book, Self::Cancel]
            .into_iter()
            .find(|operation| operation.as_str() == name)
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The provider did it.
    Succeeded,
    /// The provider refused for good (not retried).
    Refused,
    /// The provider failed or was unreachable (retried under the policy).
    Failed,
    /// The attempt took longer than the policy allows and was given up.
    TimedOut,
}

impl AttemptOutcome {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Succeeded, Self::Refused, Self::Failed, Self::TimedOut]
            .into_iter()
            .find(|outcome| outcome.as_str() == name)
    }
}

/// One attempt of a provider call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderAttempt {
    /// The order it was for.
    pub order_id: OrderId,
    /// The order's correlation id.
    pub correlation_id: String,
    /// Which provider.
    pub provider: Provider,
    /// What it asked for.
    pub operation: Operation,
    /// The call's idempotency key (the same for every attempt of one call).
    pub idempotency_key: String,
    /// Which attempt of the call, from 1.
    pub attempt: u32,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The provider's error, when it did not succeed.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration: Duration,
}

/// A command an aggregate refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedCommand {
    /// The correlation id it ran under (an order's, for the saga's commands and payments).
    pub correlation_id: String,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The command's name, e.g. `ProcessPayment`.
    pub command: String,
    /// Who sent it.
    pub subject: Option<String>,
    /// What caused it.
    pub causation_id: Option<String>,
    /// Why it was refused: the domain's error.
    pub reason: String,
    /// When.
    pub refused_at: DateTime<Utc>,
}

/// A record to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An attempt of a provider call.
    Attempt(ProviderAttempt),
    /// A refused command.
    Refusal(RefusedCommand),
}

/// Queues records for the [`RecordWriter`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    sender: mpsc::Sender<Record>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// A recorder and the writer that writes what it queues into `database`.
    pub fn new(database: Database) -> (Self, RecordWriter) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Self {
                sender,
                dropped: Arc::clone(&dropped),
            },
            RecordWriter { receiver, database },
        )
    }

    /// Queues `record` without waiting; drops it (and counts it) when the queue is full or
    /// the writer stopped.
    pub fn record(&self, record: Record) {
        let Err(refused) = self.sender.try_send(record) else {
            return;
        };
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        match refused {
            mpsc::error::TrySendError::Full(_) if dropped.is_power_of_two() => {
                tracing::warn!(dropped, "timeline records dropped: the writer falls behind");
            }
            mpsc::error::TrySendError::Closed(_) => {
                tracing::debug!("a timeline record after the writer stopped (shutting down)");
            }
            mpsc::error::TrySendError::Full(_) => {}
        }
    }

    /// How many records were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes what a [`Recorder`] queues.
pub struct RecordWriter {
    receiver: mpsc::Receiver<Record>,
    database: Database,
}

impl RecordWriter {
    /// Writes queued records in batches until `shutdown` resolves, then writes what is still
    /// queued. A failed batch is logged and dropped (the records are diagnostics; the
    /// database being down is reported by every other part of the service).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                received = self.receiver.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        break;
                    }
                }
            }
            self.write(&mut batch).await;
            tokio::time::sleep(FLUSH_EVERY).await;
        }
        self.receiver.close();
        while self.receiver.recv_many(&mut batch, BATCH).await > 0 {
            self.write(&mut batch).await;
        }
    }

    async fn write(&self, batch: &mut Vec<Record>) {
        if let Err(error) = write(&self.database, batch).await {
            tracing::warn!(%error, records = batch.len(), "timeline records not written");
        }
        batch.clear();
    }
}

/// Writes `records` now: one statement per table on Postgres, one transaction on SQLite.
pub async fn write(database: &Database, records: &[Record]) -> Result<(), sqlx::Error> {
    let attempts: Vec<&ProviderAttempt> = records
        .iter()
        .filter_map(|record| match record {
            Record::Attempt(attempt) => Some(attempt),
            Record::Refusal(_) => None,
        })
        .collect();
    let refusals: Vec<&RefusedCommand> = records
        .iter()
        .filter_map(|record| match record {
            Record::Refusal(refusal) => Some(refusal),
            Record::Attempt(_) => None,
        })
        .collect();
    match database {
        Database::Postgres(pool) => {
            let mut transaction = crate::database::begin(pool).await?;
            crate::database::commit_lazily(&mut transaction).await?;
            if !attempts.is_empty() {
                sqlx::query(
                    "INSERT INTO provider_attempts
                       (order_id, correlation_id, provider, operation, idempotency_key, attempt,
                        outcome, error, started_at_ms, duration_ms)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                          $5::text[], $6::integer[], $7::text[], $8::text[],
                                          $9::bigint[], $10::bigint[])",
                )
                .bind(column(&attempts, |a| a.order_id.to_string()))
                .bind(column(&attempts, |a| a.correlation_id.clone()))
                .bind(column(&attempts, |a| a.provider.as_str()))
                .bind(column(&attempts, |a| a.operation.as_str()))
                .bind(column(&attempts, |a| a.idempotency_key.clone()))
                .bind(column(&attempts, |a| {
                    i32::try_from(a.attempt).unwrap_or(i32::MAX)
                }))
                .bind(column(&attempts, |a| a.outcome.as_str()))
                .bind(column(&attempts, |a| a.error.clone()))
                .bind(column(&attempts, |a| a.started_at.timestamp_millis()))
                .bind(column(&attempts, |a| millis(a.duration)))
                .execute(&mut *transaction)
                .await?;
            }
            if !refusals.is_empty() {
                sqlx::query(
                    "INSERT INTO refused_commands
                       (correlation_id, aggregate_type, aggregate_id, command, subject,
                        causation_id, reason, refused_at_ms)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                          $5::text[], $6::text[], $7::text[], $8::bigint[])",
                )
                .bind(column(&refusals, |r| r.correlation_id.clone()))
                .bind(column(&refusals, |r| r.aggregate_type.clone()))
                .bind(column(&refusals, |r| r.aggregate_id.clone()))
                .bind(column(&refusals, |r| r.command.clone()))
                .bind(column(&refusals, |r| r.subject.clone()))
                .bind(column(&refusals, |r| r.causation_id.clone()))
                .bind(column(&refusals, |r| r.reason.clone()))
                .bind(column(&refusals, |r| r.refused_at.timestamp_millis()))
                .execute(&mut *transaction)
                .await?;
            }
            transaction.commit().await
        }
        Database::Sqlite(pool) => {
            let mut transaction = crate::database::begin(pool).await?;
            for attempt in attempts {
                sqlx::query(
                    "INSERT INTO provider_attempts
                       (order_id, correlation_id, provider, operation, idempotency_key, attempt,
                        outcome, error, started_at_ms, duration_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(attempt.order_id.to_string())
                .bind(&attempt.correlation_id)
                .bind(attempt.provider.as_str())
                .bind(attempt.operation.as_str())
                .bind(&attempt.idempotency_key)
                .bind(i64::from(attempt.attempt))
                .bind(attempt.outcome.as_str())
                .bind(&attempt.error)
                .bind(attempt.started_at.timestamp_millis())
                .bind(millis(attempt.duration))
                .execute(&mut *transaction)
                .await?;
            }
            for refusal in refusals {
                sqlx::query(
                    "INSERT INTO refused_commands
                       (correlation_id, aggregate_type, aggregate_id, command, subject,
                        causation_id, reason, refused_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&refusal.correlation_id)
                .bind(&refusal.aggregate_type)
                .bind(&refusal.aggregate_id)
                .bind(&refusal.command)
                .bind(&refusal.subject)
                .bind(&refusal.causation_id)
                .bind(&refusal.reason)
                .bind(refusal.refused_at.timestamp_millis())
                .execute(&mut *transaction)
                .await?;
            }
            transaction.commit().await
        }
    }
}

/// One column of `rows`, for an `UNNEST`.
fn column<R, T>(rows: &[&R], value: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(|row| value(row)).collect()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn time(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH)
}

/// Every recorded attempt of a provider call for `order_id`, in the order they started.
/// A row naming a provider, operation or outcome this release does not know is left out.
pub async fn attempts_of(
    database: &Database,
    order_id: &OrderId,
) -> Result<Vec<ProviderAttempt>, sqlx::Error> {
    type Row = (
        String,
        String,
        String,
        String,
        i32,
        String,
        Option<String>,
        i64,
        i64,
    );
    const SQL: &str = "SELECT correlation_id, provider, operation, idempotency_key, attempt,
                              outcome, error, started_at_ms, duration_ms
                         FROM provider_attempts WHERE order_id = $1 ORDER BY started_at_ms, id";
    let rows: Vec<Row> = with_pool!(database, |pool| {
        sqlx::query_as(SQL)
            .bind(order_id.to_string())
            .fetch_all(pool)
            .await?
    });
    Ok(rows
        .into_iter()
        .filter_map(
            |(correlation_id, provider, operation, key, attempt, outcome, error, at, took)| {
                Some(ProviderAttempt {
                    order_id: *order_id,
                    correlation_id,
                    provider: Provider::parse(&provider)?,
                    operation: Operation::parse(&operation)?,
                    idempotency_key: key,
                    attempt: u32::try_from(attempt).ok()?,
                    outcome: AttemptOutcome::parse(&outcome)?,
                    error,
                    started_at: time(at),
                    duration: Duration::from_millis(u64::try_from(took).unwrap_or(0)),
                })
            },
        )
        .collect())
}

/// Every command refused under `correlation_id`, in the order they were refused.
pub async fn refusals_of(
    database: &Database,
    correlation_id: &str,
) -> Result<Vec<RefusedCommand>, sqlx::Error> {
    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        i64,
    );
    const SQL: &str = "SELECT aggregate_type, aggregate_id, command, subject, causation_id,
                              reason, refused_at_ms
                         FROM refused_commands WHERE correlation_id = $1
                        ORDER BY refused_at_ms, id";
    let rows: Vec<Row> = with_pool!(database, |pool| {
        sqlx::query_as(SQL)
            .bind(correlation_id)
            .fetch_all(pool)
            .await?
    });
    Ok(rows
        .into_iter()
        .map(
            |(aggregate_type, aggregate_id, command, subject, causation_id, reason, at)| {
                RefusedCommand {
                    correlation_id: correlation_id.to_owned(),
                    aggregate_type,
                    aggregate_id,
                    command,
                    subject,
                    causation_id,
                    reason,
                    refused_at: time(at),
                }
            },
        )
        .collect())
}

/// Deletes the provider attempts, refused commands and Kafka coordinates recorded before
/// `before`; how many rows it deleted.
pub async fn prune(database: &Database, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    const STATEMENTS: [&str; 3] = [
        "DELETE FROM provider_attempts WHERE started_at_ms < $1",
        "DELETE FROM refused_commands WHERE refused_at_ms < $1",
        "DELETE FROM kafka_published WHERE published_at_ms < $1",
    ];
    let mut deleted = 0;
    for statement in STATEMENTS {
        deleted += with_pool!(database, |pool| {
            sqlx::query(statement)
                .bind(before.timestamp_millis())
                .execute(pool)
                .await?
                .rows_affected()
        });
    }
    Ok(deleted)
}

/// Runs [`prune`] every `every` with `retention` until `shutdown` resolves.
pub async fn prune_every(
    database: Database,
    retention: Duration,
    every: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    loop {
        let before = Utc::now()
            .checked_sub_signed(retention)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        match prune(&database, before).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned timeline records past their retention"),
            Err(error) => tracing::warn!(%error, "pruning timeline records failed"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
