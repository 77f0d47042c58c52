//! Where the read models live and the queries the query API runs on them.
//!
//! Postgres: `order_status_view` and `pet_catalog_view`, updated batch by batch in one
//! transaction together with the `read_models` checkpoint; the transaction also notifies
//! [`ORDER_CHANGES_CHANNEL`] with the ids of the orders it changed and
//! [`crate::progress::PROGRESS_CHANNEL`] with the new position, delivered by Postgres at
//! commit to every process listening. Memory (embedded mode): maps behind a lock, with the
//! same notice on an in-process channel, written behind to a snapshot in the SQLite file
//! (`read_model_snapshot`): a start loads it and folds only the rest of the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use petstore_domain::{CustomerId, OrderId, PetId};
use petstore_event_store::database::{Database, Fence};
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, RwLock};

use petstore_event_store::dead_letters::{self, DeadLetter};

pub use crate::browse::{BrowseFilter, BrowsePage, PremiumFilter};
pub use crate::changes::{OrderChangeFeed, OrderChanges, ORDER_CHANGES_CHANNEL};

use crate::changes::{notify, order_notices, ChangeNotices, Feed};
use crate::listing::{placed_at, OrderFilter, OrderPage, ViewStatus};
use crate::progress::{self, Progress};
use crate::refold;
use crate::snapshot::{self, Loaded};
use crate::views::{OrderStatusView, PetView, Poisoned, ViewBatch};
use crate::{ReadModelError, Refolded};

/// Sets a skipped event aside as a dead letter of the read models.
pub(crate) async fn set_aside(
    database: &Database,
    poison: &Poisoned<'_>,
) -> Result<(), ReadModelError> {
    let id = dead_letters::record(
        database,
        CHECKPOINT,
        poison.event,
        poison.order_id.as_ref(),
        &poison.error.to_string(),
    )
    .await?;
    tracing::warn!(dead_letter = id, error = %poison.error, "event set aside as a dead letter; the read models move on");
    Ok(())
}

/// The checkpoint name of the read models' projection.
pub const CHECKPOINT: &str = "read_models";

/// The in-memory read models and the position they reflect.
#[derive(Debug)]
pub struct MemoryState {
    orders: HashMap<OrderId, OrderStatusView>,
    pets: BTreeMap<PetId, PetView>,
    position: StreamPosition,
    /// The position, told to [`Progress`].
    progress: watch::Sender<StreamPosition>,
    changes: ChangeNotices,
    /// The embedded store: where events that cannot be folded are set aside, and where the
    /// snapshot is written.
    database: Database,
    /// Views changed since the snapshot was last written, and when that was.
    unsaved_orders: HashSet<OrderId>,
    unsaved_pets: HashSet<PetId>,
    saved_at: Instant,
}

impl MemoryState {
    /// Stores folded views, to be written to the snapshot.
    fn insert(&mut self, orders: Vec<OrderStatusView>, pets: Vec<PetView>) {
        for view in orders {
            self.unsaved_orders.insert(view.order_id);
            self.orders.insert(view.order_id, view);
        }
        for view in pets {
            self.unsaved_pets.insert(view.id.clone());
            self.pets.insert(view.id.clone(), view);
        }
    }
}

/// The read models, on Postgres or in memory.
#[derive(Debug, Clone)]
pub enum ReadModels {
    /// Tables in the Postgres database.
    Postgres(PgPool),
    /// Maps in this process.
    Memory(Arc<RwLock<MemoryState>>),
}

impl ReadModels {
    /// Postgres read models for a Postgres store; in-memory ones for the embedded store,
    /// loaded from its snapshot (they then fold the events after it).
    pub async fn open(database: &Database) -> Result<Self, ReadModelError> {
        Ok(match database {
            Database::Postgres(pool) => Self::Postgres(pool.clone()),
            Database::Sqlite(_) => Self::memory(database, snapshot::load(database).await?),
        })
    }

