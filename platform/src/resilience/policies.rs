//! The policies of this process's dependencies (payment, delivery, Redis, Kafka, OIDC), each
//! reading its settings from the live settings at each call, or fixed.

use std::sync::Arc;

use crate::live::Live;
use crate::metrics::Metrics;
use crate::settings::{DependencyPolicy, ResilienceSettings};

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
    /// The policies `resilience.*` of `live` says, at each call.
    pub fn new(live: &Live, metrics: &Metrics) -> Self {
        let policy = |name: &'static str, pick: fn(&ResilienceSettings) -> &DependencyPolicy| {
            let live = live.clone();
            Policy::new(
                name,
                Arc::new(move || pick(&live.current().settings.resilience).clone()),
                metrics.clone(),
            )
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
        let policy = |name: &'static str, settings: &DependencyPolicy| {
            let settings = settings.clone();
            Policy::new(name, Arc::new(move || settings.clone()), metrics.clone())
        };
        Self {
            payment: policy("payment", &settings.payment),
            delivery: policy("delivery", &settings.delivery),
            redis: policy("redis", &settings.redis),
            kafka: policy("kafka", &settings.kafka),
            oidc: policy("oidc", &settings.oidc),
        }
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
