//! An event's metadata: what the command that caused it records ([`EventMetadata`], written
//! with each append) and what a reader of the stream finds beside each event
//! ([`StoredMetadata`], decoded once, where the event is read).
//!
//! Stored as a JSON object of strings, so the audit trail is a query and Kafka consumers see
//! the same object. Events appended by the service always carry the command's keys; an
//! event that lacks one (written by hand, or by something else) reads fine, and a consumer
//! that needs the missing key gets a [`MissingMetadata`] error for that event, never an
//! empty string.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use petstore_settings::Flag;
use petstore_telemetry::CorrelationId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The key of the correlation id.
pub const CORRELATION_ID_KEY: &str = "correlation_id";
/// The key of the causation id.
pub const CAUSATION_ID_KEY: &str = "causation_id";
/// The key of the acting subject.
pub const SUBJECT_KEY: &str = "subject";
/// The key of the command's id.
pub const COMMAND_ID_KEY: &str = "command_id";
/// The key of when the command ran (RFC 3339).
pub const TIMESTAMP_KEY: &str = "timestamp";
/// The key of the W3C `traceparent` of the append that stored the event.
pub const TRACEPARENT_KEY: &str = "traceparent";

/// What every event records about the command that caused it. Stored as the event's
/// metadata, it makes the audit trail a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    /// Shared by everything one request (and the saga it starts) causes.
    pub correlation_id: CorrelationId,
    /// The id of what caused this command: the request's id or the event's id.
    pub causation_id: String,
    /// Who acted: a user's subject, or `system` for the service itself.
    pub subject: String,
    /// The command's own id; saga commands derive it from their causing event.
    pub command_id: Uuid,
    /// When the command ran.
    pub timestamp: DateTime<Utc>,
    /// The feature flags that took part in the decision, and whether each was on (stored as
    /// `feature_flags`: `express_order_processing=on,payment_processing=on`). The live
    /// settings version is stamped on every event by the store itself.
    pub feature_flags: BTreeMap<&'static str, bool>,
}

impl EventMetadata {
    /// Metadata for a command acting on behalf of `subject` within `correlation_id`.
    pub fn new(correlation_id: CorrelationId, subject: impl Into<String>) -> Self {
        let command_id = Uuid::new_v4();
        Self {
            causation_id: command_id.to_string(),
            correlation_id,
            subject: subject.into(),
            command_id,
            timestamp: Utc::now(),
            feature_flags: BTreeMap::new(),
        }
    }

    /// Records that `flag` took part in the decision, on or off.
    pub fn with_flag(mut self, flag: Flag, on: bool) -> Self {
        self.feature_flags.insert(flag.key(), on);
        self
    }

    /// Metadata for a command the service issues because of an earlier event: same
    /// correlation id, the event as causation, and the given deterministic command id.
    pub fn caused_by(
        correlation_id: CorrelationId,
        causing_event_id: Uuid,
        command_id: Uuid,
        subject: impl Into<String>,
    ) -> Self {
        Self {
            correlation_id,
            causation_id: causing_event_id.to_string(),
            subject: subject.into(),
            command_id,
            timestamp: Utc::now(),
            feature_flags: BTreeMap::new(),
        }
    }

    /// The form stored beside each event (the event store adds the `traceparent` of the
    /// append that stores it).
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (
                CORRELATION_ID_KEY.to_owned(),
                self.correlation_id.to_string(),
            ),
            (CAUSATION_ID_KEY.to_owned(), self.causation_id.clone()),
            (SUBJECT_KEY.to_owned(), self.subject.clone()),
            (COMMAND_ID_KEY.to_owned(), self.command_id.to_string()),
            (
                TIMESTAMP_KEY.to_owned(),
                self.timestamp.to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
        ]);
        if !self.feature_flags.is_empty() {
            map.insert(
                FEATURE_FLAGS_KEY.to_owned(),
                format_feature_flags(self.feature_flags.iter().map(|(flag, on)| (*flag, *on))),
            );
        }
        map
    }
}

