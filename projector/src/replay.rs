//! Rebuilding projections from the event log, and republishing it to Kafka.
//!
//! A rebuild folds the whole stream into shadow copies (`*_replay` tables, `{prefix}:replay:`
//! keys) while the live read models keep serving, then swaps them in atomically (one
//! transaction renaming the tables and setting the checkpoint; one MULTI/EXEC renaming the
//! keys). It takes the projection's lock first, so it never races a running projector: stop
//! the projector role (a standby keeps waiting) while a rebuild runs.

use std::time::{Duration, Instant};

use petstore_platform::bus::{KafkaBus, Trace};
use petstore_platform::database::{Database, Fence};
use petstore_platform::http::CorrelationId;
use petstore_platform::stream::{self, StreamPosition};
use petstore_platform::telemetry;
use sqlx::PgPool;
use tracing::Instrument;

use crate::projection::{Projection, ProjectionError};
use crate::read_models::{apply_postgres, PgTables, CHECKPOINT, LIVE_TABLES};
use crate::redis_views::RedisViews;

/// A replay could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The projection is running somewhere and holds its lock.
    #[error("the {0} projection is active in a running service; stop its projector role first")]
    ProjectionActive(&'static str),
    /// The projection cannot be rebuilt here.
    #[error("{0}")]
    NotApplicable(&'static str),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Locking failed.
    #[error(transparent)]
    Lock(#[from] petstore_platform::database::DatabaseError),
    /// Folding or publishing failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// Reading the stream failed.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events read from the log.
    pub events: u64,
    /// Events applied or published (fewer than read when republishing from a position).
    pub applied: u64,
    /// How long it took.
    pub elapsed: Duration,
}

const SHADOW_TABLES: PgTables = PgTables {
    orders: "order_status_view_replay",
    pets: "pet_catalog_view_replay",
    checkpoint: None,
    notify: false,
};

/// Reads the whole stream in batches, calling `apply` on each (unless `dry_run`) and
/// `progress` with the running count of events. Stops at the head as it was when it started.
async fn fold_stream<F, Fut>(
    database: &Database,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
    mut apply: F,
) -> Result<(StreamPosition, u64, u64), ReplayError>
where
    F: FnMut(Vec<stream::RecordedEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, ReplayError>>,
{
    let head = stream::head_position(database).await?;
    let mut position = StreamPosition::START;
    let (mut read, mut applied) = (0_u64, 0_u64);
    while position < head {
        let batch = stream::read_after(database, position, batch_size).await?;
        let Some(last) = batch.last() else {
            // Events below the head are hidden by an older open transaction: wait for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        position = last.position;
        read += batch.len() as u64;
        if !dry_run {
            // A new trace per batch, linked to the events' original traces (never a child
            // of them: a replay must not re-parent history).
            let span = tracing::info_span!(
                parent: None,
                "replay",
                otel.name = "replay batch",
                events = batch.len(),
                first_position = batch.first().map_or(0, |event| event.position.global_position),
                correlation_id = %CorrelationId::generate(),
            );
            telemetry::link_to_events(&span, &batch);
            applied += apply(batch).instrument(span).await?;
        }
        progress(read);
    }
    Ok((position, read, applied))
}

/// Rebuilds the Postgres read models into shadow tables and swaps them in.
pub async fn rebuild_read_models(
    database: &Database,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let Database::Postgres(pool) = database else {
        return Err(ReplayError::NotApplicable(
            "the embedded read models live in memory and are rebuilt at every start",
        ));
    };
    let lock = database
        .try_lock(&format!("projection:{CHECKPOINT}"))
        .await?
        .ok_or(ReplayError::ProjectionActive(CHECKPOINT))?;
    if !dry_run {
        create_shadow_tables(pool).await?;
    }
    let (last, events, applied) = fold_stream(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            let last = batch.last().map(|event| event.position).unwrap_or_default();
            apply_postgres(pool, &batch, last, SHADOW_TABLES, None)
                .await
                .map_err(ProjectionError::from)?;
            Ok(batch.len() as u64)
        },
    )
    .await?;
    if !dry_run {
        swap_in_shadow_tables(pool, last, lock.fence()).await?;
    }
    Ok(ReplayReport {
        events,
        applied,
        elapsed: started.elapsed(),
    })
}

async fn create_shadow_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut transaction = petstore_platform::database::begin(pool).await?;
    for (shadow, live) in [
        (SHADOW_TABLES.orders, LIVE_TABLES.orders),
        (SHADOW_TABLES.pets, LIVE_TABLES.pets),
    ] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
            .execute(&mut *transaction)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {shadow} (LIKE {live} INCLUDING ALL)"
        ))
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await
}

