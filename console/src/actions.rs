//! How every console write is made: its form's CSRF token checked, refused when the console
//! is read-only, then recorded as an operator action (who, what, parameters, before and
//! after; [`petstore_event_store::operator`]). An action about an order is recorded under the
//! order's correlation id, so it stands in the order's timeline; its causation is the
//! request.

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use petstore_domain::order::AGGREGATE_TYPE as ORDER;
use petstore_domain::OrderId;
use petstore_event_store::metadata::EventMetadata;
use petstore_event_store::operator::{self, OperatorActed};
use petstore_event_store::stream;
use petstore_telemetry::CorrelationId;
use petstore_web::{Problem, RequestContext};

use crate::session::check_csrf;
use crate::ConsoleState;

/// Refuses a write: a form without its session's token (403), or any write while
/// `console.read_only` is set (403).
pub(crate) fn may_write(
    state: &ConsoleState,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(), Problem> {
    check_csrf(state, headers, csrf)?;
    if state.settings.read_only {
        return Err(Problem::forbidden(
            "the console is read-only here (console.read_only): nothing was changed",
        ));
    }
    Ok(())
}

/// Records `acted`, made by `subject`.
pub(crate) async fn record(
    state: &ConsoleState,
    subject: &str,
    acted: OperatorActed,
) -> Result<(), Problem> {
    let request = RequestContext::correlation_id();
    let correlation = match acted.order_id {
        Some(order_id) => order_correlation(state, &order_id).await?,
        None => None,
    };
    let mut metadata = EventMetadata::new(correlation.unwrap_or(request.clone()), subject);
    metadata.causation_id = request.as_str().to_owned();
    operator::record(&state.store, acted, &metadata)
        .await
        .map_err(|error| Problem::internal(&error))
}

/// The correlation id `order_id`'s saga runs under, if the order exists.
async fn order_correlation(
    state: &ConsoleState,
    order_id: &OrderId,
) -> Result<Option<CorrelationId>, Problem> {
    let correlation = stream::correlation_of(&state.database, ORDER, &order_id.to_string())
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    Ok(correlation.as_deref().and_then(CorrelationId::parse))
}

/// 303 to `location`: the page to see the outcome on.
pub(crate) fn see(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
