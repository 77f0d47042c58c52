//! The `petstore` binary's library: wires the roles (command API, query API, projector,
//! saga runner) into one process over one event store. Every piece of logic lives in the
//! crate that owns it; this crate only assembles them and runs them until shutdown.
//!
//! # Layout
//! - [`Application`]: build (connect, migrate, seed, bind), then run until stopped.
//! - [`Role`]: which parts of the service this process runs.
//! - [`Shutdown`]: the signal that stops a running application gracefully.

pub mod chaos;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::Method;
use axum::routing::get;
use axum::Router;
use petstore_command_api::providers::{SimulatedDeliveryProvider, SimulatedPaymentGateway};
use petstore_command_api::saga::{SagaRunner, SagaRunnerHealth};
use petstore_command_api::{CommandApiDoc, CommandState};
use petstore_platform::auth::{self, AuthError, Security};
use petstore_platform::bus::{BusError, KafkaBus};
use petstore_platform::cache::{Cache, CacheError};
use petstore_platform::database::{Database, DatabaseError};
use petstore_platform::event_store::EventStore;
use petstore_platform::health::{EventStoreHealth, HealthState};
use petstore_platform::http;
use petstore_platform::live::Live;
use petstore_platform::metrics::Metrics;
use petstore_platform::resilience::Policies;
use petstore_platform::settings::{KafkaSettings, SecuritySettings, Settings, SettingsError};
use petstore_projector::health::{
    ProjectionHealth, ReadModelsHealth, ReadModelsReadiness, RedisHealth,
};
use petstore_projector::read_models::CHECKPOINT;
use petstore_projector::{KafkaProjection, Owner, Projector, ReadModels, RedisViews};
use petstore_query_api::updates::OrderUpdates;
use petstore_query_api::{QueryApiDoc, QueryState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;

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
    Live(#[from] petstore_platform::live::LiveReadError),
    /// Kafka is misconfigured.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The event log cannot be read.
    #[error(transparent)]
    Stream(#[from] petstore_platform::stream::StreamError),
    /// A Redis view could not be read or claimed.
    #[error(transparent)]
    Projection(#[from] petstore_projector::ProjectionError),
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
    /// Connects to the store (migrating it unless told not to), seeds the demo catalog,
    /// starts the projector and binds the listener, for the given roles.
    pub async fn build(
        mut settings: Settings,
        roles: &BTreeSet<Role>,
    ) -> Result<Self, StartupError> {
        if let Some(file) = settings.ensure_development_secret()? {
            tracing::info!(file = %file.display(), "no security.jwt.secret is set: local tokens are signed with the secret kept in this file");
        }
        settings.validate()?;
        let cutoff = watch::channel(false).0;
        let limits = time_limits(&settings.security, cutoff.subscribe())?;
        let database = Database::connect(&settings.database, &settings.storage).await?;
        if settings.database.migrate_on_start {
            database.migrate().await?;
        }
        let serves_queries = roles.contains(&Role::Query);
        if matches!(database, Database::Sqlite(_))
            && serves_queries != roles.contains(&Role::Projector)
        {
            return Err(StartupError::Roles(
                "the embedded store keeps read models in memory: run the query and projector \
                 roles in the same process, or set DATABASE_URL to split them",
            ));
        }
        let metrics = Metrics::new().observe_pool(database.clone());
        let store = EventStore::new(database.clone(), settings.commands.max_conflict_retries)
            .with_metrics(metrics.clone());
        let live = Live::start(store.clone(), &settings, metrics.clone()).await?;
        if roles.contains(&Role::Command) && settings.catalog.seed_demo_pets {
            let added = petstore_command_api::catalog::seed_demo_catalog(&store)
                .await
                .map_err(|error| StartupError::Seed(error.to_string()))?;
            if added > 0 {
                tracing::info!(added, "seeded the demo catalog");
            }
        }
        let policies = Policies::new(&live, &metrics);
        let store_id = database.store_id().await?;
        let redis = match &settings.redis.url {
            Some(_) => {
                let views = RedisViews::new(
                    Cache::connect(&settings.redis, policies.redis.clone())?,
                    Duration::from_secs(settings.redis.browse_ttl_seconds),
                )
                .bound_to(&store_id)
                .with_dead_letters(database.clone());
                claim_redis(
                    &views,
                    &database,
                    &store_id,
                    roles.contains(&Role::Projector),
                )
                .await?;
                Some(views)
            }
            None => None,
        };
        let shutdown = Shutdown::new();
        let payments = Arc::new(SimulatedPaymentGateway::new(live.clone()));
        let deliveries = Arc::new(SimulatedDeliveryProvider::new(live.clone()));
        let mut workers = vec![tokio::spawn(live.clone().run(shutdown.wait()))];
        if roles.contains(&Role::Command) || roles.contains(&Role::Saga) {
            workers.push(tokio::spawn(store.clone().notify_appends(shutdown.wait())));
        }
        // The embedded store's read models live in the memory of the process serving them,
        // loaded from its snapshot; Postgres's are shared tables.
        let read_models = if serves_queries || matches!(database, Database::Postgres(_)) {
            Some(
                ReadModels::open(&database)
                    .await
                    .map_err(petstore_projector::ProjectionError::from)?,
            )
        } else {
            None
        };
        if settings.kafka.brokers.is_some()
            && (roles.contains(&Role::Projector) || roles.contains(&Role::Saga))
        {
            check_kafka_topics(&settings.kafka, &store_id).await?;
        }
        let bus = match &settings.kafka.brokers {
            Some(_) => Some(
                KafkaBus::new(&settings.kafka, &store_id, policies.kafka.clone())?
                    .with_metrics(metrics.clone()),
            ),
            None => None,
        };
        let mut health = HealthState::default();
        health.add(EventStoreHealth(database.clone()));
        health.add(petstore_platform::dead_letters::DeadLetterHealth(
            database.clone(),
        ));
        let mut own_read_models_progress = None;
        if roles.contains(&Role::Projector) {
            let mut spawn = |name: &'static str, progress: watch::Receiver<_>, task| {
                if name == CHECKPOINT {
                    own_read_models_progress = Some(progress.clone());
                }
                health.add(ProjectionHealth { name, progress });
                workers.push(tokio::spawn(task));
            };
            if let Some(read_models) = &read_models {
                let projector = Projector::new(
                    store.clone(),
                    read_models.clone(),
                    settings.projector.clone(),
                )
                .with_metrics(metrics.clone());
                spawn(
                    CHECKPOINT,
                    projector.progress(),
                    boxed(projector.run(shutdown.wait())),
                );
            }
            if let Some(redis) = &redis {
                let projector =
                    Projector::new(store.clone(), redis.clone(), settings.projector.clone())
                        .with_metrics(metrics.clone());
                spawn(
                    petstore_projector::redis_views::CHECKPOINT,
                    projector.progress(),
                    boxed(projector.run(shutdown.wait())),
                );
            }
            if let Some(bus) = &bus {
                let kafka = KafkaProjection::new(bus.clone(), database.clone());
                let projector = Projector::new(store.clone(), kafka, settings.projector.clone())
                    .with_metrics(metrics.clone());
                spawn(
                    petstore_projector::kafka::CHECKPOINT,
                    projector.progress(),
                    boxed(projector.run(shutdown.wait())),
                );
            }
        }
        if roles.contains(&Role::Saga) {
            let runner = SagaRunner::new(
                store.clone(),
                settings.saga.clone(),
                policies.clone(),
                payments.clone(),
                deliveries,
                metrics.clone(),
                live.clone(),
            );
            let runner = match bus {
                Some(_) => runner.with_kafka(settings.kafka.clone()),
                None => runner,
            };
            health.add(SagaRunnerHealth(runner.progress()));
            workers.push(tokio::spawn(runner.run(shutdown.wait())));
        }

        let security =
            Security::build(&settings.security, &database, &metrics, &policies.oidc).await?;
        workers.push(tokio::spawn(
            security.rate_limits().clone().evict_until(shutdown.wait()),
        ));
        live.apply_to(security.rate_limits().clone(), &settings);
        let mut router = Router::new()
            .merge(security.router())
            .merge(petstore_platform::live::http::router(
                live.clone(),
                policies.clone(),
            ))
            .merge(petstore_platform::dead_letters::router(database.clone()))
            .route("/petstore-domain/openapi.json", get(openapi));
        if roles.contains(&Role::Command) {
            router = router.merge(petstore_command_api::router(CommandState {
                store: store.clone(),
                live: live.clone(),
                providers: settings.providers.clone(),
                policies: policies.clone(),
                payments,
                metrics: metrics.clone(),
            }));
        }
        // On Postgres the read models are shared: they are ready once their checkpoint
        // reaches what the log held now (the demo catalog just seeded included).
        let readiness = match (&database, own_read_models_progress) {
            _ if !serves_queries => ReadModelsReadiness::NotServing,
            (Database::Postgres(_), _) => ReadModelsReadiness::SharedCheckpoint(
                petstore_platform::stream::head_position(&database).await?,
            ),
            (Database::Sqlite(_), Some(progress)) => ReadModelsReadiness::OwnProjector(progress),
            (Database::Sqlite(_), None) => ReadModelsReadiness::NotServing,
        };
        if let Some(read_models) = &read_models {
            health.add(ReadModelsHealth::new(read_models.clone(), readiness));
        }
        if let Some(redis) = &redis {
            health.add(RedisHealth(redis.clone()));
        }
        if let (true, Some(read_models)) = (roles.contains(&Role::Query), read_models) {
            let updates = OrderUpdates::new(
                read_models.clone(),
                settings.http.order_updates.clone(),
                metrics.clone(),
            );
            workers.push(tokio::spawn(updates.clone().run(shutdown.wait())));
            router = router.merge(petstore_query_api::router(QueryState {
                updates,
                security_audit: security.audit().clone(),
                read_models,
                redis,
                database: database.clone(),
                consistency_wait: Duration::from_millis(settings.http.consistency_wait_ms),
                metrics: metrics.clone(),
                live: live.clone(),
                dead_letters: Default::default(),
            }));
        }
        // Load shedding covers the API; health and metrics answer however busy it is.
        let limit = settings.http.max_concurrent_requests;
        let shed_metrics = metrics.clone();
        let router = router
            .layer(
                tower::ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(move |_: tower::BoxError| {
                        shed_metrics.requests_shed.inc();
                        std::future::ready(http::Problem::overloaded(limit))
                    }))
                    .layer(tower::load_shed::LoadShedLayer::new())
                    .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limit)),
            )
            .merge(petstore_platform::health::router(health))
            .route("/metrics", get(serve_metrics).with_state(metrics.clone()))
            .fallback(http::not_found);
        let router = router
            .layer(DefaultBodyLimit::max(settings.http.body_limit_bytes))
            .layer(CatchPanicLayer::new())
            .layer(axum::middleware::from_fn_with_state(
                limits,
                http::time_limit,
            ))
            .layer(axum::middleware::from_fn_with_state(security, auth::guard))
            .layer(tower::util::option_layer(cors(&settings.security)))
            .layer(axum::middleware::from_fn_with_state(metrics, http::observe));

        let address = settings.http.listen;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartupError::Bind { address, source })?;
        Ok(Self {
            listener,
            router,
            database,
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

/// Makes sure the Redis prefix holds this event store's views before anything reads it:
/// another store's are deleted and rebuilt by a process that projects (holding the
/// projection's lock), and refused by one that does not.
/// Refuses topics that hold another event store's events. A broker that does not answer
/// never stops the service: the relay checks the topics again before it publishes, and the
/// saga runner skips any message not of this store.
async fn check_kafka_topics(settings: &KafkaSettings, store_id: &str) -> Result<(), StartupError> {
    match petstore_platform::bus::check_topic_owner(settings, store_id).await {
        Ok(()) => Ok(()),
        Err(error @ BusError::ForeignTopics { .. }) => Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "Kafka is unreachable: its topics are checked to be this store's when the relay connects");
            Ok(())
        }
    }
}

