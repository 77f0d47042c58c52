//! Adapters of the domain's provider traits, and how every call to them is made.
//!
//! - [`simulated`]: in-process simulations (the default).
//! - [`http`]: real providers over HTTP, speaking the protocol the README documents
//!   (`providers.payment.url`, `providers.delivery.url`; `petstore providers serve` runs a
//!   simulation of both that speaks it).
//!
//! [`Payments`] and [`Deliveries`] are whichever one the settings choose. [`call`] makes every
//! call through the provider's resilience policy ([`petstore_resilience`]).

use std::future::Future;

use petstore_domain::providers::{
    CancelRequest, ChargeReceipt, ChargeRequest, DeliveryBooking, DeliveryProvider,
    DeliveryRequest, PaymentGateway, ProviderError, RefundReceipt, RefundRequest,
};
use petstore_live_settings::Live;
use petstore_resilience::{CallError, Policy};
use petstore_settings::ProvidersSettings;

pub mod http;
pub mod simulated;

pub use http::{HttpDeliveryProvider, HttpPaymentGateway, InvalidProviderUrl};
pub use simulated::{SimulatedDeliveryProvider, SimulatedPaymentGateway};

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
