//! The query side of the petstore's HTTP API: GET routes over the read models, and health.
//!
//! It reads what the projector maintains (and, for audit trails, the event store itself)
//! and never writes events.
//!
//! # Layout
//! - [`pets`]: browsing the catalog (`/pets/browse`, legacy `/browse-pets`) and pet details.
//! - [`orders`]: order status.
//! - [`audit`]: the audit trail of an order or a correlation id, from the event store.
//! - [`health`]: component health, liveness and readiness.
//! - [`reads`]: Redis first, database as fallback; read-your-writes tokens.

use std::time::Duration;

use axum::Router;
use petstore_platform::database::Database;
use petstore_projector::{ReadModels, RedisViews};

pub mod audit;
pub mod health;
pub mod orders;
pub mod pets;
pub mod reads;

/// What the query handlers need.
#[derive(Clone)]
pub struct QueryState {
    /// The read models served.
    pub read_models: ReadModels,
    /// The same views in Redis, read first when configured.
    pub redis: Option<RedisViews>,
    /// The event store's database, for audit trails.
    pub database: Database,
    /// How long a query with a consistency token waits for the read model.
    pub consistency_wait: Duration,
}

/// Every query route, with its state applied. The health routes are separate
/// ([`health::router`]): every process mounts them, whatever its roles.
pub fn router(state: QueryState) -> Router {
    Router::new()
        .merge(pets::router())
        .merge(orders::router())
        .merge(audit::router())
        .with_state(state)
}

/// The OpenAPI description of the query routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        pets::browse,
        pets::browse_legacy,
        pets::pet_details,
        orders::order_status,
        audit::order_audit,
        health::health,
        health::live,
        health::ready,
    ),
    components(schemas(
        pets::BrowseResponse,
        petstore_projector::PetView,
        petstore_projector::MoneyView,
        petstore_projector::OrderStatusView,
        petstore_projector::views::SagaStepView,
        petstore_platform::stream::StreamPosition,
        audit::AuditTrail,
        audit::AuditEntry,
        health::HealthReport,
        health::ComponentHealth,
        health::Liveness,
        petstore_platform::http::ProblemDocument,
    ))
)]
pub struct QueryApiDoc;
