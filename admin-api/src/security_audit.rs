//! The security audit trail, for admins: logins, token rejections, refusals, rate-limit
//! trips, admin actions and key-set fetches (recorded by `petstore_security::auth`).

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_security::audit::{SecurityAuditEntry, SecurityAuditFilter, SecurityEventKind};
use petstore_web::{Json, Problem, ProblemDocument, Query};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::paging::Page;
use crate::AdminState;

/// The security audit route (admin only: the guard refuses others on `/admin/*`).
pub fn router() -> Router<AdminState> {
    Router::new().route("/petstore-domain/admin/audit/security", get(security_audit))
}

/// Which entries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecurityAuditQuery {
    /// Only this subject's entries (for a login: the username tried).
    #[param(max_length = 256)]
    subject: Option<String>,
    /// Only this kind.
    kind: Option<SecurityEventKind>,
    /// Only entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only entries before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Only entries older than this id: the previous page's `next`.
    #[param(minimum = 1)]
    before: Option<i64>,
    /// Entries per page, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// A page of the security audit trail, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecurityAuditPage {
    /// The entries.
    pub entries: Vec<SecurityAuditEntry>,
    /// Pass it as `before` for the next page; absent on the last one.
    pub next: Option<i64>,
}

fn time_ms(name: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    value
        .map(|text| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp_millis())
                .map_err(|_| Problem::validation(format!("{name} must be an RFC 3339 time")))
        })
        .transpose()
}

/// The security audit trail.
///
/// Newest first, a page at a time. Entries never hold a token or a password.
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/audit/security",
    tag = "admin",
    params(SecurityAuditQuery),
    responses(
        (status = 200, description = "A page of entries", body = SecurityAuditPage),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A bad filter", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn security_audit(
    State(state): State<AdminState>,
    Query(query): Query<SecurityAuditQuery>,
) -> Result<Json<SecurityAuditPage>, Problem> {
    let page = Page::new(query.limit, 100, query.before).map_err(Problem::validation)?;
    if query
        .subject
        .as_ref()
        .is_some_and(|subject| subject.len() > 256)
    {
        return Err(Problem::validation(
            "subject must be at most 256 characters",
        ));
    }
    let filter = SecurityAuditFilter {
        subject: query.subject,
        kind: query.kind,
        since_ms: time_ms("since", query.since.as_deref())?,
        until_ms: time_ms("until", query.until.as_deref())?,
        before_id: page.before,
        limit: page.limit,
    };
    let entries = state
        .security_audit
        .query(&filter)
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    let next = page.next(&entries, |entry| entry.id);
    Ok(Json(SecurityAuditPage { entries, next }))
}

/// The OpenAPI description of the security audit route.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(security_audit),
    components(schemas(
        SecurityAuditPage,
        SecurityAuditEntry,
        petstore_security::audit::SecurityEventKind,
        ProblemDocument,
    ))
)]
pub struct SecurityAuditApiDoc;
