//! HTTP plumbing shared by the APIs: correlation ids, RFC 9457 problem responses, and
//! extractors whose rejections are problems too.
//!
//! [`observe`] is the outermost middleware. It accepts a valid `X-Correlation-ID` or makes
//! one, runs the request inside a server span that carries it and continues the caller's
//! `traceparent` (so every log line of the request has both), and inside a task-local
//! [`RequestContext`] (so a [`Problem`] can name them), counts the request by route template,
//! echoes both ids on the response, and turns any bare error response (unknown route, wrong
//! method, a panic) into `application/problem+json`.
//!
//! The crate is the HTTP edge the APIs share (crate `petstore-web`): it owns problem+json,
//! the request middleware, extractors and the health routes ([`health`]); it must not hold
//! routes of a role or decide business outcomes.

pub mod health;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use petstore_telemetry::CorrelationId;

use petstore_telemetry as telemetry;
use petstore_telemetry::metrics::{Metrics, RequestLabels};

/// The request and response header that carries the correlation id.
pub const CORRELATION_ID_HEADER: HeaderName = HeaderName::from_static("x-correlation-id");

/// The header that carries a read-your-writes token: commands answer with it, queries wait
/// (bounded) until the read model has reached it.
pub const CONSISTENCY_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-consistency-token");

/// The response header that lists the feature-flag variants a request was served with:
/// `pet_personalization=on, premium_filters=off`.
pub const FEATURE_FLAGS_HEADER: HeaderName = HeaderName::from_static("x-feature-flags");

/// The media type of problem responses.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// What a handler may ask about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The request's correlation id.
    pub correlation_id: CorrelationId,
    /// The request path, used as a problem's `instance`.
    pub path: String,
    /// The request's trace id (32 hex digits), named in problem bodies.
    pub trace_id: Option<String>,
    /// The feature-flag variants the request was served with (`X-Feature-Flags`).
    pub served_flags: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

tokio::task_local! {
    static REQUEST_CONTEXT: RequestContext;
}

impl RequestContext {
    /// The context of the request being served, if any.
    pub fn current() -> Option<RequestContext> {
        REQUEST_CONTEXT.try_with(Clone::clone).ok()
    }

    /// Names the order the current request acts on, on its span (so its log lines and its
    /// trace carry `order_id`). Call it from the handler's task.
    pub fn record_order(order_id: &dyn fmt::Display) {
        tracing::Span::current().record("order_id", tracing::field::display(order_id));
    }

    /// Records that the current request was served with `flag` `on` or off (shown in its
    /// `X-Feature-Flags` response header), and answers `on`. Outside a request it records
    /// nothing.
    pub fn served_flag(flag: petstore_settings::Flag, on: bool) -> bool {
        if let Ok(context) = REQUEST_CONTEXT.try_with(|context| context.served_flags.clone()) {
            if let Ok(mut flags) = context.lock() {
                flags.insert(flag.key(), on);
            }
        }
        on
    }

    /// The current request's correlation id, or a fresh one outside a request.
    pub fn correlation_id() -> CorrelationId {
        Self::current().map_or_else(CorrelationId::generate, |context| context.correlation_id)
    }
}

/// An RFC 9457 problem: the body of every 4xx and 5xx response.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: String,
    detail: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
    correlation_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

/// The JSON shape of a problem, for the OpenAPI document.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ProblemDocument {
    /// A URI reference naming the kind of problem, e.g. `/problems/validation`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The request path.
    pub instance: Option<String>,
    /// Quote it when reporting a problem; it finds every log line of the request.
    pub correlation_id: String,
    /// The request's trace id: find its trace (and its log lines) by it.
    pub trace_id: Option<String>,
}

