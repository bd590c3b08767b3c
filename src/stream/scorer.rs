//! Scoring: one batch of windows through the network in one call, alerts explained, every
//! message's outcome returned in input order. Runs on the blocking pool, never on the reactor.

use std::sync::Arc;
use std::time::Instant;

use super::detector::{Decision, Ingest, Ingested, Pending};
use super::explain::{Alerted, Reason};
use super::lineup::{Lineup, Scorer};
use super::records::{DeadLetter, Origin};

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

/// Scores the windows of a batch in one call per model, explains the champion's alerts, and
/// returns every item's outcome in order.
pub fn score_batch(lineup: &Arc<Lineup>, items: Vec<Ingested>) -> Vec<Outcome> {
    let pending: Vec<&Pending> = items
        .iter()
        .filter_map(|i| match &i.kind {
            Ingest::Window(p) => Some(&**p),
            _ => None,
        })
        .collect();
    let champion = score_windows(&lineup.champion, &pending, true);
    let challenger = lineup
        .challenger
        .as_ref()
        .map(|c| score_windows(c, &pending, false).0);
    let (scores, attention, reasons) = champion;
    let mut challenger = challenger.map(Vec::into_iter);
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
                        lineup: lineup.clone(),
                        challenger_score: challenger.as_mut().and_then(Iterator::next),
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

type Scored = (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<Reason>>);

/// One model's scores (and attention) for the windows; its alerts explained when `explain`.
fn score_windows(scorer: &Scorer, pending: &[&Pending], explain: bool) -> Scored {
    let model = &*scorer.model;
    let adapted: Option<Vec<(Vec<f32>, usize)>> = scorer
        .adapt
        .as_ref()
        .map(|a| pending.iter().map(|p| a.apply(&p.window, p.len)).collect());
    let (windows, lens): (Vec<&[f32]>, Vec<usize>) = match &adapted {
        Some(a) => a.iter().map(|(w, l)| (w.as_slice(), *l)).unzip(),
        None => pending.iter().map(|p| (p.window.as_slice(), p.len)).unzip(),
    };
    let (scores, attention) = model.predict(&windows, &lens);
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); scores.len()];
    if !explain {
        return (scores, attention, reasons);
    }
    // Every alert of the batch explained in one more call.
    let alerted: Vec<usize> = (0..scores.len())
        .filter(|&i| f64::from(scores[i]) >= scorer.threshold)
        .collect();
    let asked: Vec<Alerted> = alerted
        .iter()
        .map(|&i| Alerted {
            window: windows[i],
            len: lens[i],
            raw: &pending[i].raw,
            score: scores[i],
        })
        .collect();
    for (i, r) in alerted
        .into_iter()
        .zip(scorer.explainer.reasons_of(model, &asked))
    {
        reasons[i] = r;
    }
    (scores, attention, reasons)
}
