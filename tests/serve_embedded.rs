//! `fraudstream serve` with the embedded file/stdin transport.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::{fraudstream, simulate};
use serde_json::{Value, json};

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSON id (string or number) as text.
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn serve(input: &Path, dir: &Path, extra: &[&str]) -> (Vec<Value>, Vec<Value>, Vec<Value>, String) {
    let (alerts, scores, dead) = (
        dir.join("alerts.jsonl"),
        dir.join("scores.jsonl"),
        dir.join("dead.jsonl"),
    );
    let out = fraudstream()
        .arg("serve")
        .arg("--input")
        .arg(format!("file:{}", input.display()))
        .arg("--output")
        .arg(format!("file:{}", alerts.display()))
        .arg("--scores-output")
        .arg(format!("file:{}", scores.display()))
        .arg("--dead-letter-output")
        .arg(format!("file:{}", dead.display()))
        .args(extra)
        .output()
        .unwrap();
    common::assert_success(&out);
    (
        read_jsonl(&alerts),
        read_jsonl(&scores),
        read_jsonl(&dead),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn every_record_is_scored_once_and_alerts_have_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "20", "--cards", "300"],
    );
    let n = std::fs::read_to_string(&input).unwrap().lines().count();
    let (alerts, scores, dead, stderr) = serve(&input, dir.path(), &["--max-batch", "64"]);
    assert!(dead.is_empty());
    assert_eq!(scores.len(), n);
    let ids: HashSet<&str> = scores
        .iter()
        .map(|s| s["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n, "each transaction scored exactly once");
    // Both directions: every score at or above the threshold alerted, and nothing below it did.
    let threshold = alerts
        .first()
        .and_then(|a| a["threshold"].as_f64())
        .expect("an alert carries the threshold");
    for s in &scores {
        let at_or_above = s["score"].as_f64().unwrap() >= threshold;
        assert_eq!(s["alert"] == true, at_or_above, "{s}");
    }
    let alerted: HashSet<&str> = scores
        .iter()
        .filter(|s| s["alert"] == true)
        .map(|s| s["transaction_id"].as_str().unwrap())
        .collect();
    let alert_ids: HashSet<&str> = alerts
        .iter()
        .map(|a| a["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerted, alert_ids,
        "one alert per alerting score, and only those"
    );
    // Each card's transaction ids in input order: `age` positions back from an alert's own.
    let mut by_card: HashMap<String, Vec<String>> = HashMap::new();
    for line in std::fs::read_to_string(&input).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        by_card
            .entry(text(&v["card_id"]))
            .or_default()
            .push(text(&v["transaction_id"]));
    }
    assert!(
        !alerts.is_empty(),
        "20 days of simulated fraud raise some alerts"
    );
    let keys: Vec<&str> = alerts[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "card_id",
        "detected_at",
        "event_time",
        "model",
        "reasons",
        "score",
        "source",
        "threshold",
        "top_attention",
        "transaction_id",
        "window_length",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    for a in &alerts {
        let score = a["score"].as_f64().unwrap();
        assert!(score >= a["threshold"].as_f64().unwrap());
        let len = a["window_length"].as_u64().unwrap();
        assert!((1..=30).contains(&len));
        let top = a["top_attention"].as_array().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        let total: f64 = top.iter().map(|t| t["weight"].as_f64().unwrap()).sum();
        assert!(total <= 1.0 + 1e-5);
        let history = &by_card[&text(&a["card_id"])];
        let own = history
            .iter()
            .position(|id| id == a["transaction_id"].as_str().unwrap())
            .unwrap();
        for t in top {
            let age = t["age"].as_u64().unwrap() as usize;
            assert!(age < len as usize, "attention only on real transactions");
            assert_eq!(
                t["transaction_id"].as_str().unwrap(),
                history[own - age],
                "age {age} names the card's transaction {age} positions back"
            );
        }
        // Reasons: features of this transaction whose typical value lowers the score, most first.
        let reasons = a["reasons"].as_array().unwrap();
        assert!(reasons.len() <= 3);
        let mut last = f64::NEG_INFINITY;
        for r in reasons {
            let without = r["score_without"].as_f64().unwrap();
            assert!(without < score && without >= last, "{a}");
            last = without;
            assert!(r["feature"].is_string() && r["value"].is_number() && r["typical"].is_number());
        }
        assert_eq!(a["model"]["name"], "attention-lstm");
        assert_eq!(a["model"]["sha256"].as_str().unwrap().len(), 64);
        assert!(a["source"]["offset"].as_i64().unwrap() >= 1);
    }
    assert!(
        alerts
            .iter()
            .all(|a| !a["reasons"].as_array().unwrap().is_empty()),
        "an alert's score comes from somewhere: some feature at its typical value lowers it"
    );
    assert!(
        stderr.contains(&format!("scored {n} transactions")),
        "{stderr}"
    );
}

#[test]
fn bad_records_are_dead_lettered_and_later_records_still_scored() {
    let dir = tempfile::tempdir().unwrap();
    let good = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "3", "--cards", "100"],
    );
    let lines: Vec<String> = std::fs::read_to_string(&good)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut bytes = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if i == 2 {
            bytes.extend_from_slice(b"{\"transaction_id\": 1\n");
            bytes.extend_from_slice(b"{\"transaction_id\":\"x\",\"ts\":1522540900,\"card_id\":\"7\",\"amount\":\"NaN\"}\n");
            bytes.extend_from_slice(b"\xff\xfe\x00binary\n");
            bytes.extend_from_slice(b"[1,2,3]\n");
        }
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    let input = dir.path().join("mixed.jsonl");
    std::fs::write(&input, bytes).unwrap();
    let (_, scores, dead, stderr) = serve(&input, dir.path(), &[]);
    assert_eq!(scores.len(), lines.len(), "every good record is scored");
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        [
            "invalid_json",
            "non_finite",
            "invalid_json",
            "not_an_object"
        ]
    );
    assert_eq!(dead[1]["field"], "amount");
    assert!(
        dead[1]["error"]
            .as_str()
            .unwrap()
            .contains("field `amount`")
    );
    assert_eq!(dead[2]["payload_encoding"], "base64");
    assert_eq!(dead[0]["offset"], 3, "line numbers locate the record");
    assert!(stderr.contains("4 dead-lettered"), "{stderr}");
}

