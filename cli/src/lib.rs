//! The `petstore` binary's library: wires the roles (command API, query API, projector,
//! saga runner) into one process over one event store. Every piece of logic lives in the
//! crate that owns it; this crate only assembles them and runs them until shutdown.
//!
//! # Layout
//! - [`Application`]: build (connect, migrate, seed, bind), then run until stopped.
//! - `wiring`: the infrastructure every role shares, and one wiring function per role.
//! - [`Role`]: which parts of the service this process runs.
//! - [`Shutdown`]: the signal that stops a running application gracefully.

pub mod chaos;
pub mod provider_simulator;
mod wiring;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use petstore_command_api::CommandApiDoc;
use petstore_event_store::database::{Database, DatabaseError};
use petstore_kafka::BusError;
use petstore_query_api::QueryApiDoc;
use petstore_redis::CacheError;
use petstore_saga::providers::{Deliveries, Payments};
use petstore_security::auth::{self, AuthError, Security};
use petstore_settings::{SecuritySettings, Settings, SettingsError};
use petstore_telemetry::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa::OpenApi;

use wiring::{Infrastructure, Wiring};

/// A part of the service a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Role {
    /// POST routes: commands become events.
    Command,
    /// GET routes over the read models and audit trails (health answers in every process).
    Query,
    /// Streams events into the read models.
    Projector,
    /// Runs the order-fulfilment sagas and their deadlines.
    Saga,
}

impl Role {
    /// Every role: what `serve` runs by default.
    pub fn all() -> BTreeSet<Role> {
        BTreeSet::from([Role::Command, Role::Query, Role::Projector, Role::Saga])
    }
}

/// The service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is refused.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// Token verification cannot be set up.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The database is unreachable or cannot be migrated.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// Seeding the demo catalog failed.
    #[error("seeding the demo catalog failed: {0}")]
    Seed(String),
    /// Redis is misconfigured.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The live settings cannot be read or recorded.
    #[error(transparent)]
    Live(#[from] petstore_live_settings::LiveReadError),
    /// Kafka is misconfigured.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A provider's URL cannot be called.
    #[error(transparent)]
    Provider(#[from] petstore_saga::providers::InvalidProviderUrl),
    /// The event log cannot be read.
    #[error(transparent)]
    Stream(#[from] petstore_event_store::stream::StreamError),
    /// A read model could not be opened, or a Redis view read or claimed.
    #[error(transparent)]
    ReadModels(#[from] petstore_read_models::ReadModelError),
    /// The Redis prefix holds another event store's views and this process cannot rebuild it.
    #[error(
        "Redis prefix {prefix:?} holds the views of another event store ({other}), not of this \
         one ({store}): {remedy}, or set redis.key_prefix to a prefix of this store's own"
    )]
    ForeignRedis {
        /// The prefix.
        prefix: String,
        /// This store's id.
        store: String,
        /// The other store's id, or `unknown`.
        other: String,
        /// What would resolve it.
        remedy: &'static str,
    },
    /// The roles do not fit the storage.
    #[error("{0}")]
    Roles(&'static str),
    /// The listener cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Stops a running [`Application`]: new connections are refused, requests in flight finish,
/// the projector commits its batch, then the pools close.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    fn new() -> Self {
        Self(watch::Sender::new(false))
    }

    /// Asks the application to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Follows whether [`Self::trigger`] was called.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Resolves once [`Self::trigger`] was called.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            let _closed = receiver.wait_for(|stopped| *stopped).await;
        }
    }
}

/// A built service, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    router: Router,
    database: Database,
    workers: Vec<JoinHandle<()>>,
    shutdown: Shutdown,
    drain: Duration,
    /// Set at the drain deadline: requests still in flight are answered 503.
    cutoff: watch::Sender<bool>,
}

impl Application {
    /// Connects the infrastructure every role shares (`wiring::Infrastructure::connect`: the
    /// store, migrated unless told not to, the live settings, Redis, Kafka, the read
    /// models), wires each of `roles` into the process, and binds the listener.
    pub async fn build(
        mut settings: Settings,
        roles: &BTreeSet<Role>,
    ) -> Result<Self, StartupError> {
        if let Some(file) = settings.ensure_development_secret()? {
            tracing::info!(file = %file.display(), "no security.jwt.secret is set: local tokens are signed with the secret kept in this file");
        }
        settings.validate()?;
        // One id for this process's saga runner, in its leases and in what it tells the
        // providers it calls.
        let runner_id = settings
            .saga
            .runner_id
            .get_or_insert_with(|| format!("saga-{}", uuid::Uuid::new_v4().simple()))
            .clone();
        let cutoff = watch::channel(false).0;
        let limits = time_limits(&settings.security, cutoff.subscribe())?;
        let shutdown = Shutdown::new();
        let mut infrastructure = Infrastructure::connect(&settings, roles, &shutdown).await?;
        let mut wiring = Wiring::new(&mut infrastructure);
        let payments = Arc::new(Payments::new(
            &settings.providers,
            &infrastructure.live,
            &runner_id,
        )?);
        let deliveries = Arc::new(Deliveries::new(
            &settings.providers,
            &infrastructure.live,
            &runner_id,
        )?);
        if roles.contains(&Role::Projector) {
            wiring.projector(&infrastructure, &settings, &shutdown);
        }
        if roles.contains(&Role::Saga) {
            wiring.saga(
                &infrastructure,
                &settings,
                payments.clone(),
                deliveries,
                &shutdown,
            );
        }
        let security = Security::build(
            &settings.security,
            settings.console.oidc.as_ref(),
            &infrastructure.database,
            &infrastructure.metrics,
            &infrastructure.policies.oidc,
        )
        .await?;
        wiring.admin(&infrastructure, &settings, &security, &shutdown);
        if roles.contains(&Role::Command) {
            wiring.command(&infrastructure, &settings, payments);
        }
        wiring
            .read_model_health(&infrastructure, roles.contains(&Role::Query))
            .await?;
        if roles.contains(&Role::Query) {
            wiring
                .query(&infrastructure, &settings, &security, &shutdown)
                .await?;
        }
        let workers = std::mem::take(&mut wiring.workers);
        let router =
            wiring.into_router(&settings, limits, security, infrastructure.metrics.clone());

        let address = settings.http.listen;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartupError::Bind { address, source })?;
        Ok(Self {
            listener,
            router,
            database: infrastructure.database,
            workers,
            shutdown,
            drain: Duration::from_millis(settings.http.shutdown_drain_ms),
            cutoff,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |address| address.port())
    }

