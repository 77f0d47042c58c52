//! Which saga partitions this runner owns: leases taken, renewed and handed over so the
//! runners alive share the partitions evenly (`ceil(P / runners)` each), a dead runner's
//! taken over once its leases expire, a stopping runner's handed over at once.

use std::collections::BTreeMap;
use std::time::Duration;

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

/// Keeps this runner's share of the partitions.
pub(crate) struct Ownership {
    leases: Leases,
    partitions: Partitions,
    owned: watch::Sender<Owned>,
}

impl Ownership {
    pub(crate) fn new(leases: Leases, partitions: Partitions) -> Self {
        Self {
            leases,
            partitions,
            owned: watch::Sender::new(Owned::new()),
        }
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

    /// Forgets `partition` at once: a write for it was refused, its lease is another's.
    pub(crate) fn lost(&self, partition: u32) {
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
                    self.owned.send_replace(Owned::new());
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
            if !self.leases.renew(lease).await? {
                lost.push(lease.partition);
            }
        }
        for partition in lost {
            tracing::warn!(
                partition = partition.number(),
                "lost the lease on a saga partition"
            );
            owned.remove(&partition);
        }
        let runners = self.leases.live_runners().await?.max(1);
        let share = self.partitions.count().div_ceil(runners) as usize;
        while owned.len() > share {
            let Some((_, lease)) = owned.pop_last() else {
                break;
            };
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
                if let Some(lease) = self.leases.acquire(partition).await? {
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
            if let Err(error) = self.leases.release(lease).await {
                tracing::warn!(%error, "handing a saga partition over failed: it is taken over when its lease expires");
            }
        }
        if let Err(error) = self.leases.leave().await {
            tracing::warn!(%error, "leaving the saga runners failed");
        }
    }
}
