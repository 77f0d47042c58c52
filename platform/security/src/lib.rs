//! The petstore's security: who calls ([`auth`]: bearer tokens from logins and OIDC
//! providers, roles, the guard every request passes), how often ([`rate_limit`]: quotas
//! per subject and route, swappable at run time), and the durable trail of security events
//! ([`audit`]: logins, refused tokens and callers, rate-limit trips, key-set rotations,
//! admin actions).
//!
//! Owns authentication, authorisation, rate limits and what security records. The guard is
//! the edge's middleware, so this crate knows axum; the audit trail does not: its events
//! arrive with the request's ids already in them ([`auth::of_current_request`]). Must not
//! decide business outcomes, nor serve anything but the login and token routes.

pub mod audit;
pub mod auth;
pub mod rate_limit;
