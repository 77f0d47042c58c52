//! Typed settings, layered: compiled defaults, then `{config folder}/base.yaml`, then
//! `{config folder}/{PETSTORE_ENV}.yaml` (for `local` without one, the built-in local layer),
//! then `PETSTORE__SECTION__KEY` environment variables (and the conventional `DATABASE_URL`,
//! `REDIS_URL`, `KAFKA_BROKERS`). Unknown keys and bad values fail at start-up, naming the key.
//!
//! # Layout
//! - this module: the [`Settings`] tree, its layers ([`Settings::load_for`]), the config
//!   folder ([`config_dir`]) and the range checks.
//! - `security`, `resilience`, `live`: their sections, and which keys may change at run time.
//! - `provenance`: the built-in local layer, and which layer each key came from
//!   ([`Settings::provenance`], `petstore config check`).
//! - `development_secret`: `local`'s token secret, made once per data folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

mod development_secret;
mod live;
mod provenance;
mod resilience;
mod security;
pub use live::*;
pub use provenance::KeySource;
pub use resilience::*;
pub use security::*;

/// Everything the service can be configured with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The HTTP listener.
    pub http: HttpSettings,
    /// Where events and read models live.
    pub database: DatabaseSettings,
    /// Embedded storage (used when no database URL is set).
    pub storage: StorageSettings,
    /// How the projector reads the global stream.
    pub projector: ProjectorSettings,
    /// Command dispatch.
    pub commands: CommandSettings,
    /// The demo catalog.
    pub catalog: CatalogSettings,
    /// The order-fulfilment saga.
    pub saga: SagaSettings,
    /// The payment gateway and delivery provider.
    pub providers: ProvidersSettings,
    /// How each outbound dependency is called (live: see [`LiveSettings`]).
    pub resilience: ResilienceSettings,
    /// Kafka (unset brokers: no Kafka; the saga follows the event store directly).
    pub kafka: KafkaSettings,
    /// Redis (unset URL: reads are served by the read-model database alone).
    pub redis: RedisSettings,
    /// Logging.
    pub log: LogSettings,
    /// Authentication, authorization, rate limits and request hardening.
    pub security: SecuritySettings,
    /// The seed's feature flags (live: see [`LiveSettings`]).
    pub feature_flags: FeatureFlags,
    /// How live changes reach this process.
    pub live_settings: LiveReloadSettings,
    /// The environment the settings were read for (`PETSTORE_ENV`, default `local`).
    #[serde(skip)]
    pub environment: Environment,
    /// The folder the settings were read from; `None` when built in code (no file watch).
    #[serde(skip)]
    pub config_dir: Option<PathBuf>,
}

/// How live changes reach this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveReloadSettings {
    /// How often the event store is asked for a newer version (changes made in this process
    /// apply at once), in milliseconds.
    pub poll_interval_ms: u64,
    /// Watch the configuration folder and record edits of the live keys as changes.
    pub watch_files: bool,
}

impl Default for LiveReloadSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 250,
            watch_files: true,
        }
    }
}

/// The environment a process runs in: `local`, `staging`, `production` or another name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment(pub String);

impl Environment {
    /// A developer machine: the only place demo mode and a weak token secret are allowed.
    pub fn is_local(&self) -> bool {
        self.0 == "local"
    }
}

impl Default for Environment {
    fn default() -> Self {
        Self("local".to_owned())
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// The HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub body_limit_bytes: usize,
    /// How long a query with an `X-Consistency-Token` waits for the read model to reach it
    /// before answering 409, in milliseconds.
    pub consistency_wait_ms: u64,
    /// The live order updates (`GET /orders/{id}/updates`).
    pub order_updates: OrderUpdateSettings,
    /// Requests handled at once by this process (health and metrics aside); the next is
    /// refused at once with 503 and `Retry-After` instead of queueing.
    pub max_concurrent_requests: usize,
    /// On shutdown, how long requests in flight may take to finish before their connections
    /// are closed, in milliseconds.
    pub shutdown_drain_ms: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 64 * 1024,
            consistency_wait_ms: 2_000,
            order_updates: OrderUpdateSettings::default(),
            max_concurrent_requests: 1_024,
            shutdown_drain_ms: 10_000,
        }
    }
}

