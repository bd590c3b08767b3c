//! Micro-batching and scoring: windows from many cards are scored together, off the async
//! reactor, in arrival order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::detector::{Decision, Ingested};
use super::records::{DeadLetter, Source};
use crate::model::FastModel;
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
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch: 256,
            max_wait: Duration::from_millis(5),
            queue: 4096,
        }
    }
}

/// A message's fate after scoring, in input order.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Scored.
    Decision(Box<Decision>),
    /// Bad input.
    Invalid(Box<DeadLetter>),
    /// Redelivery, already in the window.
    Duplicate(Source),
}

/// An item with the instant it was ingested (for latency).
pub type Timed<T> = (T, Instant);

/// Collects items into batches of at most `max_batch` windows or `max_wait`, scores each batch
/// on the blocking pool, and forwards every item in order. Ends when `rx` closes and all is
/// flushed.
pub async fn score_loop(
    model: Arc<FastModel>,
    metrics: Arc<Metrics>,
    settings: BatchSettings,
    mut rx: mpsc::Receiver<Timed<Ingested>>,
    tx: mpsc::Sender<Timed<Outcome>>,
) {
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        let mut items = vec![first];
        let mut windows = usize::from(matches!(items[0].0, Ingested::Window(_)));
        while windows < settings.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    windows += usize::from(matches!(item.0, Ingested::Window(_)));
                    items.push(item);
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let model = model.clone();
        let began = std::time::Instant::now();
        let outcomes = tokio::task::spawn_blocking(move || score_batch(&model, items))
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

/// Scores the windows of a batch in one call and returns every item's outcome in order.
pub fn score_batch(model: &FastModel, items: Vec<Timed<Ingested>>) -> Vec<Timed<Outcome>> {
    let windows: Vec<&[f32]> = items
        .iter()
        .filter_map(|(i, _)| match i {
            Ingested::Window(p) => Some(p.window.as_slice()),
            _ => None,
        })
        .collect();
    let lens: Vec<usize> = items
        .iter()
        .filter_map(|(i, _)| match i {
            Ingested::Window(p) => Some(p.len),
            _ => None,
        })
        .collect();
    let (scores, attention) = model.predict(&windows, &lens);
    let mut scored = scores.into_iter().zip(attention);
    items
        .into_iter()
        .map(|(item, at)| {
            let outcome = match item {
                Ingested::Window(pending) => {
                    let (score, attention) = scored.next().expect("one score per window");
                    Outcome::Decision(Box::new(Decision {
                        pending: *pending,
                        score,
                        attention,
                    }))
                }
                Ingested::Invalid(d) => Outcome::Invalid(d),
                Ingested::Duplicate(s) => Outcome::Duplicate(s),
            };
            (outcome, at)
        })
        .collect()
}
