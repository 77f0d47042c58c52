//! Tests of the real `petstore` binary, started as a process.
//!
//! One test binary, one module per file: each file used to be a binary of its own, and
//! every one of them linked the whole service (the build compiled and linked it 29 times).
//! nextest still runs each test in a process of its own.

mod common;

mod audit;
mod config;
mod dead_letters;
mod explain;
mod first_run;
mod live_config;
mod observability;
mod ownership;
mod partitions;
mod postgres;
mod providers;
mod security;
