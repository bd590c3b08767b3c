//! Live precision and recall: fraud labels arrive after the decision (chargebacks, analyst
//! reviews) and are joined to the score the detector made.
//!
//! Scores are remembered by transaction id, bounded in number and age (the oldest go first);
//! a label that finds its score becomes a true/false positive/negative, counted by model
//! version and added to per-10-second buckets from which the 5-minute and 1-hour precision,
//! recall and F1 gauges are computed. A label that finds no score (expired, scored by another
//! instance, or never seen) is counted apart. Labels carried inline in a transaction (replays of
//! labelled data) join immediately. All methods take `now_ms`, so tests drive the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Deserialize;
use thiserror::Error;

use super::metrics::Metrics;

/// How long one bucket of the sliding windows lasts.
const BUCKET_MS: i64 = 10_000;
/// The sliding windows, with the label value they export under.
pub const WINDOWS: [(&str, i64); 2] = [("5m", 5 * 60_000), ("1h", 3_600_000)];
const BUCKETS: usize = (3_600_000 / BUCKET_MS) as usize;

/// A label's verdict on a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOutcome {
    /// Alerted, and fraud.
    TruePositive,
    /// Alerted, and legitimate.
    FalsePositive,
    /// Not alerted, and fraud.
    FalseNegative,
    /// Not alerted, and legitimate.
    TrueNegative,
}

impl LabelOutcome {
    /// From the decision and the label.
    pub fn of(alerted: bool, is_fraud: bool) -> Self {
        match (alerted, is_fraud) {
            (true, true) => LabelOutcome::TruePositive,
            (true, false) => LabelOutcome::FalsePositive,
            (false, true) => LabelOutcome::FalseNegative,
            (false, false) => LabelOutcome::TrueNegative,
        }
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelOutcome::TruePositive => "true_positive",
            LabelOutcome::FalsePositive => "false_positive",
            LabelOutcome::FalseNegative => "false_negative",
            LabelOutcome::TrueNegative => "true_negative",
        }
    }
}

/// Counts of each outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confusion {
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub fn_: u64,
    /// True negatives.
    pub tn: u64,
}

impl Confusion {
    fn add(&mut self, o: LabelOutcome) {
        match o {
            LabelOutcome::TruePositive => self.tp += 1,
            LabelOutcome::FalsePositive => self.fp += 1,
            LabelOutcome::FalseNegative => self.fn_ += 1,
            LabelOutcome::TrueNegative => self.tn += 1,
        }
    }

    fn merge(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }

    /// Alerts that were fraud; NaN before any labelled alert (undefined, not zero).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Frauds that were alerted; NaN before any labelled fraud.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of the two; NaN when either is undefined, 0 when both are 0.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p.is_nan() || r.is_nan() {
            f64::NAN
        } else if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

/// A label message on the labels topic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Label {
    /// The transaction it judges.
    pub transaction_id: String,
    /// Whether it was fraud.
    pub is_fraud: bool,
    /// When the label was made (RFC 3339); informational.
    #[serde(default)]
    pub labelled_at: Option<String>,
}

/// A label message that cannot be used, naming the field at fault.
#[derive(Debug, Error, PartialEq)]
pub enum LabelError {
    /// Not JSON, or not an object.
    #[error("label is not a JSON object: {0}")]
    NotAnObject(String),
    /// A required field is missing or of the wrong type.
    #[error("label field `{field}`: {problem}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl LabelError {
    /// The dead-letter reason.
    pub fn reason(&self) -> &'static str {
        match self {
            LabelError::NotAnObject(_) => "invalid_label_json",
            LabelError::Field { .. } => "invalid_label",
        }
    }

    /// The field at fault, if one is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            LabelError::NotAnObject(_) => None,
            LabelError::Field { field, .. } => Some(field),
        }
    }
}

impl Label {
    /// Parses a label; `is_fraud` may be a boolean or 0/1, `transaction_id` a string or number.
    pub fn parse(payload: &[u8]) -> Result<Label, LabelError> {
        let v: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| LabelError::NotAnObject(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| LabelError::NotAnObject("not an object".into()))?;
        let field = |field: &'static str, problem: &str| LabelError::Field {
            field,
            problem: problem.to_string(),
        };
        let transaction_id = match obj.get("transaction_id") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err(field("transaction_id", "must be a non-empty string")),
            None => return Err(field("transaction_id", "missing")),
        };
        let is_fraud = match obj.get("is_fraud") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) if n.as_f64() == Some(1.0) => true,
            Some(serde_json::Value::Number(n)) if n.as_f64() == Some(0.0) => false,
            Some(_) => return Err(field("is_fraud", "must be true/false or 1/0")),
            None => return Err(field("is_fraud", "missing")),
        };
        let labelled_at = match obj.get("labelled_at") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(field("labelled_at", "must be an RFC 3339 string")),
        };
        Ok(Label {
            transaction_id,
            is_fraud,
            labelled_at,
        })
    }
}