#[test]
fn redelivered_transactions_are_not_scored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let good = simulate(dir.path(), "cards.jsonl", &["--days", "2", "--cards", "50"]);
    let text = std::fs::read_to_string(&good).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The first ten records delivered again right after themselves.
    let mut again: Vec<&str> = lines[..10].to_vec();
    again.extend(&lines[..10]);
    again.extend(&lines[10..]);
    let input = dir.path().join("redelivered.jsonl");
    std::fs::write(&input, again.join("\n")).unwrap();
    let (_, scores, _, stderr) = serve(&input, dir.path(), &[]);
    assert_eq!(scores.len(), lines.len());
    assert!(stderr.contains("10 duplicates"), "{stderr}");
}

/// `evaluate --scores-out`'s file as transaction id -> score.
fn offline_scores(path: &std::path::Path) -> HashMap<String, f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_string(), c[3].parse().unwrap())
        })
        .collect()
}

#[test]
fn serving_scores_equal_offline_evaluation_scores() {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(dir.path(), "cards.csv", &["--days", "10", "--cards", "200"]);
    let (_, scores, _, _) = serve(&input, dir.path(), &["--max-batch", "7"]);
    let offline = dir.path().join("offline.csv");
    fraudstream()
        .args([
            "evaluate",
            "--model",
            "models/default",
            "--no-report",
            // Serving a file learns no label (inline labels count for live quality only), so
            // offline no label may become known either: the same context, the same scores.
            // (`warming_from_history_...` below checks serving with labels.)
            "--label-delay",
            "100000d",
            "--data",
        ])
        .arg(&input)
        .arg("--scores-out")
        .arg(&offline)
        .assert()
        .success();
    let expected = offline_scores(&offline);
    assert_eq!(expected.len(), scores.len());
    for s in &scores {
        let id = s["transaction_id"].as_str().unwrap();
        let online = s["score"].as_f64().unwrap();
        assert!(
            (online - expected[id]).abs() < 2e-6,
            "{id}: {online} vs {}",
            expected[id]
        );
    }
}

