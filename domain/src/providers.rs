//! The external services the saga depends on, as traits. Adapters (in `command-api`)
//! implement them; the domain only states what it needs and what can go wrong.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::values::{Money, OrderId, PetId};

/// Why a provider call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused for good (card declined, address not served). Not retried.
    #[error("refused: {0}")]
    Refused(String),
    /// The provider failed or did not answer; the same call may succeed later. Retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A charge the payment gateway is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// The order paid for.
    pub order_id: OrderId,
    /// How much.
    pub amount: Money,
    /// The gateway charges each key at most once; a repeated call answers the first result.
    pub idempotency_key: String,
    /// Make this call fail as if the gateway were down (`X-Simulate-Failure`).
    pub simulate_failure: bool,
}

/// A successful charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeReceipt {
    /// The gateway's reference for the charge.
    pub reference: String,
}

/// Takes customers' money.
pub trait PaymentGateway: Send + Sync {
    /// Charges once per idempotency key.
    fn charge(
        &self,
        request: ChargeRequest,
    ) -> impl Future<Output = Result<ChargeReceipt, ProviderError>> + Send;
}

/// A delivery the provider is asked to book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRequest {
    /// The order delivered.
    pub order_id: OrderId,
    /// The pet delivered.
    pub pet_id: PetId,
    /// The provider books each key at most once.
    pub idempotency_key: String,
    /// Make this call fail as if the provider were down (`X-Simulate-Failure`).
    pub simulate_failure: bool,
}

/// A booked delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryBooking {
    /// The provider's reference.
    pub reference: String,
    /// When the pet should arrive.
    pub estimated_arrival: DateTime<Utc>,
}

/// Books deliveries.
pub trait DeliveryProvider: Send + Sync {
    /// Books once per idempotency key.
    fn book(
        &self,
        request: DeliveryRequest,
    ) -> impl Future<Output = Result<DeliveryBooking, ProviderError>> + Send;
}
