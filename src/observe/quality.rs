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
    /// A million scores: about 110 MB at the 107 bytes per score `fraudstream bench` measures.
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
                .set(c.precision().unwrap_or(f64::NAN));
            m.live_recall
                .with_label_values(&[name])
                .set(c.recall().unwrap_or(f64::NAN));
            m.live_f1
                .with_label_values(&[name])
                .set(c.f1().unwrap_or(f64::NAN));
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
            context: None,
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
}