/// How many scores to remember, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QualitySettings {
    /// At most this many remembered scores, and as many early labels (0: remember none; only
    /// inline labels count).
    pub max_scores: usize,
    /// A score older than this no longer matches its label.
    pub ttl_ms: i64,
    /// A label that arrives before its transaction is scored (the detector is behind) waits this
    /// long for the score before it counts as unmatched.
    pub label_wait_ms: i64,
}

impl Default for QualitySettings {
    fn default() -> Self {
        QualitySettings {
            max_scores: 1_000_000,
            ttl_ms: 24 * 3_600_000,
            label_wait_ms: 120_000,
        }
    }
}

/// What became of a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// It matched a remembered score.
    Matched(LabelOutcome),
    /// No score yet: it waits for one (counted unmatched if none comes in time).
    Waiting,
    /// Its score expired, or no score can come (nothing is remembered).
    Unmatched,
}

struct Memo {
    alerted: bool,
    scored_ms: i64,
}

struct Inner {
    scores: HashMap<std::sync::Arc<str>, Memo>,
    /// Remembered ids, oldest first (an id re-scored later appears twice; the map decides).
    order: VecDeque<(i64, std::sync::Arc<str>)>,
    /// Per-bucket counts, indexed by bucket number modulo BUCKETS, with the bucket number held.
    buckets: Vec<(i64, Confusion)>,
    /// Labels that came before their scores: id -> (is fraud, arrival).
    early: HashMap<String, (bool, i64)>,
    /// Early labels' ids, oldest first.
    early_order: VecDeque<(i64, String)>,
}

/// Remembered scores and the label join; updates the quality metrics on [`Metrics`].
pub struct LiveQuality {
    settings: QualitySettings,
    model_version: String,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for LiveQuality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuality")
            .field("settings", &self.settings)
            .field("model_version", &self.model_version)
            .finish_non_exhaustive()
    }
}