/// The live order updates: WebSocket and Server-Sent Events connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderUpdateSettings {
    /// Open update connections one subject (a customer, an admin) may hold at once; the next
    /// is refused with 429.
    pub max_connections_per_subject: u32,
    /// A client that has not taken an update within this long is dropped (WebSocket close
    /// 1008), so it never holds the others up.
    pub send_timeout_ms: u64,
    /// How often an idle connection gets a keep-alive (SSE comment, WebSocket ping).
    pub keep_alive_ms: u64,
}

impl Default for OrderUpdateSettings {
    fn default() -> Self {
        Self {
            max_connections_per_subject: 16,
            send_timeout_ms: 5_000,
            keep_alive_ms: 15_000,
        }
    }
}

/// Where events and read models live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// A `postgres://` URL. Unset: the embedded SQLite store under `storage.data_dir`.
    #[serde(serialize_with = "redacted_option")]
    pub url: Option<SecretString>,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Run the migrations when the service starts.
    pub migrate_on_start: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 16,
            migrate_on_start: true,
        }
    }
}

/// Embedded storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Folder of the embedded event store (`petstore.db`).
    pub data_dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
        }
    }
}

/// How the projector reads the global stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorSettings {
    /// Most events applied in one read-model transaction.
    pub batch_size: u32,
    /// How long a reader waits for a wake-up before it polls anyway, in milliseconds.
    pub poll_interval_ms: u64,
}

impl ProjectorSettings {
    /// [`Self::poll_interval_ms`] as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(1))
    }
}

impl Default for ProjectorSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval_ms: 100,
        }
    }
}

/// Command dispatch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandSettings {
    /// How often a command that lost an optimistic-concurrency race is retried before 409.
    pub max_conflict_retries: u32,
}

impl Default for CommandSettings {
    fn default() -> Self {
        Self {
            max_conflict_retries: 8,
        }
    }
}

/// The demo catalog.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSettings {
    /// Create the demo pets (as events) when they are missing.
    pub seed_demo_pets: bool,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            seed_demo_pets: true,
        }
    }
}

/// The order-fulfilment saga.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SagaSettings {
    /// How long reserving the pet may take before the order is cancelled, in milliseconds.
    pub reservation_timeout_ms: u64,
    /// How long the payment may take (including waiting for the customer), in milliseconds.
    pub payment_timeout_ms: u64,
    /// How long booking the delivery may take, in milliseconds.
    pub delivery_timeout_ms: u64,
    /// How often due deadlines are looked for at most, in milliseconds.
    pub deadline_poll_interval_ms: u64,
    /// Most events the runner takes from the stream at once.
    pub batch_size: u32,
    /// Most orders the runner advances at the same time (each order's events stay in order).
    pub max_concurrent_orders: usize,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            reservation_timeout_ms: 30_000,
            payment_timeout_ms: 300_000,
            delivery_timeout_ms: 60_000,
            deadline_poll_interval_ms: 200,
            batch_size: 200,
            max_concurrent_orders: 64,
        }
    }
}

/// The external providers. The default adapters simulate them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersSettings {
    /// The payment gateway.
    pub payment: ProviderSettings,
    /// The delivery provider.
    pub delivery: ProviderSettings,
    /// Honour `X-Simulate-Failure` on `POST /orders`.
    pub allow_simulated_failures: bool,
}

impl Default for ProvidersSettings {
    fn default() -> Self {
        Self {
            payment: ProviderSettings::default(),
            delivery: ProviderSettings::default(),
            allow_simulated_failures: true,
        }
    }
}

/// One simulated provider's behaviour (how calls to it are protected: `resilience`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    /// Simulated latency of a call, in milliseconds (each call varies by up to ±50 %).
    pub latency_ms: u64,
    /// Share of simulated calls that fail transiently, 0.0 to 1.0.
    pub failure_rate: f64,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            latency_ms: 20,
            failure_rate: 0.0,
        }
    }
}

