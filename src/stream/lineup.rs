//! The models scoring now: a champion (its scores alert) and an optional shadow challenger,
//! each a [`Scorer`] (network, threshold, explainer, and how it reads the card store's windows),
//! replaced whole between batches.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::explain::Explainer;
use super::records::ModelRef;
use crate::features::{RobustScaler, WindowBuilder};
use crate::model::{Bundle, FastModel};

/// One bundle ready to score the detector's windows: the network, the alert threshold, how to
/// explain alerts, and how to read the card store's windows when they were scaled for another
/// bundle.
#[derive(Debug, Clone)]
pub struct Scorer {
    /// The network.
    pub model: Arc<FastModel>,
    /// Scores at or above it alert (and are explained).
    pub threshold: f64,
    /// Reasons for alerts.
    pub explainer: Arc<Explainer>,
    /// Which bundle this is, as outputs name it.
    pub model_ref: ModelRef,
    /// Its version, shared with every decision it makes (for live quality).
    pub version: Arc<str>,
    /// How the store's windows become this model's input (None: as they are).
    pub adapt: Option<Arc<Adapt>>,
    /// The directory it was loaded from (None: the built-in model).
    pub dir: Option<PathBuf>,
}

/// How a window from the card store becomes another bundle's input: same features, a window
/// at most as long (its last rows), and each feature re-scaled from the store's scaler to the
/// bundle's (`x * mul + add`: both scalers are affine, so this is exact up to rounding).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapt {
    /// The store's window length.
    pub from_window: usize,
    /// The bundle's window length (at most `from_window`).
    pub window: usize,
    /// Per feature: multiply by.
    pub mul: Vec<f32>,
    /// Per feature: then add.
    pub add: Vec<f32>,
}

impl Adapt {
    /// How `to` reads windows built by `from` (None: they are already its input); an error
    /// says why it cannot (different features, or a longer window than the store keeps).
    pub fn between(from: &WindowBuilder, to: &WindowBuilder) -> Result<Option<Adapt>, String> {
        let (fs, ts) = (from.spec(), to.spec());
        if fs != ts {
            return Err(format!(
                "its features differ from the running model's (spec `{}` with {:?}, the running one \
                 `{}` with {:?}): the cards' windows hold other features, so it cannot score them \
                 (restart serve with it to start from its own windows)",
                ts.name,
                ts.feature_names(),
                fs.name,
                fs.feature_names()
            ));
        }
        if to.window_len() > from.window_len() {
            return Err(format!(
                "its window is {} transactions, the cards' windows keep {}: restart serve with it \
                 to keep longer windows",
                to.window_len(),
                from.window_len()
            ));
        }
        if to.window_len() == from.window_len() && to.scaler() == from.scaler() {
            return Ok(None);
        }
        let (a, b): (&RobustScaler, &RobustScaler) = (from.scaler(), to.scaler());
        let mul = (0..a.width())
            .map(|j| (a.scale[j] / b.scale[j]) as f32)
            .collect();
        let add = (0..a.width())
            .map(|j| ((a.center[j] - b.center[j]) / b.scale[j]) as f32)
            .collect();
        Ok(Some(Adapt {
            from_window: from.window_len(),
            window: to.window_len(),
            mul,
            add,
        }))
    }

    /// A store window (`len` real rows at the end) as this bundle's input, and its real rows.
    pub fn apply(&self, window: &[f32], len: usize) -> (Vec<f32>, usize) {
        let width = self.mul.len();
        let skip = (self.from_window - self.window) * width;
        let mut out = window[skip..].to_vec();
        let len = len.min(self.window);
        let first_real = (self.window - len) * width;
        for row in out[first_real..].chunks_exact_mut(width) {
            for ((x, m), a) in row.iter_mut().zip(&self.mul).zip(&self.add) {
                *x = *x * m + a;
            }
        }
        (out, len)
    }
}

