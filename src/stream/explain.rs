//! Why an alert fired, in the model's own terms: for each feature of the alerted transaction,
//! the score it would get if that feature had its typical value (the training median), all
//! else equal. The features whose typical value lowers the score most are the reasons an
//! analyst reads ("terminal fraud rate 7d: 0.43, typically 0; score without it 0.08").
//!
//! Costs one forward pass per feature, batched, and only for alerts (under 1% of transactions
//! at the default threshold), on the scorer's thread.

use serde::{Deserialize, Serialize};

use crate::model::FastModel;

/// How many reasons an alert carries: the few an analyst reads first.
pub const TOP_REASONS: usize = 3;

/// One feature that made a transaction suspicious.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The feature (a column of the spec, e.g. `terminal_id_fraud_rate_7d_delay_7d`).
    pub feature: String,
    /// Its value for this transaction (unscaled).
    pub value: f64,
    /// Its typical value: the median on the training period.
    pub typical: f64,
    /// The score with this feature at its typical value, everything else unchanged.
    pub score_without: f32,
}

/// What explaining needs besides the model: feature names and typical values.
#[derive(Debug, Clone)]
pub struct Explainer {
    names: Vec<String>,
    typical: Vec<f64>,
}

impl Explainer {
    /// An explainer for features `names` whose training medians are `typical`.
    pub fn new(names: Vec<String>, typical: Vec<f64>) -> Self {
        assert_eq!(names.len(), typical.len(), "one median per feature");
        Explainer { names, typical }
    }

    /// The reasons for `score` of `window` (`len` real rows, the current one last; scaled, so a
    /// feature at its median is 0), whose current transaction's raw features are `raw`.
    pub fn reasons(
        &self,
        model: &FastModel,
        window: &[f32],
        len: usize,
        raw: &[f64],
        score: f32,
    ) -> Vec<Reason> {
        self.reasons_of(
            model,
            &[Alerted {
                window,
                len,
                raw,
                score,
            }],
        )
        .pop()
        .unwrap_or_default()
    }

    /// The reasons of several alerts, all their variations scored in one call (large batches
    /// use the network far better than one small batch per alert).
    pub fn reasons_of(&self, model: &FastModel, alerts: &[Alerted<'_>]) -> Vec<Vec<Reason>> {
        let width = self.names.len();
        // Per alert, the features not already typical: one variation each, with that feature
        // set to typical (0 once scaled) in the current row.
        let mut copies: Vec<Vec<f32>> = Vec::new();
        let mut lens = Vec::new();
        let mut owners: Vec<(usize, usize)> = Vec::new();
        for (a, alert) in alerts.iter().enumerate() {
            let last = alert.window.len() - width;
            for j in (0..width).filter(|&j| alert.window[last + j] != 0.0) {
                let mut w = alert.window.to_vec();
                w[last + j] = 0.0;
                copies.push(w);
                lens.push(alert.len);
                owners.push((a, j));
            }
        }
        if copies.is_empty() {
            return vec![Vec::new(); alerts.len()];
        }
        let refs: Vec<&[f32]> = copies.iter().map(Vec::as_slice).collect();
        let (without, _) = model.predict(&refs, &lens);
        let mut drops: Vec<Vec<(f32, usize)>> = vec![Vec::new(); alerts.len()];
        for ((a, j), s) in owners.into_iter().zip(without) {
            if s < alerts[a].score {
                drops[a].push((s, j));
            }
        }
        drops
            .into_iter()
            .zip(alerts)
            .map(|(mut d, alert)| {
                d.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
                d.into_iter()
                    .take(TOP_REASONS)
                    .map(|(s, j)| Reason {
                        feature: self.names[j].clone(),
                        value: alert.raw[j],
                        typical: self.typical[j],
                        score_without: s,
                    })
                    .collect()
            })
            .collect()
    }
}

/// An alerted window to explain.
#[derive(Debug, Clone, Copy)]
pub struct Alerted<'a> {
    /// The window (scaled, current transaction last).
    pub window: &'a [f32],
    /// Its real rows.
    pub len: usize,
    /// The current transaction's raw features.
    pub raw: &'a [f64],
    /// Its score.
    pub score: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, init, weights};

    #[test]
    fn reasons_are_the_features_whose_typical_value_lowers_the_score_most() {
        let cfg = ModelConfig::notebook(4, 3);
        let (_, vars) = init(&cfg, 7, &candle_core::Device::Cpu).unwrap();
        let model = FastModel::new(&cfg, &weights(&vars).unwrap()).unwrap();
        let window = [0.0, 0.0, 0.0, 0.0, 0.5, -1.0, 2.0, 0.0, 3.0, -2.0, 1.5, 0.0];
        let (scores, _) = model.predict(&[&window], &[2]);
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let raw = [10.0, 20.0, 30.0, 40.0];
        let reasons = Explainer::new(names, vec![1.0, 2.0, 3.0, 4.0])
            .reasons(&model, &window, 2, &raw, scores[0]);
        assert!(reasons.len() <= TOP_REASONS);
        for r in &reasons {
            // Recompute the occluded score by hand.
            let j = ["a", "b", "c", "d"]
                .iter()
                .position(|n| *n == r.feature)
                .unwrap();
            let mut w = window;
            w[8 + j] = 0.0;
            let (s, _) = model.predict(&[&w], &[2]);
            assert_eq!(s[0], r.score_without);
            assert!(r.score_without < scores[0]);
            assert_eq!((r.value, r.typical), (raw[j], (j + 1) as f64));
            assert_ne!(r.feature, "d", "d is already typical in the current row");
        }
        assert!(
            reasons
                .windows(2)
                .all(|p| p[0].score_without <= p[1].score_without)
        );
    }
}
