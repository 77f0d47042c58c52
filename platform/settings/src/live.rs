//! The live part of the settings: what may change while the service runs (feature flags,
//! rate limits, simulated provider behaviour, saga step timeouts, resilience policies, the log
//! filter). Its keys are the same as in the configuration files
//! (`feature_flags.pet_personalization`, `security.rate_limits.default_per_minute`, ...), so a
//! file edit and an API change name a setting alike. The platform's `live` module keeps it, as events, and applies it everywhere.

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::{RateLimitSettings, ResilienceSettings, Settings, SettingsError};

/// The seed's five feature flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// Browse results ranked for the calling customer.
    PetPersonalization,
    /// The extra browse filters (`breed`, `min_age_months`, `max_age_months`, `vaccinated`).
    PremiumFilters,
    /// On: the saga charges an order itself; off: it waits for `POST /payments`.
    ExpressOrderProcessing,
    /// Off: payment steps are held (no gateway call) until it is on again.
    PaymentProcessing,
    /// The live order updates (WebSocket and Server-Sent Events).
    RealTimeOrderUpdates,
}

impl Flag {
    /// Every flag.
    pub const ALL: [Flag; 5] = [
        Flag::PetPersonalization,
        Flag::PremiumFilters,
        Flag::ExpressOrderProcessing,
        Flag::PaymentProcessing,
        Flag::RealTimeOrderUpdates,
    ];

    /// The flag's key, as in `feature_flags.{key}`.
    pub fn key(self) -> &'static str {
        match self {
            Flag::PetPersonalization => "pet_personalization",
            Flag::PremiumFilters => "premium_filters",
            Flag::ExpressOrderProcessing => "express_order_processing",
            Flag::PaymentProcessing => "payment_processing",
            Flag::RealTimeOrderUpdates => "real_time_order_updates",
        }
    }
}

impl std::fmt::Display for Flag {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.key())
    }
}

/// A flag's setting: on, off, or on for a share of subjects (`{"rollout_percentage": 25}`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FlagSetting {
    /// On for everyone.
    On,
    /// Off for everyone.
    Off,
    /// On for the subjects whose bucket ([`bucket`]) is below `percentage` × 100.
    Rollout {
        /// 0 to 100, in steps of 0.01.
        percentage: f64,
    },
}

/// Buckets per subject and flag: a rollout percentage has a resolution of 0.01.
pub const BUCKETS: u32 = 10_000;

/// The bucket of `subject` for `flag`, 0 to 9,999: MurmurHash3 (x86, 32 bit, seed 0) of
/// `"{flag key}:{subject}"`, modulo 10,000, as Unleash and flagd bucket. Deterministic, so a
/// subject gets the same variant on every instance and after every restart; a subject in a
/// rollout stays in when its percentage is raised.
pub fn bucket(flag: Flag, subject: &str) -> u32 {
    let key = format!("{}:{subject}", flag.key());
    // Reading from a slice cannot fail.
    let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(key.as_bytes()), 0).unwrap_or(0);
    hash % BUCKETS
}

impl FlagSetting {
    /// Whether the flag is on for `subject` (who the decision is for: a customer, or the
    /// order being processed).
    pub fn is_on_for(self, flag: Flag, subject: &str) -> bool {
        match self {
            FlagSetting::On => true,
            FlagSetting::Off => false,
            FlagSetting::Rollout { percentage } => {
                f64::from(bucket(flag, subject)) < (percentage * 100.0).round()
            }
        }
    }
}