impl Problem {
    /// A problem of kind `kind` (a slug such as `validation`), with the given status.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            title: title.into(),
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// 422: the request is well-formed but its content is not acceptable.
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            "Invalid request",
            detail,
        )
    }

    /// 400: the request cannot be read.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Malformed request",
            detail,
        )
    }

    /// 404: the named resource does not exist.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: the request conflicts with the resource's current state.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 401 with `WWW-Authenticate: Bearer`: no credentials, or (`invalid_token: Some(reason)`)
    /// credentials that are refused for `reason`.
    pub fn unauthorized(detail: impl Into<String>, invalid_token: bool) -> Self {
        let challenge = if invalid_token {
            "Bearer realm=\"petstore\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"petstore\""
        };
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )
    }

    /// 403: the caller is known but may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 429 with `Retry-After`: the caller exceeded a rate limit.
    pub fn too_many_requests(retry_after_seconds: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("rate limit exceeded; retry in {retry_after_seconds} s"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds))
    }

    /// 503: a dependency is unavailable; retry later.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 503 with `Retry-After`: this process already handles as many requests as it takes at
    /// once (`http.max_concurrent_requests`); refused at once rather than queued.
    pub fn overloaded(limit: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Service overloaded",
            format!("{limit} requests are in progress, the most this process takes at once; retry shortly"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 503 with `Retry-After` (whole seconds, at least 1): the `dependency` service was not
    /// called, for `reason` (an open breaker, a full bulkhead).
    pub fn dependency_unavailable(
        dependency: &str,
        reason: &dyn fmt::Display,
        retry_after: std::time::Duration,
    ) -> Self {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dependency-unavailable",
            "Dependency unavailable",
            format!("the {dependency} service is not called now: {reason}; retry in {seconds} s"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds))
    }

    /// 500: logs `cause` with the correlation id and tells the client nothing internal.
    pub fn internal(cause: &dyn fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the service failed to handle the request; quote the correlation id when reporting it",
        )
    }

    /// A failed read or write: 503 with `Retry-After` when a database in `error`'s chain of
    /// causes is unreachable (connection refused or lost, pool exhausted, server shutting
    /// down or out of connections), else 500. Either way the cause is logged, not shown.
    pub fn from_failure(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut cause = Some(error);
        while let Some(current) = cause {
            if current
                .downcast_ref::<sqlx::Error>()
                .is_some_and(petstore_event_store::database::unreachable)
            {
                tracing::error!(%error, "database unreachable");
                return Self::unavailable("a database is unreachable; retry shortly");
            }
            cause = current.source();
        }
        Self::internal(&error)
    }

    /// A problem that only has a status (unknown route, wrong method, ...).
    pub fn from_status(status: StatusCode) -> Self {
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A bare 503 is the request timeout's: worth a retry.
            return Self::unavailable(
                "the request took longer than the service allows; retry shortly",
            );
        }
        let (kind, detail) = match status {
            StatusCode::NOT_FOUND => ("not-found", "no resource at this path"),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method-not-allowed",
                "this path does not accept this method",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "payload-too-large",
                "the request body is larger than the service accepts",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported-media-type",
                "send the body as application/json",
            ),
            StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long"),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
                "headers-too-large",
                "the request headers are larger than the service accepts",
            ),
            _ if status.is_server_error() => {
                ("internal", "the service failed to handle the request")
            }
            _ => ("bad-request", "the request was refused"),
        };
        let title = status.canonical_reason().unwrap_or("Error");
        Self::new(status, kind, title, detail)
    }

    /// Adds a response header (`Retry-After`, `WWW-Authenticate`, ...).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong with this request.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let context = RequestContext::current();
        let body = ProblemBody {
            kind: format!("/problems/{}", self.kind),
            title: &self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            instance: context.as_ref().map(|context| context.path.clone()),
            trace_id: context
                .as_ref()
                .and_then(|context| context.trace_id.clone()),
            correlation_id: context
                .map_or_else(CorrelationId::generate, |context| context.correlation_id)
                .to_string(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(error) => Self::validation(error.body_text()),
            JsonRejection::JsonSyntaxError(error) => Self::bad_request(error.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                Self::from_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            other => {
                let status = other.status();
                let mut problem = Self::from_status(status);
                if status.is_client_error() && status != StatusCode::PAYLOAD_TOO_LARGE {
                    problem.detail = other.body_text();
                }
                problem
            }
        }
    }
}

impl From<PathRejection> for Problem {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<QueryRejection> for Problem {
    fn from(rejection: QueryRejection) -> Self {
        Self::validation(rejection.body_text())
    }
}

/// `axum::Json` whose rejection is a [`Problem`].
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is a [`Problem`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejection is a [`Problem`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Problem))]
pub struct Query<T>(pub T);

/// The W3C trace context header, read from requests and echoed on responses.
pub const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