    /// A handle that stops the application.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Serves until the shutdown handle fires; then stops accepting, lets the requests in
    /// flight finish within `http.shutdown_drain_ms` (closing what is left after it), lets the
    /// projectors and the saga runner finish and commit their batch, and stops.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        // Small writes (an SSE event, a WebSocket frame) go out at once: with Nagle's
        // algorithm on, each waited for the client's delayed ACK of the one before (~40 ms).
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY could not be set");
            }
        });
        let serving = axum::serve(listener, service).with_graceful_shutdown(self.shutdown.wait());
        let serving = std::future::IntoFuture::into_future(serving);
        tokio::pin!(serving);
        let drained = {
            let (stopping, drain) = (self.shutdown.wait(), self.drain);
            async move {
                stopping.await;
                tokio::time::sleep(drain).await;
            }
        };
        let result = tokio::select! {
            served = &mut serving => served.map_err(StartupError::Serve),
            () = drained => {
                tracing::warn!(
                    drain_ms = self.drain.as_millis() as u64,
                    "requests still in flight at the drain deadline are answered 503"
                );
                self.cutoff.send_replace(true);
                serving.await.map_err(StartupError::Serve)
            }
        };
        // Stop the projector and the saga runner too when the server ended for another
        // reason; each finishes the batch it is handling.
        self.shutdown.trigger();
        for worker in self.workers {
            if let Err(error) = worker.await {
                tracing::error!(%error, "a background task failed");
            }
        }
        self.database.close().await;
        result
    }
}

/// The routes' time limits, each configured route checked against the routes served.
fn time_limits(
    settings: &SecuritySettings,
    cutoff: watch::Receiver<bool>,
) -> Result<petstore_web::TimeLimits, SettingsError> {
    let timeouts = petstore_web::TimeLimits::new(settings, cutoff);
    let document = openapi_document();
    for route in timeouts.routes() {
        let served = route.split_once(' ').is_some_and(|(method, path)| {
            document.paths.paths.get(path).is_some_and(|item| {
                let operation = match method {
                    "GET" => &item.get,
                    "POST" => &item.post,
                    "PUT" => &item.put,
                    "DELETE" => &item.delete,
                    "PATCH" => &item.patch,
                    _ => &None,
                };
                operation.is_some()
            })
        });
        if !served {
            return Err(SettingsError::invalid(
                format!("security.route_timeouts_ms.{route:?}"),
                "no such route (see GET /petstore-domain/openapi.json for the routes)",
            ));
        }
    }
    Ok(timeouts)
}

/// The routes every process serves besides the command and query APIs.
#[derive(utoipa::OpenApi)]
#[openapi(paths(openapi, serve_metrics))]
struct ServiceApiDoc;

/// The OpenAPI 3.1 document of every route (the health routes also answer at the root, as
/// `/health`, `/health/live` and `/health/ready`, for probes).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut document = CommandApiDoc::openapi();
    document.merge(QueryApiDoc::openapi());
    document.merge(petstore_web::health::HealthApiDoc::openapi());
    document.merge(ServiceApiDoc::openapi());
    document.merge(petstore_security::auth::login::LoginApiDoc::openapi());
    document.merge(petstore_admin_api::openapi());
    auth::describe_security(&mut document);
    document.info.title = "Petstore order platform".to_owned();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    document.info.description = Some(
        "Event-sourced petstore: orders become events; read models serve queries. Every error \
         is application/problem+json with a correlation_id."
            .to_owned(),
    );
    document
}

/// Prometheus metrics in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Every metric", body = String, content_type = "application/openmetrics-text"))
)]
async fn serve_metrics(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// This document.
#[utoipa::path(
    get,
    path = "/petstore-domain/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document of every route", body = Object))
)]
async fn openapi() -> petstore_web::Json<utoipa::openapi::OpenApi> {
    petstore_web::Json(openapi_document())
}
