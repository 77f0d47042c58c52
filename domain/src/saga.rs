//! The order-fulfilment saga as pure decisions.
//!
//! `OrderCreated` starts it: reserve the pet, take the payment, book the delivery, sell the
//! pet and complete the order. A refused or failed step, or a step whose deadline passes,
//! cancels the order; `OrderCancelled` then runs every compensation in reverse order (cancel
//! the delivery, refund the payment, release the pet) and records `OrderCompensated` after
//! them, which ends the saga. Compensations are no-ops where there is nothing to undo, so
//! running all of them is always safe.
//!
//! [`react`] decides from one event and the order's *current* state, never from memory of
//! earlier events, so a runner that restarts and sees an event again decides consistently.
//! A result that arrives for an order already cancelled (a payment that went through after
//! its deadline) is compensated on arrival.

use chrono::{DateTime, Duration, Utc};

use crate::delivery::{DeliveryCommand, DeliveryEvent};
use crate::order::{Order, OrderCommand, OrderEvent, OrderStatus};
use crate::payment::{PaymentCommand, PaymentEvent};
use crate::pet::{PetCommand, PetEvent};
use crate::values::{CancellationReason, Money, OrderId, PetId, SagaStep, SimulatedFailure};

/// How the saga behaves; from configuration and feature flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaPolicy {
    /// The seed's `express_order_processing`, for orders that did not record their own mode
    /// ([`crate::order::OrderRequest::express_processing`]): on, the saga charges the order
    /// itself; off, it waits for the customer to pay (`POST /payments`) until the deadline.
    pub express_payment: bool,
    /// How long each step may take before the order is cancelled.
    pub reservation_timeout: Duration,
    /// See [`Self::reservation_timeout`].
    pub payment_timeout: Duration,
    /// See [`Self::reservation_timeout`].
    pub delivery_timeout: Duration,
}

impl SagaPolicy {
    /// The timeout of `step`.
    pub fn timeout(&self, step: SagaStep) -> Duration {
        match step {
            SagaStep::Reservation => self.reservation_timeout,
            SagaStep::Payment => self.payment_timeout,
            SagaStep::Delivery => self.delivery_timeout,
        }
    }
}

/// An event the saga reacts to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SagaEvent<'a> {
    /// From the order itself.
    Order(&'a OrderEvent),
    /// From the pet the order is for.
    Pet(&'a PetEvent),
    /// From the order's payment.
    Payment(&'a PaymentEvent),
    /// From the order's delivery.
    Delivery(&'a DeliveryEvent),
}

impl SagaEvent<'_> {
    /// The order a pet event concerns (`PetAdded` concerns none).
    pub fn order_of_pet_event(event: &PetEvent) -> Option<OrderId> {
        match event {
            PetEvent::PetAdded(_) => None,
            PetEvent::PetReserved { order_id }
            | PetEvent::PetReleased { order_id }
            | PetEvent::PetSold { order_id } => Some(*order_id),
        }
    }
}

/// How a saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaOutcome {
    /// The order completed.
    Completed,
    /// The order was cancelled, for this reason.
    Cancelled(CancellationReason),
}

/// One thing the saga runner must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaAction {
    /// Send a command to the order.
    Order(OrderCommand),
    /// Send a command to a pet; if the pet refuses it, cancel the order for `if_refused`.
    Pet {
        /// The pet.
        pet_id: PetId,
        /// The command.
        command: PetCommand,
        /// Cancel the order with this reason when the pet refuses.
        if_refused: Option<CancellationReason>,
    },
    /// Send a command to the order's payment.
    Payment(PaymentCommand),
    /// Send a command to the order's delivery.
    Delivery(DeliveryCommand),
    /// Charge the customer through the payment gateway, then record the result on the
    /// payment (`RecordPaymentProcessed` or `RecordPaymentDeclined`).
    ChargePayment {
        /// How much.
        amount: Money,
        /// Fail as if the gateway were down.
        simulate_failure: bool,
    },
    /// Book the delivery with the provider, then record the result on the delivery.
    BookDelivery {
        /// The pet to deliver.
        pet_id: PetId,
        /// Fail as if the provider were down.
        simulate_failure: bool,
    },
    /// Give the charge back through the payment gateway, then record it on the payment
    /// (`RefundPayment`); nothing when nothing stands charged. Tried until it goes through.
    RefundPayment {
        /// Why.
        reason: String,
    },
    /// Call the booked delivery off with the provider, then record it on the delivery
    /// (`CancelDelivery`); nothing when nothing stands booked. Tried until it goes through.
    CancelDelivery {
        /// Why.
        reason: String,
    },
    /// Cancel the order if `step` has not finished by `due_at` (stored durably).
    ScheduleDeadline {
        /// The step.
        step: SagaStep,
        /// When it is due.
        due_at: DateTime<Utc>,
    },
    /// The saga ended: every deadline of the order still armed has nothing left to do
    /// (it would fire a step's time-out the order refuses, or look again at a step that is
    /// over), and is settled.
    SettleDeadlines,
    /// The saga ended; count it.
    Finished(SagaOutcome),
}

