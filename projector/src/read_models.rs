//! The read models and Redis's views as projections: the projector's loop writes them
//! through `petstore-read-models`.

use petstore_event_store::database::{Database, Fence};
use petstore_event_store::dead_letters::DeadLetter;
use petstore_event_store::stream::{RecordedEvent, StreamPosition};
use petstore_read_models::{ReadModels, RedisViews, Refolded};

use crate::projection::{Projection, ProjectionError};

impl Projection for ReadModels {
    fn name(&self) -> &'static str {
        petstore_read_models::store::CHECKPOINT
    }

    async fn position(&self) -> Result<StreamPosition, ProjectionError> {
        Ok(ReadModels::position(self).await?)
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        ReadModels::apply(self, events, fence).await?;
        self.save_snapshot(false).await;
        Ok(events.last().map(|event| event.position))
    }

    async fn settle(
        &self,
        _fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        self.save_snapshot(true).await;
        Ok(None)
    }

    async fn refold(
        &self,
        database: &Database,
        letter: &DeadLetter,
        fence: Option<&Fence>,
    ) -> Result<Refolded, ProjectionError> {
        Ok(ReadModels::refold(self, database, letter, fence).await?)
    }
}

impl Projection for RedisViews {
    fn name(&self) -> &'static str {
        petstore_read_models::redis::CHECKPOINT
    }

    async fn position(&self) -> Result<StreamPosition, ProjectionError> {
        Ok(RedisViews::position(self).await?)
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        Ok(RedisViews::apply(self, events, fence).await?)
    }

    async fn raise_fence(&self, fence: &Fence) -> Result<(), ProjectionError> {
        Ok(RedisViews::raise_fence(self, fence).await?)
    }

    async fn refold(
        &self,
        database: &Database,
        letter: &DeadLetter,
        fence: Option<&Fence>,
    ) -> Result<Refolded, ProjectionError> {
        Ok(RedisViews::refold(self, database, letter, fence).await?)
    }
}
