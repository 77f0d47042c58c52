//! The Redis projection: order status and pet views in Redis, for fast reads, and the cache
//! of browse results.
//!
//! It folds the stream like every read model (same [`ViewBatch`] fold) and writes each
//! batch's views together with its checkpoint in one MULTI/EXEC, so Redis never holds half a
//! batch. Pet changes bump the catalog generation, which is part of every cached browse key:
//! a cached page is never served after a pet it shows changed. Redis down stalls this
//! projection only; queries fall back to the read-model database meanwhile, and Redis
//! catches up from its checkpoint when it is back (or rebuilds from the start if it lost its
//! data).

use std::time::Duration;

use petstore_domain::{OrderId, PetId};
use petstore_event_store::database::{Database, Fence};
use petstore_event_store::dead_letters::{self, DeadLetter};
use petstore_event_store::stream::{RecordedEvent, StreamPosition};
use petstore_redis::{Cache, CacheError};

use crate::store::{BrowseFilter, BrowsePage};
use crate::views::{OrderStatusView, PetView, ViewBatch};
use crate::{ReadModelError, Refolded};

/// The checkpoint name of the Redis projection.
pub const CHECKPOINT: &str = "redis";

/// Order and pet views in Redis.
#[derive(Debug, Clone)]
pub struct RedisViews {
    cache: Cache,
    browse_ttl: Duration,
    /// The event store these views are of: the projection claims the prefix for it each
    /// time it (re)starts (see [`Self::claim`]).
    store: Option<std::sync::Arc<str>>,
    /// Where events that cannot be folded are set aside (the event store's database);
    /// without one such an event fails its batch.
    dead_letters: Option<Database>,
}

