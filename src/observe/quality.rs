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
use std::sync::{Arc, Mutex};

use super::metrics::{Metrics, WINDOWS};
use crate::schema::{Confusion, Label, LabelOutcome};

/// How long one bucket of the sliding windows lasts.
const BUCKET_MS: i64 = 10_000;
const BUCKETS: usize = (3_600_000 / BUCKET_MS) as usize;

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

impl QualitySettings {
    /// A million scores: about 160 MB at the 159 bytes per score `fraudstream bench` measures.
    pub const DEFAULT_MAX_SCORES: usize = 1_000_000;
    /// A day: labels that take longer than that no longer reach live quality.
    pub const DEFAULT_TTL_MS: u64 = 24 * 3_600_000;
    /// Two minutes: a detector behind by more than that has a lag alert firing anyway.
    pub const DEFAULT_LABEL_WAIT_MS: i64 = 120_000;
}

impl Default for QualitySettings {
    fn default() -> Self {
        QualitySettings {
            max_scores: Self::DEFAULT_MAX_SCORES,
            ttl_ms: Self::DEFAULT_TTL_MS as i64,
            label_wait_ms: Self::DEFAULT_LABEL_WAIT_MS,
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

/// Which model made a decision: its version, and whether it alerted (or would have).
pub type Verdict = (Arc<str>, bool);

/// The decisions made for one transaction: the champion's (which alerted or not) and the
/// shadow challenger's, when one scored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// The champion's version and decision.
    pub champion: Verdict,
    /// The challenger's version and decision.
    pub challenger: Option<Verdict>,
}

impl Verdicts {
    /// A champion's decision only.
    pub fn champion(version: &str, alerted: bool) -> Self {
        Verdicts {
            champion: (version.into(), alerted),
            challenger: None,
        }
    }
}

/// The role a model plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Its scores alert.
    Champion,
    /// Scored in the shadow.
    Challenger,
}

impl Role {
    /// As metrics and JSON name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Champion => "champion",
            Role::Challenger => "challenger",
        }
    }
}

/// Sliding counts for one model: 10-second buckets over the last hour, hourly ones over the
/// last day.
struct ModelWindows {
    fine: Vec<(i64, Confusion)>,
    coarse: Vec<(i64, Confusion)>,
}

const HOUR_MS: i64 = 3_600_000;
const HOURS: usize = 25;

impl ModelWindows {
    fn new() -> Self {
        ModelWindows {
            fine: vec![(i64::MIN, Confusion::default()); BUCKETS],
            coarse: vec![(i64::MIN, Confusion::default()); HOURS],
        }
    }

    fn add(&mut self, o: LabelOutcome, now_ms: i64) {
        add_to(&mut self.fine, BUCKET_MS, o, now_ms);
        add_to(&mut self.coarse, HOUR_MS, o, now_ms);
    }

    /// Outcomes in the last `window_ms`: to the 10 s bucket up to an hour, to the hour beyond.
    fn window(&self, window_ms: i64, now_ms: i64) -> Confusion {
        if window_ms <= HOUR_MS {
            sum_buckets(&self.fine, BUCKET_MS, window_ms, now_ms)
        } else {
            sum_buckets(&self.coarse, HOUR_MS, window_ms, now_ms)
        }
    }
}

fn add_to(buckets: &mut [(i64, Confusion)], bucket_ms: i64, o: LabelOutcome, now_ms: i64) {
    let b = now_ms.div_euclid(bucket_ms);
    let slot = &mut buckets[b.rem_euclid(buckets.len() as i64) as usize];
    if slot.0 != b {
        *slot = (b, Confusion::default());
    }
    slot.1.add(o);
}

fn sum_buckets(
    buckets: &[(i64, Confusion)],
    bucket_ms: i64,
    window_ms: i64,
    now_ms: i64,
) -> Confusion {
    let now_b = now_ms.div_euclid(bucket_ms);
    let first = now_b - (window_ms / bucket_ms).max(1) + 1;
    let mut c = Confusion::default();
    for (b, counts) in buckets {
        if *b >= first && *b <= now_b {
            c.merge(counts);
        }
    }
    c
}

/// The per-model windows: 5 minutes, an hour, a day.
pub const MODEL_WINDOWS: [(&str, i64); 3] =
    [("5m", 5 * 60_000), ("1h", HOUR_MS), ("1d", 24 * HOUR_MS)];

struct Memo {
    verdicts: Verdicts,
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
    /// Outcomes per model version and role, for side-by-side comparison.
    models: std::collections::BTreeMap<(Role, Arc<str>), ModelWindows>,
    /// Early labels' ids, oldest first.
    early_order: VecDeque<(i64, String)>,
}

