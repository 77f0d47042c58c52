//! The embedded read models' snapshot: the in-memory views, written behind to the SQLite file
//! (`read_model_snapshot*`) with the stream position they reflect. A start loads it and folds
//! only the events after it, instead of the whole log.
//!
//! A write holds the views changed since the last one, all as of one position, and lands only
//! if no snapshot of a later position is stored: every view stored then reflects the stored
//! position, even with several processes on one file (each folds the same log).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use petstore_domain::{OrderId, PetId};
use petstore_event_store::database::Database;
use petstore_event_store::stream::{self, StreamPosition};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use crate::views::{OrderStatusView, PetView};
use crate::ReadModelError;

/// The views' format. Raise it when a view's shape or the fold changes: a snapshot of another
/// format is dropped at start-up and the views are rebuilt from the log.
pub(crate) const FORMAT: i64 = 1;

/// While busy, views changed since the last write go out once this many have collected...
pub(crate) const MAX_UNSAVED: usize = 20_000;
/// ...or once the last write is this old.
pub(crate) const BUSY_INTERVAL: Duration = Duration::from_secs(10);
/// At the head of the log, changes go out once the last write is this old.
pub(crate) const IDLE_INTERVAL: Duration = Duration::from_secs(1);

/// Rows per INSERT statement (two parameters each; SQLite allows 32,766).
const ROWS_PER_STATEMENT: usize = 1_000;

/// Views loaded from a snapshot and the position they reflect.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) orders: HashMap<OrderId, OrderStatusView>,
    pub(crate) pets: BTreeMap<PetId, PetView>,
    pub(crate) position: StreamPosition,
}

/// Loads the snapshot of `database`. One that cannot be used (another format, a position past
/// the log's head, a view that does not decode) is dropped with a warning: the views are then
/// rebuilt from the log, which is what they are made of.
pub(crate) async fn load(database: &Database) -> Result<Loaded, ReadModelError> {
    let Database::Sqlite(pool) = database else {
        return Ok(Loaded::default());
    };
    let header: Option<(i64, i64)> = sqlx::query_as(
        "SELECT format, global_position FROM read_model_snapshot WHERE singleton = 1",
    )
    .fetch_optional(pool)
    .await?;
    let Some((format, global_position)) = header else {
        return Ok(Loaded::default());
    };
    let position = StreamPosition {
        transaction_id: 0,
        global_position,
    };
    let head = stream::head_position(database).await?;
    let refused = if format != FORMAT {
        Some(format!(
            "it has format {format}, this release reads {FORMAT}"
        ))
    } else if position > head {
        Some(format!(
            "it is at global position {global_position}, past the log's head {}",
            head.global_position
        ))
    } else {
        match decode(pool).await {
            Ok((orders, pets)) => {
                return Ok(Loaded {
                    orders,
                    pets,
                    position,
                })
            }
            Err(ReadModelError::Document(error)) => {
                Some(format!("a view does not decode: {error}"))
            }
            Err(error) => return Err(error),
        }
    };
    if let Some(reason) = refused {
        tracing::warn!(
            %reason,
            "the read-model snapshot is dropped; the read models are rebuilt from the log"
        );
        let mut transaction = petstore_event_store::database::begin(pool).await?;
        clear(&mut transaction).await?;
        transaction.commit().await?;
    }
    Ok(Loaded::default())
}

async fn decode(
    pool: &SqlitePool,
) -> Result<(HashMap<OrderId, OrderStatusView>, BTreeMap<PetId, PetView>), ReadModelError> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT view FROM read_model_snapshot_orders")
        .fetch_all(pool)
        .await?;
    let mut orders = HashMap::with_capacity(rows.len());
    for view in rows {
        let view: OrderStatusView = serde_json::from_str(&view)?;
        orders.insert(view.order_id, view);
    }
    let rows: Vec<String> = sqlx::query_scalar("SELECT view FROM read_model_snapshot_pets")
        .fetch_all(pool)
        .await?;
    let mut pets = BTreeMap::new();
    for view in rows {
        let view: PetView = serde_json::from_str(&view)?;
        pets.insert(view.id.clone(), view);
    }
    Ok((orders, pets))
}

async fn clear(transaction: &mut sqlx::Transaction<'_, Sqlite>) -> Result<(), sqlx::Error> {
    for table in [
        "read_model_snapshot",
        "read_model_snapshot_orders",
        "read_model_snapshot_pets",
    ] {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

/// How a write treats what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Adds the views changed since the last write, unless a later position is stored.
    Changes,
    /// Replaces the whole snapshot (a rebuild).
    Everything,
}

/// Writes `orders` and `pets` as of `position` in one transaction; `false` when a snapshot of
/// a later position is stored (`Write::Changes`), and nothing was written.
pub(crate) async fn write(
    pool: &SqlitePool,
    position: StreamPosition,
    orders: &[OrderStatusView],
    pets: &[PetView],
    mode: Write,
) -> Result<bool, ReadModelError> {
    // Serialized before the transaction: the file's write lock is held for the writes only.
    let orders = orders
        .iter()
        .map(|view| Ok((view.order_id.to_string(), serde_json::to_string(view)?)))
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    let pets = pets
        .iter()
        .map(|view| Ok((view.id.to_string(), serde_json::to_string(view)?)))
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    let mut transaction = petstore_event_store::database::begin(pool).await?;
    if mode == Write::Everything {
        clear(&mut transaction).await?;
    }
    // The header first: as a write it takes the file's write lock at once.
    let moved = sqlx::query(
        "INSERT INTO read_model_snapshot (singleton, format, global_position)
         VALUES (1, $1, $2)
         ON CONFLICT (singleton) DO UPDATE
            SET format = excluded.format,
                global_position = excluded.global_position,
                written_at = excluded.written_at
          WHERE excluded.global_position >= read_model_snapshot.global_position",
    )
    .bind(FORMAT)
    .bind(position.global_position)
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    for (table, key, rows) in [
        ("read_model_snapshot_orders", "order_id", &orders),
        ("read_model_snapshot_pets", "pet_id", &pets),
    ] {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut insert =
                QueryBuilder::<Sqlite>::new(format!("INSERT INTO {table} ({key}, view) "));
            insert.push_values(chunk, |mut row, (id, view)| {
                row.push_bind(id.as_str()).push_bind(view.as_str());
            });
            insert.push(format!(
                " ON CONFLICT ({key}) DO UPDATE SET view = excluded.view"
            ));
            insert.build().execute(&mut *transaction).await?;
        }
    }
    transaction.commit().await?;
    Ok(true)
}
