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
    /// `up` when every component is up, else `down`.
    pub status: String,
    /// The service version.
    pub version: String,
    /// Each component by name: `event_store`, `read_models`, `projector`.
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
    if let Some(progress) = &state.projector {
        let progress = *progress.borrow();
        let detail = if progress.caught_up {
            "caught up"
        } else {
            "catching up"
        };
        components.insert(
            "projector".to_owned(),
            component(true, "in-process", Some(detail.to_owned())),
        );
    }
    let all_up = components
        .values()
        .all(|component| component.status == "up");
    HealthReport {
        status: if all_up { "up" } else { "down" }.to_owned(),
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

/// The status of every component. 200 when all are up, 503 otherwise.
#[utoipa::path(
    get,
    path = "/petstore-domain/health",
    tag = "health",
    responses(
        (status = 200, description = "Every component is up", body = HealthReport),
        (status = 503, description = "A component is down", body = HealthReport),
    )
)]
pub async fn health(State(state): State<QueryState>) -> impl IntoResponse {
    let report = report(&state).await;
    let status = if report.status == "up" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
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
    if report.status != "up" {
        return Err(Problem::unavailable(
            "a component is down; see /petstore-domain/health",
        ));
    }
    let caught_up = state
        .projector
        .as_ref()
        .is_none_or(|progress| progress.borrow().caught_up);
    if !caught_up {
        return Err(Problem::unavailable(
            "the read models are still being rebuilt",
        ));
    }
    Ok(Json(report))
}
