//! The query side of the petstore's HTTP API: GET routes over the read models.
//!
//! It reads what the projector maintains (and, for audit trails, the event store itself)
//! and never writes events.
//!
//! # Layout
//! - [`pets`]: browsing the catalog (`/pets/browse`, legacy `/browse-pets`) and pet details.
//! - [`orders`]: order status.
//! - [`updates`]: live order updates (WebSocket and Server-Sent Events).
//! - [`audit`]: the audit trail of an order or a correlation id, from the event store.
//! - `error`: what fails below the routes, as problems.
//! - [`reads`]: Redis first, database as fallback; read-your-writes tokens.

use std::time::Duration;

use axum::Router;
use petstore_event_store::database::Database;
use petstore_read_models::{ReadModels, RedisViews};
use petstore_telemetry::metrics::Metrics;

pub use error::QueryError;

pub mod audit;
mod error;
pub mod orders;
pub mod pets;
pub mod reads;
pub mod updates;

/// What the query handlers need.
#[derive(Clone)]
pub struct QueryState {
    /// The read models served.
    pub read_models: ReadModels,
    /// The same views in Redis, read first when configured.
    pub redis: Option<RedisViews>,
    /// The event store's database, for audit trails.
    pub database: Database,
    /// How far the read models got ([`ReadModels::progress`]): what a query waiting for
    /// its reader's write waits on.
    pub progress: petstore_read_models::Progress,
    /// How long a query with a consistency token waits for the read model.
    pub consistency_wait: Duration,
    /// Metrics (Redis hits, misses and fallbacks).
    pub metrics: Metrics,
    /// The live settings (the browse flags).
    pub live: petstore_live_settings::Live,
    /// The live order updates' hub.
    pub updates: updates::OrderUpdates,
    /// Whether any dead letter is open (the status route then looks the order's up).
    pub dead_letters: petstore_event_store::dead_letters::OpenGate,
}

/// Every query route, with its state applied. (Health is every process's:
/// `petstore_web::health`.)
pub fn router(state: QueryState) -> Router {
    Router::new()
        .merge(pets::router())
        .merge(orders::router())
        .merge(updates::router())
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
        updates::order_updates,
        audit::order_audit,
    ),
    components(schemas(
        pets::BrowseResponse,
        pets::Personalization,
        petstore_read_models::PetView,
        petstore_read_models::MoneyView,
        petstore_read_models::OrderStatusView,
        petstore_read_models::views::SagaStepView,
        petstore_read_models::StatusChange,
        updates::OrderUpdate,
        petstore_event_store::stream::StreamPosition,
        audit::AuditTrail,
        audit::AuditEntry,
        petstore_web::ProblemDocument,
    ))
)]
pub struct QueryApiDoc;
