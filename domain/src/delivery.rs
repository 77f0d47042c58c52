//! The Delivery aggregate: getting the pet to the customer (its id is the order's id).
//!
//! `none -> scheduled -> cancelled`, or `none -> failed`. Scheduled at most once, cancelled at
//! most once; repeats of a command that took effect are no-ops.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::values::{OrderId, PetId};
use crate::FIRST_EVENT_VERSION;

/// Commands a delivery accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryCommand {
    /// Record that the provider scheduled the delivery.
    RecordDeliveryScheduled {
        /// The order delivered.
        order_id: OrderId,
        /// The pet delivered.
        pet_id: PetId,
        /// When the pet is expected to arrive.
        estimated_arrival: DateTime<Utc>,
        /// The provider's reference.
        provider_reference: String,
    },
    /// Record that the provider could not schedule it.
    RecordDeliveryFailed {
        /// The order.
        order_id: OrderId,
        /// Why.
        reason: String,
    },
    /// Call the delivery off (compensation). A no-op unless it is scheduled.
    CancelDelivery {
        /// Why.
        reason: String,
    },
}

/// Events of a delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryEvent {
    /// The delivery is scheduled (the seed's `DeliveryScheduled`).
    DeliveryScheduled {
        /// The order.
        order_id: OrderId,
        /// The pet.
        pet_id: PetId,
        /// Expected arrival.
        estimated_arrival: DateTime<Utc>,
        /// The provider's reference.
        provider_reference: String,
    },
    /// The delivery could not be scheduled.
    DeliveryFailed {
        /// The order.
        order_id: OrderId,
        /// Why.
        reason: String,
    },
    /// A scheduled delivery was called off.
    DeliveryCancelled {
        /// The order.
        order_id: OrderId,
        /// Why.
        reason: String,
    },
}

impl DomainEvent for DeliveryEvent {
    fn event_type(&self) -> String {
        match self {
            Self::DeliveryScheduled { .. } => "DeliveryScheduled",
            Self::DeliveryFailed { .. } => "DeliveryFailed",
            Self::DeliveryCancelled { .. } => "DeliveryCancelled",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        FIRST_EVENT_VERSION.to_owned()
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Nothing scheduled yet.
    #[default]
    None,
    /// Scheduled with the provider.
    Scheduled,
    /// The provider could not schedule it.
    Failed,
    /// Scheduled, then called off.
    Cancelled,
}

impl DeliveryState {
    /// The lower-case word clients see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Scheduled => "scheduled",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A delivery, rebuilt from its events.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delivery {
    state: DeliveryState,
    order_id: Option<OrderId>,
    /// The provider's reference of the booking, once scheduled.
    #[serde(default)]
    provider_reference: Option<String>,
}

impl Delivery {
    /// Where the delivery stands.
    pub fn state(&self) -> DeliveryState {
        self.state
    }

    /// The provider's reference of the booking, while it stands (scheduled, not cancelled).
    pub fn booking(&self) -> Option<&str> {
        match self.state {
            DeliveryState::Scheduled => self.provider_reference.as_deref(),
            _ => None,
        }
    }
}

impl crate::Decide for Delivery {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error> {
        let refuse = |order_id: OrderId, action: &'static str| {
            Err(DomainError::InvalidTransition {
                aggregate: "delivery",
                order_id,
                state: self.state.as_str(),
                action,
            })
        };
        match command {
            DeliveryCommand::RecordDeliveryScheduled {
                order_id,
                pet_id,
                estimated_arrival,
                provider_reference,
            } => match self.state {
                DeliveryState::None => Ok(vec![DeliveryEvent::DeliveryScheduled {
                    order_id,
                    pet_id,
                    estimated_arrival,
                    provider_reference,
                }]),
                DeliveryState::Scheduled => Ok(vec![]),
                DeliveryState::Failed | DeliveryState::Cancelled => {
                    refuse(order_id, "schedule a delivery")
                }
            },
            DeliveryCommand::RecordDeliveryFailed { order_id, reason } => match self.state {
                DeliveryState::None => Ok(vec![DeliveryEvent::DeliveryFailed { order_id, reason }]),
                DeliveryState::Failed => Ok(vec![]),
                DeliveryState::Scheduled | DeliveryState::Cancelled => {
                    refuse(order_id, "fail a delivery")
                }
            },
            DeliveryCommand::CancelDelivery { reason } => match (self.state, self.order_id) {
                (DeliveryState::Scheduled, Some(order_id)) => {
                    Ok(vec![DeliveryEvent::DeliveryCancelled { order_id, reason }])
                }
                _ => Ok(vec![]),
            },
        }
    }
}

/// The aggregate type its events are stored under (`aggregate_type`), and the Kafka topic
/// `{prefix}.deliverys` is named after.
pub const AGGREGATE_TYPE: &str = "Delivery";

impl Aggregate for Delivery {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = DeliveryCommand;
    type Event = DeliveryEvent;
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
            DeliveryEvent::DeliveryScheduled {
                order_id,
                provider_reference,
                ..
            } => {
                self.state = DeliveryState::Scheduled;
                self.order_id = Some(order_id);
                self.provider_reference = Some(provider_reference);
            }
            DeliveryEvent::DeliveryFailed { order_id, .. } => {
                self.state = DeliveryState::Failed;
                self.order_id = Some(order_id);
            }
            DeliveryEvent::DeliveryCancelled { .. } => self.state = DeliveryState::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    use super::*;

