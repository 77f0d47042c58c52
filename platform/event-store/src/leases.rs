//! Leases on the saga partitions: which runner owns a partition, until when, and under which
//! fencing token (its epoch).
//!
//! A runner takes a partition that is free, expired, or its own ([`Leases::acquire`]): the
//! partition's epoch goes up by one, which fences every earlier holder, its own earlier
//! incarnation included. It keeps it by renewing before the lease expires
//! ([`Leases::renew`], refused once another holds a newer epoch) and hands it over at once
//! with [`Leases::release`]. A write made for a partition checks, in its own transaction,
//! that its lease is still current ([`check_lease_in`]): a runner that lost its lease, paused
//! or cut off past its expiry, cannot write once another took over. Expiry is judged by the
//! database's clock, the one clock every runner shares.
//!
//! The work a runner does for a partition runs under the partition's [`Fence`]
//! ([`Fence::guard`]): every write of the event store made inside it on Postgres (event
//! appends, deadlines) checks the lease in its own statement and fails with [`LeaseLost`]
//! once it is gone. (On SQLite one process owns the store, and nothing needs fencing.)

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use petstore_domain::partition::Partition;

use crate::database::{with_pool, Database};
use crate::stream::{self, StreamPosition};

/// A partition held: the fencing token every write for it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The partition.
    pub partition: Partition,
    /// Its epoch when taken: higher than every earlier holder's.
    pub epoch: i64,
}

/// A partition's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The partition's number.
    pub partition: u32,
    /// Who holds it; `None` when released.
    pub owner: Option<String>,
    /// Its current epoch.
    pub epoch: i64,
    /// Whether it is free to take: released, or expired by the database's clock.
    pub free: bool,
    /// How long until it expires (by the database's clock); zero when free.
    pub expires_in: Duration,
}

/// The lease of a write was lost: another runner took the partition over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the lease on saga partition {partition} (epoch {epoch}) is no longer held by {owner}")]
pub struct LeaseLost {
    /// The partition.
    pub partition: u32,
    /// The lease's epoch.
    pub epoch: i64,
    /// The runner that held it.
    pub owner: String,
}

/// The lease a runner's writes for a partition are made under, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The runner holding the lease.
    pub owner: Arc<str>,
    /// The lease.
    pub lease: Lease,
}

tokio::task_local! {
    /// The fence of the work running in this task, if any.
    static FENCE: Fence;
}

impl Fence {
    /// Runs `work` under this fence: each write of the event store it makes on Postgres
    /// (appending events, scheduling, moving or firing deadlines) commits only if the lease
    /// is still current, checked in the write's own statement (the lease's row locked for
    /// share, so a takeover waits for it), and fails with [`LeaseLost`] otherwise.
    pub async fn guard<F: Future>(self, work: F) -> F::Output {
        FENCE.scope(self, work).await
    }

    /// The fence of the work running now, if any.
    pub fn current() -> Option<Fence> {
        FENCE.try_with(Clone::clone).ok()
    }

    /// The error of a write this fence refused.
    pub fn lost(&self) -> LeaseLost {
        LeaseLost {
            partition: self.lease.partition.number(),
            epoch: self.lease.epoch,
            owner: self.owner.to_string(),
        }
    }

    /// The fence's (partition, owner, epoch), as the fenced statements bind them.
    pub(crate) fn binds(fence: Option<&Fence>) -> (Option<i32>, Option<String>, Option<i64>) {
        (
            fence.map(|fence| number(fence.lease.partition)),
            fence.map(|fence| fence.owner.to_string()),
            fence.map(|fence| fence.lease.epoch),
        )
    }
}

/// `write` (a Postgres statement whose condition says `FENCED`) made a fenced write: it
/// happens only if the fence bound at `$first` (partition), `$first + 1` (owner) and
/// `$first + 2` (epoch) is still current, or if none is bound (all three NULL). The statement
/// answers one boolean: whether the fence held (true when none is bound).
pub(crate) fn fenced(write: &str, first: usize) -> String {
    fenced_with(write, first, None)
}

/// [`fenced`], the statement answering `also` (an expression over `written`, say) after the
/// boolean.
pub(crate) fn fenced_with(write: &str, first: usize, also: Option<&str>) -> String {
    fenced_statement(&[write], first, also)
}

