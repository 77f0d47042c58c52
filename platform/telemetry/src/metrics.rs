//! Metrics: registered once in [`Metrics`], held by whoever records them, rendered in the
//! Prometheus text format at `GET /metrics`.
//!
//! Label sets are bounded: routes are templates (`/petstore-domain/orders/{order_id}/status`,
//! `unmatched` for paths no route serves), methods and status classes come from short fixed
//! lists, and every other label names one of a handful of components. The README lists
//! every metric.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod labels;

pub use labels::{
    AggregateLabels, AuthFailureLabels, BuildLabels, CacheReadLabels, ConsumerLabels,
    DependencyLabels, FlagLabels, LoginLabels, PoolLabels, ProjectionLabels, ProviderCallLabels,
    ProviderLabels, RateLimitLabels, RejectionLabels, RequestLabels, SagaOutcomeLabels,
    UpdateCloseLabels, UpdateProtocolLabels,
};

/// Buckets of request and provider-call latencies, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The outbound dependencies that get a circuit breaker, one `petstore_circuit_breaker_state`
/// series each.
pub const BREAKER_DEPENDENCIES: [&str; 5] = ["payment", "delivery", "redis", "kafka", "oidc"];

/// `petstore_circuit_breaker_state` of a closed breaker (calls go through).
pub const BREAKER_CLOSED: i64 = 0;
/// `petstore_circuit_breaker_state` of a half-open breaker (a few probe calls go through).
pub const BREAKER_HALF_OPEN: i64 = 1;
/// `petstore_circuit_breaker_state` of an open breaker (calls fail fast).
pub const BREAKER_OPEN: i64 = 2;

/// A connection pool whose state `petstore_db_pool_*` reports (the event store's).
pub trait PoolState: Send + Sync {
    /// The pool's connections (open, of them idle) and its configured size.
    fn pool_state(&self) -> (u32, u32, u32);
}