impl Serialize for FlagSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            FlagSetting::On => serializer.serialize_bool(true),
            FlagSetting::Off => serializer.serialize_bool(false),
            FlagSetting::Rollout { percentage } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("rollout_percentage", percentage)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for FlagSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        const EXPECTED: &str = "true, false or {\"rollout_percentage\": 0 to 100}";
        impl<'de> Visitor<'de> for FlagVisitor {
            type Value = FlagSetting;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(EXPECTED)
            }

            fn visit_bool<E: de::Error>(self, on: bool) -> Result<FlagSetting, E> {
                Ok(if on {
                    FlagSetting::On
                } else {
                    FlagSetting::Off
                })
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<FlagSetting, M::Error> {
                let mut percentage = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "rollout_percentage" || percentage.is_some() {
                        return Err(de::Error::custom(format!(
                            "unexpected key `{key}`: expected {EXPECTED}"
                        )));
                    }
                    percentage = Some(map.next_value::<f64>()?);
                }
                match percentage {
                    Some(percentage) if (0.0..=100.0).contains(&percentage) => {
                        Ok(FlagSetting::Rollout { percentage })
                    }
                    Some(percentage) => Err(de::Error::custom(format!(
                        "rollout_percentage {percentage} is not between 0 and 100"
                    ))),
                    None => Err(de::Error::custom(format!("expected {EXPECTED}"))),
                }
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

/// The seed's feature flags (`feature_flags`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureFlags {
    /// Browse results ranked for the caller (default off).
    pub pet_personalization: FlagSetting,
    /// Extra browse filters (default on).
    pub premium_filters: FlagSetting,
    /// The saga charges orders itself (default on).
    pub express_order_processing: FlagSetting,
    /// Payments go to the gateway; off holds them (default on).
    pub payment_processing: FlagSetting,
    /// Live order updates (default off).
    pub real_time_order_updates: FlagSetting,
}

impl Default for FeatureFlags {
    fn default() -> Self {
        Self {
            pet_personalization: FlagSetting::Off,
            premium_filters: FlagSetting::On,
            express_order_processing: FlagSetting::On,
            payment_processing: FlagSetting::On,
            real_time_order_updates: FlagSetting::Off,
        }
    }
}

impl FeatureFlags {
    /// The setting of `flag`.
    pub fn get(&self, flag: Flag) -> FlagSetting {
        match flag {
            Flag::PetPersonalization => self.pet_personalization,
            Flag::PremiumFilters => self.premium_filters,
            Flag::ExpressOrderProcessing => self.express_order_processing,
            Flag::PaymentProcessing => self.payment_processing,
            Flag::RealTimeOrderUpdates => self.real_time_order_updates,
        }
    }
}

/// `security.rate_limits`, live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LiveSecurity {
    /// The request rates.
    pub rate_limits: RateLimitSettings,
}

/// The simulated behaviour of one provider, live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveProvider {
    /// Simulated latency of a call, in milliseconds (each call varies by up to ±50 %).
    pub latency_ms: u64,
    /// Share of simulated calls that fail transiently, 0.0 to 1.0.
    pub failure_rate: f64,
}

impl Default for LiveProvider {
    fn default() -> Self {
        let static_defaults = super::ProviderSettings::default();
        Self {
            latency_ms: static_defaults.latency_ms,
            failure_rate: static_defaults.failure_rate,
        }
    }
}

/// `providers.payment` and `providers.delivery`, live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LiveProviders {
    /// The payment gateway.
    pub payment: LiveProvider,
    /// The delivery provider.
    pub delivery: LiveProvider,
}

/// The saga's step timeouts, live. A step's deadline is set when the step starts, from the
/// value then: a change applies to steps that start after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveSaga {
    /// How long reserving the pet may take, in milliseconds.
    pub reservation_timeout_ms: u64,
    /// How long the payment may take, in milliseconds.
    pub payment_timeout_ms: u64,
    /// How long booking the delivery may take, in milliseconds.
    pub delivery_timeout_ms: u64,
}

impl Default for LiveSaga {
    fn default() -> Self {
        let static_defaults = super::SagaSettings::default();
        Self {
            reservation_timeout_ms: static_defaults.reservation_timeout_ms,
            payment_timeout_ms: static_defaults.payment_timeout_ms,
            delivery_timeout_ms: static_defaults.delivery_timeout_ms,
        }
    }
}

/// `log.filter`, live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveLog {
    /// A tracing filter such as `info` or `petstore=debug,sqlx=warn`.
    pub filter: String,
}

