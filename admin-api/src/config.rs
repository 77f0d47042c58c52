//! The admin routes of the live settings, served by every process (any instance can be
//! asked or changed; the change reaches the others through the event store). Admin only:
//! the security guard refuses everyone else on `/petstore-domain/admin/*`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use petstore_event_store::store::EventMetadata;
use petstore_live_settings::{
    ChangeSource, HistoryEntry, Live, LiveReadError, LiveSettingsError, LiveSnapshot,
};
use petstore_resilience::{BreakerStatus, Mode, Policies};
use petstore_security::auth::Caller;
use petstore_web::{Json, Path, Problem, ProblemDocument, Query, RequestContext};

use crate::paging::Page;
use crate::AdminState;

/// The header that says why a change is made (kept in the history).
pub const CHANGE_REASON_HEADER: HeaderName = HeaderName::from_static("x-change-reason");

/// The live-settings routes.
pub fn router() -> Router<AdminState> {
    Router::new()
        .route(
            "/petstore-domain/admin/config",
            get(get_config).put(put_config),
        )
        .route("/petstore-domain/admin/config/history", get(config_history))
        .route("/petstore-domain/admin/circuit-breakers", get(get_breakers))
        .route(
            "/petstore-domain/admin/circuit-breakers/{dependency}",
            put(set_breaker),
        )
}

/// The live settings and their version.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigDocument {
    /// 0 before any change, then one more per change; also the `ETag`.
    pub version: u64,
    /// When the version was made (RFC 3339); absent for version 0 (the files as read).
    pub updated_at: Option<String>,
    /// Who made it: a user's subject, or `file`.
    pub updated_by: Option<String>,
    /// Every live setting: `feature_flags`, `security.rate_limits`,
    /// `providers.{payment,delivery}.{latency_ms,failure_rate}`, `saga.*_timeout_ms`,
    /// `resilience.{payment,delivery}.*`, `log.filter`.
    #[schema(value_type = Object)]
    pub settings: Value,
    /// The circuit breaker of each outbound dependency, in the process that answers (state,
    /// mode, the window's counts). Runtime state, not a setting: the `ETag` and a 304 are
    /// about `settings` only.
    pub circuit_breakers: BTreeMap<String, BreakerStatus>,
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

