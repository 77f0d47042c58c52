//! Reading the whole log once, in batches, to rebuild something from it (a read model, Redis's
//! views) or to publish it again: [`fold_log`].

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use crate::database::Database;
use crate::stream::{self, RecordedEvent, StreamError, StreamPosition};

/// How many batches a replay reads ahead of the one it applies.
const READ_AHEAD: usize = 4;

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

/// What [`fold_log`] read and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    /// The last event read (the head as it was when the fold started).
    pub last: StreamPosition,
    /// Events read.
    pub read: u64,
    /// What the batches' `apply` said they applied.
    pub applied: u64,
}

/// Reading the log failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// The stream could not be read.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Reading the stream ended before the head (the reading task failed).
    #[error("reading the stream stopped after global position {0}, before the head")]
    ReadStopped(i64),
}

/// Reads the whole stream in batches of `batch_size`, calling `apply` on each (unless
/// `dry_run`: then it only counts) and `progress` with the running count of events. Stops
/// at the head as it was when it started. The next batches are read while one is applied;
/// each applied batch is a new trace, linked to its events' original traces (never a child
/// of them: a replay must not re-parent history).
pub async fn fold_log<F, Fut, E>(
    database: &Database,
    batch_size: u32,
    dry_run: bool,
    progress: &mut dyn FnMut(u64),
    mut apply: F,
) -> Result<Folded, E>
where
    F: FnMut(Vec<RecordedEvent>) -> Fut,
    Fut: Future<Output = Result<u64, E>>,
    E: From<FoldError>,
{
    let head = stream::head_position(database)
        .await
        .map_err(|error| E::from(FoldError::Stream(error)))?;
    let (batches, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
    let _reading = AbortOnDrop(
        tokio::spawn(read_up_to(database.clone(), head, batch_size, batches)).abort_handle(),
    );
    let mut last = StreamPosition::START;
    let (mut read, mut applied) = (0_u64, 0_u64);
    while let Some(batch) = next.recv().await {
        let batch = batch.map_err(|error| E::from(FoldError::Stream(error)))?;
        let Some(end) = batch.last() else { continue };
        last = end.position;
        read += batch.len() as u64;
        if !dry_run {
            let span = tracing::info_span!(
                parent: None,
                "replay",
                otel.name = "replay batch",
                events = batch.len(),
                first_position = batch.first().map_or(0, |event| event.position.global_position),
                correlation_id = %petstore_telemetry::CorrelationId::generate(),
            );
            petstore_telemetry::link_to_all(
                &span,
                batch.iter().filter_map(RecordedEvent::traceparent),
            );
            applied += apply(batch).instrument(span).await?;
        }
        progress(read);
    }
    if last < head {
        return Err(E::from(FoldError::ReadStopped(last.global_position)));
    }
    Ok(Folded {
        last,
        read,
        applied,
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the stream from the start up to `head` into `batches`, in order; stops at the first
/// error (sent on) or when nobody receives.
async fn read_up_to(
    database: Database,
    head: StreamPosition,
    batch_size: u32,
    batches: tokio::sync::mpsc::Sender<Result<Vec<RecordedEvent>, StreamError>>,
) {
    let mut position = StreamPosition::START;
    while position < head {
        let batch = match stream::read_after(&database, position, batch_size).await {
            Ok(batch) => batch,
            Err(error) => {
                let _ = batches.send(Err(error)).await;
                return;
            }
        };
        let Some(last) = batch.last() else {
            // Events below the head are hidden by an older open transaction: wait for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        position = last.position;
        if batches.send(Ok(batch)).await.is_err() {
            return;
        }
    }
}
