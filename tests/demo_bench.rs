//! `fraudstream demo` and `fraudstream bench` run end to end on the embedded broker.

mod common;

use common::fraudstream;
use predicates::str::contains;

/// The three tests run one at a time: each runs a whole pipeline flat out or near it, and the
/// first one's p99 must measure the detector, not two other pipelines on the same two cores (on
/// a 2 GHz Skylake host the test build then scored 56 tx/s of the 60 offered and the p99 was a
/// 2.3 s backlog).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed holding it leaves it poisoned; the others still run.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn demo_runs_the_whole_pipeline_and_exits_on_its_own() {
    let _alone = alone();
    let out = fraudstream()
        .args([
            "demo",
            "--days",
            "2",
            "--cards",
            "800",
            // A rate the unoptimised test build sustains beside the other tests (it scores a few
            // hundred a second, under 100 on a 2 GHz Skylake host): the latency is then the
            // detector's, not a backlog's.
            "--rate",
            "60",
            "--http",
            "127.0.0.1:0",
        ])
        .timeout(std::time::Duration::from_secs(240))
        .output()
        .unwrap();
    common::assert_success(&out);
    let summary = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("embedded broker"), "{stderr}");
    // The default model's context comes from a simulated history loaded before the live days.
    assert!(stderr.contains("warmed up on "), "{stderr}");
    assert!(stderr.contains("dashboard: http://127.0.0.1:"), "{stderr}");
    // "scored N transactions" equals what the demo said it replayed.
    let replayed = replayed(&stderr);
    assert!(
        summary.contains(&format!("scored {replayed} transactions")),
        "{summary}"
    );
    // The summary counts the cards held at the end (closing the source forgets them after).
    let cards: u64 = summary
        .split(" cards (")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("card count: {summary}"));
    assert!(cards > 100 && cards <= 800, "{summary}");
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
    // Streamed at a steady rate while the detector consumes, the latency is the detector's: p99
    // under 5 s, where it was 18 s when the whole week was produced first. (This unoptimised
    // build on a 2 GHz Skylake host: p99 171-267 ms run alone, 2.3 and 2.6 s in two CI runs,
    // where a stall of a few seconds set it, p50 108-161 ms; the release build's half-second
    // stalls are an open problem in the README's benchmarks.)
    assert!(
        stderr.contains("tx/s while the detector consumes"),
        "{stderr}"
    );
    assert!(
        summary.contains("streamed at 60 tx/s: the detector's own latency"),
        "{summary}"
    );
    let p99: f64 = summary
        .split(" p99 ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("p99: {summary}"));
    assert!(p99 < 5000.0, "p99 {p99} ms: {summary}");
}

