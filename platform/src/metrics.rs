//! Metrics: registered once in [`Metrics`], held by whoever records them, rendered in the
//! Prometheus text format at `GET /metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `petstore_saga_completed_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaOutcomeLabels {
    /// `completed` or `cancelled`.
    pub outcome: String,
    /// Why a saga was cancelled (`pet-unavailable`, `payment-failed`, ...); empty when completed.
    pub reason: String,
}

/// Labels of `petstore_provider_calls_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderCallLabels {
    /// `payment` or `delivery`.
    pub provider: String,
    /// `ok`, `refused` or `unavailable`.
    pub result: String,
}

/// Labels of the projection metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    /// `read_models`, `redis` or `kafka`.
    pub projection: String,
}

/// Every metric of the service.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Sagas that reached a terminal state, by outcome (the seed's
    /// `petstore_saga_completed_total`). Counted when the saga runner handles the terminal
    /// event; a runner replaying after a crash may count a saga again (at-least-once).
    pub sagas: Family<SagaOutcomeLabels, Counter>,
    /// Calls to external providers, by result (each attempt counts).
    pub provider_calls: Family<ProviderCallLabels, Counter>,
    /// Failed attempts of a projection (a broker or Redis down stalls it; each retry counts).
    pub projection_failures: Family<ProjectionLabels, Counter>,
    /// 1 while a projection is stalled by failures, 0 once it applies again.
    pub projection_stalled: Family<ProjectionLabels, Gauge>,
    /// Events applied by each projection.
    pub projected_events: Family<ProjectionLabels, Counter>,
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
        let sagas = Family::<SagaOutcomeLabels, Counter>::default();
        registry.register(
            "petstore_saga_completed",
            "Order sagas that ended, by outcome and cancellation reason",
            sagas.clone(),
        );
        let provider_calls = Family::<ProviderCallLabels, Counter>::default();
        registry.register(
            "petstore_provider_calls",
            "Calls to the payment gateway and delivery provider, by result",
            provider_calls.clone(),
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
        Self {
            registry: Arc::new(registry),
            sagas,
            provider_calls,
            projection_failures,
            projection_stalled,
            projected_events,
        }
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

    /// Counts one provider call attempt.
    pub fn provider_call(&self, provider: &str, result: &str) {
        self.provider_calls
            .get_or_create(&ProviderCallLabels {
                provider: provider.to_owned(),
                result: result.to_owned(),
            })
            .inc();
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

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }
}
