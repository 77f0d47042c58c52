//! The events the saga reads: of the order, its pet, payment and delivery, decoded in
//! today's shape.

use cqrs_es::Aggregate;
use petstore_domain::delivery::{Delivery, DeliveryEvent};
use petstore_domain::order::{Order, OrderEvent};
use petstore_domain::payment::{Payment, PaymentEvent};
use petstore_domain::pet::{Pet, PetEvent};
use petstore_domain::saga::SagaEvent;
use petstore_domain::OrderId;
use petstore_event_store::stream::RecordedEvent;

use crate::error::SagaError;

/// A decoded event of interest to the saga.
pub(crate) enum Decoded {
    Order(OrderEvent),
    Pet(PetEvent),
    Payment(PaymentEvent),
    Delivery(DeliveryEvent),
}

/// Decodes an event in today's shape (an older version upcast first).
pub(crate) fn decode<E: serde::de::DeserializeOwned>(
    event: &RecordedEvent,
) -> Result<E, SagaError> {
    petstore_domain::upcasting::decode(
        &event.aggregate_type,
        &event.event_type,
        &event.event_version,
        event.payload.raw(),
    )
    .map_err(|source| SagaError::Decode {
        event_type: event.event_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        source: Box::new(source),
    })
}

/// The order an event belongs to, and the event decoded; `None` for events no saga needs.
pub(crate) fn saga_event(event: &RecordedEvent) -> Result<Option<(OrderId, Decoded)>, SagaError> {
    let order_of_aggregate = || OrderId::parse(&event.aggregate_id).ok();
    Ok(match event.aggregate_type.as_str() {
        Order::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Order(e))))
            .transpose()?,
        Payment::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Payment(e))))
            .transpose()?,
        Delivery::TYPE => order_of_aggregate()
            .map(|id| decode(event).map(|e| (id, Decoded::Delivery(e))))
            .transpose()?,
        Pet::TYPE => {
            let pet_event: PetEvent = decode(event)?;
            SagaEvent::order_of_pet_event(&pet_event).map(|id| (id, Decoded::Pet(pet_event)))
        }
        _ => None,
    })
}
