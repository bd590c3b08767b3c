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
        let width = self.names.len();
        let last = window.len() - width;
        // One copy per feature that is not already typical, with that feature set to typical.
        let changed: Vec<usize> = (0..width).filter(|&j| window[last + j] != 0.0).collect();
        let copies: Vec<Vec<f32>> = changed
            .iter()
            .map(|&j| {
                let mut w = window.to_vec();
                w[last + j] = 0.0;
                w
            })
            .collect();
        let refs: Vec<&[f32]> = copies.iter().map(Vec::as_slice).collect();
        let (without, _) = model.predict(&refs, &vec![len; refs.len()]);
        let mut reasons: Vec<(f32, usize)> = changed
            .iter()
            .zip(without)
            .filter(|(_, s)| *s < score)
            .map(|(&j, s)| (s, j))
            .collect();
        reasons.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        reasons
            .into_iter()
            .take(TOP_REASONS)
            .map(|(s, j)| Reason {
                feature: self.names[j].clone(),
                value: raw[j],
                typical: self.typical[j],
                score_without: s,
            })
            .collect()
    }
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
