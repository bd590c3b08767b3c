//! The changelog's record cache (Kafka Streams' idea): a card's state changes within one flush
//! interval are coalesced into one changelog record, its latest. The cache is flushed as a whole
//! (every interval, when it holds [`MAX_CACHE_BYTES`], before partitions are revoked, at the end
//! of a run, and in exactly-once mode inside each transaction before it commits).
//!
//! Why offsets wait for the flush: a coalesced record covers a range of input offsets. If a
//! committed offset fell inside that range, a restore would find the card's record *ahead* of the
//! commit and fall back to an older one, silently missing the transactions before the commit. So
//! at-least-once input offsets are stored only at flush boundaries (the pipeline acknowledger's
//! barriers): after a flush every card's latest record is below the offset
//! stored, and every record written later is at or after it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a card's state changes are coalesced before the changelog gets them (100 ms: Kafka
/// Streams' commit interval in exactly-once mode; a restart re-reads at most this much more).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The longest flush interval accepted: a revocation flushes at once, but the periodic commit of
/// stored offsets (librdkafka's auto-commit, 5 s by default) should see a boundary every second.
pub const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The cache is flushed early once its records reach this size (Kafka Streams buffers 10 MB).
pub const MAX_CACHE_BYTES: usize = 16 << 20;

/// One card's latest state record, and when it was last changed (flush order).
#[derive(Debug)]
struct Entry {
    seq: u64,
    image: Vec<u8>,
}

/// A record ready for the changelog: the input partition (= changelog partition), the card and
/// its state.
#[derive(Debug, PartialEq)]
pub struct CachedRecord {
    /// The changelog partition: the card's input partition.
    pub partition: i32,
    /// The record key.
    pub card: String,
    /// The card's latest state ([`super::image`]).
    pub image: Vec<u8>,
}

/// Card states not yet written, one per card (per input partition).
#[derive(Debug, Default)]
pub struct RecordCache {
    parts: HashMap<i32, HashMap<String, Entry>>,
    seq: u64,
    bytes: usize,
    since: Option<Instant>,
}

impl RecordCache {
    /// Holds `card`'s new state; returns whether it replaced a state not yet written (coalesced).
    pub fn put(&mut self, partition: i32, card: &str, image: Vec<u8>) -> bool {
        self.seq += 1;
        self.since.get_or_insert_with(Instant::now);
        self.bytes += image.len();
        let part = self.parts.entry(partition).or_default();
        let entry = Entry {
            seq: self.seq,
            image,
        };
        match part.get_mut(card) {
            Some(old) => {
                self.bytes -= old.image.len();
                *old = entry;
                true
            }
            None => {
                part.insert(card.to_string(), entry);
                false
            }
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.since.is_none()
    }

    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the held records must be written: `interval` after the oldest unwritten change
    /// (None when nothing is held).
    pub fn deadline(&self, interval: Duration) -> Option<Instant> {
        self.since.map(|s| s + interval)
    }

    /// Whether the held records must be written now: the interval ran out or the cache is full.
    pub fn due(&self, interval: Duration) -> bool {
        self.deadline(interval)
            .is_some_and(|d| Instant::now() >= d || self.bytes >= MAX_CACHE_BYTES)
    }

    /// Takes every held record out, in the order of their cards' last change.
    pub fn drain(&mut self) -> Vec<CachedRecord> {
        let mut out: Vec<(u64, CachedRecord)> = Vec::new();
        for (partition, cards) in self.parts.drain() {
            out.extend(cards.into_iter().map(|(card, e)| {
                let record = CachedRecord {
                    partition,
                    card,
                    image: e.image,
                };
                (e.seq, record)
            }));
        }
        out.sort_unstable_by_key(|(seq, _)| *seq);
        self.bytes = 0;
        self.since = None;
        out.into_iter().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cards_changes_coalesce_to_its_latest_and_records_leave_in_change_order() {
        let mut c = RecordCache::default();
        assert!(c.is_empty() && c.deadline(Duration::ZERO).is_none());
        assert!(!c.put(0, "a", vec![1]));
        assert!(!c.put(1, "b", vec![2, 2]));
        assert!(!c.put(0, "c", vec![3]));
        assert!(c.put(0, "a", vec![4, 4, 4]), "a's second change coalesces");
        // The same card id in another partition is another card.
        assert!(!c.put(1, "a", vec![5]));
        assert_eq!(c.bytes(), 2 + 1 + 3 + 1);
        let records = c.drain();
        let order: Vec<(i32, &str, &[u8])> = records
            .iter()
            .map(|r| (r.partition, r.card.as_str(), r.image.as_slice()))
            .collect();
        assert_eq!(
            order,
            [
                (1, "b", &[2, 2][..]),
                (0, "c", &[3][..]),
                (0, "a", &[4, 4, 4][..]),
                (1, "a", &[5][..]),
            ]
        );
        assert!(c.is_empty() && c.bytes() == 0 && c.drain().is_empty());
    }

    #[test]
    fn the_cache_is_due_after_its_interval_or_when_full() {
        let mut c = RecordCache::default();
        assert!(!c.due(Duration::ZERO), "an empty cache is never due");
        c.put(0, "a", vec![0; 10]);
        assert!(!c.due(Duration::from_secs(60)));
        assert!(c.due(Duration::ZERO));
        c.put(0, "b", vec![0; MAX_CACHE_BYTES]);
        assert!(c.due(Duration::from_secs(60)), "full");
        c.drain();
        assert!(!c.due(Duration::ZERO));
    }
}
