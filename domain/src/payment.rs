//! The Payment aggregate: the money side of one order (its id is the order's id).
//!
//! `none -> processed -> refunded`, or `none -> declined`. A payment is charged at most once
//! and refunded at most once; repeats of a command that took effect are no-ops.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::values::{Money, OrderId};
use crate::FIRST_EVENT_VERSION;

/// Commands a payment accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentCommand {
    /// Record a successful charge.
    RecordPaymentProcessed {
        /// The order paid for.
        order_id: OrderId,
        /// What was charged.
        amount: Money,
        /// The provider's reference for the charge.
        provider_reference: String,
    },
    /// Record that the provider declined or failed the charge.
    RecordPaymentDeclined {
        /// The order.
        order_id: OrderId,
        /// What was asked for.
        amount: Money,
        /// Why, in the provider's words.
        reason: String,
    },
    /// Give the money back (compensation). A no-op unless the payment was processed.
    RefundPayment {
        /// Why.
        reason: String,
    },
}

/// Events of a payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// The charge went through (the seed's `PaymentProcessed`).
    PaymentProcessed {
        /// The order paid for.
        order_id: OrderId,
        /// What was charged.
        amount: Money,
        /// The provider's reference.
        provider_reference: String,
    },
    /// The charge was declined.
    PaymentDeclined {
        /// The order.
        order_id: OrderId,
        /// What was asked for.
        amount: Money,
        /// Why.
        reason: String,
    },
    /// The charge was refunded.
    PaymentRefunded {
        /// The order.
        order_id: OrderId,
        /// What was given back.
        amount: Money,
        /// Why.
        reason: String,
    },
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PaymentProcessed { .. } => "PaymentProcessed",
            Self::PaymentDeclined { .. } => "PaymentDeclined",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        FIRST_EVENT_VERSION.to_owned()
    }
}

/// Where a payment stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentState {
    /// Nothing charged yet.
    #[default]
    None,
    /// Charged.
    Processed,
    /// Declined; nothing charged.
    Declined,
    /// Charged, then given back.
    Refunded,
}

impl PaymentState {
    /// The lower-case word clients see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Processed => "processed",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
        }
    }
}

/// A payment, rebuilt from its events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Payment {
    state: PaymentState,
    order_id: Option<OrderId>,
    amount: Option<Money>,
    /// The gateway's reference of the charge, once processed.
    #[serde(default)]
    provider_reference: Option<String>,
}

impl Payment {
    /// Where the payment stands.
    pub fn state(&self) -> PaymentState {
        self.state
    }

    /// The charge, while it stands (processed, not refunded): the gateway's reference and
    /// the amount (what a refund gives back).
    pub fn charge(&self) -> Option<(&str, Money)> {
        match (self.state, &self.provider_reference, self.amount) {
            (PaymentState::Processed, Some(reference), Some(amount)) => Some((reference, amount)),
            _ => None,
        }
    }
}

impl crate::Decide for Payment {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error> {
        let refuse = |order_id: OrderId, action: &'static str| {
            Err(DomainError::InvalidTransition {
                aggregate: "payment",
                order_id,
                state: self.state.as_str(),
                action,
            })
        };
        match command {
            PaymentCommand::RecordPaymentProcessed {
                order_id,
                amount,
                provider_reference,
            } => match self.state {
                PaymentState::None => {
                    if amount.amount_minor() == 0 {
                        return Err(DomainError::validation("amount", "must be positive"));
                    }
                    Ok(vec![PaymentEvent::PaymentProcessed {
                        order_id,
                        amount,
                        provider_reference,
                    }])
                }
                PaymentState::Processed if self.amount == Some(amount) => Ok(vec![]),
                _ => refuse(order_id, "process a payment"),
            },
            PaymentCommand::RecordPaymentDeclined {
                order_id,
                amount,
                reason,
            } => match self.state {
                PaymentState::None => Ok(vec![PaymentEvent::PaymentDeclined {
                    order_id,
                    amount,
                    reason,
                }]),
                PaymentState::Declined => Ok(vec![]),
                _ => refuse(order_id, "decline a payment"),
            },
            PaymentCommand::RefundPayment { reason } => {
                match (self.state, self.order_id, self.amount) {
                    (PaymentState::Processed, Some(order_id), Some(amount)) => {
                        Ok(vec![PaymentEvent::PaymentRefunded {
                            order_id,
                            amount,
                            reason,
                        }])
                    }
                    // Nothing was charged, or it was already given back: nothing to refund.
                    _ => Ok(vec![]),
                }
            }
        }
    }
}

