//! The admin API: what an operator reads and changes while the service runs. Every process
//! serves it (any instance can be asked; changes reach the others through the event store),
//! and the security guard lets only admins through `/petstore-domain/admin/*`.
//!
//! Owns the admin routes and how their errors become problems. Must not hold what they
//! show: the live settings are `petstore-live-settings`'s, the breakers
//! `petstore-resilience`'s, the dead letters `petstore-event-store`'s, the order timeline `petstore-read-models`', the security trail
//! `petstore-security`'s.
//!
//! # Layout
//! - [`config`]: the live settings (`/admin/config`, its history) and the circuit breakers.
//! - [`dead_letters`]: list, retry and skip dead letters.
//! - [`security_audit`]: the security audit trail.
//! - [`timeline`]: an order's timeline (what happened to it, what it waits for).
//! - `paging`: the one check of every list route's `limit` and `before`.

use axum::extract::FromRef;
use axum::Router;
use petstore_event_store::database::Database;
use petstore_live_settings::Live;
use petstore_resilience::Policies;
use petstore_security::audit::SecurityAudit;

pub mod config;
pub mod dead_letters;
mod paging;
pub mod security_audit;
pub mod timeline;

/// What the admin routes read and change.
#[derive(Clone)]
pub struct AdminState {
    /// The live settings.
    pub live: Live,
    /// This process's dependencies' policies (their breakers).
    pub policies: Policies,
    /// The event store's database (the dead letters).
    pub database: Database,
    /// The security audit trail.
    pub security_audit: SecurityAudit,
}

impl FromRef<AdminState> for Live {
    fn from_ref(state: &AdminState) -> Live {
        state.live.clone()
    }
}

impl FromRef<AdminState> for Database {
    fn from_ref(state: &AdminState) -> Database {
        state.database.clone()
    }
}

/// Every admin route, with its state applied.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .merge(config::router())
        .merge(dead_letters::router())
        .merge(security_audit::router())
        .merge(timeline::router())
        .with_state(state)
}

/// The OpenAPI description of the admin routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut document = config::LiveApiDoc::openapi();
    document.merge(dead_letters::DeadLettersApiDoc::openapi());
    document.merge(security_audit::SecurityAuditApiDoc::openapi());
    document.merge(timeline::TimelineApiDoc::openapi());
    document
}
