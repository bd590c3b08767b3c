//! Model bundles: round trip, and refusal of corrupt or mismatched ones.

use candle_core::Device;
use fraudstream::features::RobustScaler;
use fraudstream::model::{
    Bundle, BundleError, MANIFEST_FORMAT, Manifest, ModelConfig, ThresholdInfo, init, weights,
};
use fraudstream::model::{Choice, ThresholdRule};
use fraudstream::schema::FeatureSpec;

fn saved(dir: &std::path::Path) -> (Manifest, Vec<f32>) {
    let spec = FeatureSpec::cards();
    let cfg = ModelConfig::notebook(spec.width(), 6);
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
        scaler: RobustScaler::identity(spec.feature_names()),
        spec,
        window: 6,
        threshold: ThresholdInfo {
            value: 0.7,
            rule: ThresholdRule::MaxF1,
            on_validation: choice,
        },
        training: serde_json::json!({}),
        weights_sha256: String::new(),
    };
    let w = weights(&varmap).unwrap();
    let manifest = Bundle::save(dir, &w, manifest).unwrap();
    let window = vec![0.25f32; 6 * 5];
    let fast = fraudstream::model::FastModel::new(&cfg, &w).unwrap();
    let (scores, _) = fast.predict(&[&window], &[6]);
    (manifest, scores)
}

#[test]
fn round_trip_scores_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (manifest, scores) = saved(dir.path());
    assert_eq!(manifest.weights_sha256.len(), 64);
    assert!(manifest.version.ends_with(&manifest.weights_sha256[..8]));
    let bundle = Bundle::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(bundle.manifest, manifest);
    let window = vec![0.25f32; 6 * 5];
    assert_eq!(bundle.fast.predict(&[&window], &[6]).0, scores);
    assert_eq!(bundle.threshold(), 0.7);
}

#[test]
fn tampered_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = Bundle::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, BundleError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("does not match"), "{err}");
}

fn edit_manifest(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn mismatched_spec_scaler_or_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    edit_manifest(dir.path(), |v| {
        v["spec"]["numeric"] = serde_json::json!(["amount", "fee"])
    });
    let err = Bundle::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inconsistent bundle") && err.contains("scaler"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    edit_manifest(dir.path(), |v| {
        v["architecture"]["lstm1"] = serde_json::json!(64)
    });
    let err = Bundle::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weights stored"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    std::fs::write(dir.path().join("manifest.json"), "{not json").unwrap();
    let err = Bundle::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, BundleError::Manifest { .. }), "{err}");
}
