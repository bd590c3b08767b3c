//! The idempotent producer as a pipeline sink: alerts and scores keyed by card, dead letters
//! unkeyed; each record's delivery report is its acknowledgement.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use rdkafka::consumer::{Consumer, StreamConsumer};

use super::context::GroupContext;
use super::txn::Transactor;
use crate::observe::Metrics;
use crate::state::RecordCache;
use crate::stream::acks::{Ack, ready};
use crate::stream::{Settled, Sink, StreamError};

/// How long the final flush waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Alerts, scores and dead letters to their topics.
pub struct KafkaSink {
    producer: FutureProducer,
    alerts: String,
    scores: Option<String>,
    dead_letters: Option<String>,
    changelog: Option<Changelog>,
    exactly_once: Option<ExactlyOnce>,
}

/// Card states on their way to the changelog topic, coalesced per card in a [`RecordCache`]
/// for one flush interval (see [`crate::state::cache`]).
struct Changelog {
    topic: String,
    metrics: Arc<Metrics>,
    cache: Arc<Mutex<RecordCache>>,
    interval: Duration,
}

impl Changelog {
    fn cache(&self) -> std::sync::MutexGuard<'_, RecordCache> {
        self.cache.lock().expect("changelog cache lock")
    }

    /// Holds a card's new state until the next flush.
    fn put(&self, partition: i32, card: &str, image: Vec<u8>) {
        if self.cache().put(partition, card, image) {
            self.metrics.changelog_coalesced.inc();
        }
    }

    /// Sends every held state, each to its card's input partition; their acknowledgements.
    fn flush(&self, producer: &FutureProducer) -> Vec<Ack> {
        flush_cache(&self.cache, producer, &self.topic, &self.metrics)
    }
}

/// Sends every state held in `cache` to `topic`, counted in `metrics`; their acknowledgements.
fn flush_cache(
    cache: &Mutex<RecordCache>,
    producer: &FutureProducer,
    topic: &str,
    metrics: &Metrics,
) -> Vec<Ack> {
    let records = cache.lock().expect("changelog cache lock").drain();
    let mut bytes = 0;
    let acks: Vec<Ack> = records
        .iter()
        .map(|r| {
            bytes += r.image.len() as u64;
            send_to(producer, topic, Some(r.partition), Some(&r.card), &r.image)
        })
        .collect();
    metrics.changelog_records.inc_by(acks.len() as u64);
    metrics.changelog_bytes.inc_by(bytes);
    acks
}

/// The transactions of exactly-once mode, and the consumer whose offsets they commit.
struct ExactlyOnce {
    transactor: Arc<Transactor>,
    consumer: Arc<StreamConsumer<GroupContext>>,
}

impl ExactlyOnce {
    /// Commits the open transaction (blocking the publishing task, not the runtime).
    fn commit(&self) -> Result<(), StreamError> {
        let group = self.consumer.group_metadata().ok_or_else(|| {
            StreamError::Sink("exactly-once: the consumer has no group metadata".into())
        })?;
        tokio::task::block_in_place(|| self.transactor.commit(&group)).map_err(StreamError::Sink)
    }
}

impl KafkaSink {
    /// A sink writing to these topics.
    pub fn new(
        producer: FutureProducer,
        alerts: String,
        scores: Option<String>,
        dead_letters: Option<String>,
    ) -> Self {
        KafkaSink {
            producer,
            alerts,
            scores,
            dead_letters,
            changelog: None,
            exactly_once: None,
        }
    }

    /// Exactly-once: every message's outputs go into `transactor`'s transactions, which commit
    /// the message's offset for `consumer`'s group. Call after [`KafkaSink::with_changelog`]:
    /// each transaction then writes the changelog cache before it commits, whoever commits it
    /// (this sink, or the consumer's rebalance callback).
    pub fn with_transactions(
        mut self,
        transactor: Arc<Transactor>,
        consumer: Arc<StreamConsumer<GroupContext>>,
    ) -> Self {
        if let Some(c) = &self.changelog {
            let (cache, producer) = (c.cache.clone(), self.producer.clone());
            let (topic, metrics) = (c.topic.clone(), c.metrics.clone());
            transactor.before_commit(Box::new(move || {
                // The transaction's commit waits for these deliveries and fails if one failed.
                drop(flush_cache(&cache, &producer, &topic, &metrics));
            }));
        }
        self.exactly_once = Some(ExactlyOnce {
            transactor,
            consumer,
        });
        self
    }

