//! The detector's pipeline, one for every transport:
//!
//! ```text
//! Source::next -> Detector::ingest -> batcher::score_loop -> settle::settle -> Sink::publish -> acks::acknowledge
//!  (read)          (window)            (score)               (settle)          (publish)        (acknowledge)
//! ```
//!
//! [`run`] wires the stages with bounded queues (back-pressure), drops work from partitions
//! revoked meanwhile before it is published, and on shutdown drains, flushes and lets the
//! transport commit. [`file`] reads files or stdin and writes JSONL; [`kafka`] is the consumer
//! group, producer and labels consumer.

pub mod acks;
pub mod batcher;
mod detector;
pub mod explain;
pub mod file;
mod ids;
pub mod kafka;
pub mod lineup;
mod records;
pub mod rollout;
pub mod scorer;
pub mod settle;
mod stats;
mod watermark;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;

pub use acks::{Ack, Assignment, Delivery, Handover, OffsetStore};
pub use batcher::BatchSettings;
pub use detector::{
    DEFAULT_MAX_DEAD_LETTER_PAYLOAD_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Decision, Detector,
    DetectorSettings, Ingest, Ingested, LabelUse, Pending, TOP_ATTENTION, spawn_evictor,
};
pub use ids::{DEDUPE_HORIZON, RecentIds};
pub use lineup::{Adapt, Lineup, Models, Scorer};
pub use records::{
    Alert, AttentionRef, DeadLetter, Envelope, ModelRef, Origin, ScoreRecord, TRANSPORT_REASONS,
    dead_letter_reasons,
};
pub use scorer::{Decided, Outcome, score_batch};
pub use settle::{Event, Settled, settle};
pub use stats::{Run, RunStats, latency};
pub use watermark::{
    DEFAULT_MAX_FUTURE_SKEW, DEFAULT_MAX_PAST_AGE, OutOfWindow, TimeLimits, Watermarks,
};

/// How often a run reports progress (the demo's live line; the bench's completion check).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Why a run stopped with an error.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The transport could not be set up (broker settings, files).
    #[error("{0}")]
    Setup(String),
    /// The sink could not write (a file), so nothing more can be published.
    #[error("writing output: {0}")]
    Sink(String),
    /// A shutdown's drain did not finish in time; what was not acknowledged is not committed.
    #[error(
        "shutdown timed out after {}s: {abandoned} message(s) read but not acknowledged were abandoned \
         (their offsets are not committed, so they are read again after a restart)",
        timeout.as_secs_f64()
    )]
    DrainTimeout {
        /// The drain's limit.
        timeout: Duration,
        /// Messages read whose outputs were not all acknowledged.
        abandoned: u64,
    },
    /// The source stopped on an error retrying cannot fix (authorization refused, fenced).
    #[error("{0}")]
    Source(String),
    /// A pipeline task panicked (a bug).
    #[error("a pipeline task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where envelopes come from: Kafka partitions, or a file's lines.
