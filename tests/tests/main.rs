//! Black-box tests of the whole service against real Postgres, Redis, Kafka, Prometheus
//! and an OpenID Provider.
//!
//! One test binary, one module per file: each file used to be a binary of its own, and
//! every one of them linked the whole service (the build compiled and linked it 29 times).
//! nextest still runs each test in a process of its own.

mod api;
mod architecture;
mod breakers;
mod console;
mod console_sign_in;
mod event_store;
mod fencing;
mod kafka;
mod leases;
mod live_settings;
mod observability;
mod oidc_provider;
mod order_updates;
mod poison;
mod protection;
mod providers;
mod read_after_accept;
mod redis;
mod replay;
mod roles;
mod saga;
mod security;
mod snapshot;
mod upcasting;
