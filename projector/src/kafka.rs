//! The Kafka projection: publishes every event of the global stream to its topic. Batches
//! are handed to the producer one after another while earlier ones are still being
//! acknowledged ([`InFlight`]); the checkpoint (`kafka` in `stream_checkpoints`) moves only
//! over the acknowledged prefix, so a broker outage stalls it and nothing is lost. A crash,
//! or a failed batch, publishes everything after the checkpoint again (consumers deduplicate
//! by event id). Where the broker put each event (topic, partition, offset) is recorded with
//! the checkpoint that passes it ([`published`]), for the order timeline.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;
use petstore_event_store::database::{Database, Fence};
use petstore_event_store::published::{self, Published};
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use petstore_kafka::{BusError, InFlight, KafkaBus, Trace};
use tokio::sync::Mutex;

use crate::projection::{Projection, ProjectionError};

/// The checkpoint name of the Kafka projection.
pub const CHECKPOINT: &str = "kafka";

/// Publishes the global stream to Kafka.
pub struct KafkaProjection {
    in_flight: Mutex<InFlight>,
    database: Database,
    topics_ready: AtomicBool,
}

impl KafkaProjection {
    /// Publishes with `bus`, keeping its checkpoint in `database`.
    pub fn new(bus: KafkaBus, database: Database) -> Self {
        Self {
            in_flight: Mutex::new(InFlight::new(bus)),
            database,
            topics_ready: AtomicBool::new(false),
        }
    }

    /// Moves the checkpoint to `acknowledged`, when the acknowledged prefix moved; after a
    /// failure, starts over with a fresh producer (the broker may have come back without the
    /// topics, or without the producer's state) and answers the failure.
    async fn settled(
        &self,
        in_flight: &mut InFlight,
        acknowledged: Result<Option<StreamPosition>, BusError>,
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        match acknowledged {
            Ok(Some(position)) => {
                let at = Utc::now();
                let published: Vec<Published> = in_flight
                    .take_delivered()
                    .into_iter()
                    .map(|delivered| Published {
                        global_position: delivered.global_position,
                        topic: delivered.topic,
                        partition: delivered.partition,
                        offset: delivered.offset,
                        at,
                    })
                    .collect();
                published::save_checkpoint_with(
                    &self.database,
                    CHECKPOINT,
                    position,
                    fence,
                    &published,
                )
                .await?;
                Ok(Some(position))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                self.topics_ready.store(false, Ordering::Relaxed);
                if let Err(renewing) = in_flight.restart() {
                    tracing::warn!(error = %renewing, "cannot start a new producer");
                }
                Err(error.into())
            }
        }
    }
}

impl Projection for KafkaProjection {
    fn name(&self) -> &'static str {
        CHECKPOINT
    }

    async fn position(&self) -> Result<StreamPosition, ProjectionError> {
        // Asked when the projector (re)starts from the checkpoint: whatever an earlier run
        // left in flight is published again from there.
        self.in_flight.lock().await.forget();
        Ok(stream::load_checkpoint(&self.database, CHECKPOINT).await?)
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        let mut in_flight = self.in_flight.lock().await;
        // Topics are created on first use, not at start-up, so a broker that is down when the
        // service starts stalls this projection instead of the service.
        if !self.topics_ready.load(Ordering::Relaxed) {
            in_flight.bus().ensure_topics().await?;
            self.topics_ready.store(true, Ordering::Relaxed);
        }
        let acknowledged = in_flight.push(events, Trace::Continue).await;
        self.settled(&mut in_flight, acknowledged, fence).await
    }

    async fn settle(
        &self,
        fence: Option<&Fence>,
    ) -> Result<Option<StreamPosition>, ProjectionError> {
        let mut in_flight = self.in_flight.lock().await;
        let acknowledged = in_flight.acknowledged(true).await;
        self.settled(&mut in_flight, acknowledged, fence).await
    }
}
