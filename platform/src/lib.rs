//! Cross-cutting runtime and infrastructure adapters of the petstore.
//!
//! Owns what every role needs and no business rule: typed settings, telemetry, the
//! problem+json error format and correlation ids, and the adapters around the domain: the
//! event store (Postgres through postgres-es, embedded SQLite through sqlite-es), command
//! dispatch with optimistic-concurrency retries, and the global event stream with its
//! checkpoints. It must not decide business outcomes: that is `petstore-domain`'s job.
//!
//! # Layout
//! - [`auth`]: bearer tokens (login, OIDC), roles, the public routes, the security middleware.
//! - [`rate_limit`]: per-subject and per-route quotas, swappable at run time.
//! - [`security_audit`]: the durable trail of logins, refusals, rate-limit trips, admin actions.
//! - [`settings`]: the typed [`settings::Settings`] (re-exported from `petstore-settings`).
//! - [`live`]: the live settings (flags, limits, provider behaviour, timeouts, log filter) as
//!   events, applied in every process, and their admin routes.
//! - [`telemetry`]: the tracing subscriber (JSON or text logs).
//! - [`health`]: the health routes and the [`health::HealthCheck`] each component registers.
//! - [`http`]: problem+json responses, correlation ids, extractors whose rejections are problems.
//! - [`bus`]: Kafka: publishing the stream (idempotent producer) and consuming it in a group.
//! - [`cache`]: Redis, with short timeouts so a slow or absent Redis is a fallback, not an outage.
//! - [`database`]: connecting to Postgres or SQLite and running the migrations.
//! - [`deadlines`]: durable saga step deadlines.
//! - [`metrics`]: the registry of every metric, rendered for Prometheus.
//! - [`event_store`]: loading aggregates and appending their events, with metadata.
//! - [`stream`]: the global, gap-free event stream, durable checkpoints, audit queries.

pub mod auth;
pub mod bus;
pub mod cache;
pub mod database;
pub mod dead_letters;
pub mod deadlines;
pub mod event_store;
pub mod health;
pub mod http;
pub mod live;
pub mod metrics;
pub mod rate_limit;
pub mod resilience;
pub mod security_audit;
/// The typed static settings: the `petstore-settings` crate (`platform/settings/`).
pub use petstore_settings as settings;
pub mod stream;
pub mod telemetry;
