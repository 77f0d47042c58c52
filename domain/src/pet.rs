//! The Pet aggregate. A pet is reserved by one order at a time and sold once.
//!
//! Availability moves `available -> reserved(order) -> sold(order)`, or back from reserved to
//! available when the order that holds it releases it. Repeating a command that already took
//! effect (the same order reserving, releasing or buying again) produces no event, so saga
//! retries and compensations are safe to repeat.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::values::{Money, OrderId, PetCategory, PetId};
use crate::FIRST_EVENT_VERSION;

/// Everything that describes a pet in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PetDetails {
    /// The pet's id.
    pub pet_id: PetId,
    /// Display name.
    pub name: String,
    /// Kind of animal.
    pub category: PetCategory,
    /// Breed or species, free text.
    pub breed: String,
    /// Age in whole months.
    pub age_months: u32,
    /// Whether the pet has had its vaccinations (absent in pets added before it was
    /// recorded: not vaccinated).
    #[serde(default)]
    pub vaccinated: bool,
    /// Price.
    pub price: Money,
    /// Free-text description.
    pub description: String,
}

/// Whether a pet can be ordered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Availability {
    /// No order holds the pet.
    Available,
    /// An order holds the pet while it is paid for and delivered.
    Reserved {
        /// The order holding it.
        order_id: OrderId,
    },
    /// The pet was sold.
    Sold {
        /// The order that bought it.
        order_id: OrderId,
    },
}

impl Availability {
    /// The lower-case word clients see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Reserved { .. } => "reserved",
            Self::Sold { .. } => "sold",
        }
    }
}

/// Commands a pet accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PetCommand {
    /// Put a pet in the catalog. Repeating it with identical details is a no-op.
    AddPet(PetDetails),
    /// Hold the pet for an order.
    ReservePet {
        /// The order that wants the pet.
        order_id: OrderId,
    },
    /// Let go of the pet (compensation). A no-op unless this order holds it.
    ReleasePet {
        /// The order that held the pet.
        order_id: OrderId,
    },
    /// Sell the pet to the order that holds it.
    SellPet {
        /// The order that holds the pet.
        order_id: OrderId,
    },
}

/// Events of a pet's life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PetEvent {
    /// The pet entered the catalog.
    PetAdded(PetDetails),
    /// An order now holds the pet.
    PetReserved {
        /// The order holding it.
        order_id: OrderId,
    },
    /// The order that held the pet let go of it.
    PetReleased {
        /// The order that held it.
        order_id: OrderId,
    },
    /// The pet was sold.
    PetSold {
        /// The order that bought it.
        order_id: OrderId,
    },
}

impl DomainEvent for PetEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PetAdded(_) => "PetAdded",
            Self::PetReserved { .. } => "PetReserved",
            Self::PetReleased { .. } => "PetReleased",
            Self::PetSold { .. } => "PetSold",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        FIRST_EVENT_VERSION.to_owned()
    }
}

/// A pet, rebuilt from its events. `None` until it is added.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pet {
    state: Option<PetState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PetState {
    details: PetDetails,
    availability: Availability,
}

impl Pet {
    /// The pet's details, once it exists.
    pub fn details(&self) -> Option<&PetDetails> {
        self.state.as_ref().map(|state| &state.details)
    }

    /// The pet's availability, once it exists.
    pub fn availability(&self) -> Option<&Availability> {
        self.state.as_ref().map(|state| &state.availability)
    }
}

