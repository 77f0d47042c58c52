//! The saga runner: drives every order's fulfilment saga from the global event stream.
//!
//! It reads the stream from its own durable checkpoint (`saga`), asks the pure
//! [`petstore_domain::saga::react`] what each event calls for, and performs it: commands to
//! aggregates, calls to the payment gateway and delivery provider, deadlines. Events of
//! different orders are handled concurrently, each order's in its own lane (its events in
//! stream order), and the runner reads on while lanes run: one slow order holds up no other.
//! The checkpoint moves past an event once it and every event before it are handled, so a
//! crash replays what was in flight, and replaying is harmless: every command carries an id
//! derived from the event
//! that caused it (and the action's place in the reaction), and the event store drops a
//! command whose id the aggregate already holds. Provider calls are made only while the
//! payment or delivery has no recorded result, with an idempotency key derived the same way.
//!
//! Runners share the saga partitions through leases (`ownership.rs`); each handles the
//! orders of its partitions, following the event store or, with Kafka configured, consuming
//! those partitions of the topics (offsets committed, the same way, up to what is handled).
//! Its writes for an order are fenced by the order's partition's lease.
//!
//! A second loop fires due deadlines: a step that has not finished in time cancels the order.
//!
//! The live settings decide as each step starts: the step timeouts, and `payment_processing`.
//! While that flag is off (for the order's customer) a payment is held: no call to the
//! gateway, a durable `payment_hold` entry instead, re-checked every second; when the flag is
//! on again the order's `OrderPetReserved` is handled anew (the same deterministic command ids,
//! so nothing is charged twice). A payment deadline that falls due while payments are held is
//! extended by `saga.payment_timeout_ms` instead of cancelling the order.
//!
//! # Layout
//! - `runner`: the [`SagaRunner`]: what it runs, the lanes (where an event goes, what a lane
//!   does, how it acknowledges the handled prefix).
//! - `following`: taking the owned partitions' events from the event store or Kafka.
//! - `ownership`: the partitions owned through leases, and the lease clock.
//! - `events`: the events the saga reads, decoded; `error`: why handling one failed.
//! - `actions`: performing what the domain's saga decides for an event.
//! - `dead_letters`: events tried a few times, then set aside; retried on request.
//! - `deadlines`: the deadline loop.
//! - `health`: [`SagaRunnerHealth`].
//! - [`providers`]: the payment gateway and delivery provider adapters (simulated, over
//!   HTTP), and the one function that calls a provider through its policy.
//!
//! Owns the saga role (`--roles saga`); must not serve HTTP or read read models.

mod actions;
mod dead_letters;
mod deadlines;
mod error;
mod events;
mod following;
mod health;
mod ownership;
pub mod providers;
mod runner;

pub use error::SagaError;
pub use health::SagaRunnerHealth;
pub use runner::{partition_checkpoint, SagaProgress, SagaRunner, CHECKPOINT, SUBJECT};
