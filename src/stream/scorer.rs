//! Scoring: one batch of windows through the network in one call, alerts explained, every
//! message's outcome returned in input order. Runs on the blocking pool, never on the reactor.

use std::sync::Arc;
use std::time::Instant;

use super::detector::{Decision, Ingest, Ingested, Pending};
use super::explain::{Alerted, Explainer, Reason};
use super::records::{DeadLetter, Origin};
use crate::model::FastModel;

/// What the scoring thread needs: the network, the alert threshold, and how to explain alerts.
#[derive(Debug, Clone)]
pub struct Scorer {
    /// The network.
    pub model: Arc<FastModel>,
    /// Scores at or above it alert (and are explained).
    pub threshold: f64,
    /// Reasons for alerts.
    pub explainer: Arc<Explainer>,
}

/// What scoring made of a message.
#[derive(Debug, Clone)]
pub enum Decided {
    /// Scored.
    Scored(Box<Decision>),
    /// Bad input.
    Invalid(Box<DeadLetter>),
    /// Redelivery, already in the window.
    Duplicate,
}

/// A message's fate after scoring, in input order.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Where it was read.
    pub origin: Origin,
    /// Transport timestamp (ms), for end-to-end latency.
    pub timestamp_ms: Option<i64>,
    /// When it was ingested.
    pub at: Instant,
    /// What it became.
    pub kind: Decided,
}

/// Scores the windows of a batch in one call, explains the alerts, and returns every item's
/// outcome in order.
pub fn score_batch(scorer: &Scorer, items: Vec<Ingested>) -> Vec<Outcome> {
    let model = &*scorer.model;
    let pending: Vec<&Pending> = items
        .iter()
        .filter_map(|i| match &i.kind {
            Ingest::Window(p) => Some(&**p),
            _ => None,
        })
        .collect();
    let windows: Vec<&[f32]> = pending.iter().map(|p| p.window.as_slice()).collect();
    let lens: Vec<usize> = pending.iter().map(|p| p.len).collect();
    let (scores, attention) = model.predict(&windows, &lens);
    // Every alert of the batch explained in one more call.
    let alerted: Vec<usize> = (0..scores.len())
        .filter(|&i| f64::from(scores[i]) >= scorer.threshold)
        .collect();
    let asked: Vec<Alerted> = alerted
        .iter()
        .map(|&i| Alerted {
            window: &pending[i].window,
            len: pending[i].len,
            raw: &pending[i].raw,
            score: scores[i],
        })
        .collect();
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); scores.len()];
    for (i, r) in alerted
        .into_iter()
        .zip(scorer.explainer.reasons_of(model, &asked))
    {
        reasons[i] = r;
    }
    let mut scored = scores.into_iter().zip(attention).zip(reasons);
    items
        .into_iter()
        .map(|item| {
            let kind = match item.kind {
                Ingest::Window(pending) => {
                    let ((score, attention), reasons) =
                        scored.next().expect("one score per window");
                    Decided::Scored(Box::new(Decision {
                        pending: *pending,
                        score,
                        attention,
                        reasons,
                    }))
                }
                Ingest::Invalid(d) => Decided::Invalid(d),
                Ingest::Duplicate => Decided::Duplicate,
            };
            Outcome {
                origin: item.origin,
                timestamp_ms: item.timestamp_ms,
                at: item.at,
                kind,
            }
        })
        .collect()
}
