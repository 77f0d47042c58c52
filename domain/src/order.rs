//! The Order aggregate: what a customer asked for and how far fulfilment has come.
//!
//! Life cycle: `pending -> reserved -> paid -> scheduled -> completed`, or `cancelled` from any
//! state before `completed`. An order cannot complete before its payment and its delivery are
//! confirmed. Confirmations that already took effect are no-ops, so the saga may repeat them.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::values::{
    CancellationReason, CustomerId, Money, OrderId, PetId, SagaStep, SimulatedFailure,
    SpecialInstructions,
};
use crate::FIRST_EVENT_VERSION;

/// Where an order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Placed; the pet is not yet reserved.
    Pending,
    /// The pet is held for this order.
    Reserved,
    /// The payment went through.
    Paid,
    /// The delivery is scheduled.
    Scheduled,
    /// Terminal: paid, delivered, the pet sold.
    Completed,
    /// Terminal: the order was given up; see its reason.
    Cancelled,
}

impl OrderStatus {
    /// The lower-case word clients see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Reserved => "reserved",
            Self::Paid => "paid",
            Self::Scheduled => "scheduled",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the order can no longer change.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

/// What a customer asks for when placing an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRequest {
    /// The new order's id.
    pub order_id: OrderId,
    /// Who orders.
    pub customer_id: CustomerId,
    /// Which pet.
    pub pet_id: PetId,
    /// The pet's price when the order was placed; what the customer will pay.
    pub amount: Money,
    /// Optional free text.
    pub special_instructions: Option<SpecialInstructions>,
    /// A step this order's saga must fail, for resilience demos (`X-Simulate-Failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_failure: Option<SimulatedFailure>,
    /// Whether the saga charges the order itself (`express_order_processing` when the order
    /// was placed) or waits for the customer's payment. Orders keep the mode they started
    /// with; `None` (orders placed before the flag was live) follows the saga's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub express_processing: Option<bool>,
}

impl OrderRequest {
    /// Whether `other` asks for the same order: a retried request is the same order even if
    /// the flags changed between the two attempts.
    pub fn same_order_as(&self, other: &OrderRequest) -> bool {
        let (mut mine, mut theirs) = (self.clone(), other.clone());
        mine.express_processing = None;
        theirs.express_processing = None;
        mine == theirs
    }
}

/// Commands an order accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    /// Place a new order. Repeating it with the same request is a no-op (idempotent retry);
    /// a different request on the same id is refused.
    PlaceOrder(OrderRequest),
    /// Record that the pet is now held for this order.
    ConfirmPetReserved,
    /// Record that the payment went through.
    ConfirmPayment {
        /// What was charged; must equal the order's amount.
        amount: Money,
    },
    /// Record that the delivery is scheduled.
    ConfirmDeliveryScheduled,
    /// Finish the order. Requires payment and delivery.
    CompleteOrder,
    /// Give the order up.
    CancelOrder {
        /// Why.
        reason: CancellationReason,
    },
    /// A step's deadline passed: cancel the order if it is still waiting for that step.
    TimeOutStep {
        /// The step whose deadline passed.
        step: SagaStep,
    },
    /// Record that every compensation of the cancelled order is done (the saga sends it after
    /// cancelling the delivery, refunding the payment and releasing the pet).
    ConfirmCompensated,
}

/// Events of an order's life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// The order was placed.
    OrderCreated(OrderRequest),
    /// The pet is held for the order.
    OrderPetReserved,
    /// The order is paid.
    OrderPaid {
        /// What was charged.
        amount: Money,
    },
    /// The order's delivery is scheduled.
    OrderDeliveryScheduled,
    /// The order is complete.
    OrderCompleted,
    /// The order was cancelled; its compensations follow, then [`Self::OrderCompensated`].
    /// (Version 1.0, written before `OrderCompensated` existed, is followed by none.)
    OrderCancelled {
        /// Why.
        reason: CancellationReason,
        /// Whether `OrderCompensated` follows once the compensations are recorded (`false`
        /// only in cancellations written before that event existed, version 1.0: those were
        /// settled at once).
        compensated_later: bool,
    },
    /// Every compensation of the cancelled order is recorded: nothing is left to undo.
    OrderCompensated,
}

