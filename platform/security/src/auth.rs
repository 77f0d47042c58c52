//! Who is calling, and whether they may: bearer tokens (the service's own HS256 logins and
//! OIDC issuers' RS256/ES256 tokens), roles, the public-route list, rate limits, and the
//! security audit trail of every refusal.
//!
//! [`guard`] runs on every request, inside [`petstore_web::observe`] (so refusals carry the
//! correlation id): it works out the client address (the socket's peer, or the rightmost
//! untrusted `X-Forwarded-For` entry behind a trusted proxy), authenticates the caller,
//! counts the request against its quota, refuses non-admins on `/admin/*`, and puts the
//! [`Caller`] in the request for handlers, which check ownership with
//! [`Caller::authorize_customer`].
//!
//! # Layout
//! - [`tokens`]: verifying and issuing tokens, chosen by issuer, never by `alg`.
//! - [`oidc`]: an issuer's key set, refetched on an unknown `kid` (single-flight, cooled down).
//! - [`login`]: `POST /auth/login` and Argon2 password hashing.
//! - [`console`]: the operator console's session cookie and CSRF tokens.
//! - [`sign_in`]: the console's sign-in at an OpenID Provider (authorization code, PKCE).
//! - `guard`: the middleware: [`guard`] and [`client_address`].
//! - `openapi`: [`describe_security`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};

use petstore_domain::CustomerId;

use crate::audit::{SecurityAudit, SecurityEvent, SecurityEventKind, SecurityOutcome};
use crate::rate_limit::{RateKey, RateLimits, Usage};
use petstore_event_store::database::Database;
use petstore_settings::{
    ConsoleOidcSettings, ProxyBlock, RoleName, SecuritySettings, UserSettings,
};
use petstore_telemetry::metrics::{AuthFailureLabels, Metrics, RateLimitLabels};
use petstore_web::Problem;
use petstore_web::RequestContext;

pub mod console;
mod guard;
pub mod login;
pub mod oidc;
mod openapi;
pub mod rejection;
pub mod sign_in;
pub mod tokens;

pub use guard::{client_address, guard};
use guard::{with_usage, RouteName};
pub use openapi::describe_security;
pub use rejection::{NoCustomerId, TokenRejection};
pub use tokens::{TokenVerifier, VerifiedToken};

/// Routes anyone may call without a token (route templates, as axum matched them).
/// `unmatched` is a path no route serves: it answers 404 and reveals nothing.
pub const PUBLIC_ROUTES: [&str; 13] = [
    "/health",
    "/health/live",
    "/health/ready",
    "/petstore-domain/health",
    "/petstore-domain/health/live",
    "/petstore-domain/health/ready",
    "/auth/login",
    "/metrics",
    "/petstore-domain/openapi.json",
    "/petstore-domain/pets/browse",
    "/petstore-domain/browse-pets",
    "/petstore-domain/pets/{pet_id}",
    "unmatched",
];

/// Routes that also take the bearer token as an `access_token` query parameter (RFC 6750
/// §2.3), for clients that cannot send headers: a browser's `WebSocket` and `EventSource`.
/// Sending both that and `Authorization` is refused. Paths are logged without their query.
pub const QUERY_TOKEN_ROUTES: [&str; 1] = ["/petstore-domain/orders/{order_id}/updates"];

/// Routes under this prefix are for admins only.
pub const ADMIN_PREFIX: &str = "/petstore-domain/admin/";

/// The subject of callers without a token.
pub const ANONYMOUS: &str = "anonymous";

/// `event`, tied to the request being served (its correlation and trace ids); as it is
/// outside a request.
pub(crate) fn of_current_request(event: SecurityEvent) -> SecurityEvent {
    match RequestContext::current() {
        Some(context) => event.during(Some(context.correlation_id.to_string()), context.trace_id),
        None => event,
    }
}

/// Who is calling: put in every request by [`guard`]; handlers extract it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    subject: String,
    roles: BTreeSet<RoleName>,
    /// The customer the caller acts as (the token's customer claim), or why it has none.
    customer: Result<CustomerId, NoCustomerId>,
    client_ip: IpAddr,
    authenticated: bool,
}

impl Caller {
    fn anonymous(client_ip: IpAddr) -> Self {
        Self {
            subject: ANONYMOUS.to_owned(),
            roles: BTreeSet::new(),
            customer: CustomerId::parse(ANONYMOUS).map_err(|_| NoCustomerId::missing("sub")),
            client_ip,
            authenticated: false,
        }
    }