/// [`fenced`] for several writes in one statement (common table expressions `written`,
/// `written_1`, ...), each saying `FENCED` in its condition: all of them happen, or none.
pub(crate) fn fenced_writes(writes: &[&str], first: usize) -> String {
    fenced_statement(writes, first, None)
}

fn fenced_statement(writes: &[&str], first: usize, also: Option<&str>) -> String {
    let (partition, owner, epoch) = (first, first + 1, first + 2);
    let held = format!("(${partition}::integer IS NULL OR EXISTS (SELECT 1 FROM lease))");
    let also = also.map(|also| format!(", {also}")).unwrap_or_default();
    let writes: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(index, write)| {
            let name = match index {
                0 => "written".to_owned(),
                index => format!("written_{index}"),
            };
            format!("{name} AS ({})", write.replace("FENCED", &held))
        })
        .collect();
    format!(
        "WITH lease AS (SELECT 1 FROM saga_leases
                         WHERE partition_number = ${partition} AND owner = ${owner}
                           AND epoch = ${epoch} FOR SHARE),
              {}
         SELECT {held}{also}",
        writes.join(",\n              ")
    )
}

/// Runs `query` (a [`fenced`] statement, its own parameters bound) under the work's fence,
/// if any: [`LeaseLost`] when the fence no longer held (and the write did not happen).
pub(crate) async fn execute_fenced<'q>(
    pool: &sqlx::PgPool,
    query: sqlx::query::QueryScalar<'q, sqlx::Postgres, bool, sqlx::postgres::PgArguments>,
) -> Result<(), CheckError> {
    let fence = Fence::current();
    let (partition, owner, epoch) = Fence::binds(fence.as_ref());
    let held = query
        .bind(partition)
        .bind(owner)
        .bind(epoch)
        .fetch_one(pool)
        .await?;
    match fence {
        Some(fence) if !held => Err(CheckError::Lost(fence.lost())),
        _ => Ok(()),
    }
}

/// Of `fences`, those whose lease is no longer current (read without locking).
pub(crate) async fn lost_of(
    pool: &sqlx::PgPool,
    fences: &[&Fence],
) -> Result<Vec<Fence>, sqlx::Error> {
    if fences.is_empty() {
        return Ok(Vec::new());
    }
    let (partitions, owners, epochs): (Vec<_>, Vec<_>, Vec<_>) = fences
        .iter()
        .map(|fence| {
            (
                number(fence.lease.partition),
                fence.owner.to_string(),
                fence.lease.epoch,
            )
        })
        .collect();
    let held: Vec<(i32, String, i64)> = sqlx::query_as(
        "SELECT partition_number, owner, epoch FROM saga_leases
          WHERE (partition_number, owner, epoch) IN
                (SELECT * FROM UNNEST($1::integer[], $2::text[], $3::bigint[]))",
    )
    .bind(partitions)
    .bind(owners)
    .bind(epochs)
    .fetch_all(pool)
    .await?;
    Ok(fences
        .iter()
        .filter(|fence| {
            !held.iter().any(|(partition, owner, epoch)| {
                *partition == number(fence.lease.partition)
                    && **owner == *fence.owner
                    && *epoch == fence.lease.epoch
            })
        })
        .map(|fence| (*fence).clone())
        .collect())
}

/// The database's clock, in milliseconds since the epoch (Postgres, SQLite): `NOW_MS` in the
/// statements below, and the time a deadline is armed.
pub(crate) const NOW_MS: [&str; 2] = [
    "(extract(epoch from clock_timestamp()) * 1000)::bigint",
    "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
];

/// A statement for Postgres and for SQLite, `NOW_MS` replaced by each one's clock.
struct PerEngine(LazyLock<[String; 2]>);

macro_rules! per_engine {
    ($sql:expr) => {
        PerEngine(LazyLock::new(|| {
            NOW_MS.map(|now| $sql.replace("NOW_MS", now))
        }))
    };
}