impl LiveQuality {
    /// Empty memory for decisions of `model_version`.
    pub fn new(settings: QualitySettings, model_version: &str) -> Self {
        LiveQuality {
            settings,
            model_version: model_version.to_string(),
            inner: Mutex::new(Inner {
                scores: HashMap::new(),
                order: VecDeque::new(),
                buckets: vec![(i64::MIN, Confusion::default()); BUCKETS],
                early: HashMap::new(),
                early_order: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("quality lock")
    }

    /// Remembers a decision until its label arrives (or it expires); joins it at once to a label
    /// that came first.
    pub fn remember(&self, transaction_id: &str, alerted: bool, now_ms: i64, m: &Metrics) {
        if self.settings.max_scores == 0 {
            return;
        }
        let mut g = self.lock();
        if let Some((is_fraud, _)) = g.early.remove(transaction_id) {
            drop(g);
            m.label_delay_seconds.observe(0.0);
            self.count(alerted, is_fraud, now_ms, m);
            return;
        }
        // One allocation shared by the map and the expiry queue.
        let id: std::sync::Arc<str> = transaction_id.into();
        g.scores.insert(
            id.clone(),
            Memo {
                alerted,
                scored_ms: now_ms,
            },
        );
        g.order.push_back((now_ms, id));
        while g.scores.len() > self.settings.max_scores {
            forget_oldest(&mut g);
        }
        m.remembered_scores.set(g.scores.len() as i64);
    }

    /// Joins a label from the labels topic to its remembered score, or keeps it waiting for a
    /// score not made yet.
    pub fn label(&self, label: &Label, now_ms: i64, m: &Metrics) -> Joined {
        m.labels.with_label_values(&["topic"]).inc();
        let mut g = self.lock();
        match g.scores.remove(label.transaction_id.as_str()) {
            Some(memo) if now_ms - memo.scored_ms <= self.settings.ttl_ms => {
                drop(g);
                let delay = (now_ms - memo.scored_ms).max(0) as f64 / 1000.0;
                m.label_delay_seconds.observe(delay);
                Joined::Matched(self.count(memo.alerted, label.is_fraud, now_ms, m))
            }
            Some(_) => {
                m.labels_unmatched.inc();
                Joined::Unmatched
            }
            None if self.settings.max_scores == 0 => {
                m.labels_unmatched.inc();
                Joined::Unmatched
            }
            None => {
                let id = label.transaction_id.clone();
                g.early.insert(id.clone(), (label.is_fraud, now_ms));
                g.early_order.push_back((now_ms, id));
                while g.early.len() > self.settings.max_scores {
                    if forget_oldest_early(&mut g) {
                        m.labels_unmatched.inc();
                    }
                }
                Joined::Waiting
            }
        }
    }

    /// Counts a label that came inside the transaction itself.
    pub fn inline(&self, alerted: bool, is_fraud: bool, now_ms: i64, m: &Metrics) -> LabelOutcome {
        m.labels.with_label_values(&["inline"]).inc();
        m.label_delay_seconds.observe(0.0);
        self.count(alerted, is_fraud, now_ms, m)
    }

    fn count(&self, alerted: bool, is_fraud: bool, now_ms: i64, m: &Metrics) -> LabelOutcome {
        let o = LabelOutcome::of(alerted, is_fraud);
        m.label_outcomes
            .with_label_values(&[self.model_version.as_str(), o.as_str()])
            .inc();
        let b = now_ms.div_euclid(BUCKET_MS);
        let mut g = self.lock();
        let slot = &mut g.buckets[b.rem_euclid(BUCKETS as i64) as usize];
        if slot.0 != b {
            *slot = (b, Confusion::default());
        }
        slot.1.add(o);
        o
    }

    /// The outcomes of labels joined in the last `window_ms` (to the bucket).
    pub fn window(&self, window_ms: i64, now_ms: i64) -> Confusion {
        let now_b = now_ms.div_euclid(BUCKET_MS);
        let first = now_b - window_ms / BUCKET_MS + 1;
        let g = self.lock();
        let mut c = Confusion::default();
        for (b, counts) in &g.buckets {
            if *b >= first && *b <= now_b {
                c.merge(counts);
            }
        }
        c
    }

    /// Forgets expired scores and sets the sliding-window gauges (called every second).
    pub fn refresh(&self, now_ms: i64, m: &Metrics) {
        {
            let mut g = self.lock();
            while g
                .order
                .front()
                .is_some_and(|(t, _)| now_ms - t > self.settings.ttl_ms)
            {
                forget_oldest(&mut g);
            }
            m.remembered_scores.set(g.scores.len() as i64);
            while g
                .early_order
                .front()
                .is_some_and(|(t, _)| now_ms - t > self.settings.label_wait_ms)
            {
                if forget_oldest_early(&mut g) {
                    m.labels_unmatched.inc();
                }
            }
        }
        for (name, ms) in WINDOWS {
            let c = self.window(ms, now_ms);
            m.live_precision
                .with_label_values(&[name])
                .set(c.precision());
            m.live_recall.with_label_values(&[name]).set(c.recall());
            m.live_f1.with_label_values(&[name]).set(c.f1());
        }
    }

    /// Whether scores are remembered at all (a labels topic is read).
    pub fn remembers(&self) -> bool {
        self.settings.max_scores > 0
    }

    /// Scores remembered now.
    pub fn remembered(&self) -> usize {
        self.lock().scores.len()
    }
}

/// Drops the oldest remembered id, unless the map holds a later score for it.
fn forget_oldest(g: &mut Inner) {
    if let Some((t, id)) = g.order.pop_front()
        && g.scores.get(&id).is_some_and(|m| m.scored_ms == t)
    {
        g.scores.remove(&id);
    }
}

/// Drops the oldest early label; true if it was still waiting (not joined meanwhile).
fn forget_oldest_early(g: &mut Inner) -> bool {
    match g.early_order.pop_front() {
        Some((t, id)) if g.early.get(&id).is_some_and(|(_, at)| *at == t) => {
            g.early.remove(&id);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(prometheus::Registry::new()).unwrap()
    }

    fn label(id: &str, is_fraud: bool) -> Label {
        Label {
            transaction_id: id.into(),
            is_fraud,
            labelled_at: None,
        }
    }

    #[test]
    fn labels_join_their_scores_once() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default(), "v1");
        q.remember("a", true, 0, &m);
        q.remember("b", false, 0, &m);
        q.remember("c", true, 0, &m);
        assert_eq!(
            q.label(&label("a", true), 5_000, &m),
            Joined::Matched(LabelOutcome::TruePositive)
        );
        assert_eq!(
            q.label(&label("b", true), 6_000, &m),
            Joined::Matched(LabelOutcome::FalseNegative)
        );
        assert_eq!(
            q.label(&label("c", false), 7_000, &m),
            Joined::Matched(LabelOutcome::FalsePositive)
        );
        // A second label for a joined transaction, and one for a transaction never scored, wait
        // for a score; none comes, so they count as unmatched once the wait is over.
        assert_eq!(q.label(&label("a", true), 8_000, &m), Joined::Waiting);
        assert_eq!(q.label(&label("zz", true), 8_000, &m), Joined::Waiting);
        q.refresh(8_000 + 120_000, &m);
        assert_eq!(m.labels_unmatched.get(), 0);
        q.refresh(8_001 + 120_000, &m);
        assert_eq!(m.labels_unmatched.get(), 2);
        let tp = m
            .label_outcomes
            .with_label_values(&["v1", "true_positive"])
            .get();
        assert_eq!(tp, 1);
        assert_eq!(m.label_delay_seconds.get_sample_count(), 3);
        assert!((m.label_delay_seconds.get_sample_sum() - 18.0).abs() < 1e-9);
        let p = m.live_precision.with_label_values(&["5m"]).get();
        let r = m.live_recall.with_label_values(&["5m"]).get();
        assert_eq!((p, r), (0.5, 0.5));
        assert_eq!(m.live_f1.with_label_values(&["1h"]).get(), 0.5);
    }

    #[test]
    fn a_label_that_comes_before_its_score_waits_for_it() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default(), "v1");
        assert_eq!(q.label(&label("early", true), 1_000, &m), Joined::Waiting);
        q.remember("early", true, 1_500, &m);
        assert_eq!(q.remembered(), 0, "joined, not remembered");
        q.refresh(200_000, &m);
        assert_eq!(m.labels_unmatched.get(), 0);
        assert_eq!(q.window(3_600_000, 200_000).tp, 1);
    }

