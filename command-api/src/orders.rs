//! Placing orders.

use crate::CommandError;
use axum::extract::State;
use axum::http::header::{HeaderMap, HeaderValue, LOCATION};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use cqrs_es::Aggregate;
use petstore_domain::order::{Order, OrderCommand, OrderRequest, OrderStatus};
use petstore_domain::pet::Pet;
use petstore_domain::SagaStep;
use petstore_domain::{CustomerId, OrderId, PetId, SimulatedFailure, SpecialInstructions};
use petstore_event_store::deadlines::{self, Deadline, DeadlineKind};
use petstore_event_store::store::EventMetadata;
use petstore_event_store::stream;
use petstore_security::auth::Caller;
use petstore_settings::Flag;
use petstore_web::{Json, Problem, ProblemDocument, RequestContext, CONSISTENCY_TOKEN_HEADER};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::CommandState;

/// The header a client sets to make a POST safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header that makes one step of this order's saga fail (the seed's resilience demo).
pub const SIMULATE_FAILURE: &str = "x-simulate-failure";

/// The order routes.
pub fn router() -> Router<CommandState> {
    Router::new()
        .route("/petstore-domain/orders", post(place_order))
        .route("/petstore-domain/create-order", post(create_order_legacy))
}

/// The values of `X-Simulate-Failure` (for the OpenAPI document).
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: the header is parsed by `SimulatedFailure::parse`
#[schema(rename_all = "kebab-case")]
pub enum SimulatedFailureHeader {
    /// The reservation step fails.
    InventoryService,
    /// The payment step fails.
    PaymentService,
    /// The delivery step fails.
    DeliveryService,
}

/// What a customer sends to order a pet.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderBody {
    /// Who orders: 1 to 128 characters of letters, digits and `-_.@+`. A customer orders as
    /// the token's subject (another id is 403; omitted, the subject is used); an admin may
    /// order for anyone.
    #[schema(example = "customer-001", pattern = "^[A-Za-z0-9._@+-]{1,128}$")]
    #[serde(default)]
    pub customer_id: Option<String>,
    /// The pet's id.
    #[schema(
        example = "golden-retriever-001",
        pattern = "^[a-z0-9]+(-[a-z0-9]+)*$",
        max_length = 64
    )]
    pub pet_id: String,
    /// Up to 500 characters of free text.
    #[schema(
        example = "Please include vaccination records",
        max_length = 500,
        pattern = "^[^\\u0000-\\u0009\\u000b-\\u001f\\u007f-\\u009f]*$"
    )]
    #[serde(default)]
    pub special_instructions: Option<String>,
}

/// The answer to an accepted order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderAccepted {
    /// The order's id; `GET /petstore-domain/orders/{order_id}/status` tracks it.
    pub order_id: String,
    /// The order's status (`pending` for a new order).
    pub status: String,
    /// The request's correlation id; every event of the order's saga carries it.
    pub correlation_id: String,
}

