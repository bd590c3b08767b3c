//! Restoring cards from the changelog topic: read the assigned partitions from their beginning to
//! their end, keep each card's latest record below the group's committed input offset ([`Fold`]),
//! decode those against the running model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use thiserror::Error;

use super::image;
use crate::features::{CardState, WindowBuilder};

/// How long a restore may take before it gives up (100,000 cards take a few seconds).
pub const RESTORE_DEADLINE: Duration = Duration::from_secs(60);
/// After the partitions' ends are reached, the restore waits this long for nothing more (some
/// brokers report an end short of the last batch).
const RESTORE_QUIET: Duration = Duration::from_millis(300);

/// Why a restore failed.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// The broker refused or timed out.
    #[error("reading changelog topic {topic}: {error}")]
    Kafka {
        /// The changelog topic.
        topic: String,
        /// What librdkafka said.
        error: rdkafka::error::KafkaError,
    },
    /// Not done by [`RESTORE_DEADLINE`].
    #[error("restoring from {topic} did not finish within {}s", RESTORE_DEADLINE.as_secs())]
    Deadline {
        /// The changelog topic.
        topic: String,
    },
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreStats {
    /// Changelog records read.
    pub records: u64,
    /// Cards restored.
    pub cards: usize,
    /// Records skipped as written after the committed input offset (their transactions are read
    /// again).
    pub ahead: u64,
    /// Cards not restored, by [`super::ImageError::reason`].
    pub skipped: HashMap<&'static str, u64>,
    /// Wall time.
    pub seconds: f64,
    /// Cards that came from the local snapshot (the changelog read only after it).
    pub from_snapshot: usize,
    /// What became of the local snapshot: used, none, stale, corrupt, other_model, off.
    pub snapshot: &'static str,
}

/// One partition's records folded to each card's latest applicable record.
#[derive(Debug)]
pub struct Fold {
    committed: Option<i64>,
    latest: HashMap<String, Vec<u8>>,
    records: u64,
    ahead: u64,
    skipped: HashMap<&'static str, u64>,
}

/// Starts folding a partition whose group has committed input offset `committed` (None: nothing
/// committed, so every input record is read again and no record applies).
pub fn fold(committed: Option<i64>) -> Fold {
    Fold {
        committed,
        latest: HashMap::new(),
        records: 0,
        ahead: 0,
        skipped: HashMap::new(),
    }
}

impl Fold {
    /// Takes the next record of the partition (in offset order). A record without a payload is a
    /// tombstone: the card is forgotten.
    pub fn add(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        self.records += 1;
        let Some(key) = key.and_then(|k| std::str::from_utf8(k).ok()) else {
            *self.skipped.entry("corrupt").or_default() += 1;
            return;
        };
        let Some(payload) = payload else {
            self.latest.remove(key);
            return;
        };
        match image::input_offset(payload) {
            Ok(offset) if self.committed.is_some_and(|c| offset < c) => {
                self.latest.insert(key.to_string(), payload.to_vec());
            }
            Ok(_) => self.ahead += 1,
            Err(e) => *self.skipped.entry(e.reason()).or_default() += 1,
        }
    }

    /// Starts from a snapshot's cards (all reflecting input below the committed offset).
    pub fn seed(&mut self, cards: impl IntoIterator<Item = (String, Vec<u8>)>) {
        self.latest.extend(cards);
    }

    /// Decodes the cards for input partition `shard` and adds this fold's counts to `stats`.
    pub fn finish(
        self,
        builder: &WindowBuilder,
        shard: i32,
        stats: &mut RestoreStats,
    ) -> Vec<(String, CardState)> {
        stats.records += self.records;
        stats.ahead += self.ahead;
        for (reason, n) in self.skipped {
            *stats.skipped.entry(reason).or_default() += n;
        }
        let mut cards = Vec::with_capacity(self.latest.len());
        for (key, record) in self.latest {
            match image::decode(&record, builder, shard) {
                Ok(card) => cards.push((key, card)),
                Err(e) => *stats.skipped.entry(e.reason()).or_default() += 1,
            }
        }
        stats.cards += cards.len();
        cards
    }
}