/// Kafka: where the projector publishes events and the saga runner consumes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated (`KAFKA_BROKERS`). Unset: Kafka is off.
    pub brokers: Option<String>,
    /// Topics are `{topic_prefix}.orders`, `.pets`, `.payments`, `.deliveries`.
    pub topic_prefix: String,
    /// Partitions of each topic created at start-up.
    pub partitions: i32,
    /// Replication factor of each topic created at start-up.
    pub replication_factor: i32,
    /// How long the producer keeps trying to deliver a message, in milliseconds.
    pub message_timeout_ms: u64,
    /// The saga runners' consumer group.
    pub consumer_group: String,
    /// Idempotent producer (acks=all, no duplicates from producer retries).
    pub idempotent_producer: bool,
    /// The longest a consumer's fetch waits for data (librdkafka `fetch.wait.max.ms`), in
    /// milliseconds. A broker answering a fetch only when this wait ends, rather than as soon
    /// as data arrives, adds up to this much to every hop; lower costs idle fetch requests.
    pub fetch_wait_max_ms: u64,
    /// How long a producer waits to fill a batch before sending it (librdkafka
    /// `linger.ms`), in milliseconds.
    pub linger_ms: u64,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: None,
            topic_prefix: "petstore".to_owned(),
            partitions: 3,
            replication_factor: 1,
            message_timeout_ms: 10_000,
            consumer_group: "petstore-saga".to_owned(),
            idempotent_producer: true,
            fetch_wait_max_ms: 2,
            linger_ms: 0,
        }
    }
}

/// Redis: serves order status and caches browse results.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/db` (`REDIS_URL`). Unset: Redis is off.
    #[serde(serialize_with = "redacted_option")]
    pub url: Option<SecretString>,
    /// Prefix of every key, so several deployments (or tests) can share a server.
    pub key_prefix: String,
    /// A Redis call slower than this counts as a failure (the query falls back), in ms.
    pub operation_timeout_ms: u64,
    /// How long a cached browse page lives, in seconds.
    pub browse_ttl_seconds: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "petstore".to_owned(),
            operation_timeout_ms: 250,
            browse_ttl_seconds: 30,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `json` or `text`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `petstore=debug,sqlx=warn`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            filter: "info,sqlx=warn".to_owned(),
        }
    }
}

/// Settings could not be read, or are not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file or variable cannot be read into the settings (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Read(#[from] Box<figment::Error>),
    /// A value is read but refused.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The key, e.g. `security.jwt.secret`.
        key: String,
        /// Why it is refused.
        reason: String,
    },
}

impl SettingsError {
    /// A refused value.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl Settings {
    /// Reads the layers from `config_dir` (none: compiled defaults and the built-in `local`
    /// layer only) and the process environment, for the environment `PETSTORE_ENV` names
    /// (`local` when unset).
    pub fn load(config_dir: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_for(config_dir, None)
    }

