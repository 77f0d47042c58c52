//! The dead-letter admin routes: list, retry, skip. The dead letters themselves are
//! `petstore-event-store`'s ([`petstore_event_store::dead_letters`]), re-exported here.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use petstore_event_store::dead_letters::*;

use crate::database::Database;

/// The admin routes of the dead letters.
pub fn router(database: Database) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/petstore-domain/admin/dead-letters", get(list_route))
        .route(
            "/petstore-domain/admin/dead-letters/{id}/retry",
            post(retry_route),
        )
        .route(
            "/petstore-domain/admin/dead-letters/{id}/skip",
            post(skip_route),
        )
        .with_state(database)
}

/// Which dead letters to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only those with this status.
    status: Option<DeadLetterStatus>,
    /// At most this many, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// The dead letters, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// The dead letters.
    pub dead_letters: Vec<DeadLetter>,
}

/// The dead letters.
///
/// Events a consumer could not decode or apply and set aside, newest first, with the error.
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/dead-letters",
    tag = "admin",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "The dead letters", body = DeadLetterPage),
        (status = 400, description = "A limit out of range", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "An unknown status or parameter", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn list_route(
    axum::extract::State(database): axum::extract::State<Database>,
    crate::http::Query(query): crate::http::Query<DeadLetterQuery>,
) -> Result<crate::http::Json<DeadLetterPage>, crate::http::Problem> {
    use crate::http::Problem;
    let limit = query.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be 1 to 500"));
    }
    let dead_letters = list(&database, query.status, limit)
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    Ok(crate::http::Json(DeadLetterPage { dead_letters }))
}

/// Retry a dead letter.
///
/// Its consumer handles the event again within a second or so (the saga runner's deadline
/// loop): `resolved` when it succeeds, `pending` again with the new error when not.
#[utoipa::path(
    post,
    path = "/petstore-domain/admin/dead-letters/{id}/retry",
    tag = "admin",
    params(("id" = i64, Path, description = "The dead letter")),
    responses(
        (status = 200, description = "Marked `retrying`", body = DeadLetter),
        (status = 400, description = "A malformed id", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Resolved or skipped already", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn retry_route(
    axum::extract::State(database): axum::extract::State<Database>,
    crate::http::Path(id): crate::http::Path<i64>,
) -> Result<crate::http::Json<DeadLetter>, crate::http::Problem> {
    Ok(crate::http::Json(
        act(&database, id, DeadLetterStatus::Retrying).await?,
    ))
}

/// Discard a dead letter.
///
/// The event stays in the log; its consumer never handles it.
#[utoipa::path(
    post,
    path = "/petstore-domain/admin/dead-letters/{id}/skip",
    tag = "admin",
    params(("id" = i64, Path, description = "The dead letter")),
    responses(
        (status = 200, description = "Marked `skipped`", body = DeadLetter),
        (status = 400, description = "A malformed id", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Resolved or skipped already", body = crate::http::ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn skip_route(
    axum::extract::State(database): axum::extract::State<Database>,
    crate::http::Path(id): crate::http::Path<i64>,
) -> Result<crate::http::Json<DeadLetter>, crate::http::Problem> {
    Ok(crate::http::Json(
        act(&database, id, DeadLetterStatus::Skipped).await?,
    ))
}

/// The OpenAPI description of the dead-letter routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_route, retry_route, skip_route),
    components(schemas(DeadLetter, DeadLetterPage, DeadLetterStatus))
)]
pub struct DeadLettersApiDoc;
