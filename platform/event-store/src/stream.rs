//! The global event stream: every committed event, once, in an order that never changes.
//!
//! On Postgres the order is `(transaction_id, global_position)` and a reader only takes events
//! of transactions older than the oldest one still running (`pg_snapshot_xmin`), so an event
//! that a slow transaction commits late is never skipped. On SQLite one writer at a time makes
//! `global_position` commit order by itself. Readers are woken by appends in their own process
//! and by `NOTIFY petstore_events` from other processes (see
//! [`crate::store::EventStore::notify_appends`]), and poll as a fallback. Subscribers
//! keep durable checkpoints in `stream_checkpoints`; Postgres read models save theirs inside
//! their own transaction ([`save_checkpoint_in`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use crate::database::{with_pool, Database, Fence};
use crate::metadata::StoredMetadata;

/// A place in the global stream; "after this event". Ordered as the stream is.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub struct StreamPosition {
    /// The writing transaction's id (always 0 on SQLite).
    pub transaction_id: i64,
    /// The event's global position.
    pub global_position: i64,
}

impl StreamPosition {
    /// Before the first event.
    pub const START: StreamPosition = StreamPosition {
        transaction_id: 0,
        global_position: 0,
    };
}

/// An event's payload as stored: raw JSON, parsed only by whoever reads it (a fold straight
/// into its type, never a tree in between; the relay copies it as it is). Equal when the
/// text is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// `event` serialized as a payload.
    pub fn of<T: Serialize + ?Sized>(event: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(event).map(Self)
    }

    /// The JSON.
    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    /// The JSON as a tree.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The string field `name` of the event's variant (`{"Variant": {"name": "…"}}`), read
    /// without decoding the event (which may be the one that cannot be decoded).
    pub fn variant_field(&self, name: &str) -> Option<String> {
        let value = self.to_value().ok()?;
        let field = value.as_object()?.values().next()?.get(name)?;
        field.as_str().map(str::to_owned)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

/// One event as the global stream delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Where it stands in the stream.
    pub position: StreamPosition,
    /// `Order`, `Pet`, `Payment`, `Delivery`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1.
    pub sequence: i64,
    /// The event's type name.
    pub event_type: String,
    /// The event's schema version.
    pub event_version: String,
    /// The event, as the domain serialized it.
    pub payload: Payload,
    /// Correlation id, causation id, subject, command id, timestamp, traceparent (of the
    /// append that stored it), settings version, flags, and any other key.
    pub metadata: StoredMetadata,
    /// How it arrived, when it came from Kafka rather than the event store.
    pub delivery: Option<Delivery>,
}

/// Where a Kafka message carrying an event came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The `traceparent` header: the producer span that published it.
    pub traceparent: Option<String>,
}

/// Namespace of event ids (UUIDv5 of aggregate type, id and sequence).
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x3b8f_6f4e_2c1d_4e7a_9b0c_5d6e_7f80_9a1b);

/// The stable id of the event at `sequence` of an aggregate: the same everywhere the event
/// travels (Kafka headers, causation ids, audit trail) without being stored twice.
pub fn event_id(aggregate_type: &str, aggregate_id: &str, sequence: i64) -> uuid::Uuid {
    let name = format!("{aggregate_type}\u{0}{aggregate_id}\u{0}{sequence}");
    uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

impl RecordedEvent {
    /// The event's stable id.
    pub fn event_id(&self) -> uuid::Uuid {
        event_id(&self.aggregate_type, &self.aggregate_id, self.sequence)
    }

    /// The `traceparent` a handler continues: the message's (its producer span) when it came
    /// from Kafka, else the one stored with the event (the append).
    pub fn traceparent(&self) -> Option<&str> {
        self.delivery
            .as_ref()
            .and_then(|delivery| delivery.traceparent.as_deref())
            .or(self.metadata.traceparent.as_deref())
    }
}

/// Reading the stream or a checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The database failed.
    #[error("reading the event stream failed: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored event's metadata is not a JSON object of strings, or a known key holds
    /// something else than it should.
    #[error("event at {position:?} has malformed metadata: {source}")]
    Metadata {
        /// The event.
        position: StreamPosition,
        /// Why.
        source: sqlx::Error,
    },
    /// The writer's lock passed to another holder: its write was refused.
    #[error("fenced: {name} is held with token {current:?} now, not this writer's {held}")]
    Fenced {
        /// The lock.
        name: String,
        /// The writer's token.
        held: i64,
        /// The lock's token now.
        current: Option<i64>,
    },
}