    /// Also writes card states to the changelog `topic`, each card's changes within `interval`
    /// coalesced into one record, counting them in `metrics`.
    pub fn with_changelog(
        mut self,
        topic: String,
        interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        self.changelog = Some(Changelog {
            topic,
            metrics,
            cache: Arc::default(),
            interval,
        });
        self
    }
}

/// Hands one record to the producer; its delivery report becomes the acknowledgement. A record
/// the producer refuses at once (queue full, too large) is a failed acknowledgement too.
pub fn send(producer: &FutureProducer, topic: &str, key: Option<&str>, payload: &str) -> Ack {
    send_to(producer, topic, None, key, payload.as_bytes())
}

/// Like [`send`], to an explicit partition (None: the producer's partitioner) and with a binary
/// payload.
pub fn send_to(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&str>,
    payload: &[u8],
) -> Ack {
    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    match producer.send_result(record) {
        Ok(delivery) => Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("the producer was dropped before delivery".into()),
            }
        }),
        Err((e, _)) => ready(Err(format!("producing to {topic}: {e}"))),
    }
}

impl Sink for KafkaSink {
    fn wants_scores(&self) -> bool {
        self.scores.is_some()
    }

    fn publish(&mut self, s: &mut Settled) -> Result<Vec<Ack>, StreamError> {
        let Some(eos) = &self.exactly_once else {
            return Ok(self.records(s));
        };
        let acks = eos
            .transactor
            .within(&s.origin.clone(), || Ok::<_, String>(self.records(s)))
            .map_err(StreamError::Sink)?;
        if eos.transactor.due() {
            eos.commit()?;
        }
        Ok(acks)
    }

    fn idle(&mut self) -> Result<(), StreamError> {
        match &self.exactly_once {
            Some(eos) => eos.commit(),
            None => Ok(()),
        }
    }

    // At-least-once with a changelog, offsets wait for the cache's flushes (exactly-once: the
    // transactions carry the cache and the offsets together).
    fn defers_offsets(&self) -> bool {
        self.changelog.is_some() && self.exactly_once.is_none()
    }

    fn barrier_due(&self) -> Option<tokio::time::Instant> {
        let c = self
            .changelog
            .as_ref()
            .filter(|_| self.exactly_once.is_none())?;
        c.cache()
            .deadline(c.interval)
            .map(tokio::time::Instant::from_std)
    }

    fn barrier(&mut self, force: bool) -> Result<Option<Vec<Ack>>, StreamError> {
        let Some(c) = self
            .changelog
            .as_ref()
            .filter(|_| self.exactly_once.is_none())
        else {
            return Ok(None);
        };
        let due = {
            let cache = c.cache();
            !cache.is_empty() && (force || cache.due(c.interval))
        };
        Ok(due.then(|| c.flush(&self.producer)))
    }

    async fn flush(&mut self) -> Result<(), StreamError> {
        if let Some(eos) = &self.exactly_once {
            eos.commit()?;
        }
        self.producer
            .flush(FLUSH_TIMEOUT)
            .map_err(|e| StreamError::Sink(format!("flushing the producer: {e}")))
    }
}

impl KafkaSink {
    /// Hands one message's records to the producer (its card's new state to the changelog
    /// cache).
    fn records(&self, s: &mut Settled) -> Vec<Ack> {
        let mut acks = Vec::new();
        let key = s.card_id.as_deref();
        if let Some(a) = &s.alert {
            acks.push(send(&self.producer, &self.alerts, key, &json(a)));
        }
        if let Some(topic) = &self.scores {
            for score in s.score.iter().chain(&s.challenger) {
                acks.push(send(&self.producer, topic, key, &json(score)));
            }
        }
        if let (Some(topic), Some(letter)) = (&self.dead_letters, &s.dead_letter) {
            acks.push(send(&self.producer, topic, None, &json(&**letter)));
        }
        // The card's new state, held until the next flush; the input offset is stored only once
        // a flush after it is acknowledged.
        if let (Some(c), Some(state), Some(card)) = (&self.changelog, s.changelog.take(), key) {
            c.put(s.origin.partition, card, state);
        }
        acks
    }
}

/// An output record as JSON text.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("output records serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_the_producer_refuses_is_a_failed_acknowledgement() {
        // No broker is needed to be refused: a message above the producer's own size limit
        // never leaves the client.
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.max.bytes", "1000")
            .create()
            .unwrap();
        let ack = send(&producer, "t", Some("k"), &"x".repeat(5_000));
        let err = ack.await.unwrap_err();
        assert!(err.contains("producing to t"), "{err}");
    }
}
