//! Read-model documents and how events fold into them. The fold is the same for every store.

use std::collections::HashMap;

use cqrs_es::Aggregate;
use petstore_domain::delivery::{Delivery, DeliveryEvent};
use petstore_domain::order::{Order, OrderEvent, OrderStatus};
use petstore_domain::payment::{Payment, PaymentEvent};
use petstore_domain::pet::{Availability, Pet, PetEvent};
use petstore_domain::upcasting;
use petstore_domain::{CustomerId, Money, OrderId, PetId};
use petstore_event_store::metadata::MissingMetadata;
use petstore_event_store::stream::{RecordedEvent, StreamPosition};
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

/// The status of a cancelled order whose compensations (refund, pet release, delivery
/// cancellation) are not all recorded yet; `cancelled` follows.
pub const COMPENSATING: &str = "compensating";

/// One step of an order's saga, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SagaStepView {
    /// `reservation`, `payment`, `delivery` or `completion`.
    pub name: String,
    /// `pending`, `in_progress`, `succeeded`, `failed`, `compensated` or `skipped`.
    pub state: String,
    /// When the step started (RFC 3339).
    pub started_at: Option<String>,
    /// When it last changed state after starting (RFC 3339).
    pub finished_at: Option<String>,
    /// The provider's reference, or why the step failed or was compensated.
    pub detail: Option<String>,
}

impl SagaStepView {
    fn pending(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: "pending".to_owned(),
            started_at: None,
            finished_at: None,
            detail: None,
        }
    }
}

/// Where an order stands, as `GET /orders/{id}/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderStatusView {
    /// The order's id.
    #[schema(value_type = String, format = Uuid)]
    pub order_id: OrderId,
    /// `pending`, `reserved`, `paid`, `scheduled`, then `completed`, or `compensating` and
    /// `cancelled` (every compensation recorded: nothing is left to undo).
    pub status: String,
    /// Who ordered.
    #[schema(value_type = String)]
    pub customer_id: CustomerId,
    /// The pet ordered.
    #[schema(value_type = String)]
    pub pet_id: PetId,
    /// What the order costs.
    pub amount: MoneyView,
    /// The customer's free text.
    pub special_instructions: Option<String>,
    /// Machine-readable reason when cancelled (`pet-unavailable`, `payment-failed`,
    /// `delivery-failed`, `step-timed-out`, `inventory-failed`, `requested`).
    pub cancellation_reason: Option<String>,
    /// The saga's steps in order: reservation, payment, delivery, completion.
    pub steps: Vec<SagaStepView>,
    /// The correlation id of the request that placed the order; the audit trail's key.
    pub correlation_id: String,
    /// When the order was placed (RFC 3339).
    pub created_at: String,
    /// When the order or its saga last changed (RFC 3339).
    pub updated_at: String,
    /// The global stream position of the last event applied to this view.
    pub position: StreamPosition,
    /// Every status the order has had, oldest first (what the live updates stream). Views
    /// folded by a release before this field start it at their status then.
    #[serde(default)]
    pub status_history: Vec<StatusChange>,
    /// Events of this order set aside as dead letters and not handled yet: while there are
    /// any, the order needs someone's attention (`petstore dead-letters`). Not part of the
    /// stored view: the status route adds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<Attention>,
}

/// A dead letter that holds an order back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attention {
    /// The dead letter (`petstore dead-letters retry ID`).
    pub dead_letter_id: i64,
    /// Who could not handle the event: `saga`.
    pub consumer: String,
    /// The event's type and version.
    pub event: String,
    /// Why.
    pub error: String,
}

/// One status of an order, from the event that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusChange {
    /// The status it took.
    pub status: String,
    /// Why, when it is `cancelled`.
    pub cancellation_reason: Option<String>,
    /// When the event was recorded (RFC 3339).
    pub at: String,
    /// The event's position in the global stream.
    pub position: StreamPosition,
}

impl StatusChange {
    /// Whether the order can change no more.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "cancelled")
    }
}