// `ORDER BY events.transaction_id`, qualified: bare, it names the output column of the same
// name (the `bigint` cast), which no index orders, and Postgres sorts every row after the
// position for each batch.
const POSTGRES_READ: &str = "
SELECT transaction_id::text::bigint AS transaction_id, global_position, aggregate_type,
       aggregate_id, sequence, event_type, event_version, payload, metadata
  FROM events
 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
   AND (transaction_id, global_position) > ($1::text::xid8, $2)
 ORDER BY events.transaction_id, events.global_position
 LIMIT $3";

const SQLITE_READ: &str = "
SELECT 0 AS transaction_id, global_position, aggregate_type, aggregate_id, sequence,
       event_type, event_version, payload, metadata
  FROM events
 WHERE global_position > ?2 AND ?1 >= 0
 ORDER BY global_position
 LIMIT ?3";

fn decode<R: Row>(row: &R) -> Result<RecordedEvent, StreamError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Json<Box<RawValue>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Json<StoredMetadata>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
{
    let position = StreamPosition {
        transaction_id: row.try_get("transaction_id")?,
        global_position: row.try_get("global_position")?,
    };
    // Straight into the typed metadata, without a JSON tree first.
    let Json(metadata) = row
        .try_get::<Json<StoredMetadata>, _>("metadata")
        .map_err(|source| StreamError::Metadata { position, source })?;
    Ok(RecordedEvent {
        position,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: Payload(row.try_get::<Json<Box<RawValue>>, _>("payload")?.0),
        metadata,
        delivery: None,
    })
}

/// Reads up to `limit` events after `after`, in stream order.
pub async fn read_after(
    database: &Database,
    after: StreamPosition,
    limit: u32,
) -> Result<Vec<RecordedEvent>, StreamError> {
    let limit = i64::from(limit.max(1));
    match database {
        Database::Postgres(pool) => {
            let rows = sqlx::query(POSTGRES_READ)
                .bind(after.transaction_id.to_string())
                .bind(after.global_position)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(decode).collect()
        }
        Database::Sqlite(pool) => {
            let rows = sqlx::query(SQLITE_READ)
                .bind(after.transaction_id)
                .bind(after.global_position)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(decode).collect()
        }
    }
}

/// Up to `limit` events of type `event_type` (any, for `None`), newest first in stream
/// order, at or before `until` (the head, for `None`): the console's tail, read back.
pub async fn newest_first(
    database: &Database,
    until: Option<StreamPosition>,
    event_type: Option<&str>,
    limit: u32,
) -> Result<Vec<RecordedEvent>, StreamError> {
    const POSTGRES: &str = "
SELECT transaction_id::text::bigint AS transaction_id, global_position, aggregate_type,
       aggregate_id, sequence, event_type, event_version, payload, metadata
  FROM events
 WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
   AND ($1::bigint IS NULL OR (transaction_id, global_position) <= ($1::text::xid8, $2))
   AND ($3::text IS NULL OR event_type = $3)
 ORDER BY events.transaction_id DESC, events.global_position DESC
 LIMIT $4";
    const SQLITE: &str = "
SELECT 0 AS transaction_id, global_position, aggregate_type, aggregate_id, sequence,
       event_type, event_version, payload, metadata
  FROM events
 WHERE (?1 IS NULL OR global_position <= ?2)
   AND (?3 IS NULL OR event_type = ?3)
 ORDER BY global_position DESC
 LIMIT ?4";
    let limit = i64::from(limit.max(1));
    with_pool!(database, |pool| {
        sqlx::query(database.sql(POSTGRES, SQLITE))
            .bind(until.map(|until| until.transaction_id))
            .bind(until.map_or(0, |until| until.global_position))
            .bind(event_type)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(decode)
            .collect()
    })
}

/// The stream position of the event at `global_position`, if there is one.
pub async fn position_at(
    database: &Database,
    global_position: i64,
) -> Result<Option<StreamPosition>, StreamError> {
    const POSTGRES: &str =
        "SELECT transaction_id::text::bigint FROM events WHERE global_position = $1";
    const SQLITE: &str = "SELECT 0 FROM events WHERE global_position = ?1";
    let transaction_id: Option<i64> = with_pool!(database, |pool| {
        sqlx::query_scalar(database.sql(POSTGRES, SQLITE))
            .bind(global_position)
            .fetch_optional(pool)
            .await
    })?;
    Ok(transaction_id.map(|transaction_id| StreamPosition {
        transaction_id,
        global_position,
    }))
}

