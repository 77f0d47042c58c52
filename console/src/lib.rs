//! The operator console at `/petstore-domain/console/`: server-rendered pages that answer
//! "what happened to this order, and what is it waiting for?" without psql or a Kafka
//! client. Served by every process with the query role; admins only.
//!
//! Owns the console's routes, pages (compile-time, auto-escaping askama templates) and its
//! static files. Must not hold what it shows: orders are listed by `petstore-read-models`
//! ([`petstore_read_models::listing`]), timelines folded there
//! ([`petstore_read_models::timeline`]); the session cookie, CSRF tokens and the
//! admin-only rule are `petstore-security`'s ([`petstore_security::auth::console`]).
//!
//! Every page works without JavaScript; htmx and its SSE extension are vendored in
//! `assets/` (pinned, their hashes checked by a test) and served from the binary. Every
//! response carries a strict `Content-Security-Policy` (the guard sets it): no inline
//! script or style anywhere.
//!
//! # Layout
//! - `session`: the login page, logging in and out, the session of a page (its CSRF token).
//! - `sign_in`: signing in at the identity provider (`console.oidc`) and coming back.
//! - `orders`: the orders list (filters in the URL, keyset paging).
//! - `order`: one order's timeline, grouped by saga step and in full, and its JSON.
//! - [`live`]: the order page's changing part over Server-Sent Events.
//! - `dead_letters`: the dead letters, retried or skipped one or many at once.
//! - `flags`: the feature flags (toggled at the version shown) and the circuit breakers.
//! - `audit`: what operators did through the console.
//! - `tail`: the stream's live tail.
//! - `projections`: where each subscriber of the stream stands, and the saga partitions.
//! - [`replay`]: a projection's dry run, then its replay, with live progress.
//! - `actions`: how every write is checked (CSRF, `console.read_only`) and recorded as an
//!   operator action.
//! - [`assets`]: the embedded static files.

use askama::Template;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use petstore_event_store::database::Database;
use petstore_event_store::store::EventStore;
use petstore_live_settings::Live;
use petstore_read_models::ReadModels;
use petstore_resilience::Policies;
use petstore_security::auth::console::{CONSOLE_PREFIX, OIDC_START};
use petstore_security::auth::Security;
use petstore_settings::{ConsoleSettings, CONSOLE_OIDC_CALLBACK};
use petstore_web::Problem;

mod actions;
pub mod assets;
mod audit;
mod dead_letters;
mod flags;
pub mod live;
mod order;
mod orders;
mod projections;
pub mod replay;
mod session;
mod sign_in;
mod tail;

/// What the console's pages read.
#[derive(Clone)]
pub struct ConsoleState {
    /// The event store's database (timelines, stuck orders, dead letters).
    pub database: Database,
    /// The event store (operator actions are recorded in it).
    pub store: EventStore,
    /// The live settings (the flags).
    pub live: Live,
    /// This process's dependencies' policies (their breakers).
    pub policies: Policies,
    /// The read models (the orders list).
    pub read_models: ReadModels,
    /// Logins and CSRF tokens.
    pub security: Security,
    /// The console's settings.
    pub settings: ConsoleSettings,
    /// The live pages' streams open, by subject.
    pub streams: live::Streams,
    /// This process's replay, under way or the last one.
    pub replays: replay::Replays,
    /// True once the process is shutting down: every live stream ends.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

/// Every console route, with its state applied.
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route(
            CONSOLE_PREFIX,
            get(|| async { Redirect::permanent(&format!("{CONSOLE_PREFIX}/")) }),
        )
        .route(&format!("{CONSOLE_PREFIX}/"), get(orders::page))
        .route(&format!("{CONSOLE_PREFIX}/orders"), get(orders::page))
        .route(
            &format!("{CONSOLE_PREFIX}/orders/{{order_id}}"),
            get(order::page),
        )
        .route(
            &format!("{CONSOLE_PREFIX}/orders/{{order_id}}/timeline.json"),
            get(order::download),
        )
        .route(
            &format!("{CONSOLE_PREFIX}/orders/{{order_id}}/live"),
            get(live::stream),
        )
        .route(
            &format!("{CONSOLE_PREFIX}/login"),
            get(session::login_page).post(session::log_in),
        )
        .route(OIDC_START, get(sign_in::start))
        .route(CONSOLE_OIDC_CALLBACK, get(sign_in::callback))
        .route(&format!("{CONSOLE_PREFIX}/logout"), post(session::log_out))
        .route(
            &format!("{CONSOLE_PREFIX}/dead-letters"),
            get(dead_letters::page).post(dead_letters::act),
        )
        .route(&format!("{CONSOLE_PREFIX}/flags"), get(flags::page))
        .route(
            &format!("{CONSOLE_PREFIX}/flags/{{flag}}"),
            post(flags::toggle),
        )
        .route(
            &format!("{CONSOLE_PREFIX}/breakers/{{dependency}}"),
            post(flags::force),
        )
        .route(&format!("{CONSOLE_PREFIX}/audit"), get(audit::page))
        .route(&format!("{CONSOLE_PREFIX}/tail"), get(tail::page))
        .route(
            &format!("{CONSOLE_PREFIX}/projections"),
            get(projections::page),
        )
        .route(
            &format!("{CONSOLE_PREFIX}/replay"),
            get(replay::page).post(replay::start),
        )
        .route(&format!("{CONSOLE_PREFIX}/replay/live"), get(replay::live))
        .route(&format!("{CONSOLE_PREFIX}/tail/live"), get(tail::live))
        .route(
            &format!("{CONSOLE_PREFIX}/assets/{{file}}"),
            get(assets::serve),
        )
        .with_state(state)
}

/// `template` rendered as an HTML page.
fn html(template: &impl Template) -> Response {
    match template.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            body,
        )
            .into_response(),
        Err(error) => Problem::internal(&error).into_response(),
    }
}

/// `text` encoded as a query's value.
fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// An amount for a person: `1200.00 USD`.
fn money(amount: &petstore_read_models::MoneyView) -> String {
    format!(
        "{}.{:02} {}",
        amount.amount_minor / 100,
        amount.amount_minor.rem_euclid(100),
        amount.currency
    )
}

/// What every page's frame shows: who is signed in, the form token of its logout button.
pub(crate) struct Frame {
    /// Who is signed in.
    pub(crate) subject: String,
    /// The CSRF token of the page's forms.
    pub(crate) csrf: String,
    /// The page's title.
    pub(crate) title: String,
}
