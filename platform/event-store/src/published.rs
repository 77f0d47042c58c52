//! Where the Kafka relay published each event (topic, partition, offset), recorded after the
//! broker acknowledged it, in the transaction that moves the relay's checkpoint past it: the
//! order timeline shows them, and an operator compares them with what a consumer reads.
//! Pruned with the other timeline records ([`crate::records::prune`]).

use chrono::{DateTime, TimeZone, Utc};

use crate::database::{Database, Fence};
use crate::stream::{self, StreamError, StreamPosition};

/// Where one event was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's global position.
    pub global_position: i64,
    /// The topic.
    pub topic: String,
    /// The Kafka partition.
    pub partition: i32,
    /// The offset in that partition.
    pub offset: i64,
    /// When the broker acknowledged it.
    pub at: DateTime<Utc>,
}

/// Saves the checkpoint `name` at `position` (fenced as [`stream::save_checkpoint`] is) and
/// records `published`, in one transaction. An event published again (after a failure, or
/// by a replay) keeps its latest coordinates.
pub async fn save_checkpoint_with(
    database: &Database,
    name: &str,
    position: StreamPosition,
    fence: Option<&Fence>,
    published: &[Published],
) -> Result<(), StreamError> {
    if published.is_empty() {
        return stream::save_checkpoint(database, name, position, fence).await;
    }
    const UPSERT: &str = "ON CONFLICT (global_position) DO UPDATE
            SET topic = excluded.topic, kafka_partition = excluded.kafka_partition,
                kafka_offset = excluded.kafka_offset, published_at_ms = excluded.published_at_ms";
    match database {
        Database::Postgres(pool) => {
            let mut transaction = crate::database::begin(pool).await?;
            crate::database::commit_lazily(&mut transaction).await?;
            stream::save_checkpoint_in(&mut transaction, name, position, fence).await?;
            sqlx::query(&format!(
                "INSERT INTO kafka_coordinates
                   (global_position, topic, kafka_partition, kafka_offset, published_at_ms)
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::integer[], $4::bigint[],
                                      $5::bigint[]) {UPSERT}"
            ))
            .bind(
                published
                    .iter()
                    .map(|p| p.global_position)
                    .collect::<Vec<_>>(),
            )
            .bind(
                published
                    .iter()
                    .map(|p| p.topic.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(published.iter().map(|p| p.partition).collect::<Vec<_>>())
            .bind(published.iter().map(|p| p.offset).collect::<Vec<_>>())
            .bind(
                published
                    .iter()
                    .map(|p| p.at.timestamp_millis())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
        }
        Database::Sqlite(pool) => {
            let mut transaction = crate::database::begin(pool).await?;
            for one in published {
                sqlx::query(&format!(
                    "INSERT INTO kafka_coordinates
                       (global_position, topic, kafka_partition, kafka_offset, published_at_ms)
                     VALUES ($1, $2, $3, $4, $5) {UPSERT}"
                ))
                .bind(one.global_position)
                .bind(&one.topic)
                .bind(one.partition)
                .bind(one.offset)
                .bind(one.at.timestamp_millis())
                .execute(&mut *transaction)
                .await?;
            }
            transaction.commit().await?;
            stream::save_checkpoint(database, name, position, fence).await?;
        }
    }
    Ok(())
}

/// The coordinates recorded for the events at `positions`.
pub async fn of_positions(
    database: &Database,
    positions: &[i64],
) -> Result<Vec<Published>, sqlx::Error> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    type Row = (i64, String, i32, i64, i64);
    let rows: Vec<Row> = match database {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT global_position, topic, kafka_partition, kafka_offset, published_at_ms
                   FROM kafka_coordinates WHERE global_position = ANY($1)",
            )
            .bind(positions)
            .fetch_all(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            let list = positions
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            sqlx::query_as(&format!(
                "SELECT global_position, topic, kafka_partition, kafka_offset, published_at_ms
                   FROM kafka_coordinates WHERE global_position IN ({list})"
            ))
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(
            |(global_position, topic, partition, offset, at)| Published {
                global_position,
                topic,
                partition,
                offset,
                at: Utc
                    .timestamp_millis_opt(at)
                    .single()
                    .unwrap_or(DateTime::UNIX_EPOCH),
            },
        )
        .collect())
}
