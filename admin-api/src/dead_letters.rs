//! The dead-letter admin routes: list, retry, skip. The dead letters themselves are
//! `petstore-event-store`'s ([`petstore_event_store::dead_letters`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use petstore_event_store::database::Database;
use petstore_event_store::dead_letters::{act, list, ActError, DeadLetter, DeadLetterStatus};
use petstore_web::{Json, Path, Problem, ProblemDocument, Query};

use crate::paging::Page;
use crate::AdminState;

/// The admin routes of the dead letters.
pub fn router() -> axum::Router<AdminState> {
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
        (status = 400, description = "A limit out of range", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "An unknown status or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn list_route(
    axum::extract::State(database): axum::extract::State<Database>,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let page = Page::new(
        query.limit.map(|limit| u32::try_from(limit).unwrap_or(0)),
        100,
        None,
    )
    .map_err(Problem::bad_request)?;
    let dead_letters = list(&database, query.status, i64::from(page.limit))
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    Ok(Json(DeadLetterPage { dead_letters }))
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
        (status = 400, description = "A malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Resolved or skipped already", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn retry_route(
    axum::extract::State(database): axum::extract::State<Database>,
    Path(id): Path<i64>,
) -> Result<Json<DeadLetter>, Problem> {
    act_on(&database, id, DeadLetterStatus::Retrying).await
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
        (status = 400, description = "A malformed id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Resolved or skipped already", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn skip_route(
    axum::extract::State(database): axum::extract::State<Database>,
    Path(id): Path<i64>,
) -> Result<Json<DeadLetter>, Problem> {
    act_on(&database, id, DeadLetterStatus::Skipped).await
}

/// Moves dead letter `id` to `status`: the row as it then stands, or why the action was
/// refused (404 for an unknown one, 409 for one already settled, 503 or 500 when the
/// database failed).
async fn act_on(
    database: &Database,
    id: i64,
    status: DeadLetterStatus,
) -> Result<Json<DeadLetter>, Problem> {
    act(database, id, status)
        .await
        .map(Json)
        .map_err(|error| match &error {
            ActError::NotFound(_) => Problem::not_found(error.to_string()),
            ActError::NotOpen(_) => Problem::conflict(error.to_string()),
            ActError::Database(cause) => Problem::from_failure(cause),
        })
}

/// The OpenAPI description of the dead-letter routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_route, retry_route, skip_route),
    components(schemas(DeadLetter, DeadLetterPage, DeadLetterStatus))
)]
pub struct DeadLettersApiDoc;
