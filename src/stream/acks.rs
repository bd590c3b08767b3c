//! The ordered acknowledger and the partition assignment it respects, free of any transport.
//!
//! At-least-once: a message's offset is stored only once every output it caused (alert, score,
//! dead letter) is acknowledged, AND every earlier message of its partition was stored. Outputs
//! leave the pipeline in consumption order, so awaiting each message's acknowledgements in that
//! order and storing as they complete keeps both promises. A partition whose delivery failed
//! stores nothing more in this run: its failed message is read again after a restart.
//!
//! Revocation: [`Assignment::revoke`] bumps the partition's generation, so work read under the
//! old generation is dropped before it is published, then waits for what was already published
//! to be stored, and only then lets the transport commit.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::records::Origin;

/// Resolves when one output is durable (Kafka: the broker's acknowledgement; files: written),
/// or to the reason it is not.
pub type Ack = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// An already-settled acknowledgement.
pub fn ready(result: Result<(), String>) -> Ack {
    Box::pin(std::future::ready(result))
}

/// Where offsets go once their message is fully handled (Kafka: the consumer's offset store,
/// committed by librdkafka; files: nowhere).
pub trait OffsetStore: Send + Sync {
    /// Marks the message at `origin` as handled.
    fn store(&self, origin: &Origin) -> Result<(), String>;
}

/// A store that keeps nothing (files: a re-run starts from the first line).
#[derive(Debug, Default)]
pub struct NoOffsets;

impl OffsetStore for NoOffsets {
    fn store(&self, _: &Origin) -> Result<(), String> {
        Ok(())
    }
}

/// What must be acknowledged before one message's offset is stored.
pub struct Delivery {
    /// The message.
    pub origin: Origin,
    /// Its outputs' acknowledgements.
    pub acks: Vec<Ack>,
    /// For a scored transaction, its transport timestamp (ms) and ingestion instant: its
    /// end-to-end latency ends at the acknowledgement.
    pub timing: Option<(Option<i64>, Instant)>,
}

#[derive(Debug, Default)]
struct Part {
    generation: u64,
    in_flight: usize,
}

/// The partitions of the input topic this instance reads, each with a generation that changes
/// when it is revoked, and a count of published messages not yet stored. (One source reads one
/// topic, so partitions are keyed by number: no allocation per message.)
#[derive(Debug, Default)]
pub struct Assignment {
    parts: Mutex<HashMap<i32, Part>>,
    settled: Condvar,
    acknowledged: AtomicU64,
}

impl Assignment {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Part>> {
        self.parts.lock().expect("assignment lock")
    }

    /// The current generation of a partition (what a source stamps on each message it reads).
    pub fn generation(&self, partition: i32) -> u64 {
        self.lock().entry(partition).or_default().generation
    }

    /// Whether work read at `origin` may still be published; if so it counts as in flight until
    /// [`Assignment::stored`]. False when its partition was revoked since it was read.
    pub fn begin(&self, origin: &Origin) -> bool {
        let mut parts = self.lock();
        let part = parts.entry(origin.partition).or_default();
        if part.generation != origin.generation {
            return false;
        }
        part.in_flight += 1;
        true
    }

    /// The published message at `origin` is acknowledged (stored or failed).
    pub fn stored(&self, origin: &Origin) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
        let mut parts = self.lock();
        if let Some(p) = parts.get_mut(&origin.partition) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        self.settled.notify_all();
    }

    /// How many published messages were acknowledged (stored or failed) so far.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Takes partitions away: work read before now is dropped unpublished, and this waits (at
    /// most `wait`) until what was already published is acknowledged, so a commit right after
    /// covers it. Returns whether everything settled in time.
    pub fn revoke(&self, partitions: &[i32], wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut parts = self.lock();
        for p in partitions {
            parts.entry(*p).or_default().generation += 1;
        }
        loop {
            let busy = partitions
                .iter()
                .any(|k| parts.get(k).is_some_and(|p| p.in_flight > 0));
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy {
                return true;
            }
            if left.is_zero() {
                return false;
            }
            parts = self
                .settled
                .wait_timeout(parts, left)
                .expect("assignment lock")
                .0;
        }
    }
}