/// The `method` label of a request: common methods by name, the rest as `other` (bounded).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The `status_class` label of a status: `2xx`, `4xx`, ...
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Outermost middleware, for every route: the correlation id, the request's server span (a
/// child of the caller's `traceparent`, if any) and its log line, metrics by route template,
/// problem bodies for bare error responses, and `X-Correlation-ID` and `traceparent` on the
/// response.
pub async fn observe(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let supplied = request.headers().get(&CORRELATION_ID_HEADER);
    let (correlation_id, refused) =
        match supplied.map(|value| value.to_str().ok().and_then(CorrelationId::parse)) {
            None => (CorrelationId::generate(), None),
            Some(Some(id)) => (id, None),
            Some(None) => (
                CorrelationId::generate(),
                Some(Problem::bad_request(
                    "X-Correlation-ID must be 1 to 128 characters of letters, digits and -_.:",
                )),
            ),
        };
    let path = request.uri().path().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = %route,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        correlation_id = %correlation_id,
        order_id = tracing::field::Empty,
    );
    let incoming = request
        .headers()
        .get(&TRACEPARENT_HEADER)
        .and_then(|value| value.to_str().ok());
    telemetry::continue_trace(&span, incoming);
    let traceparent = telemetry::traceparent_of(&span.context());
    let context = RequestContext {
        correlation_id: correlation_id.clone(),
        path,
        trace_id: traceparent
            .as_deref()
            .and_then(|value| value.split('-').nth(1))
            .map(str::to_owned),
        served_flags: Arc::default(),
    };
    let served_flags = context.served_flags.clone();
    let response = REQUEST_CONTEXT
        .scope(context, async {
            let response = match refused {
                Some(problem) => problem.into_response(),
                None => problem_for_bare_error(next.run(request).await),
            };
            let status = response.status();
            let current = tracing::Span::current();
            current.record("http.response.status_code", i64::from(status.as_u16()));
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            if status.is_server_error() {
                current.record("otel.status_code", "ERROR");
                tracing::error!(status = status.as_u16(), elapsed_ms, "request failed");
            } else {
                tracing::info!(status = status.as_u16(), elapsed_ms, "request served");
            }
            response
        })
        .instrument(span)
        .await;
    metrics.request_served(
        RequestLabels {
            route,
            method,
            status_class: status_class(response.status()),
        },
        started.elapsed(),
    );
    let mut response = with_correlation_header(response, &correlation_id);
    if let Ok(flags) = served_flags.lock() {
        let listed: Vec<String> = flags
            .iter()
            .map(|(flag, on)| format!("{flag}={}", if *on { "on" } else { "off" }))
            .collect();
        if let Ok(value) = HeaderValue::from_str(&listed.join(", ")) {
            if !listed.is_empty() {
                response.headers_mut().insert(FEATURE_FLAGS_HEADER, value);
            }
        }
    }
    if let Some(value) = traceparent.and_then(|value| HeaderValue::from_str(&value).ok()) {
        response.headers_mut().insert(TRACEPARENT_HEADER, value);
    }
    response
}

fn with_correlation_header(mut response: Response, id: &CorrelationId) -> Response {
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(CORRELATION_ID_HEADER, value);
    }
    response
}

fn problem_for_bare_error(response: Response) -> Response {
    let status = response.status();
    // Only bare responses (no body type, or axum's and tower's plain-text ones) are
    // replaced; a JSON error body a handler chose (a 503 health report) is kept.
    let is_bare = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|value| value.as_bytes().starts_with(b"text/plain"));
    if status.as_u16() < 400 || !is_bare {
        return response;
    }
    let mut problem = Problem::from_status(status);
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = response.headers().get(&name) {
            problem = problem.with_header(name, value.clone());
        }
    }
    problem.into_response()
}

/// Handler for routes nobody serves: a 404 problem.
pub async fn not_found() -> Problem {
    Problem::from_status(StatusCode::NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading failed: {0}")]
    struct Wrapped(#[source] sqlx::Error);

    #[test]
    fn an_unreachable_database_is_503_with_retry_after_and_other_failures_500() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for unreachable in [
            Wrapped(sqlx::Error::Io(refused)),
            Wrapped(sqlx::Error::PoolTimedOut),
        ] {
            let problem = Problem::from_failure(&unreachable);
            assert_eq!(problem.status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(problem
                .headers
                .iter()
                .any(|(name, _)| name == header::RETRY_AFTER));
        }
        let failed = Wrapped(sqlx::Error::RowNotFound);
        assert_eq!(
            Problem::from_failure(&failed).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}

/// How long each route may take (`security.route_timeouts_ms`, else
/// `security.request_timeout_ms`), and the shutdown's cut-off of requests still in flight.
#[derive(Debug, Clone)]
pub struct TimeLimits {
    default: std::time::Duration,
    routes: Arc<std::collections::HashMap<String, std::time::Duration>>,
    cutoff: tokio::sync::watch::Receiver<bool>,
}

impl TimeLimits {
    /// From the security settings; requests still running when `cutoff` turns true are
    /// answered at once.
    pub fn new(
        settings: &petstore_settings::SecuritySettings,
        cutoff: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            default: std::time::Duration::from_millis(settings.request_timeout_ms),
            routes: Arc::new(
                settings
                    .route_timeouts_ms
                    .iter()
                    .map(|(route, ms)| (route.clone(), std::time::Duration::from_millis(*ms)))
                    .collect(),
            ),
            cutoff,
        }
    }

    /// The route keys configured (`"METHOD /template"`).
    pub fn routes(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

/// The time-limit middleware: a request that outlasts its route's timeout, or is still
/// running when a shutdown's drain deadline passes, is answered 503 with `Retry-After` (the
/// handler is dropped, so nothing of it runs on).
pub async fn time_limit(
    axum::extract::State(limits): axum::extract::State<TimeLimits>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| format!("{} {}", request.method(), path.as_str()));
    let limit = route
        .and_then(|route| limits.routes.get(&route).copied())
        .unwrap_or(limits.default);
    let mut cutoff = limits.cutoff.clone();
    tokio::select! {
        finished = tokio::time::timeout(limit, next.run(request)) => match finished {
            Ok(response) => response,
            Err(_) => Problem::from_status(StatusCode::SERVICE_UNAVAILABLE).into_response(),
        },
        _ = cutoff.wait_for(|cut| *cut) => Problem::unavailable(
            "the service is shutting down and this request outlasted its drain deadline; retry",
        )
        .into_response(),
    }
}
