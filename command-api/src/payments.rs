//! Paying an order that waits for its payment (an order placed while
//! `express_order_processing` was off leaves charging to the customer, until the payment
//! deadline).

use std::sync::Arc;

use crate::CommandError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use cqrs_es::Aggregate;
use petstore_domain::order::{Order, OrderStatus};
use petstore_domain::payment::{Payment, PaymentCommand, PaymentState};
use petstore_domain::providers::{ChargeRequest, PaymentGateway};
use petstore_domain::values::Currency;
use petstore_domain::{Money, OrderId};
use petstore_event_store::records::{Operation, Provider, Record, RefusedCommand};
use petstore_event_store::store::EventMetadata;
use petstore_event_store::stream;
use petstore_resilience::CallError;
use petstore_security::auth::Caller;
use petstore_settings::Flag;
use petstore_web::{
    CorrelationId, Json, Problem, ProblemDocument, RequestContext, CONSISTENCY_TOKEN_HEADER,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use petstore_saga::providers;

use crate::CommandState;

/// The payment routes.
pub fn router() -> axum::Router<CommandState> {
    Router::new()
        .route("/petstore-domain/payments", post(pay_order))
        .route(
            "/petstore-domain/process-payment",
            post(process_payment_legacy),
        )
}

/// An amount in minor units.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AmountBody {
    /// Minor units (cents).
    #[schema(minimum = 0)]
    #[serde(deserialize_with = "whole_number")]
    pub amount_minor: i64,
    /// ISO 4217 code.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
}

/// An integer as JSON Schema means it: `3346` or `3346.0` (a number with no fraction).
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(value) = number.as_i64() {
        return Ok(value);
    }
    number
        .as_f64()
        .filter(|value| value.fract() == 0.0 && value.abs() < 9.007_199_254_740_992e15)
        .map(|value| value as i64)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("{number} is not a whole number of minor units"))
        })
}

/// A customer's payment for an order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    /// The order to pay.
    #[schema(format = Uuid)]
    pub order_id: String,
    /// What the customer expects to pay; when given it must equal the order's amount.
    #[serde(default)]
    pub amount: Option<AmountBody>,
}

/// A recorded payment.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PaymentResult {
    /// The order paid.
    pub order_id: String,
    /// `processed`.
    pub status: String,
    /// What was charged.
    pub amount: AmountBody,
    /// The gateway's reference.
    pub provider_reference: String,
}

/// Pay an order.
///
/// Only for orders whose saga waits for the customer's payment (status `reserved`, placed
/// while `express_order_processing` was off); 503 while `payment_processing` is off. Retrying is safe: an order is charged at most once.
/// A declined payment answers 402 and cancels the order.
#[utoipa::path(
    post,
    path = "/petstore-domain/payments",
    tag = "payments",
    request_body = PaymentBody,
    responses(
        (status = 200, description = "Paid", body = PaymentResult),
        (status = 400, description = "Malformed JSON", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 402, description = "The gateway declined; the order will be cancelled", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "The order belongs to another customer", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The order does not wait for a payment (already paid, not reserved yet, cancelled, or paid automatically)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field or wrong amount", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`payment_processing` is off, or the payment gateway is not called now (its circuit breaker is open or its bulkhead full); the order keeps waiting, retry after `Retry-After` seconds", body = ProblemDocument, content_type = "application/problem+json",
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn pay_order(
    State(state): State<CommandState>,
    caller: Caller,
    Json(body): Json<PaymentBody>,
) -> Result<Response, CommandError> {
    let order_id = OrderId::parse(&body.order_id)?;
    RequestContext::record_order(&order_id);
    let key = order_id.to_string();
    let order: Order = state.store.load(&key).await?;
    let Some(request) = order.request() else {
        return Err(Problem::not_found(format!("order {order_id} does not exist")).into());
    };
    caller.authorize_customer(request.customer_id.as_str())?;
    let outcome = pay_known_order(&state, &caller, &body, order_id, &order).await;
    if let Err(CommandError::Problem(problem)) = &outcome {
        if matches!(
            problem.status(),
            StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY
        ) {
            record_refusal(&state, &caller, order_id, problem.detail()).await;
        }
    }
    outcome
}

/// Records, for the order's timeline, that the customer's payment of `order_id` was refused
/// (`reason`), under the order's correlation id.
async fn record_refusal(state: &CommandState, caller: &Caller, order_id: OrderId, reason: &str) {
    let Some(recorder) = state.store.recorder() else {
        return;
    };
    let correlation = match stream::correlation_of(
        state.store.database(),
        Order::TYPE,
        &order_id.to_string(),
    )
    .await
    {
        Ok(Some(correlation)) => correlation,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "the refused payment is not recorded on the order's timeline");
            return;
        }
    };
    recorder.record(Record::Refusal(RefusedCommand {
        correlation_id: correlation,
        aggregate_type: Payment::TYPE.to_owned(),
        aggregate_id: order_id.to_string(),
        command: "ProcessPayment".to_owned(),
        subject: Some(caller.subject().to_owned()),
        causation_id: Some(RequestContext::correlation_id().to_string()),
        reason: reason.to_owned(),
        refused_at: chrono::Utc::now(),
    }));
}

