//! Rebuilding the read models and Redis's views from the event log.
//!
//! A rebuild folds the whole stream into shadow copies (`*_replay` tables, `{prefix}:replay:`
//! keys) while the live read models keep serving, then swaps them in atomically (one
//! transaction renaming the tables and setting the checkpoint; one MULTI/EXEC renaming the
//! keys). It takes the projection's lock first, so it never races a running projector: stop
//! the projector role (a standby keeps waiting) while a rebuild runs. On the embedded store
//! a rebuild folds the log in memory and replaces the read-model snapshot in one transaction.

use std::collections::HashSet;
use std::time::Instant;

use petstore_domain::{OrderId, PetId};
use petstore_event_store::database::{Database, Fence};
use petstore_event_store::replay::{fold_log, FoldError};
use petstore_event_store::stream::{self, StreamPosition};
use petstore_event_store::subscription::try_become_active;
use sqlx::PgPool;

pub use petstore_event_store::replay::ReplayReport;

use crate::redis::RedisViews;
use crate::snapshot::Loaded;
use crate::store::{slugs, uuids, write_views, PgTables, ReadModels, CHECKPOINT, LIVE_TABLES};
use crate::views::{OrderStatusView, PetView, ViewBatch};
use crate::ReadModelError;

/// A rebuild could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The projection is running somewhere and holds its lock.
    #[error("the {0} projection is active in a running service; stop its projector role first")]
    ProjectionActive(&'static str),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Locking failed.
    #[error(transparent)]
    Lock(#[from] petstore_event_store::database::DatabaseError),
    /// Reading the log failed.
    #[error(transparent)]
    Read(#[from] FoldError),
    /// A read model (or Redis's views) could not be read or written.
    #[error(transparent)]
    ReadModels(#[from] ReadModelError),
    /// A write to the shadow tables stopped before it finished.
    #[error("a write to the shadow tables stopped: {0}")]
    WriteStopped(#[from] tokio::task::JoinError),
}

const SHADOW_TABLES: PgTables = PgTables {
    orders: "order_status_view_replay",
    pets: "pet_catalog_view_replay",
};

/// Rebuilds the Postgres read models into shadow tables and swaps them in; on the embedded
/// store, rebuilds the read-model snapshot a start loads (a running service keeps the views
/// it holds in memory).
pub async fn rebuild_read_models(
    database: &Database,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let Database::Postgres(pool) = database else {
        let models = ReadModels::memory(database, Loaded::default());
        let models = &models;
        let folded = fold_log(
            database,
            batch_size,
            dry_run,
            progress,
            |batch| async move {
                models.apply(&batch, None).await?;
                Ok::<_, ReplayError>(batch.len() as u64)
            },
        )
        .await?;
        if !dry_run {
            models.replace_snapshot().await?;
        }
        return Ok(ReplayReport {
            events: folded.read,
            applied: folded.applied,
            elapsed: started.elapsed(),
        });
    };
    let lock = try_become_active(database, CHECKPOINT)
        .await?
        .ok_or(ReplayError::ProjectionActive(CHECKPOINT))?;
    if !dry_run {
        create_shadow_tables(pool).await?;
    }
    let shadow = tokio::sync::Mutex::new(ShadowFold::new(pool, database, batch_size));
    let shadow = &shadow;
    let folded = fold_log(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            shadow.lock().await.fold(&batch).await?;
            Ok::<_, ReplayError>(batch.len() as u64)
        },
    )
    .await?;
    if !dry_run {
        shadow.lock().await.finish().await?;
        swap_in_shadow_tables(pool, folded.last, lock.fence()).await?;
    }
    Ok(ReplayReport {
        events: folded.read,
        applied: folded.applied,
        elapsed: started.elapsed(),
    })
}

/// A rebuild keeps up to this many views per event of a batch in memory before it writes
/// them to the shadow tables (10,000 at the CLI's 1,000-event batches).
const VIEWS_IN_MEMORY_PER_BATCH_EVENT: usize = 10;

/// A rebuild's fold. The views being folded stay in memory across batches (an order's saga
/// sits close together in the log, so most views are complete before they are written) and
/// go to the shadow tables in bulk: views new to them by `COPY`, views written before by
/// one `UPDATE`. Nobody else writes the shadow tables, so nothing needs locking, and a view
/// written out and touched again later is read back first. A write runs while the fold goes
/// on (Postgres parses the documents while this process folds the next events); the next
/// write, or a read-back, waits for it.
struct ShadowFold {
    pool: PgPool,
    database: Database,
    views_in_memory: usize,
    views: ViewBatch,
    /// Ids of the order views and pet views in the shadow tables (or being written there).
    written: (HashSet<OrderId>, HashSet<PetId>),
    /// The write under way.
    writing: Option<tokio::task::JoinHandle<Result<(), ReplayError>>>,
}

impl ShadowFold {
    fn new(pool: &PgPool, database: &Database, batch_size: u32) -> Self {
        Self {
            pool: pool.clone(),
            database: database.clone(),
            views_in_memory: VIEWS_IN_MEMORY_PER_BATCH_EVENT * batch_size.max(1) as usize,
            views: ViewBatch::default(),
            written: (HashSet::new(), HashSet::new()),
            writing: None,
        }
    }

    /// Waits for the write under way, if any.
    async fn written(&mut self) -> Result<(), ReplayError> {
        match self.writing.take() {
            Some(writing) => writing.await?,
            None => Ok(()),
        }
    }

    /// Writes the views still in memory and waits for every write.
    async fn finish(&mut self) -> Result<(), ReplayError> {
        self.write_out().await?;
        self.written().await
    }

    async fn fold(&mut self, events: &[stream::RecordedEvent]) -> Result<(), ReplayError> {
        let (order_ids, pet_ids) = ViewBatch::ids(events);
        let orders: Vec<OrderId> = order_ids
            .into_iter()
            .filter(|id| !self.views.orders.contains_key(id) && self.written.0.contains(id))
            .collect();
        let pets: Vec<PetId> = pet_ids
            .into_iter()
            .filter(|id| !self.views.pets.contains_key(id) && self.written.1.contains(id))
            .collect();
        if !orders.is_empty() || !pets.is_empty() {
            self.written().await?;
        }
        if !orders.is_empty() {
            let documents: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
                "SELECT document FROM {} WHERE order_id = ANY($1)",
                SHADOW_TABLES.orders
            ))
            .bind(uuids(&orders))
            .fetch_all(&self.pool)
            .await?;
            for document in documents {
                let view: OrderStatusView =
                    serde_json::from_value(document).map_err(ReadModelError::from)?;
                self.views.orders.insert(view.order_id, Some(view));
            }
        }
        if !pets.is_empty() {
            let documents: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
                "SELECT document FROM {} WHERE pet_id = ANY($1)",
                SHADOW_TABLES.pets
            ))
            .bind(slugs(&pets))
            .fetch_all(&self.pool)
            .await?;
            for document in documents {
                let view: PetView =
                    serde_json::from_value(document).map_err(ReadModelError::from)?;
                self.views.pets.insert(view.id.clone(), Some(view));
            }
        }
        for poison in self.views.fold(events) {
            crate::store::set_aside(&self.database, &poison).await?;
        }
        if self.views.orders.len() + self.views.pets.len() >= self.views_in_memory {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Starts writing every view in memory to the shadow tables, in one transaction, once the
    /// write before has finished; forgets them.
    async fn write_out(&mut self) -> Result<(), ReplayError> {
        let views = std::mem::take(&mut self.views);
        let (mut new_orders, mut old_orders) = (Vec::new(), Vec::new());
        for view in views.orders.into_values().flatten() {
            if self.written.0.contains(&view.order_id) {
                old_orders.push(view);
            } else {
                self.written.0.insert(view.order_id);
                new_orders.push(view);
            }
        }
        let (mut new_pets, mut old_pets) = (Vec::new(), Vec::new());
        for view in views.pets.into_values().flatten() {
            if self.written.1.contains(&view.id) {
                old_pets.push(view);
            } else {
                self.written.1.insert(view.id.clone());
                new_pets.push(view);
            }
        }
        self.written().await?;
        let pool = self.pool.clone();
        self.writing = Some(tokio::spawn(async move {
            let mut transaction = petstore_event_store::database::begin(&pool).await?;
            // The shadow tables are thrown away unless the swap, which commits durably (and
            // so flushes the WAL of every write before it), goes through.
            petstore_event_store::database::commit_lazily(&mut transaction).await?;
            copy_views(&mut transaction, &new_orders, &new_pets).await?;
            write_views(&mut transaction, SHADOW_TABLES, &old_orders, &old_pets).await?;
            transaction.commit().await?;
            Ok(())
        }));
        Ok(())
    }
}

/// `COPY`s views that are not in the shadow tables yet into them.
async fn copy_views(
    connection: &mut sqlx::PgConnection,
    orders: &[OrderStatusView],
    pets: &[PetView],
) -> Result<(), ReplayError> {
    if !orders.is_empty() {
        let mut rows = CopyRows::with_capacity(orders.len() * 512);
        for view in orders {
            rows.text(&view.order_id.to_string())
                .number(view.position.global_position)
                .document(view)?
                .end_row();
        }
        rows.send(
            connection,
            &format!(
                "COPY {} (order_id, last_sequence, document) FROM STDIN",
                SHADOW_TABLES.orders
            ),
        )
        .await?;
    }
    if !pets.is_empty() {
        let mut rows = CopyRows::with_capacity(pets.len() * 512);
        for view in pets {
            rows.text(view.id.as_str())
                .text(view.category.as_str())
                .number(view.price.amount_minor)
                .text(view.availability.as_str())
                .number(view.version)
                .document(view)?
                .end_row();
        }
        rows.send(
            connection,
            &format!(
                "COPY {} (pet_id, category, price_minor, availability, last_sequence, document) FROM STDIN",
                SHADOW_TABLES.pets
            ),
        )
        .await?;
    }
    Ok(())
}

/// Rows in `COPY`'s text format, built in one buffer: each field escaped as it is written
/// (a document serialized straight into it), without a string per field.
struct CopyRows(Vec<u8>);

impl CopyRows {
    fn with_capacity(bytes: usize) -> Self {
        Self(Vec::with_capacity(bytes))
    }

    /// A text field.
    fn text(&mut self, text: &str) -> &mut Self {
        escape_into(&mut self.0, text.as_bytes());
        self.0.push(b'\t');
        self
    }

    /// A number field.
    fn number(&mut self, number: i64) -> &mut Self {
        self.0.extend_from_slice(number.to_string().as_bytes());
        self.0.push(b'\t');
        self
    }

    /// A JSON document field.
    fn document(&mut self, view: &impl serde::Serialize) -> Result<&mut Self, ReplayError> {
        serde_json::to_writer(Escaping(&mut self.0), view).map_err(ReadModelError::from)?;
        self.0.push(b'\t');
        Ok(self)
    }

    /// Ends the row (its last field's tab becomes the newline).
    fn end_row(&mut self) {
        if let Some(last) = self.0.last_mut() {
            *last = b'\n';
        }
    }

    async fn send(
        self,
        connection: &mut sqlx::PgConnection,
        copy: &str,
    ) -> Result<(), sqlx::Error> {
        let mut copy = connection.copy_in_raw(copy).await?;
        copy.send(self.0).await?;
        copy.finish().await?;
        Ok(())
    }
}

/// Appends `bytes` to `into` as a field of `COPY`'s text format: backslash, tab, newline and
/// carriage return escaped (all ASCII: UTF-8 sequences never contain them).
fn escape_into(into: &mut Vec<u8>, bytes: &[u8]) {
    let mut plain = 0;
    for (index, byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        into.extend_from_slice(&bytes[plain..index]);
        into.extend_from_slice(escaped);
        plain = index + 1;
    }
    into.extend_from_slice(&bytes[plain..]);
}

/// Escapes what a serializer writes through it.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::io::Write for Escaping<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        escape_into(self.0, bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn create_shadow_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut transaction = petstore_event_store::database::begin(pool).await?;
    for (shadow, live) in [
        (SHADOW_TABLES.orders, LIVE_TABLES.orders),
        (SHADOW_TABLES.pets, LIVE_TABLES.pets),
    ] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
            .execute(&mut *transaction)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {shadow} (LIKE {live} INCLUDING ALL)"
        ))
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await
}