    /// As [`Self::load`], for `environment` when given (over `PETSTORE_ENV`). A named
    /// environment must have its file, `{config_dir}/{environment}.yaml`: a misspelt name
    /// never starts on compiled defaults. Only the unnamed default, `local`, may lack one.
    pub fn load_for(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<Self, SettingsError> {
        let (figment, environment) = Self::layers(config_dir, environment)?;
        let mut settings: Self = figment
            .extract()
            .map_err(|error| SettingsError::Read(Box::new(error)))?;
        settings.environment = Environment(environment);
        settings.config_dir = config_dir.map(Path::to_owned);
        settings.validate()?;
        Ok(settings)
    }

    /// Every layer, in order, for `environment` (over `PETSTORE_ENV`, default `local`): the
    /// figment that [`Self::load_for`] extracts, and the environment's name.
    fn layers(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<(Figment, String), SettingsError> {
        let named = environment
            .map(str::to_owned)
            .or_else(|| std::env::var("PETSTORE_ENV").ok());
        let environment = named.clone().unwrap_or_else(|| "local".to_owned());
        let well_formed = !environment.is_empty()
            && environment
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !well_formed {
            return Err(SettingsError::invalid(
                "PETSTORE_ENV",
                format!("{environment:?} is not an environment name (a-z, 0-9, -)"),
            ));
        }
        // `local` has its built-in layer; any other named environment needs its file.
        if named.is_some() && environment != "local" {
            let Some(dir) = config_dir else {
                return Err(SettingsError::invalid(
                    "PETSTORE_ENV",
                    format!(
                        "environment {environment:?} needs its file {environment}.yaml, and no \
                         configuration folder is in use (./config does not exist here): pass \
                         --config-dir or set PETSTORE_CONFIG_DIR"
                    ),
                ));
            };
            let file = dir.join(format!("{environment}.yaml"));
            if !file.is_file() {
                return Err(SettingsError::invalid(
                    "PETSTORE_ENV",
                    format!(
                        "unknown environment {environment:?}: {} does not exist (environments there: {})",
                        file.display(),
                        Self::environments(dir).join(", ")
                    ),
                ));
            }
        }
        let figment = Self::figment(config_dir, &environment)
            .merge(Env::prefixed("PETSTORE__").split("__"))
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL"])
                    .map(|key| {
                        // `only` matches case-insensitively and keeps the name as written.
                        match key.as_str().to_ascii_lowercase().as_str() {
                            "database_url" => "database.url".into(),
                            "kafka_brokers" => "kafka.brokers".into(),
                            _ => "redis.url".into(),
                        }
                    }),
            );
        Ok((figment, environment))
    }

    /// The environment read for, and each key of its effective settings (secrets redacted)
    /// with the layer it came from, in key order: what `petstore config check` prints.
    pub fn provenance(
        config_dir: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<(Environment, Vec<KeySource>), SettingsError> {
        let settings = Self::load_for(config_dir, environment)?;
        let (figment, _) = Self::layers(config_dir, environment)?;
        let tree = serde_json::to_value(&settings)
            .map_err(|error| SettingsError::invalid("settings", error.to_string()))?;
        let mut keys = Vec::new();
        provenance::collect(&figment, "", &tree, &mut keys);
        if let Some(key) = keys
            .iter_mut()
            .find(|key| key.key == "security.jwt.secret" && key.value.is_null())
        {
            if settings.environment.is_local() {
                key.layer = format!(
                    "generated at the first start, kept in {}",
                    development_secret::path(&settings.storage.data_dir).display()
                );
            }
        }
        Ok((settings.environment, keys))
    }

    /// The environments `config_dir` has a file for.
    pub fn environments(config_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(config_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry
                    .file_name()
                    .to_str()?
                    .strip_suffix(".yaml")?
                    .to_owned();
                (name != "base").then_some(name)
            })
            .collect();
        names.sort();
        names
    }

    /// Refuses values that read well but must not run: out-of-range numbers, a log filter
    /// that does not parse, a weak token secret or demo mode outside `local`, malformed
    /// users, issuers, proxies or limits.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_ranges()?;
        self.security.validate(&self.environment)
    }

    fn validate_ranges(&self) -> Result<(), SettingsError> {
        let updates = &self.http.order_updates;
        let positive: [(&str, u64); 18] = [
            ("http.body_limit_bytes", self.http.body_limit_bytes as u64),
            (
                "http.max_concurrent_requests",
                self.http.max_concurrent_requests as u64,
            ),
            ("http.shutdown_drain_ms", self.http.shutdown_drain_ms),
            (
                "http.order_updates.max_connections_per_subject",
                u64::from(updates.max_connections_per_subject),
            ),
            (
                "http.order_updates.send_timeout_ms",
                updates.send_timeout_ms,
            ),
            ("http.order_updates.keep_alive_ms", updates.keep_alive_ms),
            (
                "database.max_connections",
                u64::from(self.database.max_connections),
            ),
            ("projector.batch_size", u64::from(self.projector.batch_size)),
            (
                "projector.poll_interval_ms",
                self.projector.poll_interval_ms,
            ),
            (
                "saga.deadline_poll_interval_ms",
                self.saga.deadline_poll_interval_ms,
            ),
            ("saga.batch_size", u64::from(self.saga.batch_size)),
            (
                "saga.max_concurrent_orders",
                self.saga.max_concurrent_orders as u64,
            ),
            ("kafka.message_timeout_ms", self.kafka.message_timeout_ms),
            ("kafka.fetch_wait_max_ms", self.kafka.fetch_wait_max_ms),
            (
                "redis.operation_timeout_ms",
                self.redis.operation_timeout_ms,
            ),
            ("redis.browse_ttl_seconds", self.redis.browse_ttl_seconds),
            (
                "live_settings.poll_interval_ms",
                self.live_settings.poll_interval_ms,
            ),
            (
                "kafka.partitions",
                u64::try_from(self.kafka.partitions).unwrap_or(0),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(SettingsError::invalid(key, "must be above 0"));
            }
        }
        if self.kafka.replication_factor < 1 {
            return Err(SettingsError::invalid(
                "kafka.replication_factor",
                "must be above 0",
            ));
        }
        for (key, text) in [
            ("kafka.topic_prefix", &self.kafka.topic_prefix),
            ("kafka.consumer_group", &self.kafka.consumer_group),
            ("redis.key_prefix", &self.redis.key_prefix),
        ] {
            if text.is_empty() {
                return Err(SettingsError::invalid(key, "must not be empty"));
            }
        }
        let kafka_attempt = self.resilience.kafka.attempt_timeout_ms;
        if kafka_attempt <= self.kafka.message_timeout_ms {
            return Err(SettingsError::invalid(
                "resilience.kafka.attempt_timeout_ms",
                format!(
                    "{kafka_attempt} does not outlast kafka.message_timeout_ms ({}): a batch \
                     would be given up while the producer still delivers it",
                    self.kafka.message_timeout_ms
                ),
            ));
        }
        LiveSettings::of(self).validate()
    }