    /// In-memory read models on the embedded store, starting from `loaded`.
    pub(crate) fn memory(database: &Database, loaded: Loaded) -> Self {
        Self::Memory(Arc::new(RwLock::new(MemoryState {
            orders: loaded.orders,
            pets: loaded.pets,
            position: loaded.position,
            progress: watch::channel(loaded.position).0,
            changes: ChangeNotices::default(),
            database: database.clone(),
            unsaved_orders: HashSet::new(),
            unsaved_pets: HashSet::new(),
            saved_at: Instant::now(),
        })))
    }

    /// Writes the views changed since the last snapshot (embedded) once enough have collected
    /// or the last write is old enough (sooner when `idle`, at the head of the log). A failed
    /// write is logged and tried again later: the views stay right in memory, and a start
    /// meanwhile folds more of the log.
    pub async fn save_snapshot(&self, idle: bool) {
        let Self::Memory(state) = self else {
            return;
        };
        let (pool, position, order_ids, pet_ids, orders, pets) = {
            let mut guard = state.write().await;
            let unsaved = guard.unsaved_orders.len() + guard.unsaved_pets.len();
            let interval = if idle {
                snapshot::IDLE_INTERVAL
            } else {
                snapshot::BUSY_INTERVAL
            };
            let due = unsaved >= snapshot::MAX_UNSAVED
                || (unsaved > 0 && guard.saved_at.elapsed() >= interval);
            let Database::Sqlite(pool) = &guard.database else {
                return;
            };
            if !due {
                return;
            }
            let pool = pool.clone();
            let state = &mut *guard;
            let order_ids = std::mem::take(&mut state.unsaved_orders);
            let pet_ids = std::mem::take(&mut state.unsaved_pets);
            let orders: Vec<OrderStatusView> = order_ids
                .iter()
                .filter_map(|id| state.orders.get(id).cloned())
                .collect();
            let pets: Vec<PetView> = pet_ids
                .iter()
                .filter_map(|id| state.pets.get(id).cloned())
                .collect();
            (pool, state.position, order_ids, pet_ids, orders, pets)
        };
        // In a task of its own: a caller that stops waiting (a bounded shutdown) does not cut
        // the transaction short.
        let written = tokio::spawn(async move {
            snapshot::write(&pool, position, &orders, &pets, snapshot::Write::Changes).await
        })
        .await;
        let mut guard = state.write().await;
        guard.saved_at = Instant::now();
        match written {
            Ok(Ok(true)) => {
                tracing::debug!(
                    global_position = position.global_position,
                    orders = order_ids.len(),
                    pets = pet_ids.len(),
                    "wrote the read-model snapshot"
                );
                return;
            }
            // Another process stored a later snapshot: these views go with the next write.
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "writing the read-model snapshot failed; it is tried again");
            }
            Err(error) => {
                tracing::warn!(%error, "writing the read-model snapshot failed; it is tried again");
            }
        }
        guard.unsaved_orders.extend(order_ids);
        guard.unsaved_pets.extend(pet_ids);
    }

    /// Writes every in-memory view as the embedded store's whole snapshot (a rebuild).
    pub(crate) async fn replace_snapshot(&self) -> Result<(), ReadModelError> {
        let Self::Memory(state) = self else {
            return Ok(());
        };
        let guard = state.read().await;
        let Database::Sqlite(pool) = &guard.database else {
            return Ok(());
        };
        let orders: Vec<OrderStatusView> = guard.orders.values().cloned().collect();
        let pets: Vec<PetView> = guard.pets.values().cloned().collect();
        snapshot::write(
            pool,
            guard.position,
            &orders,
            &pets,
            snapshot::Write::Everything,
        )
        .await?;
        Ok(())
    }

    /// Folds the views a dead letter concerns again from the log ([`crate::refold`]) and
    /// writes them (with `fence`, like a batch).
    pub async fn refold(
        &self,
        database: &Database,
        letter: &DeadLetter,
        fence: Option<&Fence>,
    ) -> Result<Refolded, ReadModelError> {
        let (mut batch, events) = refold::history(database, letter).await?;
        let wanted: (Vec<OrderId>, Vec<PetId>) = (
            batch.orders.keys().cloned().collect(),
            batch.pets.keys().cloned().collect(),
        );
        if let Some(poison) = batch.fold(&events).into_iter().next() {
            return Ok(Refolded::StillFailing(poison.error.to_string()));
        }
        let orders: Vec<OrderStatusView> = wanted
            .0
            .iter()
            .filter_map(|id| batch.orders.remove(id).flatten())
            .collect();
        let pets: Vec<PetView> = wanted
            .1
            .iter()
            .filter_map(|id| batch.pets.remove(id).flatten())
            .collect();
        match self {
            Self::Postgres(pool) => {
                let mut transaction = petstore_event_store::database::begin(pool)
                    .await
                    .map_err(ReadModelError::from)?;
                if let Some(fence) = fence {
                    stream::check_fence_in(&mut transaction, fence)
                        .await
                        .map_err(ReadModelError::from)?;
                }
                sqlx::query(&format!(
                    "DELETE FROM {} WHERE order_id = ANY($1)",
                    LIVE_TABLES.orders
                ))
                .bind(uuids(&wanted.0))
                .execute(&mut *transaction)
                .await
                .map_err(ReadModelError::from)?;
                sqlx::query(&format!(
                    "DELETE FROM {} WHERE pet_id = ANY($1)",
                    LIVE_TABLES.pets
                ))
                .bind(slugs(&wanted.1))
                .execute(&mut *transaction)
                .await
                .map_err(ReadModelError::from)?;
                write_views(&mut transaction, LIVE_TABLES, &orders, &pets).await?;
                let ids: Vec<OrderId> = orders.iter().map(|view| view.order_id).collect();
                notify(&mut transaction, order_notices(&ids).collect()).await?;
                transaction.commit().await.map_err(ReadModelError::from)?;
            }
            Self::Memory(state) => {
                let mut guard = state.write().await;
                let changed: Arc<[OrderId]> = orders.iter().map(|view| view.order_id).collect();
                guard.insert(orders, pets);
                let _ = guard.changes.0.send(changed);
            }
        }
        Ok(Refolded::Done)
    }

    /// `postgres` or `memory`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Memory(_) => "memory",
        }
    }

    /// The stream position the read models reflect.
    pub async fn position(&self) -> Result<StreamPosition, ReadModelError> {
        match self {
            Self::Postgres(pool) => {
                Ok(stream::load_checkpoint(&Database::Postgres(pool.clone()), CHECKPOINT).await?)
            }
            Self::Memory(state) => Ok(state.read().await.position),
        }
    }

    /// Their [`Progress`], as their commits tell it (on Postgres, whichever process
    /// projects: this follows the notices on a connection of its own, as long as a copy of
    /// the returned value lives).
    pub async fn progress(&self) -> Result<Progress, ReadModelError> {
        match self {
            Self::Postgres(pool) => progress::follow_postgres(pool, CHECKPOINT).await,
            Self::Memory(state) => Ok(Progress(state.read().await.progress.subscribe())),
        }
    }

    /// Applies a batch of events, in order, and moves the checkpoint past the last one,
    /// atomically: either all of it is visible afterwards or none of it. With `fence`
    /// (Postgres), nothing is written unless it is still the projection lock's token.
    pub async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<(), ReadModelError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        match self {
            Self::Postgres(pool) => apply_postgres(pool, events, last.position, fence).await,
            Self::Memory(state) => {
                // Fold copies first so a decode error leaves the state untouched.
                let mut guard = state.write().await;
                let (order_ids, pet_ids) = ViewBatch::ids(events);
                let mut batch = ViewBatch {
                    orders: order_ids
                        .into_iter()
                        .map(|id| {
                            let view = guard.orders.get(&id).cloned();
                            (id, view)
                        })
                        .collect(),
                    pets: pet_ids
                        .into_iter()
                        .map(|id| {
                            let view = guard.pets.get(&id).cloned();
                            (id, view)
                        })
                        .collect(),
                };
                for poison in &batch.fold(events) {
                    set_aside(&guard.database, poison).await?;
                }
                let (orders, pets) = batch.into_views();
                let changed: Arc<[OrderId]> = orders.iter().map(|view| view.order_id).collect();
                guard.insert(orders, pets);
                guard.position = last.position;
                guard.progress.send_replace(last.position);
                if !changed.is_empty() {
                    // Nobody listening is fine: the notices are for live updates only.
                    let _ = guard.changes.0.send(changed);
                }
                Ok(())
            }
        }
    }

    /// The status view of an order.
    pub async fn order(
        &self,
        order_id: &OrderId,
    ) -> Result<Option<OrderStatusView>, ReadModelError> {
        match self {
            Self::Postgres(pool) => {
                let document: Option<serde_json::Value> = sqlx::query_scalar(
                    "SELECT document FROM order_status_view WHERE order_id = $1",
                )
                .bind(order_id.as_uuid())
                .fetch_optional(pool)
                .await?;
                Ok(document.map(serde_json::from_value).transpose()?)
            }
            Self::Memory(state) => Ok(state.read().await.orders.get(order_id).cloned()),
        }
    }

    /// The status views of `order_ids` that exist.
    pub async fn orders(
        &self,
        order_ids: &[OrderId],
    ) -> Result<Vec<OrderStatusView>, ReadModelError> {
        match self {
            Self::Postgres(pool) => {
                let documents: Vec<serde_json::Value> = sqlx::query_scalar(
                    "SELECT document FROM order_status_view WHERE order_id = ANY($1)",
                )
                .bind(uuids(order_ids))
                .fetch_all(pool)
                .await?;
                Ok(documents
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<_, _>>()?)
            }
            Self::Memory(state) => {
                let guard = state.read().await;
                Ok(order_ids
                    .iter()
                    .filter_map(|id| guard.orders.get(id).cloned())
                    .collect())
            }
        }
    }

    /// A page of the orders `filter` admits, newest first: by the position of the event that
    /// placed each.
    pub async fn list_orders(&self, filter: &OrderFilter) -> Result<OrderPage, ReadModelError> {
        let limit = filter.limit.max(1) as usize;
        let orders = match self {
            Self::Postgres(pool) => {
                let among = filter
                    .among
                    .as_ref()
                    .map(|ids| ids.iter().map(OrderId::as_uuid).collect::<Vec<_>>());
                let documents: Vec<serde_json::Value> = sqlx::query_scalar(
                    "SELECT document FROM order_status_view
                      WHERE ($1::text IS NULL OR document->>'status' = $1)
                        AND ($2::text IS NULL OR document->>'customer_id' = $2)
                        AND ($3::timestamptz IS NULL OR (document->>'created_at')::timestamptz >= $3)
                        AND ($4::timestamptz IS NULL OR (document->>'created_at')::timestamptz < $4)
                        AND ($5::uuid[] IS NULL OR order_id = ANY($5))
                        AND ($6::bigint IS NULL
                             OR (document->'status_history'->0->'position'->>'global_position')::bigint < $6)
                      ORDER BY (document->'status_history'->0->'position'->>'global_position')::bigint DESC
                      LIMIT $7",
                )
                .bind(filter.status.map(ViewStatus::as_str))
                .bind(filter.customer.as_ref().map(CustomerId::as_str))
                .bind(filter.created_from)
                .bind(filter.created_to)
                .bind(among)
                .bind(filter.before)
                .bind(limit as i64 + 1)
                .fetch_all(pool)
                .await?;
                documents
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<Vec<OrderStatusView>, _>>()?
            }
            Self::Memory(state) => {
                let guard = state.read().await;
                let mut orders: Vec<OrderStatusView> = guard
                    .orders
                    .values()
                    .filter(|view| {
                        filter.before.is_none_or(|before| placed_at(view) < before)
                            && filter
                                .among
                                .as_ref()
                                .is_none_or(|among| among.contains(&view.order_id))
                            && filter.admits(view)
                    })
                    .cloned()
                    .collect();
                orders.sort_unstable_by_key(|view| std::cmp::Reverse(placed_at(view)));
                orders.truncate(limit + 1);
                orders
            }
        };
        Ok(OrderPage::of(orders, limit))
    }

    /// A feed of the orders whose views change from now on. On Postgres it holds a
    /// connection of its own, listening on [`ORDER_CHANGES_CHANNEL`].
    pub async fn order_changes(&self) -> Result<OrderChangeFeed, ReadModelError> {
        match self {
            Self::Postgres(pool) => {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(ORDER_CHANGES_CHANNEL).await?;
                Ok(OrderChangeFeed(Feed::Postgres(listener)))
            }
            Self::Memory(state) => Ok(OrderChangeFeed(Feed::Memory(
                state.read().await.changes.0.subscribe(),
            ))),
        }
    }

    /// The categories of the pets `customer_id` ordered (cancelled orders aside, compensating
    /// ones too), with how
    /// many orders each, most ordered first.
    pub async fn ordered_categories(
        &self,
        customer_id: &CustomerId,
    ) -> Result<Vec<(String, i64)>, ReadModelError> {
        match self {
            Self::Postgres(pool) => Ok(sqlx::query_as(
                "SELECT p.category, count(*) AS orders
                   FROM order_status_view o
                   JOIN pet_catalog_view p ON p.pet_id = o.document->>'pet_id'
                  WHERE o.document->>'customer_id' = $1 AND o.document->>'status' NOT IN ('cancelled', 'compensating')
                  GROUP BY p.category
                  ORDER BY orders DESC, p.category",
            )
            .bind(customer_id.as_str())
            .fetch_all(pool)
            .await?),
            Self::Memory(state) => {
                let guard = state.read().await;
                let mut counts: HashMap<String, i64> = HashMap::new();
                for order in guard.orders.values() {
                    if order.customer_id != *customer_id
                        || matches!(order.status.as_str(), "cancelled" | "compensating") {
                        continue;
                    }
                    if let Some(pet) = guard.pets.get(&order.pet_id) {
                        *counts.entry(pet.category.clone()).or_default() += 1;
                    }
                }
                let mut ranked: Vec<(String, i64)> = counts.into_iter().collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                Ok(ranked)
            }
        }
    }

    /// A pet of the catalog.
    pub async fn pet(&self, pet_id: &PetId) -> Result<Option<PetView>, ReadModelError> {
        match self {
            Self::Postgres(pool) => {
                let document: Option<serde_json::Value> =
                    sqlx::query_scalar("SELECT document FROM pet_catalog_view WHERE pet_id = $1")
                        .bind(pet_id.as_str())
                        .fetch_optional(pool)
                        .await?;
                Ok(document.map(serde_json::from_value).transpose()?)
            }
            Self::Memory(state) => Ok(state.read().await.pets.get(pet_id).cloned()),
        }
    }

    /// One page of pets matching `filter`, ordered by id.
    pub async fn browse(&self, filter: &BrowseFilter) -> Result<BrowsePage, ReadModelError> {
        let limit = filter.limit.max(1) as usize;
        let mut pets = match self {
            Self::Postgres(pool) => {
                let documents: Vec<serde_json::Value> = sqlx::query_scalar(
                    "SELECT document FROM pet_catalog_view
                      WHERE ($1::text IS NULL OR category = $1)
                        AND ($2::bigint IS NULL OR price_minor >= $2)
                        AND ($3::bigint IS NULL OR price_minor <= $3)
                        AND ($4::text IS NULL OR availability = $4)
                        AND ($5::text IS NULL OR pet_id > $5)
                        AND ($7::text IS NULL OR strpos(lower(document->>'breed'), lower($7)) > 0)
                        AND ($8::bigint IS NULL OR (document->>'age_months')::bigint >= $8)
                        AND ($9::bigint IS NULL OR (document->>'age_months')::bigint <= $9)
                        AND ($10::boolean IS NULL OR coalesce((document->>'vaccinated')::boolean, false) = $10)
                      ORDER BY pet_id
                      LIMIT $6",
                )
                .bind(filter.category.map(|category| category.as_str()))
                .bind(filter.min_price)
                .bind(filter.max_price)
                .bind(filter.availability.as_deref())
                .bind(filter.after.as_ref().map(PetId::as_str))
                .bind(limit as i64 + 1)
                .bind(filter.premium.breed.as_deref())
                .bind(filter.premium.min_age_months.map(i64::from))
                .bind(filter.premium.max_age_months.map(i64::from))
                .bind(filter.premium.vaccinated)
                .fetch_all(pool)
                .await?;
                documents
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<Vec<PetView>, _>>()?
            }
            Self::Memory(state) => {
                let guard = state.read().await;
                let start = filter
                    .after
                    .as_ref()
                    .map_or(std::ops::Bound::Unbounded, |after| {
                        std::ops::Bound::Excluded(after.clone())
                    });
                guard
                    .pets
                    .range((start, std::ops::Bound::Unbounded))
                    .map(|(_, pet)| pet)
                    .filter(|pet| {
                        filter
                            .category
                            .is_none_or(|category| pet.category == category.as_str())
                            && filter
                                .min_price
                                .is_none_or(|min| pet.price.amount_minor >= min)
                            && filter
                                .max_price
                                .is_none_or(|max| pet.price.amount_minor <= max)
                            && filter
                                .availability
                                .as_deref()
                                .is_none_or(|wanted| pet.availability == wanted)
                            && filter.premium.admits(pet)
                    })
                    .take(limit + 1)
                    .cloned()
                    .collect()
            }
        };
        let next_cursor = if pets.len() > limit {
            pets.truncate(limit);
            pets.last().map(|pet| pet.id.clone())
        } else {
            None
        };
        Ok(BrowsePage { pets, next_cursor })
    }
}

