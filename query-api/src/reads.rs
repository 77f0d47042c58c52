//! Where each query reads from: Redis first when it is configured and healthy, the read-model
//! database otherwise; and read-your-writes: a query that carries an `X-Consistency-Token`
//! waits (bounded) until the read-model database has reached it, and so does a read of an
//! order the event store holds but the read models do not show yet.

use std::time::Duration;

use crate::error::failed;
use axum::extract::FromRequestParts;
use axum::http::header::{HeaderValue, RETRY_AFTER};
use axum::http::request::Parts;
use petstore_domain::{order, OrderId, PetId};
use petstore_event_store::dead_letters;
use petstore_event_store::stream::{self, StreamPosition};
use petstore_read_models::views::Attention;
use petstore_read_models::{
    BrowseFilter, BrowsePage, CachedBrowse, OrderStatusView, PetView, RedisViews,
};
use petstore_web::{Problem, CONSISTENCY_TOKEN_HEADER};
use tokio::time::Instant;

use crate::QueryState;

/// The `X-Consistency-Token` a client sent back, if any.
#[derive(Debug, Clone, Copy)]
pub struct ConsistencyToken(pub Option<StreamPosition>);

impl<S: Send + Sync> FromRequestParts<S> for ConsistencyToken {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(&CONSISTENCY_TOKEN_HEADER) {
            None => Ok(Self(None)),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(StreamPosition::from_token)
                .map(|position| Self(Some(position)))
                .ok_or_else(|| {
                    Problem::bad_request("X-Consistency-Token is not a token this API issued")
                }),
        }
    }
}

impl QueryState {
    /// The order's open dead letters, for its status (what holds it back). When they cannot
    /// be read the status is answered without them, and the failure logged.
    pub async fn attention(&self, order_id: &OrderId) -> Vec<Attention> {
        let lookup = async {
            if !self.dead_letters.any_open(&self.database).await? {
                return Ok(Vec::new());
            }
            dead_letters::open_for_order(&self.database, order_id).await
        };
        match lookup.await {
            Ok(letters) => letters
                .into_iter()
                .map(|letter| Attention {
                    dead_letter_id: letter.id,
                    consumer: letter.consumer,
                    event: format!("{} {}", letter.event_type, letter.event_version),
                    error: letter.error,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "the order's dead letters could not be read; its status is answered without them");
                Vec::new()
            }
        }
    }

    /// What Redis answered for `view`, if it had it; a failed read is logged and counted as
    /// a fallback, and the database answers.
    fn redis_answer<T>(
        &self,
        view: &'static str,
        read: Result<Option<T>, petstore_read_models::ReadModelError>,
    ) -> Option<T> {
        let (result, value) = match read {
            Ok(Some(value)) => ("hit", Some(value)),
            Ok(None) => ("miss", None),
            Err(error) => {
                tracing::debug!(%error, "redis read failed; reading the database");
                ("fallback", None)
            }
        };
        self.metrics.cache_read(view, result);
        value
    }

    /// Waits until the read-model database reflects `token`; 409 with `Retry-After` past the
    /// configured bound.
    pub(crate) async fn wait_for(&self, token: StreamPosition) -> Result<(), Problem> {
        let deadline = Instant::now() + self.consistency_wait;
        if self.progress.reached(token, deadline).await {
            Ok(())
        } else {
            Err(self.not_reached())
        }
    }