async fn swap_in_shadow_tables(
    pool: &PgPool,
    last: StreamPosition,
    fence: Option<&Fence>,
) -> Result<(), ReplayError> {
    let mut transaction = petstore_event_store::database::begin(pool).await?;
    sqlx::query(&format!(
        "LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE",
        LIVE_TABLES.orders, LIVE_TABLES.pets
    ))
    .execute(&mut *transaction)
    .await?;
    for (shadow, live) in [
        (SHADOW_TABLES.orders, LIVE_TABLES.orders),
        (SHADOW_TABLES.pets, LIVE_TABLES.pets),
    ] {
        sqlx::query(&format!("DROP TABLE {live}"))
            .execute(&mut *transaction)
            .await?;
        sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {live}"))
            .execute(&mut *transaction)
            .await?;
    }
    stream::save_checkpoint_in(&mut transaction, CHECKPOINT, last, fence)
        .await
        .map_err(ReadModelError::from)?;
    // Live order updates re-read every order they follow; queries waiting for a write
    // learn where the swapped-in views stand.
    crate::changes::notify(
        &mut transaction,
        vec![
            (crate::store::ORDER_CHANGES_CHANNEL, "*".to_owned()),
            crate::progress::notice(last),
        ],
    )
    .await?;
    transaction.commit().await?;
    Ok(())
}

