//! Adapters of the domain's provider traits, and how every call to them is made.
//!
//! The default adapters simulate a provider: a configurable latency (±50 %), a configurable
//! share of transient failures (both live settings), forced failures for `X-Simulate-Failure`, and idempotency by
//! key (a repeated key answers the first result, as real gateways do). [`call`] makes every
//! call through the provider's resilience policy ([`petstore_resilience`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use petstore_domain::providers::{
    ChargeReceipt, ChargeRequest, DeliveryBooking, DeliveryProvider, DeliveryRequest,
    PaymentGateway, ProviderError,
};
use petstore_live_settings::Live;
use petstore_resilience::{CallError, Policy};
use petstore_settings::LiveProvider;

/// Calls a provider through `policy`: a refusal is its final answer (not retried, not
/// counted against its breaker); an unavailable provider or a time-out is its failure.
pub async fn call<T, F, Fut>(policy: &Policy, attempt: F) -> Result<T, CallError<ProviderError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>> + Send + 'static,
    T: Send + 'static,
{
    policy
        .call(
            |error| matches!(error, ProviderError::Unavailable(_)),
            attempt,
        )
        .await
}

async fn simulate(
    settings: &LiveProvider,
    forced_failure: bool,
    name: &str,
) -> Result<(), ProviderError> {
    if settings.latency_ms > 0 {
        let half = settings.latency_ms / 2;
        let latency = settings.latency_ms - half + fastrand::u64(0..=settings.latency_ms);
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if forced_failure {
        return Err(ProviderError::Unavailable(format!(
            "{name} is failing (simulated)"
        )));
    }
    if fastrand::f64() < settings.failure_rate {
        return Err(ProviderError::Unavailable(format!(
            "{name} had a transient failure (simulated)"
        )));
    }
    Ok(())
}

/// A simulated payment gateway.
pub struct SimulatedPaymentGateway {
    live: Live,
    charges: Mutex<HashMap<String, ChargeReceipt>>,
    /// Every charge call that got through the simulated latency and failures, repeats of a
    /// key included.
    calls: std::sync::atomic::AtomicUsize,
}

impl SimulatedPaymentGateway {
    /// A gateway that behaves as the live `providers.payment` settings say, at each call.
    pub fn new(live: Live) -> Self {
        Self {
            live,
            charges: Mutex::default(),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many distinct charges the gateway has taken.
    pub fn captured(&self) -> usize {
        self.charges.lock().map_or(0, |charges| charges.len())
    }

    /// How many charge calls it answered, a repeated idempotency key counted each time.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PaymentGateway for SimulatedPaymentGateway {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeReceipt, ProviderError> {
        let behaviour = self.live.current().settings.providers.payment.clone();
        simulate(&behaviour, request.simulate_failure, "payment-service").await?;
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut charges = self
            .charges
            .lock()
            .map_err(|_| ProviderError::Unavailable("payment gateway state poisoned".to_owned()))?;
        let receipt = charges
            .entry(request.idempotency_key)
            .or_insert_with(|| ChargeReceipt {
                reference: format!("ch_{}", uuid::Uuid::new_v4().simple()),
            });
        Ok(receipt.clone())
    }
}

/// A simulated delivery provider.
pub struct SimulatedDeliveryProvider {
    live: Live,
    bookings: Mutex<HashMap<String, DeliveryBooking>>,
}

impl SimulatedDeliveryProvider {
    /// A provider that behaves as the live `providers.delivery` settings say, at each call.
    pub fn new(live: Live) -> Self {
        Self {
            live,
            bookings: Mutex::default(),
        }
    }

    /// How many distinct deliveries the provider has booked.
    pub fn booked(&self) -> usize {
        self.bookings.lock().map_or(0, |bookings| bookings.len())
    }
}

impl DeliveryProvider for SimulatedDeliveryProvider {
    async fn book(&self, request: DeliveryRequest) -> Result<DeliveryBooking, ProviderError> {
        let behaviour = self.live.current().settings.providers.delivery.clone();
        simulate(&behaviour, request.simulate_failure, "delivery-service").await?;
        let mut bookings = self.bookings.lock().map_err(|_| {
            ProviderError::Unavailable("delivery provider state poisoned".to_owned())
        })?;
        let booking = bookings
            .entry(request.idempotency_key)
            .or_insert_with(|| DeliveryBooking {
                reference: format!("dl_{}", uuid::Uuid::new_v4().simple()),
                estimated_arrival: Utc::now() + chrono::Duration::days(3),
            });
        Ok(booking.clone())
    }
}
