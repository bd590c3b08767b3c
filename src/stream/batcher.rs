//! Micro-batching: windows from many cards are collected into batches and handed to the
//! scorer off the async reactor, in arrival order. The queues in and out are bounded, so a slow scorer pauses the
//! source (back-pressure) instead of buffering without limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::detector::{Ingest, Ingested};
use super::scorer::{Outcome, Scorer, score_batch};
use crate::observe::Metrics;

/// When a batch is flushed, and how much may wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    /// Flush when this many windows are waiting.
    pub max_batch: usize,
    /// ...or when the oldest waiting window has waited this long.
    pub max_wait: Duration,
    /// Capacity of the queues between stages; a full queue pauses the source (back-pressure).
    pub queue: usize,
    /// After a shutdown signal, how long draining (scoring, publishing, acknowledging,
    /// committing what was read) may take before the run gives up on the rest.
    pub drain_timeout: Duration,
}

impl BatchSettings {
    /// 256 windows: where the fast forward's throughput levels off (`fraudstream bench`).
    pub const DEFAULT_MAX_BATCH: usize = 256;
    /// 5 ms: small against the ~40 ms broker round trips of the end-to-end latency.
    pub const DEFAULT_MAX_WAIT_MS: u64 = 5;
    /// 4,096 items: sixteen full batches in flight per stage, about a second of peak traffic.
    pub const DEFAULT_QUEUE: usize = 4096;
    /// 30 s: a drain takes well under a second with a reachable broker, and the deployment
    /// manifests give the process 45 s after SIGTERM before it is killed.
    pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 30;
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch: Self::DEFAULT_MAX_BATCH,
            max_wait: Duration::from_millis(Self::DEFAULT_MAX_WAIT_MS),
            queue: Self::DEFAULT_QUEUE,
            drain_timeout: Duration::from_secs(Self::DEFAULT_DRAIN_TIMEOUT_S),
        }
    }
}

/// Collects items into batches of at most `max_batch` windows or `max_wait`, scores each batch
/// on the blocking pool, and forwards every item in order. Ends when `rx` closes and all is
/// flushed.
pub async fn score_loop(
    scorer: Scorer,
    metrics: Arc<Metrics>,
    settings: BatchSettings,
    mut rx: mpsc::Receiver<Ingested>,
    tx: mpsc::Sender<Outcome>,
) {
    let is_window = |i: &Ingested| usize::from(matches!(i.kind, Ingest::Window(_)));
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        let mut windows = is_window(&first);
        let mut items = vec![first];
        while windows < settings.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    windows += is_window(&item);
                    items.push(item);
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let scorer = scorer.clone();
        let began = Instant::now();
        let outcomes = tokio::task::spawn_blocking(move || score_batch(&scorer, items))
            .await
            .expect("scoring thread panicked");
        metrics.batch(windows, began.elapsed());
        for outcome in outcomes {
            if tx.send(outcome).await.is_err() {
                return;
            }
        }
    }
}
