//! The service's topics: created with their partitions, and bound to one event store.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use petstore_domain::partition::Partitions;
use petstore_settings::KafkaSettings;

use crate::envelope::{header, topics, STORE_HEADER};
use crate::{brokers, BusError};

/// Creates the service's topics, one partition per saga partition; existing ones are kept.
pub(crate) async fn ensure_topics(
    settings: &KafkaSettings,
    partitions: Partitions,
) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers(settings)?)
        .create()?;
    let names = topics(&settings.topic_prefix);
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                i32::try_from(partitions.count()).expect("at most MAX_PARTITIONS"),
                TopicReplication::Fixed(settings.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_millis(settings.message_timeout_ms)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// How long [`check_topics`] may take.
const OWNER_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that the service's topics are this event store's: each has one partition per saga
/// partition (else [`BusError::PartitionCount`]), and the latest message of every partition
/// carries `store_id` in its `store_id` header. Missing topics pass, and empty ones as far as
/// their messages go. A message of another store, or with no store at all (written before
/// identities), is [`BusError::ForeignTopics`].
pub async fn check_topics(
    settings: &KafkaSettings,
    store_id: &str,
    partitions: Partitions,
) -> Result<(), BusError> {
    let settings = settings.clone();
    let store_id = store_id.to_owned();
    tokio::task::spawn_blocking(move || check_blocking(&settings, &store_id, partitions))
        .await
        .map_err(|_| BusError::Cancelled)?
}

fn check_blocking(
    settings: &KafkaSettings,
    store_id: &str,
    partitions: Partitions,
) -> Result<(), BusError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers(settings)?)
        // Assigned partitions only: it never joins or commits to this group.
        .set("group.id", format!("{}-owner-check", settings.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let deadline = Instant::now() + OWNER_CHECK_TIMEOUT;
    let metadata = consumer.fetch_metadata(None, OWNER_CHECK_TIMEOUT)?;
    let names: HashSet<String> = topics(&settings.topic_prefix).into_iter().collect();
    let mut latest = TopicPartitionList::new();
    let mut pending = HashSet::new();
    for topic in metadata.topics() {
        if !names.contains(topic.name()) {
            continue;
        }
        if topic.partitions().len() != partitions.count() as usize {
            return Err(BusError::PartitionCount {
                topic: topic.name().to_owned(),
                prefix: settings.topic_prefix.clone(),
                found: topic.partitions().len(),
                partitions: partitions.count(),
            });
        }
        for partition in topic.partitions() {
            let (low, high) =
                consumer.fetch_watermarks(topic.name(), partition.id(), OWNER_CHECK_TIMEOUT)?;
            if high > low {
                latest.add_partition_offset(
                    topic.name(),
                    partition.id(),
                    Offset::Offset(high - 1),
                )?;
                pending.insert((topic.name().to_owned(), partition.id()));
            }
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    consumer.assign(&latest)?;
    while !pending.is_empty() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(BusError::Timeout(OWNER_CHECK_TIMEOUT));
        };
        let Some(message) = consumer.poll(left.min(Duration::from_millis(100))) else {
            continue;
        };
        let message = message?;
        if !pending.remove(&(message.topic().to_owned(), message.partition())) {
            continue;
        }
        let found = header(&message, STORE_HEADER);
        if found.as_deref() != Some(store_id) {
            return Err(BusError::ForeignTopics {
                topic: message.topic().to_owned(),
                prefix: settings.topic_prefix.clone(),
                partition: message.partition(),
                found: match found {
                    Some(other) => format!("events of the event store {other}"),
                    None => "events with no store identity (written before identities)".to_owned(),
                },
                store: store_id.to_owned(),
            });
        }
    }
    Ok(())
}
