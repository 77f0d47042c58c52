//! The providers over HTTP: the small Stripe-like protocol the README documents.
//!
//! - `POST {payment}/charges` `{"order_id","customer_id","amount_minor","currency"}`:
//!   `201 {"charge_id","status":"succeeded"}`, or `402 {"error"}` (declined);
//! - `POST {payment}/refunds` `{"charge_id","amount_minor"}`: `201 {"refund_id"}`;
//! - `POST {delivery}/deliveries` `{"order_id","pet_id","customer_id"}`:
//!   `201 {"delivery_id","scheduled_for"}`, or `422 {"error"}` (refused);
//! - `POST {delivery}/deliveries/{delivery_id}/cancel`: `200`.
//!
//! Every request carries its `Idempotency-Key` (a retry sends the same one), and
//! `X-Simulate-Failure` when the order asked for its provider to fail. A 4xx answer is the
//! provider's refusal (final); a 5xx answer, a time-out or a lost connection is its failure
//! (retried under the provider's policy).

use std::time::Duration;

use chrono::{DateTime, Utc};
use petstore_domain::providers::{
    CancelRequest, ChargeReceipt, ChargeRequest, DeliveryBooking, DeliveryProvider,
    DeliveryRequest, PaymentGateway, ProviderError, RefundReceipt, RefundRequest,
};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// The header every call carries its idempotency key in.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// The header asking the provider to fail (forwarded from the order's `X-Simulate-Failure`).
pub const SIMULATE_FAILURE: &str = "X-Simulate-Failure";

/// A provider URL that cannot be called.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {url:?} is not an http(s) URL: {reason}")]
pub struct InvalidProviderUrl {
    /// The setting.
    pub key: &'static str,
    /// Its value.
    pub url: String,
    /// Why.
    pub reason: String,
}

/// One provider's base URL and client.
struct Endpoint {
    client: reqwest::Client,
    base: Url,
    name: &'static str,
}

impl Endpoint {
    fn new(
        key: &'static str,
        url: &str,
        name: &'static str,
        caller: &str,
    ) -> Result<Self, InvalidProviderUrl> {
        let invalid = |reason: String| InvalidProviderUrl {
            key,
            url: url.to_owned(),
            reason,
        };
        let base = Url::parse(url).map_err(|error| invalid(error.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(invalid(
                "the scheme must be http or https, with a host".to_owned(),
            ));
        }
        let client = reqwest::Client::builder()
            // Each attempt's time limit is the provider's policy's.
            .connect_timeout(Duration::from_secs(2))
            .user_agent(format!("petstore ({caller})"))
            .build()
            .map_err(|error| invalid(error.to_string()))?;
        Ok(Self { client, base, name })
    }

    /// POSTs `body` to the base URL's path followed by `segments` (each percent-encoded),
    /// with `key`: the answer's body when it succeeded.
    async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        key: &str,
        simulate_failure: Option<&str>,
        body: &Value,
    ) -> Result<T, ProviderError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| {
                ProviderError::Refused(format!("{}: {} has no path", self.name, self.base))
            })?
            .pop_if_empty()
            .extend(segments);
        let mut request = self
            .client
            .post(url)
            .header(IDEMPOTENCY_KEY, key)
            .json(body);
        if let Some(failure) = simulate_failure {
            request = request.header(SIMULATE_FAILURE, failure);
        }
        let response = request.send().await.map_err(|error| {
            ProviderError::Unavailable(format!("{} did not answer: {error}", self.name))
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|error| {
            ProviderError::Unavailable(format!("{} answer was cut: {error}", self.name))
        })?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|error| {
                ProviderError::Unavailable(format!(
                    "{} answered {status} with an unreadable body ({error}): {text:.200}",
                    self.name
                ))
            });
        }
        let reason = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|body| body["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{text:.200}"));
        let message = format!("{} answered {status}: {reason}", self.name);
        if status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS
        {
            Err(ProviderError::Refused(message))
        } else {
            Err(ProviderError::Unavailable(message))
        }
    }
}

/// A payment gateway over HTTP.
pub struct HttpPaymentGateway(Endpoint);

impl HttpPaymentGateway {
    /// The gateway at `url` (the setting `key`'s value), called by `caller` (named in the
    /// `User-Agent`: `petstore (CALLER)`).
    pub fn new(key: &'static str, url: &str, caller: &str) -> Result<Self, InvalidProviderUrl> {
        Endpoint::new(key, url, "payment-service", caller).map(Self)
    }
}

#[derive(Deserialize)]
struct Charged {
    charge_id: String,
}

#[derive(Deserialize)]
struct Refunded {
    refund_id: String,
}

impl PaymentGateway for HttpPaymentGateway {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeReceipt, ProviderError> {
        let body = json!({
            "order_id": request.order_id,
            "customer_id": request.customer_id.as_str(),
            "amount_minor": request.amount.amount_minor(),
            "currency": request.amount.currency(),
        });
        let failure = request.simulate_failure.then_some("payment-service");
        let charged: Charged = self
            .0
            .post(&["charges"], &request.idempotency_key, failure, &body)
            .await?;
        Ok(ChargeReceipt {
            reference: charged.charge_id,
        })
    }

    async fn refund(&self, request: RefundRequest) -> Result<RefundReceipt, ProviderError> {
        let body = json!({
            "charge_id": request.charge_reference,
            "amount_minor": request.amount.amount_minor(),
        });
        let refunded: Refunded = self
            .0
            .post(&["refunds"], &request.idempotency_key, None, &body)
            .await?;
        Ok(RefundReceipt {
            reference: refunded.refund_id,
        })
    }
}

/// A delivery provider over HTTP.
pub struct HttpDeliveryProvider(Endpoint);

impl HttpDeliveryProvider {
    /// The provider at `url` (the setting `key`'s value), called by `caller` (named in the
    /// `User-Agent`: `petstore (CALLER)`).
    pub fn new(key: &'static str, url: &str, caller: &str) -> Result<Self, InvalidProviderUrl> {
        Endpoint::new(key, url, "delivery-service", caller).map(Self)
    }
}

#[derive(Deserialize)]
struct Booked {
    delivery_id: String,
    scheduled_for: DateTime<Utc>,
}

impl DeliveryProvider for HttpDeliveryProvider {
    async fn book(&self, request: DeliveryRequest) -> Result<DeliveryBooking, ProviderError> {
        let body = json!({
            "order_id": request.order_id,
            "pet_id": request.pet_id.as_str(),
            "customer_id": request.customer_id.as_str(),
        });
        let failure = request.simulate_failure.then_some("delivery-service");
        let booked: Booked = self
            .0
            .post(&["deliveries"], &request.idempotency_key, failure, &body)
            .await?;
        Ok(DeliveryBooking {
            reference: booked.delivery_id,
            estimated_arrival: booked.scheduled_for,
        })
    }

    async fn cancel(&self, request: CancelRequest) -> Result<(), ProviderError> {
        let path = ["deliveries", &request.booking_reference, "cancel"];
        let _: Value = self
            .0
            .post(&path, &request.idempotency_key, None, &json!({}))
            .await?;
        Ok(())
    }
}
