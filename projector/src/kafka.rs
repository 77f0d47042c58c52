//! The Kafka projection: publishes every event of the global stream to its topic. Its
//! checkpoint (`kafka` in `stream_checkpoints`) moves only after the broker acknowledged the
//! whole batch, so a broker outage stalls it and nothing is lost; a crash between delivery
//! and checkpoint publishes that batch again (consumers deduplicate by event id).

use petstore_platform::bus::{KafkaBus, Trace};
use petstore_platform::database::{Database, Fence};
use petstore_platform::stream::{self, RecordedEvent, StreamPosition};

use crate::projection::{Projection, ProjectionError};

/// The checkpoint name of the Kafka projection.
pub const CHECKPOINT: &str = "kafka";

/// Publishes the global stream to Kafka.
pub struct KafkaProjection {
    bus: std::sync::Mutex<KafkaBus>,
    database: Database,
    topics_ready: std::sync::atomic::AtomicBool,
}

impl KafkaProjection {
    /// Publishes with `bus`, keeping its checkpoint in `database`.
    pub fn new(bus: KafkaBus, database: Database) -> Self {
        Self {
            bus: std::sync::Mutex::new(bus),
            database,
            topics_ready: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Projection for KafkaProjection {
    fn name(&self) -> &'static str {
        CHECKPOINT
    }

    async fn position(&self) -> Result<StreamPosition, ProjectionError> {
        Ok(stream::load_checkpoint(&self.database, CHECKPOINT).await?)
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<(), ProjectionError> {
        let Some(last) = events.last() else {
            return Ok(());
        };
        let bus = self
            .bus
            .lock()
            .map(|bus| bus.clone())
            .map_err(|_| ProjectionError::Bus(petstore_platform::bus::BusError::Cancelled))?;
        // Topics are created on first use, not at start-up, so a broker that is down when the
        // service starts stalls this projection instead of the service.
        if !self.topics_ready.load(std::sync::atomic::Ordering::Relaxed) {
            bus.ensure_topics().await?;
            self.topics_ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(error) = bus.publish(events, Trace::Continue).await {
            // The broker may have come back without the topics, or without the producer's
            // state: check the topics and start a new producer before the retry.
            self.topics_ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if let (Ok(fresh), Ok(mut slot)) = (bus.renewed(), self.bus.lock()) {
                *slot = fresh;
            }
            return Err(error.into());
        }
        stream::save_checkpoint(&self.database, CHECKPOINT, last.position, fence).await?;
        Ok(())
    }
}
