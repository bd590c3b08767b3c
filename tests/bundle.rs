//! Model bundles: round trip, and refusal of corrupt or mismatched ones.

mod common;

use candle_core::Device;
use fraudstream::features::RobustScaler;
use fraudstream::model::{Bundle, BundleError, Manifest};
use fraudstream::schema::FeatureSpec;

fn saved(dir: &std::path::Path) -> (Manifest, Vec<f32>) {
    let spec = FeatureSpec::cards();
    let width = spec.width();
    let scaler = RobustScaler::identity(spec.feature_names());
    let (manifest, fast) = common::bundle::random(dir, spec, 6, scaler);
    let window = vec![0.25f32; 6 * width];
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
    let window = vec![0.25f32; 6 * FeatureSpec::cards().width()];
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