impl Default for LiveLog {
    fn default() -> Self {
        Self {
            filter: super::LogSettings::default().filter,
        }
    }
}

/// Everything that may change while the service runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LiveSettings {
    /// The feature flags.
    pub feature_flags: FeatureFlags,
    /// Request rates.
    pub security: LiveSecurity,
    /// Simulated provider behaviour.
    pub providers: LiveProviders,
    /// Saga step timeouts.
    pub saga: LiveSaga,
    /// How each outbound dependency is called.
    pub resilience: ResilienceSettings,
    /// The log filter.
    pub log: LiveLog,
}

/// One setting that changed: its key, what it was, what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SettingChange {
    /// The key, e.g. `feature_flags.pet_personalization`.
    pub key: String,
    /// The value before.
    pub old: Value,
    /// The value after.
    pub new: Value,
}

/// The only map of the live settings whose entries may be removed (`null` in a patch).
const REMOVABLE: &str = "security.rate_limits.routes";

impl LiveSettings {
    /// The live part of `settings`.
    pub fn of(settings: &Settings) -> Self {
        let provider = |provider: &super::ProviderSettings| LiveProvider {
            latency_ms: provider.latency_ms,
            failure_rate: provider.failure_rate,
        };
        Self {
            feature_flags: settings.feature_flags.clone(),
            security: LiveSecurity {
                rate_limits: settings.security.rate_limits.clone(),
            },
            providers: LiveProviders {
                payment: provider(&settings.providers.payment),
                delivery: provider(&settings.providers.delivery),
            },
            saga: LiveSaga {
                reservation_timeout_ms: settings.saga.reservation_timeout_ms,
                payment_timeout_ms: settings.saga.payment_timeout_ms,
                delivery_timeout_ms: settings.saga.delivery_timeout_ms,
            },
            resilience: settings.resilience.clone(),
            log: LiveLog {
                filter: settings.log.filter.clone(),
            },
        }
    }