impl SagaAction {
    /// Whether the action only writes to the event store (a command to one of the saga's
    /// aggregates, a deadline): it may wait to be written with the writes after it, all or
    /// nothing. Any other action (a provider call, the saga's end) acts on what the
    /// reaction decided before it, which must have been written first.
    pub fn only_writes(&self) -> bool {
        matches!(
            self,
            Self::Order(_)
                | Self::Pet { .. }
                | Self::Payment(_)
                | Self::Delivery(_)
                | Self::ScheduleDeadline { .. }
                | Self::SettleDeadlines
        )
    }
}

/// What the saga does about `event`, given the order as it stands now and when the event
/// happened. An order that does not exist (yet) gets no reaction.
pub fn react(
    order: &Order,
    event: SagaEvent<'_>,
    occurred_at: DateTime<Utc>,
    policy: &SagaPolicy,
) -> Vec<SagaAction> {
    let (Some(request), Some(status)) = (order.request(), order.status()) else {
        return Vec::new();
    };
    let order_id = request.order_id;
    let pet_id = request.pet_id.clone();
    let simulated = request.simulated_failure;
    let deadline = |step: SagaStep| SagaAction::ScheduleDeadline {
        step,
        due_at: occurred_at + policy.timeout(step),
    };
    let cancel = |reason| SagaAction::Order(OrderCommand::CancelOrder { reason });
    let live = !status.is_terminal();
    match event {
        SagaEvent::Order(OrderEvent::OrderCreated(_)) => {
            if simulated == Some(SimulatedFailure::InventoryService) {
                return vec![cancel(CancellationReason::InventoryFailed)];
            }
            vec![
                deadline(SagaStep::Reservation),
                SagaAction::Pet {
                    pet_id,
                    command: PetCommand::ReservePet { order_id },
                    if_refused: Some(CancellationReason::PetUnavailable),
                },
            ]
        }
        SagaEvent::Pet(PetEvent::PetReserved { .. }) => match status {
            OrderStatus::Pending => vec![SagaAction::Order(OrderCommand::ConfirmPetReserved)],
            OrderStatus::Cancelled => vec![SagaAction::Pet {
                pet_id,
                command: PetCommand::ReleasePet { order_id },
                if_refused: None,
            }],
            _ => Vec::new(),
        },
        SagaEvent::Order(OrderEvent::OrderPetReserved) => {
            let mut actions = vec![deadline(SagaStep::Payment)];
            let express = request.express_processing.unwrap_or(policy.express_payment);
            if express && status == OrderStatus::Reserved {
                actions.push(SagaAction::ChargePayment {
                    amount: request.amount,
                    simulate_failure: simulated == Some(SimulatedFailure::PaymentService),
                });
            }
            actions
        }
        SagaEvent::Payment(PaymentEvent::PaymentProcessed { amount, .. }) => match status {
            OrderStatus::Reserved => vec![SagaAction::Order(OrderCommand::ConfirmPayment {
                amount: *amount,
            })],
            OrderStatus::Cancelled => vec![SagaAction::RefundPayment {
                reason: "order cancelled".to_owned(),
            }],
            _ => Vec::new(),
        },
        SagaEvent::Payment(PaymentEvent::PaymentDeclined { .. }) if live => {
            vec![cancel(CancellationReason::PaymentFailed)]
        }
        SagaEvent::Order(OrderEvent::OrderPaid { .. }) if status == OrderStatus::Paid => vec![
            deadline(SagaStep::Delivery),
            SagaAction::BookDelivery {
                pet_id,
                simulate_failure: simulated == Some(SimulatedFailure::DeliveryService),
            },
        ],
        SagaEvent::Delivery(DeliveryEvent::DeliveryScheduled { .. }) => match status {
            OrderStatus::Paid => vec![SagaAction::Order(OrderCommand::ConfirmDeliveryScheduled)],
            OrderStatus::Cancelled => vec![SagaAction::CancelDelivery {
                reason: "order cancelled".to_owned(),
            }],
            _ => Vec::new(),
        },
        SagaEvent::Delivery(DeliveryEvent::DeliveryFailed { .. }) if live => {
            vec![cancel(CancellationReason::DeliveryFailed)]
        }
        SagaEvent::Order(OrderEvent::OrderDeliveryScheduled)
            if status == OrderStatus::Scheduled =>
        {
            vec![
                SagaAction::Pet {
                    pet_id,
                    command: PetCommand::SellPet { order_id },
                    if_refused: Some(CancellationReason::PetUnavailable),
                },
                SagaAction::Order(OrderCommand::CompleteOrder),
            ]
        }
        SagaEvent::Order(OrderEvent::OrderCompleted) => {
            vec![
                SagaAction::SettleDeadlines,
                SagaAction::Finished(SagaOutcome::Completed),
            ]
        }
        SagaEvent::Order(OrderEvent::OrderCancelled { reason, .. }) => vec![
            SagaAction::CancelDelivery {
                reason: format!("order cancelled: {}", reason.as_str()),
            },
            SagaAction::RefundPayment {
                reason: format!("order cancelled: {}", reason.as_str()),
            },
            SagaAction::Pet {
                pet_id,
                command: PetCommand::ReleasePet { order_id },
                if_refused: None,
            },
            SagaAction::Order(OrderCommand::ConfirmCompensated),
        ],
        SagaEvent::Order(OrderEvent::OrderCompensated) => {
            let reason = order
                .cancellation_reason()
                .unwrap_or(CancellationReason::Requested);
            vec![
                SagaAction::SettleDeadlines,
                SagaAction::Finished(SagaOutcome::Cancelled(reason)),
            ]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::Aggregate;

    use super::*;
    use crate::order::OrderRequest;
    use crate::values::CustomerId;

    fn policy(express_payment: bool) -> SagaPolicy {
        SagaPolicy {
            express_payment,
            reservation_timeout: Duration::seconds(10),
            payment_timeout: Duration::seconds(20),
            delivery_timeout: Duration::seconds(30),
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
            .single()
            .expect("valid")
    }

    fn request(simulated_failure: Option<SimulatedFailure>) -> OrderRequest {
        OrderRequest {
            order_id: OrderId::from_idempotency_key("saga", "test"),
            customer_id: CustomerId::parse("customer-001").expect("valid"),
            pet_id: PetId::parse("golden-retriever-001").expect("valid"),
            amount: Money::usd(120_000).expect("valid"),
            special_instructions: None,
            simulated_failure,
            express_processing: None,
        }
    }

    fn order(events: Vec<OrderEvent>) -> Order {
        let mut order = Order::default();
        for event in events {
            order.apply(event);
        }
        order
    }

    fn created() -> OrderEvent {
        OrderEvent::OrderCreated(request(None))
    }

    fn paid() -> OrderEvent {
        OrderEvent::OrderPaid {
            amount: request(None).amount,
        }
    }

    fn pet_id() -> PetId {
        request(None).pet_id
    }

    fn order_id() -> OrderId {
        request(None).order_id
    }

    #[test]
    fn a_new_order_reserves_its_pet_with_a_deadline() {
        let event = created();
        let actions = react(
            &order(vec![event.clone()]),
            SagaEvent::Order(&event),
            now(),
            &policy(true),
        );
        assert_eq!(
            actions,
            vec![
                SagaAction::ScheduleDeadline {
                    step: SagaStep::Reservation,
                    due_at: now() + Duration::seconds(10),
                },
                SagaAction::Pet {
                    pet_id: pet_id(),
                    command: PetCommand::ReservePet {
                        order_id: order_id()
                    },
                    if_refused: Some(CancellationReason::PetUnavailable),
                },
            ]
        );
    }

    #[test]
    fn a_failing_inventory_service_cancels_at_once() {
        let event = OrderEvent::OrderCreated(request(Some(SimulatedFailure::InventoryService)));
        let actions = react(
            &order(vec![event.clone()]),
            SagaEvent::Order(&event),
            now(),
            &policy(true),
        );
        assert_eq!(
            actions,
            vec![SagaAction::Order(OrderCommand::CancelOrder {
                reason: CancellationReason::InventoryFailed
            })]
        );
    }

    #[test]
    fn the_happy_path_advances_step_by_step() {
        let reserved = PetEvent::PetReserved {
            order_id: order_id(),
        };
        assert_eq!(
            react(
                &order(vec![created()]),
                SagaEvent::Pet(&reserved),
                now(),
                &policy(true)
            ),
            vec![SagaAction::Order(OrderCommand::ConfirmPetReserved)]
        );
        let state = order(vec![created(), OrderEvent::OrderPetReserved]);
        assert_eq!(
            react(
                &state,
                SagaEvent::Order(&OrderEvent::OrderPetReserved),
                now(),
                &policy(true)
            ),
            vec![
                SagaAction::ScheduleDeadline {
                    step: SagaStep::Payment,
                    due_at: now() + Duration::seconds(20),
                },
                SagaAction::ChargePayment {
                    amount: request(None).amount,
                    simulate_failure: false,
                },
            ]
        );
        let processed = PaymentEvent::PaymentProcessed {
            order_id: order_id(),
            amount: request(None).amount,
            provider_reference: "ch".into(),
        };
        assert_eq!(
            react(&state, SagaEvent::Payment(&processed), now(), &policy(true)),
            vec![SagaAction::Order(OrderCommand::ConfirmPayment {
                amount: request(None).amount
            })]
        );
        let state = order(vec![created(), OrderEvent::OrderPetReserved, paid()]);
        assert_eq!(
            react(&state, SagaEvent::Order(&paid()), now(), &policy(true)),
            vec![
                SagaAction::ScheduleDeadline {
                    step: SagaStep::Delivery,
                    due_at: now() + Duration::seconds(30),
                },
                SagaAction::BookDelivery {
                    pet_id: pet_id(),
                    simulate_failure: false,
                },
            ]
        );
        let scheduled = order(vec![
            created(),
            OrderEvent::OrderPetReserved,
            paid(),
            OrderEvent::OrderDeliveryScheduled,
        ]);
        assert_eq!(
            react(
                &scheduled,
                SagaEvent::Order(&OrderEvent::OrderDeliveryScheduled),
                now(),
                &policy(true)
            ),
            vec![
                SagaAction::Pet {
                    pet_id: pet_id(),
                    command: PetCommand::SellPet {
                        order_id: order_id()
                    },
                    if_refused: Some(CancellationReason::PetUnavailable),
                },
                SagaAction::Order(OrderCommand::CompleteOrder),
            ]
        );
    }

    #[test]
    fn without_express_processing_the_saga_waits_for_the_customer() {
        let state = order(vec![created(), OrderEvent::OrderPetReserved]);
        let actions = react(
            &state,
            SagaEvent::Order(&OrderEvent::OrderPetReserved),
            now(),
            &policy(false),
        );
        assert_eq!(
            actions,
            vec![SagaAction::ScheduleDeadline {
                step: SagaStep::Payment,
                due_at: now() + Duration::seconds(20),
            }]
        );
    }

    #[test]
    fn an_order_keeps_the_payment_mode_it_was_placed_with() {
        for (recorded, policy_now, charges) in [
            (Some(false), true, false),
            (Some(true), false, true),
            (None, true, true),
            (None, false, false),
        ] {
            let mut placed = request(None);
            placed.express_processing = recorded;
            let state = order(vec![
                OrderEvent::OrderCreated(placed),
                OrderEvent::OrderPetReserved,
            ]);
            let actions = react(
                &state,
                SagaEvent::Order(&OrderEvent::OrderPetReserved),
                now(),
                &policy(policy_now),
            );
            let charged = actions
                .iter()
                .any(|action| matches!(action, SagaAction::ChargePayment { .. }));
            assert_eq!(
                charged, charges,
                "recorded {recorded:?}, flag now {policy_now}"
            );
        }
        let mut retried = request(None);
        retried.express_processing = Some(false);
        let mut first = request(None);
        first.express_processing = Some(true);
        assert!(
            retried.same_order_as(&first),
            "a retry after a flag change is the same order"
        );
    }

    #[test]
    fn a_cancelled_order_compensates_in_reverse_order() {
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancellationReason::DeliveryFailed,
            compensated_later: true,
        };
        let state = order(vec![
            created(),
            OrderEvent::OrderPetReserved,
            paid(),
            cancelled.clone(),
        ]);
        let actions = react(&state, SagaEvent::Order(&cancelled), now(), &policy(true));
        assert!(matches!(actions[0], SagaAction::CancelDelivery { .. }));
        assert!(matches!(actions[1], SagaAction::RefundPayment { .. }));
        assert!(matches!(
            actions[2],
            SagaAction::Pet {
                command: PetCommand::ReleasePet { .. },
                ..
            }
        ));
        // Recorded after the compensations; the saga ends only then.
        assert_eq!(
            actions[3],
            SagaAction::Order(OrderCommand::ConfirmCompensated)
        );
        assert_eq!(actions.len(), 4);
        let compensated = order(vec![
            created(),
            OrderEvent::OrderPetReserved,
            paid(),
            cancelled,
            OrderEvent::OrderCompensated,
        ]);
        assert_eq!(
            react(
                &compensated,
                SagaEvent::Order(&OrderEvent::OrderCompensated),
                now(),
                &policy(true)
            ),
            [
                SagaAction::SettleDeadlines,
                SagaAction::Finished(SagaOutcome::Cancelled(CancellationReason::DeliveryFailed))
            ]
        );
    }

    #[test]
    fn results_arriving_after_cancellation_are_undone() {
        let cancelled = order(vec![
            created(),
            OrderEvent::OrderPetReserved,
            OrderEvent::OrderCancelled {
                reason: CancellationReason::StepTimedOut,
                compensated_later: true,
            },
        ]);
        let processed = PaymentEvent::PaymentProcessed {
            order_id: order_id(),
            amount: request(None).amount,
            provider_reference: "late".into(),
        };
        assert!(matches!(
            react(
                &cancelled,
                SagaEvent::Payment(&processed),
                now(),
                &policy(true)
            )[..],
            [SagaAction::RefundPayment { .. }]
        ));
        let reserved = PetEvent::PetReserved {
            order_id: order_id(),
        };
        assert!(matches!(
            react(&cancelled, SagaEvent::Pet(&reserved), now(), &policy(true))[..],
            [SagaAction::Pet {
                command: PetCommand::ReleasePet { .. },
                ..
            }]
        ));
        let declined = PaymentEvent::PaymentDeclined {
            order_id: order_id(),
            amount: request(None).amount,
            reason: "late".into(),
        };
        assert!(react(
            &cancelled,
            SagaEvent::Payment(&declined),
            now(),
            &policy(true)
        )
        .is_empty());
    }

    #[test]
    fn failures_cancel_the_order_with_their_reason() {
        let state = order(vec![created(), OrderEvent::OrderPetReserved]);
        let declined = PaymentEvent::PaymentDeclined {
            order_id: order_id(),
            amount: request(None).amount,
            reason: "card declined".into(),
        };
        assert_eq!(
            react(&state, SagaEvent::Payment(&declined), now(), &policy(true)),
            vec![SagaAction::Order(OrderCommand::CancelOrder {
                reason: CancellationReason::PaymentFailed
            })]
        );
        let failed = DeliveryEvent::DeliveryFailed {
            order_id: order_id(),
            reason: "no courier".into(),
        };
        let state = order(vec![created(), OrderEvent::OrderPetReserved, paid()]);
        assert_eq!(
            react(&state, SagaEvent::Delivery(&failed), now(), &policy(true)),
            vec![SagaAction::Order(OrderCommand::CancelOrder {
                reason: CancellationReason::DeliveryFailed
            })]
        );
    }

    #[test]
    fn an_unknown_order_gets_no_reaction() {
        let reserved = PetEvent::PetReserved {
            order_id: order_id(),
        };
        assert!(react(
            &Order::default(),
            SagaEvent::Pet(&reserved),
            now(),
            &policy(true)
        )
        .is_empty());
    }
}
