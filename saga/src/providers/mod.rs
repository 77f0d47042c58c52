//! Adapters of the domain's provider traits, and how every call to them is made.
//!
//! - [`simulated`]: in-process simulations (the default).
//! - [`http`]: real providers over HTTP, speaking the protocol the README documents
//!   (`providers.payment.url`, `providers.delivery.url`; `petstore providers serve` runs a
//!   simulation of both that speaks it).
//!
//! [`Payments`] and [`Deliveries`] are whichever one the settings choose. [`call`] makes every
//! call through the provider's resilience policy ([`petstore_resilience`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use petstore_domain::providers::{
    CancelRequest, ChargeReceipt, ChargeRequest, DeliveryBooking, DeliveryProvider,
    DeliveryRequest, PaymentGateway, ProviderError, RefundReceipt, RefundRequest,
};
use petstore_domain::OrderId;
use petstore_event_store::records::{
    AttemptOutcome, Operation, Provider, ProviderAttempt, Record, Recorder,
};
use petstore_live_settings::Live;
use petstore_resilience::{AttemptFailure, CallError, Policy};
use petstore_settings::ProvidersSettings;

pub mod http;
pub mod simulated;

pub use http::{HttpDeliveryProvider, HttpPaymentGateway, InvalidProviderUrl};
pub use simulated::{SimulatedDeliveryProvider, SimulatedPaymentGateway};

/// Calls a provider through `policy`: a refusal is its final answer (not retried, not
/// counted against its breaker); an unavailable provider or a time-out is its failure. With
/// `record`, each attempt is recorded for the order's timeline as it ends.
pub async fn call<T, F, Fut>(
    policy: &Policy,
    record: Option<CallRecord>,
    attempt: F,
) -> Result<T, CallError<ProviderError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>> + Send + 'static,
    T: Send + 'static,
{
    let Ok(result) = call_while(policy, record, || Ok::<(), Infallible>(()), attempt).await;
    result
}

/// [`call`], each attempt made only while `may_call` allows it, asked just before the
/// attempt (a retry after its back-off too): when it refuses, no attempt is made from then
/// on, and its refusal is the answer.
pub async fn call_while<T, C, G, F, Fut>(
    policy: &Policy,
    record: Option<CallRecord>,
    may_call: G,
    mut attempt: F,
) -> Result<Result<T, CallError<ProviderError>>, C>
where
    G: Fn() -> Result<(), C> + Clone + Send + 'static,
    C: Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>> + Send + 'static,
    T: Send + 'static,
{
    let record = record.map(Arc::new);
    let tries = AtomicU32::new(0);
    let result = policy
        .call(
            |error| matches!(error, Attempt::Made(ProviderError::Unavailable(_))),
            || {
                let attempt = attempt();
                let number = tries.fetch_add(1, Ordering::Relaxed) + 1;
                let may_call = may_call.clone();
                let record = record.clone();
                async move {
                    may_call().map_err(Attempt::NotMade)?;
                    let Some(record) = record else {
                        return attempt.await.map_err(Attempt::Made);
                    };
                    let mut guard = AttemptGuard::start(record, number);
                    let result = attempt.await;
                    guard.finish(result.as_ref().err());
                    result.map_err(Attempt::Made)
                }
            },
        )
        .await;
    let made = |failure| match failure {
        AttemptFailure::Error(Attempt::Made(error)) => Ok(AttemptFailure::Error(error)),
        AttemptFailure::Error(Attempt::NotMade(refusal)) => Err(refusal),
        AttemptFailure::TimedOut(after) => Ok(AttemptFailure::TimedOut(after)),
    };
    Ok(match result {
        Ok(value) => Ok(value),
        Err(CallError::Refused(Attempt::NotMade(refusal))) => return Err(refusal),
        Err(CallError::Refused(Attempt::Made(error))) => Err(CallError::Refused(error)),
        Err(CallError::Failed { failure, attempts }) => Err(CallError::Failed {
            failure: made(failure)?,
            attempts,
        }),
        Err(CallError::Rejected(rejection)) => Err(CallError::Rejected(rejection)),
    })
}

/// An attempt's end: the provider's answer, or no attempt made (`may_call` refused).
enum Attempt<C> {
    Made(ProviderError),
    NotMade(C),
}

/// What a provider call is, for the records of its attempts ([`petstore_event_store::records`]).
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// Where the records go.
    pub recorder: Recorder,
    /// The order called for.
    pub order_id: OrderId,
    /// The order's correlation id.
    pub correlation_id: String,
    /// Which provider.
    pub provider: Provider,
    /// What it is asked.
    pub operation: Operation,
    /// The call's idempotency key.
    pub idempotency_key: String,
}

/// One attempt under way: recorded when it ends, or as timed out when it is dropped before
/// (the policy's time-out cancels the attempt's future).
struct AttemptGuard {
    record: Arc<CallRecord>,
    number: u32,
    started_at: chrono::DateTime<Utc>,
    clock: Instant,
    done: bool,
}