    /// The file layers only: compiled defaults, `{config_dir}/base.yaml`, then
    /// `{config_dir}/{environment}.yaml`; for `local` without that file, the built-in local
    /// layer (the demo users, text logs), so the unnamed default runs anywhere.
    pub fn figment(config_dir: Option<&Path>, environment: &str) -> Figment {
        // Each dependency's policy has defaults of its own: layered under the files, so a
        // file or variable naming one key of `resilience.redis` keeps Redis's defaults for
        // the rest (a struct default would bring the providers').
        let mut figment = Figment::new().merge(Serialized::default(
            "resilience",
            ResilienceSettings::default(),
        ));
        // Exact paths: a relative folder is not looked for in the parent folders.
        let file = match config_dir {
            Some(dir) => {
                figment = figment.merge(Yaml::file_exact(dir.join("base.yaml")));
                Some(dir.join(format!("{environment}.yaml"))).filter(|file| file.is_file())
            }
            None => None,
        };
        match file {
            Some(file) => figment.merge(Yaml::file_exact(file)),
            None if environment == "local" => figment.merge(provenance::BuiltInLocal),
            None => figment,
        }
    }
}

/// Where the configuration files are read from: `explicit` (`--config-dir`,
/// `PETSTORE_CONFIG_DIR`), which must be a folder, else `./config` when it is one, else none
/// (compiled defaults and, for `local`, the built-in local layer).
pub fn config_dir(explicit: Option<PathBuf>) -> Result<Option<PathBuf>, SettingsError> {
    match explicit {
        Some(dir) if dir.is_dir() => Ok(Some(dir)),
        Some(dir) => Err(SettingsError::invalid(
            "--config-dir",
            format!("{} is not a folder", dir.display()),
        )),
        None => {
            let default = PathBuf::from("config");
            Ok(default.is_dir().then_some(default))
        }
    }
}

/// Serializes a secret as `[REDACTED]`, never its value.
fn redacted<S: serde::Serializer>(_: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(REDACTED)
}

/// As [`redacted`], for an optional secret (unset stays `null`).
fn redacted_option<S: serde::Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_str(REDACTED),
        None => serializer.serialize_none(),
    }
}