/// Every metric of the service.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Every HTTP response (the seed's `petstore_requests_total`).
    pub requests: Family<RequestLabels, Counter>,
    /// HTTP responses with a status of 400 or more (`petstore_requests_errors_total`).
    pub request_errors: Family<RequestLabels, Counter>,
    /// HTTP request latency (`petstore_request_duration_seconds`).
    pub request_duration: HistogramFamily<RequestLabels>,
    /// Requests refused at once because `http.max_concurrent_requests` were in flight.
    pub requests_shed: Counter,
    /// Events set aside as dead letters, by consumer.
    pub dead_letters_recorded: Family<ConsumerLabels, Counter>,
    /// Dead letters waiting for someone (pending or retrying), by consumer.
    pub dead_letters: Family<ConsumerLabels, Gauge>,
    /// Calls to a dependency refused or cut short by its resilience policy.
    pub resilience_rejections: Family<RejectionLabels, Counter>,
    /// Events appended by this process, by aggregate type.
    pub events_appended: Family<AggregateLabels, Counter>,
    /// Sagas started (an `OrderCreated` handled by a saga runner; at least once, like
    /// [`Self::sagas`]).
    pub sagas_started: Counter,
    /// Sagas that reached a terminal state, by outcome (the seed's
    /// `petstore_saga_completed_total`). Counted when the saga runner handles the terminal
    /// event; a runner replaying after a crash may count a saga again (at-least-once).
    pub sagas: Family<SagaOutcomeLabels, Counter>,
    /// Orders this saga runner drives that have not ended.
    pub sagas_in_flight: Gauge,
    /// Unfired saga step deadlines, and those already due.
    pub deadlines_pending: Gauge,
    /// Unfired saga step deadlines already due: a backlog that should stay near zero.
    pub deadlines_overdue: Gauge,
    /// Events the saga runner has not handled yet.
    pub saga_lag_events: Gauge,
    /// Age of the oldest event the saga runner has not handled, in seconds.
    pub saga_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Saga batches that failed and are retried.
    pub saga_failures: Counter,
    /// 1 while the saga runner is stalled (handling an event failed).
    pub saga_stalled: Gauge,
    /// Calls to external providers, by result (each attempt counts).
    pub provider_calls: Family<ProviderCallLabels, Counter>,
    /// Latency of each provider call attempt.
    pub provider_call_duration: HistogramFamily<ProviderLabels>,
    /// Failed attempts of a projection (a broker or Redis down stalls it; each retry counts).
    pub projection_failures: Family<ProjectionLabels, Counter>,
    /// 1 while a projection is stalled by failures, 0 once it applies again.
    pub projection_stalled: Family<ProjectionLabels, Gauge>,
    /// Events applied by each projection.
    pub projected_events: Family<ProjectionLabels, Counter>,
    /// Events each projection has not applied yet.
    pub projection_lag_events: Family<ProjectionLabels, Gauge>,
    /// Age of the oldest event each projection has not applied, in seconds.
    pub projection_lag_seconds: Family<ProjectionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Kafka messages whose delivery failed.
    pub kafka_publish_errors: Counter,
    /// Time from handing a message to the producer to the broker's acknowledgement.
    pub kafka_delivery: Histogram,
    /// Redis reads by view and result.
    pub cache_reads: Family<CacheReadLabels, Counter>,
    /// Connections of the event store's pool, in use and idle (set when rendered).
    pub pool_connections: Family<PoolLabels, Gauge>,
    /// The pool's configured size.
    pub pool_max_connections: Gauge,
    /// The state of each dependency's circuit breaker (see [`BREAKER_CLOSED`]).
    pub circuit_breaker_state: Family<DependencyLabels, Gauge>,
    /// Requests refused 401, by reason.
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    /// Requests refused 429, by quota.
    pub rate_limited: Family<RateLimitLabels, Counter>,
    /// Password logins, by outcome.
    pub logins: Family<LoginLabels, Counter>,
    /// Feature-flag decisions, by flag and variant served.
    pub feature_flag_evaluations: Family<FlagLabels, Counter>,
    /// The live settings version this process runs with.
    pub live_settings_version: Gauge,
    /// Open order-update connections, by protocol.
    pub order_update_connections: Family<UpdateProtocolLabels, Gauge>,
    /// Order updates sent to clients.
    pub order_updates_sent: Counter,
    /// From an update's event timestamp to its send.
    pub order_update_delay: Histogram,
    /// Order-update connections ended, by reason.
    pub order_update_closes: Family<UpdateCloseLabels, Counter>,
    pool: Option<Arc<dyn PoolState>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "petstore_requests",
            "HTTP requests served, by route template, method and status class",
            requests.clone(),
        );
        let request_errors = Family::<RequestLabels, Counter>::default();
        registry.register(
            "petstore_requests_errors",
            "HTTP requests answered with a status of 400 or more",
            request_errors.clone(),
        );
        let request_duration = HistogramFamily::<RequestLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "petstore_request_duration",
            "HTTP request latency, from the first byte read to the response head",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let resilience_rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "petstore_resilience_rejections",
            "Calls to a dependency refused or cut short by its policy: breaker open, bulkhead full, retry budget spent, overall timeout",
            resilience_rejections.clone(),
        );
        let dead_letters_recorded = Family::<ConsumerLabels, Counter>::default();
        registry.register(
            "petstore_dead_letters_recorded",
            "Events a consumer set aside as dead letters",
            dead_letters_recorded.clone(),
        );
        let dead_letters = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "petstore_dead_letters",
            "Dead letters waiting for someone (pending or retrying), by consumer",
            dead_letters.clone(),
        );
        dead_letters
            .get_or_create(&ConsumerLabels {
                consumer: "saga".to_owned(),
            })
            .set(0);
        let requests_shed = Counter::default();
        registry.register(
            "petstore_requests_shed",
            "Requests refused at once (503) because http.max_concurrent_requests were in flight",
            requests_shed.clone(),
        );
        let events_appended = Family::<AggregateLabels, Counter>::default();
        registry.register(
            "petstore_events_appended",
            "Events appended to the event store by this process, by aggregate type",
            events_appended.clone(),
        );
        let sagas_started = Counter::default();
        registry.register(
            "petstore_saga_started",
            "Order sagas started (OrderCreated handled by a saga runner)",
            sagas_started.clone(),
        );
        let sagas = Family::<SagaOutcomeLabels, Counter>::default();
        registry.register(
            "petstore_saga_completed",
            "Order sagas that ended, by outcome and cancellation reason",
            sagas.clone(),
        );
        let sagas_in_flight = Gauge::default();
        registry.register(
            "petstore_sagas_in_flight",
            "Orders this saga runner drives that have not ended",
            sagas_in_flight.clone(),
        );
        let deadlines_pending = Gauge::default();
        registry.register(
            "petstore_saga_deadlines_pending",
            "Saga step deadlines not fired yet",
            deadlines_pending.clone(),
        );
        let deadlines_overdue = Gauge::default();
        registry.register(
            "petstore_saga_deadlines_overdue",
            "Saga step deadlines already due but not fired yet",
            deadlines_overdue.clone(),
        );
        let saga_lag_events = Gauge::default();
        registry.register(
            "petstore_saga_runner_lag_events",
            "Events in the log the saga runner has not handled yet",
            saga_lag_events.clone(),
        );
        let saga_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "petstore_saga_runner_lag_seconds",
            "Age of the oldest event the saga runner has not handled (0 when caught up)",
            saga_lag_seconds.clone(),
        );
        let saga_failures = Counter::default();
        registry.register(
            "petstore_saga_runner_failures",
            "Saga batches that failed and are retried",
            saga_failures.clone(),
        );
        let saga_stalled = Gauge::default();
        registry.register(
            "petstore_saga_runner_stalled",
            "1 while the saga runner is stalled (handling an event failed), else 0",
            saga_stalled.clone(),
        );
        let provider_calls = Family::<ProviderCallLabels, Counter>::default();
        registry.register(
            "petstore_provider_calls",
            "Calls to the payment gateway and delivery provider, by result",
            provider_calls.clone(),
        );
        let provider_call_duration = HistogramFamily::<ProviderLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "petstore_provider_call_duration",
            "Latency of one provider call attempt",
            prometheus_client::registry::Unit::Seconds,
            provider_call_duration.clone(),
        );
        let projection_failures = Family::<ProjectionLabels, Counter>::default();
        registry.register(
            "petstore_projection_failures",
            "Failed attempts of a projection to apply a batch",
            projection_failures.clone(),
        );
        let projection_stalled = Family::<ProjectionLabels, Gauge>::default();
        registry.register(
            "petstore_projection_stalled",
            "1 while a projection cannot apply (its dependency is down), else 0",
            projection_stalled.clone(),
        );
        let projected_events = Family::<ProjectionLabels, Counter>::default();
        registry.register(
            "petstore_projected_events",
            "Events applied by each projection",
            projected_events.clone(),
        );
        let projection_lag_events = Family::<ProjectionLabels, Gauge>::default();
        registry.register(
            "petstore_projection_lag_events",
            "Events in the log a projection has not applied yet (in the process running it)",
            projection_lag_events.clone(),
        );
        let projection_lag_seconds =
            Family::<ProjectionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "petstore_projection_lag_seconds",
            "Age of the oldest event a projection has not applied (0 when caught up)",
            projection_lag_seconds.clone(),
        );
        let kafka_publish_errors = Counter::default();
        registry.register(
            "petstore_kafka_publish_errors",
            "Kafka messages whose delivery failed",
            kafka_publish_errors.clone(),
        );
        let kafka_delivery = Histogram::new(LATENCY_BUCKETS);
        registry.register_with_unit(
            "petstore_kafka_delivery",
            "Time from handing a message to the producer to the broker's acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            kafka_delivery.clone(),
        );
        let cache_reads = Family::<CacheReadLabels, Counter>::default();
        registry.register(
            "petstore_cache_reads",
            "Redis reads by view and result: hit, miss, or fallback (Redis failed; the database answered)",
            cache_reads.clone(),
        );
        let pool_connections = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "petstore_db_pool_connections",
            "Connections of the event store's pool, by state",
            pool_connections.clone(),
        );
        let pool_max_connections = Gauge::default();
        registry.register(
            "petstore_db_pool_max_connections",
            "The event store pool's configured size",
            pool_max_connections.clone(),
        );
        let feature_flag_evaluations = Family::<FlagLabels, Counter>::default();
        registry.register(
            "petstore_feature_flag_evaluations",
            "Feature-flag decisions, by flag and the variant served (on or off)",
            feature_flag_evaluations.clone(),
        );
        for flag in petstore_settings::Flag::ALL {
            for variant in ["on", "off"] {
                feature_flag_evaluations
                    .get_or_create(&FlagLabels {
                        flag: flag.key(),
                        variant,
                    })
                    .inc_by(0);
            }
        }
        let live_settings_version = Gauge::default();
        registry.register(
            "petstore_live_settings_version",
            "The live settings version this process runs with (0: the files as read)",
            live_settings_version.clone(),
        );
        let order_update_connections = Family::<UpdateProtocolLabels, Gauge>::default();
        registry.register(
            "petstore_order_update_connections",
            "Open live order-update connections, by protocol (websocket, sse)",
            order_update_connections.clone(),
        );
        for protocol in ["websocket", "sse"] {
            order_update_connections
                .get_or_create(&UpdateProtocolLabels { protocol })
                .set(0);
        }
        let order_updates_sent = Counter::default();
        registry.register(
            "petstore_order_updates_sent",
            "Order status updates sent on live update connections",
            order_updates_sent.clone(),
        );
        let order_update_delay = latency_histogram();
        registry.register_with_unit(
            "petstore_order_update_delay",
            "From the event that changed an order's status to its update being sent",
            prometheus_client::registry::Unit::Seconds,
            order_update_delay.clone(),
        );
        let order_update_closes = Family::<UpdateCloseLabels, Counter>::default();
        registry.register(
            "petstore_order_update_closes",
            "Live order-update connections ended, by reason",
            order_update_closes.clone(),
        );
        let circuit_breaker_state = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "petstore_circuit_breaker_state",
            "Circuit breaker per dependency: 0 closed, 1 half-open, 2 open",
            circuit_breaker_state.clone(),
        );
        for dependency in BREAKER_DEPENDENCIES {
            circuit_breaker_state
                .get_or_create(&DependencyLabels { dependency })
                .set(BREAKER_CLOSED);
        }
        // Series that exist from the start read 0 instead of "no data", so rates and ratios
        // over them answer before the first event (the outcomes of sagas, Redis reads).
        sagas
            .get_or_create(&SagaOutcomeLabels {
                outcome: "completed".to_owned(),
                reason: String::new(),
            })
            .inc_by(0);
        for reason in petstore_domain::CancellationReason::ALL {
            sagas
                .get_or_create(&SagaOutcomeLabels {
                    outcome: "cancelled".to_owned(),
                    reason: reason.as_str().to_owned(),
                })
                .inc_by(0);
        }
        for view in ["order", "pet", "browse"] {
            for result in ["hit", "miss", "fallback"] {
                cache_reads
                    .get_or_create(&CacheReadLabels { view, result })
                    .inc_by(0);
            }
        }
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "petstore_build_info",
            "The running version (always 1)",
            build_info,
        );
        let auth_failures = Family::<AuthFailureLabels, Counter>::default();
        registry.register(
            "petstore_auth_failures",
            "Requests refused 401 (no, malformed, expired or untrusted token), by reason",
            auth_failures.clone(),
        );
        let rate_limited = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "petstore_rate_limited",
            "Requests refused 429, by quota",
            rate_limited.clone(),
        );
        let logins = Family::<LoginLabels, Counter>::default();
        for outcome in ["success", "failure"] {
            logins.get_or_create(&LoginLabels { outcome }).inc_by(0);
        }
        registry.register(
            "petstore_logins",
            "Password logins, by outcome",
            logins.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            request_errors,
            request_duration,
            requests_shed,
            dead_letters_recorded,
            dead_letters,
            resilience_rejections,
            events_appended,
            sagas_started,
            sagas,
            sagas_in_flight,
            deadlines_pending,
            deadlines_overdue,
            saga_lag_events,
            saga_lag_seconds,
            saga_failures,
            saga_stalled,
            provider_calls,
            provider_call_duration,
            projection_failures,
            projection_stalled,
            projected_events,
            projection_lag_events,
            projection_lag_seconds,
            kafka_publish_errors,
            kafka_delivery,
            cache_reads,
            pool_connections,
            pool_max_connections,
            circuit_breaker_state,
            auth_failures,
            rate_limited,
            logins,
            feature_flag_evaluations,
            live_settings_version,
            order_update_connections,
            order_updates_sent,
            order_update_delay,
            order_update_closes,
            pool: None,
        }
    }

    /// Reports `pool` in `petstore_db_pool_*` (read each time metrics render).
    pub fn observe_pool(mut self, pool: impl PoolState + 'static) -> Self {
        self.pool = Some(Arc::new(pool));
        self
    }

    /// Counts one HTTP response.
    pub fn request_served(&self, labels: RequestLabels, elapsed: Duration) {
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if matches!(labels.status_class, "4xx" | "5xx") {
            self.request_errors.get_or_create(&labels).inc();
        }
        self.requests.get_or_create(&labels).inc();
    }

    /// Counts appended events of one aggregate type.
    pub fn events_appended(&self, aggregate_type: &'static str, events: usize) {
        self.events_appended
            .get_or_create(&AggregateLabels { aggregate_type })
            .inc_by(events as u64);
    }

    /// Counts a saga that ended.
    pub fn saga_finished(&self, outcome: &str, reason: &str) {
        self.sagas
            .get_or_create(&SagaOutcomeLabels {
                outcome: outcome.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one provider call attempt and its latency.
    pub fn provider_call(&self, provider: &str, result: &str, elapsed: Duration) {
        self.provider_calls
            .get_or_create(&ProviderCallLabels {
                provider: provider.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.provider_call_duration
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts an event `consumer` set aside.
    pub fn dead_letter_recorded(&self, consumer: &str) {
        self.dead_letters_recorded
            .get_or_create(&ConsumerLabels {
                consumer: consumer.to_owned(),
            })
            .inc();
    }

    /// Sets the open dead letters of each consumer (those missing from `counts` have none).
    pub fn dead_letters_open(&self, counts: &std::collections::BTreeMap<String, i64>) {
        for consumer in ["saga"]
            .into_iter()
            .map(str::to_owned)
            .chain(counts.keys().cloned())
        {
            let open = counts.get(&consumer).copied().unwrap_or(0);
            self.dead_letters
                .get_or_create(&ConsumerLabels { consumer })
                .set(open);
        }
    }

    /// Counts a call that `dependency`'s policy refused or cut short, and why.
    pub fn resilience_rejection(&self, dependency: &'static str, reason: &'static str) {
        self.resilience_rejections
            .get_or_create(&RejectionLabels { dependency, reason })
            .inc();
    }

    /// Counts an order-update connection that ended, and why.
    pub fn order_update_closed(&self, reason: &'static str) {
        self.order_update_closes
            .get_or_create(&UpdateCloseLabels { reason })
            .inc();
    }

    /// Counts one Redis read.
    pub fn cache_read(&self, view: &'static str, result: &'static str) {
        self.cache_reads
            .get_or_create(&CacheReadLabels { view, result })
            .inc();
    }

    /// Counts events a projection applied (or handed over) without saying it is not stalled.
    pub fn projected(&self, projection: &str, events: u64) {
        self.projected_events
            .get_or_create(&ProjectionLabels {
                projection: projection.to_owned(),
            })
            .inc_by(events);
    }

    /// Records a projection's failed attempt (and marks it stalled) or its applied batch.
    pub fn projection_attempt(&self, projection: &str, applied: Result<u64, ()>) {
        let labels = ProjectionLabels {
            projection: projection.to_owned(),
        };
        match applied {
            Ok(events) => {
                self.projected_events.get_or_create(&labels).inc_by(events);
                self.projection_stalled.get_or_create(&labels).set(0);
            }
            Err(()) => {
                self.projection_failures.get_or_create(&labels).inc();
                self.projection_stalled.get_or_create(&labels).set(1);
            }
        }
    }

    /// Records how far a projection is behind.
    /// Records how far a projection is behind: `events` unhandled, the oldest `seconds` old.
    pub fn projection_lag(&self, projection: &str, events: i64, seconds: f64) {
        let labels = ProjectionLabels {
            projection: projection.to_owned(),
        };
        self.projection_lag_events
            .get_or_create(&labels)
            .set(events);
        self.projection_lag_seconds
            .get_or_create(&labels)
            .set(seconds);
    }

    /// Records how far the saga runner is behind: `events` unhandled, the oldest `seconds` old.
    pub fn saga_lag(&self, events: i64, seconds: f64) {
        self.saga_lag_events.set(events);
        self.saga_lag_seconds.set(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Some(pool) = &self.pool {
            let (size, idle, max) = pool.pool_state();
            let in_use = size.saturating_sub(idle);
            self.pool_connections
                .get_or_create(&PoolLabels { state: "in_use" })
                .set(i64::from(in_use));
            self.pool_connections
                .get_or_create(&PoolLabels { state: "idle" })
                .set(i64::from(idle));
            self.pool_max_connections.set(i64::from(max));
        }
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_4xx_and_5xx_only() {
        let metrics = Metrics::new();
        for status_class in ["2xx", "3xx", "4xx", "5xx"] {
            metrics.request_served(
                RequestLabels {
                    route: "/x".to_owned(),
                    method: "GET",
                    status_class,
                },
                Duration::from_millis(3),
            );
        }
        let text = metrics.render();
        assert!(text.contains(
            "petstore_requests_errors_total{route=\"/x\",method=\"GET\",status_class=\"4xx\"} 1"
        ));
        assert!(text.contains(
            "petstore_requests_errors_total{route=\"/x\",method=\"GET\",status_class=\"5xx\"} 1"
        ));
        assert!(!text.contains(
            "petstore_requests_errors_total{route=\"/x\",method=\"GET\",status_class=\"2xx\"}"
        ));
        assert!(text.contains("petstore_request_duration_seconds_bucket{le=\"0.005\",route=\"/x\",method=\"GET\",status_class=\"2xx\"} 1")
            || text.contains("petstore_request_duration_seconds_bucket{route=\"/x\",method=\"GET\",status_class=\"2xx\",le=\"0.005\"} 1"),
            "{text}");
        for dependency in BREAKER_DEPENDENCIES {
            assert!(text.contains(&format!(
                "petstore_circuit_breaker_state{{dependency=\"{dependency}\"}} 0"
            )));
        }
    }
}
