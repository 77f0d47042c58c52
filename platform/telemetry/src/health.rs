//! What a component of a process reports of its health: [`HealthCheck`], implemented by the
//! event store, the read models, Redis, each projection and the saga runner, and served by the
//! web edge's health routes.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The health of one component.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComponentHealth {
    /// `up` or `down`.
    pub status: String,
    /// Which implementation (`postgres`, `sqlite`, `memory`, `redis`, `in-process`).
    pub kind: String,
    /// What is wrong, when down; or a note (`caught up`, `lagging: ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ComponentHealth {
    /// A component that works.
    pub fn up(kind: &str, detail: Option<String>) -> Self {
        Self::new(true, kind, detail)
    }

    /// A component that does not.
    pub fn down(kind: &str, detail: impl Into<String>) -> Self {
        Self::new(false, kind, Some(detail.into()))
    }

    /// Up or down as `up` says.
    pub fn new(up: bool, kind: &str, detail: Option<String>) -> Self {
        Self {
            status: if up { "up" } else { "down" }.to_owned(),
            kind: kind.to_owned(),
            detail,
        }
    }

    /// Whether it works.
    pub fn is_up(&self) -> bool {
        self.status == "up"
    }
}

/// One component of a process, as the health routes see it.
pub trait HealthCheck: Send + Sync + 'static {
    /// Its name in the report (`event_store`, `projection:kafka`, `saga_runner`, ...).
    fn name(&self) -> String;

    /// Whether the service is `down` (503) while this component is; otherwise it is only
    /// `degraded`.
    fn essential(&self) -> bool;

    /// Its health now.
    fn check(&self) -> BoxFuture<'_, ComponentHealth>;

    /// Whether the process may receive traffic as far as this component is concerned:
    /// `Err(why)` while it may not (read models still catching up).
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}
