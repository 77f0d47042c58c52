//! The message: its JSON value (the event and its place in the global stream) and its topic.

use rdkafka::message::Headers;
use rdkafka::Message;
use serde::{Deserialize, Serialize};

use petstore_event_store::metadata::StoredMetadata;
use petstore_event_store::stream::{Payload, RecordedEvent, StreamPosition};

/// The JSON value of every message: the event and where it stands in the global stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The event's stable id.
    pub event_id: String,
    /// `Order`, `Pet`, `Payment` or `Delivery`.
    pub aggregate_type: String,
    /// The aggregate's id (also the message key).
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1.
    pub sequence: i64,
    /// The event type, e.g. `OrderCreated`.
    pub event_type: String,
    /// The event's schema version.
    pub event_version: String,
    /// The event's place in the global stream.
    pub position: StreamPosition,
    /// Correlation id, causation id, subject, command id, timestamp, traceparent (one JSON
    /// object of strings, as stored).
    pub metadata: StoredMetadata,
    /// The event as the domain serialized it.
    pub payload: Payload,
}

impl From<&RecordedEvent> for Envelope {
    fn from(event: &RecordedEvent) -> Self {
        Self {
            event_id: event.event_id().to_string(),
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            position: event.position,
            metadata: event.metadata.clone(),
            payload: event.payload.clone(),
        }
    }
}

/// An [`Envelope`] borrowing its event, serialized the same way (without copying the
/// payload and metadata per message).
#[derive(Serialize)]
pub(crate) struct EnvelopeOf<'a> {
    pub(crate) event_id: String,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    position: StreamPosition,
    metadata: &'a StoredMetadata,
    payload: &'a Payload,
}

impl<'a> From<&'a RecordedEvent> for EnvelopeOf<'a> {
    fn from(event: &'a RecordedEvent) -> Self {
        Self {
            event_id: event.event_id().to_string(),
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            sequence: event.sequence,
            event_type: &event.event_type,
            event_version: &event.event_version,
            position: event.position,
            metadata: &event.metadata,
            payload: &event.payload,
        }
    }
}

impl From<Envelope> for RecordedEvent {
    fn from(envelope: Envelope) -> Self {
        Self {
            position: envelope.position,
            aggregate_type: envelope.aggregate_type,
            aggregate_id: envelope.aggregate_id,
            sequence: envelope.sequence,
            event_type: envelope.event_type,
            event_version: envelope.event_version,
            payload: envelope.payload,
            metadata: envelope.metadata,
            delivery: None,
        }
    }
}

/// The topic of an aggregate type: `Order` → `{prefix}.orders`.
pub fn topic_for(prefix: &str, aggregate_type: &str) -> String {
    let plural = match aggregate_type {
        "Delivery" => "deliveries".to_owned(),
        petstore_live_settings::AGGREGATE_TYPE => "settings".to_owned(),
        petstore_event_store::operator::AGGREGATE_TYPE => "operator_actions".to_owned(),
        other => format!("{}s", other.to_lowercase()),
    };
    format!("{prefix}.{plural}")
}

/// The topics the service creates and consumes.
pub fn topics(prefix: &str) -> Vec<String> {
    [
        petstore_domain::order::AGGREGATE_TYPE,
        petstore_domain::pet::AGGREGATE_TYPE,
        petstore_domain::payment::AGGREGATE_TYPE,
        petstore_domain::delivery::AGGREGATE_TYPE,
        petstore_live_settings::AGGREGATE_TYPE,
        petstore_event_store::operator::AGGREGATE_TYPE,
    ]
    .into_iter()
    .map(|aggregate_type| topic_for(prefix, aggregate_type))
    .collect()
}

/// The header naming the event store a message's event comes from.
pub const STORE_HEADER: &str = "store_id";

/// A header's value, as text.
pub(crate) fn header<M: Message>(message: &M, key: &str) -> Option<String> {
    let headers = message.headers()?;
    (0..headers.count())
        .map(|index| headers.get(index))
        .find(|header| header.key == key)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_envelope_reads_back_as_the_envelope() {
        let event = RecordedEvent {
            position: StreamPosition {
                transaction_id: 7,
                global_position: 42,
            },
            aggregate_type: "Order".to_owned(),
            aggregate_id: uuid::Uuid::new_v4().to_string(),
            sequence: 3,
            event_type: "OrderConfirmed".to_owned(),
            event_version: "1.0".to_owned(),
            payload: Payload::of(&serde_json::json!({"OrderConfirmed": {"note": "ä \"quoted\""}}))
                .expect("a payload"),
            metadata: StoredMetadata {
                correlation_id: Some("c-1".to_owned()),
                ..StoredMetadata::default()
            },
            delivery: None,
        };
        let bytes = serde_json::to_vec(&EnvelopeOf::from(&event)).expect("serialized");
        let read: Envelope = serde_json::from_slice(&bytes).expect("an envelope");
        assert_eq!(read, Envelope::from(&event));
    }
}
