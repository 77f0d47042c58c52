//! Upcasting: an event stored in an older shape is read in today's. Every event type of the
//! four aggregates has a current version; an older one is upgraded step by step when it is
//! loaded (aggregates, projections, the saga), so nothing else decodes an old shape. A type or
//! version this code does not know (a newer release's, or a corrupt row) is refused with a
//! [`UpcastError`]: the event is set aside, never guessed at.
//!
//! Changes so far:
//! - `OrderCancelled` 1.0 → 2.0 (no change of shape: 2.0 is followed by `OrderCompensated`),
//!   2.0 → 3.0 (`compensated_later` says so in the payload: `false` for 1.0, `true` after).

use cqrs_es::Aggregate;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::delivery::Delivery;
use crate::order::{Order, ORDER_CANCELLED_VERSION};
use crate::payment::Payment;
use crate::pet::Pet;
use crate::FIRST_EVENT_VERSION;

/// An event this code cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    /// No such event type for the aggregate.
    #[error("{aggregate_type} has no event type {event_type:?}")]
    UnknownType {
        /// The aggregate type.
        aggregate_type: String,
        /// The event type.
        event_type: String,
    },
    /// A version this code does not know.
    #[error(
        "{event_type} {version} is not a version this release reads (it knows up to {current})"
    )]
    UnknownVersion {
        /// The event type.
        event_type: String,
        /// The stored version.
        version: String,
        /// The version this code writes.
        current: &'static str,
    },
    /// The payload is not of the shape its version had.
    #[error("{event_type} {version}: {reason}")]
    Malformed {
        /// The event type.
        event_type: String,
        /// The stored version.
        version: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The version this code writes of `event_type` of `aggregate_type`; `None` for a type the
/// aggregate does not have (or an aggregate that is not the domain's).
pub fn current_version(aggregate_type: &str, event_type: &str) -> Option<&'static str> {
    let known: &[&str] = match aggregate_type {
        Order::TYPE => {
            if event_type == "OrderCancelled" {
                return Some(ORDER_CANCELLED_VERSION);
            }
            &[
                "OrderCreated",
                "OrderPetReserved",
                "OrderPaid",
                "OrderDeliveryScheduled",
                "OrderCompleted",
                "OrderCompensated",
            ]
        }
        Pet::TYPE => &["PetAdded", "PetReserved", "PetReleased", "PetSold"],
        Payment::TYPE => &["PaymentProcessed", "PaymentDeclined", "PaymentRefunded"],
        Delivery::TYPE => &["DeliveryScheduled", "DeliveryFailed", "DeliveryCancelled"],
        _ => &[],
    };
    known.contains(&event_type).then_some(FIRST_EVENT_VERSION)
}

/// Whether an event of type `event_type` stored as `version` is older than today's shape
/// (for loaders that do not say the aggregate: event type names are unique across them).
pub fn is_outdated(event_type: &str, version: &str) -> bool {
    [Order::TYPE, Pet::TYPE, Payment::TYPE, Delivery::TYPE]
        .into_iter()
        .find_map(|aggregate_type| current_version(aggregate_type, event_type))
        .is_some_and(|current| current != version)
}

/// Whether `aggregate_type` is one of the domain's (its events are upcast and checked).
pub fn is_domain_aggregate(aggregate_type: &str) -> bool {
    matches!(
        aggregate_type,
        Order::TYPE | Pet::TYPE | Payment::TYPE | Delivery::TYPE
    )
}

/// Brings `payload`, stored as `version` of `event_type`, to the current version; answers
/// that version. An event already current is left as it is.
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: &mut Value,
) -> Result<&'static str, UpcastError> {
    let Some(current) = current_version(aggregate_type, event_type) else {
        return Err(UpcastError::UnknownType {
            aggregate_type: aggregate_type.to_owned(),
            event_type: event_type.to_owned(),
        });
    };
    if version == current {
        return Ok(current);
    }
    let unknown = || UpcastError::UnknownVersion {
        event_type: event_type.to_owned(),
        version: version.to_owned(),
        current,
    };
    match (event_type, version) {
        ("OrderCancelled", "1.0" | "2.0") => {
            let fields = payload
                .get_mut("OrderCancelled")
                .and_then(Value::as_object_mut)
                .ok_or(UpcastError::Malformed {
                    event_type: event_type.to_owned(),
                    version: version.to_owned(),
                    reason: "not an OrderCancelled object",
                })?;
            // 1.0 was written before compensations were recorded: settled at once.
            fields.insert(
                "compensated_later".to_owned(),
                Value::Bool(version == "2.0"),
            );
            Ok(ORDER_CANCELLED_VERSION)
        }
        _ => Err(unknown()),
    }
}

/// Decodes an event of the domain from its stored JSON: today's shape straight into its
/// type; an older one parsed, upcast, then deserialized.
pub fn decode<E: serde::de::DeserializeOwned>(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: &RawValue,
) -> Result<E, DecodeFailure> {
    if current_version(aggregate_type, event_type) == Some(version) {
        return Ok(serde_json::from_str(payload.get())?);
    }
    let mut payload: Value = serde_json::from_str(payload.get())?;
    upcast(aggregate_type, event_type, version, &mut payload)?;
    Ok(serde_json::from_value(payload)?)
}

/// Why an event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeFailure {
    /// Its type or version is not one this code reads.
    #[error(transparent)]
    Upcast(#[from] UpcastError),
    /// Its payload does not match its type.
    #[error("bad payload: {0}")]
    Payload(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::order::OrderEvent;
    use crate::values::CancellationReason;

    fn raw(value: &Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(value).expect("JSON")
    }

    #[test]
    fn a_stored_order_cancelled_of_each_version_reads_as_today() {
        for (version, later) in [("1.0", false), ("2.0", true), ("3.0", true)] {
            let mut stored = json!({"OrderCancelled": {"reason": "payment-failed"}});
            if version == "3.0" {
                stored["OrderCancelled"]["compensated_later"] = json!(true);
            }
            let event: OrderEvent =
                decode(Order::TYPE, "OrderCancelled", version, &raw(&stored)).expect("decoded");
            assert_eq!(
                event,
                OrderEvent::OrderCancelled {
                    reason: CancellationReason::PaymentFailed,
                    compensated_later: later,
                },
                "{version}"
            );
        }
    }

    #[test]
    fn unknown_types_and_versions_are_refused_not_guessed() {
        let payload = raw(&json!("OrderCompleted"));
        assert!(matches!(
            decode::<OrderEvent>(Order::TYPE, "OrderCompleted", "9.0", &payload),
            Err(DecodeFailure::Upcast(UpcastError::UnknownVersion { .. }))
        ));
        assert!(matches!(
            decode::<OrderEvent>(Order::TYPE, "OrderTeleported", "1.0", &payload),
            Err(DecodeFailure::Upcast(UpcastError::UnknownType { .. }))
        ));
        assert!(matches!(
            decode::<OrderEvent>(Order::TYPE, "OrderCompleted", "1.0", &raw(&json!({"x": 1}))),
            Err(DecodeFailure::Payload(_))
        ));
        assert_eq!(current_version("LiveSettings", "LiveSettingsChanged"), None);
    }
}
