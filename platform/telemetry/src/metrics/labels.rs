//! The label sets of the metrics: one struct per set, each field a label, each value from a
//! short fixed list or a route template.

use prometheus_client::encoding::EncodeLabelSet;

/// Labels of the HTTP request metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template that served the request, or `unmatched`.
    pub route: String,
    /// `GET`, `POST`, ... (`other` for unusual methods).
    pub method: &'static str,
    /// `2xx`, `4xx`, ...
    pub status_class: &'static str,
}

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

/// Labels naming one provider.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// `payment` or `delivery`.
    pub provider: String,
}

/// Labels of the projection metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    /// `read_models`, `redis` or `kafka`.
    pub projection: String,
}

/// Labels of `petstore_feature_flag_evaluations_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    /// The flag's key.
    pub flag: &'static str,
    /// `on` or `off`: the variant served.
    pub variant: &'static str,
}

/// Labels of `petstore_events_appended_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AggregateLabels {
    /// `Order`, `Pet`, `Payment` or `Delivery`.
    pub aggregate_type: &'static str,
}

/// Labels of `petstore_cache_reads_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheReadLabels {
    /// `order`, `pet` or `browse`.
    pub view: &'static str,
    /// `hit`, `miss` (the database answered) or `fallback` (Redis failed or was too slow,
    /// and the database answered).
    pub result: &'static str,
}

/// Labels of `petstore_db_pool_connections`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `in_use` or `idle`.
    pub state: &'static str,
}

/// Labels of `petstore_circuit_breaker_state`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// `payment`, `delivery`, `redis`, `kafka` or `oidc`.
    pub dependency: &'static str,
}

/// Labels of `petstore_resilience_rejections_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// `payment` or `delivery`.
    pub dependency: &'static str,
    /// `breaker_open`, `bulkhead_full`, `retry_budget` or `timeout`.
    pub reason: &'static str,
}

/// Labels of the dead-letter metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// `saga`.
    pub consumer: String,
}

/// Labels of `petstore_auth_failures_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    /// Why: `missing`, `malformed`, `expired`, `unknown_key`, ... (a fixed list).
    pub reason: &'static str,
}

/// Labels of `petstore_rate_limited_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// The quota: `default`, `login`, or a configured `"METHOD /route"`.
    pub policy: String,
}

/// Labels of `petstore_logins_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    /// `success` or `failure`.
    pub outcome: &'static str,
}

/// An order-update connection's protocol.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateProtocolLabels {
    /// `websocket` or `sse`.
    pub protocol: &'static str,
}

/// Why an order-update connection ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateCloseLabels {
    /// `terminal`, `client`, `slow`, `flag_off`, `shutdown` or `error`.
    pub reason: &'static str,
}

/// Labels of `petstore_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The service version.
    pub version: &'static str,
}
