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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Json, Problem, ProblemDocument};
pub use petstore_event_store::database::EventStoreHealth;
pub use petstore_telemetry::health::{ComponentHealth, HealthCheck};

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