/// Rebuilds the Redis views under a shadow prefix and moves them over the live keys.
pub async fn rebuild_redis(
    database: &Database,
    live: &RedisViews,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let name = crate::redis::CHECKPOINT;
    let _lock = try_become_active(database, name)
        .await?
        .ok_or(ReplayError::ProjectionActive(name))?;
    let shadow_prefix = format!("{}:replay", live.cache().prefix());
    let shadow = live.with_prefix(&shadow_prefix);
    if !dry_run {
        live.cache()
            .delete_namespace(&shadow_prefix)
            .await
            .map_err(ReadModelError::from)?;
    }
    let shadow_ref = &shadow;
    let folded = fold_log(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            shadow_ref.apply(&batch, None).await?;
            Ok::<_, ReplayError>(batch.len() as u64)
        },
    )
    .await?;
    if !dry_run {
        live.cache()
            .adopt_namespace(
                &shadow_prefix,
                &RedisViews::VIEW_PATTERNS,
                &[RedisViews::GENERATION],
            )
            .await
            .map_err(ReadModelError::from)?;
        live.mark_owned(&database.store_id().await?).await?;
    }
    Ok(ReplayReport {
        events: folded.read,
        applied: folded.applied,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_escape_what_copy_text_format_reads_specially() {
        let mut rows = CopyRows::with_capacity(64);
        rows.text("plain")
            .number(-7)
            .text("{\"note\":\"a\\\\b\\n\"}\t\r\n")
            .document(&serde_json::json!({"note": "tab\there"}))
            .expect("serialized")
            .end_row();
        assert_eq!(
            String::from_utf8(rows.0).expect("utf-8"),
            "plain\t-7\t{\"note\":\"a\\\\\\\\b\\\\n\"}\\t\\r\\n\t{\"note\":\"tab\\\\there\"}\n"
        );
    }
}
