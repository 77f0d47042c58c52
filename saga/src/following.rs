//! How the runner takes its events: for the partitions it owns, from the event store (each
//! from its checkpoint) or from Kafka (each from the group's committed offset), starting over
//! whenever what it owns changes, each order's events in its lane.

use std::collections::BTreeMap;
use std::time::Duration;

use petstore_domain::partition::Partitions;
use petstore_domain::providers::{DeliveryProvider, PaymentGateway};
use petstore_event_store::leases::Leases;
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use petstore_event_store::subscription::{run_in_lanes, LaneLimits, RecentEvents, Subscription};
use petstore_kafka::KafkaSubscriber;
use petstore_settings::KafkaSettings;
use tokio::sync::watch;

use crate::error::*;
use crate::ownership::{Owned, Ownership};
use crate::runner::*;

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// Handles the events of the partitions `ownership` holds (from the event store, or
    /// from Kafka), starting again whenever they change, until stopped.
    pub(crate) async fn follow(&self, ownership: &Ownership, mut stopped: watch::Receiver<bool>) {
        let mut owned = ownership.owned();
        // Consuming Kafka, redeliveries after a restart are dropped by event id.
        let mut seen = RecentEvents::new(if self.kafka.is_some() { 100_000 } else { 0 });
        loop {
            if *stopped.borrow() {
                return;
            }
            let held = owned.borrow_and_update().clone();
            if held.is_empty() {
                tokio::select! {
                    _ = stopped.wait_for(|stop| *stop) => return,
                    _ = owned.changed() => continue,
                }
            }
            // What it trusts of its orders' aggregates was proven under the partitions it
            // owned before: read each again once.
            self.store.distrust_all();
            let (stop, mut stop_run) = watch::channel(false);
            let run = async {
                match &self.kafka {
                    Some((kafka, partitions)) => {
                        self.consume_kafka(
                            kafka,
                            *partitions,
                            ownership,
                            &held,
                            &mut stop_run,
                            &mut seen,
                        )
                        .await
                    }
                    None => {
                        self.follow_partitions(ownership, &held, &mut stop_run)
                            .await
                    }
                }
            };
            tokio::pin!(run);
            let outcome = tokio::select! {
                outcome = &mut run => outcome,
                () = async {
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => {}
                        _ = owned.changed() => {}
                    }
                } => {
                    // Stopping, or the partitions changed: finish what arrived, then start
                    // over.
                    let _ = stop.send(true);
                    run.await
                }
            };
            let error = match outcome {
                Ok(()) => continue,
                Err(SagaError::LeaseLost(lost)) => {
                    // Another runner took a partition over: its orders are no longer this
                    // one's. The others go on from where they were acknowledged.
                    tracing::warn!(%lost, "a write was refused by its fence; giving the partition up");
                    ownership.lost(lost.partition);
                    continue;
                }
                Err(error) => error,
            };
            // Following the event store, the runner resumes from the checkpoints; consuming
            // Kafka, a new consumer resumes from the last committed offsets. Either way what
            // was not handled is handled again.
            self.failed();
            tracing::error!(%error, kafka = self.kafka.is_some(), "saga step failed; resuming from what was acknowledged");
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Handles the events of the `held` partitions from Kafka, each from the group's
    /// committed offset, until stopped (`Ok`) or until one fails. Offsets are committed only
    /// up to events handled with all before them.
    pub(crate) async fn consume_kafka(
        &self,
        kafka: &KafkaSettings,
        partitions: Partitions,
        ownership: &Ownership,
        held: &Owned,
        stopped: &mut watch::Receiver<bool>,
        seen: &mut RecentEvents,
    ) -> Result<(), SagaError> {
        let store_id = self
            .store
            .database()
            .store_id()
            .await
            .map_err(|error| SagaError::Store(error.to_string()))?;
        let subscriber = KafkaSubscriber::assigned(
            kafka,
            &kafka.consumer_group,
            &store_id,
            partitions,
            held.keys().copied(),
        )
        .await?;
        let max = self.settings.batch_size as usize;
        // Polled from a stream, never cancelled: a batch being taken is not lost.
        let batches = futures::stream::unfold(&subscriber, |subscriber| async move {
            let batch = subscriber.next_batch(max, Duration::ZERO).await;
            Some((batch.map_err(SagaError::from), subscriber))
        });
        let scope = Scope {
            partitions,
            from: held
                .iter()
                .map(|(partition, lease)| (*partition, (*lease, StreamPosition::START)))
                .collect(),
        };
        self.pipeline(
            batches,
            stopped,
            seen,
            ownership.leases(),
            &scope,
            Acknowledge::Offsets(&subscriber),
        )
        .await
    }

    /// Handles the stream's events of the `held` partitions, each from its checkpoint,
    /// until stopped (`Ok`) or until an event's handling fails (`Err`).
    pub(crate) async fn follow_partitions(
        &self,
        ownership: &Ownership,
        held: &Owned,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<(), SagaError> {
        let database = self.store.database();
        // A partition never acknowledged on its own starts where the runner's one
        // checkpoint stood before partitions.
        let before_partitions = stream::load_checkpoint(database, CHECKPOINT).await?;
        let mut from = BTreeMap::new();
        for (partition, lease) in held {
            let saved =
                stream::load_checkpoint(database, &partition_checkpoint(*partition)).await?;
            from.insert(*partition, (*lease, saved.max(before_partitions)));
        }
        let start = from
            .values()
            .map(|(_, position)| *position)
            .min()
            .unwrap_or(before_partitions);
        // Where it resumes is what it has handled, as far as lag goes.
        self.progress
            .send_modify(|progress| progress.position = Some(start));
        let subscription = Subscription::open(
            &self.store,
            CHECKPOINT,
            start,
            self.settings.batch_size,
            Duration::from_millis(100),
        )
        .await?;
        let scope = Scope {
            partitions: ownership.partitions(),
            from,
        };
        self.pipeline(
            subscription.batches(),
            stopped,
            &mut RecentEvents::new(0),
            ownership.leases(),
            &scope,
            Acknowledge::Checkpoints,
        )
        .await
    }

    /// Handles the events of `batches` until stopped (`Ok`, once what arrived is handled) or
    /// until one's handling fails (`Err`): each order's events in its lane, up to
    /// `saga.max_concurrent_orders` lanes at once and `saga.batch_size` events
    /// unacknowledged ([`run_in_lanes`]). An event that cannot be decoded, or whose handling
    /// keeps failing because its history cannot be read, is set aside as a dead letter and
    /// the runner moves on.
    pub(crate) async fn pipeline(
        &self,
        batches: impl futures::Stream<Item = Result<Vec<RecordedEvent>, SagaError>>,
        stopped: &mut watch::Receiver<bool>,
        seen: &mut RecentEvents,
        leases: &Leases,
        scope: &Scope,
        acknowledge: Acknowledge<'_>,
    ) -> Result<(), SagaError> {
        let limits = LaneLimits {
            lanes: self.settings.max_concurrent_orders,
            outstanding: self.settings.batch_size as usize,
            acknowledge_every: ACKNOWLEDGE_EVERY,
        };
        let lanes = SagaLanes {
            runner: self,
            leases,
            scope,
            acknowledge,
        };
        run_in_lanes(&lanes, limits, batches, stopped, seen).await
    }
}