/// Place an order for a pet.
///
/// The order is accepted (202) and fulfilled asynchronously; follow it at the `Location`.
/// With an `Idempotency-Key`, repeating the request returns the same order instead of placing
/// a second one; reusing a key for a different order is refused (422).
#[utoipa::path(
    post,
    path = "/petstore-domain/orders",
    tag = "orders",
    request_body = PlaceOrderBody,
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$", description = "1 to 255 visible ASCII characters; a retried request with the same key returns the same order"),
        ("X-Correlation-ID" = Option<String>, Header, pattern = "^[A-Za-z0-9._:-]{1,128}$", description = "echoed on the response and stored on every event of the order"),
        ("X-Simulate-Failure" = Option<SimulatedFailureHeader>, Header, description = "inventory-service, payment-service or delivery-service: make that step of this order's saga fail (when providers.allow_simulated_failures)"),
    ),
    responses(
        (status = 202, description = "Order accepted", body = OrderAccepted,
         headers(("Location" = String, description = "The order's status URL"),
                 ("X-Consistency-Token" = String, description = "Send it back on a GET to read your own write"))),
        (status = 400, description = "Malformed JSON or header", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "customer_id is another customer's", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "Concurrent changes kept conflicting", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "Body is not application/json", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No pet has this id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field, or reused Idempotency-Key", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "Event store unreachable", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn place_order(
    State(state): State<CommandState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<PlaceOrderBody>,
) -> Result<Response, CommandError> {
    let customer_id = match body.customer_id.as_deref() {
        Some(customer_id) => {
            let customer_id = CustomerId::parse(customer_id)?;
            if !caller.is_admin() && customer_id != *caller.customer_id()? {
                return Err(Problem::forbidden(
                    "customer_id must be your own (the customer your token names)",
                )
                .into());
            }
            customer_id
        }
        None => caller.customer_id()?.clone(),
    };
    let pet_id = PetId::parse(&body.pet_id)?;
    let special_instructions = body
        .special_instructions
        .as_deref()
        .map(SpecialInstructions::parse)
        .transpose()?;
    let simulated_failure = match headers.get(SIMULATE_FAILURE) {
        None => None,
        Some(_) if !state.providers.allow_simulated_failures => {
            return Err(Problem::validation(
                "X-Simulate-Failure is disabled here (providers.allow_simulated_failures)",
            )
            .into())
        }
        Some(value) => Some(SimulatedFailure::parse(value.to_str().unwrap_or_default())?),
    };
    let idempotent = headers.contains_key(IDEMPOTENCY_KEY);
    let order_id = match headers.get(IDEMPOTENCY_KEY) {
        Some(key) => OrderId::from_idempotency_key(caller.subject(), parse_idempotency_key(key)?),
        None => OrderId::random(),
    };
    RequestContext::record_order(&order_id);

    let pet: Pet = state.store.load(pet_id.as_str()).await?;
    let Some(details) = pet.details() else {
        return Err(Problem::not_found(format!("no pet has id {pet_id}")).into());
    };
    // The order keeps the payment mode of the moment it was placed.
    let express = RequestContext::served_flag(
        Flag::ExpressOrderProcessing,
        state
            .live
            .flag(Flag::ExpressOrderProcessing, customer_id.as_str()),
    );
    let command = OrderCommand::PlaceOrder(OrderRequest {
        order_id,
        customer_id,
        pet_id,
        amount: details.price,
        special_instructions,
        simulated_failure,
        express_processing: Some(express),
    });
    let correlation_id = RequestContext::correlation_id();
    let metadata = EventMetadata::new(correlation_id.clone(), caller.subject())
        .with_flag(Flag::ExpressOrderProcessing, express);
    let appended = if idempotent {
        state
            .store
            .execute::<Order>(&order_id.to_string(), command, &(), &metadata)
            .await?
    } else {
        // A fresh random id: nothing to load.
        state
            .store
            .execute_on_new::<Order>(&order_id.to_string(), command, &(), &metadata)
            .await?
    };
    let mut correlation_id = correlation_id.to_string();
    let key = order_id.to_string();
    let token = state.consistency_token(
        Order::TYPE,
        &key,
        appended.last().map_or(1, |event| event.sequence),
    );
    let (status, token) = if appended.is_empty() {
        // A retried request: answer with the order as it stands now, and the correlation id
        // its events carry (the first request's).
        let order: Order = state.store.load(&key).await?;
        if let Some(original) =
            stream::correlation_of(state.store.database(), Order::TYPE, &key).await?
        {
            correlation_id = original;
        }
        (order.status().unwrap_or(OrderStatus::Pending), token.await)
    } else {
        // Two independent statements on two connections: one round trip's wait, not two.
        let ((), token) = tokio::join!(
            schedule_reservation_deadline(&state, order_id, &correlation_id),
            token
        );
        (OrderStatus::Pending, token)
    };
    let location = format!("/petstore-domain/orders/{order_id}/status");
    let mut response = (
        StatusCode::ACCEPTED,
        Json(OrderAccepted {
            order_id: order_id.to_string(),
            status: status.as_str().to_owned(),
            correlation_id,
        }),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    if let Some(token) = token {
        response
            .headers_mut()
            .insert(CONSISTENCY_TOKEN_HEADER, token);
    }
    Ok(response)
}

/// Schedules the new order's reservation deadline, as its saga does when it handles
/// `OrderCreated` (whichever comes first stays): so the deadline fires even if no saga runner
/// ever takes the order (its Kafka partition not consumed). A failure is logged, not
/// answered: the order is stored, and its saga schedules the deadline too.
async fn schedule_reservation_deadline(
    state: &CommandState,
    order_id: OrderId,
    correlation_id: &str,
) {
    let timeout = state.live.current().settings.saga.reservation_timeout_ms;
    let deadline = Deadline {
        order_id,
        kind: DeadlineKind::Step(SagaStep::Reservation),
        due_at: Utc::now()
            + chrono::Duration::milliseconds(i64::try_from(timeout).unwrap_or(i64::MAX)),
        correlation_id: correlation_id.to_owned(),
    };
    if let Err(error) = deadlines::schedule(state.store.database(), &deadline).await {
        tracing::warn!(%error, "the reservation deadline was not scheduled; the saga schedules it");
    }
}

/// Legacy alias of `POST /petstore-domain/orders`.
#[utoipa::path(
    post,
    path = "/petstore-domain/create-order",
    tag = "orders",
    request_body = PlaceOrderBody,
    responses(
        (status = 202, description = "Order accepted", body = OrderAccepted),
        (status = "4XX", description = "As for POST /petstore-domain/orders", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn create_order_legacy(
    state: State<CommandState>,
    caller: Caller,
    headers: HeaderMap,
    body: Json<PlaceOrderBody>,
) -> Result<Response, CommandError> {
    place_order(state, caller, headers, body).await
}

fn parse_idempotency_key(value: &HeaderValue) -> Result<&str, Problem> {
    value
        .to_str()
        .ok()
        .filter(|key| {
            !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })
}