async fn claim_redis(
    views: &RedisViews,
    database: &Database,
    store: &str,
    projects: bool,
) -> Result<(), StartupError> {
    let owner = match views.owner(store).await {
        Ok(owner) => owner,
        Err(error) => {
            // Redis down never stops the service: the projection claims the prefix when it
            // connects, before it writes anything.
            tracing::warn!(%error, "Redis is unreachable: its views are checked to be this store's when the Redis projection connects");
            return Ok(());
        }
    };
    let other = match &owner {
        Owner::This => return Ok(()),
        Owner::Nobody if !projects => return Ok(()),
        Owner::Nobody => None,
        Owner::Another(other) => Some(other.clone().unwrap_or_else(|| "unknown".to_owned())),
    };
    let foreign = |remedy| StartupError::ForeignRedis {
        prefix: views.cache().prefix().to_owned(),
        store: store.to_owned(),
        other: other.clone().unwrap_or_default(),
        remedy,
    };
    if !projects {
        return Err(foreign(
            "start a process with the projector role to rebuild it",
        ));
    }
    let lock = database
        .try_lock(&format!(
            "projection:{}",
            petstore_projector::redis_views::CHECKPOINT
        ))
        .await?;
    if lock.is_none() {
        if other.is_none() {
            // Empty, and the active projector of this store fills it.
            return Ok(());
        }
        return Err(foreign(
            "the projector of this store that holds the Redis projection has not claimed it; restart it",
        ));
    }
    if let Owner::Another(_) = views.claim(store).await? {
        tracing::warn!(
            prefix = views.cache().prefix(),
            other = other.as_deref().unwrap_or_default(),
            store,
            "the Redis prefix held another event store's views: deleted; rebuilding from this store's log"
        );
    }
    Ok(())
}

