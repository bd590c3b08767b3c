//! Settling: what an outcome means. A scored transaction becomes an alert (at or above the
//! threshold) and a score record; bad input becomes a dead letter; a redelivery becomes nothing.
//! Every log line is emitted together with its counter here, in [`Event::emit`], and live
//! quality is updated here, once.

use super::detector::{Decision, Detector};
use super::records::{Alert, DeadLetter, Origin, ScoreRecord};
use super::scorer::{Decided, Outcome};
use crate::observe::Metrics;

/// The records one outcome publishes, and what its acknowledgement needs.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The message.
    pub origin: Origin,
    /// The card (the key of alerts and scores).
    pub card_id: Option<String>,
    /// The alert, when the score reached the threshold.
    pub alert: Option<Alert>,
    /// The score record, when the sink publishes scores.
    pub score: Option<ScoreRecord>,
    /// The shadow challenger's score record (same topic, tagged `challenger`).
    pub challenger: Option<ScoreRecord>,
    /// The dead letter, for bad input.
    pub dead_letter: Option<Box<DeadLetter>>,
    /// For a scored transaction: transport timestamp (ms) and ingestion instant.
    pub timing: Option<(Option<i64>, std::time::Instant)>,
    /// The card's state after the transaction, for the changelog (see [`crate::state`]).
    pub changelog: Option<Vec<u8>>,
}

/// Something worth a log line and a counter, emitted in one place so the two never disagree.
#[derive(Debug)]
pub enum Event<'a> {
    /// A transaction was scored (and maybe alerted).
    Scored {
        /// Whether it alerted.
        alerted: bool,
    },
    /// A transaction was dead-lettered.
    DeadLettered(&'a DeadLetter),
    /// A message of the labels topic was dead-lettered.
    LabelDeadLettered(&'a DeadLetter),
    /// A redelivered transaction was skipped.
    Duplicate(&'a Origin),
    /// Work read from a partition since revoked was dropped unpublished.
    Dropped(&'a Origin),
    /// An output of the message was not delivered: its offset is not stored.
    DeliveryFailed {
        /// The message.
        origin: &'a Origin,
        /// What the producer said.
        error: &'a str,
    },
}

impl Event<'_> {
    /// Logs the event and counts it.
    pub fn emit(&self, m: &Metrics) {
        match self {
            Event::Scored { alerted } => m.scored(*alerted),
            Event::DeadLettered(l) => {
                tracing::warn!(topic = %l.topic, partition = l.partition, offset = l.offset,
                    card = l.card.as_deref().unwrap_or(""), reason = %l.reason,
                    field = l.field.as_deref().unwrap_or(""), "dead-lettered: {}", l.error);
                m.dead_lettered(&l.reason);
            }
            Event::LabelDeadLettered(l) => {
                tracing::warn!(topic = %l.topic, partition = l.partition, offset = l.offset,
                    reason = %l.reason, field = l.field.as_deref().unwrap_or(""), "dead-lettered label: {}", l.error);
                m.dead_lettered_label(&l.reason);
            }
            Event::Duplicate(o) => {
                tracing::debug!(topic = %o.topic, partition = o.partition, offset = o.offset, "redelivered transaction skipped");
                m.duplicate();
            }
            Event::Dropped(o) => {
                tracing::debug!(topic = %o.topic, partition = o.partition, offset = o.offset, "partition revoked: dropped unpublished");
                m.revoked_drops.inc();
            }
            Event::DeliveryFailed { origin: o, error } => {
                tracing::error!(topic = %o.topic, partition = o.partition, offset = o.offset,
                    "delivery failed, offset not stored (the record is read again after a restart): {error}");
                m.delivery_failures.inc();
            }
        }
    }
}

/// Turns an outcome into the records to publish, counting and logging it and updating live
/// quality. `with_scores`: build the score record (the sink publishes every score).
pub fn settle(detector: &Detector, outcome: Outcome, with_scores: bool) -> Settled {
    let m = detector.metrics();
    let mut s = Settled {
        origin: outcome.origin,
        card_id: None,
        alert: None,
        score: None,
        challenger: None,
        dead_letter: None,
        timing: None,
        changelog: None,
    };
    match outcome.kind {
        Decided::Scored(mut d) => {
            s.changelog = d.pending.state.take();
            let alert = detector.alerts(&d).then(|| detector.alert(&d, &s.origin));
            Event::Scored {
                alerted: alert.is_some(),
            }
            .emit(m);
            if let Some(a) = &alert {
                m.recent_alerts.push(a);
            }
            judge(detector, &d);
            s.score = with_scores.then(|| detector.score_record(&d, &s.origin));
            if with_scores {
                s.challenger = detector.challenger_record(&d, &s.origin);
            }
            s.alert = alert;
            s.card_id = Some(d.pending.card_id);
            s.timing = Some((outcome.timestamp_ms, outcome.at));
        }
        Decided::Invalid(letter) => {
            Event::DeadLettered(&letter).emit(m);
            s.dead_letter = Some(letter);
        }
        Decided::Duplicate => Event::Duplicate(&s.origin).emit(m),
    }
    s
}

/// Live quality: an inline label joins the decision now; otherwise the decision is remembered
/// for its label (when a labels topic is read). The clock is read only when needed.
fn judge(detector: &Detector, d: &Decision) {
    let (q, m) = (detector.quality(), detector.metrics());
    let now = || chrono::Utc::now().timestamp_millis();
    match (d.pending.label, &d.pending.transaction_id) {
        (Some(is_fraud), _) => {
            q.inline(&d.verdicts(), is_fraud, now(), m);
        }
        (None, Some(id)) if q.remembers() => q.remember(id, d.verdicts(), now(), m),
        _ => {}
    }
}
