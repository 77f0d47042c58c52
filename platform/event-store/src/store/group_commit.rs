//! Group commit of concurrent one-event appends on Postgres.
//!
//! Most commands append one event. Under load, many such appends arrive together, and each
//! as a statement of its own pays a round trip, a plan and a commit. Here they queue, and
//! a few flush tasks drain the queue, each writing everything queued in one
//! `INSERT ... ON CONFLICT DO NOTHING RETURNING` (one transaction, one commit). The keys
//! the statement returns are the appends that went through; a key it does not return was
//! taken already, which is the append's optimistic-concurrency conflict, exactly as a
//! unique violation is for an append on its own. So every append keeps its own outcome:
//!
//! - a batch never holds two appends of the same (aggregate, sequence): the later one waits
//!   for the next batch, where it conflicts with the first;
//! - a batch that fails (a row Postgres refuses, say) is retried one append at a time, so
//!   that a bad row fails only its own append; a lost connection fails all of them, as it
//!   would each on its own (the batch may or may not have committed);
//! - an append while nothing else is in flight is written at once by its caller, in the
//!   one-row statement, so a lone writer waits for nothing and pays nothing;
//! - batches are written by tasks of their own: a caller that is cancelled (a client hung
//!   up) leaves its batch whole.
//!
//! Appends of several events (one command deciding more than one) keep their own statement,
//! all or nothing: `ON CONFLICT DO NOTHING` would let half of them through.
//!
//! An append made under a saga partition's [`Fence`] is written only while its lease holds,
//! checked by the same statement (alone or in a batch, next to unfenced appends); one the
//! fence refused fails with [`LeaseLost`](crate::leases::LeaseLost).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use tokio::sync::oneshot;

use super::persistence_error;
use crate::leases::{self, Fence};

/// The most appends one statement writes.
const MAX_BATCH: usize = 128;

/// Postgres's unique-violation code: a taken (aggregate, sequence).
const UNIQUE_VIOLATION: &str = "23505";

const INSERT_ONE: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// [`INSERT_ONE`] under a fence (`$8` to `$10`): answers whether the fence held.
static INSERT_ONE_FENCED: LazyLock<String> = LazyLock::new(|| {
    leases::fenced(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT $1, $2, $3, $4, $5, $6, $7 WHERE FENCED",
        8,
    )
});

/// Each row under its own fence (`$8` to `$10`, NULL for an unfenced row), the fences'
/// lease rows locked for share, as [`leases::fenced`] does for one.
const INSERT_BATCH: &str = "WITH batch AS (
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[],
                              $8::integer[], $9::text[], $10::bigint[])
             AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                  lease_partition, lease_owner, lease_epoch)),
     held AS (
         SELECT partition_number, owner, epoch FROM saga_leases
          WHERE (partition_number, owner, epoch) IN
                (SELECT lease_partition, lease_owner, lease_epoch FROM batch)
            FOR SHARE)
     INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
     SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata
       FROM batch
      WHERE lease_partition IS NULL
         OR (lease_partition, lease_owner, lease_epoch) IN (SELECT * FROM held)
     ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
     RETURNING aggregate_type, aggregate_id, sequence";

/// The queue of one-event appends and the tasks that flush it.
pub(super) struct GroupCommit {
    pool: sqlx::PgPool,
    /// Flush tasks running at most: a quarter of the pool, so that loads and other queries
    /// always find a connection.
    max_flushing: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    flushing: usize,
}

/// One append waiting for its batch.
struct Pending {
    row: Row,
    outcome: oneshot::Sender<Result<(), PersistenceError>>,
}

/// One event row, and the fence it is written under, if any.
struct Row {
    aggregate_type: &'static str,
    sequence: i64,
    event: SerializedEvent,
    fence: Option<Fence>,
}

/// What makes a row unique in `events`.
type Key<'a> = (&'a str, &'a str, i64);

impl Row {
    fn new(aggregate_type: &'static str, event: SerializedEvent, fence: Option<Fence>) -> Self {
        Self {
            aggregate_type,
            sequence: i64::try_from(event.sequence).unwrap_or(i64::MAX),
            event,
            fence,
        }
    }

