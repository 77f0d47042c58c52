//! Where the Kafka relay published each event (topic, partition, offset), recorded after the
//! broker acknowledged it, in the transaction that moves the relay's checkpoint past it: the
//! order timeline shows them, and an operator compares them with what a consumer reads.
//! One row per acknowledged batch (a row per event cost the relay a fifth of its
//! throughput: bench/README section 23). Pruned with the other timeline records
//! ([`crate::records::prune`]).

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
/// records `published` (the events up to it, with the same `at`): one row for the whole
/// acknowledged prefix, its coordinates as runs. On Postgres in one transaction; on SQLite
/// the row first, then the checkpoint (a crash between them records coordinates of events
/// that are published again, whose later row then wins). An event published
/// again (after a failure, or by a replay) is found with its latest coordinates.
pub async fn save_checkpoint_with(
    database: &Database,
    name: &str,
    position: StreamPosition,
    fence: Option<&Fence>,
    published: &[Published],
) -> Result<(), StreamError> {
    let (Some(first), Some(last)) = (
        published.iter().map(|one| one.global_position).min(),
        published.iter().map(|one| one.global_position).max(),
    ) else {
        return stream::save_checkpoint(database, name, position, fence).await;
    };
    let at = published
        .iter()
        .map(|one| one.at.timestamp_millis())
        .max()
        .unwrap_or_default();
    let entries = serde_json::to_string(&runs(published))
        .map_err(|error| StreamError::Database(sqlx::Error::Encode(Box::new(error))))?;
    const INSERT: &str = "INSERT INTO kafka_published
                            (first_position, last_position, published_at_ms, entries)
                          VALUES ($1, $2, $3, $4)";
    match database {
        Database::Postgres(pool) => {
            let mut transaction = crate::database::begin(pool).await?;
            crate::database::commit_lazily(&mut transaction).await?;
            stream::save_checkpoint_in(&mut transaction, name, position, fence).await?;
            sqlx::query(INSERT)
                .bind(first)
                .bind(last)
                .bind(at)
                .bind(&entries)
                .execute(&mut *transaction)
                .await?;
            transaction.commit().await?;
        }
        Database::Sqlite(pool) => {
            sqlx::query(INSERT)
                .bind(first)
                .bind(last)
                .bind(at)
                .bind(&entries)
                .execute(pool)
                .await?;
            stream::save_checkpoint(database, name, position, fence).await?;
        }
    }
    Ok(())
}

/// A batch's coordinates as stored: runs of consecutive offsets of one partition of one topic,
/// each `(topic, partition, first offset, the events' positions)`, the i-th position at the
/// first offset + i. A relay batch is some tens of runs (a topic per aggregate type, a
/// partition per saga partition), so a row holds little more than the positions.
type Run<'a> = (std::borrow::Cow<'a, str>, i32, i64, Vec<i64>);

/// `published` (in the order the broker acknowledged them) as [`Run`]s.
fn runs(published: &[Published]) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    for one in published {
        let open = runs.iter_mut().rev().find(|(topic, partition, ..)| {
            topic.as_ref() == one.topic && *partition == one.partition
        });
        match open {
            Some((_, _, first, positions))
                if *first + i64::try_from(positions.len()).unwrap_or(i64::MAX) == one.offset =>
            {
                positions.push(one.global_position);
            }
            _ => runs.push((
                std::borrow::Cow::Borrowed(one.topic.as_str()),
                one.partition,
                one.offset,
                vec![one.global_position],
            )),
        }
    }
    runs
}

/// The coordinates recorded for the events at `positions` (the latest, for an event
/// published more than once).
pub async fn of_positions(
    database: &Database,
    positions: &[i64],
) -> Result<Vec<Published>, sqlx::Error> {
    let (Some(&first), Some(&last)) = (positions.iter().min(), positions.iter().max()) else {
        return Ok(Vec::new());
    };
    type Row = (i64, i64, String);
    let rows: Vec<Row> = match database {
        // The batches whose span holds one of the positions, each found through the GiST
        // index on the span.
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT DISTINCT batch.id, batch.published_at_ms, batch.entries
                   FROM unnest($1::bigint[]) AS wanted(position)
                   JOIN kafka_published AS batch
                     ON int8range(batch.first_position, batch.last_position, '[]')
                        @> wanted.position
                  ORDER BY batch.id",
            )
            .bind(positions)
            .fetch_all(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT id, published_at_ms, entries FROM kafka_published
                  WHERE last_position >= $1 AND first_position <= $2 ORDER BY id",
            )
            .bind(first)
            .bind(last)
            .fetch_all(pool)
            .await?
        }
    };
    let wanted: std::collections::HashSet<i64> = positions.iter().copied().collect();
    let mut found: std::collections::BTreeMap<i64, Published> = std::collections::BTreeMap::new();
    for (id, at, entries) in rows {
        let Ok(runs) = serde_json::from_str::<Vec<Run<'_>>>(&entries) else {
            tracing::warn!(id, "a malformed row of kafka_published; not shown");
            continue;
        };
        let at = Utc
            .timestamp_millis_opt(at)
            .single()
            .unwrap_or(DateTime::UNIX_EPOCH);
        for (topic, partition, first, positions) in runs {
            for (global_position, offset) in positions.into_iter().zip(first..) {
                if !wanted.contains(&global_position) {
                    continue;
                }
                // Rows come oldest first: a later publication replaces an earlier one.
                found.insert(
                    global_position,
                    Published {
                        global_position,
                        topic: topic.to_string(),
                        partition,
                        offset,
                        at,
                    },
                );
            }
        }
    }
    Ok(found.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(global_position: i64, topic: &str, partition: i32, offset: i64) -> Published {
        Published {
            global_position,
            topic: topic.to_owned(),
            partition,
            offset,
            at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn runs_hold_consecutive_offsets_of_one_partition_and_split_at_a_gap() {
        let batch = [
            published(10, "orders", 3, 7),
            published(11, "pets", 1, 2),
            published(12, "orders", 3, 8),
            published(13, "orders", 4, 0),
            // A gap: offset 9 went to someone else (a retried batch, another producer).
            published(14, "orders", 3, 10),
        ];
        let runs = runs(&batch);
        let stored = serde_json::to_string(&runs).expect("json");
        assert_eq!(
            stored,
            r#"[["orders",3,7,[10,12]],["pets",1,2,[11]],["orders",4,0,[13]],["orders",3,10,[14]]]"#
        );
        let read: Vec<Run<'_>> = serde_json::from_str(&stored).expect("json");
        let expanded: Vec<(i64, String, i32, i64)> = read
            .into_iter()
            .flat_map(|(topic, partition, first, positions)| {
                positions
                    .into_iter()
                    .zip(first..)
                    .map(move |(position, offset)| (position, topic.to_string(), partition, offset))
            })
            .collect();
        let mut expected: Vec<(i64, String, i32, i64)> = batch
            .iter()
            .map(|one| {
                (
                    one.global_position,
                    one.topic.clone(),
                    one.partition,
                    one.offset,
                )
            })
            .collect();
        let mut sorted = expanded;
        sorted.sort();
        expected.sort();
        assert_eq!(sorted, expected);
    }
}
