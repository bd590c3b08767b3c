//! Raw (unscaled) feature vectors: a transaction's numeric fields plus derived features that
//! read the card's own history.

use std::f64::consts::TAU;

use crate::schema::{Derived, FeatureSpec, Transaction};

/// What a card's derived features remember between its transactions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CardHistory {
    /// Event time of the card's latest transaction so far.
    pub last_ts: Option<f64>,
}

/// Turns a transaction into its raw feature vector, in the spec's column order.
#[derive(Debug, Clone)]
pub struct Featurizer {
    spec: FeatureSpec,
    /// For each `Derived::Log1p`, the index of its field within `numeric` (resolved once).
    log1p_index: Vec<usize>,
}

impl Featurizer {
    /// Prepares a validated spec for per-record use.
    pub fn new(spec: FeatureSpec) -> Self {
        let log1p_index = spec
            .derived
            .iter()
            .filter_map(|d| match d {
                Derived::Log1p { field } => spec.numeric.iter().position(|f| f == field),
                _ => None,
            })
            .collect();
        Featurizer { spec, log1p_index }
    }

    /// The spec this featurizer follows.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// The number of features per transaction.
    pub fn width(&self) -> usize {
        self.spec.width()
    }

    /// Writes the raw features of `tx` into `out` (cleared first) and advances the card's history.
    pub fn raw(&self, history: &mut CardHistory, tx: &Transaction, out: &mut Vec<f64>) {
        out.clear();
        out.extend_from_slice(&tx.numeric);
        let mut log1p = self.log1p_index.iter();
        for d in &self.spec.derived {
            match d {
                Derived::SecondsSincePrevLog1p => {
                    // A card's first transaction has no gap; out-of-order records count as 0.
                    let gap = history.last_ts.map_or(0.0, |p| (tx.ts - p).max(0.0));
                    out.push(gap.ln_1p());
                }
                Derived::HourOfDay => {
                    let angle = TAU * tx.ts.rem_euclid(86_400.0) / 86_400.0;
                    out.push(angle.sin());
                    out.push(angle.cos());
                }
                Derived::Log1p { .. } => {
                    let i = *log1p
                        .next()
                        .expect("validated spec: log1p field is numeric");
                    out.push(tx.numeric[i].max(0.0).ln_1p());
                }
            }
        }
        history.last_ts = Some(history.last_ts.map_or(tx.ts, |p| p.max(tx.ts)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(ts: f64, amount: f64) -> Transaction {
        Transaction {
            key: "c".into(),
            ts,
            id: None,
            label: None,
            numeric: vec![amount],
            context: vec![],
        }
    }

    #[test]
    fn derived_features_follow_the_card_history() {
        let f = Featurizer::new(FeatureSpec::cards());
        let mut h = CardHistory::default();
        let mut out = Vec::new();
        // 06:00 UTC: angle is a quarter turn.
        f.raw(&mut h, &tx(6.0 * 3600.0, 99.0), &mut out);
        assert_eq!(out[0], 99.0);
        assert_eq!(out[1], 0.0, "first transaction has no gap");
        assert!((out[2] - 1.0).abs() < 1e-12 && out[3].abs() < 1e-12);
        assert!((out[4] - 100f64.ln()).abs() < 1e-12);
        f.raw(&mut h, &tx(6.0 * 3600.0 + 100.0, 0.0), &mut out);
        assert!((out[1] - 101f64.ln()).abs() < 1e-12);
        assert_eq!(out[4], 0.0);
        assert_eq!(h.last_ts, Some(21_700.0));
    }
}