    fn key(&self) -> Key<'_> {
        (self.aggregate_type, &self.event.aggregate_id, self.sequence)
    }
}

/// Writes one event row alone (under its fence, if any); a taken key is the
/// optimistic-concurrency conflict.
async fn insert_one(pool: &sqlx::PgPool, row: &Row) -> Result<(), PersistenceError> {
    let Row {
        aggregate_type,
        sequence,
        event,
        fence,
    } = row;
    macro_rules! bound {
        ($query:expr) => {
            $query
                .bind(*aggregate_type)
                .bind(&event.aggregate_id)
                .bind(*sequence)
                .bind(&event.event_type)
                .bind(&event.event_version)
                .bind(&event.payload)
                .bind(&event.metadata)
        };
    }
    let Some(fence) = fence else {
        return bound!(sqlx::query(INSERT_ONE))
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(|error| persistence_error(error, UNIQUE_VIOLATION));
    };
    let (partition, owner, epoch) = Fence::binds(Some(fence));
    let held: bool = bound!(sqlx::query_scalar(&INSERT_ONE_FENCED))
        .bind(partition)
        .bind(owner)
        .bind(epoch)
        .fetch_one(pool)
        .await
        .map_err(|error| persistence_error(error, UNIQUE_VIOLATION))?;
    if held {
        Ok(())
    } else {
        Err(lease_lost(fence))
    }
}

/// How an append the fence refused fails.
pub(super) fn lease_lost(fence: &Fence) -> PersistenceError {
    PersistenceError::UnknownError(Box::new(fence.lost()))
}

impl GroupCommit {
    pub(super) fn new(pool: sqlx::PgPool) -> Self {
        let max_flushing = (pool.options().get_max_connections() as usize / 4).max(1);
        Self {
            pool,
            max_flushing,
            state: Mutex::default(),
        }
    }

