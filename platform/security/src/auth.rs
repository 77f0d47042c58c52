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

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use petstore_domain::CustomerId;

use crate::audit::{SecurityAudit, SecurityEvent, SecurityEventKind, SecurityOutcome};
use crate::rate_limit::{Decision, RateKey, RateLimits, Usage};
use petstore_event_store::database::Database;
use petstore_settings::{canonical, ProxyBlock, RoleName, SecuritySettings, UserSettings};
use petstore_telemetry::metrics::{AuthFailureLabels, Metrics, RateLimitLabels};
use petstore_web::Problem;
use petstore_web::RequestContext;

pub mod login;
pub mod oidc;
pub mod rejection;
pub mod tokens;

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
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
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
}

/// Everything [`guard`] and the login route need.
#[derive(Clone)]
pub struct Security(Arc<SecurityInner>);

impl Security {
    /// Sets up token verification (reading key files and fetching key sets), the users, the
    /// quotas and the audit trail in `database`.
    pub async fn build(
        settings: &SecuritySettings,
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
        Ok(Self(Arc::new(SecurityInner {
            demo_mode: !settings.authentication_required,
            verifier: TokenVerifier::new(&settings.jwt, issuers)
                .map_err(|error| AuthError::Secret(error.to_string()))?,
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

/// A request's method and route template, as the audit trail names them.
struct RouteName {
    method: String,
    template: String,
}

enum Credentials<'a> {
    Missing,
    Malformed,
    Bearer(&'a str),
}

fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credentials::Missing;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Credentials::Bearer(token.trim())
        }
        _ => Credentials::Malformed,
    }
}

/// The credentials of a request: its `Authorization` header or, on [`QUERY_TOKEN_ROUTES`],
/// its `access_token` query parameter (as it is: JWTs are URL-safe).
fn request_credentials<'a>(request: &'a Request, template: &str) -> Credentials<'a> {
    let from_query = QUERY_TOKEN_ROUTES
        .contains(&template)
        .then(|| request.uri().query())
        .flatten()
        .and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("access_token="))
        });
    match (credentials(request.headers()), from_query) {
        (credentials, None) => credentials,
        (Credentials::Missing, Some(token)) if !token.is_empty() => Credentials::Bearer(token),
        _ => Credentials::Malformed,
    }
}

