//! Windows of a time-sorted file, by period, stored compactly for training and evaluation.

use std::collections::HashSet;

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::split::{Period, TimeSplit};
use crate::features::{WindowBuilder, WindowSample};
use crate::model::FastModel;
use crate::schema::{Span, Transaction};

/// Many windows in one flat buffer (`n * window * width` floats) with their metadata.
#[derive(Debug, Clone, Default)]
pub struct WindowSet {
    /// Transactions per window.
    pub window: usize,
    /// Features per transaction.
    pub width: usize,
    /// Window data, left-padded, current transaction last.
    pub data: Vec<f32>,
    /// Real transactions per window.
    pub lens: Vec<usize>,
    /// Fraud labels (unlabelled counts as legitimate).
    pub labels: Vec<bool>,
    /// Event times of the scored transactions.
    pub ts: Vec<f64>,
    /// Cards.
    pub keys: Vec<String>,
    /// Transaction ids.
    pub ids: Vec<Option<String>>,
}

impl WindowSet {
    /// An empty set for windows of this shape.
    pub fn new(window: usize, width: usize) -> Self {
        WindowSet {
            window,
            width,
            ..Default::default()
        }
    }

    /// Appends one window.
    pub fn push(&mut self, w: WindowSample) {
        self.data.extend_from_slice(&w.data);
        self.lens.push(w.len);
        self.labels.push(w.label.unwrap_or(false));
        self.ts.push(w.ts);
        self.keys.push(w.key);
        self.ids.push(w.id);
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Number of fraud windows.
    pub fn frauds(&self) -> usize {
        self.labels.iter().filter(|&&y| y).count()
    }

    /// Window `i`'s data.
    pub fn get(&self, i: usize) -> &[f32] {
        let n = self.window * self.width;
        &self.data[i * n..(i + 1) * n]
    }

    /// The windows `idx` as a training batch: their data, real lengths and 0/1 targets.
    pub fn batch(&self, idx: &[usize]) -> (Vec<&[f32]>, Vec<usize>, Vec<f32>) {
        (
            idx.iter().map(|&i| self.get(i)).collect(),
            idx.iter().map(|&i| self.lens[i]).collect(),
            idx.iter()
                .map(|&i| f32::from(u8::from(self.labels[i])))
                .collect(),
        )
    }

    /// The windows of the cards `keep` selects (all their transactions, so prevalence stays
    /// natural): a cheaper stand-in for the whole set when only a ranking metric is needed.
    pub fn cards_subset(&self, keep: impl Fn(&str) -> bool) -> WindowSet {
        let mut out = WindowSet::new(self.window, self.width);
        for i in (0..self.len()).filter(|&i| keep(&self.keys[i])) {
            out.data.extend_from_slice(self.get(i));
            out.lens.push(self.lens[i]);
            out.labels.push(self.labels[i]);
            out.ts.push(self.ts[i]);
            out.keys.push(self.keys[i].clone());
            out.ids.push(self.ids[i].clone());
        }
        out
    }

    /// Scores every window with the fast forward, `batch` at a time; `progress` gets the count
    /// done after each batch.
    pub fn score(&self, model: &FastModel, batch: usize, progress: impl FnMut(usize)) -> Vec<f32> {
        self.score_on(model, batch, crate::model::ForwardPath::scoring(), progress)
    }

    /// [`WindowSet::score`] on the chosen forward path (another precision than the process's).
    pub fn score_on(
        &self,
        model: &FastModel,
        batch: usize,
        path: crate::model::ForwardPath,
        mut progress: impl FnMut(usize),
    ) -> Vec<f32> {
        let mut scores = Vec::with_capacity(self.len());
        for start in (0..self.len()).step_by(batch.max(1)) {
            let end = (start + batch).min(self.len());
            let ws: Vec<&[f32]> = (start..end).map(|i| self.get(i)).collect();
            let (s, _) = model.predict_on(&ws, &self.lens[start..end], path);
            scores.extend(s);
            progress(end);
        }
        scores
    }
}

/// A file's windows split into periods.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Targets in the training period.
    pub train: WindowSet,
    /// Targets in the validation period.
    pub valid: WindowSet,
    /// Targets in the test period.
    pub test: WindowSet,
}

impl Dataset {
    /// Replays every transaction through the shared window code; each lands in its period's set
    /// (history and after-the-end transactions only feed windows).
    pub fn build(
        builder: &WindowBuilder,
        sorted: &[Transaction],
        split: &TimeSplit,
        label_delay: Span,
    ) -> Self {
        let (t, w) = (builder.window_len(), builder.width());
        let mut ds = Dataset {
            train: WindowSet::new(t, w),
            valid: WindowSet::new(t, w),
            test: WindowSet::new(t, w),
        };
        builder.replay(sorted, label_delay, |tx, sample| {
            match split.period(tx.ts) {
                Period::Train => ds.train.push(sample),
                Period::Valid => ds.valid.push(sample),
                Period::Test => ds.test.push(sample),
                Period::History | Period::After => {}
            }
        });
        ds
    }
}

/// Indices of one epoch's training windows: every fraud, and legitimate windows at `neg_per_pos`
/// per fraud (all of them when None), drawn afresh each epoch, shuffled.
pub fn epoch_sample(labels: &[bool], neg_per_pos: Option<f64>, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i]).collect();
    let neg: Vec<usize> = (0..labels.len()).filter(|&i| !labels[i]).collect();
    let n_neg = match neg_per_pos {
        Some(r) => ((pos.len() as f64 * r).round() as usize).min(neg.len()),
        None => neg.len(),
    };
    let mut idx = pos;
    idx.extend(
        rand::seq::index::sample(rng, neg.len(), n_neg)
            .into_iter()
            .map(|i| neg[i]),
    );
    // Fisher-Yates with our own RNG, so a seed fixes the order.
    for i in (1..idx.len()).rev() {
        let j = rng.random_range(0..=i);
        idx.swap(i, j);
    }
    idx
}

/// A deterministic subset of cards (by hash of the card id) of about `fraction` of them.
pub fn card_fraction(fraction: f64) -> impl Fn(&str) -> bool {
    move |key: &str| {
        // FNV-1a: stable across runs and platforms, unlike std's RandomState.
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        (h % 10_000) as f64 / 10_000.0 < fraction
    }
}

/// Distinct cards in a set.
pub fn card_count(set: &WindowSet) -> usize {
    set.keys.iter().collect::<HashSet<_>>().len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn undersampling_keeps_every_fraud_and_the_ratio() {
        let labels: Vec<bool> = (0..1000).map(|i| i % 50 == 0).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let idx = epoch_sample(&labels, Some(3.0), &mut rng);
        assert_eq!(idx.len(), 20 + 60);
        assert_eq!(idx.iter().filter(|&&i| labels[i]).count(), 20);
        let all = epoch_sample(&labels, None, &mut rng);
        assert_eq!(all.len(), 1000);
        let again = epoch_sample(&labels, Some(3.0), &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(idx, again, "a seed fixes the sample and its order");
    }

    #[test]
    fn card_fraction_is_stable_and_about_right() {
        let keep = card_fraction(0.3);
        let n = (0..10_000).filter(|i| keep(&i.to_string())).count();
        assert!((2_700..3_300).contains(&n), "{n}");
        assert_eq!(keep("42"), card_fraction(0.3)("42"));
    }
}