/// A pet in the catalog, as browse and `GET /pets/{id}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PetView {
    /// The pet's id, a slug.
    #[schema(value_type = String)]
    pub id: PetId,
    /// Display name.
    pub name: String,
    /// `dog`, `cat`, `bird`, `fish` or `reptile`.
    pub category: String,
    /// Breed or species.
    pub breed: String,
    /// Age in months.
    pub age_months: u32,
    /// Whether the pet has had its vaccinations.
    #[serde(default)]
    pub vaccinated: bool,
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
    source: Box<Unreadable>,
}

/// What about a stored event cannot be read.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    /// Its payload, in its type and version.
    #[error(transparent)]
    Payload(#[from] upcasting::DecodeFailure),
    /// Metadata a view needs (when it happened, its correlation id).
    #[error(transparent)]
    Metadata(#[from] MissingMetadata),
}

impl DecodeError {
    fn of(event: &RecordedEvent, source: impl Into<Unreadable>) -> Self {
        Self {
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            source: Box::new(source.into()),
        }
    }
}

/// When `event` happened, as stored.
fn timestamp(event: &RecordedEvent) -> Result<String, DecodeError> {
    event
        .metadata
        .timestamp()
        .map(str::to_owned)
        .map_err(|missing| DecodeError::of(event, missing))
}

/// Decodes an event in today's shape (an older version upcast first).
fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, DecodeError> {
    upcasting::decode(
        &event.aggregate_type,
        &event.event_type,
        &event.event_version,
        event.payload.raw(),
    )
    .map_err(|source| DecodeError::of(event, source))
}

/// An event a projection could not fold: skipped, to be set aside as a dead letter.
#[derive(Debug)]
pub struct Poisoned<'a> {
    /// The event.
    pub event: &'a RecordedEvent,
    /// The order whose view it concerns, when known.
    pub order_id: Option<OrderId>,
    /// Why.
    pub error: DecodeError,
}

/// The views one batch of events touches, before and after folding it.
#[derive(Debug, Default)]
pub struct ViewBatch {
    /// Order views by order id; `None` until the order exists.
    pub orders: HashMap<OrderId, Option<OrderStatusView>>,
    /// Pet views by pet id.
    pub pets: HashMap<PetId, Option<PetView>>,
}

impl ViewBatch {
    /// The order and pet ids `events` touch, each once, sorted: load these views, fold.
    pub fn ids(events: &[RecordedEvent]) -> (Vec<OrderId>, Vec<PetId>) {
        let mut orders: Vec<OrderId> = events.iter().filter_map(order_view_id).collect();
        orders.sort_unstable();
        orders.dedup();
        let mut pets: Vec<PetId> = events.iter().filter_map(pet_view_id).collect();
        pets.sort_unstable();
        pets.dedup();
        (orders, pets)
    }

    /// Folds `events`, in order, into the loaded views (missing ones start as `None`). An
    /// event that cannot be decoded is skipped (its views stay as they were) and returned, to
    /// be set aside as a dead letter.
    pub fn fold<'a>(&mut self, events: &'a [RecordedEvent]) -> Vec<Poisoned<'a>> {
        let mut poisoned = Vec::new();
        for event in events {
            let order_id = order_view_id(event);
            let folded = order_id
                .as_ref()
                .map_or(Ok(()), |order_id| {
                    OrderStatusView::fold(self.orders.entry(*order_id).or_default(), event)
                })
                .and_then(|()| match pet_view_id(event) {
                    Some(pet_id) => PetView::fold(self.pets.entry(pet_id).or_default(), event),
                    None => Ok(()),
                });
            if let Err(error) = folded {
                poisoned.push(Poisoned {
                    event,
                    order_id,
                    error,
                });
            }
        }
        poisoned
    }

    /// The views after folding, without the ids that never came to exist.
    pub fn into_views(self) -> (Vec<OrderStatusView>, Vec<PetView>) {
        (
            self.orders.into_values().flatten().collect(),
            self.pets.into_values().flatten().collect(),
        )
    }
}

/// The order whose status view an event changes, if any.
pub fn order_view_id(event: &RecordedEvent) -> Option<OrderId> {
    let id = match event.aggregate_type.as_str() {
        Order::TYPE | Payment::TYPE | Delivery::TYPE => Some(event.aggregate_id.clone()),
        Pet::TYPE => event.payload.variant_field("order_id"),
        _ => None,
    };
    id.and_then(|id| OrderId::parse(&id).ok())
}