    /// The seed's demo mode: a caller without a token may do anything.
    fn demo(client_ip: IpAddr) -> Self {
        Self {
            roles: BTreeSet::from([RoleName::Admin, RoleName::Customer]),
            ..Self::anonymous(client_ip)
        }
    }

    /// A caller with `subject` and the customer role, for unit tests of other modules.
    #[cfg(test)]
    pub(crate) fn for_tests(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            roles: BTreeSet::from([RoleName::Customer]),
            customer: CustomerId::parse(subject)
                .map_err(|_| NoCustomerId::not_an_id("sub", subject)),
            client_ip: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            authenticated: true,
        }
    }

    /// The token's subject (`anonymous` without a token): scopes ownership and idempotency
    /// keys, and is recorded on every event the request causes.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Whether the caller presented a valid token.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Who a feature flag is decided for: the subject, or the address of an anonymous
    /// caller (so a rollout buckets anonymous callers too, stably per address).
    pub fn flag_subject(&self) -> String {
        if self.authenticated {
            self.subject.clone()
        } else {
            self.client_ip.to_string()
        }
    }

    /// Whether the caller has the admin role.
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&RoleName::Admin)
    }

    /// The client's address.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The customer the caller acts as: the token's customer claim (`sub` unless its issuer
    /// says otherwise); 403 saying why when the token names none.
    pub fn customer_id(&self) -> Result<&CustomerId, Problem> {
        self.customer
            .as_ref()
            .map_err(|reason| Problem::forbidden(reason.to_string()))
    }

    /// Allows admins, and the customer `customer_id` itself; anyone else is refused 403.
    pub fn authorize_customer(&self, customer_id: &str) -> Result<(), Problem> {
        if self.is_admin() {
            return Ok(());
        }
        let own = self.customer_id()?;
        if self.authenticated && own.as_str() == customer_id {
            Ok(())
        } else {
            Err(Problem::forbidden("this order belongs to another customer"))
        }
    }

    /// The key the caller's requests are counted under: the subject, or the address of an
    /// anonymous caller.
    pub fn rate_key(&self) -> RateKey {
        if self.authenticated {
            RateKey::Subject(self.subject.clone())
        } else {
            RateKey::Address(self.client_ip)
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        // Only a route outside the guard lacks a caller: refuse rather than guess.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Problem::unauthorized("authentication is required", false))
    }
}

/// The security layer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// jsonwebtoken has no crypto backend (it would panic on the first token).
    #[error("jsonwebtoken has no crypto provider: build with exactly one of its backends")]
    NoCryptoProvider,
    /// The token secret is not usable as an HMAC key.
    #[error("security.jwt.secret cannot be used: {0}")]
    Secret(String),
    /// An issuer's key file cannot be read.
    #[error(transparent)]
    KeySet(#[from] oidc::KeySetError),
    /// The console's OIDC client cannot be set up.
    #[error("console.oidc cannot be used: {0}")]
    ConsoleSignIn(String),
}

struct SecurityInner {
    demo_mode: bool,
    verifier: TokenVerifier,
    users: HashMap<String, UserSettings>,
    limits: RateLimits,
    audit: SecurityAudit,
    proxies: Vec<ProxyBlock>,
    max_header_bytes: usize,
    metrics: Metrics,
    csrf: console::CsrfKey,
    sign_in: Option<sign_in::OidcSignIn>,
}

/// Everything [`guard`] and the login route need.
#[derive(Clone)]
pub struct Security(Arc<SecurityInner>);