impl crate::Decide for Pet {
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error> {
        let Some(state) = &self.state else {
            return match command {
                PetCommand::AddPet(details) => Ok(vec![PetEvent::PetAdded(details)]),
                // Nothing to undo on a pet that never existed.
                PetCommand::ReleasePet { .. } => Ok(vec![]),
                PetCommand::ReservePet { .. } | PetCommand::SellPet { .. } => {
                    Err(DomainError::validation("pet_id", "the pet does not exist"))
                }
            };
        };
        if let PetCommand::AddPet(details) = &command {
            return if state.details == *details {
                Ok(vec![])
            } else {
                Err(DomainError::PetAlreadyExists(details.pet_id.clone()))
            };
        }
        let pet_id = state.details.pet_id.clone();
        match (command, &state.availability) {
            (PetCommand::AddPet(_), _) => Ok(vec![]),
            (PetCommand::ReservePet { order_id }, Availability::Available) => {
                Ok(vec![PetEvent::PetReserved { order_id }])
            }
            (PetCommand::ReservePet { order_id }, Availability::Reserved { order_id: holder })
                if order_id == *holder =>
            {
                Ok(vec![])
            }
            (PetCommand::ReservePet { .. }, Availability::Reserved { .. }) => {
                Err(DomainError::PetUnavailable { pet_id })
            }
            (PetCommand::ReservePet { .. }, Availability::Sold { .. }) => {
                Err(DomainError::PetAlreadySold(pet_id))
            }
            (PetCommand::ReleasePet { order_id }, Availability::Reserved { order_id: holder })
                if order_id == *holder =>
            {
                Ok(vec![PetEvent::PetReleased { order_id }])
            }
            // Releasing a pet this order does not hold (never reserved, already released, or
            // sold) changes nothing: compensations must be safe to repeat.
            (PetCommand::ReleasePet { .. }, _) => Ok(vec![]),
            (PetCommand::SellPet { order_id }, Availability::Reserved { order_id: holder })
                if order_id == *holder =>
            {
                Ok(vec![PetEvent::PetSold { order_id }])
            }
            (PetCommand::SellPet { order_id }, Availability::Sold { order_id: buyer })
                if order_id == *buyer =>
            {
                Ok(vec![])
            }
            (PetCommand::SellPet { .. }, Availability::Sold { .. }) => {
                Err(DomainError::PetAlreadySold(pet_id))
            }
            (PetCommand::SellPet { order_id }, _) => {
                Err(DomainError::PetNotReservedForOrder { pet_id, order_id })
            }
        }
    }
}

/// The aggregate type its events are stored under (`aggregate_type`), and the Kafka topic
/// `{prefix}.pets` is named after.
pub const AGGREGATE_TYPE: &str = "Pet";

impl Aggregate for Pet {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = PetCommand;
    type Event = PetEvent;
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
            PetEvent::PetAdded(details) => {
                self.state = Some(PetState {
                    details,
                    availability: Availability::Available,
                });
            }
            PetEvent::PetReserved { order_id } => self.set(Availability::Reserved { order_id }),
            PetEvent::PetReleased { .. } => self.set(Availability::Available),
            PetEvent::PetSold { order_id } => self.set(Availability::Sold { order_id }),
        }
    }
}

