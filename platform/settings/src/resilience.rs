//! The `resilience` section: how each outbound dependency is called (live: a change applies
//! to the calls that start after it; a changed breaker starts closed).

use serde::{Deserialize, Serialize};

use super::SettingsError;

/// The policies of the outbound dependencies, one each. (Each has its own defaults; the
/// settings loader layers them under the files, so a file naming one key of a policy keeps
/// that dependency's defaults for the rest.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceSettings {
    /// The payment gateway.
    pub payment: DependencyPolicy,
    /// The delivery provider.
    pub delivery: DependencyPolicy,
    /// Redis: every read (a refused or failed one falls back to the database) and every
    /// view write.
    pub redis: DependencyPolicy,
    /// Kafka: each batch the relay publishes (librdkafka retries inside an attempt).
    pub kafka: DependencyPolicy,
    /// The OIDC providers: each discovery and key-set fetch.
    pub oidc: DependencyPolicy,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        Self {
            payment: DependencyPolicy::default(),
            delivery: DependencyPolicy::default(),
            redis: DependencyPolicy::redis(),
            kafka: DependencyPolicy::kafka(),
            oidc: DependencyPolicy::oidc(),
        }
    }
}

impl ResilienceSettings {
    /// Each dependency's policy, by its name (as in `petstore_circuit_breaker_state`).
    pub fn policies(&self) -> [(&'static str, &DependencyPolicy); 5] {
        [
            ("payment", &self.payment),
            ("delivery", &self.delivery),
            ("redis", &self.redis),
            ("kafka", &self.kafka),
            ("oidc", &self.oidc),
        ]
    }

    /// Refuses values that read well but must not run, naming the key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (name, policy) in self.policies() {
            policy.validate(&format!("resilience.{name}"))?;
        }
        Ok(())
    }
}

/// How one dependency is called: an overall timeout around retries (exponential backoff,
/// full jitter, a retry budget) around a circuit breaker around a per-attempt timeout around
/// a bulkhead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DependencyPolicy {
    /// Off: the dependency is called once, directly, with no timeout, breaker or bulkhead
    /// (to measure what the policy costs; never in production). Logged at start-up.
    pub enabled: bool,
    /// The whole call, every attempt and backoff included, in milliseconds.
    pub timeout_ms: u64,
    /// One attempt (waiting for the bulkhead included), in milliseconds.
    pub attempt_timeout_ms: u64,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled each time, with full jitter, in milliseconds.
    pub initial_backoff_ms: u64,
    /// The longest backoff, in milliseconds.
    pub max_backoff_ms: u64,
    /// Retries allowed beyond the first attempts.
    pub retry_budget: RetryBudgetSettings,
    /// When calls stop being made.
    pub breaker: BreakerSettings,
    /// How many calls run at once.
    pub bulkhead: BulkheadSettings,
}

impl Default for DependencyPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout_ms: 6_000,
            attempt_timeout_ms: 2_000,
            max_attempts: 3,
            initial_backoff_ms: 50,
            max_backoff_ms: 1_000,
            retry_budget: RetryBudgetSettings::default(),
            breaker: BreakerSettings::default(),
            bulkhead: BulkheadSettings::default(),
        }
    }
}

impl DependencyPolicy {
    /// Redis: one attempt (a read falls back to the database at once; the projector retries
    /// a failed batch itself), each command bounded by `redis.operation_timeout_ms` inside
    /// the attempt; the breaker opens after 20 calls half failing and probes after 2 s, so
    /// while Redis is away queries go to the database without waiting for its timeout.
    pub fn redis() -> Self {
        Self {
            timeout_ms: 2_000,
            attempt_timeout_ms: 2_000,
            max_attempts: 1,
            breaker: BreakerSettings {
                minimum_calls: 20,
                slow_call_ms: 1_000,
                open_ms: 2_000,
                ..BreakerSettings::default()
            },
            bulkhead: BulkheadSettings {
                max_concurrent: 512,
                max_wait_ms: 50,
            },
            ..Self::default()
        }
    }

    /// Kafka: one attempt per batch (librdkafka retries inside it until
    /// `kafka.message_timeout_ms`, which the attempt must outlast; the relay publishes the
    /// batch again after a failure), breaker after 5 batches, probing after 5 s.
    pub fn kafka() -> Self {
        Self {
            timeout_ms: 15_000,
            attempt_timeout_ms: 15_000,
            max_attempts: 1,
            breaker: BreakerSettings {
                window_ms: 30_000,
                minimum_calls: 5,
                slow_call_ms: 12_000,
                ..BreakerSettings::default()
            },
            bulkhead: BulkheadSettings {
                max_concurrent: 16,
                max_wait_ms: 1_000,
            },
            ..Self::default()
        }
    }

    /// An OIDC provider: three attempts of `security.oidc.fetch_timeout_ms` each (the HTTP
    /// client's own timeout), the breaker open for 30 s after 3 failed fetches, at most 4
    /// fetches at once.
    pub fn oidc() -> Self {
        Self {
            timeout_ms: 20_000,
            attempt_timeout_ms: 6_000,
            max_attempts: 3,
            initial_backoff_ms: 100,
            breaker: BreakerSettings {
                window_ms: 60_000,
                minimum_calls: 3,
                slow_call_ms: 5_000,
                open_ms: 30_000,
                half_open_calls: 1,
                ..BreakerSettings::default()
            },
            bulkhead: BulkheadSettings {
                max_concurrent: 4,
                max_wait_ms: 1_000,
            },
            ..Self::default()
        }
    }
}

