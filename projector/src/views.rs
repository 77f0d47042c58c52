//! Read-model documents and how events fold into them. The fold is the same for every store.

use petstore_domain::order::{OrderEvent, OrderStatus};
use petstore_domain::pet::{Availability, PetEvent};
use petstore_domain::Money;
use petstore_platform::stream::RecordedEvent;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An amount in integer minor units (cents) with its currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MoneyView {
    /// Minor units: 120000 is 1200.00.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
}

impl From<Money> for MoneyView {
    fn from(money: Money) -> Self {
        Self {
            amount_minor: money.amount_minor(),
            currency: money.currency().to_string(),
        }
    }
}

/// Where an order stands, as `GET /orders/{id}/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderStatusView {
    /// The order's id.
    pub order_id: String,
    /// `pending`, `reserved`, `paid`, `scheduled`, `completed` or `cancelled`.
    pub status: String,
    /// Who ordered.
    pub customer_id: String,
    /// The pet ordered.
    pub pet_id: String,
    /// What the order costs.
    pub amount: MoneyView,
    /// The customer's free text.
    pub special_instructions: Option<String>,
    /// Machine-readable reason when cancelled (`pet-unavailable`, `payment-failed`, ...).
    pub cancellation_reason: Option<String>,
    /// The correlation id of the request that placed the order.
    pub correlation_id: String,
    /// When the order was placed (RFC 3339).
    pub created_at: String,
    /// When the order last changed (RFC 3339).
    pub updated_at: String,
    /// How many events the order has; grows with every change.
    pub version: i64,
}

/// A pet in the catalog, as browse and `GET /pets/{id}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PetView {
    /// The pet's id, a slug.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `dog`, `cat`, `bird`, `fish` or `reptile`.
    pub category: String,
    /// Breed or species.
    pub breed: String,
    /// Age in months.
    pub age_months: u32,
    /// Price.
    pub price: MoneyView,
    /// Free-text description.
    pub description: String,
    /// `available`, `reserved` or `sold`.
    pub availability: String,
    /// How many events the pet has.
    pub version: i64,
}

/// A stored event the projector cannot read.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {event_type} v{event_version} of {aggregate_type} {aggregate_id}: {source}")]
pub struct DecodeError {
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    event_version: String,
    source: serde_json::Error,
}

fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, DecodeError> {
    serde_json::from_value(event.payload.clone()).map_err(|source| DecodeError {
        aggregate_type: event.aggregate_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        event_type: event.event_type.clone(),
        event_version: event.event_version.clone(),
        source,
    })
}

impl OrderStatusView {
    /// Folds an `Order` event into the view. Events at or below the view's version are
    /// ignored, so re-applying a batch changes nothing.
    pub fn fold(view: Option<Self>, event: &RecordedEvent) -> Result<Option<Self>, DecodeError> {
        if view
            .as_ref()
            .is_some_and(|view| view.version >= event.sequence)
        {
            return Ok(view);
        }
        let timestamp = event.metadata_value("timestamp").to_owned();
        let decoded: OrderEvent = decode(event)?;
        let status = match &decoded {
            OrderEvent::OrderCreated(request) => {
                return Ok(Some(Self {
                    order_id: request.order_id.to_string(),
                    status: OrderStatus::Pending.as_str().to_owned(),
                    customer_id: request.customer_id.to_string(),
                    pet_id: request.pet_id.to_string(),
                    amount: request.amount.into(),
                    special_instructions: request
                        .special_instructions
                        .as_ref()
                        .map(|text| text.as_str().to_owned()),
                    cancellation_reason: None,
                    correlation_id: event.metadata_value("correlation_id").to_owned(),
                    created_at: timestamp.clone(),
                    updated_at: timestamp,
                    version: event.sequence,
                }));
            }
            OrderEvent::OrderPetReserved => OrderStatus::Reserved,
            OrderEvent::OrderPaid { .. } => OrderStatus::Paid,
            OrderEvent::OrderDeliveryScheduled => OrderStatus::Scheduled,
            OrderEvent::OrderCompleted => OrderStatus::Completed,
            OrderEvent::OrderCancelled { .. } => OrderStatus::Cancelled,
        };
        Ok(view.map(|mut view| {
            view.status = status.as_str().to_owned();
            if let OrderEvent::OrderCancelled { reason } = decoded {
                view.cancellation_reason = Some(reason.as_str().to_owned());
            }
            view.updated_at = timestamp;
            view.version = event.sequence;
            view
        }))
    }
}

impl PetView {
    /// Folds a `Pet` event into the view; events at or below its version are ignored.
    pub fn fold(view: Option<Self>, event: &RecordedEvent) -> Result<Option<Self>, DecodeError> {
        if view
            .as_ref()
            .is_some_and(|view| view.version >= event.sequence)
        {
            return Ok(view);
        }
        let availability = match decode::<PetEvent>(event)? {
            PetEvent::PetAdded(details) => {
                return Ok(Some(Self {
                    id: details.pet_id.to_string(),
                    name: details.name,
                    category: details.category.as_str().to_owned(),
                    breed: details.breed,
                    age_months: details.age_months,
                    price: details.price.into(),
                    description: details.description,
                    availability: Availability::Available.as_str().to_owned(),
                    version: event.sequence,
                }));
            }
            PetEvent::PetReserved { order_id } => Availability::Reserved { order_id },
            PetEvent::PetReleased { .. } => Availability::Available,
            PetEvent::PetSold { order_id } => Availability::Sold { order_id },
        };
        Ok(view.map(|mut view| {
            view.availability = availability.as_str().to_owned();
            view.version = event.sequence;
            view
        }))
    }
}
