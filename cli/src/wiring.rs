//! How [`crate::Application::build`] assembles a process: [`Infrastructure::connect`] connects
//! what every role shares (the store, live settings, policies, Redis, Kafka, the read
//! models), then one method of [`Wiring`] per role adds its background tasks, health checks
//! and routes, and [`Wiring::into_router`] puts the edge's layers around them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::Method;
use axum::routing::get;
use axum::Router;
use petstore_admin_api::AdminState;
use petstore_command_api::CommandState;
use petstore_console::ConsoleState;
use petstore_domain::partition::Partitions;
use petstore_event_store::database::Database;
use petstore_event_store::records::{self, Recorder};
use petstore_event_store::store::EventStore;
use petstore_event_store::subscription::try_become_active;
use petstore_kafka::{BusError, KafkaBus};
use petstore_live_settings::Live;
use petstore_projector::health::{
    ProjectionHealth, ReadModelsHealth, ReadModelsReadiness, RedisHealth,
};
use petstore_projector::{KafkaProjection, Projector};
use petstore_query_api::updates::OrderUpdates;
use petstore_query_api::QueryState;
use petstore_read_models::store::CHECKPOINT;
use petstore_read_models::{Owner, ReadModels, RedisViews};
use petstore_redis::Cache;
use petstore_resilience::Policies;
use petstore_saga::providers::{Deliveries, Payments};
use petstore_saga::{SagaRunner, SagaRunnerHealth};
use petstore_security::auth::{self, Security};
use petstore_settings::{KafkaSettings, SecuritySettings, Settings};
use petstore_telemetry::metrics::Metrics;
use petstore_web::health::{EventStoreHealth, HealthState};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{Role, Shutdown, StartupError};

/// How often the timeline records past `timeline.retention_hours` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// What every role of a process shares, connected once.
pub(crate) struct Infrastructure {
    pub(crate) database: Database,
    pub(crate) metrics: Metrics,
    pub(crate) store: EventStore,
    pub(crate) live: Live,
    pub(crate) policies: Policies,
    /// Redis's views, when `redis.url` is set (claimed for this store).
    pub(crate) redis: Option<RedisViews>,
    /// Kafka, when `kafka.brokers` is set.
    pub(crate) bus: Option<KafkaBus>,
    /// The store's saga partitions.
    pub(crate) partitions: Partitions,
    /// The read models, where this process serves or projects them.
    pub(crate) read_models: Option<ReadModels>,
    /// The live settings' follower and the appends' notifications, started as soon as the
    /// store is reached (before the read models load).
    workers: Vec<JoinHandle<()>>,
}

