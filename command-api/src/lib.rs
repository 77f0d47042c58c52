//! The command side of the petstore's HTTP API: POST routes that turn requests into domain
//! commands and append the events they decide.
//!
//! It loads aggregates from the event store (never from read models), derives order ids from
//! `Idempotency-Key`s so a retried POST lands on the same order, and seeds the demo catalog.
//!
//! # Layout
//! - [`orders`]: `POST /petstore-domain/orders` and its legacy alias `/create-order`.
//! - [`catalog`]: creating the demo pets as events on first start.

use axum::Router;
use petstore_platform::event_store::EventStore;

pub mod catalog;
pub mod orders;

/// What the command handlers need.
#[derive(Clone)]
pub struct CommandState {
    /// Where aggregates are loaded from and events appended to.
    pub store: EventStore,
}

/// Every command route, with its state applied.
pub fn router(state: CommandState) -> Router {
    orders::router().with_state(state)
}

/// The OpenAPI description of the command routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(orders::place_order, orders::create_order_legacy),
    components(schemas(
        orders::PlaceOrderBody,
        orders::OrderAccepted,
        petstore_platform::http::ProblemDocument
    ))
)]
pub struct CommandApiDoc;
