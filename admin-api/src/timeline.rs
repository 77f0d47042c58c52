//! The order timeline route: what happened to an order and what it waits for, the same
//! document `petstore explain` prints. Folded by `petstore-read-models`
//! ([`petstore_read_models::timeline`]).

use axum::extract::State;
use chrono::Utc;
use petstore_domain::OrderId;
use petstore_event_store::database::Database;
use petstore_read_models::timeline::{
    self, ArmedDeadline, EntryKind, KafkaCoordinates, Now, PartitionOwner, ProviderCall, Timeline,
    TimelineEntry, Verdict,
};
use petstore_read_models::views::SagaStepView;
use petstore_web::{Json, Path, Problem, ProblemDocument, Query, RequestContext};
use serde::Deserialize;

use crate::paging::Page;
use crate::AdminState;

/// The timeline route.
pub fn router() -> axum::Router<AdminState> {
    axum::Router::new().route(
        "/petstore-domain/admin/orders/{order_id}/timeline",
        axum::routing::get(timeline_route),
    )
}

/// Which page of a timeline.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// Only entries after this index: the previous page's `next_after`.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many entries, 1 to 500 (default 500).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
}

/// An order's timeline.
///
/// Every entry of the order in commit order (commands accepted, events, saga steps started
/// and ended, compensations, deadlines scheduled, extended, fired or cancelled, dead
/// letters), each with its time, global position, correlation and causation id, subject and
/// trace id; and a "now" block: the status, what the saga waits for, the deadline and the
/// time left, the next retry, the last error, who owns the order's saga partition, and the
/// verdict (`terminal`, `in_flight`, `stuck`). Pages of at most 500 entries.
#[utoipa::path(
    get,
    path = "/petstore-domain/admin/orders/{order_id}/timeline",
    tag = "admin",
    params(
        ("order_id" = String, Path, format = Uuid, description = "The order's UUID"),
        TimelineQuery
    ),
    responses(
        (status = 200, description = "The timeline (one page of it)", body = Timeline),
        (status = 400, description = "Not a UUID, or a limit or cursor out of range", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "An unknown parameter", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn timeline_route(
    State(database): State<Database>,
    Path(order_id): Path<String>,
    Query(query): Query<TimelineQuery>,
) -> Result<Json<Timeline>, Problem> {
    let order_id =
        OrderId::parse(&order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    RequestContext::record_order(&order_id);
    let page = Page::new(
        query.limit.map(|limit| u32::try_from(limit).unwrap_or(0)),
        500,
        None,
    )
    .map_err(Problem::bad_request)?;
    let after = query
        .after
        .map(usize::try_from)
        .transpose()
        .map_err(|_| Problem::bad_request("after must be 0 or more"))?;
    timeline::of_order(&database, &order_id, Utc::now(), after, page.limit as usize)
        .await
        .map_err(|error| Problem::from_failure(&error))?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("order {order_id} does not exist")))
}

/// The OpenAPI description of the timeline route.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(timeline_route),
    components(schemas(
        Timeline,
        TimelineEntry,
        EntryKind,
        Now,
        Verdict,
        ArmedDeadline,
        PartitionOwner,
        ProviderCall,
        KafkaCoordinates,
        SagaStepView
    ))
)]
pub struct TimelineApiDoc;