    /// Refuses values that read well but must not run, naming the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (key, value) in [
            (
                "saga.reservation_timeout_ms",
                self.saga.reservation_timeout_ms,
            ),
            ("saga.payment_timeout_ms", self.saga.payment_timeout_ms),
            ("saga.delivery_timeout_ms", self.saga.delivery_timeout_ms),
        ] {
            if value == 0 {
                return Err(SettingsError::invalid(key, "must be above 0"));
            }
        }
        for (key, rate) in [
            (
                "providers.payment.failure_rate",
                self.providers.payment.failure_rate,
            ),
            (
                "providers.delivery.failure_rate",
                self.providers.delivery.failure_rate,
            ),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(SettingsError::invalid(
                    key,
                    format!("{rate} is not between 0 and 1"),
                ));
            }
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(SettingsError::invalid("log.filter", error.to_string()));
        }
        self.resilience.validate()?;
        self.security.rate_limits.validate()
    }

    /// This document as JSON.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads a whole document strictly: an unknown key or a wrong type is refused with the
    /// key's path, and the values are validated.
    pub fn from_value(value: Value) -> Result<Self, SettingsError> {
        let settings: Self = serde_path_to_error::deserialize(value).map_err(|error| {
            let path = error.path().to_string();
            let key = if path == "." { String::new() } else { path };
            SettingsError::invalid(key, error.into_inner().to_string())
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// This document with `patch` merged in (a JSON merge patch, RFC 7386: objects merge key
    /// by key, other values replace). `null` removes an entry only from
    /// `security.rate_limits.routes`; elsewhere a setting cannot be removed.
    pub fn patched(&self, patch: &Value) -> Result<Self, SettingsError> {
        if !patch.is_object() {
            return Err(SettingsError::invalid(
                "",
                "the body must be a JSON object such as {\"feature_flags\":{\"pet_personalization\":true}}",
            ));
        }
        let mut document = self.to_value();
        merge(&mut document, patch, "")?;
        Self::from_value(document)
    }

    /// Every leaf setting that differs between `self` and `other`, by key.
    pub fn changes_to(&self, other: &Self) -> Vec<SettingChange> {
        let mut changes = Vec::new();
        diff(&self.to_value(), &other.to_value(), "", &mut changes);
        changes
    }

    /// This document with each of `changes` set to its new value.
    pub fn with_changes(&self, changes: &[SettingChange]) -> Result<Self, SettingsError> {
        let mut document = self.to_value();
        for change in changes {
            set_path(&mut document, &change.key, change.new.clone());
        }
        Self::from_value(document)
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), SettingsError> {
    let (Value::Object(target), Value::Object(patch)) = (target, patch) else {
        return Ok(());
    };
    for (key, value) in patch {
        let key_path = join(path, key);
        match value {
            Value::Null if path == REMOVABLE => {
                target.remove(key);
            }
            Value::Null => {
                return Err(SettingsError::invalid(
                    key_path,
                    "null is not a value: a setting cannot be removed",
                ));
            }
            Value::Object(_) if target.get(key).is_some_and(Value::is_object) => {
                if let Some(slot) = target.get_mut(key) {
                    merge(slot, value, &key_path)?;
                }
            }
            _ => {
                target.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(())
}

fn diff(old: &Value, new: &Value, path: &str, changes: &mut Vec<SettingChange>) {
    // A flag's rollout is an object, but one setting: compare it whole.
    let leaf = path.starts_with("feature_flags.");
    match (old, new) {
        (Value::Object(old_map), Value::Object(new_map)) if !leaf => {
            let mut keys: Vec<&String> = old_map.keys().chain(new_map.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let key_path = join(path, key);
                match (old_map.get(key), new_map.get(key)) {
                    (Some(old), Some(new)) => diff(old, new, &key_path, changes),
                    (old, new) => changes.push(SettingChange {
                        key: key_path,
                        old: old.cloned().unwrap_or(Value::Null),
                        new: new.cloned().unwrap_or(Value::Null),
                    }),
                }
            }
        }
        _ if old != new => changes.push(SettingChange {
            key: path.to_owned(),
            old: old.clone(),
            new: new.clone(),
        }),
        _ => {}
    }
}

/// Sets the value at a dotted key. A rate-limit route key contains dots of its own (none
/// today, but `/v1.2/...` would), so only the known prefix is split.
fn set_path(document: &mut Value, key: &str, value: Value) {
    let (parents, leaf): (Vec<&str>, &str) = match key.strip_prefix("security.rate_limits.routes.")
    {
        Some(route) => (vec!["security", "rate_limits", "routes"], route),
        None => match key.rsplit_once('.') {
            Some((parents, leaf)) => (parents.split('.').collect(), leaf),
            None => (Vec::new(), key),
        },
    };
    let mut slot = document;
    for parent in parents {
        let Value::Object(map) = slot else { return };
        slot = map
            .entry(parent.to_owned())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    if let Value::Object(map) = slot {
        if value.is_null() {
            map.remove(leaf);
        } else {
            map.insert(leaf.to_owned(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_patch_changes_only_what_it_names_and_reports_each_key() {
        let before = LiveSettings::default();
        let after = before
            .patched(&json!({"feature_flags": {"pet_personalization": true},
                             "security": {"rate_limits": {"default_per_minute": 5}}}))
            .expect("valid");
        assert_eq!(after.feature_flags.pet_personalization, FlagSetting::On);
        assert_eq!(after.security.rate_limits.default_per_minute, 5);
        let keys: Vec<String> = before
            .changes_to(&after)
            .into_iter()
            .map(|change| change.key)
            .collect();
        assert_eq!(
            keys,
            [
                "feature_flags.pet_personalization",
                "security.rate_limits.default_per_minute"
            ]
        );
        let replayed = before
            .with_changes(&before.changes_to(&after))
            .expect("valid");
        assert_eq!(replayed, after);
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_refused_with_their_key() {
        let settings = LiveSettings::default();
        for (patch, key) in [
            (
                json!({"feature_flags": {"pet_personalisation": true}}),
                "feature_flags.pet_personalisation",
            ),
            (
                json!({"feature_flags": {"premium_filters": "yes"}}),
                "feature_flags.premium_filters",
            ),
            (
                json!({"feature_flags": {"premium_filters": {"rollout_percentage": 101}}}),
                "feature_flags.premium_filters",
            ),
            (
                json!({"providers": {"payment": {"failure_rate": 2}}}),
                "providers.payment.failure_rate",
            ),
            (
                json!({"saga": {"payment_timeout_ms": 0}}),
                "saga.payment_timeout_ms",
            ),
            (json!({"log": {"filter": "info,["}}), "log.filter"),
            (json!({"http": {"listen": "0.0.0.0:1"}}), "http"),
            (
                json!({"saga": {"payment_timeout_ms": null}}),
                "saga.payment_timeout_ms",
            ),
            (json!([1]), ""),
        ] {
            match settings.patched(&patch) {
                Err(SettingsError::Invalid { key: refused, .. }) => {
                    assert_eq!(refused, key, "{patch}")
                }
                other => panic!("{patch}: {other:?}"),
            }
        }
        let removed = settings
            .patched(&json!({"security": {"rate_limits": {"routes": {"POST /petstore-domain/orders": null}}}}))
            .expect("a route limit can be removed");
        assert!(removed.security.rate_limits.routes.is_empty());
    }

    #[test]
    fn rollouts_bucket_deterministically_near_their_percentage_and_grow_monotonically() {
        let subjects: Vec<String> = (0..10_000).map(|n| format!("customer-{n:05}")).collect();
        let members = |percentage: f64| -> Vec<bool> {
            let setting = FlagSetting::Rollout { percentage };
            subjects
                .iter()
                .map(|subject| setting.is_on_for(Flag::PetPersonalization, subject))
                .collect()
        };
        let mut previous = members(0.0);
        assert!(previous.iter().all(|on| !on));
        for percentage in [5.0, 25.0, 50.0, 75.0, 100.0] {
            let now = members(percentage);
            let share = now.iter().filter(|on| **on).count() as f64 / 100.0;
            assert!(
                (share - percentage).abs() <= 3.0,
                "{percentage}% rollout reached {share}%"
            );
            for (was, is) in previous.iter().zip(&now) {
                assert!(!was || *is, "raising a rollout removed a subject");
            }
            previous = now;
        }
        // MurmurHash3 x86_32 with seed 0, as every other implementation computes it.
        assert_eq!(
            murmur3::murmur3_32(&mut std::io::Cursor::new(b"hello"), 0).expect("hash"),
            0x248b_fa47
        );
        assert_eq!(
            bucket(Flag::PremiumFilters, "customer-001"),
            bucket(Flag::PremiumFilters, "customer-001")
        );
        assert_ne!(
            (0..50)
                .map(|n| bucket(Flag::PremiumFilters, &format!("s{n}")))
                .collect::<Vec<_>>(),
            (0..50)
                .map(|n| bucket(Flag::PetPersonalization, &format!("s{n}")))
                .collect::<Vec<_>>(),
            "each flag buckets independently"
        );
    }

    #[test]
    fn flags_read_as_booleans_or_rollouts() {
        let flags: FeatureFlags = serde_json::from_value(json!({
            "pet_personalization": {"rollout_percentage": 12.5},
            "premium_filters": false
        }))
        .expect("valid");
        assert_eq!(
            flags.pet_personalization,
            FlagSetting::Rollout { percentage: 12.5 }
        );
        assert_eq!(flags.premium_filters, FlagSetting::Off);
        assert_eq!(
            flags.payment_processing,
            FlagSetting::On,
            "defaults fill the rest"
        );
        assert_eq!(
            serde_json::to_value(&flags).expect("serializes")["pet_personalization"],
            json!({"rollout_percentage": 12.5})
        );
    }
}
