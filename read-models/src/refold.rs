//! Retrying a projection's dead letter: the views the event concerns (its order's status,
//! its pet) are folded again from scratch, from every event of theirs in the log, with
//! today's code (a fix, an upcaster). A projection folds events in order and ignores those
//! behind a view, so re-applying the one event it skipped would change nothing; a refold is
//! what the view would have been had the event never failed.

use petstore_domain::delivery::Delivery;
use petstore_domain::order::Order;
use petstore_domain::payment::Payment;
use petstore_domain::pet::Pet;
use petstore_domain::PetId;
use petstore_event_store::database::Database;
use petstore_event_store::dead_letters::DeadLetter;
use petstore_event_store::stream::{self, RecordedEvent, StreamError};

use cqrs_es::Aggregate;

use crate::views::{order_view_id, ViewBatch};

/// The most events one view's history may have.
const HISTORY_LIMIT: i64 = 100_000;

async fn events_of(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<RecordedEvent>, StreamError> {
    let mut events = stream::aggregate_events_newest_first(
        database,
        aggregate_type,
        aggregate_id,
        1..i64::MAX,
        HISTORY_LIMIT,
    )
    .await?;
    events.reverse();
    Ok(events)
}

/// The pet an order is for, from its `OrderCreated` as stored (read raw: that very event may
/// be the one that could not be decoded).
fn pet_of(order_events: &[RecordedEvent]) -> Option<String> {
    order_events
        .iter()
        .find(|event| event.event_type == "OrderCreated")
        .and_then(|event| event.payload.variant_field("pet_id"))
}

/// An empty batch over the views `letter` concerns, and every event of theirs, in stream
/// order: fold the one into the other.
pub async fn history(
    database: &Database,
    letter: &DeadLetter,
) -> Result<(ViewBatch, Vec<RecordedEvent>), StreamError> {
    let mut batch = ViewBatch::default();
    let mut events = Vec::new();
    if let Some(order_id) = &letter.order_id {
        batch.orders.insert(*order_id, None);
        let mut order_events = Vec::new();
        for aggregate_type in [Order::TYPE, Payment::TYPE, Delivery::TYPE] {
            order_events.extend(events_of(database, aggregate_type, &order_id.to_string()).await?);
        }
        if let Some(pet_id) = pet_of(&order_events) {
            let named: Vec<RecordedEvent> = events_of(database, Pet::TYPE, &pet_id)
                .await?
                .into_iter()
                .filter(|event| order_view_id(event).as_ref() == Some(order_id))
                .collect();
            order_events.extend(named);
        }
        events.extend(order_events);
    }
    let pet = (letter.aggregate_type == Pet::TYPE)
        .then(|| PetId::parse(&letter.aggregate_id).ok())
        .flatten();
    if let Some(pet_id) = pet {
        batch.pets.insert(pet_id, None);
        events.extend(events_of(database, Pet::TYPE, &letter.aggregate_id).await?);
    }
    events.sort_by_key(|event| event.position);
    events.dedup_by_key(|event| event.position);
    Ok((batch, events))
}