/// How many transactions the demo said it streams into the topic.
fn replayed(stderr: &str) -> u64 {
    stderr
        .split("streaming ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("replay line")
}

/// `--linger-s` keeps the detector and its dashboard up after the stream ends: it shows what
/// the run did, with live precision and recall from the simulator's inline labels, and settles
/// as an idle detector does (still ready, lag 0, no traffic).
#[test]
fn demo_serves_the_dashboard_with_live_quality() {
    let _alone = alone();
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args([
            "demo",
            "--days",
            "2",
            "--cards",
            "600",
            "--http",
            "127.0.0.1:0",
        ])
        .args(["--linger-s", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut addr = None;
    for line in BufReader::new(child.stderr.take().unwrap()).split(b'\n') {
        let line = String::from_utf8_lossy(&line.unwrap()).into_owned();
        log.push_str(&line);
        if let Some(rest) = line.split("with its dashboard at http://").nth(1) {
            addr = rest.split('/').next().map(str::to_string);
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no linger line:\n{log}"));
    // Once the stream has ended the detector stays ready and its lag settles to 0 (the
    // statistics come every 5 s) while the traffic drops to nothing.
    let settled = common::wait_until(
        std::time::Duration::from_secs(30),
        "the dashboard to settle: ready, lag 0, no traffic",
        || {
            let (_, body) = common::detector::get(&addr, "/api/dashboard");
            let d: serde_json::Value = serde_json::from_str(&body).ok()?;
            let last = d["series"].as_array()?.last()?.clone();
            (d["ready"] == true && last["lag"] == 0.0 && last["tx_per_s"] == 0.0).then_some(d)
        },
    );
    assert!(common::detector::get(&addr, "/readyz").0.contains("200"));
    assert_eq!(
        settled["models"]["champion"]["name"], "attention-lstm",
        "{settled}"
    );
    let (status, body) = common::detector::get(&addr, "/api/dashboard");
    let (page_status, page) = common::detector::get(&addr, "/");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        status.contains("200") && page_status.contains("200"),
        "{status}"
    );
    assert!(page.contains("<title>fraudstream</title>"));
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        d["totals"]["scored"].as_u64(),
        Some(replayed(&log)),
        "{body}"
    );
    assert_eq!(d["model"]["name"], "attention-lstm");
    assert!(d["totals"]["alerts"].as_u64().unwrap() > 0, "{body}");
    let p = d["live"]["1h"]["precision"]
        .as_f64()
        .expect("live precision");
    assert!((0.0..=1.0).contains(&p));
    assert!(!d["series"].as_array().unwrap().is_empty());
    assert!(!d["alerts"].as_array().unwrap().is_empty());
}

#[test]
fn bench_prints_the_documented_json() {
    let _alone = alone();
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
            "--replay-rate",
            "200",
            "--replay-seconds",
            "1",
            "--changelog",
            "--restore-cards",
            "3000",
            "--load-levels",
            "0.5",
        ])
        // The test build on a slow host (a 2 GHz Skylake VM) took over 120 s once.
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    common::assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // GFLOP/s = windows/s x the architecture's FLOP count (18.8 million for this one).
    let flops = v["inference_flop_per_window"].as_f64().unwrap();
    assert!((18.7e6..18.9e6).contains(&flops), "{v}");
    for batch in ["1", "32", "256"] {
        let rate = v["inference_windows_per_s"][batch].as_f64().unwrap();
        let gflops = v["inference_gflop_per_s"][batch].as_f64().unwrap();
        assert!(rate > 0.0, "{v}");
        assert!(
            (gflops - rate * flops / 1e9).abs() <= 0.05 + 1e-3 * gflops,
            "{v}"
        );
    }
    assert!(
        ["avx512", "avx2+fma", "portable"].contains(&v["inference_isa"].as_str().unwrap()),
        "{v}"
    );
    // A GEMM runs the same FMAs as the FMA-only peak plus loads and stores: below it (with a
    // margin for a shared machine's noise).
    let (gemm, peak) = (
        v["fp32_gemm_gflop_per_s"].as_f64().unwrap(),
        v["fp32_peak_gflop_per_s"].as_f64().unwrap(),
    );
    assert!(gemm > 0.0 && gemm <= 1.1 * peak, "{v}");
    // Training throughput of both engines at train's default batch size.
    assert_eq!(v["training_batch"].as_u64(), Some(128), "{v}");
    for engine in ["kernels", "candle"] {
        assert!(
            v["training_windows_per_s"][engine].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
    assert!(v["end_to_end_tx_per_s"].as_f64().unwrap() > 0.0);
    let (p50, p99) = (
        v["latency_ms"]["p50"].as_f64().unwrap(),
        v["latency_ms"]["p99"].as_f64().unwrap(),
    );
    assert!(p50 <= p99 && p99 <= v["latency_ms"]["p99_9"].as_f64().unwrap());
    // Latency at half the flat-out rate: offered at half of what the flat-out run reached.
    let flat = v["flat_out_tx_per_s"].as_f64().unwrap();
    let level = &v["latency_at_load"][0];
    assert_eq!(level["fraction"].as_f64(), Some(0.5), "{v}");
    assert!(
        (level["offered_tx_per_s"].as_f64().unwrap() - flat / 2.0).abs() <= 1.0,
        "{v}"
    );
    let (p50, p99, p999) = (
        level["p50_ms"].as_f64().unwrap(),
        level["p99_ms"].as_f64().unwrap(),
        level["p99_9_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{v}");
    let per_card = v["memory_per_card_bytes"].as_f64().unwrap();
    assert!(per_card > 0.0);
    // The worst card the input checks let through (256-byte ids, every hourly bucket of 30 days
    // full) is bounded, and larger than an ordinary one.
    let worst = v["memory_per_card_worst_bytes"].as_f64().unwrap();
    assert!(
        worst > per_card && worst < 64_000.0,
        "{worst} vs {per_card}"
    );
    // The default model's label tables: a terminal with a label a day for 37 days.
    let per_terminal = v["memory_per_terminal_bytes"].as_f64().unwrap();
    assert!((100.0..100_000.0).contains(&per_terminal), "{per_terminal}");
    // A remembered score holds an id, a flag and a time: tens to a few hundred bytes.
    let per_score = v["memory_per_remembered_score_bytes"].as_f64().unwrap();
    assert!((16.0..1000.0).contains(&per_score), "{per_score}");
    // Changelog: every scored transaction's card change is written or coalesced into a later
    // one (3,000 tx/s of a simulated day: some cards change twice within 100 ms); a restore
    // brings every card back.
    let c = &v["changelog"];
    let (records, coalesced) = (
        c["records"].as_u64().unwrap(),
        c["coalesced"].as_u64().unwrap(),
    );
    assert!(records > 0, "{v}");
    assert_eq!(Some(records + coalesced), v["transactions"].as_u64(), "{v}");
    let (per_tx, per_record) = (
        c["bytes_per_transaction"].as_f64().unwrap(),
        c["bytes_per_record"].as_f64().unwrap(),
    );
    assert!(per_tx > 50.0 && per_tx <= per_record, "{v}");
    assert_eq!(v["restore"]["cards"].as_u64(), Some(3000), "{v}");
    assert!(v["restore"]["cards_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // A full window of the default model's 20 features is 2.4 KB of rows alone.
    assert!(
        v["restore"]["bytes_per_card"].as_f64().unwrap() > 2_400.0,
        "{v}"
    );
    // The pacer's check: 200 messages offered at 200/s. (The README's figure is the 10-second
    // run; this only checks the numbers are there and plausible, not the machine's speed.)
    let pacing = &v["replay_messages_per_s"];
    assert_eq!(pacing["offered"].as_f64(), Some(200.0), "{v}");
    assert_eq!(pacing["messages"].as_u64(), Some(200), "{v}");
    let achieved = pacing["achieved"].as_f64().unwrap();
    assert!(
        achieved > 0.0 && achieved <= 202.0,
        "faster than offered: {achieved}"
    );
    fraudstream()
        .args(["bench", "--help"])
        .assert()
        .success()
        .stdout(contains("--rate"));
}
