//! The simulated providers, in-process (the default): a configurable latency (±50 %), a
//! configurable share of transient failures (both live settings), forced failures for
//! `X-Simulate-Failure`, and idempotency by key (a repeated key answers the first result, as
//! real gateways do).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use petstore_domain::providers::{
    CancelRequest, ChargeReceipt, ChargeRequest, DeliveryBooking, DeliveryProvider,
    DeliveryRequest, PaymentGateway, ProviderError, RefundReceipt, RefundRequest,
};
use petstore_live_settings::Live;
use petstore_settings::LiveProvider;

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
    refunds: Mutex<HashMap<String, RefundReceipt>>,
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
            refunds: Mutex::default(),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many distinct charges the gateway has taken.
    pub fn captured(&self) -> usize {
        self.charges.lock().map_or(0, |charges| charges.len())
    }

    /// How many distinct refunds the gateway has made.
    pub fn refunded(&self) -> usize {
        self.refunds.lock().map_or(0, |refunds| refunds.len())
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

    async fn refund(&self, request: RefundRequest) -> Result<RefundReceipt, ProviderError> {
        let behaviour = self.live.current().settings.providers.payment.clone();
        simulate(&behaviour, false, "payment-service").await?;
        let known = self.charges.lock().is_ok_and(|charges| {
            charges
                .values()
                .any(|charge| charge.reference == request.charge_reference)
        });
        if !known {
            return Err(ProviderError::Refused(format!(
                "no charge {}",
                request.charge_reference
            )));
        }
        let mut refunds = self
            .refunds
            .lock()
            .map_err(|_| ProviderError::Unavailable("payment gateway state poisoned".to_owned()))?;
        let receipt = refunds
            .entry(request.idempotency_key)
            .or_insert_with(|| RefundReceipt {
                reference: format!("re_{}", uuid::Uuid::new_v4().simple()),
            });
        Ok(receipt.clone())
    }
}

/// A simulated delivery provider.
pub struct SimulatedDeliveryProvider {
    live: Live,
    bookings: Mutex<HashMap<String, DeliveryBooking>>,
    /// The idempotency keys of the cancellations made.
    cancellations: Mutex<HashMap<String, String>>,
}

impl SimulatedDeliveryProvider {
    /// A provider that behaves as the live `providers.delivery` settings say, at each call.
    pub fn new(live: Live) -> Self {
        Self {
            live,
            bookings: Mutex::default(),
            cancellations: Mutex::default(),
        }
    }

    /// How many distinct deliveries the provider has booked.
    pub fn booked(&self) -> usize {
        self.bookings.lock().map_or(0, |bookings| bookings.len())
    }

    /// How many distinct cancellations it has made.
    pub fn cancelled(&self) -> usize {
        self.cancellations
            .lock()
            .map_or(0, |cancellations| cancellations.len())
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

    async fn cancel(&self, request: CancelRequest) -> Result<(), ProviderError> {
        let behaviour = self.live.current().settings.providers.delivery.clone();
        simulate(&behaviour, false, "delivery-service").await?;
        let known = self.bookings.lock().is_ok_and(|bookings| {
            bookings
                .values()
                .any(|booking| booking.reference == request.booking_reference)
        });
        if !known {
            return Err(ProviderError::Refused(format!(
                "no delivery {}",
                request.booking_reference
            )));
        }
        self.cancellations
            .lock()
            .map_err(|_| ProviderError::Unavailable("delivery provider state poisoned".to_owned()))?
            .entry(request.idempotency_key)
            .or_insert(request.booking_reference);
        Ok(())
    }
}