/// The version of `OrderCancelled` this code writes (see [`crate::upcasting`]).
pub const ORDER_CANCELLED_VERSION: &str = "3.0";

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrderCreated(_) => "OrderCreated",
            Self::OrderPetReserved => "OrderPetReserved",
            Self::OrderPaid { .. } => "OrderPaid",
            Self::OrderDeliveryScheduled => "OrderDeliveryScheduled",
            Self::OrderCompleted => "OrderCompleted",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::OrderCompensated => "OrderCompensated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::OrderCancelled { .. } => ORDER_CANCELLED_VERSION,
            _ => FIRST_EVENT_VERSION,
        }
        .to_owned()
    }
}

/// An order, rebuilt from its events. `None` until placed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Order {
    state: Option<OrderState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderState {
    request: OrderRequest,
    status: OrderStatus,
    cancellation_reason: Option<CancellationReason>,
    #[serde(default)]
    compensated: bool,
}

impl Order {
    /// The request the order was placed with, once it exists.
    pub fn request(&self) -> Option<&OrderRequest> {
        self.state.as_ref().map(|state| &state.request)
    }

    /// The order's status, once it exists.
    pub fn status(&self) -> Option<OrderStatus> {
        self.state.as_ref().map(|state| state.status)
    }

    /// Why the order was cancelled, if it was.
    /// Whether nothing is left to do or undo: completed, or cancelled with every
    /// compensation recorded.
    pub fn is_settled(&self) -> bool {
        self.state.as_ref().is_some_and(|state| match state.status {
            OrderStatus::Completed => true,
            OrderStatus::Cancelled => state.compensated,
            _ => false,
        })
    }

    /// Why it was cancelled, when it was.
    pub fn cancellation_reason(&self) -> Option<CancellationReason> {
        self.state
            .as_ref()
            .and_then(|state| state.cancellation_reason)
    }
}

impl crate::Decide for Order {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error> {
        use OrderStatus::*;
        let Some(state) = &self.state else {
            return match command {
                OrderCommand::PlaceOrder(request) => Ok(vec![OrderEvent::OrderCreated(request)]),
                _ => Err(DomainError::validation(
                    "order_id",
                    "the order does not exist",
                )),
            };
        };
        let order_id = state.request.order_id;
        let refuse = |action: &'static str| {
            Err(DomainError::InvalidOrderTransition {
                order_id,
                status: state.status.as_str(),
                action,
            })
        };
        match command {
            OrderCommand::PlaceOrder(request) if request.same_order_as(&state.request) => {
                Ok(vec![])
            }
            OrderCommand::PlaceOrder(_) => Err(DomainError::IdempotencyKeyReused(order_id)),
            OrderCommand::ConfirmPetReserved => match state.status {
                Pending => Ok(vec![OrderEvent::OrderPetReserved]),
                Reserved | Paid | Scheduled | Completed => Ok(vec![]),
                Cancelled => refuse("confirm the pet reservation"),
            },
            OrderCommand::ConfirmPayment { amount } => {
                if amount != state.request.amount {
                    return Err(DomainError::AmountMismatch {
                        expected: state.request.amount.to_string(),
                        actual: amount.to_string(),
                    });
                }
                match state.status {
                    Reserved => Ok(vec![OrderEvent::OrderPaid { amount }]),
                    Paid | Scheduled | Completed => Ok(vec![]),
                    Pending | Cancelled => refuse("confirm a payment"),
                }
            }
            OrderCommand::ConfirmDeliveryScheduled => match state.status {
                Paid => Ok(vec![OrderEvent::OrderDeliveryScheduled]),
                Scheduled | Completed => Ok(vec![]),
                Pending | Reserved | Cancelled => refuse("confirm a delivery"),
            },
            OrderCommand::CompleteOrder => match state.status {
                Scheduled => Ok(vec![OrderEvent::OrderCompleted]),
                Completed => Ok(vec![]),
                Pending | Reserved | Paid | Cancelled => refuse("complete"),
            },
            OrderCommand::TimeOutStep { step } => {
                let waiting_for = match state.status {
                    Pending => Some(SagaStep::Reservation),
                    Reserved => Some(SagaStep::Payment),
                    Paid => Some(SagaStep::Delivery),
                    Scheduled | Completed | Cancelled => None,
                };
                if waiting_for == Some(step) {
                    Ok(vec![OrderEvent::OrderCancelled {
                        reason: CancellationReason::StepTimedOut,
                        compensated_later: true,
                    }])
                } else {
                    Ok(vec![])
                }
            }
            OrderCommand::CancelOrder { reason } => match state.status {
                Completed => refuse("cancel"),
                Cancelled => Ok(vec![]),
                Pending | Reserved | Paid | Scheduled => Ok(vec![OrderEvent::OrderCancelled {
                    reason,
                    compensated_later: true,
                }]),
            },
            OrderCommand::ConfirmCompensated => match state.status {
                Cancelled if state.compensated => Ok(vec![]),
                Cancelled => Ok(vec![OrderEvent::OrderCompensated]),
                Pending | Reserved | Paid | Scheduled | Completed => {
                    refuse("confirm compensations")
                }
            },
        }
    }
}

