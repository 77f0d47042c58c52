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
//! - [`providers`]: the payment gateway and delivery provider the saga calls, as traits.
//! - [`saga`]: the order-fulfilment saga as pure decisions: event in, actions out.
//! - [`partition`]: the saga partitions orders belong to, one owner each.

pub mod catalog;
pub mod delivery;
pub mod error;
pub mod order;
pub mod partition;
pub mod payment;
pub mod pet;
pub mod providers;
pub mod saga;
pub mod upcasting;
pub mod values;

pub use error::DomainError;
pub use values::{
    CancellationReason, CustomerId, Money, OrderId, PetCategory, PetId, SagaStep, SimulatedFailure,
    SpecialInstructions,
};

/// Version string carried by every event type that has never changed shape.
pub const FIRST_EVENT_VERSION: &str = "1.0";

/// An aggregate whose decisions are a pure function of its state and a command: which
/// events the command produces, or why it is refused. Repeating a command that already took
/// effect decides no events.
pub trait Decide: cqrs_es::Aggregate {
    /// Decides which events `command` produces, without changing the aggregate.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// The `handle` of every [`Decide`] aggregate: decide, then write each event to the sink
/// (which applies it).
pub(crate) async fn write_decisions<A: Decide>(
    aggregate: &mut A,
    command: A::Command,
    sink: &cqrs_es::event_sink::EventSink<A>,
) -> Result<(), A::Error> {
    for event in aggregate.decide(command)? {
        sink.write(event, aggregate).await;
    }
    Ok(())
}