static ACQUIRE: PerEngine = per_engine!(
    "INSERT INTO saga_leases (partition_number, owner, epoch, expires_at_ms)
     VALUES ($1, $2, 1, NOW_MS + $3)
     ON CONFLICT (partition_number) DO UPDATE
        SET owner = excluded.owner, epoch = saga_leases.epoch + 1,
            expires_at_ms = excluded.expires_at_ms
      WHERE saga_leases.owner IS NULL OR saga_leases.owner = excluded.owner
         OR saga_leases.expires_at_ms <= NOW_MS
     RETURNING epoch"
);
static RENEW: PerEngine = per_engine!(
    "UPDATE saga_leases SET expires_at_ms = NOW_MS + $4
      WHERE partition_number = $1 AND owner = $2 AND epoch = $3"
);
const RELEASE: &str = "UPDATE saga_leases SET owner = NULL, expires_at_ms = 0
                        WHERE partition_number = $1 AND owner = $2 AND epoch = $3";
static HEARTBEAT: PerEngine = per_engine!(
    "INSERT INTO saga_runners (owner, expires_at_ms, instance) VALUES ($1, NOW_MS + $2, $3)
     ON CONFLICT (owner) DO UPDATE
        SET expires_at_ms = excluded.expires_at_ms, instance = excluded.instance
      WHERE $4 OR saga_runners.instance = excluded.instance"
);
static LIVE_RUNNERS: PerEngine =
    per_engine!("SELECT owner FROM saga_runners WHERE expires_at_ms > NOW_MS ORDER BY owner");
static STATES: PerEngine = per_engine!(
    "SELECT partition_number, owner, epoch, expires_at_ms - NOW_MS
       FROM saga_leases ORDER BY partition_number"
);
static STATE_OF: PerEngine = per_engine!(
    "SELECT partition_number, owner, epoch, expires_at_ms - NOW_MS
       FROM saga_leases WHERE partition_number = $1"
);

impl PerEngine {
    fn of(&'static self, database: &Database) -> &'static str {
        let [postgres, sqlite] = &*self.0;
        database.sql(postgres, sqlite)
    }
}

/// One runner's leases.
#[derive(Clone)]
pub struct Leases {
    database: Database,
    owner: String,
    timeout: Duration,
    /// This process's instance of the runner `owner`, and whether it has beaten yet.
    instance: String,
    beaten: Arc<std::sync::atomic::AtomicBool>,
}

/// Another process took this runner's id over (the same `saga.runner_id` running twice):
/// this one must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("another process runs the saga as {owner}: this one stops (give each process its own saga.runner_id)")]
pub struct Displaced {
    /// The runner id both use.
    pub owner: String,
}

impl Leases {
    /// The leases `owner` takes in `database`, each valid for `timeout` after it was taken
    /// or last renewed.
    pub fn new(database: &Database, owner: impl Into<String>, timeout: Duration) -> Self {
        Self {
            database: database.clone(),
            owner: owner.into(),
            timeout,
            instance: uuid::Uuid::new_v4().to_string(),
            beaten: Arc::default(),
        }
    }

    /// Who takes them.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn timeout_ms(&self) -> i64 {
        i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes `partition` if it is free, expired or this owner's: a new epoch, which fences
    /// every earlier holder. `None` while another runner holds it.
    pub async fn acquire(&self, partition: Partition) -> Result<Option<Lease>, sqlx::Error> {
        let sql = ACQUIRE.of(&self.database);
        let epoch: Option<i64> = with_pool!(&self.database, |pool| {
            sqlx::query_scalar(sql)
                .bind(number(partition))
                .bind(&self.owner)
                .bind(self.timeout_ms())
                .fetch_optional(pool)
                .await?
        });
        Ok(epoch.map(|epoch| Lease { partition, epoch }))
    }