pub trait Source: Send + 'static {
    /// The next message; `None` once the input has ended (a file; Kafka never ends).
    fn next(&mut self) -> impl Future<Output = Option<Envelope>> + Send;
    /// Where handled offsets are stored.
    fn offsets(&self) -> Arc<dyn OffsetStore>;
    /// The partitions read, with their generations.
    fn assignment(&self) -> Arc<Assignment>;
    /// After the pipeline drained: commit what was stored.
    fn close(self) -> impl Future<Output = ()> + Send;
    /// Why the source stopped early, if it did (an error retrying cannot fix).
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Where settled records go: Kafka topics, or JSONL files.
pub trait Sink: Send + 'static {
    /// Whether every score is published (score records are built only then).
    fn wants_scores(&self) -> bool;
    /// Hands a settled outcome's records to the transport (it may take them out of `settled`).
    /// The acknowledgements resolve once they are durable; an error means nothing more can be
    /// written (the run stops).
    fn publish(&mut self, settled: &mut Settled) -> Result<Vec<Ack>, StreamError>;
    /// The pipeline has caught up for now (files flush here, so a tail -f reader sees alerts).
    fn idle(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    /// Whether the sink holds some of a message's records back (to coalesce them): its offset
    /// then waits for the next [`Sink::barrier`] (see [`acks`]).
    fn defers_offsets(&self) -> bool {
        false
    }
    /// When held-back records must be handed over (None: none held).
    fn barrier_due(&self) -> Option<tokio::time::Instant> {
        None
    }
    /// Hands held-back records to the transport when they are due, or now with `force`; returns
    /// their acknowledgements (None: nothing held, or not due).
    fn barrier(&mut self, _force: bool) -> Result<Option<Vec<Ack>>, StreamError> {
        Ok(None)
    }
    /// End of run: everything handed over is written or delivered.
    fn flush(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send;
}

/// Runs the pipeline until the source ends or `shutdown` resolves; then everything read is
/// scored, published and acknowledged before it returns (after a shutdown signal, for at most
/// `batch.drain_timeout`). `progress` sees the run's numbers every [`PROGRESS_EVERY`].
pub async fn run<S: Source, K: Sink>(
    detector: Arc<Detector>,
    mut source: S,
    sink: K,
    batch: BatchSettings,
    shutdown: impl Future<Output = ()>,
    mut progress: impl FnMut(&RunStats),
) -> Result<RunStats, StreamError> {
    let run = Arc::new(Run::new(detector.metrics().clone()));
    let (in_tx, in_rx) = mpsc::channel(batch.queue);
    let (out_tx, out_rx) = mpsc::channel::<Outcome>(batch.queue);
    let (ack_tx, ack_rx) = mpsc::channel::<Handover>(batch.queue);
    let assignment = source.assignment();
    let evictor = spawn_evictor(detector.clone());
    let tasks = Tasks {
        scorer: tokio::spawn(batcher::score_loop(
            detector.models().clone(),
            detector.metrics().clone(),
            batch,
            in_rx,
            out_tx,
        )),
        publisher: tokio::spawn(publish_loop(
            detector.clone(),
            assignment.clone(),
            sink,
            out_rx,
            ack_tx,
        )),
        acker: spawn_acker(
            &detector,
            &run,
            source.offsets(),
            assignment.clone(),
            ack_rx,
        ),
    };
    let (read, signalled) = read_until_stopped(&detector, &mut source, in_tx, shutdown, || {
        progress(&run.stats())
    })
    .await;
    let deadline = tokio::time::Instant::now() + batch.drain_timeout;
    let published = if signalled {
        tracing::info!(
            timeout_s = batch.drain_timeout.as_secs_f64(),
            "draining: scoring, publishing and acknowledging what was read"
        );
        let aborts = tasks.abort_handles();
        match tokio::time::timeout_at(deadline, tasks.join()).await {
            Ok(published) => published?,
            Err(_) => {
                aborts.iter().for_each(tokio::task::AbortHandle::abort);
                evictor.abort();
                let handled = assignment.acknowledged() + detector.metrics().revoked_drops.get();
                let abandoned = read.saturating_sub(handled);
                tracing::error!(
                    abandoned,
                    "shutdown timed out: giving up on what is not acknowledged"
                );
                // Closing the consumer would wait for the broker (a final commit, leaving the
                // group): the process is about to exit, so it is left as it is. Offsets stored so
                // far were committed by the periodic auto-commit or are read again: at-least-once.
                std::mem::forget(source);
                return Err(StreamError::DrainTimeout {
                    timeout: batch.drain_timeout,
                    abandoned,
                });
            }
        }
    } else {
        tasks.join().await?
    };
    evictor.abort();
    // Counted before the source closes: closing gives the partitions back, which forgets cards.
    detector.sync_card_metrics();
    let failure = source.failure();
    let stats = run.stats();
    if signalled {
        if tokio::time::timeout_at(deadline, source.close())
            .await
            .is_err()
        {
            // Everything was acknowledged, but offsets stored since the last automatic commit
            // are read again after a restart (at-least-once).
            return Err(StreamError::DrainTimeout {
                timeout: batch.drain_timeout,
                abandoned: 0,
            });
        }
    } else {
        source.close().await;
    }
    published?;
    if let Some(f) = failure {
        return Err(StreamError::Source(f));
    }
    progress(&stats);
    Ok(stats)
}

/// The pipeline's stages after reading, each a task.
struct Tasks {
    scorer: tokio::task::JoinHandle<()>,
    publisher: tokio::task::JoinHandle<Result<(), StreamError>>,
    acker: tokio::task::JoinHandle<()>,
}

impl Tasks {
    fn abort_handles(&self) -> [tokio::task::AbortHandle; 3] {
        [
            self.scorer.abort_handle(),
            self.publisher.abort_handle(),
            self.acker.abort_handle(),
        ]
    }

    /// Waits until every stage has finished what it was given; the publisher's result (a sink
    /// that failed) is the inner one.
    async fn join(self) -> Result<Result<(), StreamError>, StreamError> {
        self.scorer.await?;
        let published = self.publisher.await?;
        self.acker.await?;
        Ok(published)
    }
}

/// Step 1, read: envelopes from the source, ingested (parsed, validated, windowed) and queued
/// for scoring until the source ends or `shutdown` resolves. Returns how many were queued and
/// whether a shutdown signal stopped it. A full queue makes reading wait (back-pressure); a
/// message read but not queued when the signal came is not handled (read again after a
/// restart).
async fn read_until_stopped<S: Source>(
    detector: &Detector,
    source: &mut S,
    in_tx: mpsc::Sender<Ingested>,
    shutdown: impl Future<Output = ()>,
    mut progress: impl FnMut(),
) -> (u64, bool) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut read = 0u64;
    loop {
        tokio::select! {
            () = &mut shutdown => return (read, true),
            _ = tick.tick() => progress(),
            env = source.next() => match env {
                Some(env) => {
                    let ingested = detector.ingest(&env);
                    tokio::select! {
                        sent = in_tx.send(ingested) => if sent.is_err() { return (read, false) },
                        () = &mut shutdown => return (read, true),
                    }
                    read += 1;
                }
                None => return (read, false),
            },
        }
    }
}