/// The client's address: the socket's peer, unless that is a trusted proxy; then the
/// rightmost `X-Forwarded-For` entry that is not a trusted proxy (entries left of it are
/// whatever the client claimed).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, proxies: &[ProxyBlock]) -> IpAddr {
    let peer = canonical(peer);
    let trusted = |address: IpAddr| proxies.iter().any(|block| block.contains(address));
    if !trusted(peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    forwarded
        .iter()
        .rev()
        .copied()
        .find(|address| !trusted(*address))
        .or_else(|| forwarded.first().copied())
        .unwrap_or(peer)
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

const RATE_LIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit");

fn with_usage(mut response: Response, usage: &Usage) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (RATE_LIMIT_POLICY, usage.policy_header()),
        (RATE_LIMIT, usage.limit_header()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

/// The security middleware of every route: header size, authentication, rate limit, the
/// admin-only prefix, the audit trail of refusals and admin actions, and security headers.
pub async fn guard(State(security): State<Security>, mut request: Request, next: Next) -> Response {
    let inner = &security.0;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip());
    let client_ip = client_address(peer, request.headers(), &inner.proxies);
    if header_bytes(request.headers()) > inner.max_header_bytes {
        return Problem::from_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).into_response();
    }
    let route = RouteName {
        method: request.method().as_str().to_owned(),
        template: request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str)
            .to_owned(),
    };
    let public = PUBLIC_ROUTES.contains(&route.template.as_str());
    let (caller, rejection) = match request_credentials(&request, &route.template) {
        Credentials::Missing if public => (Caller::anonymous(client_ip), None),
        Credentials::Missing if inner.demo_mode => (Caller::demo(client_ip), None),
        Credentials::Missing => (Caller::anonymous(client_ip), Some(None)),
        Credentials::Malformed => (
            Caller::anonymous(client_ip),
            Some(Some(TokenRejection::Malformed)),
        ),
        Credentials::Bearer(token) => match inner.verifier.verify(token).await {
            Ok(verified) => (
                Caller {
                    subject: verified.subject,
                    roles: verified.roles,
                    customer: verified.customer,
                    client_ip,
                    authenticated: true,
                },
                None,
            ),
            Err(reason) => (Caller::anonymous(client_ip), Some(Some(reason))),
        },
    };
    request.extensions_mut().insert(caller.clone());
    request.extensions_mut().insert(caller.rate_key());

    // Logins have quotas of their own, per username and per address (see `login`).
    let route_key = format!("{} {}", route.method, route.template);
    let counted = route.template != "/auth/login";
    let decision = if counted {
        inner.limits.check_request(&route_key, &request)
    } else {
        Decision::Unlimited
    };
    let usage = match decision {
        Decision::Limited { usage, first_trip } => {
            return security.limited(&usage, first_trip, &caller, &route).await;
        }
        Decision::Allowed(usage) => Some(usage),
        Decision::Unlimited => None,
    };
    let finish = |response: Response| {
        let mut response = match &usage {
            Some(usage) => with_usage(response, usage),
            None => response,
        };
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        if caller.authenticated {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        response
    };

    if let Some(reason) = rejection {
        let (label, detail, invalid_token) = match &reason {
            None => ("missing", "no bearer token".to_owned(), false),
            Some(reason) => (reason.label(), reason.to_string(), true),
        };
        security.rejected(label);
        security
            .record(
                SecurityEventKind::TokenRejected,
                SecurityOutcome::Failure,
                &caller,
                &route,
                detail.clone(),
            )
            .await;
        let message = if invalid_token {
            detail
        } else {
            "authentication is required: send Authorization: Bearer <token> (POST /auth/login issues one)".to_owned()
        };
        return finish(Problem::unauthorized(message, invalid_token).into_response());
    }
    let admin_route = route.template.starts_with(ADMIN_PREFIX);
    if admin_route && !caller.is_admin() {
        security
            .record(
                SecurityEventKind::Forbidden,
                SecurityOutcome::Failure,
                &caller,
                &route,
                "admin role required",
            )
            .await;
        return finish(Problem::forbidden("this route needs the admin role").into_response());
    }

    let response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::FORBIDDEN {
        security
            .record(
                SecurityEventKind::Forbidden,
                SecurityOutcome::Failure,
                &caller,
                &route,
                "refused by the route",
            )
            .await;
    } else if admin_route {
        let outcome = if status.is_success() {
            SecurityOutcome::Success
        } else {
            SecurityOutcome::Failure
        };
        security
            .record(
                SecurityEventKind::AdminAction,
                outcome,
                &caller,
                &route,
                format!("answered {}", status.as_u16()),
            )
            .await;
    }
    finish(response)
}

/// `schema` without its `null` alternative: `type: [string, null]` becomes `type: string`,
/// `oneOf: [{type: null}, X]` becomes `X`.
fn without_null(schema: &mut utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) {
    use utoipa::openapi::schema::{Schema, SchemaType, Type};
    use utoipa::openapi::RefOr;
    let is_null = |item: &RefOr<Schema>| matches!(item, RefOr::T(Schema::Object(object)) if object.schema_type == SchemaType::Type(Type::Null));
    match schema {
        RefOr::T(Schema::Object(object)) => {
            if let SchemaType::Array(types) = &object.schema_type {
                let types: Vec<Type> = types
                    .iter()
                    .filter(|kind| **kind != Type::Null)
                    .cloned()
                    .collect();
                if let [only] = types.as_slice() {
                    object.schema_type = SchemaType::Type(only.clone());
                }
            }
        }
        RefOr::T(Schema::OneOf(one_of)) => {
            let rest: Vec<RefOr<Schema>> = one_of
                .items
                .iter()
                .filter(|item| !is_null(item))
                .cloned()
                .collect();
            if let [only] = rest.as_slice() {
                *schema = only.clone();
            }
        }
        _ => {}
    }
}