/// The Postgres tables views are written to: the live ones or a replay's shadow copies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgTables {
    pub(crate) orders: &'static str,
    pub(crate) pets: &'static str,
}

/// The tables queries read.
pub(crate) const LIVE_TABLES: PgTables = PgTables {
    orders: "order_status_view",
    pets: "pet_catalog_view",
};

/// Folds a batch into the live tables and moves the checkpoint to `last`, in one transaction.
async fn apply_postgres(
    pool: &PgPool,
    events: &[RecordedEvent],
    last: StreamPosition,
    fence: Option<&Fence>,
) -> Result<(), ReadModelError> {
    let PgTables {
        orders: orders_table,
        pets: pets_table,
        ..
    } = LIVE_TABLES;
    let (order_ids, pet_ids) = ViewBatch::ids(events);
    let mut transaction = petstore_event_store::database::begin(pool).await?;
    // Read models are derived: a database crash that loses this commit loses its
    // checkpoint with it, and the events are applied again.
    petstore_event_store::database::commit_lazily(&mut transaction).await?;
    let mut batch = ViewBatch::default();
    if !order_ids.is_empty() {
        let documents: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "SELECT document FROM {orders_table} WHERE order_id = ANY($1) FOR UPDATE"
        ))
        .bind(uuids(&order_ids))
        .fetch_all(&mut *transaction)
        .await?;
        for document in documents {
            let view: OrderStatusView = serde_json::from_value(document)?;
            batch.orders.insert(view.order_id, Some(view));
        }
    }
    if !pet_ids.is_empty() {
        let documents: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
            "SELECT document FROM {pets_table} WHERE pet_id = ANY($1) FOR UPDATE"
        ))
        .bind(slugs(&pet_ids))
        .fetch_all(&mut *transaction)
        .await?;
        for document in documents {
            let view: PetView = serde_json::from_value(document)?;
            batch.pets.insert(view.id.clone(), Some(view));
        }
    }
    for poison in batch.fold(events) {
        let id = dead_letters::record_in(
            &mut transaction,
            CHECKPOINT,
            poison.event,
            poison.order_id.as_ref(),
            &poison.error.to_string(),
        )
        .await?;
        tracing::warn!(dead_letter = id, error = %poison.error, "event set aside as a dead letter; the read models move on");
    }
    let (orders, pets) = batch.into_views();
    write_views(&mut transaction, LIVE_TABLES, &orders, &pets).await?;
    stream::save_checkpoint_in(&mut transaction, CHECKPOINT, last, fence).await?;
    // The live updates learn which orders changed, the queries waiting for a write how
    // far the views got.
    let ids: Vec<OrderId> = orders.iter().map(|view| view.order_id).collect();
    let mut notices: Vec<_> = order_notices(&ids).collect();
    notices.push(progress::notice(last));
    notify(&mut transaction, notices).await?;
    transaction.commit().await?;
    Ok(())
}