/// Awaits deliveries in consumption order and stores each message's offset once all its
/// acknowledgements arrived; `on_acked` gets each scored transaction's timing (for latency),
/// `on_failed` each message with an output that was not delivered (and why). Ends when `rx`
/// closes.
pub async fn acknowledge(
    mut rx: mpsc::Receiver<Delivery>,
    offsets: &dyn OffsetStore,
    assignment: &Assignment,
    mut on_acked: impl FnMut(Option<i64>, Instant),
    mut on_failed: impl FnMut(&Origin, &str),
) {
    // One source reads one topic: partitions are keyed by number.
    let mut failed: HashSet<i32> = HashSet::new();
    while let Some(d) = rx.recv().await {
        let mut ok = true;
        for ack in d.acks {
            if let Err(e) = ack.await {
                on_failed(&d.origin, &e);
                ok = false;
            }
        }
        let key = d.origin.partition;
        if !ok {
            failed.insert(key);
        } else if !failed.contains(&key) {
            if let Some((ts, at)) = d.timing {
                on_acked(ts, at);
            }
            if let Err(e) = offsets.store(&d.origin) {
                // The partition was revoked meanwhile: its next owner re-reads from the commit.
                tracing::debug!(
                    partition = d.origin.partition,
                    offset = d.origin.offset,
                    "store offset: {e}"
                );
            }
        }
        assignment.stored(&d.origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records stored offsets in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(i32, i64)>>);

    impl OffsetStore for Recorder {
        fn store(&self, o: &Origin) -> Result<(), String> {
            self.0.lock().unwrap().push((o.partition, o.offset));
            Ok(())
        }
    }

    fn origin(partition: i32, offset: i64) -> Origin {
        Origin {
            topic: "t".into(),
            partition,
            offset,
            generation: 0,
        }
    }

    /// An ack that resolves when the returned sender fires (or fails when it is dropped).
    fn pending() -> (tokio::sync::oneshot::Sender<Result<(), String>>, Ack) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ack: Ack = Box::pin(async move { rx.await.unwrap_or(Err("dropped".into())) });
        (tx, ack)
    }

    fn delivery(partition: i32, offset: i64, acks: Vec<Ack>) -> Delivery {
        Delivery {
            origin: origin(partition, offset),
            acks,
            timing: None,
        }
    }

    #[tokio::test]
    async fn offsets_are_stored_in_order_whatever_order_acks_arrive_in() {
        let store = Arc::new(Recorder::default());
        let assignment = Arc::new(Assignment::default());
        let (tx, rx) = mpsc::channel(16);
        let (a0, k0) = pending();
        let (a1, k1) = pending();
        let (a2, k2) = pending();
        tx.send(delivery(0, 10, vec![k0])).await.unwrap();
        tx.send(delivery(0, 11, vec![k1, k2])).await.unwrap();
        tx.send(delivery(1, 5, vec![])).await.unwrap();
        drop(tx);
        let task = {
            let (store, assignment) = (store.clone(), assignment.clone());
            tokio::spawn(async move {
                acknowledge(rx, &*store, &assignment, |_, _| {}, |_, _| {}).await
            })
        };
        // The last acknowledgement first: nothing may be stored before offset 10 is.
        a2.send(Ok(())).unwrap();
        a1.send(Ok(())).unwrap();
        tokio::task::yield_now().await;
        assert!(
            store.0.lock().unwrap().is_empty(),
            "offset 10 is not acked yet"
        );
        a0.send(Ok(())).unwrap();
        task.await.unwrap();
        assert_eq!(*store.0.lock().unwrap(), [(0, 10), (0, 11), (1, 5)]);
    }

    #[tokio::test]
    async fn a_failed_delivery_stops_its_partition_but_not_the_others() {
        let store = Recorder::default();
        let assignment = Assignment::default();
        let (tx, rx) = mpsc::channel(16);
        tx.send(delivery(0, 1, vec![ready(Ok(()))])).await.unwrap();
        tx.send(delivery(
            0,
            2,
            vec![ready(Err("MessageSizeTooLarge".into()))],
        ))
        .await
        .unwrap();
        tx.send(delivery(0, 3, vec![ready(Ok(()))])).await.unwrap();
        tx.send(delivery(1, 7, vec![ready(Ok(()))])).await.unwrap();
        drop(tx);
        let mut failures = Vec::new();
        acknowledge(
            rx,
            &store,
            &assignment,
            |_, _| {},
            |o, e| failures.push((o.offset, e.to_string())),
        )
        .await;
        assert_eq!(failures, [(2, "MessageSizeTooLarge".to_string())]);
        assert_eq!(
            *store.0.lock().unwrap(),
            [(0, 1), (1, 7)],
            "offset 2 failed: neither it nor 3 may be stored, so both are read again"
        );
    }

    #[test]
    fn revoked_work_is_dropped_and_published_work_is_waited_for() {
        let assignment = Arc::new(Assignment::default());
        let generation = assignment.generation(0);
        let published = Origin {
            generation,
            ..origin(0, 1)
        };
        let queued = Origin {
            generation,
            ..origin(0, 2)
        };
        assert!(assignment.begin(&published));
        // Revoking waits for the published message; it is stored from another thread.
        let stored = {
            let (a, o) = (assignment.clone(), published.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                a.stored(&o);
            })
        };
        let key = [0];
        assert!(assignment.revoke(&key, Duration::from_secs(5)));
        stored.join().unwrap();
        assert!(
            !assignment.begin(&queued),
            "read before the revocation: dropped"
        );
        assert_eq!(assignment.generation(0), generation + 1);
        // Nothing in flight: a revocation returns at once; one stuck in flight times out.
        assert!(assignment.revoke(&key, Duration::ZERO));
        let again = Origin {
            generation: assignment.generation(0),
            ..origin(0, 3)
        };
        assert!(assignment.begin(&again));
        assert!(!assignment.revoke(&key, Duration::from_millis(10)));
    }
}