impl AttemptGuard {
    fn start(record: Arc<CallRecord>, number: u32) -> Self {
        Self {
            record,
            number,
            started_at: Utc::now(),
            clock: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, error: Option<&ProviderError>) {
        let (outcome, error) = match error {
            None => (AttemptOutcome::Succeeded, None),
            Some(error @ ProviderError::Refused(_)) => {
                (AttemptOutcome::Refused, Some(error.to_string()))
            }
            Some(error @ ProviderError::Unavailable(_)) => {
                (AttemptOutcome::Failed, Some(error.to_string()))
            }
        };
        self.write(outcome, error);
    }

    fn write(&mut self, outcome: AttemptOutcome, error: Option<String>) {
        self.done = true;
        let record = &self.record;
        record.recorder.record(Record::Attempt(ProviderAttempt {
            order_id: record.order_id,
            correlation_id: record.correlation_id.clone(),
            provider: record.provider,
            operation: record.operation,
            idempotency_key: record.idempotency_key.clone(),
            attempt: self.number,
            outcome,
            error,
            started_at: self.started_at,
            duration: self.clock.elapsed(),
        }));
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if !self.done {
            self.write(
                AttemptOutcome::TimedOut,
                Some("no answer in time: the attempt was given up".to_owned()),
            );
        }
    }
}

/// The payment gateway the settings choose: over HTTP at `providers.payment.url`, else
/// simulated in-process.
pub enum Payments {
    /// In-process.
    Simulated(SimulatedPaymentGateway),
    /// Over HTTP.
    Http(HttpPaymentGateway),
}

/// The delivery provider the settings choose: over HTTP at `providers.delivery.url`, else
/// simulated in-process.
pub enum Deliveries {
    /// In-process.
    Simulated(SimulatedDeliveryProvider),
    /// Over HTTP.
    Http(HttpDeliveryProvider),
}

impl Payments {
    /// The gateway of `settings` (the simulation following the `live` settings), called by
    /// `caller` (named in each HTTP request's `User-Agent`).
    pub fn new(
        settings: &ProvidersSettings,
        live: &Live,
        caller: &str,
    ) -> Result<Self, InvalidProviderUrl> {
        Ok(match &settings.payment.url {
            Some(url) => Self::Http(HttpPaymentGateway::new(
                "providers.payment.url",
                url,
                caller,
            )?),
            None => Self::Simulated(SimulatedPaymentGateway::new(live.clone())),
        })
    }
}

impl Deliveries {
    /// The provider of `settings` (the simulation following the `live` settings), called by
    /// `caller` (named in each HTTP request's `User-Agent`).
    pub fn new(
        settings: &ProvidersSettings,
        live: &Live,
        caller: &str,
    ) -> Result<Self, InvalidProviderUrl> {
        Ok(match &settings.delivery.url {
            Some(url) => Self::Http(HttpDeliveryProvider::new(
                "providers.delivery.url",
                url,
                caller,
            )?),
            None => Self::Simulated(SimulatedDeliveryProvider::new(live.clone())),
        })
    }
}

impl PaymentGateway for Payments {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeReceipt, ProviderError> {
        match self {
            Self::Simulated(gateway) => gateway.charge(request).await,
            Self::Http(gateway) => gateway.charge(request).await,
        }
    }

    async fn refund(&self, request: RefundRequest) -> Result<RefundReceipt, ProviderError> {
        match self {
            Self::Simulated(gateway) => gateway.refund(request).await,
            Self::Http(gateway) => gateway.refund(request).await,
        }
    }
}

impl DeliveryProvider for Deliveries {
    async fn book(&self, request: DeliveryRequest) -> Result<DeliveryBooking, ProviderError> {
        match self {
            Self::Simulated(provider) => provider.book(request).await,
            Self::Http(provider) => provider.book(request).await,
        }
    }

    async fn cancel(&self, request: CancelRequest) -> Result<(), ProviderError> {
        match self {
            Self::Simulated(provider) => provider.cancel(request).await,
            Self::Http(provider) => provider.cancel(request).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use petstore_resilience::PolicySource;
    use petstore_settings::DependencyPolicy;
    use petstore_telemetry::metrics::Metrics;

    use super::*;

    /// A policy that tries up to three times, a millisecond apart.
    fn retrying() -> Policy {
        let settings = DependencyPolicy {
            max_attempts: 3,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            ..DependencyPolicy::default()
        };
        let source: PolicySource = Arc::new(move || settings.clone());
        Policy::new("payment", source, Metrics::new())
    }

    /// Calls a provider that is always unavailable, `may_call` asked before each attempt;
    /// the number of attempts made, and the answer.
    async fn unavailable(
        may_call: impl Fn() -> Result<(), &'static str> + Clone + Send + 'static,
        after_each: impl Fn() + Send + Sync + 'static,
    ) -> (
        u32,
        Result<Result<(), CallError<ProviderError>>, &'static str>,
    ) {
        let made = Arc::new(AtomicU32::new(0));
        let after_each = Arc::new(after_each);
        let counted = Arc::clone(&made);
        let answer = call_while(&retrying(), None, may_call, move || {
            let made = Arc::clone(&counted);
            let after_each = Arc::clone(&after_each);
            async move {
                made.fetch_add(1, Ordering::SeqCst);
                after_each();
                Err(ProviderError::Unavailable("down".to_owned()))
            }
        })
        .await;
        (made.load(Ordering::SeqCst), answer)
    }

    #[tokio::test]
    async fn while_allowed_every_attempt_is_made() {
        let (made, answer) = unavailable(|| Ok(()), || {}).await;
        assert_eq!(made, 3);
        assert!(matches!(
            answer,
            Ok(Err(CallError::Failed { attempts: 3, .. }))
        ));
    }

    #[tokio::test]
    async fn once_refused_no_attempt_is_made_not_even_a_retry() {
        let (made, answer) = unavailable(|| Err("lease lost"), || {}).await;
        assert_eq!((made, answer.err()), (0, Some("lease lost")));

        // Refused between the first attempt and its retry (a runner woken mid-back-off).
        let allowed = Arc::new(AtomicBool::new(true));
        let asked = Arc::clone(&allowed);
        let (made, answer) = unavailable(
            move || match asked.load(Ordering::SeqCst) {
                true => Ok(()),
                false => Err("lease lost"),
            },
            move || allowed.store(false, Ordering::SeqCst),
        )
        .await;
        assert_eq!((made, answer.err()), (1, Some("lease lost")));
    }
}