    /// The pool the appends go to.
    pub(super) fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// Appends `event` of an `aggregate_type` aggregate, in the next batch.
    pub(super) async fn append(
        self: &Arc<Self>,
        aggregate_type: &'static str,
        event: SerializedEvent,
        fence: Option<Fence>,
    ) -> Result<(), PersistenceError> {
        let row = Row::new(aggregate_type, event, fence);
        let (outcome, written) = oneshot::channel();
        let (alone, start_flushing) = {
            let mut state = self.lock();
            if state.flushing == 0 {
                // Nothing in flight (so nothing queued): written at once, by the caller.
                state.flushing = 1;
                (Some(row), false)
            } else {
                state.queue.push_back(Pending { row, outcome });
                let start = state.flushing < self.max_flushing;
                if start {
                    state.flushing += 1;
                }
                (None, start)
            }
        };
        if let Some(row) = alone {
            let _written_alone = WrittenAlone(self);
            return insert_one(&self.pool, &row).await;
        }
        if start_flushing {
            tokio::spawn(Arc::clone(self).flush());
        }
        written.await.unwrap_or_else(|_| {
            Err(PersistenceError::UnknownError(
                "the group commit task ended before the append was written".into(),
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes batches until the queue is empty.
    async fn flush(self: Arc<Self>) {
        loop {
            let batch = {
                let mut state = self.lock();
                if state.queue.is_empty() {
                    state.flushing -= 1;
                    return;
                }
                take_batch(&mut state.queue)
            };
            self.write(batch).await;
        }
    }

    /// Writes `batch` and tells each append its outcome.
    async fn write(&self, mut batch: Vec<Pending>) {
        if batch.len() == 1 {
            let pending = batch.remove(0);
            let outcome = insert_one(&self.pool, &pending.row).await;
            // The caller may have gone; the row is written all the same.
            let _ = pending.outcome.send(outcome);
            return;
        }
        match self.insert_batch(&batch).await {
            Ok(written) => {
                let written: HashSet<Key<'_>> = written
                    .iter()
                    .map(|(kind, id, sequence)| (kind.as_str(), id.as_str(), *sequence))
                    .collect();
                let outcomes: Vec<_> = batch
                    .iter()
                    .map(|pending| written.contains(&pending.row.key()))
                    .collect();
                // A fenced row not written was refused by its fence, or conflicted: told
                // apart by whether its lease still holds.
                let refused: Vec<&Fence> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter_map(|(pending, written)| {
                        pending.row.fence.as_ref().filter(|_| !written)
                    })
                    .collect();
                let lost = leases::lost_of(&self.pool, &refused)
                    .await
                    .map_err(Arc::new);
                for (pending, written) in batch.into_iter().zip(outcomes) {
                    let outcome = match (&pending.row.fence, &lost) {
                        _ if written => Ok(()),
                        (Some(_), Err(error)) => {
                            Err(PersistenceError::UnknownError(Box::new(Arc::clone(error))))
                        }
                        (Some(fence), Ok(lost)) if lost.contains(fence) => Err(lease_lost(fence)),
                        _ => Err(PersistenceError::OptimisticLockError),
                    };
                    let _ = pending.outcome.send(outcome);
                }
            }
            Err(error) if crate::database::unreachable(&error) => {
                let error = Arc::new(error);
                for pending in batch {
                    let _ = pending
                        .outcome
                        .send(Err(PersistenceError::ConnectionError(Box::new(
                            Arc::clone(&error),
                        ))));
                }
            }
            Err(error) => {
                tracing::debug!(%error, rows = batch.len(), "a batch of appends failed; writing them one by one");
                for pending in batch {
                    let outcome = insert_one(&self.pool, &pending.row).await;
                    let _ = pending.outcome.send(outcome);
                }
            }
        }
    }

    /// The batch in one statement; the keys it wrote.
    async fn insert_batch(
        &self,
        batch: &[Pending],
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        let rows = || batch.iter().map(|pending| &pending.row);
        sqlx::query_as(INSERT_BATCH)
            .bind(rows().map(|row| row.aggregate_type).collect::<Vec<_>>())
            .bind(
                rows()
                    .map(|row| row.event.aggregate_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows().map(|row| row.sequence).collect::<Vec<_>>())
            .bind(
                rows()
                    .map(|row| row.event.event_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows()
                    .map(|row| row.event.event_version.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(rows().map(|row| &row.event.payload).collect::<Vec<_>>())
            .bind(rows().map(|row| &row.event.metadata).collect::<Vec<_>>())
            .bind(
                rows()
                    .map(|row| Fence::binds(row.fence.as_ref()).0)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows()
                    .map(|row| Fence::binds(row.fence.as_ref()).1)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows()
                    .map(|row| Fence::binds(row.fence.as_ref()).2)
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await
    }
}

/// An append written by its caller while nothing else was in flight. When it is done (or
/// its caller cancelled), the appends that queued meanwhile get a flush task.
struct WrittenAlone<'a>(&'a Arc<GroupCommit>);

impl Drop for WrittenAlone<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if state.queue.is_empty() {
            state.flushing -= 1;
        } else {
            tokio::spawn(Arc::clone(self.0).flush());
        }
    }
}

/// Up to [`MAX_BATCH`] appends from the front of `queue`, no two with the same key (those
/// left behind keep their place), in key order: two batches in flight at once then take
/// the row locks they share in the same order, and cannot deadlock.
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH));
    let mut keys = HashSet::with_capacity(batch.capacity());
    let mut deferred = VecDeque::new();
    while batch.len() < MAX_BATCH {
        let Some(pending) = queue.pop_front() else {
            break;
        };
        let row = &pending.row;
        if keys.insert((
            row.aggregate_type,
            row.event.aggregate_id.clone(),
            row.sequence,
        )) {
            batch.push(pending);
        } else {
            deferred.push_back(pending);
        }
    }
    deferred.append(queue);
    *queue = deferred;
    batch.sort_unstable_by(|a, b| a.row.key().cmp(&b.row.key()));
    batch
}
