//! Value types. Each is parsed once at the edge; holding one is proof it is valid.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;

/// Namespace of the UUIDv5 ids derived from idempotency keys.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1e_0b6c_58a4_4c1e_9a3e_2d7b_0c5f_1a90);

/// Identifies an order (and the payment and delivery that belong to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A fresh id: a UUIDv7 (its first 48 bits the time, the rest random), so ids made one
    /// after another sit side by side in every index keyed by them (the events' aggregate key,
    /// the order views), instead of dirtying a random page of each per order.
    pub fn random() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id an order gets when a client sends an `Idempotency-Key`: the same subject and key
    /// always give the same id, so a retried request lands on the same aggregate.
    pub fn from_idempotency_key(subject: &str, key: &str) -> Self {
        let mut name = Vec::with_capacity(subject.len() + key.len() + 1);
        name.extend_from_slice(subject.as_bytes());
        name.push(0);
        name.extend_from_slice(key.as_bytes());
        Self(Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, &name))
    }

    /// Parses the canonical hyphenated UUID form.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        Uuid::try_parse(input)
            .map(Self)
            .map_err(|_| DomainError::validation("order_id", "must be a UUID"))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(formatter)
    }
}

fn is_slug(input: &str, max_len: usize) -> bool {
    !input.is_empty()
        && input.len() <= max_len
        && input
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !input.starts_with('-')
        && !input.ends_with('-')
}

/// Identifies a pet: a lower-case slug such as `golden-retriever-001`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PetId(String);

impl PetId {
    /// Longest accepted pet id.
    pub const MAX_LEN: usize = 64;

    /// Accepts 1 to 64 characters of `a-z`, `0-9` and inner hyphens.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        if is_slug(input, Self::MAX_LEN) {
            Ok(Self(input.to_owned()))
        } else {
            Err(DomainError::validation(
                "pet_id",
                "must be 1 to 64 characters of a-z, 0-9 and inner hyphens",
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PetId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Identifies a customer, as the client names it (`customer-001`, an e-mail address, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    /// Longest accepted customer id.
    pub const MAX_LEN: usize = 128;

    /// Accepts 1 to 128 characters of ASCII letters, digits and `-_.@+`.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let valid = !input.is_empty()
            && input.len() <= Self::MAX_LEN
            && input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b));
        if valid {
            Ok(Self(input.to_owned()))
        } else {
            Err(DomainError::validation(
                "customer_id",
                "must be 1 to 128 characters of letters, digits and -_.@+",
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Free-text instructions a customer attaches to an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SpecialInstructions(String);

impl SpecialInstructions {
    /// Longest accepted text, in characters.
    pub const MAX_CHARS: usize = 500;

    /// Accepts up to 500 characters without control characters other than newlines.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        if input.chars().count() > Self::MAX_CHARS {
            return Err(DomainError::validation(
                "special_instructions",
                "must be at most 500 characters",
            ));
        }
        if input.chars().any(|c| c.is_control() && c != '\n') {
            return Err(DomainError::validation(
                "special_instructions",
                "must not contain control characters",
            ));
        }
        Ok(Self(input.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The kind of animal; browse filters on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PetCategory {
    /// Dogs.
    Dog,
    /// Cats.
    Cat,
    /// Birds.
    Bird,
    /// Fish.
    Fish,
    /// Reptiles.
    Reptile,
}

impl PetCategory {
    /// Every category, in display order.
    pub const ALL: [PetCategory; 5] = [Self::Dog, Self::Cat, Self::Bird, Self::Fish, Self::Reptile];

    /// Parses the lower-case name (`dog`, `cat`, `bird`, `fish`, `reptile`).
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|category| category.as_str() == input)
            .ok_or_else(|| {
                DomainError::validation("category", "must be one of dog, cat, bird, fish, reptile")
            })
    }

    /// The lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Dog => "dog",
            Self::Cat => "cat",
            Self::Bird => "bird",
            Self::Fish => "fish",
            Self::Reptile => "reptile",
        }
    }
}

/// An amount of money: a non-negative integer number of minor units (cents) and an ISO 4217
/// currency code. There are no floats anywhere near money.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// `amount_minor` minor units of `currency`; refuses negative amounts.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, DomainError> {
        if amount_minor < 0 {
            return Err(DomainError::validation("amount", "must not be negative"));
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// US dollars, the demo store's currency.
    pub fn usd(amount_minor: i64) -> Result<Self, DomainError> {
        Self::new(amount_minor, Currency::USD)
    }

    /// The amount in minor units.
    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }
}

impl fmt::Display for Money {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}.{:02} {}",
            self.amount_minor / 100,
            self.amount_minor % 100,
            self.currency
        )
    }
}

