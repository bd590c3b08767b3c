//! Model bundles made for tests: random weights for a spec, saved and loaded like real ones.

use candle_core::Device;
use fraudstream::features::RobustScaler;
use fraudstream::model::{
    Bundle, Choice, FastModel, MANIFEST_FORMAT, Manifest, ModelConfig, ThresholdInfo,
    ThresholdRule, init, weights,
};
use fraudstream::schema::FeatureSpec;

/// Saves a bundle of seeded random weights for `spec` into `dir` (threshold 0.7); returns its
/// manifest as saved and the network built from the weights in memory (before saving).
pub fn random(
    dir: &std::path::Path,
    spec: FeatureSpec,
    window: usize,
    scaler: RobustScaler,
) -> (Manifest, FastModel) {
    let cfg = ModelConfig::notebook(spec.width(), window);
    let (_, varmap) = init(&cfg, 7, &Device::Cpu).unwrap();
    let choice = Choice {
        threshold: 0.7,
        precision: 0.5,
        recall: 0.5,
        f1: 0.5,
        alert_rate: 0.01,
        rule_met: true,
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "test".into(),
        version: String::new(),
        created_at: "2026-01-01T00:00:00Z".into(),
        architecture: cfg.clone(),
        parameters: cfg.parameter_count(),
        scaler,
        spec,
        window,
        threshold: ThresholdInfo {
            value: 0.7,
            rule: ThresholdRule::MaxF1,
            on_validation: choice,
        },
        training: serde_json::json!({}),
        weights_sha256: String::new(),
    };
    let w = weights(&varmap).unwrap();
    let fast = FastModel::new(&cfg, &w).unwrap();
    (Bundle::save(dir, &w, manifest).unwrap(), fast)
}
