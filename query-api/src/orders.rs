//! Order status.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_domain::OrderId;
use petstore_read_models::OrderStatusView;
use petstore_security::auth::Caller;
use petstore_web::{Json, Path, Problem, ProblemDocument, RequestContext};

use crate::reads::ConsistencyToken;
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
/// terminal `completed` and `cancelled` (with a machine-readable `cancellation_reason`). A
/// cancelled order is `compensating` (not terminal) until every compensation is recorded
/// (payment refunded, pet released, delivery cancelled): `cancelled` means nothing is left
/// to undo.
/// The read model follows the events within milliseconds. An order the event store holds
/// but the read model does not show yet (just placed) is waited for, up to
/// `http.consistency_wait_ms`, so the 202's `Location` answers at once; so does a request that
/// sends back the `X-Consistency-Token` the POST answered with (it waits until the read model
/// shows that write). Past the bound the answer is 409 with `Retry-After`. An id the store
/// does not hold is 404 at once.
#[utoipa::path(
    get,
    path = "/petstore-domain/orders/{order_id}/status",
    tag = "orders",
    params(
        ("order_id" = String, Path, format = Uuid, description = "The order's UUID"),
        ("X-Consistency-Token" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "From a command's response: wait until the read model shows that write"),
    ),
    responses(
        (status = 200, description = "The order's status", body = OrderStatusView),
        (status = 400, description = "Not a UUID", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "The order belongs to another customer", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The read model did not reach the order or the consistency token in time", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn order_status(
    State(state): State<QueryState>,
    caller: Caller,
    Path(order_id): Path<String>,
    token: ConsistencyToken,
) -> Result<Json<OrderStatusView>, Problem> {
    let order_id =
        OrderId::parse(&order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    RequestContext::record_order(&order_id);
    match state.order(&order_id, token).await? {
        Some(mut view) => {
            caller.authorize_customer(view.customer_id.as_str())?;
            view.attention = state.attention(&order_id).await;
            Ok(Json(view))
        }
        None => Err(Problem::not_found(format!(
            "order {order_id} does not exist"
        ))),
    }
}