    #[test]
    fn windows_slide_with_the_clock() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default(), "v1");
        // Two true positives at t = 0, a false positive at 10 minutes.
        q.inline(true, true, 0, &m);
        q.inline(true, true, 1_000, &m);
        q.inline(true, false, 600_000, &m);
        q.refresh(600_000, &m);
        assert_eq!(m.live_precision.with_label_values(&["5m"]).get(), 0.0);
        assert!((m.live_precision.with_label_values(&["1h"]).get() - 2.0 / 3.0).abs() < 1e-12);
        // No fraud labelled in the last 5 minutes: recall is undefined there, not 0.
        assert!(m.live_recall.with_label_values(&["5m"]).get().is_nan());
        assert_eq!(m.live_recall.with_label_values(&["1h"]).get(), 1.0);
        // An hour and a bit later everything has left both windows.
        q.refresh(600_000 + 3_600_000 + BUCKET_MS, &m);
        assert!(m.live_precision.with_label_values(&["1h"]).get().is_nan());
        assert_eq!(q.window(3_600_000, 0).tp, 2);
    }

    #[test]
    fn memory_is_bounded_in_size_and_age() {
        let m = metrics();
        let settings = QualitySettings {
            max_scores: 3,
            ttl_ms: 60_000,
            label_wait_ms: 1_000,
        };
        let q = LiveQuality::new(settings, "v1");
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            q.remember(id, false, i as i64, &m);
        }
        assert_eq!(q.remembered(), 3);
        // "a" was forgotten for the cap: its label waits, then counts as unmatched.
        assert_eq!(q.label(&label("a", false), 10, &m), Joined::Waiting);
        // A re-scored id keeps its newer score when its older entry is dropped.
        q.remember("b", true, 30_000, &m);
        q.refresh(61_000, &m);
        assert_eq!(q.remembered(), 1);
        assert_eq!(m.remembered_scores.get(), 1);
        assert_eq!(
            q.label(&label("b", true), 61_000, &m),
            Joined::Matched(LabelOutcome::TruePositive)
        );
        // Expired between sweeps: too old to match.
        q.remember("e", true, 100_000, &m);
        assert_eq!(q.label(&label("e", true), 200_000, &m), Joined::Unmatched);
        let off = LiveQuality::new(
            QualitySettings {
                max_scores: 0,
                ttl_ms: 1,
                label_wait_ms: 1,
            },
            "v1",
        );
        off.remember("a", true, 0, &m);
        assert_eq!(off.remembered(), 0);
        assert_eq!(off.label(&label("a", true), 0, &m), Joined::Unmatched);
    }

    #[test]
    fn label_messages_are_validated_field_by_field() {
        let ok = Label::parse(
            br#"{"transaction_id":"t1","is_fraud":1,"labelled_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!((ok.transaction_id.as_str(), ok.is_fraud), ("t1", true));
        assert!(
            !Label::parse(br#"{"transaction_id":7,"is_fraud":false}"#)
                .unwrap()
                .is_fraud
        );
        let e = Label::parse(br#"{"is_fraud":true}"#).unwrap_err();
        assert_eq!(e.field(), Some("transaction_id"));
        let e = Label::parse(br#"{"transaction_id":"t","is_fraud":"yes"}"#).unwrap_err();
        assert_eq!((e.field(), e.reason()), (Some("is_fraud"), "invalid_label"));
        let e = Label::parse(b"not json").unwrap_err();
        assert_eq!(e.reason(), "invalid_label_json");
        let e =
            Label::parse(br#"{"transaction_id":"t","is_fraud":true,"labelled_at":5}"#).unwrap_err();
        assert_eq!(e.field(), Some("labelled_at"));
    }
}
