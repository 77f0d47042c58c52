//! The policies of this process's dependencies (payment, delivery, Redis, Kafka, OIDC), each
//! reading its settings at each call (from the live settings: `Live::policies`), or fixed.

use std::sync::Arc;

use petstore_settings::{DependencyPolicy, ResilienceSettings};
use petstore_telemetry::metrics::Metrics;

use super::{BreakerStatus, Policy};

/// The policies of this process's dependencies, following the live settings.
#[derive(Clone)]
pub struct Policies {
    /// The payment gateway.
    pub payment: Policy,
    /// The delivery provider.
    pub delivery: Policy,
    /// Redis.
    pub redis: Policy,
    /// Kafka (publishing).
    pub kafka: Policy,
    /// The OIDC providers' discovery and key-set fetches.
    pub oidc: Policy,
}

impl Policies {
    /// The policies `settings` says at each call: given how to pick a dependency's policy
    /// out of the resilience settings, it answers that policy as in force now.
    pub fn following<S>(settings: S, metrics: &Metrics) -> Self
    where
        S: Fn(fn(&ResilienceSettings) -> &DependencyPolicy) -> DependencyPolicy
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let policy = |name: &'static str, pick: fn(&ResilienceSettings) -> &DependencyPolicy| {
            let settings = settings.clone();
            Policy::new(name, Arc::new(move || settings(pick)), metrics.clone())
        };
        Self {
            payment: policy("payment", |all| &all.payment),
            delivery: policy("delivery", |all| &all.delivery),
            redis: policy("redis", |all| &all.redis),
            kafka: policy("kafka", |all| &all.kafka),
            oidc: policy("oidc", |all| &all.oidc),
        }
    }

    /// The policies of `settings`, fixed (a command-line tool with no live settings).
    pub fn fixed(settings: &ResilienceSettings, metrics: &Metrics) -> Self {
        let settings = Arc::new(settings.clone());
        Self::following(move |pick| pick(&settings).clone(), metrics)
    }

    /// Each policy, by dependency name.
    pub fn all(&self) -> [&Policy; 5] {
        [
            &self.payment,
            &self.delivery,
            &self.redis,
            &self.kafka,
            &self.oidc,
        ]
    }

    /// The policy of `name`.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.all().into_iter().find(|policy| policy.name() == name)
    }

    /// Every breaker's state, by dependency name.
    pub async fn statuses(&self) -> std::collections::BTreeMap<String, BreakerStatus> {
        let mut statuses = std::collections::BTreeMap::new();
        for policy in self.all() {
            statuses.insert(policy.name().to_owned(), policy.status().await);
        }
        statuses
    }
}
