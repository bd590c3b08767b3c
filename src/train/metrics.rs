//! Offline metrics at natural prevalence: average precision, ROC AUC, precision/recall/F1 at a
//! threshold, the precision-recall and ROC curves, and card precision@k per day.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use crate::schema::{Confusion, f1};

/// One point of the precision-recall curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrPoint {
    /// Alert when score >= threshold.
    pub threshold: f64,
    /// Precision at that threshold.
    pub precision: f64,
    /// Recall at that threshold.
    pub recall: f64,
    /// Fraction of transactions alerted.
    pub alert_rate: f64,
}

/// Indices sorted by descending score.
fn order_desc(scores: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx
}

/// The precision-recall curve at every distinct score, highest threshold first (as
/// scikit-learn's `precision_recall_curve`, reversed).
pub fn pr_curve(scores: &[f32], labels: &[bool]) -> Vec<PrPoint> {
    let positives = labels.iter().filter(|&&y| y).count() as f64;
    let n = scores.len() as f64;
    let idx = order_desc(scores);
    let mut out = Vec::new();
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in idx.iter().enumerate() {
        if labels[i] {
            tp += 1.0
        } else {
            fp += 1.0
        }
        let last_of_tie = idx.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            out.push(PrPoint {
                threshold: f64::from(scores[i]),
                precision: tp / (tp + fp),
                recall: if positives > 0.0 { tp / positives } else { 0.0 },
                alert_rate: (tp + fp) / n,
            });
        }
    }
    out
}

/// Average precision: Σ (Rₖ − Rₖ₋₁)·Pₖ over distinct thresholds (scikit-learn's definition).
pub fn average_precision(scores: &[f32], labels: &[bool]) -> f64 {
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    for p in pr_curve(scores, labels) {
        ap += (p.recall - prev_recall) * p.precision;
        prev_recall = p.recall;
    }
    ap
}

/// The ROC curve as (false-positive rate, true-positive rate) points from (0,0) to (1,1).
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    let pos = labels.iter().filter(|&&y| y).count().max(1) as f64;
    let neg = labels.iter().filter(|&&y| !y).count().max(1) as f64;
    let mut out = vec![(0.0, 0.0)];
    for p in pr_curve(scores, labels) {
        let tp = p.recall * pos;
        let alerted = p.alert_rate * scores.len() as f64;
        out.push(((alerted - tp) / neg, tp / pos));
    }
    out
}

/// Area under the ROC curve (trapezoids, so ties count one half); 0.5 without both classes.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> f64 {
    let has_both = labels.iter().any(|&y| y) && labels.iter().any(|&y| !y);
    if !has_both {
        return 0.5;
    }
    roc_curve(scores, labels)
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

/// Card precision@k for one day: of the k cards with the highest score that day (a card's
/// score is its highest transaction score), the fraction that had a fraud that day. Days with
/// fewer than k cards divide by k all the same, as the handbook does.
pub fn card_precision_at_k(day: &[(&str, f32, bool)], k: usize) -> f64 {
    let mut cards: HashMap<&str, (f32, bool)> = HashMap::new();
    for &(card, score, fraud) in day {
        let e = cards.entry(card).or_insert((f32::NEG_INFINITY, false));
        e.0 = e.0.max(score);
        e.1 |= fraud;
    }
    let mut ranked: Vec<(&str, (f32, bool))> = cards.into_iter().collect();
    // Ties broken by card id so the number is deterministic.
    ranked.sort_by(|a, b| b.1.0.total_cmp(&a.1.0).then(a.0.cmp(b.0)));
    let hits = ranked.iter().take(k).filter(|(_, (_, f))| *f).count();
    hits as f64 / k as f64
}

/// Every headline number for one set of scores at one threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Transactions scored.
    pub transactions: u64,
    /// Frauds among them.
    pub frauds: u64,
    /// Area under the precision-recall curve.
    pub average_precision: f64,
    /// Area under the ROC curve.
    pub roc_auc: f64,
    /// The threshold the counts below use.
    pub threshold: f64,
    /// Precision at the threshold.
    pub precision: f64,
    /// Recall at the threshold.
    pub recall: f64,
    /// F1 at the threshold.
    pub f1: f64,
    /// Fraction of transactions alerted.
    pub alert_rate: f64,
    /// Confusion counts at the threshold.
    pub confusion: Confusion,
    /// Mean over days of card precision@100.
    pub card_precision_at_100: f64,
}