/// The aggregate type its events are stored under (`aggregate_type`), and the Kafka topic
/// `{prefix}.orders` is named after.
pub const AGGREGATE_TYPE: &str = "Order";

impl Aggregate for Order {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = DomainError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        crate::write_decisions(self, command, sink).await
    }

    fn apply(&mut self, event: Self::Event) {
        if let OrderEvent::OrderCreated(request) = event {
            self.state = Some(OrderState {
                request,
                status: OrderStatus::Pending,
                cancellation_reason: None,
                compensated: false,
            });
            return;
        }
        let Some(state) = self.state.as_mut() else {
            return;
        };
        match event {
            OrderEvent::OrderCreated(_) => {}
            OrderEvent::OrderPetReserved => state.status = OrderStatus::Reserved,
            OrderEvent::OrderPaid { .. } => state.status = OrderStatus::Paid,
            OrderEvent::OrderDeliveryScheduled => state.status = OrderStatus::Scheduled,
            OrderEvent::OrderCompleted => state.status = OrderStatus::Completed,
            OrderEvent::OrderCancelled {
                reason,
                compensated_later,
            } => {
                state.status = OrderStatus::Cancelled;
                state.cancellation_reason = Some(reason);
                state.compensated = !compensated_later;
            }
            OrderEvent::OrderCompensated => state.compensated = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type OrderTest = TestFramework<Order>;

    fn request() -> OrderRequest {
        OrderRequest {
            order_id: OrderId::from_idempotency_key("test", "order"),
            customer_id: CustomerId::parse("customer-001").expect("valid"),
            pet_id: PetId::parse("golden-retriever-001").expect("valid"),
            amount: Money::usd(120_000).expect("valid"),
            special_instructions: Some(
                SpecialInstructions::parse("Include training guide").expect("valid"),
            ),
            simulated_failure: None,
            express_processing: None,
        }
    }

    fn created() -> OrderEvent {
        OrderEvent::OrderCreated(request())
    }

    fn paid() -> OrderEvent {
        OrderEvent::OrderPaid {
            amount: request().amount,
        }
    }

    fn refused(status: &'static str, action: &'static str) -> DomainError {
        DomainError::InvalidOrderTransition {
            order_id: request().order_id,
            status,
            action,
        }
    }

    #[test]
    fn placing_an_order_creates_it() {
        OrderTest::with(())
            .given_no_previous_events()
            .when(OrderCommand::PlaceOrder(request()))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn a_retried_placement_is_a_no_op_and_a_different_one_is_refused() {
        OrderTest::with(())
            .given(vec![created()])
            .when(OrderCommand::PlaceOrder(request()))
            .then_expect_events(vec![]);
        let mut other = request();
        other.pet_id = PetId::parse("persian-cat-001").expect("valid");
        OrderTest::with(())
            .given(vec![created()])
            .when(OrderCommand::PlaceOrder(other))
            .then_expect_error(DomainError::IdempotencyKeyReused(request().order_id));
    }

    #[test]
    fn the_happy_path_reaches_completed() {
        OrderTest::with(())
            .given(vec![created()])
            .when(OrderCommand::ConfirmPetReserved)
            .then_expect_events(vec![OrderEvent::OrderPetReserved]);
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::ConfirmPayment {
                amount: request().amount,
            })
            .then_expect_events(vec![paid()]);
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved, paid()])
            .when(OrderCommand::ConfirmDeliveryScheduled)
            .then_expect_events(vec![OrderEvent::OrderDeliveryScheduled]);
        OrderTest::with(())
            .given(vec![
                created(),
                OrderEvent::OrderPetReserved,
                paid(),
                OrderEvent::OrderDeliveryScheduled,
            ])
            .when(OrderCommand::CompleteOrder)
            .then_expect_events(vec![OrderEvent::OrderCompleted]);
    }

    #[test]
    fn an_order_cannot_complete_before_payment_and_delivery() {
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::CompleteOrder)
            .then_expect_error(refused("reserved", "complete"));
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved, paid()])
            .when(OrderCommand::CompleteOrder)
            .then_expect_error(refused("paid", "complete"));
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::ConfirmDeliveryScheduled)
            .then_expect_error(refused("reserved", "confirm a delivery"));
    }

    #[test]
    fn a_payment_must_match_the_amount_in_minor_units() {
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::ConfirmPayment {
                amount: Money::usd(119_999).expect("valid"),
            })
            .then_expect_error(DomainError::AmountMismatch {
                expected: "1200.00 USD".into(),
                actual: "1199.99 USD".into(),
            });
    }

    #[test]
    fn confirmations_are_safe_to_repeat() {
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved, paid()])
            .when(OrderCommand::ConfirmPayment {
                amount: request().amount,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_cancelled_order_stays_cancelled_and_a_completed_one_cannot_be_cancelled() {
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancellationReason::PaymentFailed,
            compensated_later: true,
        };
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::CancelOrder {
                reason: CancellationReason::PaymentFailed,
            })
            .then_expect_events(vec![cancelled.clone()]);
        OrderTest::with(())
            .given(vec![created(), cancelled.clone()])
            .when(OrderCommand::CancelOrder {
                reason: CancellationReason::Requested,
            })
            .then_expect_events(vec![]);
        OrderTest::with(())
            .given(vec![created(), cancelled])
            .when(OrderCommand::ConfirmPetReserved)
            .then_expect_error(refused("cancelled", "confirm the pet reservation"));
        OrderTest::with(())
            .given(vec![
                created(),
                OrderEvent::OrderPetReserved,
                paid(),
                OrderEvent::OrderDeliveryScheduled,
                OrderEvent::OrderCompleted,
            ])
            .when(OrderCommand::CancelOrder {
                reason: CancellationReason::Requested,
            })
            .then_expect_error(refused("completed", "cancel"));
    }

    #[test]
    fn only_a_cancelled_order_records_its_compensations_and_once() {
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancellationReason::PaymentFailed,
            compensated_later: true,
        };
        assert_eq!(cancelled.event_version(), ORDER_CANCELLED_VERSION);
        OrderTest::with(())
            .given(vec![created(), cancelled.clone()])
            .when(OrderCommand::ConfirmCompensated)
            .then_expect_events(vec![OrderEvent::OrderCompensated]);
        OrderTest::with(())
            .given(vec![created(), cancelled, OrderEvent::OrderCompensated])
            .when(OrderCommand::ConfirmCompensated)
            .then_expect_events(vec![]);
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::ConfirmCompensated)
            .then_expect_error(refused("reserved", "confirm compensations"));
    }

    #[test]
    fn a_deadline_cancels_only_an_order_still_waiting_for_that_step() {
        let timed_out = OrderEvent::OrderCancelled {
            reason: CancellationReason::StepTimedOut,
            compensated_later: true,
        };
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved])
            .when(OrderCommand::TimeOutStep {
                step: SagaStep::Payment,
            })
            .then_expect_events(vec![timed_out]);
        // The payment went through before the deadline fired: nothing to do.
        OrderTest::with(())
            .given(vec![created(), OrderEvent::OrderPetReserved, paid()])
            .when(OrderCommand::TimeOutStep {
                step: SagaStep::Payment,
            })
            .then_expect_events(vec![]);
        OrderTest::with(())
            .given(vec![created()])
            .when(OrderCommand::TimeOutStep {
                step: SagaStep::Delivery,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn commands_on_a_missing_order_are_refused() {
        OrderTest::with(())
            .given_no_previous_events()
            .when(OrderCommand::CompleteOrder)
            .then_expect_error(DomainError::validation(
                "order_id",
                "the order does not exist",
            ));
    }
}
