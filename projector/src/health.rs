//! Health checks of what the projector owns: the read models (and when a process serving
//! them is ready), Redis, and each projection this process runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use petstore_event_store::stream::StreamPosition;
use petstore_telemetry::health::{ComponentHealth, HealthCheck};
use tokio::sync::watch;

use petstore_read_models::{ReadModels, RedisViews};

use crate::ProjectorProgress;

/// When a process serving queries is ready, as far as the read models go.
pub enum ReadModelsReadiness {
    /// It does not serve queries: always ready.
    NotServing,
    /// Postgres, where every process shares the read models: ready once their checkpoint
    /// reaches this position (the head of the log when the process started).
    SharedCheckpoint(StreamPosition),
    /// The embedded store, whose in-memory read models this process's own projector
    /// rebuilds: ready once it has caught up.
    OwnProjector(watch::Receiver<ProjectorProgress>),
}

/// The read models answer; readiness as [`ReadModelsReadiness`] says. Readiness latches:
/// once caught up, a projector taking over or a burst of writes does not make it flap.
pub struct ReadModelsHealth {
    read_models: ReadModels,
    readiness: ReadModelsReadiness,
    caught_up: Arc<AtomicBool>,
}

impl ReadModelsHealth {
    /// Health of `read_models`, ready as `readiness` says.
    pub fn new(read_models: ReadModels, readiness: ReadModelsReadiness) -> Self {
        Self {
            read_models,
            readiness,
            caught_up: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl HealthCheck for ReadModelsHealth {
    fn name(&self) -> String {
        "read_models".to_owned()
    }

    fn essential(&self) -> bool {
        true
    }

    fn check(&self) -> BoxFuture<'_, ComponentHealth> {
        Box::pin(async {
            match self.read_models.position().await {
                Ok(position) => ComponentHealth::up(
                    self.read_models.kind(),
                    Some(format!("at global position {}", position.global_position)),
                ),
                Err(error) => {
                    tracing::warn!(%error, "read model health check failed");
                    ComponentHealth::down(self.read_models.kind(), "unreachable")
                }
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async {
            if self.caught_up.load(Ordering::Acquire) {
                return Ok(());
            }
            let caught_up = match &self.readiness {
                ReadModelsReadiness::NotServing => true,
                ReadModelsReadiness::SharedCheckpoint(head) => {
                    let position = self.read_models.position().await.map_err(|error| {
                        tracing::warn!(%error, "readiness check failed");
                        "the read models do not answer".to_owned()
                    })?;
                    position >= *head
                }
                ReadModelsReadiness::OwnProjector(progress) => progress.borrow().caught_up,
            };
            if !caught_up {
                return Err("the read models are still catching up".to_owned());
            }
            self.caught_up.store(true, Ordering::Release);
            Ok(())
        })
    }
}

/// Redis answers (queries fall back to the database while it does not).
pub struct RedisHealth(pub RedisViews);

impl HealthCheck for RedisHealth {
    fn name(&self) -> String {
        "redis".to_owned()
    }

    fn essential(&self) -> bool {
        false
    }

    fn check(&self) -> BoxFuture<'_, ComponentHealth> {
        Box::pin(async {
            match self.0.cache().ping().await {
                Ok(()) => ComponentHealth::up("redis", None),
                Err(error) => {
                    tracing::warn!(%error, "redis health check failed");
                    ComponentHealth::down(
                        "redis",
                        "unreachable; queries are served from the database",
                    )
                }
            }
        })
    }
}

/// A projection this process runs: active or standby, caught up, lagging or stalled.
pub struct ProjectionHealth {
    /// `read_models`, `redis` or `kafka`.
    pub name: &'static str,
    /// Its progress.
    pub progress: watch::Receiver<ProjectorProgress>,
}

impl HealthCheck for ProjectionHealth {
    fn name(&self) -> String {
        format!("projection:{}", self.name)
    }

    fn essential(&self) -> bool {
        self.name == petstore_read_models::store::CHECKPOINT
    }

    fn check(&self) -> BoxFuture<'_, ComponentHealth> {
        let progress = *self.progress.borrow();
        let stopped = self.progress.has_changed().is_err();
        Box::pin(async move {
            if stopped {
                return ComponentHealth::down("in-process", "down: the projector stopped");
            }
            let detail = if !progress.active {
                "standby: another instance is active".to_owned()
            } else if progress.failing {
                "stalled: retrying from its checkpoint".to_owned()
            } else if let Some(lagging) = progress.lag.lagging() {
                lagging
            } else if progress.caught_up {
                "caught up".to_owned()
            } else {
                "catching up".to_owned()
            };
            ComponentHealth::new(!progress.failing, "in-process", Some(detail))
        })
    }
}