impl Summary {
    /// Computes the summary; `keys` and `ts` (seconds) give each transaction's card and day.
    pub fn compute(
        scores: &[f32],
        labels: &[bool],
        keys: &[String],
        ts: &[f64],
        threshold: f64,
    ) -> Self {
        let confusion = Confusion::at(scores, labels, threshold);
        let daily = daily_card_precision(scores, labels, keys, ts, 100);
        let cp = if daily.is_empty() {
            0.0
        } else {
            daily.iter().map(|d| d.1).sum::<f64>() / daily.len() as f64
        };
        Summary {
            transactions: scores.len() as u64,
            frauds: labels.iter().filter(|&&y| y).count() as u64,
            average_precision: average_precision(scores, labels),
            roc_auc: roc_auc(scores, labels),
            threshold,
            // Reports show an undefined ratio as 0 (scikit-learn's zero_division=0).
            precision: confusion.precision().unwrap_or(0.0),
            recall: confusion.recall().unwrap_or(0.0),
            f1: confusion.f1().unwrap_or(0.0),
            alert_rate: (confusion.tp + confusion.fp) as f64 / scores.len().max(1) as f64,
            confusion,
            card_precision_at_100: cp,
        }
    }
}

/// Frauds and how many of them alerted, for one value of a grouping column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupRecall {
    /// Transactions with this value.
    pub transactions: u64,
    /// Frauds among them.
    pub frauds: u64,
    /// Frauds alerted (score >= threshold).
    pub alerted: u64,
    /// alerted / frauds (0 without frauds).
    pub recall: f64,
}

/// Recall at `threshold` per value of `groups` (e.g. the simulator's fraud scenario).
pub fn recall_by_group(
    scores: &[f32],
    labels: &[bool],
    groups: &[String],
    threshold: f64,
) -> std::collections::BTreeMap<String, GroupRecall> {
    let mut out: std::collections::BTreeMap<String, GroupRecall> = Default::default();
    for ((&s, &y), g) in scores.iter().zip(labels).zip(groups) {
        let e = out.entry(g.clone()).or_default();
        e.transactions += 1;
        if y {
            e.frauds += 1;
            e.alerted += u64::from(f64::from(s) >= threshold);
        }
    }
    for g in out.values_mut() {
        g.recall = if g.frauds == 0 {
            0.0
        } else {
            g.alerted as f64 / g.frauds as f64
        };
    }
    out
}

/// Card precision@k for each UTC day present: `(day number since the epoch, precision)`.
pub fn daily_card_precision(
    scores: &[f32],
    labels: &[bool],
    keys: &[String],
    ts: &[f64],
    k: usize,
) -> Vec<(i64, f64)> {
    let mut days: std::collections::BTreeMap<i64, Vec<(&str, f32, bool)>> = Default::default();
    for i in 0..scores.len() {
        let day = (ts[i] / 86_400.0).floor() as i64;
        days.entry(day)
            .or_default()
            .push((&keys[i], scores[i], labels[i]));
    }
    days.into_iter()
        .map(|(d, rows)| (d, card_precision_at_k(&rows, k)))
        .collect()
}

/// Average precision of scores ranked by `order` (descending score) when transaction `i`
/// counts `weight[i]` times: a bootstrap resample without copying the data. Ties form one
/// threshold, as in [`average_precision`]; NaN without a weighted positive.
pub fn weighted_average_precision(
    scores: &[f32],
    labels: &[bool],
    order: &[usize],
    weight: &[u32],
) -> f64 {
    let positives: f64 = order
        .iter()
        .filter(|&&i| labels[i])
        .map(|&i| f64::from(weight[i]))
        .sum();
    if positives == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut fp, mut ap, mut prev_recall) = (0.0, 0.0, 0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        let w = f64::from(weight[i]);
        if labels[i] {
            tp += w;
        } else {
            fp += w;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie && tp + fp > 0.0 {
            let recall = tp / positives;
            ap += (recall - prev_recall) * tp / (tp + fp);
            prev_recall = recall;
        }
    }
    ap
}