/// The aggregate type its events are stored under (`aggregate_type`), and the Kafka topic
/// `{prefix}.payments` is named after.
pub const AGGREGATE_TYPE: &str = "Payment";

impl Aggregate for Payment {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = PaymentCommand;
    type Event = PaymentEvent;
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
        match event {
            PaymentEvent::PaymentProcessed {
                order_id,
                amount,
                provider_reference,
            } => {
                self.state = PaymentState::Processed;
                self.order_id = Some(order_id);
                self.amount = Some(amount);
                self.provider_reference = Some(provider_reference);
            }
            PaymentEvent::PaymentDeclined {
                order_id, amount, ..
            } => {
                self.state = PaymentState::Declined;
                self.order_id = Some(order_id);
                self.amount = Some(amount);
            }
            PaymentEvent::PaymentRefunded { .. } => self.state = PaymentState::Refunded,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type PaymentTest = TestFramework<Payment>;

    fn order_id() -> OrderId {
        OrderId::from_idempotency_key("test", "payment")
    }

    fn amount() -> Money {
        Money::usd(120_000).expect("valid")
    }

    fn process() -> PaymentCommand {
        PaymentCommand::RecordPaymentProcessed {
            order_id: order_id(),
            amount: amount(),
            provider_reference: "ch_1".into(),
        }
    }

    fn processed() -> PaymentEvent {
        PaymentEvent::PaymentProcessed {
            order_id: order_id(),
            amount: amount(),
            provider_reference: "ch_1".into(),
        }
    }

    #[test]
    fn a_payment_is_charged_once() {
        PaymentTest::with(())
            .given_no_previous_events()
            .when(process())
            .then_expect_events(vec![processed()]);
        PaymentTest::with(())
            .given(vec![processed()])
            .when(process())
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_zero_payment_is_refused() {
        PaymentTest::with(())
            .given_no_previous_events()
            .when(PaymentCommand::RecordPaymentProcessed {
                order_id: order_id(),
                amount: Money::usd(0).expect("valid"),
                provider_reference: "ch_1".into(),
            })
            .then_expect_error(DomainError::validation("amount", "must be positive"));
    }

    #[test]
    fn a_declined_payment_cannot_be_processed_later() {
        let declined = PaymentEvent::PaymentDeclined {
            order_id: order_id(),
            amount: amount(),
            reason: "card declined".into(),
        };
        PaymentTest::with(())
            .given(vec![declined])
            .when(process())
            .then_expect_error(DomainError::InvalidTransition {
                aggregate: "payment",
                order_id: order_id(),
                state: "declined",
                action: "process a payment",
            });
    }

    #[test]
    fn a_refund_happens_once_and_only_after_a_charge() {
        let refund = || PaymentCommand::RefundPayment {
            reason: "delivery failed".into(),
        };
        let refunded = PaymentEvent::PaymentRefunded {
            order_id: order_id(),
            amount: amount(),
            reason: "delivery failed".into(),
        };
        PaymentTest::with(())
            .given(vec![processed()])
            .when(refund())
            .then_expect_events(vec![refunded.clone()]);
        PaymentTest::with(())
            .given(vec![processed(), refunded])
            .when(refund())
            .then_expect_events(vec![]);
        PaymentTest::with(())
            .given_no_previous_events()
            .when(refund())
            .then_expect_events(vec![]);
    }
}
