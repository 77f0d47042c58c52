//! The audit trail: every event that shares an order's correlation id, across aggregates, in
//! stream order, with its metadata. Read straight from the event store.

use crate::error::failed;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use petstore_domain::OrderId;
use petstore_event_store::database::Database;
use petstore_event_store::stream::{self, Payload, RecordedEvent, StreamError};
use petstore_security::auth::Caller;
use petstore_web::{Json, Path, Problem, ProblemDocument, RequestContext};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::QueryState;

/// The audit routes.
pub fn router() -> Router<QueryState> {
    Router::new().route("/petstore-domain/orders/{order_id}/audit", get(order_audit))
}

/// One event of an audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// The event's stable id.
    pub event_id: String,
    /// The event type, e.g. `OrderCreated`.
    pub event_type: String,
    /// The event's schema version.
    pub event_version: String,
    /// `Order`, `Pet`, `Payment` or `Delivery`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The event's number within its aggregate.
    pub sequence: i64,
    /// The event's global position.
    pub global_position: i64,
    /// Shared by everything one request caused. Absent only on an event the service did not append.
    pub correlation_id: Option<String>,
    /// What caused the command: a request, an event id, or a deadline. Absent only on an event the service did not append.
    pub causation_id: Option<String>,
    /// Who acted: a user, `saga`, or `system`. Absent only on an event the service did not append.
    pub subject: Option<String>,
    /// The command's id. Absent only on an event the service did not append.
    pub command_id: Option<String>,
    /// When the command ran (RFC 3339). Absent only on an event the service did not append.
    pub timestamp: Option<String>,
    /// The live settings version the command was decided under (absent on events stored
    /// before settings were versioned).
    pub settings_version: Option<u64>,
    /// The feature flags that took part in the decision, on (`true`) or off.
    pub feature_flags: std::collections::BTreeMap<String, bool>,
    /// The event itself.
    #[schema(value_type = serde_json::Value)]
    pub payload: Payload,
}

impl From<RecordedEvent> for AuditEntry {
    fn from(event: RecordedEvent) -> Self {
        let event_id = event.event_id().to_string();
        let metadata = event.metadata;
        Self {
            event_id,
            correlation_id: metadata.correlation_id,
            causation_id: metadata.causation_id,
            subject: metadata.subject,
            command_id: metadata.command_id.map(|id| id.to_string()),
            timestamp: metadata.timestamp,
            settings_version: metadata.settings_version,
            feature_flags: metadata.feature_flags,
            event_type: event.event_type,
            event_version: event.event_version,
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            sequence: event.sequence,
            global_position: event.position.global_position,
            payload: event.payload,
        }
    }
}

/// An audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditTrail {
    /// The correlation id every entry shares.
    pub correlation_id: String,
    /// The events, in stream order.
    pub events: Vec<AuditEntry>,
}

impl AuditTrail {
    /// The customer who placed `order_id`, from its `OrderCreated` event.
    pub fn customer_of(&self, order_id: &OrderId) -> Option<String> {
        let order_id = order_id.to_string();
        self.events
            .iter()
            .find(|event| event.event_type == "OrderCreated" && event.aggregate_id == order_id)
            .and_then(|event| event.payload.variant_field("customer_id"))
    }
}

/// Every event sharing `correlation_id`.
pub async fn by_correlation(
    database: &Database,
    correlation_id: &str,
) -> Result<AuditTrail, StreamError> {
    let events = stream::events_with_correlation(database, correlation_id).await?;
    Ok(AuditTrail {
        correlation_id: correlation_id.to_owned(),
        events: events.into_iter().map(AuditEntry::from).collect(),
    })
}

/// Every event sharing the correlation id of the order's placement; `None` for an unknown
/// order.
pub async fn by_order(
    database: &Database,
    order_id: &OrderId,
) -> Result<Option<AuditTrail>, StreamError> {
    let Some(correlation_id) = stream::correlation_of(
        database,
        petstore_domain::order::AGGREGATE_TYPE,
        &order_id.to_string(),
    )
    .await?
    else {
        return Ok(None);
    };
    by_correlation(database, &correlation_id).await.map(Some)
}

/// The audit trail of an order.
///
/// Every event that shares the order's correlation id (its placement, the saga's commands
/// on the pet, payment and delivery, deadlines, the customer's payment), in stream order.
#[utoipa::path(
    get,
    path = "/petstore-domain/orders/{order_id}/audit",
    tag = "orders",
    params(("order_id" = String, Path, format = Uuid, description = "The order's UUID")),
    responses(
        (status = 200, description = "The audit trail", body = AuditTrail),
        (status = 400, description = "Not a UUID", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "The order belongs to another customer", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn order_audit(
    State(state): State<QueryState>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<Json<AuditTrail>, Problem> {
    let order_id =
        OrderId::parse(&order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    RequestContext::record_order(&order_id);
    match by_order(&state.database, &order_id).await.map_err(failed)? {
        Some(trail) => {
            caller.authorize_customer(&trail.customer_of(&order_id).unwrap_or_default())?;
            Ok(Json(trail))
        }
        None => Err(Problem::not_found(format!(
            "order {order_id} does not exist"
        ))),
    }
}
