//! Micro-batching: windows from many cards are collected into batches and handed to the
//! scorer off the async reactor, in arrival order. The queues in and out are bounded, so a slow scorer pauses the
//! source (back-pressure) instead of buffering without limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::detector::{Ingest, Ingested};
use super::lineup::Models;
use super::scorer::{Outcome, score_batch};
use crate::observe::Metrics;

/// When a batch is flushed, and how much may wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    /// Flush when this many windows are waiting.
    pub max_batch: usize,
    /// ...or when the oldest waiting window has waited this long. Zero (the default): adaptive,
    /// the scorer takes at once whatever is waiting when it becomes free (one window at a time
    /// when traffic is light, large batches when it is busy).
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
    /// 0 ms: adaptive batching. Waiting to fill a batch only adds latency here: while the
    /// scorer is busy, the next batch fills by itself (`fraudstream bench`: p99 at 1,000 tx/s
    /// 38 ms with a 5 ms wait, 30 ms adaptive; flat out no slower).
    pub const DEFAULT_MAX_WAIT_MS: u64 = 0;
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
    models: Arc<Models>,
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
            let next = if settings.max_wait.is_zero() {
                // Adaptive: the scorer is free now; take what is already waiting, no more.
                match rx.try_recv() {
                    Ok(item) => Some(item),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            match next {
                Some(item) => {
                    windows += is_window(&item);
                    items.push(item);
                }
                None => {
                    open = false;
                    break;
                }
            }
        }
        // The lineup is read once per batch: a model swapped in meanwhile scores the next one.
        let lineup = models.current();
        let began = Instant::now();
        let outcomes = tokio::task::spawn_blocking(move || score_batch(&lineup, items))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FastModel, ModelConfig, init, weights};
    use crate::stream::explain::Explainer;
    use crate::stream::lineup::{Lineup, Scorer};
    use crate::stream::records::{ModelRef, Origin};

    fn scorer() -> Arc<Models> {
        let cfg = ModelConfig::notebook(3, 4);
        let (_, varmap) = init(&cfg, 1, &candle_core::Device::Cpu).unwrap();
        let champion = Scorer {
            model: Arc::new(FastModel::new(&cfg, &weights(&varmap).unwrap()).unwrap()),
            threshold: 0.5,
            explainer: Arc::new(Explainer::new(vec![], vec![])),
            model_ref: ModelRef {
                name: "test".into(),
                version: "v1".into(),
                sha256: String::new(),
            },
            version: "v1".into(),
            adapt: None,
            dir: None,
        };
        Arc::new(Models::new(Lineup {
            champion,
            challenger: None,
        }))
    }

    fn item(offset: i64) -> Ingested {
        Ingested {
            origin: Origin {
                topic: "t".into(),
                partition: 0,
                offset,
                generation: 0,
            },
            timestamp_ms: None,
            at: Instant::now(),
            kind: Ingest::Duplicate,
        }
    }

    /// Runs the loop over `feed`'s items (sent `gap` apart, each after the previous one came
    /// out when `lockstep`); returns the outcomes' offsets and how many batches were scored.
    async fn batches(max_wait_ms: u64, n: i64, gap: Duration, lockstep: bool) -> (Vec<i64>, u64) {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let settings = BatchSettings {
            max_wait: Duration::from_millis(max_wait_ms),
            ..BatchSettings::default()
        };
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let task = tokio::spawn(score_loop(
            scorer(),
            metrics.clone(),
            settings,
            in_rx,
            out_tx,
        ));
        let mut out = Vec::new();
        for offset in 0..n {
            in_tx.send(item(offset)).await.unwrap();
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if lockstep {
                out.push(out_rx.recv().await.unwrap().origin.offset);
            }
        }
        drop(in_tx);
        while let Some(o) = out_rx.recv().await {
            out.push(o.origin.offset);
        }
        task.await.unwrap();
        (out, metrics.inference_seconds.get_sample_count())
    }

    #[tokio::test]
    async fn adaptive_batching_scores_what_waits_at_once_and_a_lone_item_alone() {
        // Ten items waiting when the scorer is free: one batch, in order.
        let (out, n) = batches(0, 10, Duration::ZERO, false).await;
        assert_eq!(out, (0..10).collect::<Vec<_>>());
        assert!(n <= 2, "{n} batches for 10 waiting items");
        // Items arriving one at a time, each scored before the next comes: a batch each, with
        // no wait.
        let (out, n) = batches(0, 3, Duration::ZERO, true).await;
        assert_eq!((out, n), (vec![0, 1, 2], 3));
        // A fixed wait collects items that arrive within it into one batch.
        let (out, n) = batches(200, 3, Duration::from_millis(5), false).await;
        assert_eq!((out, n), (vec![0, 1, 2], 1));
    }
}
