//! The command side of the petstore's HTTP API: POST routes that turn requests into domain
//! commands and append the events they decide.
//!
//! It loads aggregates from the event store (never from read models), derives order ids from
//! `Idempotency-Key`s so a retried POST lands on the same order, and seeds the demo catalog.
//!
//! # Layout
//! - [`orders`]: `POST /petstore-domain/orders` and its legacy alias `/create-order`.
//! - [`payments`]: `POST /petstore-domain/payments` and its legacy alias `/process-payment`.
//! - [`catalog`]: creating the demo pets as events on first start.
//! - `error`: what the routes cannot accept, as problems ([`CommandError`]).
//!
//! The providers it calls (`POST /payments` charges through the payment gateway) are the
//! saga crate's ([`petstore_saga::providers`]).

use std::sync::Arc;

use axum::Router;
use petstore_event_store::store::EventStore;
use petstore_saga::providers;
use petstore_settings::ProvidersSettings;
use petstore_telemetry::metrics::Metrics;

pub mod catalog;
mod error;
pub mod orders;
pub mod payments;

pub use error::CommandError;

/// What the command handlers need.
#[derive(Clone)]
pub struct CommandState {
    /// Where aggregates are loaded from and events appended to.
    pub store: EventStore,
    /// The live settings (flags decide how orders are paid).
    pub live: petstore_live_settings::Live,
    /// The providers' settings (whether failures may be simulated).
    pub providers: ProvidersSettings,
    /// How the providers are called.
    pub policies: petstore_resilience::Policies,
    /// The payment gateway customers pay through.
    pub payments: Arc<providers::Payments>,
    /// Metrics.
    pub metrics: Metrics,
}

impl CommandState {
    /// The `X-Consistency-Token` of an aggregate's event: a query that sends it back waits
    /// until the read model shows that event. `None` when the event cannot be found (it was
    /// just appended, so only a failing database explains that; the response goes out
    /// without a token rather than failing).
    pub async fn consistency_token(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: usize,
    ) -> Option<axum::http::HeaderValue> {
        let sequence = i64::try_from(sequence).ok()?;
        match petstore_event_store::stream::position_of(
            self.store.database(),
            aggregate_type,
            aggregate_id,
            sequence,
        )
        .await
        {
            Ok(Some(position)) => axum::http::HeaderValue::from_str(&position.to_token()).ok(),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "cannot read the position for a consistency token");
                None
            }
        }
    }
}

/// Every command route, with its state applied.
pub fn router(state: CommandState) -> Router {
    orders::router().merge(payments::router()).with_state(state)
}

/// The OpenAPI description of the command routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        orders::place_order,
        orders::create_order_legacy,
        payments::pay_order,
        payments::process_payment_legacy
    ),
    components(schemas(
        orders::PlaceOrderBody,
        orders::SimulatedFailureHeader,
        orders::OrderAccepted,
        payments::PaymentBody,
        payments::PaymentResult,
        payments::AmountBody,
        petstore_web::ProblemDocument
    ))
)]
pub struct CommandApiDoc;