/// An ISO 4217 currency code: three upper-case ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// US dollars.
    pub const USD: Currency = Currency(*b"USD");

    /// Parses three upper-case ASCII letters.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        match input.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Self([*a, *b, *c])),
            _ => Err(DomainError::validation(
                "currency",
                "must be three upper-case letters (ISO 4217)",
            )),
        }
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // The constructor only admits ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Currency({})", self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Currency::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Why an order was cancelled, in a form machines can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancellationReason {
    /// The pet was reserved by another order or already sold.
    PetUnavailable,
    /// The payment was declined or failed.
    PaymentFailed,
    /// The delivery could not be scheduled.
    DeliveryFailed,
    /// A saga step did not finish before its deadline.
    StepTimedOut,
    /// The inventory service failed while reserving the pet.
    InventoryFailed,
    /// The customer or an operator cancelled the order.
    Requested,
}

impl CancellationReason {
    /// Every reason.
    pub const ALL: [CancellationReason; 6] = [
        Self::PetUnavailable,
        Self::PaymentFailed,
        Self::DeliveryFailed,
        Self::StepTimedOut,
        Self::InventoryFailed,
        Self::Requested,
    ];

    /// The kebab-case name clients see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PetUnavailable => "pet-unavailable",
            Self::PaymentFailed => "payment-failed",
            Self::DeliveryFailed => "delivery-failed",
            Self::StepTimedOut => "step-timed-out",
            Self::InventoryFailed => "inventory-failed",
            Self::Requested => "requested",
        }
    }
}

/// A step of the order-fulfilment saga that can take time, fail and be compensated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaStep {
    /// Holding the pet for the order.
    Reservation,
    /// Charging the customer.
    Payment,
    /// Booking the delivery.
    Delivery,
}

impl SagaStep {
    /// Every step, in saga order.
    pub const ALL: [SagaStep; 3] = [Self::Reservation, Self::Payment, Self::Delivery];

    /// The lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Reservation => "reservation",
            Self::Payment => "payment",
            Self::Delivery => "delivery",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|step| step.as_str() == input)
            .ok_or_else(|| {
                DomainError::validation("step", "must be reservation, payment or delivery")
            })
    }
}

/// Which external service an order's saga should find failing (the seed's
/// `X-Simulate-Failure` header), so resilience can be demonstrated and tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimulatedFailure {
    /// `inventory-service`: reserving the pet fails.
    InventoryService,
    /// `payment-service`: the payment gateway fails.
    PaymentService,
    /// `delivery-service`: the delivery provider fails.
    DeliveryService,
}

impl SimulatedFailure {
    /// `inventory-service`, `payment-service` or `delivery-service`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InventoryService => "inventory-service",
            Self::PaymentService => "payment-service",
            Self::DeliveryService => "delivery-service",
        }
    }

    /// Parses `inventory-service`, `payment-service` or `delivery-service`.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        match input {
            "inventory-service" => Ok(Self::InventoryService),
            "payment-service" => Ok(Self::PaymentService),
            "delivery-service" => Ok(Self::DeliveryService),
            _ => Err(DomainError::validation(
                "X-Simulate-Failure",
                "must be inventory-service, payment-service or delivery-service",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pet_ids_are_slugs() {
        assert!(PetId::parse("golden-retriever-001").is_ok());
        for bad in ["", "-x", "x-", "Upper", "a b", "ä", &"x".repeat(65)] {
            assert!(PetId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn idempotency_keys_give_stable_distinct_ids() {
        let first = OrderId::from_idempotency_key("alice", "k1");
        assert_eq!(first, OrderId::from_idempotency_key("alice", "k1"));
        assert_ne!(first, OrderId::from_idempotency_key("bob", "k1"));
        assert_ne!(first, OrderId::from_idempotency_key("alice", "k2"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            OrderId::from_idempotency_key("ab", "c"),
            OrderId::from_idempotency_key("a", "bc")
        );
    }

    #[test]
    fn money_is_never_negative_and_prints_minor_units() {
        assert!(Money::usd(-1).is_err());
        let price = Money::usd(120_005).expect("positive");
        assert_eq!(price.to_string(), "1200.05 USD");
        let json = serde_json::to_value(price).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"amount_minor": 120005, "currency": "USD"})
        );
    }

    #[test]
    fn currency_codes_are_three_upper_case_letters() {
        assert!(Currency::parse("EUR").is_ok());
        for bad in ["eur", "EU", "EURO", "E1R"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn customer_ids_and_instructions_are_bounded() {
        assert!(CustomerId::parse("customer-001").is_ok());
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse("semi;colon").is_err());
        assert!(SpecialInstructions::parse(&"x".repeat(500)).is_ok());
        assert!(SpecialInstructions::parse(&"x".repeat(501)).is_err());
        assert!(SpecialInstructions::parse("bell\u{7}").is_err());
    }
}
