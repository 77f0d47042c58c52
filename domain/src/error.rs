//! The domain's error type.

use crate::values::{OrderId, PetId};

/// Why the domain refused a command or an input value.
///
/// Each variant's doc says which HTTP status the APIs turn it into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// An input value is malformed. HTTP 422.
    #[error("{field}: {message}")]
    Validation {
        /// The offending field, as the client named it.
        field: &'static str,
        /// What is wrong with it, in words a client can act on.
        message: String,
    },
    /// No pet has this id. HTTP 404 on a pet route, 422 when an order names it.
    #[error("pet {0} does not exist")]
    PetNotFound(PetId),
    /// A pet with this id already exists with different details. HTTP 409.
    #[error("pet {0} already exists with different details")]
    PetAlreadyExists(PetId),
    /// The pet is reserved by another order. HTTP 409.
    #[error("pet {pet_id} is reserved by another order")]
    PetUnavailable {
        /// The pet asked for.
        pet_id: PetId,
    },
    /// The pet has been sold. HTTP 409.
    #[error("pet {0} has already been sold")]
    PetAlreadySold(PetId),
    /// The pet is not reserved for this order, so it cannot be sold to it. HTTP 409.
    #[error("pet {pet_id} is not reserved for order {order_id}")]
    PetNotReservedForOrder {
        /// The pet.
        pet_id: PetId,
        /// The order that tried to buy it.
        order_id: OrderId,
    },
    /// No order has this id. HTTP 404.
    #[error("order {0} does not exist")]
    OrderNotFound(OrderId),
    /// An idempotency key was reused for a different order. HTTP 422.
    #[error("order {0} already exists with different details; use a new Idempotency-Key")]
    IdempotencyKeyReused(OrderId),
    /// The command does not fit the order's current status. HTTP 409.
    #[error("order {order_id} is {status}; cannot {action}")]
    InvalidOrderTransition {
        /// The order.
        order_id: OrderId,
        /// Its current status, lower case.
        status: &'static str,
        /// What was attempted.
        action: &'static str,
    },
    /// A payment or delivery command does not fit that aggregate's state. HTTP 409.
    #[error("{aggregate} for order {order_id} is {state}; cannot {action}")]
    InvalidTransition {
        /// `payment` or `delivery`.
        aggregate: &'static str,
        /// The order the payment or delivery belongs to.
        order_id: OrderId,
        /// The current state.
        state: &'static str,
        /// What was attempted.
        action: &'static str,
    },
    /// An amount does not match what the order costs. HTTP 422.
    #[error("amount {actual} does not match the order's amount {expected}")]
    AmountMismatch {
        /// What the order costs.
        expected: String,
        /// What was offered.
        actual: String,
    },
}

impl DomainError {
    /// Shorthand for a [`DomainError::Validation`].
    pub fn validation(field: &'static str, message: impl Into<String>) -> Self {
        Self::Validation {
            field,
            message: message.into(),
        }
    }
}