/// The position of the last committed event (the stream's head), or
/// [`StreamPosition::START`] for an empty store. A reader at or past it has seen everything
/// committed when this was asked.
pub async fn head_position(database: &Database) -> Result<StreamPosition, StreamError> {
    const POSTGRES: &str = "SELECT transaction_id::text::bigint, global_position FROM events
                             ORDER BY events.transaction_id DESC, events.global_position DESC
                             LIMIT 1";
    const SQLITE: &str = "SELECT 0, coalesce(max(global_position), 0) FROM events";
    let row: Option<(i64, i64)> = with_pool!(database, |pool| {
        sqlx::query_as(database.sql(POSTGRES, SQLITE))
            .fetch_optional(pool)
            .await
    })?;
    Ok(row.map_or(
        StreamPosition::START,
        |(transaction_id, global_position)| StreamPosition {
            transaction_id,
            global_position,
        },
    ))
}

/// How far a stream subscriber (a projection, the saga runner) is behind the log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lag {
    /// Events in the log after its position (counted up to [`LAG_COUNT_LIMIT`]).
    pub events: i64,
    /// Age of the oldest of them, in seconds, by its timestamp (0 when there is none).
    pub seconds: f64,
}

/// A subscriber whose oldest unhandled event is at least this old is reported `lagging`.
pub const LAGGING_AFTER_SECONDS: f64 = 5.0;

/// `lag` counts at most this many events: past it, the subscriber is far behind anyway, and
/// counting further would cost the database more than the answer is worth.
pub const LAG_COUNT_LIMIT: i64 = 100_000;

impl Lag {
    /// `lagging: …` when the oldest unhandled event is older than [`LAGGING_AFTER_SECONDS`].
    pub fn lagging(&self) -> Option<String> {
        (self.events > 0 && self.seconds >= LAGGING_AFTER_SECONDS).then(|| {
            format!(
                "lagging: {} events behind, the oldest {:.1} s old",
                self.events, self.seconds
            )
        })
    }
}

/// How far a subscriber at `after` is behind: the committed events after it (whether or not
/// a reader may see them yet) and the age of the oldest.
pub async fn lag(database: &Database, after: StreamPosition) -> Result<Lag, StreamError> {
    let (events, oldest): (i64, Option<String>) = match database {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT count(*), min(timestamp) FROM (
                   SELECT metadata ->> 'timestamp' AS timestamp FROM events
                    WHERE (transaction_id, global_position) > ($1::text::xid8, $2)
                    ORDER BY transaction_id, global_position LIMIT $3) AS pending",
            )
            .bind(after.transaction_id.to_string())
            .bind(after.global_position)
            .bind(LAG_COUNT_LIMIT)
            .fetch_one(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT count(*), min(timestamp) FROM (
                   SELECT json_extract(metadata, '$.timestamp') AS timestamp FROM events
                    WHERE global_position > ?1 ORDER BY global_position LIMIT ?2) AS pending",
            )
            .bind(after.global_position)
            .bind(LAG_COUNT_LIMIT)
            .fetch_one(pool)
            .await?
        }
    };
    let seconds = oldest
        .and_then(|timestamp| chrono::DateTime::parse_from_rfc3339(&timestamp).ok())
        .map_or(0.0, |oldest| {
            (chrono::Utc::now() - oldest.with_timezone(&chrono::Utc))
                .to_std()
                .map_or(0.0, |age| age.as_secs_f64())
        });
    Ok(Lag { events, seconds })
}

/// How often subscribers measure their [`lag`].
pub const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// A subscriber's saved place in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The subscriber (`read_models`, `redis`, `kafka`, …).
    pub name: String,
    /// Where it is.
    pub position: StreamPosition,
    /// When it last moved (RFC 3339).
    pub updated_at: String,
}

/// Every checkpoint saved, by name.
pub async fn checkpoints(database: &Database) -> Result<Vec<Checkpoint>, StreamError> {
    const POSTGRES: &str = "SELECT name, transaction_id, global_position,
                                   to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
                              FROM stream_checkpoints ORDER BY name";
    const SQLITE: &str = "SELECT name, transaction_id, global_position, updated_at
                            FROM stream_checkpoints ORDER BY name";
    let rows: Vec<(String, i64, i64, String)> = with_pool!(database, |pool| {
        sqlx::query_as(database.sql(POSTGRES, SQLITE))
            .fetch_all(pool)
            .await
    })?;
    Ok(rows
        .into_iter()
        .map(
            |(name, transaction_id, global_position, updated_at)| Checkpoint {
                name,
                position: StreamPosition {
                    transaction_id,
                    global_position,
                },
                updated_at,
            },
        )
        .collect())
}