/// The pet whose view an event changes, if any.
pub fn pet_view_id(event: &RecordedEvent) -> Option<PetId> {
    (event.aggregate_type == Pet::TYPE)
        .then(|| PetId::parse(&event.aggregate_id).ok())
        .flatten()
}

impl OrderStatusView {
    /// Folds an event of the order, its pet, its payment or its delivery into the view.
    /// Events at or before the view's position are ignored, so re-applying a batch changes
    /// nothing.
    /// On a decode error the view is left as it was.
    pub fn fold(slot: &mut Option<Self>, event: &RecordedEvent) -> Result<(), DecodeError> {
        if slot
            .as_ref()
            .is_some_and(|view| view.position >= event.position)
        {
            return Ok(());
        }
        if event.aggregate_type == Order::TYPE {
            if let OrderEvent::OrderCreated(request) = decode(event)? {
                let timestamp = timestamp(event)?;
                let mut steps: Vec<SagaStepView> =
                    ["reservation", "payment", "delivery", "completion"]
                        .into_iter()
                        .map(SagaStepView::pending)
                        .collect();
                steps[0].state = "in_progress".to_owned();
                steps[0].started_at = Some(timestamp.clone());
                let status = OrderStatus::Pending.as_str().to_owned();
                *slot = Some(Self {
                    order_id: request.order_id,
                    status_history: vec![StatusChange {
                        status: status.clone(),
                        cancellation_reason: None,
                        at: timestamp.clone(),
                        position: event.position,
                    }],
                    attention: Vec::new(),
                    status,
                    customer_id: request.customer_id.clone(),
                    pet_id: request.pet_id.clone(),
                    amount: request.amount.into(),
                    special_instructions: request
                        .special_instructions
                        .as_ref()
                        .map(|text| text.as_str().to_owned()),
                    cancellation_reason: None,
                    steps,
                    correlation_id: event
                        .metadata
                        .correlation_id()
                        .map_err(|missing| DecodeError::of(event, missing))?
                        .to_owned(),
                    created_at: timestamp.clone(),
                    updated_at: timestamp,
                    position: event.position,
                });
                return Ok(());
            }
        }
        let Some(view) = slot.as_mut() else {
            return Ok(());
        };
        let timestamp = timestamp(event)?;
        let before = view.current_status();
        view.apply(event, &timestamp)?;
        if view.status != before.status {
            if view.status_history.is_empty() {
                view.status_history.push(before);
            }
            view.status_history.push(StatusChange {
                status: view.status.clone(),
                cancellation_reason: view.cancellation_reason.clone(),
                at: timestamp.clone(),
                position: event.position,
            });
        }
        view.updated_at = timestamp;
        view.position = event.position;
        Ok(())
    }

    /// The order's status now, as its last [`StatusChange`]. (A view folded before
    /// `status_history` existed answers its status at its last position.)
    pub fn current_status(&self) -> StatusChange {
        self.status_history
            .last()
            .cloned()
            .unwrap_or_else(|| StatusChange {
                status: self.status.clone(),
                cancellation_reason: self.cancellation_reason.clone(),
                at: self.updated_at.clone(),
                position: self.position,
            })
    }

    fn step(&mut self, name: &str) -> Option<&mut SagaStepView> {
        self.steps.iter_mut().find(|step| step.name == name)
    }

    /// Moves a step to `state` at `at`, with an optional detail.
    fn mark(&mut self, name: &str, state: &str, at: &str, detail: Option<String>) {
        if let Some(step) = self.step(name) {
            if state == "in_progress" {
                step.started_at = Some(at.to_owned());
            } else {
                step.finished_at = Some(at.to_owned());
            }
            step.state = state.to_owned();
            if detail.is_some() {
                step.detail = detail;
            }
        }
    }