/// Pays `order_id` (placed: `order` holds its request) for the customer.
async fn pay_known_order(
    state: &CommandState,
    caller: &Caller,
    body: &PaymentBody,
    order_id: OrderId,
    order: &Order,
) -> Result<Response, CommandError> {
    let key = order_id.to_string();
    let (Some(request), Some(status)) = (order.request(), order.status()) else {
        return Err(Problem::not_found(format!("order {order_id} does not exist")).into());
    };
    if let Some(amount) = &body.amount {
        let offered = Money::new(amount.amount_minor, Currency::parse(&amount.currency)?)?;
        if offered != request.amount {
            return Err(Problem::validation(format!(
                "amount: the order costs {}, not {offered}",
                request.amount
            ))
            .into());
        }
    }
    let payment: Payment = state.store.load(&key).await?;
    if payment.state() == PaymentState::Processed || status == OrderStatus::Paid {
        return Err(Problem::conflict(format!("order {order_id} is already paid")).into());
    }
    let live = &state.live;
    let customer = request.customer_id.as_str();
    let express = request.express_processing.unwrap_or_else(|| {
        RequestContext::served_flag(
            Flag::ExpressOrderProcessing,
            live.flag(Flag::ExpressOrderProcessing, customer),
        )
    });
    if express {
        return Err(Problem::conflict(format!(
            "order {order_id} is paid automatically (express_order_processing was on when it was placed)"
        )).into());
    }
    if status != OrderStatus::Reserved || payment.state() != PaymentState::None {
        return Err(Problem::conflict(format!(
            "order {order_id} is {} and does not wait for a payment",
            status.as_str()
        ))
        .into());
    }

    // The order's correlation id ties the payment into the order's audit trail; this
    // request's own id becomes the causation.
    let correlation = stream::correlation_of(state.store.database(), Order::TYPE, &key)
        .await?
        .and_then(|id| CorrelationId::parse(&id))
        .unwrap_or_else(RequestContext::correlation_id);
    if !RequestContext::served_flag(
        Flag::PaymentProcessing,
        live.flag(Flag::PaymentProcessing, customer),
    ) {
        return Err(Problem::unavailable(
            "payment processing is paused (payment_processing is off); the order keeps waiting \
             for its payment, retry later",
        )
        .into());
    }
    let mut metadata = EventMetadata::new(correlation, caller.subject())
        .with_flag(Flag::ExpressOrderProcessing, false)
        .with_flag(Flag::PaymentProcessing, true);
    metadata.causation_id = RequestContext::correlation_id().to_string();
    let charge = ChargeRequest {
        order_id,
        customer_id: request.customer_id.clone(),
        amount: request.amount,
        // One key per order: a retried POST never charges twice.
        idempotency_key: format!("customer-payment:{order_id}"),
        simulate_failure: false,
    };
    let gateway = Arc::clone(&state.payments);
    let record = state
        .store
        .recorder()
        .map(|recorder| providers::CallRecord {
            recorder: recorder.clone(),
            order_id,
            correlation_id: metadata.correlation_id.to_string(),
            provider: Provider::Payment,
            operation: Operation::Charge,
            idempotency_key: charge.idempotency_key.clone(),
        });
    let result = providers::call(&state.policies.payment, record, move || {
        let gateway = Arc::clone(&gateway);
        let charge = charge.clone();
        async move { gateway.charge(charge).await }
    })
    .await;
    match result {
        // No call was made: the order keeps waiting for its payment.
        Err(CallError::Rejected(rejection)) => {
            Err(
                Problem::dependency_unavailable("payment", &rejection, rejection.retry_after())
                    .into(),
            )
        }
        Ok(receipt) => {
            let command = PaymentCommand::RecordPaymentProcessed {
                order_id,
                amount: request.amount,
                provider_reference: receipt.reference.clone(),
            };
            let appended = state
                .store
                .execute::<Payment>(&key, command, &(), &metadata)
                .await?;
            let token = match appended.last() {
                Some(event) => {
                    state
                        .consistency_token(Payment::TYPE, &key, event.sequence)
                        .await
                }
                None => None,
            };
            let body = Json(PaymentResult {
                order_id: order_id.to_string(),
                status: PaymentState::Processed.as_str().to_owned(),
                amount: AmountBody {
                    amount_minor: request.amount.amount_minor(),
                    currency: request.amount.currency().to_string(),
                },
                provider_reference: receipt.reference,
            });
            let mut response = body.into_response();
            if let Some(token) = token {
                response
                    .headers_mut()
                    .insert(CONSISTENCY_TOKEN_HEADER, token);
            }
            Ok(response)
        }
        Err(error) => {
            let command = PaymentCommand::RecordPaymentDeclined {
                order_id,
                amount: request.amount,
                reason: error.to_string(),
            };
            state
                .store
                .execute::<Payment>(&key, command, &(), &metadata)
                .await?;
            // The gateway's own words stay in the log and the event, not in the answer.
            tracing::warn!(%error, "the payment gateway declined a customer payment");
            Err(Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment-declined",
                "Payment declined",
                "the payment gateway declined the payment; the order will be cancelled",
            )
            .into())
        }
    }
}

/// Legacy alias of `POST /petstore-domain/payments`.
#[utoipa::path(
    post,
    path = "/petstore-domain/process-payment",
    tag = "payments",
    request_body = PaymentBody,
    responses(
        (status = 200, description = "Paid", body = PaymentResult),
        (status = "4XX", description = "As for POST /petstore-domain/payments", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn process_payment_legacy(
    state: State<CommandState>,
    caller: Caller,
    body: Json<PaymentBody>,
) -> Result<Response, CommandError> {
    pay_order(state, caller, body).await
}
