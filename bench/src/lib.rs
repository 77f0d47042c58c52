//! What the benches share: a log of whole sagas, made by cloning one real order, and an OTLP
//! receiver.

pub mod otlp;
pub mod saga_log;
