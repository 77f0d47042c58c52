//! The external services the saga depends on, as traits. Adapters (in `saga/src/providers/`:
//! simulated in-process, or over HTTP) implement them; the domain only states what it needs
//! and what can go wrong. Every call carries an idempotency key: the provider acts on a key at
//! most once, and answers a repeated key with its first answer.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::values::{CustomerId, Money, OrderId, PetId};

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
    /// Who pays.
    pub customer_id: CustomerId,
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

/// A refund of a charge (a compensation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    /// The order whose charge is refunded.
    pub order_id: OrderId,
    /// The gateway's reference of the charge.
    pub charge_reference: String,
    /// How much is given back.
    pub amount: Money,
    /// The gateway refunds each key at most once.
    pub idempotency_key: String,
}

/// A refund made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReceipt {
    /// The gateway's reference of the refund.
    pub reference: String,
}

/// Takes customers' money, and gives it back.
pub trait PaymentGateway: Send + Sync {
    /// Charges once per idempotency key.
    fn charge(
        &self,
        request: ChargeRequest,
    ) -> impl Future<Output = Result<ChargeReceipt, ProviderError>> + Send;

    /// Refunds once per idempotency key.
    fn refund(
        &self,
        request: RefundRequest,
    ) -> impl Future<Output = Result<RefundReceipt, ProviderError>> + Send;
}

/// A delivery the provider is asked to book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRequest {
    /// The order delivered.
    pub order_id: OrderId,
    /// The pet delivered.
    pub pet_id: PetId,
    /// To whom.
    pub customer_id: CustomerId,
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

/// A booked delivery called off (a compensation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    /// The order whose delivery is called off.
    pub order_id: OrderId,
    /// The provider's reference of the booking.
    pub booking_reference: String,
    /// The provider cancels each key at most once.
    pub idempotency_key: String,
}

/// Books deliveries, and calls them off.
pub trait DeliveryProvider: Send + Sync {
    /// Books once per idempotency key.
    fn book(
        &self,
        request: DeliveryRequest,
    ) -> impl Future<Output = Result<DeliveryBooking, ProviderError>> + Send;

    /// Cancels a booking once per idempotency key.
    fn cancel(
        &self,
        request: CancelRequest,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
}