/// Remembered scores and the label join; updates the quality metrics on [`Metrics`].
pub struct LiveQuality {
    settings: QualitySettings,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for LiveQuality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuality")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LiveQuality {
    /// Empty memory.
    pub fn new(settings: QualitySettings) -> Self {
        LiveQuality {
            settings,
            inner: Mutex::new(Inner {
                scores: HashMap::new(),
                order: VecDeque::new(),
                buckets: vec![(i64::MIN, Confusion::default()); BUCKETS],
                early: HashMap::new(),
                early_order: VecDeque::new(),
                models: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("quality lock")
    }

    /// Remembers a decision until its label arrives (or it expires); joins it at once to a label
    /// that came first.
    pub fn remember(&self, transaction_id: &str, verdicts: Verdicts, now_ms: i64, m: &Metrics) {
        if self.settings.max_scores == 0 {
            return;
        }
        let mut g = self.lock();
        if let Some((is_fraud, _)) = g.early.remove(transaction_id) {
            drop(g);
            m.label_delay_seconds.observe(0.0);
            self.count(&verdicts, is_fraud, now_ms, m);
            return;
        }
        // One allocation shared by the map and the expiry queue.
        let id: std::sync::Arc<str> = transaction_id.into();
        g.scores.insert(
            id.clone(),
            Memo {
                verdicts,
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
                Joined::Matched(self.count(&memo.verdicts, label.is_fraud, now_ms, m))
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
    pub fn inline(
        &self,
        verdicts: &Verdicts,
        is_fraud: bool,
        now_ms: i64,
        m: &Metrics,
    ) -> LabelOutcome {
        m.labels.with_label_values(&["inline"]).inc();
        m.label_delay_seconds.observe(0.0);
        self.count(verdicts, is_fraud, now_ms, m)
    }

    /// Counts a label against the champion's decision (the one that alerted or not) and the
    /// challenger's; returns the champion's outcome.
    fn count(&self, v: &Verdicts, is_fraud: bool, now_ms: i64, m: &Metrics) -> LabelOutcome {
        let (version, alerted) = &v.champion;
        let o = LabelOutcome::of(*alerted, is_fraud);
        m.label_outcomes
            .with_label_values(&[version, o.as_str()])
            .inc();
        let mut g = self.lock();
        add_to(&mut g.buckets, BUCKET_MS, o, now_ms);
        g.models
            .entry((Role::Champion, version.clone()))
            .or_insert_with(ModelWindows::new)
            .add(o, now_ms);
        if let Some((version, alerted)) = &v.challenger {
            let c = LabelOutcome::of(*alerted, is_fraud);
            m.challenger_label_outcomes
                .with_label_values(&[version, c.as_str()])
                .inc();
            g.models
                .entry((Role::Challenger, version.clone()))
                .or_insert_with(ModelWindows::new)
                .add(c, now_ms);
        }
        o
    }

    /// The outcomes of labels joined in the last `window_ms` for one model (to the 10 s bucket
    /// up to an hour, to the hour beyond, up to a day).
    pub fn model_window(
        &self,
        role: Role,
        version: &str,
        window_ms: i64,
        now_ms: i64,
    ) -> Confusion {
        let g = self.lock();
        g.models
            .get(&(role, Arc::from(version)))
            .map(|w| w.window(window_ms, now_ms))
            .unwrap_or_default()
    }

    /// The outcomes of labels joined in the last `window_ms` (to the bucket).
    pub fn window(&self, window_ms: i64, now_ms: i64) -> Confusion {
        sum_buckets(&self.lock().buckets, BUCKET_MS, window_ms, now_ms)
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
        self.refresh_models(now_ms, m);
        for (name, ms) in WINDOWS {
            let c = self.window(ms, now_ms);
            m.live_precision
                .with_label_values(&[name])
                .set(c.precision().unwrap_or(f64::NAN));
            m.live_recall
                .with_label_values(&[name])
                .set(c.recall().unwrap_or(f64::NAN));
            m.live_f1
                .with_label_values(&[name])
                .set(c.f1().unwrap_or(f64::NAN));
        }
    }

    /// Sets the per-model gauges; a model with no label in the last day leaves them.
    fn refresh_models(&self, now_ms: i64, m: &Metrics) {
        let mut g = self.lock();
        let day = MODEL_WINDOWS[2].1;
        g.models.retain(|(role, version), w| {
            let keep = w.window(day, now_ms) != Confusion::default();
            for (name, ms) in MODEL_WINDOWS {
                let labels = [role.as_str(), &**version, name];
                let c = w.window(ms, now_ms);
                for (gauge, value) in [
                    (&m.model_precision, c.precision()),
                    (&m.model_recall, c.recall()),
                    (&m.model_f1, c.f1()),
                ] {
                    if keep {
                        gauge
                            .with_label_values(&labels)
                            .set(value.unwrap_or(f64::NAN));
                    } else {
                        let _ = gauge.remove_label_values(&labels);
                    }
                }
            }
            keep
        });
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

    fn v(alerted: bool) -> Verdicts {
        Verdicts::champion("v1", alerted)
    }

    fn label(id: &str, is_fraud: bool) -> Label {
        Label {
            transaction_id: id.into(),
            is_fraud,
            labelled_at: None,
            context: None,
        }
    }

    #[test]
    fn labels_join_their_scores_once() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default());
        q.remember("a", v(true), 0, &m);
        q.remember("b", v(false), 0, &m);
        q.remember("c", v(true), 0, &m);
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
        let q = LiveQuality::new(QualitySettings::default());
        assert_eq!(q.label(&label("early", true), 1_000, &m), Joined::Waiting);
        q.remember("early", v(true), 1_500, &m);
        assert_eq!(q.remembered(), 0, "joined, not remembered");
        q.refresh(200_000, &m);
        assert_eq!(m.labels_unmatched.get(), 0);
        assert_eq!(q.window(3_600_000, 200_000).tp, 1);
    }

    #[test]
    fn windows_slide_with_the_clock() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default());
        // Two true positives at t = 0, a false positive at 10 minutes.
        q.inline(&v(true), true, 0, &m);
        q.inline(&v(true), true, 1_000, &m);
        q.inline(&v(true), false, 600_000, &m);
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
        let q = LiveQuality::new(settings);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            q.remember(id, v(false), i as i64, &m);
        }
        assert_eq!(q.remembered(), 3);
        // "a" was forgotten for the cap: its label waits, then counts as unmatched.
        assert_eq!(q.label(&label("a", false), 10, &m), Joined::Waiting);
        // A re-scored id keeps its newer score when its older entry is dropped.
        q.remember("b", v(true), 30_000, &m);
        q.refresh(61_000, &m);
        assert_eq!(q.remembered(), 1);
        assert_eq!(m.remembered_scores.get(), 1);
        assert_eq!(
            q.label(&label("b", true), 61_000, &m),
            Joined::Matched(LabelOutcome::TruePositive)
        );
        // Expired between sweeps: too old to match.
        q.remember("e", v(true), 100_000, &m);
        assert_eq!(q.label(&label("e", true), 200_000, &m), Joined::Unmatched);
        let off = LiveQuality::new(QualitySettings {
            max_scores: 0,
            ttl_ms: 1,
            label_wait_ms: 1,
        });
        off.remember("a", v(true), 0, &m);
        assert_eq!(off.remembered(), 0);
        assert_eq!(off.label(&label("a", true), 0, &m), Joined::Unmatched);
    }

    #[test]
    fn champion_and_challenger_are_counted_apart_per_version() {
        let m = metrics();
        let q = LiveQuality::new(QualitySettings::default());
        let both = |champion: bool, challenger: bool| Verdicts {
            champion: ("v1".into(), champion),
            challenger: Some(("v2".into(), challenger)),
        };
        // Fraud caught by the challenger only; a false alarm of the champion only; then a
        // fraud both catch (remembered, joined by a label later).
        q.inline(&both(false, true), true, 0, &m);
        q.inline(&both(true, false), false, 1_000, &m);
        q.remember("t", both(true, true), 2_000, &m);
        q.label(&label("t", true), 3_000, &m);
        let champion = q.model_window(Role::Champion, "v1", 3_600_000, 3_000);
        let challenger = q.model_window(Role::Challenger, "v2", 3_600_000, 3_000);
        assert_eq!((champion.tp, champion.fp, champion.fn_), (1, 1, 1));
        assert_eq!((challenger.tp, challenger.fp, challenger.fn_), (2, 0, 0));
        let outcome =
            |c: &prometheus::IntCounterVec, v: &str, o: &str| c.with_label_values(&[v, o]).get();
        assert_eq!(outcome(&m.label_outcomes, "v1", "false_positive"), 1);
        assert_eq!(
            outcome(&m.challenger_label_outcomes, "v2", "true_positive"),
            2
        );
        q.refresh(3_000, &m);
        let gauge = |g: &prometheus::GaugeVec, role: &str, v: &str, w: &str| {
            g.with_label_values(&[role, v, w]).get()
        };
        assert_eq!(gauge(&m.model_recall, "challenger", "v2", "1h"), 1.0);
        assert_eq!(gauge(&m.model_precision, "champion", "v1", "1d"), 0.5);
        // The champion-wide gauges are unchanged in meaning: the champion's decisions.
        assert_eq!(m.live_precision.with_label_values(&["1h"]).get(), 0.5);
        // A day later without labels, the per-model series leave /metrics.
        q.refresh(3_000 + 25 * 3_600_000, &m);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .unwrap();
        assert!(!text.contains("fraudstream_model_f1{"), "{text}");
    }
}