impl Scorer {
    /// A scorer for `bundle` reading windows built by `store` (the card store's recipe).
    pub fn for_bundle(
        bundle: &Bundle,
        store: &WindowBuilder,
        dir: Option<PathBuf>,
    ) -> Result<Scorer, String> {
        let m = &bundle.manifest;
        let adapt = Adapt::between(store, &bundle.window_builder())?;
        Ok(Scorer {
            model: Arc::new(bundle.fast.clone()),
            threshold: m.threshold.value,
            explainer: Arc::new(Explainer::new(
                m.spec.feature_names(),
                m.scaler.center.clone(),
            )),
            version: m.version.as_str().into(),
            model_ref: ModelRef {
                name: m.name.clone(),
                version: m.version.clone(),
                sha256: m.weights_sha256.clone(),
            },
            adapt: adapt.map(Arc::new),
            dir,
        })
    }
}

/// The models scoring now: the champion (its scores alert) and an optional challenger (scored
/// on the same windows in the same batch, never alerting).
#[derive(Debug, Clone)]
pub struct Lineup {
    /// Alerts come from it.
    pub champion: Scorer,
    /// Shadow scores only.
    pub challenger: Option<Scorer>,
}

/// The current lineup, replaced whole between batches (a batch scores with the lineup it
/// started with).
#[derive(Debug)]
pub struct Models(RwLock<Arc<Lineup>>);

impl Models {
    /// Starts with `lineup`.
    pub fn new(lineup: Lineup) -> Self {
        Models(RwLock::new(Arc::new(lineup)))
    }

    /// The lineup now.
    pub fn current(&self) -> Arc<Lineup> {
        self.0.read().expect("models lock").clone()
    }

    /// Puts `lineup` in place; returns the one it replaced.
    pub fn replace(&self, lineup: Lineup) -> Arc<Lineup> {
        std::mem::replace(&mut *self.0.write().expect("models lock"), Arc::new(lineup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::WindowBuilder;
    use crate::schema::FeatureSpec;

    fn builder(center: f64, scale: f64, window: usize) -> WindowBuilder {
        let spec = FeatureSpec::cards();
        let names = spec.feature_names();
        let n = names.len();
        let scaler = RobustScaler {
            names,
            center: (0..n).map(|j| center + j as f64).collect(),
            scale: (0..n).map(|j| scale * (1.0 + j as f64)).collect(),
            fitted_rows: 1,
        };
        WindowBuilder::new(spec, scaler, window)
    }

    #[test]
    fn a_window_adapted_to_another_scaler_is_the_window_that_scaler_builds() {
        let (from, to) = (builder(1.0, 2.0, 4), builder(-3.0, 0.5, 3));
        assert_eq!(Adapt::between(&from, &from).unwrap(), None);
        let adapt = Adapt::between(&from, &to).unwrap().unwrap();
        let width = from.width();
        // Raw rows, scaled by each scaler: two real rows, left padding.
        let raw: Vec<Vec<f64>> = (0..2)
            .map(|r| (0..width).map(|j| (r * 7 + j) as f64 * 1.5 - 4.0).collect())
            .collect();
        let scaled = |b: &WindowBuilder, window: usize| {
            let mut w = vec![0f32; window * width];
            for (r, row) in raw.iter().enumerate() {
                let at = (window - 2 + r) * width;
                b.scaler().transform_into(row, &mut w[at..at + width]);
            }
            w
        };
        let (got, len) = adapt.apply(&scaled(&from, 4), 2);
        assert_eq!(len, 2);
        let want = scaled(&to, 3);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // A shorter window keeps the last rows, and at most that many real ones.
        let one = Adapt::between(&from, &builder(1.0, 2.0, 1))
            .unwrap()
            .unwrap();
        let (w1, l1) = one.apply(&scaled(&from, 4), 2);
        assert_eq!((l1, &w1[..]), (1, &scaled(&from, 4)[3 * width..]));
    }

    #[test]
    fn other_features_or_a_longer_window_are_refused_with_the_reason() {
        let from = builder(0.0, 1.0, 3);
        let err = Adapt::between(&from, &builder(0.0, 1.0, 5)).unwrap_err();
        assert!(
            err.contains("window is 5 transactions, the cards' windows keep 3"),
            "{err}"
        );
        let spec = FeatureSpec::ulb();
        let names = spec.feature_names();
        let other = WindowBuilder::new(spec, RobustScaler::identity(names), 3);
        let err = Adapt::between(&from, &other).unwrap_err();
        assert!(err.contains("its features differ"), "{err}");
    }
}