async fn swap_in_shadow_tables(
    pool: &PgPool,
    last: StreamPosition,
    fence: Option<&Fence>,
) -> Result<(), ReplayError> {
    let mut transaction = petstore_platform::database::begin(pool).await?;
    sqlx::query(&format!(
        "LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE",
        LIVE_TABLES.orders, LIVE_TABLES.pets
    ))
    .execute(&mut *transaction)
    .await?;
    for (shadow, live) in [
        (SHADOW_TABLES.orders, LIVE_TABLES.orders),
        (SHADOW_TABLES.pets, LIVE_TABLES.pets),
    ] {
        sqlx::query(&format!("DROP TABLE {live}"))
            .execute(&mut *transaction)
            .await?;
        sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {live}"))
            .execute(&mut *transaction)
            .await?;
    }
    stream::save_checkpoint_in(&mut transaction, CHECKPOINT, last, fence).await?;
    // Live order updates re-read every order they follow.
    sqlx::query("SELECT pg_notify($1, '*')")
        .bind(crate::read_models::ORDER_CHANGES_CHANNEL)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Rebuilds the Redis views under a shadow prefix and moves them over the live keys.
pub async fn rebuild_redis(
    database: &Database,
    live: &RedisViews,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let name = crate::redis_views::CHECKPOINT;
    let _lock = database
        .try_lock(&format!("projection:{name}"))
        .await?
        .ok_or(ReplayError::ProjectionActive(name))?;
    let shadow_prefix = format!("{}:replay", live.cache().prefix());
    let shadow = live.with_prefix(&shadow_prefix);
    if !dry_run {
        live.cache()
            .delete_namespace(&shadow_prefix)
            .await
            .map_err(ProjectionError::from)?;
    }
    let shadow_ref = &shadow;
    let (_, events, applied) = fold_stream(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            shadow_ref.apply(&batch, None).await?;
            Ok(batch.len() as u64)
        },
    )
    .await?;
    if !dry_run {
        live.cache()
            .adopt_namespace(
                &shadow_prefix,
                &RedisViews::VIEW_PATTERNS,
                &[RedisViews::GENERATION],
            )
            .await
            .map_err(ProjectionError::from)?;
        live.mark_owned(&database.store_id().await?).await?;
    }
    Ok(ReplayReport {
        events,
        applied,
        elapsed: started.elapsed(),
    })
}

/// Publishes every event after global position `from` to Kafka again (consumers deduplicate
/// by event id). The Kafka projection's checkpoint is left alone.
pub async fn republish(
    database: &Database,
    bus: &KafkaBus,
    from: i64,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    if !dry_run {
        bus.ensure_topics().await.map_err(ProjectionError::from)?;
    }
    let (_, events, applied) = fold_stream(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            let selected: Vec<_> = batch
                .into_iter()
                .filter(|event| event.position.global_position > from)
                .collect();
            bus.publish(&selected, Trace::Link)
                .await
                .map_err(ProjectionError::from)?;
            Ok(selected.len() as u64)
        },
    )
    .await?;
    Ok(ReplayReport {
        events,
        applied,
        elapsed: started.elapsed(),
    })
}