/// `serve --precision P` serves scores within 2e-2 of f32 offline evaluation, and not all
/// identical (the flag reaches the scoring path).
fn reduced_precision_serving_close_to_f32_evaluation(precision: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(dir.path(), "cards.csv", &["--days", "6", "--cards", "150"]);
    if !precision_available(precision) {
        return refused_without_the_cpu_feature(&input, precision);
    }
    let (_, scores, _, _) = serve(&input, dir.path(), &["--precision", precision]);
    let offline = dir.path().join("offline.csv");
    fraudstream()
        .args([
            "evaluate",
            "--no-report",
            "--label-delay",
            "100000d",
            "--data",
        ])
        .arg(&input)
        .arg("--scores-out")
        .arg(&offline)
        .assert()
        .success();
    let expected = offline_scores(&offline);
    assert_eq!(expected.len(), scores.len());
    let mut differ = 0;
    for s in &scores {
        let id = s["transaction_id"].as_str().unwrap();
        let d = (s["score"].as_f64().unwrap() - expected[id]).abs();
        assert!(d < 2e-2, "{id}: {precision} differs by {d}");
        differ += usize::from(d > 2e-6);
    }
    assert!(differ > 0, "no score changed: {precision} did not run");
}

/// Whether this CPU runs `precision` (bf16 needs AVX512_BF16, int8 AVX-512 BW).
fn precision_available(precision: &str) -> bool {
    match precision {
        "bf16" => fraudstream::model::bf16::available(),
        "int8" => fraudstream::model::int8::available(),
        _ => true,
    }
}

/// On a CPU without the instructions (a Skylake Xeon has no AVX512_BF16), serving and evaluation
/// refuse the precision with an error that names the missing feature, and score nothing.
fn refused_without_the_cpu_feature(input: &Path, precision: &str) {
    let feature = if precision == "bf16" {
        "AVX512_BF16"
    } else {
        "AVX-512 BW"
    };
    for args in [
        vec!["serve", "--input", "-", "--precision", precision],
        vec![
            "evaluate",
            "--no-report",
            "--precision",
            precision,
            "--data",
        ],
    ] {
        let mut cmd = fraudstream();
        cmd.args(&args);
        if args[0] == "evaluate" {
            cmd.arg(input);
        }
        let out = cmd.write_stdin("").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "--precision {precision} needs a CPU with {feature}"
            )),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?} scored: {:?}", out.stdout);
    }
}

/// Scores on a machine with AVX512_BF16; elsewhere the refusal.
#[test]
fn bf16_serving_scores_close_to_f32_evaluation() {
    reduced_precision_serving_close_to_f32_evaluation("bf16");
}

/// Scores on a machine with AVX-512 BW; elsewhere the refusal.
#[test]
fn int8_serving_scores_close_to_f32_evaluation() {
    reduced_precision_serving_close_to_f32_evaluation("int8");
}

