//! Cross-cutting runtime adapters of the petstore that are not split into crates of their
//! own yet (issue 27), and the old paths of those that are.
//!
//! Owns Kafka, Redis, the live settings, callers, tokens, OIDC, logins, rate limits, the
//! resilience policies and the breaker, and the dead-letter admin routes. It
//! must not decide business outcomes: that is `petstore-domain`'s job.
//!
//! # Layout
//! - [`auth`]: bearer tokens (login, OIDC), roles, the public routes, the security middleware.
//! - [`rate_limit`]: per-subject and per-route quotas, swappable at run time.
//! - [`live`]: the live settings (flags, limits, provider behaviour, timeouts, log filter) as
//!   events, applied in every process, and their admin routes.
//! - [`resilience`]: policies (timeouts, retries, bulkheads) and the circuit breaker.
//! - [`bus`]: Kafka: publishing the stream (idempotent producer) and consuming it in a group.
//! - [`cache`]: Redis, with short timeouts so a slow or absent Redis is a fallback, not an outage.
//! - [`dead_letters`]: the dead-letter admin routes (the storage is `petstore-event-store`'s).
//!
//! Re-exported under their old paths: [`settings`] (`petstore-settings`), [`telemetry`] and
//! [`metrics`] (`petstore-telemetry`), [`database`], [`event_store`], [`stream`] and
//! [`deadlines`] (`petstore-event-store`), [`http`] and [`health`] (`petstore-web`), [`security_audit`] (`petstore-security`).

pub mod auth;
pub mod bus;
pub mod cache;
pub mod dead_letters;
pub mod live;
pub mod rate_limit;
pub mod resilience;

pub use petstore_event_store::store as event_store;
pub use petstore_event_store::{database, deadlines, stream};
pub use petstore_security::audit as security_audit;
pub use petstore_settings as settings;
pub use petstore_telemetry::{self as telemetry, metrics};
pub use petstore_web::{self as http, health};