/// Two models' average precision on the same transactions, and a paired bootstrap of the
/// difference: each resample draws the transactions with replacement once and scores both
/// models on that same draw, so the interval reflects the models, not which transactions
/// happened to be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ApDifference {
    /// AP of the first model on all transactions.
    pub ap_a: f64,
    /// AP of the second model.
    pub ap_b: f64,
    /// `ap_b - ap_a`.
    pub difference: f64,
    /// 2.5th percentile of the resampled differences.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
    /// Fraction of resamples in which the second model's AP was higher.
    pub b_better_fraction: f64,
    /// Resamples drawn (those without a fraud are skipped).
    pub resamples: usize,
    /// The generator's seed (the same seed gives the same interval).
    pub seed: u64,
}

impl ApDifference {
    /// What the interval says, in words.
    pub fn verdict(&self) -> &'static str {
        if self.low > 0.0 {
            "B is better: the 95% interval of AP(B) - AP(A) lies above 0"
        } else if self.high < 0.0 {
            "A is better: the 95% interval of AP(B) - AP(A) lies below 0"
        } else {
            "no significant difference: the 95% interval of AP(B) - AP(A) contains 0"
        }
    }
}

/// The paired bootstrap of AP(B) - AP(A) (`resamples` draws of all transactions with
/// replacement, seeded; run on the rayon pool). `tick` is called after each resample.
pub fn paired_bootstrap_ap(
    a: &[f32],
    b: &[f32],
    labels: &[bool],
    resamples: usize,
    seed: u64,
    tick: impl Fn() + Sync,
) -> ApDifference {
    use rand::{RngExt, SeedableRng};
    use rayon::prelude::*;
    assert_eq!(a.len(), labels.len(), "one score per label");
    assert_eq!(b.len(), labels.len(), "one score per label");
    let (order_a, order_b) = (order_desc(a), order_desc(b));
    let n = labels.len();
    let mut diffs: Vec<f64> = (0..resamples)
        .into_par_iter()
        .map_init(
            || vec![0u32; n],
            |weight, r| {
                weight.fill(0);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                for _ in 0..n {
                    weight[rng.random_range(0..n)] += 1;
                }
                let d = weighted_average_precision(b, labels, &order_b, weight)
                    - weighted_average_precision(a, labels, &order_a, weight);
                tick();
                d
            },
        )
        .filter(|d| d.is_finite())
        .collect();
    diffs.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if diffs.is_empty() {
            f64::NAN
        } else {
            quantile_sorted_f64(&diffs, q)
        }
    };
    let (ap_a, ap_b) = (average_precision(a, labels), average_precision(b, labels));
    ApDifference {
        ap_a,
        ap_b,
        difference: ap_b - ap_a,
        low: pick(0.025),
        high: pick(0.975),
        b_better_fraction: diffs.iter().filter(|&&d| d > 0.0).count() as f64
            / diffs.len().max(1) as f64,
        resamples: diffs.len(),
        seed,
    }
}