/// `evaluate --precision int8 --against-precision f32` scores the file both ways and reports
/// what int8 changes: small score differences (not none: int8 ran), the fraction of alert
/// decisions kept, and both average precisions, consistent with two plain evaluations.
#[test]
fn evaluate_reports_what_a_precision_changes_against_another() {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(dir.path(), "cards.csv", &["--days", "6", "--cards", "150"]);
    if !precision_available("int8") {
        return refused_without_the_cpu_feature(&input, "int8");
    }
    let eval = |extra: &[&str]| -> serde_json::Value {
        let out = fraudstream()
            .args(["evaluate", "--json", "--no-report", "--data"])
            .arg(&input)
            .args(extra)
            .output()
            .unwrap();
        common::assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let both = eval(&["--precision", "int8", "--against-precision", "f32"]);
    let f32_only = eval(&[]);
    let c = &both["against_precision"];
    assert_eq!(c["against"], "f32");
    let max = c["max_score_difference"].as_f64().unwrap();
    assert!(max > 0.0 && max < 2e-2, "max difference {max}");
    let (p999, mean) = (
        c["p999_score_difference"].as_f64().unwrap(),
        c["mean_score_difference"].as_f64().unwrap(),
    );
    assert!(mean <= p999 && p999 <= max, "{mean} {p999} {max}");
    let kept = c["decisions_kept"].as_f64().unwrap();
    let n = both["transactions"].as_f64().unwrap();
    let changed = c["decisions_changed"].as_f64().unwrap();
    assert!((kept - (1.0 - changed / n)).abs() < 1e-12);
    assert!(kept >= 0.999, "decisions kept {kept}");
    // The f32 side is a plain f32 evaluation; int8's AP is the headline one.
    let ap32 = f32_only["average_precision"].as_f64().unwrap();
    assert_eq!(c["against_average_precision"].as_f64().unwrap(), ap32);
    let ap8 = both["average_precision"].as_f64().unwrap();
    let diff = c["average_precision_difference"].as_f64().unwrap();
    assert!(
        (diff - (ap8 - ap32)).abs() < 1e-12 && diff.abs() < 0.02,
        "{diff}"
    );
}

/// `--log-format json` (here through its environment variable): every stderr line is one JSON
/// object; a dead letter's event carries topic, partition, offset, reason and field at the top
/// level; and the record's payload is not logged.
#[test]
fn json_logs_parse_and_carry_the_fields_operators_filter_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"card_id\":\"c1\",\"transaction_id\":\"t1\",\"ts\":1535980281,\"amount\":\"x\",\
         \"terminal_id\":\"SECRET-PAYLOAD-MARKER\"}\n",
    )
    .unwrap();
    let out = fraudstream()
        .env("FRAUDSTREAM_LOG_FORMAT", "json")
        .args(["serve", "--http", "127.0.0.1:0", "--output", "-", "--input"])
        .arg(format!("file:{}", input.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("SECRET-PAYLOAD-MARKER"), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let dead = events
        .iter()
        .find(|e| e["reason"] == "not_a_number")
        .unwrap_or_else(|| panic!("no dead-letter event: {stderr}"));
    assert_eq!(dead["level"], "WARN");
    assert_eq!(dead["field"], "amount");
    assert_eq!(dead["card"], "c1");
    assert_eq!(dead["partition"], 0);
    assert_eq!(dead["offset"], 1);
    assert!(dead["topic"].as_str().unwrap().ends_with("bad.jsonl"));
    let summary = events.last().unwrap();
    assert_eq!(summary["dead_lettered"], 1, "{summary}");
}

#[test]
fn stdin_to_stdout_works_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "12", "--cards", "300"],
    );
    let out = fraudstream()
        .args(["serve", "--input", "-", "--output", "-"])
        .pipe_stdin(&input)
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success());
    let alerts: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(alerts.iter().all(|a| a["source"]["topic"] == "stdin"));
}

#[test]
fn oversized_messages_are_dead_lettered_unparsed() {
    let dir = tempfile::tempdir().unwrap();
    let good = simulate(dir.path(), "cards.jsonl", &["--days", "1", "--cards", "50"]);
    let mut text = std::fs::read_to_string(&good).unwrap();
    let huge = format!(
        "{{\"transaction_id\":\"big\",\"note\":\"{}\"}}\n",
        "x".repeat(5_000)
    );
    text.insert_str(0, &huge);
    let input = dir.path().join("big.jsonl");
    std::fs::write(&input, &text).unwrap();
    let (_, scores, dead, _) = serve(
        &input,
        dir.path(),
        &[
            "--max-message-bytes",
            "1000",
            "--max-dead-letter-payload-bytes",
            "700",
        ],
    );
    assert_eq!(scores.len(), text.lines().count() - 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "oversized");
    assert_eq!(
        dead[0]["payload"].as_str().unwrap().len(),
        700,
        "the payload is cut to the dead-letter limit"
    );
    assert_eq!(
        dead[0]["payload_bytes"],
        huge.len() - 1,
        "the whole line's size"
    );
    assert_eq!(dead[0]["payload_truncated"], true);
}

