//! Order status.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_domain::OrderId;
use petstore_platform::http::{Json, Path, Problem, ProblemDocument};
use petstore_projector::OrderStatusView;

use crate::QueryState;

/// The order routes.
pub fn router() -> Router<QueryState> {
    Router::new().route(
        "/petstore-domain/orders/{order_id}/status",
        get(order_status),
    )
}

/// Where an order stands.
///
/// The status is one lower-case word: `pending`, `reserved`, `paid`, `scheduled`, and the
/// terminal `completed` and `cancelled` (with a machine-readable `cancellation_reason`).
/// The read model follows the events within milliseconds; a just-placed order may answer 404
/// for that long.
#[utoipa::path(
    get,
    path = "/petstore-domain/orders/{order_id}/status",
    tag = "orders",
    params(("order_id" = String, Path, description = "The order's UUID")),
    responses(
        (status = 200, description = "The order's status", body = OrderStatusView),
        (status = 400, description = "Not a UUID", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(order_id = %order_id), err(Debug, level = "debug"))]
pub async fn order_status(
    State(state): State<QueryState>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderStatusView>, Problem> {
    let order_id =
        OrderId::parse(&order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    match state
        .read_models
        .order(&order_id)
        .await
        .map_err(|error| Problem::internal(&error))?
    {
        Some(view) => Ok(Json(view)),
        None => Err(Problem::not_found(format!(
            "order {order_id} does not exist"
        ))),
    }
}