fn quantile_sorted_f64(sorted: &[f64], q: f64) -> f64 {
    crate::features::quantile_sorted(sorted, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from scikit-learn 1.9.1:
    //   from sklearn.metrics import average_precision_score, roc_auc_score
    //   y = [0, 0, 1, 1, 0, 1]; s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]
    //   average_precision_score(y, s) -> 0.8666666666666667
    //   roc_auc_score(y, s)           -> 0.7777777777777778
    const Y: [bool; 6] = [false, false, true, true, false, true];
    const S: [f32; 6] = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9];

    #[test]
    fn average_precision_matches_sklearn() {
        assert!((average_precision(&S, &Y) - 0.866_666_666_666_666_7).abs() < 1e-12);
        // A perfect ranking has AP 1, regardless of prevalence.
        assert_eq!(
            average_precision(&[0.9, 0.1, 0.2], &[true, false, false]),
            1.0
        );
    }

    #[test]
    fn roc_auc_matches_sklearn_with_ties() {
        assert!((roc_auc(&S, &Y) - 0.777_777_777_777_777_8).abs() < 1e-12);
        // All scores tied: the curve is the diagonal.
        assert_eq!(roc_auc(&[0.5; 4], &[true, false, true, false]), 0.5);
    }

    #[test]
    fn recall_per_group_counts_alerted_frauds() {
        let groups: Vec<String> = ["0", "2", "2", "3", "2", "3"].map(String::from).to_vec();
        let r = recall_by_group(&S, &Y, &groups, 0.4);
        // Frauds: index 2 (0.35, group 2), 3 (0.8, group 3), 5 (0.9, group 3).
        assert_eq!(r["2"].frauds, 1);
        assert_eq!(r["2"].recall, 0.0);
        assert_eq!((r["3"].frauds, r["3"].alerted, r["3"].recall), (2, 2, 1.0));
        assert_eq!(r["0"].transactions, 1);
    }

    #[test]
    fn pr_curve_groups_ties() {
        let curve = pr_curve(&S, &Y);
        let thresholds: Vec<f64> = curve.iter().map(|p| p.threshold).collect();
        assert_eq!(
            thresholds.len(),
            5,
            "0.4 appears twice but is one threshold"
        );
        assert_eq!(curve[2].threshold, f64::from(0.4f32));
        assert_eq!((curve[2].precision, curve[2].alert_rate), (0.5, 4.0 / 6.0));
    }

    #[test]
    fn card_precision_at_k_by_hand() {
        // Card a: max 0.9, fraud; b: max 0.8, legit; c: 0.7, fraud; d: 0.1, fraud.
        let day = [
            ("a", 0.2, true),
            ("a", 0.9, false),
            ("b", 0.8, false),
            ("c", 0.7, true),
            ("d", 0.1, true),
        ];
        assert_eq!(card_precision_at_k(&day, 2), 0.5);
        assert!((card_precision_at_k(&day, 3) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            card_precision_at_k(&day, 10),
            0.3,
            "fewer cards than k still divides by k"
        );
    }

    #[test]
    fn weighted_ap_with_unit_weights_is_ap() {
        let order = order_desc(&S);
        let ap = weighted_average_precision(&S, &Y, &order, &[1; 6]);
        assert!((ap - average_precision(&S, &Y)).abs() < 1e-12);
        // Counting a row twice is the same as duplicating it.
        let w = [2, 1, 1, 1, 3, 1];
        let (mut s2, mut y2) = (Vec::new(), Vec::new());
        for i in 0..6 {
            for _ in 0..w[i] {
                s2.push(S[i]);
                y2.push(Y[i]);
            }
        }
        let ap = weighted_average_precision(&S, &Y, &order, &w);
        assert!((ap - average_precision(&s2, &y2)).abs() < 1e-12);
        assert!(weighted_average_precision(&S, &Y, &order, &[1, 1, 0, 0, 1, 0]).is_nan());
    }

    #[test]
    fn the_paired_bootstrap_tells_a_better_model_from_noise() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 4_000;
        let labels: Vec<bool> = (0..n).map(|i| i % 20 == 0).collect();
        let noise: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
        // A: half signal; B: the same plus more signal; C: A with tiny noise.
        let a: Vec<f32> = (0..n)
            .map(|i| noise[i] + if labels[i] { 0.3 } else { 0.0 })
            .collect();
        let b: Vec<f32> = (0..n)
            .map(|i| noise[i] + if labels[i] { 0.8 } else { 0.0 })
            .collect();
        let same = paired_bootstrap_ap(&a, &a, &labels, 200, 1, || {});
        assert_eq!((same.low, same.high, same.difference), (0.0, 0.0, 0.0));
        assert!(same.verdict().starts_with("no significant"));
        let better = paired_bootstrap_ap(&a, &b, &labels, 200, 1, || {});
        assert!(better.difference > 0.2, "{better:?}");
        assert!(
            better.low > 0.0 && better.low < better.difference && better.high > better.difference
        );
        assert_eq!(better.b_better_fraction, 1.0);
        assert!(better.verdict().starts_with("B is better"));
        let worse = paired_bootstrap_ap(&b, &a, &labels, 200, 1, || {});
        assert!(worse.high < 0.0 && worse.verdict().starts_with("A is better"));
        // Seeded: the same call gives the same interval.
        assert_eq!(better, paired_bootstrap_ap(&a, &b, &labels, 200, 1, || {}));
    }
}
