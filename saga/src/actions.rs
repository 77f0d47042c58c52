//! What the runner does for an event: asks the domain's saga what it calls for, and performs
//! it (commands to aggregates, provider calls, deadlines), each with an id derived from its cause.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, AggregateError};
use petstore_domain::delivery::{Delivery, DeliveryCommand, DeliveryState};
use petstore_domain::order::{Order, OrderCommand, OrderEvent};
use petstore_domain::payment::{Payment, PaymentCommand, PaymentState};
use petstore_domain::pet::Pet;
use petstore_domain::providers::{
    ChargeRequest, DeliveryProvider, DeliveryRequest, PaymentGateway,
};
use petstore_domain::saga::{self, SagaAction, SagaEvent, SagaOutcome};
use petstore_domain::{DomainError, OrderId};
use petstore_event_store::deadlines::{self, Deadline, DeadlineKind};
use petstore_event_store::store::EventMetadata;
use petstore_event_store::stream::RecordedEvent;
use petstore_resilience::{CallError, Rejection};
use petstore_settings::Flag;
use petstore_telemetry::CorrelationId;
use uuid::Uuid;

use crate::error::*;
use crate::events::*;
use crate::providers;
use crate::runner::*;

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    pub(crate) async fn handle_event(
        &self,
        order_id: OrderId,
        event: &RecordedEvent,
        decoded: &Decoded,
    ) -> Result<(), SagaError> {
        let order: Order = self
            .store
            .load(&order_id.to_string())
            .await
            .map_err(store_error)?;
        let stored_at = event.metadata.timestamp()?;
        let occurred_at = DateTime::parse_from_rfc3339(stored_at)
            .map_err(|_| {
                SagaError::Unreadable(format!("metadata timestamp {stored_at:?} is not RFC 3339"))
            })?
            .with_timezone(&Utc);
        let saga_event = match decoded {
            Decoded::Order(inner) => SagaEvent::Order(inner),
            Decoded::Pet(inner) => SagaEvent::Pet(inner),
            Decoded::Payment(inner) => SagaEvent::Payment(inner),
            Decoded::Delivery(inner) => SagaEvent::Delivery(inner),
        };
        if matches!(decoded, Decoded::Order(OrderEvent::OrderCreated(_))) {
            self.metrics.sagas_started.inc();
            if let Ok(mut orders) = self.in_flight.lock() {
                orders.insert(order_id);
            }
        }
        let customer = order
            .request()
            .map(|request| request.customer_id.as_str().to_owned())
            .unwrap_or_default();
        let actions = saga::react(&order, saga_event, occurred_at, &self.policy(&customer));
        let stored_correlation = event.metadata.correlation_id()?;
        let correlation_id = CorrelationId::parse(stored_correlation).ok_or_else(|| {
            SagaError::Unreadable(format!(
                "metadata correlation_id {stored_correlation:?} is not a correlation id"
            ))
        })?;
        let cause = Cause {
            event_id: event.event_id(),
            correlation_id,
            order_id,
            customer,
        };
        for (position, action) in actions.into_iter().enumerate() {
            self.perform(&cause, position, action).await?;
        }
        Ok(())
    }

    pub(crate) async fn perform(
        &self,
        cause: &Cause,
        position: usize,
        action: SagaAction,
    ) -> Result<(), SagaError> {
        let order_key = cause.order_id.to_string();
        match action {
            SagaAction::Order(command) => {
                self.send::<Order>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Pet {
                pet_id,
                command,
                if_refused,
            } => {
                let refused = self
                    .send::<Pet>(pet_id.as_str(), command, cause.metadata(position, ""))
                    .await?;
                if let (Some(error), Some(reason)) = (refused, if_refused) {
                    tracing::info!(%error, reason = reason.as_str(), "pet refused; cancelling the order");
                    self.send::<Order>(
                        &order_key,
                        OrderCommand::CancelOrder { reason },
                        cause.metadata(position, "refused"),
                    )
                    .await?;
                }
            }
            SagaAction::Payment(command) => {
                self.send::<Payment>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Delivery(command) => {
                self.send::<Delivery>(&order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::ChargePayment {
                amount,
                simulate_failure,
            } => {
                let payment: Payment = self.store.load(&order_key).await.map_err(store_error)?;
                if payment.state() != PaymentState::None {
                    return Ok(());
                }
                if !self.live.flag(Flag::PaymentProcessing, &cause.customer) {
                    tracing::info!("payment held: payment_processing is off");
                    deadlines::rearm(
                        self.store.database(),
                        &Deadline {
                            order_id: cause.order_id,
                            kind: DeadlineKind::PaymentHold,
                            due_at: Utc::now() + PAYMENT_HOLD_RECHECK,
                            correlation_id: cause.correlation_id.to_string(),
                        },
                    )
                    .await?;
                    return Ok(());
                }
                let metadata = cause
                    .metadata(position, "")
                    .with_flag(Flag::PaymentProcessing, true);
                let request = ChargeRequest {
                    order_id: cause.order_id,
                    amount,
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let gateway = Arc::clone(&self.payments);
                let result = providers::call(&self.policies.payment, move || {
                    let gateway = Arc::clone(&gateway);
                    let request = request.clone();
                    async move { gateway.charge(request).await }
                })
                .await;
                let command = match result {
                    Ok(receipt) => PaymentCommand::RecordPaymentProcessed {
                        order_id: cause.order_id,
                        amount,
                        provider_reference: receipt.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        return self
                            .retry_later(DeadlineKind::PaymentHold, cause, &rejection)
                            .await;
                    }
                    Err(error) => PaymentCommand::RecordPaymentDeclined {
                        order_id: cause.order_id,
                        amount,
                        reason: error.to_string(),
                    },
                };
                self.send::<Payment>(&order_key, command, metadata).await?;
            }
            SagaAction::BookDelivery {
                pet_id,
                simulate_failure,
            } => {
                let delivery: Delivery = self.store.load(&order_key).await.map_err(store_error)?;
                if delivery.state() != DeliveryState::None {
                    return Ok(());
                }
                let metadata = cause.metadata(position, "");
                let request = DeliveryRequest {
                    order_id: cause.order_id,
                    pet_id: pet_id.clone(),
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let provider = Arc::clone(&self.deliveries);
                let result = providers::call(&self.policies.delivery, move || {
                    let provider = Arc::clone(&provider);
                    let request = request.clone();
                    async move { provider.book(request).await }
                })
                .await;
                let command = match result {
                    Ok(booking) => DeliveryCommand::RecordDeliveryScheduled {
                        order_id: cause.order_id,
                        pet_id,
                        estimated_arrival: booking.estimated_arrival,
                        provider_reference: booking.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        return self
                            .retry_later(DeadlineKind::DeliveryRetry, cause, &rejection)
                            .await;
                    }
                    Err(error) => DeliveryCommand::RecordDeliveryFailed {
                        order_id: cause.order_id,
                        reason: error.to_string(),
                    },
                };
                self.send::<Delivery>(&order_key, command, metadata).await?;
            }
            SagaAction::ScheduleDeadline { step, due_at } => {
                deadlines::schedule(
                    self.store.database(),
                    &Deadline {
                        order_id: cause.order_id,
                        kind: DeadlineKind::Step(step),
                        due_at,
                        correlation_id: cause.correlation_id.to_string(),
                    },
                )
                .await?;
            }
            SagaAction::Finished(outcome) => {
                if let Ok(mut orders) = self.in_flight.lock() {
                    orders.remove(&cause.order_id);
                }
                match outcome {
                    SagaOutcome::Completed => self.metrics.saga_finished("completed", ""),
                    SagaOutcome::Cancelled(reason) => {
                        self.metrics.saga_finished("cancelled", reason.as_str())
                    }
                }
            }
        }
        Ok(())
    }

    /// A provider was not called (its breaker is open, its bulkhead full): the step waits
    /// and is tried again when the policy says it may be, through a durable deadline of
    /// `kind` (so a restart does not lose it).
    pub(crate) async fn retry_later(
        &self,
        kind: DeadlineKind,
        cause: &Cause,
        rejection: &Rejection,
    ) -> Result<(), SagaError> {
        let wait = chrono::Duration::from_std(rejection.retry_after())
            .unwrap_or(chrono::Duration::seconds(1));
        tracing::info!(%rejection, step = %kind, wait_ms = wait.num_milliseconds(), "provider not called; the step waits");
        deadlines::rearm(
            self.store.database(),
            &Deadline {
                order_id: cause.order_id,
                kind,
                due_at: Utc::now() + wait,
                correlation_id: cause.correlation_id.to_string(),
            },
        )
        .await?;
        Ok(())
    }

    /// Executes a saga command. A refusal by the domain is expected in races (the pet was
    /// taken, the order was cancelled meanwhile) and is returned, not raised.
    pub(crate) async fn send<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: EventMetadata,
    ) -> Result<Option<DomainError>, SagaError>
    where
        A: Aggregate<Error = DomainError, Services = ()> + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        match self
            .store
            .execute::<A>(aggregate_id, command, &(), &metadata)
            .await
        {
            Ok(_) => Ok(None),
            Err(AggregateError::UserError(error)) => {
                tracing::debug!(%error, aggregate_id, "saga command refused");
                Ok(Some(error))
            }
            Err(error) => Err(store_error(error)),
        }
    }
}

/// The event a reaction answers.
pub(crate) struct Cause {
    pub(crate) event_id: Uuid,
    pub(crate) correlation_id: CorrelationId,
    pub(crate) order_id: OrderId,
    /// The order's customer: the subject flags are evaluated for.
    pub(crate) customer: String,
}

impl Cause {
    /// Metadata of the command at `position` of the reaction (`variant` tells apart several
    /// commands one action sends): its id is derived from the causing event, so a replay
    /// issues the very same command.
    pub(crate) fn metadata(&self, position: usize, variant: &str) -> EventMetadata {
        let command_id = Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("{}\u{0}{position}\u{0}{variant}", self.event_id).as_bytes(),
        );
        EventMetadata::caused_by(
            self.correlation_id.clone(),
            self.event_id,
            command_id,
            SUBJECT,
        )
    }
}