/// The checkpoint saved under `name`, or [`StreamPosition::START`].
pub async fn load_checkpoint(
    database: &Database,
    name: &str,
) -> Result<StreamPosition, StreamError> {
    const SQL: &str =
        "SELECT transaction_id, global_position FROM stream_checkpoints WHERE name = $1";
    let row = with_pool!(database, |pool| {
        sqlx::query_as::<_, (i64, i64)>(SQL)
            .bind(name)
            .fetch_optional(pool)
            .await
    })?;
    Ok(row.map_or(
        StreamPosition::START,
        |(transaction_id, global_position)| StreamPosition {
            transaction_id,
            global_position,
        },
    ))
}

const SAVE_CHECKPOINT: &str = "
INSERT INTO stream_checkpoints (name, transaction_id, global_position) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE
   SET transaction_id = excluded.transaction_id,
       global_position = excluded.global_position,
       updated_at = CURRENT_TIMESTAMP";

/// Saves each `(name, position)` checkpoint in one statement, inside the Postgres
/// transaction on `connection`.
pub async fn save_checkpoints_in(
    connection: &mut PgConnection,
    checkpoints: &[(String, StreamPosition)],
) -> Result<(), sqlx::Error> {
    if checkpoints.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = checkpoints.iter().map(|(name, _)| name.as_str()).collect();
    let transactions: Vec<i64> = checkpoints
        .iter()
        .map(|(_, at)| at.transaction_id)
        .collect();
    let positions: Vec<i64> = checkpoints
        .iter()
        .map(|(_, at)| at.global_position)
        .collect();
    sqlx::query(
        "INSERT INTO stream_checkpoints (name, transaction_id, global_position)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[])
         ON CONFLICT (name) DO UPDATE
            SET transaction_id = excluded.transaction_id,
                global_position = excluded.global_position,
                updated_at = CURRENT_TIMESTAMP",
    )
    .bind(names)
    .bind(transactions)
    .bind(positions)
    .execute(connection)
    .await?;
    Ok(())
}

