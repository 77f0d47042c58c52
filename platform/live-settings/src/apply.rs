//! Applying each new version of the live settings to what does not read them at each
//! decision: the rate limits and the log filter.

use std::sync::PoisonError;

use super::{Live, LiveSnapshot};
use petstore_settings::Settings;

/// The rate limits and log filter a process applied, and what it applied last.
pub(super) struct Applied {
    /// Replaces the process's rate limits.
    replace_rate_limits: Box<dyn Fn(&petstore_settings::RateLimitSettings) + Send + Sync>,
    limits: petstore_settings::RateLimitSettings,
    filter: String,
}

impl Live {
    /// From now on applies every new version, as it is published (before the request that
    /// made it is answered), to what does not read the settings at each decision: the rate
    /// limits (swapped whole by `replace_rate_limits`; their counts start afresh) and the log
    /// filter. `started` is what they were built with; the version in force now is applied
    /// at once.
    pub fn apply_to(
        &self,
        replace_rate_limits: impl Fn(&petstore_settings::RateLimitSettings) + Send + Sync + 'static,
        started: &Settings,
    ) {
        let applied = Applied {
            replace_rate_limits: Box::new(replace_rate_limits),
            limits: started.security.rate_limits.clone(),
            filter: started.log.filter.clone(),
        };
        *self
            .inner
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(applied);
        self.apply(&self.current());
    }

    pub(super) fn apply(&self, snapshot: &LiveSnapshot) {
        let mut applied = self
            .inner
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(applied) = applied.as_mut() else {
            return;
        };
        let wanted = &snapshot.settings;
        if wanted.security.rate_limits != applied.limits {
            applied.limits = wanted.security.rate_limits.clone();
            (applied.replace_rate_limits)(&applied.limits);
            tracing::info!(version = snapshot.version, "rate limits replaced");
        }
        if wanted.log.filter != applied.filter {
            applied.filter = wanted.log.filter.clone();
            match petstore_telemetry::set_log_filter(&applied.filter) {
                Ok(true) => {
                    tracing::info!(version = snapshot.version, filter = %applied.filter, "log filter replaced")
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(%error, filter = %applied.filter, "the log filter cannot be applied")
                }
            }
        }
    }
}