/// The metadata key of the live settings version a command was decided under.
pub const SETTINGS_VERSION_KEY: &str = "settings_version";

/// The metadata key of the flags that took part in a decision.
pub const FEATURE_FLAGS_KEY: &str = "feature_flags";

/// The flags of a stored `feature_flags` metadata value.
pub fn parse_feature_flags(stored: &str) -> BTreeMap<String, bool> {
    stored
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(flag, state)| (flag.to_owned(), state == "on"))
        .collect()
}

/// An event lacks a metadata key its reader needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the event's metadata has no {0}")]
pub struct MissingMetadata(pub &'static str);

/// A stored metadata value is not what its key holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metadata {key} is {value:?}, not {expected}")]
pub struct MalformedMetadata {
    /// The key.
    pub key: &'static str,
    /// The value found.
    pub value: String,
    /// What it should be.
    pub expected: &'static str,
}

/// The metadata stored beside an event, as a reader finds it: each known key typed, absent
/// when the event lacks it, and every other key kept as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMetadata {
    /// Shared by everything one request (and the saga it starts) caused.
    pub correlation_id: Option<String>,
    /// What caused the command: a request's id or an event's id.
    pub causation_id: Option<String>,
    /// Who acted.
    pub subject: Option<String>,
    /// The command's id.
    pub command_id: Option<Uuid>,
    /// When the command ran, as stored (RFC 3339).
    pub timestamp: Option<String>,
    /// The `traceparent` of the append that stored the event.
    pub traceparent: Option<String>,
    /// The live settings version the command was decided under.
    pub settings_version: Option<u64>,
    /// The flags that took part in the decision, and whether each was on.
    pub feature_flags: BTreeMap<String, bool>,
    /// Every other key, as stored.
    pub other: BTreeMap<String, String>,
}

impl StoredMetadata {
    /// The correlation id, which every event the service appends carries.
    pub fn correlation_id(&self) -> Result<&str, MissingMetadata> {
        self.correlation_id
            .as_deref()
            .ok_or(MissingMetadata(CORRELATION_ID_KEY))
    }

    /// Who acted.
    pub fn subject(&self) -> Result<&str, MissingMetadata> {
        self.subject.as_deref().ok_or(MissingMetadata(SUBJECT_KEY))
    }

    /// When the command ran, as stored (RFC 3339).
    pub fn timestamp(&self) -> Result<&str, MissingMetadata> {
        self.timestamp
            .as_deref()
            .ok_or(MissingMetadata(TIMESTAMP_KEY))
    }
}

impl StoredMetadata {
    /// Keeps `value` under `key`: a known key typed, any other as it is.
    fn set(&mut self, key: &str, value: String) -> Result<(), MalformedMetadata> {
        let malformed = |key, value, expected| MalformedMetadata {
            key,
            value,
            expected,
        };
        match key {
            CORRELATION_ID_KEY => self.correlation_id = Some(value),
            CAUSATION_ID_KEY => self.causation_id = Some(value),
            SUBJECT_KEY => self.subject = Some(value),
            TIMESTAMP_KEY => self.timestamp = Some(value),
            TRACEPARENT_KEY => self.traceparent = Some(value),
            COMMAND_ID_KEY => match Uuid::parse_str(&value) {
                Ok(id) => self.command_id = Some(id),
                Err(_) => return Err(malformed(COMMAND_ID_KEY, value, "a UUID")),
            },
            SETTINGS_VERSION_KEY => match value.parse() {
                Ok(version) => self.settings_version = Some(version),
                Err(_) => return Err(malformed(SETTINGS_VERSION_KEY, value, "a version number")),
            },
            FEATURE_FLAGS_KEY => self.feature_flags = parse_feature_flags(&value),
            other => {
                self.other.insert(other.to_owned(), value);
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for StoredMetadata {
    /// From one JSON object of strings, each value straight into its field (no map first).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;

        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = StoredMetadata;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object of strings")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StoredMetadata, A::Error> {
                let mut metadata = StoredMetadata::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let value: String = map.next_value()?;
                    metadata
                        .set(&key, value)
                        .map_err(serde::de::Error::custom)?;
                }
                Ok(metadata)
            }
        }

        deserializer.deserialize_map(Fields)
    }
}

