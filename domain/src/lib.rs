//! The petstore's domain model: what may happen to orders, pets, payments and deliveries.
//!
//! This crate is pure. It decides; it never performs I/O and knows nothing of HTTP, SQL or
//! Kafka. Every aggregate is a [`cqrs_es::Aggregate`]: `handle` decides which events a command
//! produces (and may refuse it with a [`DomainError`]), `apply` folds an event into state and
//! never fails. Adapters in the other crates load aggregates from the event store, hand them
//! commands, and persist what they decide.
//!
//! Money is always an integer number of minor units ([`Money`]); ids are parsed once at the
//! edge ([`OrderId::parse`], [`PetId::parse`], ...) and are proof of validity afterwards.
//!
//! # Layout
//! - [`values`]: ids, money, categories and other value types, each with its parser.
//! - [`error`]: [`DomainError`], the one error type of the domain.
//! - [`order`]: the Order aggregate and the order life cycle.
//! - [`pet`]: the Pet aggregate: a pet is reserved by one order at a time and sold once.
//! - [`payment`]: the Payment aggregate (one per order).
//! - [`delivery`]: the Delivery aggregate (one per order).
//! - [`catalog`]: the demo catalog created as events on first start.

pub mod catalog;
pub mod delivery;
pub mod error;
pub mod order;
pub mod payment;
pub mod pet;
pub mod values;

pub use error::DomainError;
pub use values::{
    CancellationReason, CustomerId, Money, OrderId, PetCategory, PetId, SpecialInstructions,
};

/// Version string carried by every event type that has never changed shape.
pub const FIRST_EVENT_VERSION: &str = "1.0";