impl RedisViews {
    /// The key patterns (after the prefix) of the views; a replay replaces all of them.
    pub const VIEW_PATTERNS: [&'static str; 2] = ["order:*", "pet:*"];
    /// The catalog generation (after the prefix): part of every cached browse key, bumped by
    /// every pet change and by a replay.
    pub const GENERATION: &'static str = "catalog:generation";
    /// The id of the event store whose views these are (after the prefix).
    pub const STORE: &'static str = "store";

    /// Views in `cache`; browse pages live `browse_ttl`.
    pub fn new(cache: Cache, browse_ttl: Duration) -> Self {
        Self {
            cache,
            browse_ttl,
            store: None,
            dead_letters: None,
        }
    }

    /// Sets events that cannot be folded aside in `database`, and moves on.
    pub fn with_dead_letters(mut self, database: Database) -> Self {
        self.dead_letters = Some(database);
        self
    }

    /// The views of the event store `store_id`: the projection claims the prefix for it
    /// whenever it (re)starts, so views another store left are deleted and rebuilt even when
    /// Redis was unreachable at start-up.
    pub fn bound_to(mut self, store_id: &str) -> Self {
        self.store = Some(store_id.into());
        self
    }

    /// The same views under another key prefix (a replay's shadow copy).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            cache: self.cache.with_prefix(prefix),
            browse_ttl: self.browse_ttl,
            store: self.store.clone(),
            dead_letters: self.dead_letters.clone(),
        }
    }

    /// The Redis connection.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    fn order_key(&self, order_id: &OrderId) -> String {
        self.cache.key(&format!("order:{order_id}"))
    }

    fn pet_key(&self, pet_id: &PetId) -> String {
        self.cache.key(&format!("pet:{pet_id}"))
    }

    /// The token of the projection lock's holder the views accept writes from.
    fn fence_key(&self) -> String {
        self.cache.key("fence:redis")
    }

    fn checkpoint_key(&self) -> String {
        self.cache.key("checkpoint:redis")
    }

    fn generation_key(&self) -> String {
        self.cache.key(Self::GENERATION)
    }

    fn store_key(&self) -> String {
        self.cache.key(Self::STORE)
    }

    /// Whose views the prefix holds, compared with the event store `store_id`.
    pub async fn owner(&self, store_id: &str) -> Result<Owner, ReadModelError> {
        match self.cache.get(&self.store_key()).await? {
            Some(recorded) if recorded == store_id => Ok(Owner::This),
            Some(recorded) => Ok(Owner::Another(Some(recorded))),
            // Views without a recorded store: left by a release before store identities, or
            // by another store; either way not known to be this store's.
            None if self.cache.get(&self.checkpoint_key()).await?.is_some() => {
                Ok(Owner::Another(None))
            }
            None => Ok(Owner::Nobody),
        }
    }

    /// Makes the prefix this store's: records `store_id`, deleting first whatever another
    /// store left (the projection then rebuilds from the start of this store's log). Run it
    /// holding the projection's lock. Returns what the prefix held before.
    pub async fn claim(&self, store_id: &str) -> Result<Owner, ReadModelError> {
        let owner = self.owner(store_id).await?;
        if let Owner::Another(_) = &owner {
            self.cache.delete_namespace(self.cache.prefix()).await?;
        }
        if owner != Owner::This {
            self.mark_owned(store_id).await?;
        }
        Ok(owner)
    }

    /// Records that the views under the prefix are `store_id`'s (a replay rebuilt them).
    pub async fn mark_owned(&self, store_id: &str) -> Result<(), ReadModelError> {
        Ok(self.cache.set(&self.store_key(), store_id).await?)
    }

    /// An order's status view, if Redis has it.
    pub async fn order(
        &self,
        order_id: &OrderId,
    ) -> Result<Option<OrderStatusView>, ReadModelError> {
        let document = self.cache.get(&self.order_key(order_id)).await?;
        Ok(document
            .map(|text| serde_json::from_str(&text))
            .transpose()?)
    }

    /// A pet's view, if Redis has it.
    pub async fn pet(&self, pet_id: &PetId) -> Result<Option<PetView>, ReadModelError> {
        let document = self.cache.get(&self.pet_key(pet_id)).await?;
        Ok(document
            .map(|text| serde_json::from_str(&text))
            .transpose()?)
    }

    async fn browse_key(&self, filter: &BrowseFilter) -> Result<String, CacheError> {
        let generation = self
            .cache
            .get(&self.generation_key())
            .await?
            .unwrap_or_default();
        Ok(self.cache.key(&format!(
            "browse:{generation}:{}:{}:{}:{}:{}:{}:{}",
            filter.category.map_or("", |category| category.as_str()),
            filter
                .min_price
                .map(|price| price.to_string())
                .unwrap_or_default(),
            filter
                .max_price
                .map(|price| price.to_string())
                .unwrap_or_default(),
            filter.availability.as_deref().unwrap_or_default(),
            filter.after.as_ref().map_or("", PetId::as_str),
            filter.limit,
            filter.premium.key(),
        )))
    }

    /// The cached browse page for `filter` if one is current; otherwise the slot a page read
    /// from the read-model database may be cached in (see [`Self::cache_browse`]).
    pub async fn cached_browse(
        &self,
        filter: &BrowseFilter,
    ) -> Result<CachedBrowse, ReadModelError> {
        let key = self.browse_key(filter).await?;
        if let Some(text) = self.cache.get(&key).await? {
            let (pets, next_cursor): (Vec<PetView>, Option<PetId>) = serde_json::from_str(&text)?;
            return Ok(CachedBrowse::Hit(BrowsePage { pets, next_cursor }));
        }
        // Read after the generation: this projection has applied at least every pet change
        // that generation stands for.
        let as_of = self.position().await?;
        Ok(CachedBrowse::Miss(BrowseSlot { key, as_of }))
    }

    /// Caches `page` in `slot`, if the database it was read from had reached `database_at`
    /// (read before the page) at least as far as this projection had when the slot was
    /// taken. A database behind Redis would otherwise give a page without the pet changes
    /// that made the current generation, cached under that generation for its whole TTL.
    /// Returns whether the page was cached.
    pub async fn cache_browse(
        &self,
        slot: BrowseSlot,
        page: &BrowsePage,
        database_at: StreamPosition,
    ) -> Result<bool, ReadModelError> {
        if database_at < slot.as_of {
            return Ok(false);
        }
        let text = serde_json::to_string(&(&page.pets, &page.next_cursor))?;
        self.cache
            .set_expiring(&slot.key, &text, self.browse_ttl)
            .await?;
        Ok(true)
    }
}

/// Whose views a Redis prefix holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Nobody's: no views, no checkpoint.
    Nobody,
    /// This event store's.
    This,
    /// Another event store's (its id, when recorded).
    Another(Option<String>),
}

/// A browse lookup in Redis.
#[derive(Debug)]
pub enum CachedBrowse {
    /// A current cached page.
    Hit(BrowsePage),
    /// Nothing cached: where to cache a page read elsewhere.
    Miss(BrowseSlot),
}

/// Where a browse page may be cached: the key of the catalog generation current at lookup,
/// and how far the Redis projection had got then.
#[derive(Debug)]
pub struct BrowseSlot {
    key: String,
    as_of: StreamPosition,
}

