//! Which layer each key of the effective settings came from (`petstore config check`), and
//! the built-in layer of the `local` environment.

use figment::providers::{Format, Yaml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;
use serde_json::Value;

/// The `local` environment when no `local.yaml` is found: the shipped file, compiled in, so
/// that the unnamed default runs from any folder (the demo users, text logs).
pub struct BuiltInLocal;

/// The name [`BuiltInLocal`]'s keys are reported under.
const BUILT_IN_LOCAL: &str = "built-in local settings (config/local.yaml as shipped)";

impl Provider for BuiltInLocal {
    fn metadata(&self) -> Metadata {
        Metadata::named(BUILT_IN_LOCAL)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Yaml::string(include_str!("../../../config/local.yaml")).data()
    }
}

/// One key of the effective settings.
#[derive(Debug, Clone, Serialize)]
pub struct KeySource {
    /// The dotted key (`http.listen`); a list or map is one key.
    pub key: String,
    /// Its effective value, secrets as `[REDACTED]`.
    pub value: Value,
    /// The layer that set it: `compiled default`, a file's path, the built-in local
    /// settings, or the environment variable.
    pub layer: String,
}

/// Maps whose keys are the user's (routes): each is one key, as it is written.
const MAPS: [&str; 2] = ["security.rate_limits.routes", "security.route_timeouts_ms"];

/// Walks `value` (the effective settings) and names, for each leaf under `prefix`, the layer
/// of `figment` that set it.
pub(super) fn collect(figment: &Figment, prefix: &str, value: &Value, keys: &mut Vec<KeySource>) {
    if let Value::Object(fields) = value {
        if !MAPS.contains(&prefix) {
            for (name, field) in fields {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                collect(figment, &key, field, keys);
            }
            return;
        }
    }
    keys.push(KeySource {
        key: prefix.to_owned(),
        value: value.clone(),
        layer: layer(figment, prefix),
    });
}

/// The layer of `figment` that set `key`.
fn layer(figment: &Figment, key: &str) -> String {
    let Some(metadata) = figment.find_metadata(key) else {
        return "compiled default".to_owned();
    };
    match &metadata.source {
        Some(Source::File(path)) => path.display().to_string(),
        _ if metadata.name == BUILT_IN_LOCAL => BUILT_IN_LOCAL.to_owned(),
        _ if metadata.name.contains("PETSTORE__") => format!(
            "environment variable PETSTORE__{}",
            key.replace('.', "__").to_ascii_uppercase()
        ),
        // DATABASE_URL, REDIS_URL, KAFKA_BROKERS.
        _ if metadata.name.contains("environment variable") => format!(
            "environment variable {}",
            key.replace('.', "_").to_ascii_uppercase()
        ),
        _ => "compiled default".to_owned(),
    }
}
