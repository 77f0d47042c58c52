//! Health: component checks, liveness and readiness. Every process mounts [`router`],
//! whatever its roles, and registers a [`HealthCheck`] for each component it runs: the event
//! store (here), the read models, Redis and each projection (the projector's), the saga
//! runner (the command side's). A projector-only or saga-only process answers probes too.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::database::Database;
use crate::http::{Json, Problem, ProblemDocument};

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

    fn is_up(&self) -> bool {
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

/// The event store's database answers.
pub struct EventStoreHealth(pub Database);

impl HealthCheck for EventStoreHealth {
    fn name(&self) -> String {
        "event_store".to_owned()
    }

    fn essential(&self) -> bool {
        true
    }

    fn check(&self) -> BoxFuture<'_, ComponentHealth> {
        Box::pin(async {
            match self.0.ping().await {
                Ok(()) => ComponentHealth::up(self.0.engine(), None),
                Err(error) => {
                    tracing::warn!(%error, "event store health check failed");
                    ComponentHealth::down(self.0.engine(), "unreachable")
                }
            }
        })
    }
}

/// The components of one process.
#[derive(Clone, Default)]
pub struct HealthState {
    checks: Vec<Arc<dyn HealthCheck>>,
}

impl HealthState {
    /// Adds a component.
    pub fn add(&mut self, check: impl HealthCheck) {
        self.checks.push(Arc::new(check));
    }

    /// Every component's health and the verdict.
    pub async fn report(&self) -> HealthReport {
        let results =
            futures::future::join_all(self.checks.iter().map(|check| check.check())).await;
        let mut essential_up = true;
        let mut all_up = true;
        let mut components = BTreeMap::new();
        for (check, health) in self.checks.iter().zip(results) {
            if !health.is_up() {
                all_up = false;
                essential_up &= !check.essential();
            }
            components.insert(check.name(), health);
        }
        let status = match (essential_up, all_up) {
            (true, true) => "up",
            (true, false) => "degraded",
            (false, _) => "down",
        };
        HealthReport {
            status: status.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            components,
        }
    }
}

/// The health routes, under `/petstore-domain/health` and at the root (`/health`, for probes).
pub fn router(state: HealthState) -> Router {
    let mut router = Router::new();
    for prefix in ["/petstore-domain", ""] {
        router = router
            .route(&format!("{prefix}/health"), get(health))
            .route(&format!("{prefix}/health/live"), get(live))
            .route(&format!("{prefix}/health/ready"), get(ready));
    }
    router.with_state(state)
}

/// The service's health.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthReport {
    /// `up`, `degraded` (only a non-essential component is down: Redis, a secondary
    /// projection, the saga runner) or `down`.
    pub status: String,
    /// The service version.
    pub version: String,
    /// Each component by name: `event_store`, `read_models`, `redis`,
    /// `projection:{read_models,redis,kafka}` and `saga_runner` for what this process runs.
    pub components: BTreeMap<String, ComponentHealth>,
}

/// The status of every component: `up`; `degraded` (200) when only a non-essential component
/// (Redis, the Redis or Kafka projection, the saga runner) is down; `down` (503) when the
/// event store or the read models are.
#[utoipa::path(
    get,
    path = "/petstore-domain/health",
    tag = "health",
    responses(
        (status = 200, description = "Up, or degraded (a non-essential component is down)", body = HealthReport),
        (status = 503, description = "An essential component is down", body = HealthReport),
    )
)]
pub async fn health(State(state): State<HealthState>) -> impl IntoResponse {
    let report = state.report().await;
    let status = if report.status == "down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(report))
}

/// The answer of the liveness probe.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always `up`: the process answers.
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/petstore-domain/health/live",
    tag = "health",
    responses((status = 200, description = "The process is alive", body = Liveness))
)]
pub async fn live() -> Json<Liveness> {
    Json(Liveness {
        status: "up".to_owned(),
    })
}

/// Readiness: no essential component is down and every component is ready (in a process
/// that serves queries, the read models have caught up since start-up).
#[utoipa::path(
    get,
    path = "/petstore-domain/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = HealthReport),
        (status = 503, description = "Not ready yet", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn ready(State(state): State<HealthState>) -> Result<Json<HealthReport>, Problem> {
    let report = state.report().await;
    if report.status == "down" {
        return Err(Problem::unavailable(
            "a component is down; see /petstore-domain/health",
        ));
    }
    for check in &state.checks {
        check.ready().await.map_err(Problem::unavailable)?;
    }
    Ok(Json(report))
}

/// The OpenAPI description of the health routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(health, live, ready),
    components(schemas(HealthReport, ComponentHealth, Liveness, ProblemDocument))
)]
pub struct HealthApiDoc;