/// The routes' time limits, each configured route checked against the routes served.
fn time_limits(
    settings: &SecuritySettings,
    cutoff: watch::Receiver<bool>,
) -> Result<http::TimeLimits, SettingsError> {
    let timeouts = http::TimeLimits::new(settings, cutoff);
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

/// CORS: off (no layer, no headers at all) unless origins are configured.
fn cors(settings: &SecuritySettings) -> Option<CorsLayer> {
    if settings.cors_allowed_origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = settings
        .cors_allowed_origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("x-consistency-token"),
        ])
        .expose_headers([
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("x-consistency-token"),
            header::RETRY_AFTER,
            header::LOCATION,
        ]);
    Some(layer)
}

type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn boxed(task: impl std::future::Future<Output = ()> + Send + 'static) -> Task {
    Box::pin(task)
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
    document.merge(petstore_platform::health::HealthApiDoc::openapi());
    document.merge(ServiceApiDoc::openapi());
    document.merge(petstore_platform::auth::login::LoginApiDoc::openapi());
    document.merge(petstore_platform::live::http::LiveApiDoc::openapi());
    document.merge(petstore_platform::dead_letters::DeadLettersApiDoc::openapi());
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
async fn openapi() -> http::Json<utoipa::openapi::OpenApi> {
    http::Json(openapi_document())
}
