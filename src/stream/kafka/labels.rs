//! The labels consumer: every partition of the labels topic, read outside the consumer group
//! (every instance needs every label). Labels feed the label-rate tables (when the spec has
//! label-rate features) and are joined to remembered scores for live quality. Bad labels are
//! dead-lettered like bad transactions.
//!
//! With label-rate features the topic is read from its beginning: the retained history restores
//! the tables (like a Kafka Streams global table) before any transaction is consumed, so every
//! instance starts from the same tables. Without them it is read from its end (labels for
//! scores this process has not made cannot match).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset};
use thiserror::Error;
use tokio::sync::watch;

use super::config::{KafkaSettings, client_config};
use super::sink::send;
use super::source::envelope;
use crate::schema::StateScope;
use crate::stream::{Detector, Event, LabelUse};

/// Labels are not latency-critical: fetch in 100 ms rounds.
const LABELS_FETCH_WAIT_MS: &str = "100";
/// How often to look again for a labels topic that does not exist yet.
const TOPIC_RETRY: Duration = Duration::from_secs(5);
/// How long a metadata or watermark request for the labels topic may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Restoring is over once every partition reached its start-up high watermark and no label
/// came for this long (some brokers report a high watermark short of the last batch).
const RESTORE_QUIET: Duration = Duration::from_secs(1);

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

/// The running labels consumer and whether its history is restored.
pub struct Labels {
    /// The consumer task.
    pub task: tokio::task::JoinHandle<()>,
    /// True once the label-rate tables hold the topic's history (at once without them).
    pub restored: watch::Receiver<bool>,
    /// The consumer (the task holds a clone), closed by the caller once the task has ended.
    pub consumer: Arc<StreamConsumer>,
}

/// Starts reading `topic` (from its beginning when the spec has label-rate features, else
/// from its end).
pub fn spawn_labels(
    detector: Arc<Detector>,
    s: &KafkaSettings,
    topic: &str,
    producer: FutureProducer,
) -> Result<Labels, rdkafka::error::KafkaError> {
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
    let history = detector.spec().needs(StateScope::Labels);
    let (restored_tx, restored) = watch::channel(!history);
    detector.metrics().set_restored(!history);
    let (topic, dead_letter_topic) = (topic.to_string(), s.dead_letter_topic.clone());
    let closing = consumer.clone();
    let task = tokio::spawn(async move {
        let start = if history {
            Offset::Beginning
        } else {
            Offset::End
        };
        let mut ends = wait_and_assign(&consumer, &topic, start, || {
            if history && !*restored_tx.borrow() {
                // No topic, no history: start from empty tables rather than never.
                tracing::warn!(
                    topic,
                    "no labels topic yet: label-rate features start from empty tables"
                );
                detector.metrics().set_restored(true);
                let _ = restored_tx.send(true);
            }
        })
        .await;
        let began = Instant::now();
        let mut last_label = Instant::now();
        let mut restoring = history && !*restored_tx.borrow();
        loop {
            let next = tokio::time::timeout(RESTORE_QUIET, consumer.recv()).await;
            if restoring && ends.is_empty() && last_label.elapsed() >= RESTORE_QUIET {
                restoring = false;
                let (keys, labels) = detector.label_state();
                tracing::info!(
                    labels,
                    keys,
                    seconds = began.elapsed().as_secs_f64(),
                    "label tables restored from the labels topic"
                );
                detector.metrics().set_restored(true);
                let _ = restored_tx.send(true);
            }
            let m = match next {
                Err(_) => continue,
                Ok(Err(e)) => {
                    tracing::warn!("labels consumer: {e}");
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            last_label = Instant::now();
            if ends
                .get(&m.partition())
                .is_some_and(|&end| m.offset() + 1 >= end)
            {
                ends.remove(&m.partition());
            }
            // Labels are keyed by card, partitioned like the input: a label of a partition
            // another member holds is that member's to join.
            let use_ = if restoring {
                LabelUse::History
            } else if detector.holds(m.partition()) {
                LabelUse::Live
            } else {
                LabelUse::Elsewhere
            };
            if let Err(letter) = detector.label_at(&envelope(&m, 0), use_) {
                Event::LabelDeadLettered(&letter).emit(detector.metrics());
                if let Some(dlq) = &dead_letter_topic {
                    let payload = serde_json::to_string(&*letter).expect("dead letter serialises");
                    // Labels carry no offsets to hold back: a lost dead letter is logged.
                    if let Err(e) = send(&producer, dlq, None, &payload).await {
                        tracing::error!(topic = %dlq, "label dead letter lost: {e}");
                    }
                }
            }
        }
    });
    Ok(Labels {
        task,
        restored,
        consumer: closing,
    })
}

/// Waits for the topic to exist, then takes all of its partitions at `start`; returns the
/// partitions that hold history to restore, with their high watermarks.
async fn wait_and_assign(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    start: Offset,
    on_missing: impl Fn(),
) -> HashMap<i32, i64> {
    loop {
        let (c, t) = (consumer.clone(), topic.to_string());
        let assigned = tokio::task::spawn_blocking(move || assign(&c, &t, start)).await;
        match assigned {
            Ok(Ok(ends)) => {
                tracing::info!(topic, ?start, "reading labels");
                return ends;
            }
            Ok(Err(e)) => tracing::warn!(topic, "labels topic not readable yet: {e}"),
            Err(e) => tracing::warn!(topic, "labels topic not readable yet: {e}"),
        }
        on_missing();
        tokio::time::sleep(TOPIC_RETRY).await;
    }
}

/// Assigns every partition of `topic` at `start`; returns the non-empty partitions' high
/// watermarks when reading from the beginning (the history to restore).
fn assign(
    consumer: &StreamConsumer,
    topic: &str,
    start: Offset,
) -> Result<HashMap<i32, i64>, LabelsTopicError> {
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
    let mut ends = HashMap::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), start)?;
        if start == Offset::Beginning {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)?;
            if high > low {
                ends.insert(p.id(), high);
            }
        }
    }
    consumer.assign(&tpl)?;
    Ok(ends)
}