impl Infrastructure {
    /// Connects to the store (migrating it unless told not to), starts the live settings
    /// (and, when this process appends, the appends' notifications) until `shutdown`, seeds
    /// the demo catalog (command role), connects Redis and Kafka when configured, refusing
    /// ones that hold another store's data, and opens the read models.
    pub(crate) async fn connect(
        settings: &Settings,
        roles: &BTreeSet<Role>,
        shutdown: &Shutdown,
    ) -> Result<Self, StartupError> {
        let database = Database::connect(&settings.database, &settings.storage).await?;
        if settings.database.migrate_on_start {
            database.migrate().await?;
        }
        let partitions = database
            .saga_partitions(settings.saga.partitions()?)
            .await?;
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
        let (recorder, record_writer) = Recorder::new(database.clone());
        let store = EventStore::new(database.clone(), settings.commands.max_conflict_retries)
            .with_metrics(metrics.clone())
            .with_recorder(recorder);
        let live = Live::start(store.clone(), settings, metrics.clone()).await?;
        if roles.contains(&Role::Command) && settings.catalog.seed_demo_pets {
            let added = petstore_command_api::catalog::seed_demo_catalog(&store)
                .await
                .map_err(|error| StartupError::Seed(error.to_string()))?;
            if added > 0 {
                tracing::info!(added, "seeded the demo catalog");
            }
        }
        let policies = live.policies(&metrics);
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
        let mut workers = vec![
            tokio::spawn(live.clone().run(shutdown.wait())),
            tokio::spawn(record_writer.run(shutdown.wait())),
            tokio::spawn(records::prune_every(
                database.clone(),
                Duration::from_secs(settings.timeline.retention_hours.saturating_mul(3600)),
                PRUNE_EVERY,
                shutdown.wait(),
            )),
        ];
        if roles.contains(&Role::Command) || roles.contains(&Role::Saga) {
            workers.push(tokio::spawn(store.clone().notify_appends(shutdown.wait())));
        }
        // The embedded store's read models live in the memory of the process serving them,
        // loaded from its snapshot; Postgres's are shared tables.
        let read_models = if serves_queries || matches!(database, Database::Postgres(_)) {
            Some(ReadModels::open(&database).await?)
        } else {
            None
        };
        if settings.kafka.brokers.is_some()
            && (roles.contains(&Role::Projector) || roles.contains(&Role::Saga))
        {
            check_kafka_topics(&settings.kafka, &store_id, partitions).await?;
        }
        let bus = match &settings.kafka.brokers {
            Some(_) => Some(
                KafkaBus::new(
                    &settings.kafka,
                    &store_id,
                    partitions,
                    policies.kafka.clone(),
                )?
                .with_metrics(metrics.clone()),
            ),
            None => None,
        };
        Ok(Self {
            database,
            metrics,
            store,
            live,
            policies,
            redis,
            bus,
            partitions,
            read_models,
            workers,
        })
    }
}

/// What the roles add to a process: its background tasks, health checks and routes.
pub(crate) struct Wiring {
    pub(crate) workers: Vec<JoinHandle<()>>,
    health: HealthState,
    router: Router,
    /// The progress of this process's own read-model projection (the embedded store's
    /// readiness follows it).
    own_read_models_progress: Option<watch::Receiver<petstore_projector::ProjectorProgress>>,
}

impl Wiring {
    /// What every process runs: the infrastructure's tasks, the event store's and the dead
    /// letters' health.
    pub(crate) fn new(infrastructure: &mut Infrastructure) -> Self {
        let workers = std::mem::take(&mut infrastructure.workers);
        let mut health = HealthState::default();
        health.add(EventStoreHealth(infrastructure.database.clone()));
        health.add(petstore_event_store::dead_letters::DeadLetterHealth(
            infrastructure.database.clone(),
        ));
        Self {
            workers,
            health,
            router: Router::new(),
            own_read_models_progress: None,
        }
    }

    fn spawn_projector<P>(
        &mut self,
        name: &'static str,
        projector: Projector<P>,
        shutdown: &Shutdown,
    ) where
        P: petstore_projector::Projection + Send + Sync + 'static,
    {
        let progress = projector.progress();
        if name == CHECKPOINT {
            self.own_read_models_progress = Some(progress.clone());
        }
        self.health.add(ProjectionHealth { name, progress });
        self.workers
            .push(tokio::spawn(projector.run(shutdown.wait())));
    }

    /// The projector role: the read models, Redis's views and the Kafka relay, each from
    /// its own checkpoint.
    pub(crate) fn projector(
        &mut self,
        infrastructure: &Infrastructure,
        settings: &Settings,
        shutdown: &Shutdown,
    ) {
        let store = &infrastructure.store;
        let metrics = &infrastructure.metrics;
        if let Some(read_models) = &infrastructure.read_models {
            let projector = Projector::new(
                store.clone(),
                read_models.clone(),
                settings.projector.clone(),
            )
            .with_metrics(metrics.clone());
            self.spawn_projector(CHECKPOINT, projector, shutdown);
        }
        if let Some(redis) = &infrastructure.redis {
            let projector =
                Projector::new(store.clone(), redis.clone(), settings.projector.clone())
                    .with_metrics(metrics.clone());
            self.spawn_projector(petstore_read_models::redis::CHECKPOINT, projector, shutdown);
        }
        if let Some(bus) = &infrastructure.bus {
            let kafka = KafkaProjection::new(bus.clone(), infrastructure.database.clone());
            let projector = Projector::new(store.clone(), kafka, settings.projector.clone())
                .with_metrics(metrics.clone());
            self.spawn_projector(petstore_projector::kafka::CHECKPOINT, projector, shutdown);
        }
    }

