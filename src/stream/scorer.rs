//! Scoring: one batch of windows through the network in one call, alerts explained, every
//! message's outcome returned in input order. Runs on the blocking pool, never on the reactor.

use std::sync::Arc;
use std::time::Instant;

use super::detector::{Decision, Ingest, Ingested};
use super::explain::Explainer;
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
    let (windows, lens): (Vec<&[f32]>, Vec<usize>) = items
        .iter()
        .filter_map(|i| match &i.kind {
            Ingest::Window(p) => Some((p.window.as_slice(), p.len)),
            _ => None,
        })
        .unzip();
    let (scores, attention) = model.predict(&windows, &lens);
    let mut scored = scores.into_iter().zip(attention);
    items
        .into_iter()
        .map(|item| {
            let kind = match item.kind {
                Ingest::Window(pending) => {
                    let (score, attention) = scored.next().expect("one score per window");
                    let reasons = if f64::from(score) >= scorer.threshold {
                        let p = &pending;
                        scorer
                            .explainer
                            .reasons(model, &p.window, p.len, &p.raw, score)
                    } else {
                        Vec::new()
                    };
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