    fn apply(&mut self, event: &RecordedEvent, at: &str) -> Result<(), DecodeError> {
        match event.aggregate_type.as_str() {
            Order::TYPE => match decode::<OrderEvent>(event)? {
                OrderEvent::OrderCreated(_) => {}
                OrderEvent::OrderPetReserved => {
                    self.status = OrderStatus::Reserved.as_str().to_owned();
                    self.mark("payment", "in_progress", at, None);
                }
                OrderEvent::OrderPaid { .. } => {
                    self.status = OrderStatus::Paid.as_str().to_owned();
                    self.mark("delivery", "in_progress", at, None);
                }
                OrderEvent::OrderDeliveryScheduled => {
                    self.status = OrderStatus::Scheduled.as_str().to_owned();
                    self.mark("completion", "in_progress", at, None);
                }
                OrderEvent::OrderCompleted => {
                    self.status = OrderStatus::Completed.as_str().to_owned();
                    self.mark("completion", "succeeded", at, None);
                }
                OrderEvent::OrderCompensated => {
                    self.status = OrderStatus::Cancelled.as_str().to_owned();
                }
                OrderEvent::OrderCancelled {
                    reason,
                    compensated_later,
                } => {
                    // `cancelled` once nothing is left to undo: at `OrderCompensated`, or at
                    // once for a cancellation written before that event existed.
                    self.status = if compensated_later {
                        COMPENSATING
                    } else {
                        OrderStatus::Cancelled.as_str()
                    }
                    .to_owned();
                    self.cancellation_reason = Some(reason.as_str().to_owned());
                    for step in &mut self.steps {
                        match step.state.as_str() {
                            "in_progress" => {
                                step.state = "failed".to_owned();
                                step.finished_at = Some(at.to_owned());
                                step.detail
                                    .get_or_insert_with(|| reason.as_str().to_owned());
                            }
                            "pending" => step.state = "skipped".to_owned(),
                            _ => {}
                        }
                    }
                }
            },
            Pet::TYPE => match decode::<PetEvent>(event)? {
                PetEvent::PetReserved { .. } => self.mark("reservation", "succeeded", at, None),
                PetEvent::PetReleased { .. } => {
                    let reserved = self
                        .step("reservation")
                        .is_some_and(|step| step.state == "succeeded");
                    if reserved {
                        self.mark(
                            "reservation",
                            "compensated",
                            at,
                            Some("pet released".to_owned()),
                        );
                    }
                }
                PetEvent::PetAdded(_) | PetEvent::PetSold { .. } => {}
            },
            Payment::TYPE => match decode::<PaymentEvent>(event)? {
                PaymentEvent::PaymentProcessed {
                    provider_reference, ..
                } => self.mark("payment", "succeeded", at, Some(provider_reference)),
                PaymentEvent::PaymentDeclined { reason, .. } => {
                    self.mark("payment", "failed", at, Some(reason))
                }
                PaymentEvent::PaymentRefunded { reason, .. } => {
                    self.mark("payment", "compensated", at, Some(reason))
                }
            },
            Delivery::TYPE => match decode::<DeliveryEvent>(event)? {
                DeliveryEvent::DeliveryScheduled {
                    provider_reference,
                    estimated_arrival,
                    ..
                } => self.mark(
                    "delivery",
                    "succeeded",
                    at,
                    Some(format!(
                        "{provider_reference}, arriving {}",
                        estimated_arrival.to_rfc3339()
                    )),
                ),
                DeliveryEvent::DeliveryFailed { reason, .. } => {
                    self.mark("delivery", "failed", at, Some(reason))
                }
                DeliveryEvent::DeliveryCancelled { reason, .. } => {
                    self.mark("delivery", "compensated", at, Some(reason))
                }
            },
            _ => {}
        }
        Ok(())
    }
}