    /// The saga role: the runner, following the stream or (with Kafka) the topics.
    pub(crate) fn saga(
        &mut self,
        infrastructure: &Infrastructure,
        settings: &Settings,
        payments: Arc<Payments>,
        deliveries: Arc<Deliveries>,
        shutdown: &Shutdown,
    ) {
        let runner = SagaRunner::new(
            infrastructure.store.clone(),
            settings.saga.clone(),
            infrastructure.policies.clone(),
            payments,
            deliveries,
            infrastructure.metrics.clone(),
            infrastructure.live.clone(),
        );
        let runner = match infrastructure.bus {
            Some(_) => runner.with_kafka(settings.kafka.clone(), infrastructure.partitions),
            None => runner,
        };
        self.health.add(SagaRunnerHealth(runner.progress()));
        self.workers.push(tokio::spawn(runner.run(shutdown.wait())));
    }

    /// What every process serves: login and the security trail's routes, the live settings'
    /// and the dead letters' admin routes, the OpenAPI document; rate limits follow the
    /// live settings.
    pub(crate) fn admin(
        &mut self,
        infrastructure: &Infrastructure,
        settings: &Settings,
        security: &Security,
        shutdown: &Shutdown,
    ) {
        self.workers.push(tokio::spawn(
            security.rate_limits().clone().evict_until(shutdown.wait()),
        ));
        let rate_limits = security.rate_limits().clone();
        infrastructure
            .live
            .apply_to(move |limits| rate_limits.replace(limits), settings);
        let router = std::mem::take(&mut self.router)
            .merge(security.router())
            .merge(petstore_admin_api::router(AdminState {
                live: infrastructure.live.clone(),
                policies: infrastructure.policies.clone(),
                database: infrastructure.database.clone(),
                security_audit: security.audit().clone(),
            }))
            .route("/petstore-domain/openapi.json", get(crate::openapi));
        self.router = router;
    }

    /// The command role: the POST routes.
    pub(crate) fn command(
        &mut self,
        infrastructure: &Infrastructure,
        settings: &Settings,
        payments: Arc<Payments>,
    ) {
        self.router =
            std::mem::take(&mut self.router).merge(petstore_command_api::router(CommandState {
                store: infrastructure.store.clone(),
                live: infrastructure.live.clone(),
                providers: settings.providers.clone(),
                policies: infrastructure.policies.clone(),
                payments,
                metrics: infrastructure.metrics.clone(),
            }));
    }

    /// The read models' and Redis's health. On Postgres the read models are shared: they
    /// are ready once their checkpoint reaches what the log held now (the demo catalog just
    /// seeded included); the embedded store's follow this process's own projector.
    pub(crate) async fn read_model_health(
        &mut self,
        infrastructure: &Infrastructure,
        serves_queries: bool,
    ) -> Result<(), StartupError> {
        let database = &infrastructure.database;
        let readiness = match (database, self.own_read_models_progress.take()) {
            _ if !serves_queries => ReadModelsReadiness::NotServing,
            (Database::Postgres(_), _) => ReadModelsReadiness::SharedCheckpoint(
                petstore_event_store::stream::head_position(database).await?,
            ),
            (Database::Sqlite(_), Some(progress)) => ReadModelsReadiness::OwnProjector(progress),
            (Database::Sqlite(_), None) => ReadModelsReadiness::NotServing,
        };
        if let Some(read_models) = &infrastructure.read_models {
            self.health
                .add(ReadModelsHealth::new(read_models.clone(), readiness));
        }
        if let Some(redis) = &infrastructure.redis {
            self.health.add(RedisHealth(redis.clone()));
        }
        Ok(())
    }

