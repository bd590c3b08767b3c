//! `fraudstream demo` and `fraudstream bench` run end to end on the embedded broker.

mod common;

use common::fraudstream;
use predicates::str::contains;

#[test]
fn demo_runs_the_whole_pipeline_and_exits_on_its_own() {
    let out = fraudstream()
        .args(["demo", "--days", "3", "--cards", "800"])
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("embedded broker"), "{stderr}");
    // "scored N transactions" equals what the demo said it replayed.
    let replayed: u64 = stderr
        .split("replayed ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("replay line");
    assert!(
        summary.contains(&format!("scored {replayed} transactions")),
        "{summary}"
    );
    for part in [
        "tx/s",
        "latency p50",
        "p99",
        "alerts",
        "precision",
        "recall",
        "F1",
    ] {
        assert!(summary.contains(part), "{part} missing: {summary}");
    }
}

#[test]
fn bench_prints_the_documented_json() {
    let out = fraudstream()
        .args([
            "bench",
            "--json",
            "--seconds",
            "0.2",
            "--days",
            "1",
            "--rate",
            "3000",
        ])
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for batch in ["1", "32", "256"] {
        assert!(
            v["inference_windows_per_s"][batch].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
    assert!(v["end_to_end_tx_per_s"].as_f64().unwrap() > 0.0);
    let (p50, p99) = (
        v["latency_ms"]["p50"].as_f64().unwrap(),
        v["latency_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(p50 <= p99);
    assert!(v["memory_per_card_bytes"].as_f64().unwrap() > 0.0);
    fraudstream()
        .args(["bench", "--help"])
        .assert()
        .success()
        .stdout(contains("--rate"));
}