/// `serve --warm-from HISTORY` continues from the state a detector that had seen the history
/// would hold: its scores of the later transactions equal offline evaluation of the whole file
/// (history included, labels known a week later), context features and all.
#[test]
fn warming_from_history_scores_like_offline_evaluation_of_everything() {
    use fraudstream::features::{DEFAULT_LABEL_DELAY, fit_scaler};
    use fraudstream::schema::{FeatureSpec, Format, load};
    let dir = tempfile::tempdir().unwrap();
    let all = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "45", "--cards", "120"],
    );
    let spec = FeatureSpec::cards();
    let mut txs = load(&all.to_string_lossy(), Format::Jsonl, &spec, 0, |_| {})
        .unwrap()
        .transactions;
    txs.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    // A model with the label-rate features (random weights: the scores must agree, whatever
    // they are).
    let model = dir.path().join("model");
    let scaler = fit_scaler(&spec, &txs, DEFAULT_LABEL_DELAY, |_| true);
    common::bundle::random(&model, spec, 30, scaler);
    // History: the first 38 days; live: the rest.
    let cut = txs[0].ts + 38.0 * 86_400.0;
    let lines: Vec<String> = std::fs::read_to_string(&all)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let ts_of = |l: &str| {
        serde_json::from_str::<Value>(l).unwrap()["ts"]
            .as_f64()
            .unwrap()
    };
    let (history, live): (Vec<&String>, Vec<&String>) = lines.iter().partition(|l| ts_of(l) < cut);
    let join = |v: &[&String]| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    let (hist_file, live_file) = (
        dir.path().join("history.jsonl"),
        dir.path().join("live.jsonl"),
    );
    std::fs::write(&hist_file, join(&history)).unwrap();
    std::fs::write(&live_file, join(&live)).unwrap();
    let model_arg = model.to_string_lossy().into_owned();
    let (_, scores, _, stderr) = serve(
        &live_file,
        dir.path(),
        &[
            "--model",
            &model_arg,
            "--warm-from",
            hist_file.to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("state warmed from history"), "{stderr}");
    let offline = dir.path().join("offline.csv");
    fraudstream()
        .args(["evaluate", "--no-report", "--model", &model_arg, "--data"])
        .arg(&all)
        .args(["--from", &cut.to_string(), "--scores-out"])
        .arg(&offline)
        .assert()
        .success();
    let expected = offline_scores(&offline);
    assert_eq!(scores.len(), live.len());
    assert_eq!(expected.len(), live.len());
    for s in &scores {
        let id = s["transaction_id"].as_str().unwrap();
        let online = s["score"].as_f64().unwrap();
        assert!(
            (online - expected[id]).abs() < 2e-6,
            "{id}: {online} vs {}",
            expected[id]
        );
    }
    // Without the warm-up the context is missing and scores differ.
    let cold = dir.path().join("cold");
    std::fs::create_dir_all(&cold).unwrap();
    let (_, cold_scores, _, _) = serve(&live_file, &cold, &["--model", &model_arg]);
    let differ = cold_scores
        .iter()
        .filter(|s| {
            let id = s["transaction_id"].as_str().unwrap();
            (s["score"].as_f64().unwrap() - expected[id]).abs() > 1e-4
        })
        .count();
    assert!(
        differ > live.len() / 2,
        "only {differ} of {} differ cold",
        live.len()
    );
}