    /// The query role: the GET routes, the live order updates and the operator console.
    pub(crate) async fn query(
        &mut self,
        infrastructure: &Infrastructure,
        settings: &Settings,
        security: &Security,
        shutdown: &Shutdown,
    ) -> Result<(), StartupError> {
        let Some(read_models) = infrastructure.read_models.clone() else {
            return Ok(());
        };
        let progress = read_models.progress().await?;
        let metrics = &infrastructure.metrics;
        let updates = OrderUpdates::new(
            read_models.clone(),
            settings.http.order_updates.clone(),
            metrics.clone(),
        );
        self.workers
            .push(tokio::spawn(updates.clone().run(shutdown.wait())));
        self.router = std::mem::take(&mut self.router)
            .merge(petstore_console::router(ConsoleState {
                database: infrastructure.database.clone(),
                store: infrastructure.store.clone(),
                live: infrastructure.live.clone(),
                policies: infrastructure.policies.clone(),
                read_models: read_models.clone(),
                security: security.clone(),
                settings: settings.console.clone(),
                streams: Default::default(),
                replays: Default::default(),
                closing: shutdown.watch(),
            }))
            .merge(petstore_query_api::router(QueryState {
                updates,
                progress,
                read_models,
                redis: infrastructure.redis.clone(),
                database: infrastructure.database.clone(),
                consistency_wait: Duration::from_millis(settings.http.consistency_wait_ms),
                metrics: metrics.clone(),
                live: infrastructure.live.clone(),
                dead_letters: Default::default(),
            }));
        Ok(())
    }

    /// The routes with the edge around them: load shedding over the API (health and
    /// metrics answer however busy it is), body limit, panics as problems, time limits,
    /// the security guard, CORS, and outermost the request's correlation and trace.
    pub(crate) fn into_router(
        self,
        settings: &Settings,
        limits: petstore_web::TimeLimits,
        security: Security,
        metrics: Metrics,
    ) -> Router {
        let limit = settings.http.max_concurrent_requests;
        let shed_metrics = metrics.clone();
        let router = self
            .router
            .layer(
                tower::ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(move |_: tower::BoxError| {
                        shed_metrics.requests_shed.inc();
                        std::future::ready(petstore_web::Problem::overloaded(limit))
                    }))
                    .layer(tower::load_shed::LoadShedLayer::new())
                    .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limit)),
            )
            .merge(petstore_web::health::router(self.health))
            .route(
                "/metrics",
                get(crate::serve_metrics).with_state(metrics.clone()),
            )
            .fallback(petstore_web::not_found);
        router
            .layer(DefaultBodyLimit::max(settings.http.body_limit_bytes))
            .layer(CatchPanicLayer::new())
            .layer(axum::middleware::from_fn_with_state(
                limits,
                petstore_web::time_limit,
            ))
            .layer(axum::middleware::from_fn_with_state(security, auth::guard))
            .layer(tower::util::option_layer(cors(&settings.security)))
            .layer(axum::middleware::from_fn_with_state(
                metrics,
                petstore_web::observe,
            ))
    }
}

/// Refuses topics that hold another event store's events. A broker that does not answer
/// never stops the service: the relay checks the topics again before it publishes, and the
/// saga runner skips any message not of this store.
async fn check_kafka_topics(
    settings: &KafkaSettings,
    store_id: &str,
    partitions: Partitions,
) -> Result<(), StartupError> {
    match petstore_kafka::check_topics(settings, store_id, partitions).await {
        Ok(()) => Ok(()),
        Err(error @ (BusError::ForeignTopics { .. } | BusError::PartitionCount { .. })) => {
            Err(error.into())
        }
        Err(error) => {
            tracing::warn!(%error, "Kafka is unreachable: its topics are checked to be this store's when the relay connects");
            Ok(())
        }
    }
}

/// Makes sure the Redis prefix holds this event store's views before anything reads it:
/// another store's are deleted and rebuilt by a process that projects (holding the
/// projection's lock), and refused by one that does not.
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
    let lock = try_become_active(database, petstore_read_models::redis::CHECKPOINT).await?;
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