impl Pet {
    fn set(&mut self, availability: Availability) {
        if let Some(state) = self.state.as_mut() {
            state.availability = availability;
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::values::Money;

    type PetTest = TestFramework<Pet>;

    fn details() -> PetDetails {
        PetDetails {
            pet_id: PetId::parse("golden-retriever-001").expect("valid"),
            name: "Buddy".into(),
            category: PetCategory::Dog,
            breed: "Golden Retriever".into(),
            age_months: 3,
            vaccinated: true,
            price: Money::usd(120_000).expect("valid"),
            description: "Friendly".into(),
        }
    }

    fn added() -> PetEvent {
        PetEvent::PetAdded(details())
    }

    #[test]
    fn adding_a_pet_records_it_once() {
        PetTest::with(())
            .given_no_previous_events()
            .when(PetCommand::AddPet(details()))
            .then_expect_events(vec![added()]);
        PetTest::with(())
            .given(vec![added()])
            .when(PetCommand::AddPet(details()))
            .then_expect_events(vec![]);
        let mut changed = details();
        changed.name = "Max".into();
        PetTest::with(())
            .given(vec![added()])
            .when(PetCommand::AddPet(changed))
            .then_expect_error(DomainError::PetAlreadyExists(details().pet_id));
    }

    #[test]
    fn an_available_pet_can_be_reserved() {
        let order_id = OrderId::random();
        PetTest::with(())
            .given(vec![added()])
            .when(PetCommand::ReservePet { order_id })
            .then_expect_events(vec![PetEvent::PetReserved { order_id }]);
    }

    #[test]
    fn a_pet_is_reserved_by_one_order_at_a_time() {
        let holder = OrderId::random();
        PetTest::with(())
            .given(vec![added(), PetEvent::PetReserved { order_id: holder }])
            .when(PetCommand::ReservePet {
                order_id: OrderId::random(),
            })
            .then_expect_error(DomainError::PetUnavailable {
                pet_id: details().pet_id,
            });
        // The holder asking again is a repeat, not a second reservation.
        PetTest::with(())
            .given(vec![added(), PetEvent::PetReserved { order_id: holder }])
            .when(PetCommand::ReservePet { order_id: holder })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_pet_is_sold_once() {
        let buyer = OrderId::random();
        let sold = vec![
            added(),
            PetEvent::PetReserved { order_id: buyer },
            PetEvent::PetSold { order_id: buyer },
        ];
        PetTest::with(())
            .given(sold.clone())
            .when(PetCommand::ReservePet {
                order_id: OrderId::random(),
            })
            .then_expect_error(DomainError::PetAlreadySold(details().pet_id));
        PetTest::with(())
            .given(sold.clone())
            .when(PetCommand::SellPet {
                order_id: OrderId::random(),
            })
            .then_expect_error(DomainError::PetAlreadySold(details().pet_id));
        PetTest::with(())
            .given(sold)
            .when(PetCommand::SellPet { order_id: buyer })
            .then_expect_events(vec![]);
    }

    #[test]
    fn only_the_holder_can_buy_the_pet() {
        let holder = OrderId::random();
        let other = OrderId::random();
        PetTest::with(())
            .given(vec![added(), PetEvent::PetReserved { order_id: holder }])
            .when(PetCommand::SellPet { order_id: other })
            .then_expect_error(DomainError::PetNotReservedForOrder {
                pet_id: details().pet_id,
                order_id: other,
            });
        PetTest::with(())
            .given(vec![added()])
            .when(PetCommand::SellPet { order_id: holder })
            .then_expect_error(DomainError::PetNotReservedForOrder {
                pet_id: details().pet_id,
                order_id: holder,
            });
    }

    #[test]
    fn releasing_frees_the_pet_and_is_safe_to_repeat() {
        let holder = OrderId::random();
        PetTest::with(())
            .given(vec![added(), PetEvent::PetReserved { order_id: holder }])
            .when(PetCommand::ReleasePet { order_id: holder })
            .then_expect_events(vec![PetEvent::PetReleased { order_id: holder }]);
        PetTest::with(())
            .given(vec![
                added(),
                PetEvent::PetReserved { order_id: holder },
                PetEvent::PetReleased { order_id: holder },
            ])
            .when(PetCommand::ReleasePet { order_id: holder })
            .then_expect_events(vec![]);
        // Another order releasing the pet does not free it.
        PetTest::with(())
            .given(vec![added(), PetEvent::PetReserved { order_id: holder }])
            .when(PetCommand::ReleasePet {
                order_id: OrderId::random(),
            })
            .then_expect_events(vec![]);
        // After a release another order may reserve it.
        let next = OrderId::random();
        PetTest::with(())
            .given(vec![
                added(),
                PetEvent::PetReserved { order_id: holder },
                PetEvent::PetReleased { order_id: holder },
            ])
            .when(PetCommand::ReservePet { order_id: next })
            .then_expect_events(vec![PetEvent::PetReserved { order_id: next }]);
    }

    #[test]
    fn commands_on_a_missing_pet_are_refused() {
        PetTest::with(())
            .given_no_previous_events()
            .when(PetCommand::ReservePet {
                order_id: OrderId::random(),
            })
            .then_expect_error(DomainError::validation("pet_id", "the pet does not exist"));
    }
}