impl Serialize for StoredMetadata {
    /// As stored: one JSON object of strings (nothing copied but the typed values' text).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        let texts = [
            (CORRELATION_ID_KEY, &self.correlation_id),
            (CAUSATION_ID_KEY, &self.causation_id),
            (SUBJECT_KEY, &self.subject),
            (TIMESTAMP_KEY, &self.timestamp),
            (TRACEPARENT_KEY, &self.traceparent),
        ];
        for (key, value) in texts {
            if let Some(value) = value {
                map.serialize_entry(key, value)?;
            }
        }
        if let Some(id) = self.command_id {
            let mut buffer = Uuid::encode_buffer();
            map.serialize_entry(COMMAND_ID_KEY, id.hyphenated().encode_lower(&mut buffer))?;
        }
        if let Some(version) = self.settings_version {
            map.serialize_entry(SETTINGS_VERSION_KEY, &version.to_string())?;
        }
        if !self.feature_flags.is_empty() {
            let flags = self
                .feature_flags
                .iter()
                .map(|(flag, on)| (flag.as_str(), *on));
            map.serialize_entry(FEATURE_FLAGS_KEY, &format_feature_flags(flags))?;
        }
        for (key, value) in &self.other {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The stored form of the flags of a decision: `express_order_processing=on,payment_processing=off`.
fn format_feature_flags<'a>(flags: impl Iterator<Item = (&'a str, bool)>) -> String {
    flags
        .map(|(flag, on)| format!("{flag}={}", if on { "on" } else { "off" }))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `map` as the stream does: from its stored JSON object.
    fn decode(map: &HashMap<String, String>) -> Result<StoredMetadata, serde_json::Error> {
        serde_json::from_str(&serde_json::to_string(map).expect("serializes"))
    }

    #[test]
    fn stored_metadata_reads_back_as_stored() {
        let written = EventMetadata::new(CorrelationId::generate(), "customer-1")
            .with_flag(Flag::PaymentProcessing, false)
            .with_flag(Flag::ExpressOrderProcessing, true);
        let mut map = written.to_map();
        map.insert(SETTINGS_VERSION_KEY.to_owned(), "4".to_owned());
        map.insert("tenant".to_owned(), "blue".to_owned());
        let read = decode(&map).expect("well-formed");
        assert_eq!(
            read.correlation_id(),
            Ok(written.correlation_id.to_string().as_str())
        );
        assert_eq!(read.subject(), Ok("customer-1"));
        assert_eq!(read.command_id, Some(written.command_id));
        assert_eq!(read.settings_version, Some(4));
        assert_eq!(read.feature_flags.get("payment_processing"), Some(&false));
        assert_eq!(read.other.get("tenant").map(String::as_str), Some("blue"));
        assert_eq!(
            serde_json::to_value(&read).expect("serializes"),
            serde_json::to_value(&map).expect("serializes")
        );
    }

    #[test]
    fn a_missing_key_is_an_error_for_whoever_needs_it() {
        let read = decode(&HashMap::from([(
            TIMESTAMP_KEY.to_owned(),
            "2026-12-06T00:00:00Z".to_owned(),
        )]))
        .expect("well-formed");
        assert_eq!(
            read.correlation_id(),
            Err(MissingMetadata(CORRELATION_ID_KEY))
        );
        assert_eq!(read.timestamp(), Ok("2026-12-06T00:00:00Z"));
    }

    #[test]
    fn a_malformed_known_key_is_refused() {
        let refused = decode(&HashMap::from([(
            COMMAND_ID_KEY.to_owned(),
            "not-a-uuid".to_owned(),
        )]));
        assert!(refused.is_err());
    }
}