/// Adds what [`guard`] does to every operation of `document` (and states that optional
/// parameters are absent, never null): the bearer scheme (required
/// except on [`PUBLIC_ROUTES`]), and the answers any route can give: 401 (no or a refused
/// token; on public routes only for a refused one), 403 (`/admin/*` for non-admins), 429
/// (rate limits), 431 (headers too large) and 503 (timed out).
pub fn describe_security(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::content::Content;
    use utoipa::openapi::header::Header;
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{Ref, RefOr, ResponseBuilder, Type};

    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A token from POST /auth/login, or from a configured OIDC issuer",
                    ))
                    .build(),
            ),
        );
    let problem = |description: &str, headers: &[&str]| {
        let mut response = ResponseBuilder::new().description(description).content(
            petstore_web::PROBLEM_CONTENT_TYPE,
            Content::new(Some(Ref::from_schema_name("ProblemDocument"))),
        );
        for name in headers {
            response = response.header(
                *name,
                Header::new(
                    utoipa::openapi::schema::ObjectBuilder::new().schema_type(Type::String),
                ),
            );
        }
        RefOr::T(response.build())
    };
    for (path, item) in document.paths.paths.iter_mut() {
        let public = PUBLIC_ROUTES.contains(&path.as_str());
        let admin = path.starts_with(ADMIN_PREFIX);
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            // A header or query value is text, never JSON null: an optional one is absent.
            for parameter in operation.parameters.iter_mut().flatten() {
                if let Some(schema) = parameter.schema.as_mut() {
                    without_null(schema);
                }
            }
            operation.security = Some(if public {
                // Anonymous allowed; a token, when sent, is checked.
                vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("bearer", Vec::<String>::new()),
                ]
            } else {
                vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
            });
            let responses = &mut operation.responses.responses;
            let unauthorized = if public {
                "The bearer token sent is refused"
            } else {
                "No bearer token, or a refused one"
            };
            responses
                .entry("401".to_owned())
                .or_insert_with(|| problem(unauthorized, &["WWW-Authenticate"]));
            if admin {
                responses
                    .entry("403".to_owned())
                    .or_insert_with(|| problem("Not an admin", &[]));
            }
            if operation.request_body.is_some() {
                for (status, description) in [
                    ("400", "Malformed JSON or header"),
                    ("413", "Body too large"),
                    ("415", "Body is not application/json"),
                    ("422", "Invalid or unknown field"),
                ] {
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| problem(description, &[]));
                }
            }
            responses.entry("429".to_owned()).or_insert_with(|| {
                problem(
                    "Rate limit exceeded",
                    &["Retry-After", "RateLimit-Policy", "RateLimit"],
                )
            });
            responses
                .entry("431".to_owned())
                .or_insert_with(|| problem("Request headers too large", &[]));
            responses.entry("503".to_owned()).or_insert_with(|| {
                problem("Unavailable or timed out; retry later", &["Retry-After"])
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(forwarded: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(forwarded).expect("ascii"),
        );
        headers
    }

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let proxies = vec![ProxyBlock::parse("10.0.0.0/8").expect("valid")];
        let proxy: IpAddr = "10.1.1.1".parse().expect("ip");
        let stranger: IpAddr = "203.0.113.9".parse().expect("ip");
        // A spoofed header from an untrusted peer changes nothing.
        assert_eq!(
            client_address(stranger, &headers("198.51.100.1"), &proxies),
            stranger
        );
        // Behind the proxy: the rightmost untrusted entry, not what the client claimed left of it.
        assert_eq!(
            client_address(proxy, &headers("1.1.1.1, 198.51.100.7, 10.2.2.2"), &proxies),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &proxies), proxy);
        assert_eq!(client_address(proxy, &headers("garbage"), &proxies), proxy);
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        let mut map = HeaderMap::new();
        assert!(matches!(credentials(&map), Credentials::Missing));
        map.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic ZGVtbzpkZW1v"),
        );
        assert!(matches!(credentials(&map), Credentials::Malformed));
        map.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc.def.ghi"),
        );
        assert!(matches!(
            credentials(&map),
            Credentials::Bearer("abc.def.ghi")
        ));
        map.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(matches!(credentials(&map), Credentials::Malformed));
    }

    #[test]
    fn customers_act_on_their_own_orders_and_admins_on_all() {
        let customer = Caller::for_tests("customer-001");
        assert!(customer.authorize_customer("customer-001").is_ok());
        assert!(customer.authorize_customer("customer-002").is_err());
        let anonymous = Caller::anonymous(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(anonymous.authorize_customer(ANONYMOUS).is_err());
        let demo = Caller::demo(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(demo.authorize_customer("customer-002").is_ok());
    }
}