impl PetView {
    /// Folds a `Pet` event into the view; events at or below its version are ignored. On a
    /// decode error the view is left as it was.
    pub fn fold(slot: &mut Option<Self>, event: &RecordedEvent) -> Result<(), DecodeError> {
        if slot
            .as_ref()
            .is_some_and(|view| view.version >= event.sequence)
        {
            return Ok(());
        }
        let availability = match decode::<PetEvent>(event)? {
            PetEvent::PetAdded(details) => {
                *slot = Some(Self {
                    id: details.pet_id.clone(),
                    name: details.name,
                    category: details.category.as_str().to_owned(),
                    breed: details.breed,
                    age_months: details.age_months,
                    vaccinated: details.vaccinated,
                    price: details.price.into(),
                    description: details.description,
                    availability: Availability::Available.as_str().to_owned(),
                    version: event.sequence,
                });
                return Ok(());
            }
            PetEvent::PetReserved { order_id } => Availability::Reserved { order_id },
            PetEvent::PetReleased { .. } => Availability::Available,
            PetEvent::PetSold { order_id } => Availability::Sold { order_id },
        };
        if let Some(view) = slot {
            view.availability = availability.as_str().to_owned();
            view.version = event.sequence;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::DomainEvent;
    use petstore_domain::order::OrderRequest;
    use petstore_domain::values::CancellationReason;
    use petstore_domain::{CustomerId, OrderId, PetId};
    use petstore_event_store::stream::Payload;

    use super::*;

    fn recorded(order_id: OrderId, position: i64, event: &OrderEvent) -> RecordedEvent {
        RecordedEvent {
            position: StreamPosition {
                transaction_id: 0,
                global_position: position,
            },
            aggregate_type: Order::TYPE.to_owned(),
            aggregate_id: order_id.to_string(),
            sequence: position,
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: Payload::of(event).expect("an event serializes"),
            // What the service stores with every event (an OrderCreated view keeps its
            // correlation id).
            metadata: petstore_event_store::metadata::StoredMetadata {
                timestamp: Some("2026-12-02T00:00:00Z".to_owned()),
                correlation_id: Some("c-1".to_owned()),
                ..Default::default()
            },
            delivery: None,
        }
    }

    fn statuses(events: &[RecordedEvent]) -> Vec<String> {
        let mut view = None;
        for event in events {
            OrderStatusView::fold(&mut view, event).expect("folds");
        }
        let view = view.expect("the order exists");
        view.status_history.into_iter().map(|c| c.status).collect()
    }

    #[test]
    fn an_event_without_its_time_cannot_be_folded_and_leaves_the_view_as_it_was() {
        let order_id = OrderId::random();
        let created = OrderEvent::OrderCreated(OrderRequest {
            order_id,
            customer_id: CustomerId::parse("customer-001").expect("valid"),
            pet_id: PetId::parse("persian-cat-001").expect("valid"),
            amount: Money::usd(1_000).expect("valid"),
            special_instructions: None,
            simulated_failure: None,
            express_processing: None,
        });
        let mut view = None;
        OrderStatusView::fold(&mut view, &recorded(order_id, 1, &created)).expect("folds");
        let mut reserved = recorded(order_id, 2, &OrderEvent::OrderPetReserved);
        reserved.metadata.timestamp = None;
        let refused = OrderStatusView::fold(&mut view, &reserved).expect_err("no timestamp");
        assert!(refused.to_string().contains("timestamp"), "{refused}");
        assert_eq!(view.expect("the order exists").status, "pending");
    }

    #[test]
    fn a_cancellation_is_compensating_until_its_compensations_are_recorded() {
        let order_id = OrderId::random();
        let created = OrderEvent::OrderCreated(OrderRequest {
            order_id,
            customer_id: CustomerId::parse("customer-001").expect("valid"),
            pet_id: PetId::parse("persian-cat-001").expect("valid"),
            amount: Money::usd(1_000).expect("valid"),
            special_instructions: None,
            simulated_failure: None,
            express_processing: None,
        });
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancellationReason::PaymentFailed,
            compensated_later: true,
        };
        let mut events = vec![
            recorded(order_id, 1, &created),
            recorded(order_id, 2, &cancelled),
        ];
        assert_eq!(statuses(&events), ["pending", "compensating"]);
        events.push(recorded(order_id, 3, &OrderEvent::OrderCompensated));
        assert_eq!(statuses(&events), ["pending", "compensating", "cancelled"]);
        // Written before OrderCompensated existed: settled when recorded.
        events.truncate(2);
        events[1].event_version = petstore_domain::FIRST_EVENT_VERSION.to_owned();
        assert_eq!(statuses(&events), ["pending", "cancelled"]);
    }
}