async fn document(snapshot: &LiveSnapshot, breakers: &Policies) -> Response {
    let body = ConfigDocument {
        version: snapshot.version,
        updated_at: snapshot.updated_at.clone(),
        updated_by: snapshot.updated_by.clone(),
        settings: snapshot.settings.to_value(),
        circuit_breakers: breakers.statuses().await,
    };
    (
        [
            (header::ETAG, etag(snapshot.version)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Json(body),
    )
        .into_response()
}

/// The versions an `If-Match` or `If-None-Match` header names (`*` is `None`: any).
fn versions_in(value: &HeaderValue) -> Result<Option<Vec<u64>>, Problem> {
    let text = value
        .to_str()
        .map_err(|_| Problem::bad_request("the entity tag must be ASCII"))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    text.split(',')
        .map(|tag| {
            let tag = tag.trim();
            let opaque = tag.strip_prefix("W/").unwrap_or(tag);
            // The quoted form is the standard; a bare version is accepted too.
            opaque
                .strip_prefix('"')
                .and_then(|tag| tag.strip_suffix('"'))
                .unwrap_or(opaque)
                .parse::<u64>()
                .ok()
                .ok_or_else(|| {
                    Problem::bad_request(format!(
                        "{tag:?} is not an entity tag of these settings (send the ETag, such as \"3\")"
                    ))
                })
        })
        .collect::<Result<Vec<u64>, Problem>>()
        .map(Some)
}

fn read_failure(error: &LiveReadError) -> Problem {
    Problem::from_failure(error)
}

/// The live settings.
///
/// The part of the configuration that may change while the service runs, with its version
/// (also the `ETag`; `If-None-Match` answers 304 when unchanged).
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/config",
    tag = "admin",
    params(("If-None-Match" = Option<String>, Header, description = "ETags from earlier answers; a tag that is not one of ours matches nothing")),
    responses(
        (status = 200, description = "The settings in force", body = ConfigDocument,
         headers(("ETag" = String, description = "The version, quoted"))),
        (status = 304, description = "Unchanged since the ETag given"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn get_config(
    State(AdminState {
        live,
        policies: breakers,
        ..
    }): State<AdminState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let snapshot = live.current();
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        // A tag that is not one of ours matches nothing: the document is sent.
        let unchanged = match versions_in(value) {
            Ok(None) => true,
            Ok(Some(versions)) => versions.contains(&snapshot.version),
            Err(_) => false,
        };
        if unchanged {
            return Ok((
                StatusCode::NOT_MODIFIED,
                [(header::ETAG, etag(snapshot.version))],
            )
                .into_response());
        }
    }
    Ok(document(&snapshot, &breakers).await)
}

/// Change live settings.
///
/// The body is a partial settings document, merged key by key (JSON merge patch, RFC 7386),
/// such as `{"feature_flags":{"pet_personalization":true}}`. The whole result is validated:
/// an unknown key, a wrong type or a refused value is a 422 and nothing changes. With
/// `If-Match` (an ETag from `GET`), a change made meanwhile by anyone is a 412. The change is
/// an event: it applies at once here and within a second on every instance, survives
/// restarts and is listed in `/history`. `X-Change-Reason` says why.
#[utoipa::path(
    put,
    path = "/petstore-domain/admin/config",
    tag = "admin",
    params(
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#, description = "Apply only at this version (an ETag)"),
        ("X-Change-Reason" = Option<String>, Header, pattern = "^[!-~]([ -~]{0,498}[!-~])?$", description = "Why, kept in the history: up to 500 printable ASCII characters, not starting or ending with a space"),
    ),
    request_body(content = Object, description = "A partial settings document"),
    responses(
        (status = 200, description = "The settings in force after the change", body = ConfigDocument,
         headers(("ETag" = String, description = "The new version, quoted"))),
        (status = 400, description = "A malformed If-Match or reason", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 412, description = "The settings changed since the If-Match version", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "The body is not JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "An unknown key, a wrong type or a refused value; nothing changed", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn put_config(
    State(AdminState {
        live,
        policies: breakers,
        ..
    }): State<AdminState>,
    caller: Caller,
    headers: HeaderMap,
    Json(patch): Json<Value>,
) -> Result<Response, Problem> {
    let expected_version = match headers.get(header::IF_MATCH) {
        None => None,
        Some(value) => match versions_in(value)? {
            None => None,
            Some(versions) if versions.len() == 1 => versions.first().copied(),
            Some(_) => return Err(Problem::bad_request("If-Match must name one version")),
        },
    };
    let reason = match headers.get(CHANGE_REASON_HEADER) {
        None => None,
        Some(value) => {
            let bytes = value.as_bytes();
            let printable = bytes.iter().all(|b| (b' '..=b'~').contains(b));
            let trimmed = bytes.first().is_some_and(|b| *b != b' ')
                && bytes.last().is_some_and(|b| *b != b' ');
            if !printable || !trimmed || bytes.len() > 500 {
                return Err(Problem::bad_request(
                    "X-Change-Reason must be 1 to 500 printable ASCII characters, not starting or ending with a space",
                ));
            }
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
    };
    let metadata = EventMetadata::new(RequestContext::correlation_id(), caller.subject());
    match live
        .change(patch, expected_version, reason, &metadata)
        .await
        .map_err(|error| read_failure(&error))?
    {
        Ok(snapshot) => Ok(document(&snapshot, &breakers).await),
        Err(LiveSettingsError::Invalid(error)) => Err(Problem::validation(match &error {
            petstore_settings::SettingsError::Invalid { key, reason } if key.is_empty() => {
                reason.clone()
            }
            petstore_settings::SettingsError::Invalid { key, reason } => format!("{key}: {reason}"),
            other => other.to_string(),
        })),
        Err(stale @ LiveSettingsError::StaleVersion { .. }) => Err(Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "stale-version",
            "Precondition failed",
            format!("{stale}: GET the settings again and retry with the new ETag"),
        )),
    }
}

/// Which changes to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Changes per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// Only versions below this one: the previous page's `next`.
    #[param(minimum = 1)]
    before: Option<i64>,
}

/// A page of the change history, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryPage {
    /// The changes.
    pub changes: Vec<HistoryEntry>,
    /// Pass it as `before` for the next page; absent on the last one.
    pub next: Option<u64>,
}

/// The history of the live settings.
///
/// Every change, newest first: its version, when, who (`file` for a file edit), why, and
/// each key with its old and new value.
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/config/history",
    tag = "admin",
    params(HistoryQuery),
    responses(
        (status = 200, description = "A page of changes", body = HistoryPage),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A bad limit", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn config_history(
    State(live): State<Live>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<HistoryPage>, Problem> {
    let page = Page::new(query.limit, 50, query.before).map_err(Problem::validation)?;
    let changes = live
        .history(
            page.limit,
            page.before.and_then(|before| u64::try_from(before).ok()),
        )
        .await
        .map_err(|error| read_failure(&error))?;
    let next = page
        .next(&changes, |entry| entry.version)
        .filter(|version| *version > 1);
    Ok(Json(HistoryPage { changes, next }))
}

/// The circuit breakers.
///
/// Each outbound dependency's breaker in the process that answers: its state (`closed`,
/// `open`, `half_open`), its mode, the counts of its window, calls in flight.
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/circuit-breakers",
    tag = "admin",
    responses(
        (status = 200, description = "Each breaker, by dependency", body = BTreeMap<String, BreakerStatus>),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn get_breakers(
    State(AdminState {
        policies: breakers, ..
    }): State<AdminState>,
) -> Json<BTreeMap<String, BreakerStatus>> {
    Json(breakers.statuses().await)
}

/// How an admin sets a breaker.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerModeBody {
    /// `forced_open` (no call is made, for maintenance), `forced_closed` (every call is made,
    /// none counted) or `automatic` (it decides again, starting closed).
    pub mode: Mode,
}

/// Force a circuit breaker open or closed, or release it.
///
/// Acts on the breaker of the process that answers (breakers are per process) until it is
/// released or the process restarts. Logged with the admin's subject.
#[utoipa::path(
    put,
    path = "/petstore-domain/admin/circuit-breakers/{dependency}",
    tag = "admin",
    params(("dependency" = String, Path, description = "`payment` or `delivery`")),
    request_body = BreakerModeBody,
    responses(
        (status = 200, description = "The breaker after the change", body = BreakerStatus),
        (status = 400, description = "Malformed JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such dependency", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "The body is not JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "An unknown mode or field", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn set_breaker(
    State(AdminState {
        policies: breakers, ..
    }): State<AdminState>,
    caller: Caller,
    Path(dependency): Path<String>,
    Json(body): Json<BreakerModeBody>,
) -> Result<Json<BreakerStatus>, Problem> {
    let Some(policy) = breakers.get(&dependency) else {
        let known: Vec<&str> = breakers.all().iter().map(|policy| policy.name()).collect();
        return Err(Problem::not_found(format!(
            "no circuit breaker {dependency:?} (there are: {})",
            known.join(", ")
        )));
    };
    tracing::warn!(subject = caller.subject(), dependency, mode = ?body.mode, "an admin sets a circuit breaker");
    policy.set_mode(body.mode).await;
    Ok(Json(policy.status().await))
}

/// The OpenAPI description of the live-settings and circuit-breaker routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(get_config, put_config, config_history, get_breakers, set_breaker),
    components(schemas(
        BreakerStatus,
        BreakerModeBody,
        Mode,
        ConfigDocument,
        HistoryPage,
        HistoryEntry,
        ChangeSource,
        petstore_settings::SettingChange
    ))
)]
pub struct LiveApiDoc;