impl RedisViews {
    /// The position after the last event its views reflect. Asked holding the projection's
    /// lock: it claims the prefix for its store first.
    pub async fn position(&self) -> Result<StreamPosition, ReadModelError> {
        // The projector asks holding the projection's lock: the moment to claim the prefix.
        if let Some(store) = &self.store {
            if let Owner::Another(other) = self.claim(store).await? {
                tracing::warn!(
                    prefix = self.cache.prefix(),
                    other = other.as_deref().unwrap_or("unknown"),
                    store = &**store,
                    "the Redis prefix held another event store's views: deleted; rebuilding from this store's log"
                );
            }
        }
        match self.cache.get(&self.checkpoint_key()).await? {
            Some(text) => Ok(serde_json::from_str(&text)?),
            None => Ok(StreamPosition::START),
        }
    }

    /// Folds the views a dead letter concerns again from the log and writes them (with
    /// `fence`, like a batch).
    pub async fn refold(
        &self,
        database: &Database,
        letter: &DeadLetter,
        fence: Option<&Fence>,
    ) -> Result<Refolded, ReadModelError> {
        let (mut batch, events) = crate::refold::history(database, letter).await?;
        let wanted: (Vec<OrderId>, Vec<PetId>) = (
            batch.orders.keys().cloned().collect(),
            batch.pets.keys().cloned().collect(),
        );
        if let Some(poison) = batch.fold(&events).into_iter().next() {
            return Ok(Refolded::StillFailing(poison.error.to_string()));
        }
        let mut values = Vec::new();
        for id in &wanted.0 {
            if let Some(view) = batch.orders.remove(id).flatten() {
                values.push((
                    self.order_key(&view.order_id),
                    serde_json::to_string(&view)?,
                ));
            }
        }
        let mut counters = Vec::new();
        for id in &wanted.1 {
            if let Some(view) = batch.pets.remove(id).flatten() {
                values.push((self.pet_key(&view.id), serde_json::to_string(&view)?));
                counters = vec![self.generation_key()];
            }
        }
        let fence_key = self.fence_key();
        self.cache
            .write_atomically(
                &values,
                &counters,
                fence.map(|fence| (fence_key.as_str(), fence.token)),
            )
            .await?;
        Ok(Refolded::Done)
    }

    /// Makes `fence` the one its keys accept writes from.
    pub async fn raise_fence(&self, fence: &Fence) -> Result<(), ReadModelError> {
        Ok(self
            .cache
            .raise_fence(&self.fence_key(), fence.token)
            .await?)
    }

    /// Applies a batch, in order, and moves its checkpoint past it, in one atomic write
    /// (with `fence`: only while it is still the projection lock's token); the position it
    /// then reflects.
    pub async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ReadModelError> {
        let Some(last) = events.last() else {
            return Ok(None);
        };
        let (order_ids, pet_ids) = ViewBatch::ids(events);
        let order_keys: Vec<String> = order_ids.iter().map(|id| self.order_key(id)).collect();
        let pet_keys: Vec<String> = pet_ids.iter().map(|id| self.pet_key(id)).collect();
        let mut batch = ViewBatch::default();
        for (id, document) in order_ids
            .into_iter()
            .zip(self.cache.get_many(&order_keys).await?)
        {
            let view = document
                .map(|text| serde_json::from_str(&text))
                .transpose()?;
            batch.orders.insert(id, view);
        }
        for (id, document) in pet_ids
            .into_iter()
            .zip(self.cache.get_many(&pet_keys).await?)
        {
            let view = document
                .map(|text| serde_json::from_str(&text))
                .transpose()?;
            batch.pets.insert(id, view);
        }
        let poisoned = batch.fold(events);
        match &self.dead_letters {
            Some(database) => {
                for poison in &poisoned {
                    let id = dead_letters::record(
                        database,
                        CHECKPOINT,
                        poison.event,
                        poison.order_id.as_ref(),
                        &poison.error.to_string(),
                    )
                    .await
                    .map_err(ReadModelError::from)?;
                    tracing::warn!(dead_letter = id, error = %poison.error, "event set aside as a dead letter; the Redis views move on");
                }
            }
            None => {
                if let Some(poison) = poisoned.into_iter().next() {
                    return Err(poison.error.into());
                }
            }
        }
        let (orders, pets) = batch.into_views();
        let mut values = Vec::with_capacity(orders.len() + pets.len() + 1);
        for view in &orders {
            values.push((self.order_key(&view.order_id), serde_json::to_string(view)?));
        }
        for view in &pets {
            values.push((self.pet_key(&view.id), serde_json::to_string(view)?));
        }
        values.push((
            self.checkpoint_key(),
            serde_json::to_string(&last.position)?,
        ));
        let counters = if pets.is_empty() {
            Vec::new()
        } else {
            vec![self.generation_key()]
        };
        let fence_key = self.fence_key();
        self.cache
            .write_atomically(
                &values,
                &counters,
                fence.map(|fence| (fence_key.as_str(), fence.token)),
            )
            .await?;
        Ok(Some(last.position))
    }
}
