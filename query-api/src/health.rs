//! Health: components, liveness, readiness.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use petstore_platform::http::{Json, Problem, ProblemDocument};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::QueryState;

/// The health routes, under `/petstore-domain/health` and at the root (`/health`, for probes).
pub fn router() -> Router<QueryState> {
    let mut router = Router::new();
    for prefix in ["/petstore-domain", ""] {
        router = router
            .route(&format!("{prefix}/health"), get(health))
            .route(&format!("{prefix}/health/live"), get(live))
            .route(&format!("{prefix}/health/ready"), get(ready));
    }
    router
}

/// The health of one component.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ComponentHealth {
    /// `up` or `down`.
    pub status: String,
    /// Which implementation (`postgres`, `sqlite`, `memory`).
    pub kind: String,
    /// What is wrong, when down; or a note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The service's health.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthReport {
    /// `up`, `degraded` (only Redis or a secondary projection is down) or `down`.
    pub status: String,
    /// The service version.
    pub version: String,
    /// Each component by name: `event_store`, `read_models`, `redis`, and
    /// `projection:{read_models,redis,kafka}` for the projections this process runs.
    pub components: BTreeMap<String, ComponentHealth>,
}

async fn report(state: &QueryState) -> HealthReport {
    let mut components = BTreeMap::new();
    let store = match state.database.ping().await {
        Ok(()) => component(true, state.database.engine(), None),
        Err(error) => {
            tracing::warn!(%error, "event store health check failed");
            component(
                false,
                state.database.engine(),
                Some("unreachable".to_owned()),
            )
        }
    };
    components.insert("event_store".to_owned(), store);
    let read_models = match state.read_models.position().await {
        Ok(position) => component(
            true,
            state.read_models.kind(),
            Some(format!("at global position {}", position.global_position)),
        ),
        Err(error) => {
            tracing::warn!(%error, "read model health check failed");
            component(
                false,
                state.read_models.kind(),
                Some("unreachable".to_owned()),
            )
        }
    };
    components.insert("read_models".to_owned(), read_models);
    for (name, progress) in &state.projections {
        let progress = *progress.borrow();
        let detail = if !progress.active {
            "standby: another instance is active"
        } else if progress.failing {
            "stalled: retrying from its checkpoint"
        } else if progress.caught_up {
            "caught up"
        } else {
            "catching up"
        };
        components.insert(
            format!("projection:{name}"),
            component(!progress.failing, "in-process", Some(detail.to_owned())),
        );
    }
    if let Some(redis) = &state.redis {
        let redis_health = match redis.cache().ping().await {
            Ok(()) => component(true, "redis", None),
            Err(error) => {
                tracing::warn!(%error, "redis health check failed");
                component(
                    false,
                    "redis",
                    Some("unreachable; queries are served from the database".to_owned()),
                )
            }
        };
        components.insert("redis".to_owned(), redis_health);
    }
    let essential_up = ["event_store", "read_models", "projection:read_models"]
        .iter()
        .all(|name| {
            components
                .get(*name)
                .is_none_or(|component| component.status == "up")
        });
    let all_up = components
        .values()
        .all(|component| component.status == "up");
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

fn component(up: bool, kind: &str, detail: Option<String>) -> ComponentHealth {
    ComponentHealth {
        status: if up { "up" } else { "down" }.to_owned(),
        kind: kind.to_owned(),
        detail,
    }
}

/// The status of every component: `up`; `degraded` (200) when only Redis or a secondary
/// projection (Redis, Kafka) is down and queries are served from the database; `down` (503)
/// when the event store or the read models are.
#[utoipa::path(
    get,
    path = "/petstore-domain/health",
    tag = "health",
    responses(
        (status = 200, description = "Up, or degraded (Redis or a secondary projection down)", body = HealthReport),
        (status = 503, description = "A component is down", body = HealthReport),
    )
)]
pub async fn health(State(state): State<QueryState>) -> impl IntoResponse {
    let report = report(&state).await;
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

/// Readiness: the event store answers and the read models have caught up since start-up.
#[utoipa::path(
    get,
    path = "/petstore-domain/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = HealthReport),
        (status = 503, description = "Not ready yet", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn ready(State(state): State<QueryState>) -> Result<Json<HealthReport>, Problem> {
    let report = report(&state).await;
    if report.status == "down" {
        return Err(Problem::unavailable(
            "a component is down; see /petstore-domain/health",
        ));
    }
    let caught_up = state
        .projections
        .iter()
        .filter(|(name, _)| *name == petstore_projector::read_models::CHECKPOINT)
        .all(|(_, progress)| progress.borrow().caught_up);
    if !caught_up {
        return Err(Problem::unavailable(
            "the read models are still being rebuilt",
        ));
    }
    Ok(Json(report))
}