    /// Extends `lease` by the timeout from now; false when it is lost (another runner took
    /// the partition, or it was released).
    pub async fn renew(&self, lease: &Lease) -> Result<bool, sqlx::Error> {
        let sql = RENEW.of(&self.database);
        let renewed = with_pool!(&self.database, |pool| {
            sqlx::query(sql)
                .bind(number(lease.partition))
                .bind(&self.owner)
                .bind(lease.epoch)
                .bind(self.timeout_ms())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(renewed == 1)
    }

    /// Hands `lease` over at once: the partition is free for any runner. False when it was
    /// lost already.
    pub async fn release(&self, lease: &Lease) -> Result<bool, sqlx::Error> {
        let released = with_pool!(&self.database, |pool| {
            sqlx::query(RELEASE)
                .bind(number(lease.partition))
                .bind(&self.owner)
                .bind(lease.epoch)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(released == 1)
    }

    /// Says this runner is alive for another timeout: the partitions are shared among the
    /// runners alive ([`Self::live_runners`]). The first beat claims the runner's id for this
    /// process (a restarted process takes its own id back at once); a later one finds
    /// whether another process claimed it since ([`Displaced`]).
    pub async fn heartbeat(&self) -> Result<Result<(), Displaced>, sqlx::Error> {
        use std::sync::atomic::Ordering;
        let sql = HEARTBEAT.of(&self.database);
        let first = !self.beaten.load(Ordering::Acquire);
        let beaten = with_pool!(&self.database, |pool| {
            sqlx::query(sql)
                .bind(&self.owner)
                .bind(self.timeout_ms())
                .bind(&self.instance)
                .bind(first)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if beaten == 1 {
            self.beaten.store(true, Ordering::Release);
            return Ok(Ok(()));
        }
        Ok(Err(Displaced {
            owner: self.owner.clone(),
        }))
    }

    /// The runners alive (their heartbeat not expired), this one included once it has
    /// beaten, in order of their ids.
    pub async fn live_runners(&self) -> Result<Vec<String>, sqlx::Error> {
        let sql = LIVE_RUNNERS.of(&self.database);
        Ok(with_pool!(&self.database, |pool| {
            sqlx::query_scalar(sql).fetch_all(pool).await?
        }))
    }

    /// Says this runner stopped: the others share the partitions without it at once. (A
    /// displaced instance leaves the row to the process that took its id over.)
    pub async fn leave(&self) -> Result<(), sqlx::Error> {
        with_pool!(&self.database, |pool| {
            sqlx::query("DELETE FROM saga_runners WHERE owner = $1 AND instance = $2")
                .bind(&self.owner)
                .bind(&self.instance)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Saves each held partition's checkpoint (named `name(partition)`) at its position, in
    /// one transaction, each only if its lease is still this owner's ([`check_lease_in`]; on
    /// SQLite, one process owns the store). Answers the partitions whose lease was lost:
    /// their checkpoints stay where they were, for their new owner to resume from.
    pub async fn save_checkpoints(
        &self,
        held: &[(Lease, StreamPosition)],
        name: impl Fn(Partition) -> String,
    ) -> Result<Vec<Partition>, CheckError> {
        match &self.database {
            Database::Postgres(pool) => {
                let mut transaction = crate::database::begin(pool).await?;
                // As every checkpoint: a crash that loses it only means handling again.
                crate::database::commit_lazily(&mut transaction).await?;
                // Every lease checked, and every checkpoint saved, in one statement each.
                let leases: Vec<Lease> = held.iter().map(|(lease, _)| *lease).collect();
                let lost = check_leases_in(&mut transaction, &self.owner, &leases).await?;
                let saved: Vec<(String, StreamPosition)> = held
                    .iter()
                    .filter(|(lease, _)| !lost.contains(&lease.partition))
                    .map(|(lease, position)| (name(lease.partition), *position))
                    .collect();
                stream::save_checkpoints_in(&mut transaction, &saved).await?;
                transaction.commit().await?;
                Ok(lost)
            }
            Database::Sqlite(_) => {
                for (lease, position) in held {
                    let name = name(lease.partition);
                    stream::save_checkpoint(&self.database, &name, *position, None)
                        .await
                        .map_err(CheckError::Checkpoint)?;
                }
                Ok(Vec::new())
            }
        }
    }

    /// Of `leases` (this owner's), the partitions whose lease is no longer current (read
    /// without locking; on SQLite, where one process owns the store, none).
    pub async fn lost(&self, leases: &[Lease]) -> Result<Vec<Partition>, sqlx::Error> {
        let Database::Postgres(pool) = &self.database else {
            return Ok(Vec::new());
        };
        let owner: Arc<str> = self.owner.as_str().into();
        let fences: Vec<Fence> = leases
            .iter()
            .map(|lease| Fence {
                owner: Arc::clone(&owner),
                lease: *lease,
            })
            .collect();
        let fences: Vec<&Fence> = fences.iter().collect();
        Ok(lost_of(pool, &fences)
            .await?
            .into_iter()
            .map(|fence| fence.lease.partition)
            .collect())
    }

    /// Every partition's lease as stored (partitions never taken are absent).
    pub async fn states(&self) -> Result<Vec<LeaseState>, sqlx::Error> {
        states(&self.database).await
    }
}

/// Every partition's lease as stored, by partition.
pub async fn states(database: &Database) -> Result<Vec<LeaseState>, sqlx::Error> {
    let sql = STATES.of(database);
    let rows: Vec<StateRow> = with_pool!(database, |pool| {
        sqlx::query_as(sql).fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(LeaseState::from_row).collect())
}

/// `partition`'s lease as stored; `None` when no runner ever took it.
pub async fn state_of(
    database: &Database,
    partition: Partition,
) -> Result<Option<LeaseState>, sqlx::Error> {
    let sql = STATE_OF.of(database);
    let row: Option<StateRow> = with_pool!(database, |pool| {
        sqlx::query_as(sql)
            .bind(number(partition))
            .fetch_optional(pool)
            .await?
    });
    Ok(row.map(LeaseState::from_row))
}

/// A lease's row: partition, owner, epoch, milliseconds left by the database's clock.
type StateRow = (i32, Option<String>, i64, i64);

impl LeaseState {
    fn from_row((partition, owner, epoch, left_ms): StateRow) -> Self {
        let free = owner.is_none() || left_ms <= 0;
        LeaseState {
            partition: u32::try_from(partition).unwrap_or(u32::MAX),
            owner,
            epoch,
            free,
            expires_in: if free {
                Duration::ZERO
            } else {
                Duration::from_millis(u64::try_from(left_ms).unwrap_or(0))
            },
        }
    }
}

/// A partition as the `partition_number` column holds it.
fn number(partition: Partition) -> i32 {
    i32::try_from(partition.number()).expect("at most MAX_PARTITIONS")
}

/// Why a fenced write's check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The lease is lost: the write must not happen.
    #[error(transparent)]
    Lost(#[from] LeaseLost),
    /// The check itself failed.
    #[error("checking the lease failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The checkpoint could not be saved.
    #[error(transparent)]
    Checkpoint(crate::stream::StreamError),
}

/// Checks, inside the Postgres transaction on `connection`, that `owner` still holds `lease`
/// (its epoch is still the partition's), and locks the lease's row for share: a takeover
/// (which updates the row) waits for this transaction, so a write checked here is never
/// committed after another runner took the partition.
pub async fn check_lease_in(
    connection: &mut sqlx::PgConnection,
    owner: &str,
    lease: &Lease,
) -> Result<(), CheckError> {
    if check_leases_in(connection, owner, &[*lease])
        .await?
        .is_empty()
    {
        return Ok(());
    }
    Err(CheckError::Lost(LeaseLost {
        partition: lease.partition.number(),
        epoch: lease.epoch,
        owner: owner.to_owned(),
    }))
}

/// [`check_lease_in`] for several leases in one statement: answers the partitions whose
/// lease `owner` no longer holds; the others' rows stay locked for share until the
/// transaction ends.
pub async fn check_leases_in(
    connection: &mut sqlx::PgConnection,
    owner: &str,
    leases: &[Lease],
) -> Result<Vec<Partition>, sqlx::Error> {
    let partitions: Vec<i32> = leases.iter().map(|lease| number(lease.partition)).collect();
    let epochs: Vec<i64> = leases.iter().map(|lease| lease.epoch).collect();
    let current: Vec<i32> = sqlx::query_scalar(
        "SELECT partition_number FROM saga_leases
          WHERE owner = $1
            AND (partition_number, epoch) IN (SELECT * FROM UNNEST($2::integer[], $3::bigint[]))
            FOR SHARE",
    )
    .bind(owner)
    .bind(partitions)
    .bind(epochs)
    .fetch_all(connection)
    .await?;
    Ok(leases
        .iter()
        .map(|lease| lease.partition)
        .filter(|partition| !current.contains(&number(*partition)))
        .collect())
}
