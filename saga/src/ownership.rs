//! Which saga partitions this runner owns: leases taken, renewed and handed over so the
//! runners alive share the partitions evenly (`P / runners` each, one more for the first
//! `P mod runners` of them by id), a dead runner's taken over once its leases expire, a
//! stopping runner's handed over at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use petstore_domain::partition::{Partition, Partitions};
use petstore_event_store::leases::{Displaced, Lease, Leases};
use tokio::sync::watch;

/// Why a round of keeping the share failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeepError {
    /// The database failed: tried again next round.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Another process took this runner's id over.
    #[error(transparent)]
    Displaced(#[from] Displaced),
}

/// The partitions owned now, with their leases.
pub type Owned = BTreeMap<Partition, Lease>;

/// Until when each lease held is valid by this process's own (monotonic) clock: from just
/// before the statement that took or renewed it, for nine tenths of the timeout. A runner
/// paused past it (stopped, starved, cut off) knows on waking that it may have lost its
/// partitions, before any statement tells it: it calls no provider for them.
#[derive(Clone, Default)]
pub(crate) struct LeaseClock(Arc<Mutex<BTreeMap<Partition, (i64, Instant)>>>);

impl LeaseClock {
    /// Whether `lease` is still valid by this process's clock.
    pub(crate) fn holds(&self, lease: &Lease) -> bool {
        self.lock()
            .get(&lease.partition)
            .is_some_and(|(epoch, until)| *epoch == lease.epoch && Instant::now() < *until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Partition, (i64, Instant)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, lease: &Lease, until: Instant) {
        self.lock().insert(lease.partition, (lease.epoch, until));
    }

    fn forget(&self, partition: Partition) {
        self.lock().remove(&partition);
    }
}

/// Keeps this runner's share of the partitions.
pub(crate) struct Ownership {
    leases: Leases,
    partitions: Partitions,
    owned: watch::Sender<Owned>,
    clock: LeaseClock,
    timeout: Duration,
}

impl Ownership {
    pub(crate) fn new(
        leases: Leases,
        partitions: Partitions,
        clock: LeaseClock,
        timeout: Duration,
    ) -> Self {
        Self {
            leases,
            partitions,
            owned: watch::Sender::new(Owned::new()),
            clock,
            timeout,
        }
    }

    /// Until when a lease taken or renewed by a statement sent at `sent` is valid here.
    fn valid_from(&self, sent: Instant) -> Instant {
        sent + self.timeout * 9 / 10
    }

    /// Follows the partitions owned.
    pub(crate) fn owned(&self) -> watch::Receiver<Owned> {
        self.owned.subscribe()
    }

    pub(crate) fn leases(&self) -> &Leases {
        &self.leases
    }

    pub(crate) fn partitions(&self) -> Partitions {
        self.partitions
    }

    /// This runner's share of the partitions among the `runners` alive (in order of their
    /// ids): `P / runners`, and one more for the first `P mod runners` of them, so that the
    /// shares add up to P exactly and every runner can reach its own.
    fn share(&self, runners: &[String]) -> usize {
        let count = self.partitions.count() as usize;
        let alive = runners.len().max(1);
        let index = runners
            .iter()
            .position(|runner| runner == self.leases.owner())
            .unwrap_or(alive - 1);
        count / alive + usize::from(index < count % alive)
    }

    /// Forgets `partition` at once: a write for it was refused, its lease is another's.
    pub(crate) fn lost(&self, partition: u32) {
        for owned in self.owned.borrow().keys() {
            if owned.number() == partition {
                self.clock.forget(*owned);
            }
        }
        self.owned.send_if_modified(|owned| {
            let before = owned.len();
            owned.retain(|owned, _| owned.number() != partition);
            owned.len() != before
        });
    }

    /// Keeps the share until `stopped`, a round every third of the lease timeout, then hands
    /// every partition over and leaves. Stops at once, owning nothing, when another process
    /// took this runner's id over.
    pub(crate) async fn keep(
        &self,
        every: Duration,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), Displaced> {
        loop {
            match self.round().await {
                Ok(()) => {}
                Err(KeepError::Displaced(displaced)) => {
                    // Its leases are the other process's now (same owner): nothing to hand over.
                    for partition in self.owned.send_replace(Owned::new()).into_keys() {
                        self.clock.forget(partition);
                    }
                    return Err(displaced);
                }
                Err(error) => {
                    tracing::warn!(%error, "keeping the saga partitions' leases failed; trying again")
                }
            }
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        self.hand_over().await;
        Ok(())
    }

    /// One round: say this runner is alive, renew what it holds (dropping what it lost),
    /// then give up what is above its share or take free partitions up to it.
    pub(crate) async fn round(&self) -> Result<(), KeepError> {
        self.leases.heartbeat().await??;
        let mut owned = self.owned.borrow().clone();
        let mut lost = Vec::new();
        for lease in owned.values() {
            let sent = Instant::now();
            if self.leases.renew(lease).await? {
                self.clock.set(lease, self.valid_from(sent));
            } else {
                lost.push(lease.partition);
            }
        }
        for partition in lost {
            self.clock.forget(partition);
            tracing::warn!(
                partition = partition.number(),
                "lost the lease on a saga partition"
            );
            owned.remove(&partition);
        }
        let share = self.share(&self.leases.live_runners().await?);
        while owned.len() > share {
            let Some((_, lease)) = owned.pop_last() else {
                break;
            };
            self.clock.forget(lease.partition);
            self.leases.release(&lease).await?;
        }
        if owned.len() < share {
            for partition in self.partitions.all() {
                if owned.len() >= share {
                    break;
                }
                if owned.contains_key(&partition) {
                    continue;
                }
                let sent = Instant::now();
                if let Some(lease) = self.leases.acquire(partition).await? {
                    self.clock.set(&lease, self.valid_from(sent));
                    tracing::info!(
                        partition = partition.number(),
                        epoch = lease.epoch,
                        "took a saga partition"
                    );
                    owned.insert(partition, lease);
                }
            }
        }
        self.owned.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
        Ok(())
    }

    /// Hands every partition over at once and leaves the runners.
    async fn hand_over(&self) {
        let owned = self.owned.send_replace(Owned::new());
        for lease in owned.values() {
            self.clock.forget(lease.partition);
            if let Err(error) = self.leases.release(lease).await {
                tracing::warn!(%error, "handing a saga partition over failed: it is taken over when its lease expires");
            }
        }
        if let Err(error) = self.leases.leave().await {
            tracing::warn!(%error, "leaving the saga runners failed");
        }
    }
}
