//! Robust scaling (median and inter-quartile range), as scikit-learn's RobustScaler.
//!
//! Fitted on the training period only and stored in the model bundle, so serving applies exactly
//! the transformation training saw.

use serde::{Deserialize, Serialize};

/// Per-feature centring and scaling: `(x - median) / (q75 - q25)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustScaler {
    /// Feature names, in input order: a bundle's scaler must match its spec.
    pub names: Vec<String>,
    /// Each feature's median on the fitting data.
    pub center: Vec<f64>,
    /// Each feature's inter-quartile range; 1 where it was 0 (a constant feature), as sklearn does.
    pub scale: Vec<f64>,
    /// How many rows it was fitted on.
    pub fitted_rows: u64,
}

impl RobustScaler {
    /// The identity scaler, for code paths that have no fitted one yet.
    pub fn identity(names: Vec<String>) -> Self {
        let n = names.len();
        RobustScaler {
            names,
            center: vec![0.0; n],
            scale: vec![1.0; n],
            fitted_rows: 0,
        }
    }

    /// Fits on column-major data: `columns[j]` holds feature j of every fitting row.
    /// Empty data gives the identity scaler.
    pub fn fit(names: Vec<String>, mut columns: Vec<Vec<f64>>) -> Self {
        assert_eq!(names.len(), columns.len(), "one column per feature name");
        let rows = columns.first().map_or(0, Vec::len);
        if rows == 0 {
            return Self::identity(names);
        }
        let mut center = Vec::with_capacity(columns.len());
        let mut scale = Vec::with_capacity(columns.len());
        for col in &mut columns {
            col.sort_by(f64::total_cmp);
            center.push(quantile_sorted(col, 0.5));
            let iqr = quantile_sorted(col, 0.75) - quantile_sorted(col, 0.25);
            scale.push(if iqr > 0.0 { iqr } else { 1.0 });
        }
        RobustScaler {
            names,
            center,
            scale,
            fitted_rows: rows as u64,
        }
    }

    /// Number of features.
    pub fn width(&self) -> usize {
        self.center.len()
    }

    /// Scales one raw feature vector into `out` (f32, the model's dtype).
    pub fn transform_into(&self, raw: &[f64], out: &mut [f32]) {
        for (j, (x, o)) in raw.iter().zip(out.iter_mut()).enumerate() {
            *o = ((x - self.center[j]) / self.scale[j]) as f32;
        }
    }
}

/// Linear-interpolated quantile of sorted data (numpy's default method, used by sklearn).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sklearn_robust_scaler() {
        // scikit-learn 1.9.1: from sklearn.preprocessing import RobustScaler
        //   s = RobustScaler().fit([[1,5],[2,5],[3,5],[4,5],[100,5]])
        //   s.center_ -> [3., 5.]; s.scale_ -> [2., 1.]
        //   s.transform([[7, 6]]) -> [[2., 1.]]
        let s = RobustScaler::fit(
            vec!["a".into(), "b".into()],
            vec![vec![4.0, 2.0, 100.0, 1.0, 3.0], vec![5.0; 5]],
        );
        assert_eq!(s.center, vec![3.0, 5.0]);
        assert_eq!(s.scale, vec![2.0, 1.0]);
        let mut out = [0f32; 2];
        s.transform_into(&[7.0, 6.0], &mut out);
        assert_eq!(out, [2.0, 1.0]);
    }

    #[test]
    fn interpolates_between_ranks() {
        // numpy.percentile([1,2,3,4], [25,50,75]) -> [1.75, 2.5, 3.25]
        let d = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&d, 0.25), 1.75);
        assert_eq!(quantile_sorted(&d, 0.5), 2.5);
        assert_eq!(quantile_sorted(&d, 0.75), 3.25);
    }

    #[test]
    fn serialises_round_trip() {
        let s = RobustScaler::fit(vec!["a".into()], vec![vec![1.0, 2.0, 10.0]]);
        let back: RobustScaler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