/// `serve --input -` with a writer that never closes stdin still stops on SIGTERM: it scores
/// what it read, prints its summary and exits 0.
#[test]
fn stdin_mode_stops_on_sigterm_while_stdin_stays_open() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(dir.path(), "cards.jsonl", &["--days", "1", "--cards", "50"]);
    let lines = std::fs::read_to_string(&input).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fraudstream"));
    cmd.args(["serve", "--input", "-", "--http", "127.0.0.1:0"])
        .args(["--scores-output", "-"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    common::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(lines.as_bytes()).unwrap();
    stdin.flush().unwrap();
    // Every line scored (a score record each on stdout) while stdin stays open.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..lines.lines().count() {
        let mut record = String::new();
        stdout.read_line(&mut record).unwrap();
        assert!(record.contains("\"score\""), "{record}");
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_until(
        std::time::Duration::from_secs(15),
        "serve to exit on SIGTERM with stdin open",
        || child.try_wait().unwrap(),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    drop(stdin);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("scored "), "{stderr}");
}

/// Records that would poison a card (a time in the year 3000 or before 1970, or years ahead of
/// or a month behind the stream's own time, a 300-byte card id, an amount of 1e308) or the scores
/// topic (an id already used by another card) are dead-lettered with their reason and field, and
/// every other transaction scores exactly as it does without them.
#[test]
fn poisoned_records_are_dead_lettered_and_change_no_other_score() {
    let dir = tempfile::tempdir().unwrap();
    let clean = simulate(dir.path(), "cards.jsonl", &["--days", "2", "--cards", "40"]);
    let lines: Vec<String> = std::fs::read_to_string(&clean)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    let poison = |id: &str, field: &str, value: Value| {
        let mut v = first.clone();
        v["transaction_id"] = json!(id);
        v[field] = value;
        v.to_string()
    };
    let mut poisoned = lines.clone();
    poisoned.insert(5, poison("p-future", "ts", json!(32_503_680_000_i64)));
    poisoned.insert(9, poison("p-past", "ts", json!(-5)));
    poisoned.insert(12, poison("p-long", "card_id", json!("c".repeat(300))));
    poisoned.insert(14, poison("p-huge", "amount", json!(1e308)));
    // The first transaction's id again, on another card: dead-lettered, not scored twice.
    let mut stolen = first.clone();
    stolen["card_id"] = json!("another-card");
    poisoned.insert(15, stolen.to_string());
    // Inside 1970..2200 but not this (2018) stream's time: three years ahead (years before the
    // wall clock) and a month behind its watermark.
    let ts = |line: &str| {
        serde_json::from_str::<Value>(line).unwrap()["ts"]
            .as_i64()
            .unwrap()
    };
    let stream_now = ts(&lines[40]);
    poisoned.insert(
        45,
        poison("p-ahead", "ts", json!(stream_now + 3 * 365 * 86_400)),
    );
    poisoned.insert(
        50,
        poison("p-behind", "ts", json!(stream_now - 30 * 86_400)),
    );
    let path = dir.path().join("poisoned.jsonl");
    std::fs::write(&path, poisoned.join("\n")).unwrap();
    let (clean_dir, poisoned_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&clean_dir).unwrap();
    std::fs::create_dir_all(&poisoned_dir).unwrap();
    let (_, clean_scores, _, _) = serve(&clean, &clean_dir, &[]);
    let (_, scores, dead, _) = serve(&path, &poisoned_dir, &[]);
    let reasons: Vec<(String, String)> = dead
        .iter()
        .map(|d| (text(&d["reason"]), text(&d["field"])))
        .collect();
    assert_eq!(
        reasons,
        [
            ("ts_out_of_range".to_string(), "ts".to_string()),
            ("ts_out_of_range".into(), "ts".into()),
            ("too_long".into(), "card_id".into()),
            ("out_of_range".into(), "amount".into()),
            ("duplicate_id".into(), "transaction_id".into()),
            ("ts_out_of_range".into(), "ts".into()),
            ("ts_out_of_range".into(), "ts".into()),
        ]
    );
    assert_eq!(scores.len(), clean_scores.len(), "one score per id");
    let by_id = |records: &[Value]| -> HashMap<String, String> {
        records
            .iter()
            .map(|r| (text(&r["transaction_id"]), r["score"].to_string()))
            .collect()
    };
    assert_eq!(by_id(&scores), by_id(&clean_scores));
}