/// Saves `position` as the checkpoint `name`; with `fence` (Postgres), only while it is still
/// the lock's token. On Postgres the commit does not wait for the WAL flush
/// ([`crate::database::commit_lazily`]): a checkpoint lost in a database crash only means
/// its events are handled again, which every subscriber takes harmlessly.
pub async fn save_checkpoint(
    database: &Database,
    name: &str,
    position: StreamPosition,
    fence: Option<&Fence>,
) -> Result<(), StreamError> {
    match database {
        Database::Postgres(pool) => {
            // Acknowledging runs inside subscribers that may be cancelled at any await (a
            // runner stopped or aborted): a plain `pool.begin()` dropped while it waits for
            // `BEGIN`'s answer leaves a pooled connection in a transaction sqlx does not
            // know about, whose later statements hold locks and the cluster's stream horizon
            // (seen: a killed saga runner's deadline writes stalling every reader for 60 s).
            let mut transaction = crate::database::begin(pool).await?;
            crate::database::commit_lazily(&mut transaction).await?;
            save_checkpoint_in(&mut transaction, name, position, fence).await?;
            transaction.commit().await?;
        }
        Database::Sqlite(pool) => {
            let sql = SAVE_CHECKPOINT.replace(
                "updated_at = CURRENT_TIMESTAMP",
                "updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            );
            sqlx::query(&sql)
                .bind(name)
                .bind(position.transaction_id)
                .bind(position.global_position)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Saves a Postgres checkpoint on `connection`, typically inside the transaction that applied
/// the events, so the two commit together; with `fence`, only while it is still the lock's
/// token (checked in the same transaction: [`check_fence_in`]).
pub async fn save_checkpoint_in(
    connection: &mut PgConnection,
    name: &str,
    position: StreamPosition,
    fence: Option<&Fence>,
) -> Result<(), StreamError> {
    if let Some(fence) = fence {
        check_fence_in(connection, fence).await?;
    }
    sqlx::query(SAVE_CHECKPOINT)
        .bind(name)
        .bind(position.transaction_id)
        .bind(position.global_position)
        .execute(connection)
        .await?;
    Ok(())
}

/// Refuses unless `fence` is still its lock's token. Run inside the transaction of the write
/// it guards: the row is share-locked until that transaction ends, so a successor's token
/// cannot move past it meanwhile (the successor waits for the commit, then reads what it
/// wrote).
pub async fn check_fence_in(
    connection: &mut PgConnection,
    fence: &Fence,
) -> Result<(), StreamError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT token FROM lock_fences WHERE name = $1 FOR SHARE")
            .bind(&fence.name)
            .fetch_optional(&mut *connection)
            .await?;
    if current == Some(fence.token) {
        Ok(())
    } else {
        Err(StreamError::Fenced {
            name: fence.name.clone(),
            held: fence.token,
            current,
        })
    }
}

impl StreamError {
    /// Whether the writer lost its lock (as opposed to a failure worth retrying).
    pub fn is_fenced(&self) -> bool {
        matches!(self, StreamError::Fenced { .. })
    }
}

const POSTGRES_BY_CORRELATION: &str = "
SELECT transaction_id::text::bigint AS transaction_id, global_position, aggregate_type,
       aggregate_id, sequence, event_type, event_version, payload, metadata
  FROM events
 WHERE metadata ->> 'correlation_id' = $1
 ORDER BY events.transaction_id, events.global_position";

const SQLITE_BY_CORRELATION: &str = "
SELECT 0 AS transaction_id, global_position, aggregate_type, aggregate_id, sequence,
       event_type, event_version, payload, metadata
  FROM events
 WHERE json_extract(metadata, '$.correlation_id') = ?1
 ORDER BY global_position";

/// Every committed event whose metadata carries `correlation_id`, across aggregates, in
/// stream order: the audit trail of one request and everything it caused.
pub async fn events_with_correlation(
    database: &Database,
    correlation_id: &str,
) -> Result<Vec<RecordedEvent>, StreamError> {
    with_pool!(database, |pool| {
        sqlx::query(database.sql(POSTGRES_BY_CORRELATION, SQLITE_BY_CORRELATION))
            .bind(correlation_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(decode)
            .collect()
    })
}

/// Events of one aggregate with a sequence in `sequences`, newest first, at most `limit`.
pub async fn aggregate_events_newest_first(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
    sequences: std::ops::Range<i64>,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StreamError> {
    const POSTGRES: &str = "
SELECT transaction_id::text::bigint AS transaction_id, global_position, aggregate_type,
       aggregate_id, sequence, event_type, event_version, payload, metadata
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence >= $3 AND sequence < $4
 ORDER BY sequence DESC
 LIMIT $5";
    const SQLITE: &str = "
SELECT 0 AS transaction_id, global_position, aggregate_type, aggregate_id, sequence,
       event_type, event_version, payload, metadata
  FROM events
 WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND sequence >= ?3 AND sequence < ?4
 ORDER BY sequence DESC
 LIMIT ?5";
    with_pool!(database, |pool| {
        sqlx::query(database.sql(POSTGRES, SQLITE))
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequences.start)
            .bind(sequences.end)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(decode)
            .collect()
    })
}

/// The correlation id of an aggregate's first event, if the aggregate exists.
pub async fn correlation_of(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<String>, StreamError> {
    const POSTGRES: &str = "SELECT metadata ->> 'correlation_id' FROM events
                             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = 1";
    const SQLITE: &str = "SELECT json_extract(metadata, '$.correlation_id') FROM events
                           WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND sequence = 1";
    let correlation: Option<Option<String>> = with_pool!(database, |pool| {
        sqlx::query_scalar(database.sql(POSTGRES, SQLITE))
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(pool)
            .await
    })?;
    Ok(correlation.flatten())
}

impl StreamPosition {
    /// The opaque `X-Consistency-Token` form: `t{transaction_id}p{global_position}` (letters
    /// and digits only, so that it is a plain token in any header grammar).
    pub fn to_token(&self) -> String {
        format!("t{}p{}", self.transaction_id, self.global_position)
    }

    /// Parses [`Self::to_token`]'s form.
    pub fn from_token(token: &str) -> Option<Self> {
        let (transaction_id, global_position) = token.strip_prefix('t')?.split_once('p')?;
        Some(Self {
            transaction_id: transaction_id
                .parse()
                .ok()
                .filter(|value: &i64| *value >= 0)?,
            global_position: global_position
                .parse()
                .ok()
                .filter(|value: &i64| *value >= 0)?,
        })
    }
}

/// Where one stored event stands in the global stream.
pub async fn position_of(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<Option<StreamPosition>, StreamError> {
    const POSTGRES: &str = "SELECT transaction_id::text::bigint, global_position FROM events
                             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3";
    const SQLITE: &str = "SELECT 0, global_position FROM events
                           WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND sequence = ?3";
    let row: Option<(i64, i64)> = with_pool!(database, |pool| {
        sqlx::query_as(database.sql(POSTGRES, SQLITE))
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_optional(pool)
            .await
    })?;
    Ok(row.map(|(transaction_id, global_position)| StreamPosition {
        transaction_id,
        global_position,
    }))
}
