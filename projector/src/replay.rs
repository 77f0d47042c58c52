//! Republishing the log to Kafka: every event after a position, published again (consumers
//! deduplicate by event id). Rebuilding the read models and Redis's views is
//! `petstore_read_models::rebuild`'s.

use std::time::Instant;

use petstore_event_store::database::Database;
use petstore_event_store::replay::{fold_log, FoldError};
use petstore_kafka::{BusError, InFlight, KafkaBus, Trace};

pub use petstore_event_store::replay::ReplayReport;

/// Republishing failed.
#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    /// Kafka failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Reading the log failed.
    #[error(transparent)]
    Read(#[from] FoldError),
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
) -> Result<ReplayReport, RepublishError> {
    let started = Instant::now();
    if !dry_run {
        bus.ensure_topics().await?;
    }
    let in_flight = tokio::sync::Mutex::new(InFlight::new(bus.clone()));
    let in_flight = &in_flight;
    let folded = fold_log(
        database,
        batch_size,
        dry_run,
        progress,
        |batch| async move {
            let selected: Vec<_> = batch
                .into_iter()
                .filter(|event| event.position.global_position > from)
                .collect();
            in_flight.lock().await.push(&selected, Trace::Link).await?;
            Ok::<_, RepublishError>(selected.len() as u64)
        },
    )
    .await?;
    in_flight.lock().await.acknowledged(true).await?;
    Ok(ReplayReport {
        events: folded.read,
        applied: folded.applied,
        elapsed: started.elapsed(),
    })
}
