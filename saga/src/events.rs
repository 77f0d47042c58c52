//! The events the saga reads: of the order, its pet, payment and delivery, decoded in
//! today's shape.

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventEnvelope};
use petstore_domain::delivery::{Delivery, DeliveryEvent};
use petstore_domain::order::{Order, OrderEvent};
use petstore_domain::payment::{Payment, PaymentEvent};
use petstore_domain::pet::{Pet, PetEvent};
use petstore_domain::saga::SagaEvent;
use petstore_domain::OrderId;
use petstore_event_store::metadata::TIMESTAMP_KEY;
use petstore_event_store::stream::{self, RecordedEvent};
use petstore_telemetry::CorrelationId;
use uuid::Uuid;

use crate::error::SagaError;

/// What a reaction needs to know of the event it answers, wherever the event came from: the
/// stream (or Kafka), or the runner's own append (a reaction from memory).
pub(crate) struct Arrival {
    /// The event's id: what the reaction's commands' ids derive from.
    pub(crate) event_id: Uuid,
    /// When its command ran.
    pub(crate) occurred_at: DateTime<Utc>,
    /// The order's correlation id.
    pub(crate) correlation_id: CorrelationId,
}

impl Arrival {
    /// An event read from the stream (or Kafka).
    pub(crate) fn of(event: &RecordedEvent) -> Result<Self, SagaError> {
        let stored_at = event.metadata.timestamp()?;
        let stored_correlation = event.metadata.correlation_id()?;
        Ok(Self {
            event_id: event.event_id(),
            occurred_at: timestamp(stored_at)?,
            correlation_id: CorrelationId::parse(stored_correlation).ok_or_else(|| {
                SagaError::Unreadable(format!(
                    "metadata correlation_id {stored_correlation:?} is not a correlation id"
                ))
            })?,
        })
    }

    /// An event this runner's own append just stored, for the order of `correlation_id`.
    pub(crate) fn appended<A: Aggregate>(
        envelope: &EventEnvelope<A>,
        correlation_id: &CorrelationId,
    ) -> Result<Self, SagaError> {
        let sequence = i64::try_from(envelope.sequence).unwrap_or(i64::MAX);
        let stored_at = envelope
            .metadata
            .get(TIMESTAMP_KEY)
            .ok_or_else(|| SagaError::Unreadable("an appended event has no timestamp".into()))?;
        Ok(Self {
            event_id: stream::event_id(A::TYPE, &envelope.aggregate_id, sequence),
            occurred_at: timestamp(stored_at)?,
            correlation_id: correlation_id.clone(),
        })
    }
}

fn timestamp(stored_at: &str) -> Result<DateTime<Utc>, SagaError> {
    Ok(DateTime::parse_from_rfc3339(stored_at)
        .map_err(|_| {
            SagaError::Unreadable(format!("metadata timestamp {stored_at:?} is not RFC 3339"))
        })?
        .with_timezone(&Utc))
}

/// The aggregates whose events the saga reacts to.
pub(crate) trait SagaAggregate: Aggregate {
    /// The order `event` (of the aggregate `aggregate_id`) concerns, and the event as the
    /// saga reads it; `None` for events no saga needs.
    fn saga_event(aggregate_id: &str, event: &Self::Event) -> Option<(OrderId, Decoded)>;
}

impl SagaAggregate for Order {
    fn saga_event(aggregate_id: &str, event: &OrderEvent) -> Option<(OrderId, Decoded)> {
        Some((
            OrderId::parse(aggregate_id).ok()?,
            Decoded::Order(event.clone()),
        ))
    }
}

impl SagaAggregate for Payment {
    fn saga_event(aggregate_id: &str, event: &PaymentEvent) -> Option<(OrderId, Decoded)> {
        Some((
            OrderId::parse(aggregate_id).ok()?,
            Decoded::Payment(event.clone()),
        ))
    }
}

impl SagaAggregate for Delivery {
    fn saga_event(aggregate_id: &str, event: &DeliveryEvent) -> Option<(OrderId, Decoded)> {
        Some((
            OrderId::parse(aggregate_id).ok()?,
            Decoded::Delivery(event.clone()),
        ))
    }
}

impl SagaAggregate for Pet {
    fn saga_event(_: &str, event: &PetEvent) -> Option<(OrderId, Decoded)> {
        SagaEvent::order_of_pet_event(event).map(|order| (order, Decoded::Pet(event.clone())))
    }
}

/// A decoded event of interest to the saga.
pub(crate) enum Decoded {
    Order(OrderEvent),
    Pet(PetEvent),
    Payment(PaymentEvent),
    Delivery(DeliveryEvent),
}

impl Decoded {
    /// The event's type name.
    pub(crate) fn event_type(&self) -> String {
        use cqrs_es::DomainEvent;
        match self {
            Self::Order(event) => event.event_type(),
            Self::Pet(event) => event.event_type(),
            Self::Payment(event) => event.event_type(),
            Self::Delivery(event) => event.event_type(),
        }
    }
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