/// A retry budget (Finagle's, as tower's `TpsBudget`): over the last 10 s, retries may add
/// `percent` of the calls, plus `min_per_second` (a reserve of 10 × `min_per_second`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetSettings {
    /// Retries as a share of first attempts, 0 to 1000 (percent).
    pub percent: f32,
    /// Retries allowed per second whatever the traffic.
    pub min_per_second: u32,
}

impl Default for RetryBudgetSettings {
    fn default() -> Self {
        Self {
            percent: 20.0,
            min_per_second: 5,
        }
    }
}

/// A circuit breaker over a time window: it opens when, over the calls of the last
/// `window_ms` (at least `minimum_calls` of them), the share of failures reaches
/// `failure_rate` or the share of calls slower than `slow_call_ms` reaches `slow_call_rate`;
/// after `open_ms` it lets `half_open_calls` probes through, and closes when they all succeed
/// (reopens at the first that fails).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Failure share that opens it, above 0 up to 1.
    pub failure_rate: f64,
    /// The window the rates are taken over, in milliseconds.
    pub window_ms: u64,
    /// Calls in the window before it may open.
    pub minimum_calls: u32,
    /// A call slower than this is slow, in milliseconds.
    pub slow_call_ms: u64,
    /// Slow-call share that opens it, above 0 up to 1.
    pub slow_call_rate: f64,
    /// How long it stays open before the probes, in milliseconds.
    pub open_ms: u64,
    /// Probe calls let through while half-open.
    pub half_open_calls: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            window_ms: 10_000,
            minimum_calls: 10,
            slow_call_ms: 1_500,
            slow_call_rate: 1.0,
            open_ms: 5_000,
            half_open_calls: 3,
        }
    }
}

/// A bulkhead: at most `max_concurrent` calls at once; a call waits up to `max_wait_ms` for
/// a place, then is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadSettings {
    /// Calls in flight at once.
    pub max_concurrent: u32,
    /// How long a call waits for a place, in milliseconds (0: refused at once).
    pub max_wait_ms: u64,
}

impl Default for BulkheadSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 100,
            max_wait_ms: 250,
        }
    }
}

impl DependencyPolicy {
    fn validate(&self, prefix: &str) -> Result<(), SettingsError> {
        let key = |name: &str| format!("{prefix}.{name}");
        for (name, value) in [
            ("timeout_ms", self.timeout_ms),
            ("attempt_timeout_ms", self.attempt_timeout_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("breaker.window_ms", self.breaker.window_ms),
            (
                "breaker.minimum_calls",
                u64::from(self.breaker.minimum_calls),
            ),
            ("breaker.slow_call_ms", self.breaker.slow_call_ms),
            ("breaker.open_ms", self.breaker.open_ms),
            (
                "breaker.half_open_calls",
                u64::from(self.breaker.half_open_calls),
            ),
            (
                "bulkhead.max_concurrent",
                u64::from(self.bulkhead.max_concurrent),
            ),
        ] {
            if value == 0 {
                return Err(SettingsError::invalid(key(name), "must be above 0"));
            }
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(SettingsError::invalid(
                key("initial_backoff_ms"),
                format!(
                    "{} is above max_backoff_ms ({})",
                    self.initial_backoff_ms, self.max_backoff_ms
                ),
            ));
        }
        if self.attempt_timeout_ms > self.timeout_ms {
            return Err(SettingsError::invalid(
                key("attempt_timeout_ms"),
                format!(
                    "{} is above timeout_ms ({}): no attempt could run its course",
                    self.attempt_timeout_ms, self.timeout_ms
                ),
            ));
        }
        for (name, rate) in [
            ("breaker.failure_rate", self.breaker.failure_rate),
            ("breaker.slow_call_rate", self.breaker.slow_call_rate),
        ] {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1.0) {
                return Err(SettingsError::invalid(
                    key(name),
                    format!("{rate} is not above 0 and at most 1"),
                ));
            }
        }
        let percent = self.retry_budget.percent;
        if !(percent.is_finite() && (0.0..=1000.0).contains(&percent)) {
            return Err(SettingsError::invalid(
                key("retry_budget.percent"),
                format!("{percent} is not between 0 and 1000"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_each_bad_value_is_named() {
        ResilienceSettings::default()
            .validate()
            .expect("the defaults are valid");
        type Spoil = fn(&mut DependencyPolicy);
        let cases: [(&str, Spoil); 6] = [
            ("resilience.payment.breaker.window_ms", |p| {
                p.breaker.window_ms = 0
            }),
            ("resilience.payment.max_attempts", |p| p.max_attempts = 0),
            ("resilience.payment.breaker.failure_rate", |p| {
                p.breaker.failure_rate = 1.5
            }),
            ("resilience.payment.attempt_timeout_ms", |p| {
                p.attempt_timeout_ms = 10_000
            }),
            ("resilience.payment.initial_backoff_ms", |p| {
                p.initial_backoff_ms = 5_000
            }),
            ("resilience.payment.retry_budget.percent", |p| {
                p.retry_budget.percent = f32::NAN
            }),
        ];
        for (key, spoil) in cases {
            let mut settings = ResilienceSettings::default();
            spoil(&mut settings.payment);
            let error = settings.validate().expect_err("refused").to_string();
            assert!(error.contains(key), "{key}: {error}");
        }
    }
}