    type DeliveryTest = TestFramework<Delivery>;

    fn order_id() -> OrderId {
        OrderId::from_idempotency_key("test", "delivery")
    }

    fn schedule() -> DeliveryCommand {
        DeliveryCommand::RecordDeliveryScheduled {
            order_id: order_id(),
            pet_id: PetId::parse("golden-retriever-001").expect("valid"),
            estimated_arrival: Utc
                .with_ymd_and_hms(2026, 12, 1, 10, 0, 0)
                .single()
                .expect("valid"),
            provider_reference: "dl_1".into(),
        }
    }

    fn scheduled() -> DeliveryEvent {
        DeliveryEvent::DeliveryScheduled {
            order_id: order_id(),
            pet_id: PetId::parse("golden-retriever-001").expect("valid"),
            estimated_arrival: Utc
                .with_ymd_and_hms(2026, 12, 1, 10, 0, 0)
                .single()
                .expect("valid"),
            provider_reference: "dl_1".into(),
        }
    }

    #[test]
    fn a_delivery_is_scheduled_once() {
        DeliveryTest::with(())
            .given_no_previous_events()
            .when(schedule())
            .then_expect_events(vec![scheduled()]);
        DeliveryTest::with(())
            .given(vec![scheduled()])
            .when(schedule())
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_failed_delivery_cannot_be_scheduled() {
        DeliveryTest::with(())
            .given(vec![DeliveryEvent::DeliveryFailed {
                order_id: order_id(),
                reason: "no courier".into(),
            }])
            .when(schedule())
            .then_expect_error(DomainError::InvalidTransition {
                aggregate: "delivery",
                order_id: order_id(),
                state: "failed",
                action: "schedule a delivery",
            });
    }

    #[test]
    fn cancelling_is_safe_to_repeat() {
        let cancel = || DeliveryCommand::CancelDelivery {
            reason: "payment refunded".into(),
        };
        let cancelled = DeliveryEvent::DeliveryCancelled {
            order_id: order_id(),
            reason: "payment refunded".into(),
        };
        DeliveryTest::with(())
            .given(vec![scheduled()])
            .when(cancel())
            .then_expect_events(vec![cancelled.clone()]);
        DeliveryTest::with(())
            .given(vec![scheduled(), cancelled])
            .when(cancel())
            .then_expect_events(vec![]);
        DeliveryTest::with(())
            .given_no_previous_events()
            .when(cancel())
            .then_expect_events(vec![]);
    }
}