/// The restore consumer's context: the end of a partition is how a restore knows it is done,
/// not an error worth a log line.
struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::warn!("changelog restore: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Reads changelog partitions for a restore.
#[derive(Clone)]
pub struct Restorer {
    config: ClientConfig,
    topic: String,
    snapshot: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Restorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restorer")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Restorer {
    /// A restorer reading `topic` with this client config (brokers, TLS, ...); it never joins a
    /// group nor commits.
    pub fn new(mut config: ClientConfig, topic: &str) -> Self {
        config
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        Restorer {
            config,
            topic: topic.to_string(),
            snapshot: None,
        }
    }

    /// Starts restores from the local snapshot at `path` when it can (see [`super::snapshot`]).
    pub fn with_snapshot(mut self, path: std::path::PathBuf) -> Self {
        self.snapshot = Some(path);
        self
    }

    /// The local snapshot, if there is one for this model, and what became of it.
    fn usable_snapshot(&self, builder: &WindowBuilder) -> (Option<super::Snapshot>, &'static str) {
        let Some(path) = &self.snapshot else {
            return (None, "off");
        };
        match super::snapshot::read(path) {
            Ok(s) if s.recipe == builder.fingerprint() => (Some(s), "used"),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "snapshot of another model: ignored");
                (None, "other_model")
            }
            Err(e @ super::SnapshotError::Missing(_)) => (None, e.status()),
            Err(e) => {
                tracing::warn!("{e}: restoring from the changelog alone");
                (None, e.status())
            }
        }
    }

    /// The changelog topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Reads `partitions` (each with its group's committed input offset) to their end and
    /// returns their cards, decoded for `builder`. Blocking.
    pub fn restore(
        &self,
        partitions: &[(i32, Option<i64>)],
        builder: &WindowBuilder,
    ) -> Result<(Vec<(String, CardState)>, RestoreStats), RestoreError> {
        let began = Instant::now();
        let kafka = |error| RestoreError::Kafka {
            topic: self.topic.clone(),
            error,
        };
        let consumer: BaseConsumer<QuietEof> =
            self.config.create_with_context(QuietEof).map_err(kafka)?;
        let (snapshot, mut status) = self.usable_snapshot(builder);
        let mut tpl = TopicPartitionList::new();
        let mut folds = HashMap::new();
        let mut from_snapshot = 0;
        for &(p, committed) in partitions {
            let mut f = fold(committed);
            let mut start = Offset::Beginning;
            // A partition starts from the snapshot when the commit is past all it holds: every
            // change in it is then committed, and later ones are in the changelog after it.
            let covered = snapshot.as_ref().and_then(|s| s.covered.get(&p).copied());
            if let (Some(s), Some(c), Some(m)) = (&snapshot, committed, covered) {
                if c > m {
                    let mut at = TopicPartitionList::new();
                    at.add_partition_offset(&self.topic, p, Offset::Offset(s.created_ms - 1_000))
                        .map_err(kafka)?;
                    let found = consumer
                        .offsets_for_times(at, Duration::from_secs(10))
                        .map_err(kafka)?;
                    if let Some(o) = found.find_partition(&self.topic, p).map(|e| e.offset()) {
                        let cards: Vec<(String, Vec<u8>)> = s
                            .cards
                            .iter()
                            .filter(|c| c.shard == p)
                            .map(|c| (c.key.clone(), c.record.clone()))
                            .collect();
                        from_snapshot += cards.len();
                        f.seed(cards);
                        start = o;
                    }
                } else {
                    status = "stale";
                }
            }
            tpl.add_partition_offset(&self.topic, p, start)
                .map_err(kafka)?;
            folds.insert(p, f);
        }
        consumer.assign(&tpl).map_err(kafka)?;
        // A partition is read once the consumer reports its end (for read_committed, the last
        // stable offset: records of aborted transactions are skipped, an open one is waited
        // for); then nothing more may come for RESTORE_QUIET.
        let mut reading: std::collections::HashSet<i32> = folds.keys().copied().collect();
        let mut last = Instant::now();
        while !(reading.is_empty() && last.elapsed() >= RESTORE_QUIET) {
            if began.elapsed() > RESTORE_DEADLINE {
                return Err(RestoreError::Deadline {
                    topic: self.topic.clone(),
                });
            }
            let m = match consumer.poll(Duration::from_millis(50)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    reading.remove(&p);
                    continue;
                }
                Some(m) => m.map_err(kafka)?,
            };
            last = Instant::now();
            if let Some(f) = folds.get_mut(&m.partition()) {
                f.add(m.key(), m.payload());
            }
        }
        let mut stats = RestoreStats::default();
        let mut cards = Vec::new();
        for (p, f) in folds {
            cards.extend(f.finish(builder, p, &mut stats));
        }
        stats.seconds = began.elapsed().as_secs_f64();
        stats.from_snapshot = from_snapshot;
        stats.snapshot = status;
        Ok((cards, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::CardStore;
    use crate::model::Bundle;
    use crate::schema::Transaction;

    fn record(store: &CardStore, b: &WindowBuilder, card: &str, ts: f64, offset: i64) -> Vec<u8> {
        store.observe(&Transaction {
            key: card.into(),
            ts,
            id: Some(format!("{card}-{offset}")),
            label: None,
            labelled_at: None,
            numeric: vec![20.0],
            context: vec!["t".into()],
        });
        store
            .with_card(card, |c| image::encode(c, b.fingerprint(), offset))
            .unwrap()
    }

    #[test]
    fn only_records_below_the_committed_offset_are_applied_latest_first() {
        let b = Bundle::embedded_default(&candle_core::Device::Cpu)
            .unwrap()
            .window_builder();
        let store = CardStore::new(b.clone());
        let a0 = record(&store, &b, "a", 1e9, 0);
        let b1 = record(&store, &b, "b", 1e9, 1);
        let a2 = record(&store, &b, "a", 1e9 + 60.0, 2);
        let a3 = record(&store, &b, "a", 1e9 + 120.0, 3);
        let c4 = record(&store, &b, "c", 1e9, 4);
        let mut f = fold(Some(3));
        for (key, payload) in [("a", &a0), ("b", &b1), ("a", &a2), ("a", &a3), ("c", &c4)] {
            f.add(Some(key.as_bytes()), Some(payload));
        }
        f.add(None, Some(&a0));
        f.add(Some(b"d"), Some(b"\x07garbage-record"));
        let mut stats = RestoreStats::default();
        let mut cards = f.finish(&b, 5, &mut stats);
        cards.sort_by(|x, y| x.0.cmp(&y.0));
        let keys: Vec<&str> = cards.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(keys, ["a", "b"], "c was written after the commit");
        // a's state is the one after offset 2 (2 transactions), not after 3.
        assert_eq!(cards[0].1.window.len(), 2);
        assert!(cards.iter().all(|c| c.1.shard == 5));
        assert_eq!((stats.records, stats.ahead, stats.cards), (7, 2, 2));
        assert_eq!(stats.skipped.get("corrupt"), Some(&1));
        assert_eq!(stats.skipped.get("version"), Some(&1));
    }

    #[test]
    fn a_tombstone_forgets_a_card_and_nothing_applies_without_a_commit() {
        let b = Bundle::embedded_default(&candle_core::Device::Cpu)
            .unwrap()
            .window_builder();
        let store = CardStore::new(b.clone());
        let a0 = record(&store, &b, "a", 1e9, 0);
        let mut f = fold(Some(10));
        f.add(Some(b"a"), Some(&a0));
        f.add(Some(b"a"), None);
        let mut stats = RestoreStats::default();
        assert!(f.finish(&b, 0, &mut stats).is_empty());
        let mut f = fold(None);
        f.add(Some(b"a"), Some(&a0));
        assert!(f.finish(&b, 0, &mut stats).is_empty());
        assert_eq!(stats.ahead, 1);
    }
}
