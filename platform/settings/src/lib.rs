//! The petstore's typed static settings: the one [`Settings`] tree every role starts from,
//! layered, strict, and checked before anything runs.
//!
//! Layers, later wins: compiled defaults, then `{config folder}/base.yaml`, then
//! `{config folder}/{PETSTORE_ENV}.yaml` (for `local` without one, the built-in local layer),
//! then `PETSTORE__SECTION__KEY` environment variables (and the conventional `DATABASE_URL`,
//! `REDIS_URL`, `KAFKA_BROKERS`). Unknown keys and bad values fail at start-up, naming the key.
//!
//! Owns: the settings' shape, defaults, layers and validation; which keys are live
//! ([`LiveSettings`]) and how a live document is merged and checked. Must not: know who uses a
//! setting, perform I/O beyond reading the config files and keeping `local`'s token secret,
//! or apply live changes (the platform's `live` module does, as events).
//!
//! # Layout
//! - this crate root: the [`Settings`] tree, its sections' defaults and the range checks.
//! - `layers`: the config folder ([`config_dir`]), the layers ([`Settings::load_for`]), and
//!   which layer each key came from ([`Settings::provenance`], `petstore config check`).
//! - `provenance`: the built-in local layer, and naming a key's layer.
//! - `security`, `resilience`, `live`: their sections, and which keys may change at run time.
//! - `development_secret`: `local`'s token secret, made once per data folder.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

mod console;
mod development_secret;
mod layers;
mod live;
mod provenance;
mod resilience;
mod security;
pub use console::*;
pub use layers::config_dir;
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
    /// What is kept to explain orders (`petstore explain`, the order timeline).
    pub timeline: TimelineSettings,
    /// The operator console.
    pub console: ConsoleSettings,
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

/// What is kept to explain orders besides events, deadlines and dead letters: provider
/// attempts, refused commands, Kafka coordinates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimelineSettings {
    /// How long they are kept, in hours; older ones are pruned.
    pub retention_hours: u64,
}

impl Default for TimelineSettings {
    fn default() -> Self {
        Self {
            retention_hours: 168,
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
    /// P, the saga partitions every order belongs to one of (and the partitions of every
    /// Kafka topic): fixed when the event store is initialised; a start with another is
    /// refused.
    pub partitions: u32,
    /// How long a runner's lease on a saga partition lasts unless renewed (a third of it
    /// apart), in milliseconds: a dead runner's partitions are taken over within it.
    pub lease_timeout_ms: u64,
    /// Who this process's saga runner is in the leases: set it (per process, stable across
    /// restarts: a host or pod name) so that a restarted process takes its partitions back at
    /// once instead of after `lease_timeout_ms`. Unset, each start is a new runner.
    pub runner_id: Option<String>,
}

impl SagaSettings {
    /// P, checked.
    pub fn partitions(&self) -> Result<petstore_domain::partition::Partitions, SettingsError> {
        petstore_domain::partition::Partitions::new(self.partitions)
            .map_err(|error| SettingsError::invalid("saga.partitions", error.to_string()))
    }
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
            partitions: petstore_domain::partition::DEFAULT_PARTITIONS,
            lease_timeout_ms: 10_000,
            runner_id: None,
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
    /// The provider's base URL: calls go to it over HTTP (the README's provider protocol).
    /// Unset, the provider is simulated in-process.
    pub url: Option<String>,
    /// Simulated latency of a call, in milliseconds (each call varies by up to ±50 %).
    pub latency_ms: u64,
    /// Share of simulated calls that fail transiently, 0.0 to 1.0.
    pub failure_rate: f64,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            url: None,
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
    /// Partitions of each topic: always `saga.partitions` (Kafka partitions are saga
    /// partitions). Unset, it follows; set, it must be the same.
    pub partitions: Option<u32>,
    /// Replication factor of each topic created at start-up.
    pub replication_factor: i32,
    /// How long the producer keeps trying to deliver a message, in milliseconds.
    pub message_timeout_ms: u64,
    /// The consumer group the saga runners keep their offsets in.
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
            partitions: None,
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
    /// Refuses values that read well but must not run: out-of-range numbers, a log filter
    /// that does not parse, a weak token secret or demo mode outside `local`, malformed
    /// users, issuers, proxies or limits.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_ranges()?;
        self.security.validate(&self.environment)?;
        self.console.validate(&self.security, &self.environment)
    }

    fn validate_ranges(&self) -> Result<(), SettingsError> {
        let updates = &self.http.order_updates;
        let positive: [(&str, u64); 21] = [
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
            ("saga.lease_timeout_ms", self.saga.lease_timeout_ms),
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
            ("timeline.retention_hours", self.timeline.retention_hours),
            ("console.live_max_seconds", self.console.live_max_seconds),
            (
                "live_settings.poll_interval_ms",
                self.live_settings.poll_interval_ms,
            ),
            (
                "kafka.partitions",
                // Unset, it is saga.partitions, checked below.
                self.kafka.partitions.map_or(1, u64::from),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(SettingsError::invalid(key, "must be above 0"));
            }
        }
        for (key, provider) in [
            ("providers.payment.url", &self.providers.payment),
            ("providers.delivery.url", &self.providers.delivery),
        ] {
            if let Some(url) = &provider.url {
                match url::Url::parse(url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
                    Ok(_) => {
                        return Err(SettingsError::invalid(
                            key,
                            "must be an http or https URL with a host",
                        ))
                    }
                    Err(error) => return Err(SettingsError::invalid(key, error.to_string())),
                }
            }
        }
        if let Some(id) = &self.saga.runner_id {
            if id.is_empty()
                || id.len() > 128
                || id.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(SettingsError::invalid(
                    "saga.runner_id",
                    "must be 1 to 128 characters without spaces or control characters",
                ));
            }
        }
        let partitions = self.saga.partitions()?;
        if let Some(kafka) = self
            .kafka
            .partitions
            .filter(|kafka| *kafka != partitions.count())
        {
            return Err(SettingsError::invalid(
                "kafka.partitions",
                format!(
                    "{kafka} is not saga.partitions ({partitions}): every topic has one \
                     partition per saga partition; leave kafka.partitions unset"
                ),
            ));
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
    use figment::providers::{Format, Yaml};
    use figment::Figment;

    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let error = Figment::new()
            .merge(Yaml::string("http:\n  lisen: 127.0.0.1:1\n"))
            .extract::<Settings>()
            .expect_err("typo must fail");
        assert!(error.to_string().contains("lisen"), "{error}");
    }
}
