//! The labels consumer: every partition of the labels topic, read outside the consumer group
//! (every instance needs every label), joined to remembered scores for live quality. Bad labels
//! are dead-lettered like bad transactions.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use thiserror::Error;

use super::config::{KafkaSettings, client_config};
use super::sink::send;
use super::source::envelope;
use crate::stream::{Detector, Event};

/// Labels are not latency-critical: fetch in 100 ms rounds.
const LABELS_FETCH_WAIT_MS: &str = "100";
/// How often to look again for a labels topic that does not exist yet.
const TOPIC_RETRY: Duration = Duration::from_secs(5);
/// How long a metadata request for the labels topic may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the labels topic cannot be read (yet).
#[derive(Debug, Error)]
enum LabelsTopicError {
    #[error("{0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("no metadata for the topic")]
    Unknown,
    #[error("{0:?}")]
    Broker(rdkafka::types::RDKafkaRespErr),
    #[error("the topic has no partitions")]
    Empty,
}

/// Starts reading `topic` from its end (labels for scores this process has not made cannot
/// match). Labels need no offsets: a restarted detector remembers no scores to join them to.
pub fn spawn_labels(
    detector: Arc<Detector>,
    s: &KafkaSettings,
    topic: &str,
    producer: FutureProducer,
) -> Result<tokio::task::JoinHandle<()>, rdkafka::error::KafkaError> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        client_config(
            &s.brokers,
            &s.extra,
            &[
                ("group.id", &format!("{}-labels", s.group)),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                ("fetch.wait.max.ms", LABELS_FETCH_WAIT_MS),
            ],
        )
        .create()?,
    );
    let (topic, dead_letter_topic) = (topic.to_string(), s.dead_letter_topic.clone());
    Ok(tokio::spawn(async move {
        wait_and_assign(&consumer, &topic).await;
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    if let Err(letter) = detector.label(&envelope(&m, 0)) {
                        Event::LabelDeadLettered(&letter).emit(detector.metrics());
                        if let Some(dlq) = &dead_letter_topic {
                            let payload =
                                serde_json::to_string(&*letter).expect("dead letter serialises");
                            // Labels carry no offsets to hold back: a lost dead letter is logged.
                            if let Err(e) = send(&producer, dlq, None, &payload).await {
                                tracing::error!(topic = %dlq, "label dead letter lost: {e}");
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("labels consumer: {e}"),
            }
        }
    }))
}

/// Waits for the topic to exist, then takes all of its partitions at their end.
async fn wait_and_assign(consumer: &Arc<StreamConsumer>, topic: &str) {
    loop {
        let (c, t) = (consumer.clone(), topic.to_string());
        let assigned = tokio::task::spawn_blocking(move || assign_from_end(&c, &t)).await;
        match assigned {
            Ok(Ok(n)) => {
                tracing::info!(topic, partitions = n, "reading labels");
                return;
            }
            Ok(Err(e)) => tracing::warn!(topic, "labels topic not readable yet: {e}"),
            Err(e) => tracing::warn!(topic, "labels topic not readable yet: {e}"),
        }
        tokio::time::sleep(TOPIC_RETRY).await;
    }
}

/// Assigns every partition of `topic` at its end; returns how many.
fn assign_from_end(consumer: &StreamConsumer, topic: &str) -> Result<usize, LabelsTopicError> {
    let meta = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let t = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or(LabelsTopicError::Unknown)?;
    if let Some(e) = t.error() {
        return Err(LabelsTopicError::Broker(e));
    }
    if t.partitions().is_empty() {
        return Err(LabelsTopicError::Empty);
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::End)?;
    }
    consumer.assign(&tpl)?;
    Ok(t.partitions().len())
}
