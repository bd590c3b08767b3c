//! `benches/onnx_reference.py`, the ONNX Runtime yardstick the README's benchmark ratios are
//! measured against, builds the network `fraudstream bench` scores and reports a rate at each
//! batch size. Runs with the pinned onnx and onnxruntime that `.ci/test` installs into
//! `.tools/onnx` (a missing install fails the test, it never skips).

use std::path::Path;
use std::process::Command;

use fraudstream::model::ModelConfig;

#[test]
fn the_onnx_reference_scores_the_notebook_network_at_each_batch_size() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let packages = root.join(".tools/onnx");
    assert!(
        packages.join("onnxruntime").is_dir(),
        "{} has no onnxruntime: run .ci/test, which installs it",
        packages.display()
    );
    let out = Command::new("python3")
        .arg(root.join("benches/onnx_reference.py"))
        .args(["--threads", "1", "--seconds", "0.2", "--batches", "1,7"])
        .env("PYTHONPATH", &packages)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same architecture as bench's: the notebook's network for 30 features, window 30.
    assert_eq!(
        report["parameters"],
        ModelConfig::notebook(30, 30).parameter_count(),
        "{report}"
    );
    assert_eq!(report["onnxruntime"], "1.32.0", "{report}");
    assert_eq!(report["threads"], 1, "{report}");
    let rates = report["windows_per_second"].as_object().unwrap();
    assert_eq!(rates.keys().collect::<Vec<_>>(), ["1", "7"], "{report}");
    for (batch, rate) in rates {
        let rate = rate.as_f64().unwrap();
        assert!(rate > 0.0, "batch {batch}: {rate}");
    }
}