    /// The answer past the consistency bound: 409, retry in a second.
    fn not_reached(&self) -> Problem {
        Problem::conflict(format!(
            "the read model has not reached your write within {} ms; retry shortly",
            self.consistency_wait.as_millis()
        ))
        .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// An order's status view: from Redis when it has it, else from the read-model database
    /// (see [`Self::projected_order`] for an order neither shows yet).
    pub async fn order(
        &self,
        order_id: &OrderId,
        token: ConsistencyToken,
    ) -> Result<Option<OrderStatusView>, Problem> {
        if let Some(token) = token.0 {
            self.wait_for(token).await?;
            return self.projected_order(order_id, None).await;
        }
        if let Some(redis) = &self.redis {
            if let Some(view) = self.redis_answer("order", redis.order(order_id).await) {
                return Ok(Some(view));
            }
        }
        self.projected_order(order_id, self.redis.as_ref()).await
    }

    /// An order's view in the read-model database. An order it does not show but the event
    /// store holds (accepted a moment ago) is waited for, bounded as for a consistency token,
    /// until the database reaches its first event or `redis`, when given, shows it, whichever
    /// comes first; `None` at once for an order the store does not hold.
    pub(crate) async fn projected_order(
        &self,
        order_id: &OrderId,
        redis: Option<&RedisViews>,
    ) -> Result<Option<OrderStatusView>, Problem> {
        if let Some(view) = self.read_models.order(order_id).await.map_err(failed)? {
            return Ok(Some(view));
        }
        let Some(placed) = self.placed_at(order_id).await? else {
            return Ok(None);
        };
        let deadline = Instant::now() + self.consistency_wait;
        loop {
            if let Some(redis) = redis {
                if let Ok(Some(view)) = redis.order(order_id).await {
                    return Ok(Some(view));
                }
            }
            // Redis is looked at again every 5 ms; the database once it has got there.
            let look_again = match redis {
                Some(_) => deadline.min(Instant::now() + Duration::from_millis(5)),
                None => deadline,
            };
            if self.progress.reached(placed, look_again).await {
                return self.read_models.order(order_id).await.map_err(failed);
            }
            if Instant::now() >= deadline {
                return Err(self.not_reached());
            }
        }
    }

    /// Where the order's first event stands in the stream, if the event store holds the
    /// order: one lookup by the events' primary key, so a random id costs no wait.
    async fn placed_at(&self, order_id: &OrderId) -> Result<Option<StreamPosition>, Problem> {
        stream::position_of(
            &self.database,
            order::AGGREGATE_TYPE,
            &order_id.to_string(),
            1,
        )
        .await
        .map_err(failed)
    }

    /// A pet's view.
    pub async fn pet(
        &self,
        pet_id: &PetId,
        token: ConsistencyToken,
    ) -> Result<Option<PetView>, Problem> {
        if let Some(token) = token.0 {
            self.wait_for(token).await?;
        } else if let Some(redis) = &self.redis {
            if let Some(view) = self.redis_answer("pet", redis.pet(pet_id).await) {
                return Ok(Some(view));
            }
        }
        self.read_models.pet(pet_id).await.map_err(failed)
    }

    /// A browse page: from the Redis cache when current, else from the database (and then
    /// cached). With a token, from the database once it has reached the token.
    pub async fn browse(
        &self,
        filter: &BrowseFilter,
        token: ConsistencyToken,
    ) -> Result<BrowsePage, Problem> {
        let slot = match (token.0, &self.redis) {
            (Some(token), _) => {
                self.wait_for(token).await?;
                None
            }
            (None, None) => None,
            (None, Some(redis)) => match redis.cached_browse(filter).await {
                Ok(CachedBrowse::Hit(page)) => {
                    self.metrics.cache_read("browse", "hit");
                    return Ok(page);
                }
                Ok(CachedBrowse::Miss(slot)) => {
                    self.metrics.cache_read("browse", "miss");
                    Some((redis, slot))
                }
                Err(error) => {
                    tracing::debug!(%error, "redis read failed; reading the database");
                    self.metrics.cache_read("browse", "fallback");
                    None
                }
            },
        };
        let Some((redis, slot)) = slot else {
            return self.read_models.browse(filter).await.map_err(failed);
        };
        let database_at = self.read_models.position().await.map_err(failed)?;
        let page = self.read_models.browse(filter).await.map_err(failed)?;
        if let Err(error) = redis.cache_browse(slot, &page, database_at).await {
            tracing::debug!(%error, "caching a browse page failed");
        }
        Ok(page)
    }
}