/// What a secret is shown as.
const REDACTED: &str = "[REDACTED]";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let settings: Settings = Settings::figment(None, "local")
            .extract()
            .expect("defaults are complete");
        assert_eq!(settings.http.listen.port(), 8080);
        assert!(settings.database.url.is_none());
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn a_policy_key_given_alone_keeps_its_dependencys_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "base.yaml",
                "security:\n  jwt:\n    secret: a-secret-of-thirty-two-bytes-or-more\n\
                 resilience:\n  redis:\n    max_attempts: 2\n",
            )?;
            jail.set_env("PETSTORE__RESILIENCE__OIDC__BREAKER__OPEN_MS", "1000");
            let settings = Settings::load(Some(jail.directory())).expect("valid");
            let redis = &settings.resilience.redis;
            assert_eq!(redis.max_attempts, 2);
            assert_eq!(
                DependencyPolicy {
                    max_attempts: 2,
                    ..DependencyPolicy::redis()
                },
                *redis,
                "the rest is Redis's defaults, not the providers'"
            );
            assert_eq!(settings.resilience.oidc.breaker.open_ms, 1_000);
            assert_eq!(settings.resilience.oidc.breaker.minimum_calls, 3);
            assert_eq!(settings.resilience.kafka, DependencyPolicy::kafka());
            jail.set_env("PETSTORE__RESILIENCE__KAFKA__ATTEMPT_TIMEOUT_MS", "5000");
            let message = match Settings::load(Some(jail.directory())) {
                Ok(_) => panic!("an attempt shorter than the producer's delivery is refused"),
                Err(error) => error.to_string(),
            };
            assert!(
                message.contains("resilience.kafka.attempt_timeout_ms")
                    && message.contains("kafka.message_timeout_ms"),
                "{message}"
            );
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn an_unknown_or_fileless_environment_and_out_of_range_values_are_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "base.yaml",
                "security:\n  jwt:\n    secret: a-secret-of-thirty-two-bytes-or-more\n",
            )?;
            jail.create_file("production.yaml", "log:\n  format: json\n")?;
            let error = |result: Result<Settings, SettingsError>| match result {
                Ok(_) => panic!("refused expected"),
                Err(error) => error.to_string(),
            };
            let message = error(Settings::load_for(Some(jail.directory()), Some("prod")));
            assert!(
                message.contains("PETSTORE_ENV") && message.contains("prod.yaml"),
                "{message}"
            );
            assert!(
                message.contains("production"),
                "names what exists: {message}"
            );
            assert!(
                error(Settings::load_for(Some(jail.directory()), Some("../etc")))
                    .contains("PETSTORE_ENV")
            );
            jail.set_env("PETSTORE_ENV", "staging");
            assert!(error(Settings::load(Some(jail.directory()))).contains("staging.yaml"));
            jail.set_env("PETSTORE_ENV", "production");
            let settings = Settings::load(Some(jail.directory())).expect("production has its file");
            assert_eq!(settings.environment.to_string(), "production");
            for (variable, value, key) in [
                (
                    "PETSTORE__PROVIDERS__PAYMENT__FAILURE_RATE",
                    "1.5",
                    "providers.payment.failure_rate",
                ),
                ("PETSTORE__KAFKA__PARTITIONS", "0", "kafka.partitions"),
                (
                    "PETSTORE__SAGA__PAYMENT_TIMEOUT_MS",
                    "0",
                    "saga.payment_timeout_ms",
                ),
                ("PETSTORE__LOG__FILTER", "info,[", "log.filter"),
            ] {
                jail.set_env(variable, value);
                let message = error(Settings::load(Some(jail.directory())));
                assert!(message.contains(key), "{variable}={value}: {message}");
                jail.clear_env();
                jail.set_env("PETSTORE_ENV", "production");
            }
            Ok(())
        });
    }

    #[test]
    fn every_shipped_config_file_is_valid() {
        let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        for environment in ["local", "staging", "production"] {
            let settings: Settings = Settings::figment(Some(&config_dir), environment)
                .extract()
                .unwrap_or_else(|error| panic!("config/{environment}.yaml: {error}"));
            assert_eq!(settings.http.listen.port(), 8080);
        }
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn the_conventional_variables_and_prefixed_ones_override_the_files() {
        use secrecy::ExposeSecret;
        figment::Jail::expect_with(|jail| {
            jail.create_file("base.yaml", "http:\n  listen: 127.0.0.1:9000\n")?;
            jail.set_env("DATABASE_URL", "postgres://db.invalid/petstore");
            jail.set_env("KAFKA_BROKERS", "127.0.0.1:19092");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:16379/0");
            jail.set_env("PETSTORE__HTTP__LISTEN", "127.0.0.1:9001");
            jail.set_env("PETSTORE__FEATURE_FLAGS__EXPRESS_ORDER_PROCESSING", "false");
            jail.set_env(
                "PETSTORE__FEATURE_FLAGS__PET_PERSONALIZATION__ROLLOUT_PERCENTAGE",
                "25",
            );
            jail.set_env(
                "PETSTORE__SECURITY__JWT__SECRET",
                "a-secret-of-thirty-two-bytes-or-more",
            );
            let settings = Settings::load(Some(jail.directory())).expect("valid");
            assert_eq!(
                settings
                    .database
                    .url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                Some("postgres://db.invalid/petstore".to_owned())
            );
            assert_eq!(settings.kafka.brokers.as_deref(), Some("127.0.0.1:19092"));
            assert_eq!(
                settings
                    .redis
                    .url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                Some("redis://127.0.0.1:16379/0".to_owned())
            );
            assert_eq!(settings.http.listen.port(), 9001);
            assert_eq!(
                settings.feature_flags.express_order_processing,
                FlagSetting::Off
            );
            assert_eq!(
                settings.feature_flags.pet_personalization,
                FlagSetting::Rollout { percentage: 25.0 }
            );
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment::Jail's closures return figment::Error"
    )]
    fn each_key_names_the_layer_it_came_from() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("base.yaml", "http:\n  body_limit_bytes: 1000\n")?;
            jail.set_env("PETSTORE__HTTP__LISTEN", "127.0.0.1:9001");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:16379/0");
            let (_, keys) = Settings::provenance(Some(jail.directory()), None).expect("valid");
            let layer = |key: &str| {
                keys.iter()
                    .find(|entry| entry.key == key)
                    .unwrap_or_else(|| panic!("{key} is listed"))
                    .layer
                    .clone()
            };
            assert!(layer("http.body_limit_bytes").ends_with("base.yaml"));
            assert_eq!(
                layer("http.listen"),
                "environment variable PETSTORE__HTTP__LISTEN"
            );
            assert_eq!(layer("redis.url"), "environment variable REDIS_URL");
            assert_eq!(layer("kafka.topic_prefix"), "compiled default");
            // No local.yaml in the folder: the built-in local layer has the demo users.
            assert!(layer("security.users").starts_with("built-in local"));
            assert!(layer("security.jwt.secret").contains("jwt-secret"));
            assert!(layer("security.rate_limits.routes") == "compiled default");
            let users = keys
                .iter()
                .find(|entry| entry.key == "security.users")
                .expect("users");
            assert_eq!(users.value[0]["password_hash"], "[REDACTED]");
            let redis = keys
                .iter()
                .find(|entry| entry.key == "redis.url")
                .expect("url");
            assert_eq!(redis.value, "[REDACTED]");
            Ok(())
        });
    }

    #[test]
    fn without_a_folder_local_runs_on_built_in_settings_and_a_named_one_is_refused() {
        let settings = Settings::load_for(None, Some("local")).expect("local needs no file");
        assert_eq!(settings.security.users.len(), 2, "the demo users");
        assert!(settings.security.jwt.secret.is_none(), "made at start-up");
        let error = Settings::load_for(None, Some("staging"))
            .expect_err("staging needs its file")
            .to_string();
        assert!(
            error.contains("staging") && error.contains("PETSTORE_CONFIG_DIR"),
            "{error}"
        );
    }

    #[test]
    fn the_local_secret_is_made_once_per_data_folder() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let mut settings = Settings::default();
        settings.storage.data_dir = folder.path().join("data");
        let mut again = settings.clone();
        let file = settings
            .ensure_development_secret()
            .expect("made")
            .expect("used");
        assert_eq!(file, folder.path().join("data/jwt-secret"));
        again.ensure_development_secret().expect("read");
        let secret = |settings: &Settings| {
            use secrecy::ExposeSecret;
            settings
                .security
                .jwt
                .secret
                .as_ref()
                .map(|secret| secret.expose_secret().to_owned())
                .expect("a secret")
        };
        assert_eq!(secret(&settings), secret(&again), "kept and read back");
        assert_eq!(secret(&settings).len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("kept").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
        }
        let mut production = Settings {
            environment: Environment("production".to_owned()),
            ..Settings::default()
        };
        production.storage.data_dir = folder.path().join("other");
        assert_eq!(
            production.ensure_development_secret().expect("nothing"),
            None
        );
        std::fs::write(&file, "short").expect("damaged");
        let error = again_with(folder.path()).expect_err("a damaged file is refused");
        assert!(error.to_string().contains("jwt-secret"), "{error}");

        fn again_with(folder: &Path) -> Result<Option<PathBuf>, SettingsError> {
            let mut settings = Settings::default();
            settings.storage.data_dir = folder.join("data");
            settings.ensure_development_secret()
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let error = Figment::new()
            .merge(Yaml::string("http:\n  lisen: 127.0.0.1:1\n"))
            .extract::<Settings>()
            .expect_err("typo must fail");
        assert!(error.to_string().contains("lisen"), "{error}");
    }
}
