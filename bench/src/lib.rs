//! What the benches share: a log of whole sagas, made by cloning one real order.

pub mod saga_log;
