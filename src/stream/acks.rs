//! The ordered acknowledger and the partition assignment it respects, free of any transport.
//!
//! At-least-once: a message's offset is stored only once every output it caused (alert, score,
//! dead letter) is acknowledged, AND every earlier message of its partition was stored. Outputs
//! leave the pipeline in consumption order, so awaiting each message's acknowledgements in that
//! order and storing as they complete keeps both promises. A partition whose delivery failed
//! stores nothing more in this run: its failed message is read again after a restart.
//!
//! Barriers: a sink that holds some records back to coalesce them (the changelog's record cache)
//! marks its messages `deferred` and later hands over a [`Handover::Barrier`] with the held
//! records' acknowledgements. A deferred message's offset is stored only at the next barrier
//! that is acknowledged, and then only the last one of each partition: stored offsets (and so
//! commits) fall only on flush boundaries.
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
    /// Its offset waits for the next barrier (the sink held some of its records back).
    pub deferred: bool,
}

/// What the publisher hands the acknowledger, in publishing order.
pub enum Handover {
    /// One message's outputs.
    Message(Delivery),
    /// Records held back until now (e.g. the changelog cache's flush): once these are
    /// acknowledged, the deferred messages before it are handled.
    Barrier(Vec<Ack>),
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
    /// Tells the publisher a revocation waits: records it holds back must go now.
    revoking: tokio::sync::Notify,
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

    /// Resolves when a revocation is waiting for published work (see [`Handover::Barrier`]).
    pub async fn revoking(&self) {
        self.revoking.notified().await;
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
        self.revoking.notify_one();
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
/// acknowledgements arrived (a deferred message's: at the next acknowledged barrier, the last of
/// each partition only); `on_acked` gets each scored transaction's timing (for latency) when its
/// own outputs are acknowledged, `on_failed` each message with an output that was not delivered
/// (and why). Ends when `rx` closes.
pub async fn acknowledge(
    mut rx: mpsc::Receiver<Handover>,
    offsets: &dyn OffsetStore,
    assignment: &Assignment,
    mut on_acked: impl FnMut(Option<i64>, Instant),
    mut on_failed: impl FnMut(&Origin, &str),
) {
    // One source reads one topic: partitions are keyed by number.
    let mut failed: HashSet<i32> = HashSet::new();
    // Deferred messages acknowledged since the last barrier, in order.
    let mut held: Vec<Origin> = Vec::new();
    while let Some(item) = rx.recv().await {
        let d = match item {
            Handover::Message(d) => d,
            Handover::Barrier(acks) => {
                barrier(
                    acks,
                    &mut held,
                    &mut failed,
                    offsets,
                    assignment,
                    &mut on_failed,
                )
                .await;
                continue;
            }
        };
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
            if d.deferred {
                held.push(d.origin);
                continue;
            }
            store(offsets, &d.origin);
        }
        assignment.stored(&d.origin);
    }
    // No barrier after these (the publisher stopped early): their offsets stay unstored.
    for o in held {
        assignment.stored(&o);
    }
}

/// The held records are acknowledged (or not): the last held message of each partition is
/// stored, so the stored offset is the flush boundary; on a failure none is, and those partitions
/// store nothing more in this run.
async fn barrier(
    acks: Vec<Ack>,
    held: &mut Vec<Origin>,
    failed: &mut HashSet<i32>,
    offsets: &dyn OffsetStore,
    assignment: &Assignment,
    on_failed: &mut impl FnMut(&Origin, &str),
) {
    let mut error = None;
    for ack in acks {
        if let Err(e) = ack.await {
            error.get_or_insert(e);
        }
    }
    let mut last: HashMap<i32, &Origin> = HashMap::new();
    for o in held.iter() {
        last.insert(o.partition, o);
    }
    for (partition, o) in last {
        if let Some(e) = &error {
            on_failed(o, e);
            failed.insert(partition);
        } else if !failed.contains(&partition) {
            store(offsets, o);
        }
    }
    for o in held.drain(..) {
        assignment.stored(&o);
    }
}

fn store(offsets: &dyn OffsetStore, origin: &Origin) {
    if let Err(e) = offsets.store(origin) {
        // The partition was revoked meanwhile: its next owner re-reads from the commit.
        tracing::debug!(
            partition = origin.partition,
            offset = origin.offset,
            "store offset: {e}"
        );
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

    fn delivery(partition: i32, offset: i64, acks: Vec<Ack>) -> Handover {
        Handover::Message(Delivery {
            origin: origin(partition, offset),
            acks,
            timing: None,
            deferred: false,
        })
    }

    fn deferred(partition: i32, offset: i64) -> Handover {
        Handover::Message(Delivery {
            origin: origin(partition, offset),
            acks: vec![ready(Ok(()))],
            timing: None,
            deferred: true,
        })
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

    #[tokio::test]
    async fn deferred_offsets_are_stored_only_at_barriers_and_only_the_last_of_each_partition() {
        let store = Arc::new(Recorder::default());
        let assignment = Arc::new(Assignment::default());
        let (tx, rx) = mpsc::channel(16);
        let task = {
            let (store, assignment) = (store.clone(), assignment.clone());
            tokio::spawn(async move {
                acknowledge(rx, &*store, &assignment, |_, _| {}, |_, _| {}).await
            })
        };
        for o in [10, 11, 12] {
            assert!(assignment.begin(&origin(0, o)));
        }
        tx.send(deferred(0, 10)).await.unwrap();
        tx.send(deferred(0, 11)).await.unwrap();
        tx.send(deferred(1, 3)).await.unwrap();
        let (flushed, ack) = pending();
        tx.send(Handover::Barrier(vec![ack])).await.unwrap();
        tx.send(deferred(0, 12)).await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            store.0.lock().unwrap().is_empty(),
            "nothing is stored before the barrier is acknowledged"
        );
        assert!(
            !assignment.revoke(&[0], Duration::from_millis(20)),
            "held messages are still in flight"
        );
        flushed.send(Ok(())).unwrap();
        tx.send(Handover::Barrier(vec![])).await.unwrap();
        drop(tx);
        task.await.unwrap();
        let mut stored = store.0.lock().unwrap().clone();
        stored.sort();
        assert_eq!(
            stored,
            [(0, 11), (0, 12), (1, 3)],
            "offset 10 is inside the flushed range: never stored on its own"
        );
        assert!(assignment.revoke(&[0, 1], Duration::ZERO), "all settled");
    }

    #[tokio::test]
    async fn a_failed_barrier_stores_none_of_its_messages_and_stops_their_partitions() {
        let store = Recorder::default();
        let assignment = Assignment::default();
        let (tx, rx) = mpsc::channel(16);
        tx.send(deferred(0, 1)).await.unwrap();
        tx.send(Handover::Barrier(vec![ready(Err("broker gone".into()))]))
            .await
            .unwrap();
        tx.send(deferred(0, 2)).await.unwrap();
        tx.send(deferred(1, 9)).await.unwrap();
        tx.send(Handover::Barrier(vec![ready(Ok(()))]))
            .await
            .unwrap();
        tx.send(deferred(1, 10)).await.unwrap();
        drop(tx);
        let mut failures = Vec::new();
        acknowledge(
            rx,
            &store,
            &assignment,
            |_, _| {},
            |o, e| failures.push((o.partition, o.offset, e.to_string())),
        )
        .await;
        assert_eq!(failures, [(0, 1, "broker gone".to_string())]);
        assert_eq!(
            *store.0.lock().unwrap(),
            [(1, 9)],
            "partition 0 failed; offset 10 of partition 1 had no barrier"
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