impl Security {
    /// Sets up token verification (reading key files and fetching key sets), the users, the
    /// quotas, the audit trail in `database`, and the console's sign-in at `console_oidc`'s
    /// provider.
    pub async fn build(
        settings: &SecuritySettings,
        console_oidc: Option<&ConsoleOidcSettings>,
        database: &Database,
        metrics: &Metrics,
        oidc_policy: &petstore_resilience::Policy,
    ) -> Result<Self, AuthError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(AuthError::NoCryptoProvider);
        }
        let audit = SecurityAudit::new(database.clone());
        let mut issuers = Vec::with_capacity(settings.oidc.issuers.len());
        for issuer in &settings.oidc.issuers {
            let issuer = oidc::OidcIssuer::new(
                issuer.clone(),
                &settings.oidc,
                Some(audit.clone()),
                oidc_policy.clone(),
            )?;
            issuer.load().await?;
            issuers.push(Arc::new(issuer));
        }
        if !settings.authentication_required {
            tracing::warn!(
                "DEMO MODE: security.authentication_required is false; requests without a token may do anything (local environment only)"
            );
        }
        let verifier = TokenVerifier::new(&settings.jwt, issuers)
            .map_err(|error| AuthError::Secret(error.to_string()))?;
        let sign_in = match console_oidc {
            Some(client) => {
                let issuer = verifier.oidc_issuer(&client.issuer).ok_or_else(|| {
                    AuthError::ConsoleSignIn(format!(
                        "{} is not one of security.oidc.issuers",
                        client.issuer
                    ))
                })?;
                let timeout = std::time::Duration::from_millis(settings.oidc.fetch_timeout_ms);
                Some(
                    sign_in::OidcSignIn::new(client.clone(), issuer.clone(), timeout)
                        .map_err(|error| AuthError::ConsoleSignIn(error.to_string()))?,
                )
            }
            None => None,
        };
        Ok(Self(Arc::new(SecurityInner {
            demo_mode: !settings.authentication_required,
            verifier,
            users: settings
                .users
                .iter()
                .map(|user| (user.username.clone(), user.clone()))
                .collect(),
            limits: RateLimits::new(&settings.rate_limits),
            audit,
            proxies: settings.proxy_blocks(),
            max_header_bytes: settings.max_header_bytes,
            metrics: metrics.clone(),
            csrf: console::CsrfKey::new(
                settings
                    .jwt
                    .secret
                    .as_ref()
                    .map(|secret| secrecy::ExposeSecret::expose_secret(secret).as_bytes()),
            ),
            sign_in,
        })))
    }

    /// The quotas (swap them with [`RateLimits::replace`]).
    pub fn rate_limits(&self) -> &RateLimits {
        &self.0.limits
    }

    /// The security audit trail.
    pub fn audit(&self) -> &SecurityAudit {
        &self.0.audit
    }

    /// The CSRF token of the console forms of `session` (the session cookie's token; `""`
    /// without one, in demo mode).
    pub fn csrf_token(&self, session: &str) -> String {
        self.0.csrf.token(session)
    }

    /// Whether `token` is the CSRF token of `session`.
    pub fn csrf_matches(&self, session: &str, token: &str) -> bool {
        self.0.csrf.matches(session, token)
    }

    /// The token verifier (and issuer of the service's own tokens).
    pub fn verifier(&self) -> &TokenVerifier {
        &self.0.verifier
    }

    /// The login route, with this state.
    pub fn router(&self) -> axum::Router {
        login::router().with_state(self.clone())
    }

    /// Records `event` as caused by `caller` on `route`.
    async fn record(
        &self,
        kind: SecurityEventKind,
        outcome: SecurityOutcome,
        caller: &Caller,
        route: &RouteName,
        detail: impl Into<String>,
    ) {
        let mut event = SecurityEvent::new(kind, outcome, detail);
        event.subject = Some(caller.subject.clone());
        event.client_ip = Some(caller.client_ip);
        event.method = Some(route.method.clone());
        event.route = Some(route.template.clone());
        self.0
            .audit
            .record(crate::auth::of_current_request(event))
            .await;
    }

    fn rejected(&self, reason: &'static str) {
        self.0
            .metrics
            .auth_failures
            .get_or_create(&AuthFailureLabels { reason })
            .inc();
    }

    async fn limited(
        &self,
        usage: &Usage,
        first_trip: bool,
        caller: &Caller,
        route: &RouteName,
    ) -> Response {
        self.0
            .metrics
            .rate_limited
            .get_or_create(&RateLimitLabels {
                policy: usage.policy.clone(),
            })
            .inc();
        if first_trip {
            self.record(
                SecurityEventKind::RateLimited,
                SecurityOutcome::Failure,
                caller,
                route,
                format!(
                    "quota {} of {} a minute exceeded",
                    usage.policy, usage.limit
                ),
            )
            .await;
        }
        with_usage(
            Problem::too_many_requests(usage.reset_seconds).into_response(),
            usage,
        )
    }
}
