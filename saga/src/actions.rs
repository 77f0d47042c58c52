//! What the runner does for an event: asks the domain's saga what it calls for, and performs
//! it (commands to aggregates, provider calls, deadlines), each with an id derived from its cause.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use cqrs_es::{Aggregate, AggregateError};
use petstore_domain::delivery::{Delivery, DeliveryCommand, DeliveryState};
use petstore_domain::order::{Order, OrderCommand, OrderEvent, OrderStatus};
use petstore_domain::payment::{Payment, PaymentCommand, PaymentState};
use petstore_domain::pet::Pet;
use petstore_domain::providers::{
    CancelRequest, ChargeRequest, DeliveryProvider, DeliveryRequest, PaymentGateway, RefundRequest,
};
use petstore_domain::saga::{self, SagaAction, SagaEvent, SagaOutcome};
use petstore_domain::{CustomerId, DomainError, OrderId};
use petstore_event_store::deadlines::{Deadline, DeadlineKind};
use petstore_event_store::leases::{Fence, LeaseLost};
use petstore_event_store::records::{Operation, Provider};
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_event_store::stream::RecordedEvent;
use petstore_resilience::CallError;
use petstore_settings::Flag;
use petstore_telemetry::CorrelationId;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::*;
use crate::events::*;
use crate::providers::{self, CallRecord};
use crate::runner::*;

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// Reacts to `event` (of `order_id`'s saga, read from the stream or Kafka), then to
    /// what that reaction appended for the order, and so on, without waiting for the stream
    /// to bring those back ([`Self::react`]); then remembers each event reacted to from
    /// memory, so that its copy from the stream is only acknowledged.
    ///
    /// The owner of the order's partition stages what the commands decide (and the deadlines
    /// it schedules) and writes it at once where an action depends on it (a provider call,
    /// the saga's end) and when the reaction ends ([`EventStore::staged`]):
    /// the steps between two provider calls are one commit, all or nothing. Should another
    /// writer have appended meanwhile to an aggregate it staged for (a pet another order
    /// took, an order its customer cancelled), the staged commands are written one by one
    /// up to the conflicting one ([`EventStore::flush`]), and the reaction runs again on the
    /// aggregates as stored, as often as a command that lost a race is decided again
    /// (`commands.max_conflict_retries`; each command with the same id: what was written
    /// before is not written twice).
    pub(crate) async fn handle_event(
        &self,
        order_id: OrderId,
        event: &RecordedEvent,
        decoded: &Decoded,
    ) -> Result<(), SagaError> {
        let arrival = Arrival::of(event)?;
        let staged = Fence::current().is_some();
        let mut attempt = 0;
        loop {
            let mut reacted = Vec::new();
            let outcome = if staged {
                let reaction = async {
                    self.react(order_id, &arrival, decoded, &mut reacted)
                        .await?;
                    self.flush().await
                };
                self.store.staged(reaction).await
            } else {
                // Not the order's owner (a pet's event of another runner's order, consuming
                // Kafka): each command is written as it is decided.
                self.react(order_id, &arrival, decoded, &mut reacted).await
            };
            match outcome {
                Ok(()) => {
                    if matches!(decoded, Decoded::Order(OrderEvent::OrderCreated(_))) {
                        self.metrics.sagas_started.inc();
                    }
                    for event_id in reacted {
                        self.remember(event_id);
                    }
                    return Ok(());
                }
                Err(SagaError::Conflict(conflict))
                    if staged && self.store.retry_after_conflict(attempt) =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, %conflict, "the step's appends conflicted; reacting again");
                    EventStore::back_off(attempt).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Writes what the reaction has staged.
    async fn flush(&self) -> Result<(), SagaError> {
        self.store.flush().await.map_err(store_error)
    }

    /// Reacts to one event of `order_id`'s saga: performs what the domain's saga decides on
    /// the order as it stands. Then reacts, from memory, to each event those actions appended
    /// for this order (the runner owns it: nobody else reacts to them first), and adds each
    /// to `reacted`. Should the reaction fail, none is remembered: their copies from the
    /// stream are handled as any event.
    pub(crate) async fn react(
        &self,
        order_id: OrderId,
        arrival: &Arrival,
        decoded: &Decoded,
        reacted: &mut Vec<Uuid>,
    ) -> Result<(), SagaError> {
        let order: Order = self.load_owned(&order_id.to_string()).await?;
        let saga_event = match decoded {
            Decoded::Order(inner) => SagaEvent::Order(inner),
            Decoded::Pet(inner) => SagaEvent::Pet(inner),
            Decoded::Payment(inner) => SagaEvent::Payment(inner),
            Decoded::Delivery(inner) => SagaEvent::Delivery(inner),
        };
        if matches!(decoded, Decoded::Order(OrderEvent::OrderCreated(_))) {
            if let Ok(mut orders) = self.in_flight.lock() {
                orders.insert(order_id);
            }
            // A pending order has no payment or delivery yet: the saga makes them, after
            // the reservation, and only the owner of the order's partition runs it (`POST
            // /payments` pays reserved orders only). So the owner reads neither to begin.
            if Fence::current().is_some() && order.status() == Some(OrderStatus::Pending) {
                let key = order_id.to_string();
                self.store.trust_new::<Payment>(&key);
                self.store.trust_new::<Delivery>(&key);
            }
        }
        let Some(request) = order.request() else {
            // No such order (yet): the saga does nothing about it.
            return Ok(());
        };
        let customer = request.customer_id.clone();
        let actions = saga::react(
            &order,
            saga_event,
            arrival.occurred_at,
            &self.policy(customer.as_str()),
        );
        let cause = Cause {
            event_id: arrival.event_id,
            correlation_id: arrival.correlation_id.clone(),
            order_id,
            customer,
            appended: Mutex::default(),
        };
        for (position, action) in actions.into_iter().enumerate() {
            // Boxed: an action's future is deep (a provider call through its policy).
            if Box::pin(self.perform(&cause, position, action)).await? == Flow::Wait {
                // The rest of the reaction runs when the step is resumed (all of it again,
                // each action with the same id: what was done is not done twice).
                break;
            }
        }
        let appended = std::mem::take(
            &mut *cause
                .appended
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (arrival, decoded) in appended {
            // A step of its own in the order's trace, inside the step that appended it.
            let span = tracing::info_span!(
                "saga step",
                otel.name = %format_args!("saga {}", decoded.event_type()),
                otel.kind = "internal",
                order_id = %order_id,
                event_type = %decoded.event_type(),
                from_memory = true,
            );
            // Boxed: a reaction's future holds the next one's.
            Box::pin(self.react(order_id, &arrival, &decoded, reacted))
                .instrument(span)
                .await?;
            reacted.push(arrival.event_id);
        }
        Ok(())
    }

    /// Performs one action of a reaction: [`Flow::Wait`] when the reaction cannot go on
    /// now (a provider did not take a compensation: it is tried again later).
    pub(crate) async fn perform(
        &self,
        cause: &Cause,
        position: usize,
        action: SagaAction,
    ) -> Result<Flow, SagaError> {
        let order_key = cause.order_id.to_string();
        if !action.only_writes() {
            // It acts on what the reaction decided so far: written first.
            self.flush().await?;
        }
        match action {
            SagaAction::Order(command) => {
                self.send_for::<Order>(cause, &order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Pet {
                pet_id,
                command,
                if_refused,
            } => {
                let refused = self
                    .send_for::<Pet>(
                        cause,
                        pet_id.as_str(),
                        command,
                        cause.metadata(position, ""),
                    )
                    .await?;
                if let (Some(error), Some(reason)) = (refused, if_refused) {
                    tracing::info!(%error, reason = reason.as_str(), "pet refused; cancelling the order");
                    self.send_for::<Order>(
                        cause,
                        &order_key,
                        OrderCommand::CancelOrder { reason },
                        cause.metadata(position, "refused"),
                    )
                    .await?;
                }
            }
            SagaAction::Payment(command) => {
                self.send_for::<Payment>(cause, &order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::Delivery(command) => {
                self.send_for::<Delivery>(cause, &order_key, command, cause.metadata(position, ""))
                    .await?;
            }
            SagaAction::ChargePayment {
                amount,
                simulate_failure,
            } => {
                let payment: Payment = self.load_owned(&order_key).await?;
                if payment.state() != PaymentState::None {
                    return Ok(Flow::Go);
                }
                if !self
                    .live
                    .flag(Flag::PaymentProcessing, cause.customer.as_str())
                {
                    tracing::info!("payment held: payment_processing is off");
                    self.store
                        .rearm_deadline(&Deadline {
                            order_id: cause.order_id,
                            kind: DeadlineKind::PaymentHold,
                            due_at: Utc::now() + PAYMENT_HOLD_RECHECK,
                            correlation_id: cause.correlation_id.to_string(),
                        })
                        .await?;
                    return Ok(Flow::Go);
                }
                let metadata = cause
                    .metadata(position, "")
                    .with_flag(Flag::PaymentProcessing, true);
                let request = ChargeRequest {
                    order_id: cause.order_id,
                    customer_id: cause.customer.clone(),
                    amount,
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let gateway = Arc::clone(&self.payments);
                let result = providers::call_while(
                    &self.policies.payment,
                    self.call_record(
                        cause,
                        Provider::Payment,
                        Operation::Charge,
                        &request.idempotency_key,
                    ),
                    self.lease_held(),
                    move || {
                        let gateway = Arc::clone(&gateway);
                        let request = request.clone();
                        async move { gateway.charge(request).await }
                    },
                )
                .await?;
                let command = match result {
                    Ok(receipt) => PaymentCommand::RecordPaymentProcessed {
                        order_id: cause.order_id,
                        amount,
                        provider_reference: receipt.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        self.retry_later(DeadlineKind::PaymentHold, cause, rejection.retry_after())
                            .await?;
                        return Ok(Flow::Wait);
                    }
                    Err(error) => PaymentCommand::RecordPaymentDeclined {
                        order_id: cause.order_id,
                        amount,
                        reason: error.to_string(),
                    },
                };
                self.send_for::<Payment>(cause, &order_key, command, metadata)
                    .await?;
            }
            SagaAction::BookDelivery {
                pet_id,
                simulate_failure,
            } => {
                let delivery: Delivery = self.load_owned(&order_key).await?;
                if delivery.state() != DeliveryState::None {
                    return Ok(Flow::Go);
                }
                let metadata = cause.metadata(position, "");
                let request = DeliveryRequest {
                    order_id: cause.order_id,
                    pet_id: pet_id.clone(),
                    customer_id: cause.customer.clone(),
                    idempotency_key: metadata.command_id.to_string(),
                    simulate_failure,
                };
                let provider = Arc::clone(&self.deliveries);
                let result = providers::call_while(
                    &self.policies.delivery,
                    self.call_record(
                        cause,
                        Provider::Delivery,
                        Operation::Book,
                        &request.idempotency_key,
                    ),
                    self.lease_held(),
                    move || {
                        let provider = Arc::clone(&provider);
                        let request = request.clone();
                        async move { provider.book(request).await }
                    },
                )
                .await?;
                let command = match result {
                    Ok(booking) => DeliveryCommand::RecordDeliveryScheduled {
                        order_id: cause.order_id,
                        pet_id,
                        estimated_arrival: booking.estimated_arrival,
                        provider_reference: booking.reference,
                    },
                    Err(CallError::Rejected(rejection)) => {
                        self.retry_later(
                            DeadlineKind::DeliveryRetry,
                            cause,
                            rejection.retry_after(),
                        )
                        .await?;
                        return Ok(Flow::Wait);
                    }
                    Err(error) => DeliveryCommand::RecordDeliveryFailed {
                        order_id: cause.order_id,
                        reason: error.to_string(),
                    },
                };
                self.send_for::<Delivery>(cause, &order_key, command, metadata)
                    .await?;
            }
            SagaAction::RefundPayment { reason } => {
                let payment: Payment = self.load_owned(&order_key).await?;
                let Some((charge, amount)) = payment.charge() else {
                    // Nothing charged, or given back already.
                    return Ok(Flow::Go);
                };
                let metadata = cause.metadata(position, "");
                let request = RefundRequest {
                    order_id: cause.order_id,
                    charge_reference: charge.to_owned(),
                    amount,
                    idempotency_key: metadata.command_id.to_string(),
                };
                let gateway = Arc::clone(&self.payments);
                let result = providers::call_while(
                    &self.policies.payment,
                    self.call_record(
                        cause,
                        Provider::Payment,
                        Operation::Refund,
                        &request.idempotency_key,
                    ),
                    self.lease_held(),
                    move || {
                        let gateway = Arc::clone(&gateway);
                        let request = request.clone();
                        async move { gateway.refund(request).await }
                    },
                )
                .await?;
                match result {
                    Ok(receipt) => {
                        tracing::info!(refund = %receipt.reference, "payment refunded");
                        self.send_for::<Payment>(
                            cause,
                            &order_key,
                            PaymentCommand::RefundPayment { reason },
                            metadata,
                        )
                        .await?;
                    }
                    Err(error) => return self.compensate_later(cause, "refund", &error).await,
                }
            }
            SagaAction::CancelDelivery { reason } => {
                let delivery: Delivery = self.load_owned(&order_key).await?;
                let Some(booking) = delivery.booking() else {
                    // Nothing booked, or called off already.
                    return Ok(Flow::Go);
                };
                let metadata = cause.metadata(position, "");
                let request = CancelRequest {
                    order_id: cause.order_id,
                    booking_reference: booking.to_owned(),
                    idempotency_key: metadata.command_id.to_string(),
                };
                let provider = Arc::clone(&self.deliveries);
                let result = providers::call_while(
                    &self.policies.delivery,
                    self.call_record(
                        cause,
                        Provider::Delivery,
                        Operation::Cancel,
                        &request.idempotency_key,
                    ),
                    self.lease_held(),
                    move || {
                        let provider = Arc::clone(&provider);
                        let request = request.clone();
                        async move { provider.cancel(request).await }
                    },
                )
                .await?;
                match result {
                    Ok(()) => {
                        self.send_for::<Delivery>(
                            cause,
                            &order_key,
                            DeliveryCommand::CancelDelivery { reason },
                            metadata,
                        )
                        .await?;
                    }
                    Err(error) => {
                        return self
                            .compensate_later(cause, "delivery cancellation", &error)
                            .await
                    }
                }
            }
            SagaAction::ScheduleDeadline { step, due_at } => {
                self.store
                    .schedule_deadline(&Deadline {
                        order_id: cause.order_id,
                        kind: DeadlineKind::Step(step),
                        due_at,
                        correlation_id: cause.correlation_id.to_string(),
                    })
                    .await?;
            }
            SagaAction::SettleDeadlines => {
                self.store.settle_deadlines(&cause.order_id).await?;
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
        Ok(Flow::Go)
    }

    /// The order's (or its payment's, or delivery's) aggregate: the copy this runner trusts
    /// when it owns the order's partition (it is told of every event appended to it, and
    /// distrusts every copy when its partitions change), else as stored.
    async fn load_owned<A: Aggregate + Clone + 'static>(&self, id: &str) -> Result<A, SagaError>
    where
        A::Error: std::error::Error,
    {
        let loaded = if Fence::current().is_some() {
            self.store.load_owned::<A>(id).await
        } else {
            self.store.load::<A>(id).await
        };
        loaded.map_err(store_error)
    }

    /// What a provider call for `cause`'s order is, for the records of its attempts (none
    /// when the store keeps no timeline records).
    fn call_record(
        &self,
        cause: &Cause,
        provider: Provider,
        operation: Operation,
        idempotency_key: &str,
    ) -> Option<CallRecord> {
        Some(CallRecord {
            recorder: self.store.recorder()?.clone(),
            order_id: cause.order_id,
            correlation_id: cause.correlation_id.to_string(),
            provider,
            operation,
            idempotency_key: idempotency_key.to_owned(),
        })
    }

    /// Whether a provider may be called for this work's partition: not once its lease may
    /// be lost, past its validity by this process's clock (paused past it, say). Asked just
    /// before each attempt, so a runner that wakes mid-call or mid-back-off calls nothing
    /// more; the new owner makes the call, under the same idempotency key.
    fn lease_held(&self) -> impl Fn() -> Result<(), LeaseLost> + Clone + Send + 'static {
        let fence = Fence::current();
        let clock = self.lease_clock.clone();
        move || match &fence {
            Some(fence) if !clock.holds(&fence.lease) => Err(fence.lost()),
            _ => Ok(()),
        }
    }

    /// A provider did not take a compensation (`what`): the reaction waits, and is resumed
    /// (from the order's cancellation) when the policy allows another call, or in a second
    /// when the provider failed or refused (a refusal is logged as an error each time: a
    /// compensation is never given up).
    async fn compensate_later(
        &self,
        cause: &Cause,
        what: &str,
        error: &CallError<petstore_domain::providers::ProviderError>,
    ) -> Result<Flow, SagaError> {
        let wait = match error {
            CallError::Rejected(rejection) => rejection.retry_after(),
            _ => std::time::Duration::from_secs(1),
        };
        match error {
            CallError::Refused(_) => {
                tracing::error!(%error, what, "a provider refused a compensation; trying again")
            }
            _ => tracing::warn!(%error, what, "a compensation did not go through; trying again"),
        }
        self.retry_later(DeadlineKind::CompensationRetry, cause, wait)
            .await?;
        Ok(Flow::Wait)
    }

    /// A provider was not called (its breaker is open, its bulkhead full): the step waits
    /// and is tried again when the policy says it may be, through a durable deadline of
    /// `kind` (so a restart does not lose it).
    pub(crate) async fn retry_later(
        &self,
        kind: DeadlineKind,
        cause: &Cause,
        wait: std::time::Duration,
    ) -> Result<(), SagaError> {
        let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
        tracing::info!(step = %kind, wait_ms = wait.num_milliseconds(), "provider not called; the step waits");
        self.store
            .rearm_deadline(&Deadline {
                order_id: cause.order_id,
                kind,
                due_at: Utc::now() + wait,
                correlation_id: cause.correlation_id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// [`Self::send`] for `cause`'s reaction: the events it appends for the cause's order
    /// are reacted to next, from memory.
    pub(crate) async fn send_for<A>(
        &self,
        cause: &Cause,
        aggregate_id: &str,
        command: A::Command,
        metadata: EventMetadata,
    ) -> Result<Option<DomainError>, SagaError>
    where
        A: SagaAggregate<Error = DomainError, Services = ()> + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        let (refused, committed) = self.execute::<A>(aggregate_id, command, &metadata).await?;
        let mut appended = Vec::new();
        for envelope in &committed {
            let Some((order_id, decoded)) =
                A::saga_event(&envelope.aggregate_id, &envelope.payload)
            else {
                continue;
            };
            if order_id == cause.order_id {
                appended.push((Arrival::appended(envelope, &cause.correlation_id)?, decoded));
            }
        }
        cause
            .appended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(appended);
        Ok(refused)
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
        Ok(self.execute::<A>(aggregate_id, command, &metadata).await?.0)
    }

    /// Executes a saga command: the domain's refusal, if it refused, and the events
    /// appended.
    async fn execute<A>(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<(Option<DomainError>, Vec<cqrs_es::EventEnvelope<A>>), SagaError>
    where
        A: Aggregate<Error = DomainError, Services = ()> + Clone + 'static,
        A::Command: Clone + std::fmt::Debug,
    {
        match self
            .store
            .execute::<A>(aggregate_id, command, &(), metadata)
            .await
        {
            Ok(committed) => Ok((None, committed)),
            Err(AggregateError::UserError(error)) => {
                tracing::debug!(%error, aggregate_id, "saga command refused");
                Ok((Some(error), Vec::new()))
            }
            Err(error) => Err(store_error(error)),
        }
    }
}

/// Whether a reaction goes on after an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// On to the next action.
    Go,
    /// The reaction stops here and is resumed later (a deadline is set for it).
    Wait,
}

/// The event a reaction answers.
pub(crate) struct Cause {
    pub(crate) event_id: Uuid,
    pub(crate) correlation_id: CorrelationId,
    pub(crate) order_id: OrderId,
    /// The order's customer: the subject flags are evaluated for.
    pub(crate) customer: CustomerId,
    /// The events the reaction appended for this order, to react to next.
    pub(crate) appended: Mutex<Vec<(Arrival, Decoded)>>,
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
