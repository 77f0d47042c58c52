//! Health: components, liveness, readiness. Mounted in every process, whatever its roles,
//! so probes work for a projector-only or saga-only process too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use petstore_platform::database::Database;
use petstore_platform::http::{Json, Problem, ProblemDocument};
use petstore_platform::stream::StreamPosition;
use petstore_projector::{ProjectorProgress, ReadModels, RedisViews};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

/// What the health routes look at.
#[derive(Clone)]
pub struct HealthState {
    /// The event store's database.
    pub database: Database,
    /// The read models (in the same database on Postgres).
    pub read_models: ReadModels,
    /// Redis, when configured.
    pub redis: Option<RedisViews>,
    /// The progress of each projection this process runs, by name (`read_models`,
    /// `redis`, `kafka`).
    pub projections: Vec<(&'static str, watch::Receiver<ProjectorProgress>)>,
    /// Whether this process serves queries: then it is ready only once the read models
    /// have caught up with what was committed when it started.
    pub serves_queries: bool,
    /// On Postgres, where every process shares the read models: the head of the log when
    /// this process started, which their checkpoint must reach. `None` for the embedded
    /// store, whose in-memory read models this process's own projector rebuilds.
    ready_at: Option<StreamPosition>,
    /// Set once the read models have caught up: readiness does not flap afterwards (a
    /// projector taking over, a burst of writes).
    caught_up: Arc<AtomicBool>,
}

impl HealthState {
    /// Health of a process over `database` and `read_models`, running `projections`.
    /// `ready_at`: on Postgres, the head of the log at start-up, which the shared read
    /// models' checkpoint must reach for readiness; `None` on the embedded store, whose
    /// in-memory read models this process's own projector rebuilds.
    pub fn new(
        database: Database,
        read_models: ReadModels,
        redis: Option<RedisViews>,
        projections: Vec<(&'static str, watch::Receiver<ProjectorProgress>)>,
        serves_queries: bool,
        ready_at: Option<StreamPosition>,
    ) -> Self {
        Self {
            database,
            read_models,
            redis,
            projections,
            serves_queries,
            ready_at,
            caught_up: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the read models have caught up since start-up: their shared checkpoint has
    /// reached the head seen at start-up (Postgres), or this process's own projector says
    /// so (embedded store).
    async fn read_models_caught_up(&self) -> Result<bool, Problem> {
        if self.caught_up.load(Ordering::Acquire) {
            return Ok(true);
        }
        let caught_up = match self.ready_at {
            Some(head) => {
                let position = self.read_models.position().await.map_err(|error| {
                    tracing::warn!(%error, "readiness check failed");
                    Problem::unavailable("the read models do not answer")
                })?;
                position >= head
            }
            None => self
                .projections
                .iter()
                .filter(|(name, _)| *name == petstore_projector::read_models::CHECKPOINT)
                .all(|(_, progress)| progress.borrow().caught_up),
        };
        if caught_up {
            self.caught_up.store(true, Ordering::Release);
        }
        Ok(caught_up)
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

async fn report(state: &HealthState) -> HealthReport {
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
pub async fn health(State(state): State<HealthState>) -> impl IntoResponse {
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
pub async fn ready(State(state): State<HealthState>) -> Result<Json<HealthReport>, Problem> {
    let report = report(&state).await;
    if report.status == "down" {
        return Err(Problem::unavailable(
            "a component is down; see /petstore-domain/health",
        ));
    }
    if state.serves_queries && !state.read_models_caught_up().await? {
        return Err(Problem::unavailable(
            "the read models are still catching up",
        ));
    }
    Ok(Json(report))
}