/// Writes folded views into `tables`, inside `transaction`.
pub(crate) async fn write_views(
    transaction: &mut sqlx::PgConnection,
    tables: PgTables,
    orders: &[OrderStatusView],
    pets: &[PetView],
) -> Result<(), ReadModelError> {
    let PgTables {
        orders: orders_table,
        pets: pets_table,
        ..
    } = tables;
    if !orders.is_empty() {
        // An order view folds events of four aggregates, so its `last_sequence` column holds
        // the global position of the last event applied, not a per-aggregate sequence.
        let ids: Vec<OrderId> = orders.iter().map(|view| view.order_id).collect();
        let versions: Vec<i64> = orders
            .iter()
            .map(|view| view.position.global_position)
            .collect();
        let documents = orders
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(&format!(
            "INSERT INTO {orders_table} (order_id, last_sequence, document)
             SELECT id, version, document::jsonb
               FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]) AS t(id, version, document)
             ON CONFLICT (order_id) DO UPDATE
                SET last_sequence = excluded.last_sequence, document = excluded.document"
        ))
        .bind(uuids(&ids))
        .bind(&versions)
        .bind(&documents)
        .execute(&mut *transaction)
        .await?;
    }
    if !pets.is_empty() {
        let ids: Vec<&str> = pets.iter().map(|view| view.id.as_str()).collect();
        let categories: Vec<&str> = pets.iter().map(|view| view.category.as_str()).collect();
        let prices: Vec<i64> = pets.iter().map(|view| view.price.amount_minor).collect();
        let availability: Vec<&str> = pets.iter().map(|view| view.availability.as_str()).collect();
        let versions: Vec<i64> = pets.iter().map(|view| view.version).collect();
        let documents = pets
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(&format!(
            "INSERT INTO {pets_table} (pet_id, category, price_minor, availability, last_sequence, document)
             SELECT id, category, price, availability, version, document::jsonb
               FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
                    AS t(id, category, price, availability, version, document)
             ON CONFLICT (pet_id) DO UPDATE
                SET category = excluded.category, price_minor = excluded.price_minor,
                    availability = excluded.availability, last_sequence = excluded.last_sequence,
                    document = excluded.document
              WHERE {pets_table}.last_sequence < excluded.last_sequence"
        ))
        .bind(&ids)
        .bind(&categories)
        .bind(&prices)
        .bind(&availability)
        .bind(&versions)
        .bind(&documents)
        .execute(&mut *transaction)
        .await?;
    }
    Ok(())
}

/// Order ids as Postgres binds them.
pub(crate) fn uuids(ids: &[OrderId]) -> Vec<uuid::Uuid> {
    ids.iter().map(OrderId::as_uuid).collect()
}

/// Pet ids as Postgres binds them.
pub(crate) fn slugs(ids: &[PetId]) -> Vec<&str> {
    ids.iter().map(PetId::as_str).collect()
}