/// Step 4 and 5, settle and publish: each scored outcome of a partition still held is settled
/// and handed to the sink, its acknowledgements queued for the acknowledger in order. Records
/// the sink holds back go out when due, when a revocation waits for them, and at the end, each
/// time as a barrier for the acknowledger.
async fn publish_loop<K: Sink>(
    detector: Arc<Detector>,
    assignment: Arc<Assignment>,
    mut sink: K,
    mut out_rx: mpsc::Receiver<Outcome>,
    ack_tx: mpsc::Sender<Handover>,
) -> Result<(), StreamError> {
    let scores = sink.wants_scores();
    let deferred = sink.defers_offsets();
    loop {
        let due = sink.barrier_due();
        let outcome = tokio::select! {
            biased;
            outcome = out_rx.recv() => match outcome {
                Some(outcome) => outcome,
                None => break,
            },
            // A revocation waits, or held records are due: hand them over now.
            () = assignment.revoking() => {
                if hand_barrier(&mut sink, true, &ack_tx).await? { continue } else { break }
            }
            () = sleep_until(due), if due.is_some() => {
                if hand_barrier(&mut sink, true, &ack_tx).await? { continue } else { break }
            }
        };
        if !assignment.begin(&outcome.origin) {
            Event::Dropped(&outcome.origin).emit(detector.metrics());
            continue;
        }
        let mut settled = settle(&detector, outcome, scores);
        let acks = match sink.publish(&mut settled) {
            Ok(acks) => acks,
            Err(e) => {
                assignment.stored(&settled.origin);
                return Err(e);
            }
        };
        let delivery = Delivery {
            origin: settled.origin,
            acks,
            timing: settled.timing,
            deferred,
        };
        if ack_tx.send(Handover::Message(delivery)).await.is_err()
            || !hand_barrier(&mut sink, false, &ack_tx).await?
        {
            break;
        }
        if out_rx.is_empty() {
            sink.idle()?;
        }
    }
    hand_barrier(&mut sink, true, &ack_tx).await?;
    sink.flush().await
}

/// Sleeps until `at` (None: forever).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Hands the sink's held-back records over (when due, or `force`) and queues their barrier;
/// false when the acknowledger is gone.
async fn hand_barrier<K: Sink>(
    sink: &mut K,
    force: bool,
    ack_tx: &mpsc::Sender<Handover>,
) -> Result<bool, StreamError> {
    Ok(match sink.barrier(force)? {
        Some(acks) => ack_tx.send(Handover::Barrier(acks)).await.is_ok(),
        None => true,
    })
}

/// Step 6, acknowledge: offsets stored in order once outputs are durable; latency recorded at
/// the acknowledgement, failed deliveries logged and counted.
fn spawn_acker(
    detector: &Detector,
    run: &Arc<Run>,
    offsets: Arc<dyn OffsetStore>,
    assignment: Arc<Assignment>,
    ack_rx: mpsc::Receiver<Handover>,
) -> tokio::task::JoinHandle<()> {
    let (run, metrics) = (run.clone(), detector.metrics().clone());
    tokio::spawn(async move {
        acks::acknowledge(
            ack_rx,
            &*offsets,
            &assignment,
            |ts, at| run.decided(latency(ts, at)),
            |origin, error| Event::DeliveryFailed { origin, error }.emit(&metrics),
        )
        .await
    })
}
