//! Consuming the topics: in a consumer group, or the partitions a saga runner owns.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use petstore_domain::partition::{Partition, Partitions};
use petstore_event_store::stream::{Delivery, RecordedEvent};
use petstore_settings::KafkaSettings;

use crate::envelope::{header, topics, Envelope, STORE_HEADER};
use crate::topics::ensure_topics;
use crate::{brokers, BusError};

/// A consumer of the service's topics: a group member, or one assigned its partitions.
pub struct KafkaSubscriber {
    consumer: StreamConsumer,
    store_id: String,
    /// The partitions where another store's message was skipped (each logged once).
    skipped: std::sync::Mutex<HashSet<(String, i32)>>,
}

impl KafkaSubscriber {
    /// Creates the service's topics if need be (one partition per saga partition of
    /// `partitions`), joins `group` and subscribes to every topic,
    /// for the events of the store `store_id` (others' messages are skipped, each partition
    /// logged once). Offsets are committed only by [`Self::commit`]; a new group starts from
    /// the earliest offset. (Subscribing to a topic that does not exist yet would leave its
    /// partitions unassigned until the next metadata refresh, and the events published
    /// meanwhile unhandled for that long.)
    pub async fn new(
        settings: &KafkaSettings,
        group: &str,
        store_id: &str,
        partitions: Partitions,
    ) -> Result<Self, BusError> {
        let subscriber = Self::connect(settings, group, store_id, partitions).await?;
        let names = topics(&settings.topic_prefix);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        subscriber.consumer.subscribe(&names)?;
        Ok(subscriber)
    }

    /// Like [`Self::new`], but consumes only the saga partitions `owned`, of every topic,
    /// assigned by the caller rather than by the group (which only keeps the offsets): each
    /// starts at the group's committed offset (the earliest without one). Nothing waits for a
    /// rebalance: whoever owns a partition (through its lease) consumes it at once.
    pub async fn assigned(
        settings: &KafkaSettings,
        group: &str,
        store_id: &str,
        partitions: Partitions,
        owned: impl IntoIterator<Item = Partition>,
    ) -> Result<Self, BusError> {
        let subscriber = Self::connect(settings, group, store_id, partitions).await?;
        let owned: Vec<Partition> = owned.into_iter().collect();
        let mut list = TopicPartitionList::new();
        for topic in topics(&settings.topic_prefix) {
            for partition in &owned {
                list.add_partition_offset(&topic, partition.kafka(), Offset::Stored)?;
            }
        }
        subscriber.consumer.assign(&list)?;
        Ok(subscriber)
    }

    /// A consumer in `group` (offsets committed only by [`Self::commit`]; the earliest
    /// offset where the group has none), the topics made sure of first.
    async fn connect(
        settings: &KafkaSettings,
        group: &str,
        store_id: &str,
        partitions: Partitions,
    ) -> Result<Self, BusError> {
        ensure_topics(settings, partitions).await?;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers(settings)?)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", settings.fetch_wait_max_ms.to_string())
            // Notice re-created topics within seconds, not the default five minutes.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create()?;
        Ok(Self {
            consumer,
            store_id: store_id.to_owned(),
            skipped: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// Waits for one message, then takes whatever else arrives within `linger`, up to `max`.
    /// Not cancel-safe: a message taken by a cancelled call is lost to this consumer (poll
    /// it from a stream that keeps the call).
    pub async fn next_batch(
        &self,
        max: usize,
        linger: Duration,
    ) -> Result<Vec<RecordedEvent>, BusError> {
        let mut batch = Vec::new();
        while batch.is_empty() {
            let first = self.consumer.recv().await?;
            batch.extend(self.take(&first)?);
        }
        let until = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Ok(message) => {
                    let message = message?;
                    batch.extend(self.take(&message)?);
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// The message's event, or `None` for another store's message (passed over, not
    /// handled: a later commit on its partition covers it).
    fn take(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<Option<RecordedEvent>, BusError> {
        let store = header(message, STORE_HEADER);
        if store.as_deref() != Some(self.store_id.as_str()) {
            let first = self
                .skipped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((message.topic().to_owned(), message.partition()));
            if first {
                tracing::warn!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    found = store.as_deref().unwrap_or("none"),
                    store = %self.store_id,
                    "skipping messages of another event store on this partition (not handled)"
                );
            }
            return Ok(None);
        }
        let envelope: Envelope = serde_json::from_slice(message.payload().unwrap_or_default())
            .map_err(|source| BusError::Envelope {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                source,
            })?;
        let mut event = RecordedEvent::from(envelope);
        event.delivery = Some(Delivery {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            traceparent: header(message, "traceparent"),
        });
        Ok(Some(event))
    }

    /// Commits that everything up to `offsets` (topic, partition, last handled offset) is
    /// handled; `wait` for the broker's answer, else the commit goes out in the background
    /// (a lost one only means those messages are handled again, harmlessly).
    pub fn commit(
        &self,
        offsets: &HashMap<(String, i32), i64>,
        wait: bool,
    ) -> Result<(), BusError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::with_capacity(offsets.len());
        for ((topic, partition), offset) in offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
        }
        let mode = if wait {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        Ok(self.consumer.commit(&list, mode)?)
    }
}
