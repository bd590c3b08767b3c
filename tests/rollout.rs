//! Models rolled into a running detector on the test broker: a swap under load (admin
//! endpoint, watched directory, SIGHUP), a refused bundle, and a shadow challenger whose live
//! metrics are checked against its scores on the scores topic.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::broker::{brokers, unique};
use common::detector::{Serve, Topics, create_topics, get, http_get, metric, read_all};
use common::{fraudstream, free_port, simulate, wait_until};
use serde_json::Value;

const DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default");
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/baseline-window-1");

/// A copy of a bundle directory.
fn copy_bundle(from: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["manifest.json", "model.safetensors"] {
        std::fs::copy(Path::new(from).join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

fn version_of(dir: &str) -> String {
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(dir).join("manifest.json")).unwrap(),
    )
    .unwrap();
    m["version"].as_str().unwrap().to_string()
}

/// Each transaction's score when `model` alone scores `file` (file mode, from empty state, as
/// the detector on the broker starts).
fn reference_scores(model: &str, file: &Path, dir: &Path) -> HashMap<String, f64> {
    let out = dir.join(format!("ref-{}.jsonl", unique("s")));
    let alerts = dir.join(format!("alerts-{}.jsonl", unique("a")));
    fraudstream()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--model",
            model,
            "--input",
        ])
        .arg(format!("file:{}", file.display()))
        .arg("--output")
        .arg(format!("file:{}", alerts.display()))
        .arg("--scores-output")
        .arg(format!("file:{}", out.display()))
        .assert()
        .success();
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["transaction_id"].as_str().unwrap().to_string(),
                v["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Each transaction's id and inline label.
fn labels_of(file: &Path) -> HashMap<String, bool> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let id = match &v["transaction_id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (id, v["is_fraud"].as_i64().unwrap() == 1)
        })
        .collect()
}

/// A detector on fresh topics (2 input partitions) with its admin endpoints on a free port,
/// `extra` flags added; returns the topics, the detector and the admin address.
fn start_with_admin(extra: &[&str]) -> (Topics, Serve, String) {
    let topics = Topics::new();
    create_topics(&[&topics.input], 2);
    create_topics(&[&topics.alerts, &topics.scores, &topics.dlq], 1);
    let admin = format!("127.0.0.1:{}", free_port());
    let mut args = extra.to_vec();
    args.extend(["--admin-addr", admin.as_str()]);
    let serve = Serve::start_for(&topics, &unique("group"), &args);
    (topics, serve, admin)
}

/// `METHOD http://addr/path` with a JSON body (HTTP/1.0); returns (status line, body).
fn send(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn replay_at(file: &Path, topic: &str, rate: &str) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("fraudstream"))
        .args([
            "replay",
            "--brokers",
            &brokers(),
            "--topic",
            topic,
            "--rate",
            rate,
            "--data",
        ])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn scored(addr: &str) -> f64 {
    let (_, text) = get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("fraudstream_transactions_total{outcome=\"scored\"} "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn champion_version(addr: &str) -> Option<String> {
    let (_, body) = get(addr, "/models");
    let v: Value = serde_json::from_str(&body).ok()?;
    v["champion"]["version"].as_str().map(str::to_string)
}

#[test]
fn a_model_swapped_under_load_scores_every_transaction_once_and_keeps_the_cards() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "8", "--cards", "200"],
    );
    let labels = labels_of(&file);
    let n = labels.len();
    let (va, vb) = (version_of(DEFAULT), version_of(BASELINE));
    let a = copy_bundle(DEFAULT, &dir.path().join("a"));
    let b = copy_bundle(BASELINE, &dir.path().join("b"));
    // A bundle whose weights were damaged after its manifest was written.
    let bad = copy_bundle(BASELINE, &dir.path().join("bad"));
    let mut weights = std::fs::read(bad.join("model.safetensors")).unwrap();
    let last = weights.len() - 1;
    weights[last] ^= 0x55;
    std::fs::write(bad.join("model.safetensors"), weights).unwrap();
    let reference: HashMap<&str, HashMap<String, f64>> = [
        (va.as_str(), reference_scores(DEFAULT, &file, dir.path())),
        (vb.as_str(), reference_scores(BASELINE, &file, dir.path())),
    ]
    .into();

    let (topics, serve, admin) = start_with_admin(&[
        "--model",
        a.to_str().unwrap(),
        "--watch-model",
        "--watch-interval-s",
        "0.2",
    ]);
    let addr = serve.wait_ready(Duration::from_secs(60));
    let mut replay = replay_at(&file, &topics.input, "600");
    let wait_scored = |k: f64| {
        wait_until(
            Duration::from_secs(60),
            &format!("{k} of the stream scored"),
            || (scored(&addr) >= k * n as f64).then_some(()),
        )
    };
    wait_scored(0.25);
    // Under load: the champion swapped through the admin endpoint.
    let (status, body) = send(
        &admin,
        "POST",
        "/admin/model",
        &format!(r#"{{"dir": "{}"}}"#, b.display()),
    );
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(champion_version(&addr).as_deref(), Some(vb.as_str()));
    // A damaged bundle is refused with the reason; the running one keeps scoring.
    let (status, body) = send(
        &admin,
        "POST",
        "/admin/model",
        &format!(r#"{{"dir": "{}"}}"#, bad.display()),
    );
    assert!(status.contains("422"), "{status} {body}");
    assert!(body.contains("sha256"), "{body}");
    assert_eq!(champion_version(&addr).as_deref(), Some(vb.as_str()));
    wait_scored(0.75);
    // Still under load: the original model written into the watched directory (the
    // champion's, now b) is picked up by the watch.
    for f in ["model.safetensors", "manifest.json"] {
        std::fs::copy(a.join(f), b.join(f)).unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "the watch to load the new files",
        || (champion_version(&addr).as_deref() == Some(va.as_str())).then_some(()),
    );
    assert!(replay.wait().unwrap().success());
    let done = format!("fraudstream_end_to_end_latency_seconds_count {n}");
    let text = serve.wait_metrics(Duration::from_secs(90), &done, |t| t.contains(&done));
    assert!(
        metric(
            &text,
            "fraudstream_model_reloads_total{result=\"loaded\",role=\"champion\"}"
        ) >= 2.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "fraudstream_model_reloads_total{result=\"refused\",role=\"champion\"}"
        ) >= 1.0
    );
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fraudstream_model_info{"))
        .collect();
    assert!(
        info.len() == 1 && info[0].contains(&format!("version=\"{va}\"")),
        "model_info follows the swap: {info:?}"
    );
    // SIGHUP reloads the champion's directory.
    let loaded = metric(
        &text,
        "fraudstream_model_reloads_total{result=\"loaded\",role=\"champion\"}",
    );
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGHUP) };
    let want = format!(
        "fraudstream_model_reloads_total{{result=\"loaded\",role=\"champion\"}} {}",
        loaded + 1.0
    );
    serve.wait_metrics(Duration::from_secs(30), &want, |t| t.contains(&want));
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");

    let records = read_all(&topics.scores);
    // Every transaction scored exactly once, by one of the two models.
    let ids: Vec<&str> = records
        .iter()
        .map(|(_, _, v)| v["transaction_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n, "{log}");
    assert_eq!(ids.iter().copied().collect::<HashSet<_>>().len(), n);
    // Per input partition, in offset order: the first model, then the second, then the first
    // again, each switch once (a batch scores with one model), and every score the one that
    // model gives alone: the cards' windows survived both swaps.
    let mut by_partition: HashMap<i64, Vec<(i64, String)>> = HashMap::new();
    for (_, _, v) in &records {
        assert_eq!(v["role"], "champion");
        let version = v["model_version"].as_str().unwrap().to_string();
        let id = v["transaction_id"].as_str().unwrap();
        let want = reference[version.as_str()][id];
        let got = v["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{id} by {version}: {got} vs {want} alone"
        );
        by_partition
            .entry(v["source"]["partition"].as_i64().unwrap())
            .or_default()
            .push((v["source"]["offset"].as_i64().unwrap(), version));
    }
    let mut seen = HashSet::new();
    for (p, mut rows) in by_partition {
        rows.sort();
        let mut runs: Vec<&str> = Vec::new();
        for (_, v) in &rows {
            if runs.last() != Some(&v.as_str()) {
                runs.push(v);
            }
        }
        assert!(
            runs.len() <= 3 && runs.first() == Some(&va.as_str()),
            "partition {p}: {runs:?}"
        );
        seen.extend(runs.into_iter().map(str::to_string));
    }
    assert!(
        seen.contains(&vb),
        "the second model scored some transactions"
    );
}

#[test]
fn a_shadow_challenger_is_scored_and_judged_like_the_champion_then_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let file = simulate(
        dir.path(),
        "cards.jsonl",
        &["--days", "10", "--cards", "300"],
    );
    let labels = labels_of(&file);
    let n = labels.len();
    let (va, vb) = (version_of(DEFAULT), version_of(BASELINE));
    let challenger = copy_bundle(BASELINE, &dir.path().join("challenger"));
    let alone = reference_scores(BASELINE, &file, dir.path());
    let (topics, serve, admin) = start_with_admin(&["--challenger", challenger.to_str().unwrap()]);
    let addr = serve.wait_ready(Duration::from_secs(60));
    let mut replay = replay_at(&file, &topics.input, "0");
    assert!(replay.wait().unwrap().success());
    let done = format!("fraudstream_end_to_end_latency_seconds_count {n}");
    let text = serve.wait_metrics(Duration::from_secs(90), &done, |t| t.contains(&done));
    let records = read_all(&topics.scores);
    let alerts = read_all(&topics.alerts);
    // Both models scored every transaction once; only the champion alerts.
    let mut confusion: HashMap<(String, String), [u64; 4]> = HashMap::new();
    let mut per_role: HashMap<String, HashSet<String>> = HashMap::new();
    for (_, _, v) in &records {
        let role = v["role"].as_str().unwrap().to_string();
        let version = v["model_version"].as_str().unwrap().to_string();
        let id = v["transaction_id"].as_str().unwrap().to_string();
        if role == "challenger" {
            assert_eq!(version, vb);
            let (got, want) = (v["score"].as_f64().unwrap(), alone[&id]);
            assert!(
                (got - want).abs() < 1e-4,
                "{id}: {got} in the shadow vs {want} alone"
            );
        } else {
            assert_eq!(version, va);
        }
        let alerted = v["alert"].as_bool().unwrap();
        let fraud = labels[&id];
        let c = confusion.entry((role.clone(), version)).or_default();
        c[usize::from(alerted) * 2 + usize::from(fraud)] += 1;
        assert!(per_role.entry(role).or_default().insert(id), "scored twice");
    }
    assert_eq!(per_role["champion"].len(), n);
    assert_eq!(per_role["challenger"].len(), n);
    let champion_alerts = records
        .iter()
        .filter(|(_, _, v)| v["role"] == "champion" && v["alert"] == true)
        .count();
    assert_eq!(alerts.len(), champion_alerts);
    assert!(
        alerts
            .iter()
            .all(|(_, _, a)| a["model"]["version"] == va.as_str())
    );
    // The live metrics equal what the scores topic and the labels say.
    for ((role, version), c) in &confusion {
        let name = if role == "champion" {
            "fraudstream_label_outcomes_total"
        } else {
            "fraudstream_challenger_label_outcomes_total"
        };
        for (k, outcome) in [
            "true_negative",
            "false_negative",
            "false_positive",
            "true_positive",
        ]
        .iter()
        .enumerate()
        {
            let line = format!("{name}{{model_version=\"{version}\",outcome=\"{outcome}\"}}");
            let got = if c[k] == 0 && !text.contains(&line) {
                0.0
            } else {
                metric(&text, &line)
            };
            assert_eq!(got, c[k] as f64, "{line}");
        }
    }
    let ch = confusion[&("challenger".to_string(), vb.clone())];
    let recall = ch[3] as f64 / (ch[3] + ch[1]) as f64;
    let line = format!(
        "fraudstream_model_recall{{model_version=\"{vb}\",role=\"challenger\",window=\"1h\"}}"
    );
    wait_until(Duration::from_secs(10), "the per-model gauges", || {
        let (_, t) = get(&addr, "/metrics");
        (t.contains(&line) && (metric(&t, &line) - recall).abs() < 1e-9).then_some(())
    });
    // /models says the same, and which model did better.
    let (_, body) = http_get(&serve.log(), "/models");
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["challenger"]["version"], vb.as_str());
    assert_eq!(m["windows"]["1h"]["challenger"]["true_positives"], ch[3]);
    assert!(
        ["champion", "challenger", "tie", "undecided"]
            .contains(&m["windows"]["1d"]["better"].as_str().unwrap()),
        "{m}"
    );
    // The dashboard's champion/challenger panel, in a real browser.
    let profile = tempfile::tempdir().unwrap();
    let (dom, console) =
        common::browser::dump_dom(&format!("http://{addr}/"), profile.path(), 5000);
    assert!(
        console.iter().all(|l| !l.contains("Uncaught")),
        "{console:?}"
    );
    let panel = dom
        .split("id=\"models-table\"")
        .nth(1)
        .expect("the models panel");
    assert!(
        panel.contains("data-role=\"challenger\"") && panel.contains(&vb),
        "{panel}"
    );
    // Promotion: the challenger becomes the champion.
    let (status, body) = send(&admin, "POST", "/admin/promote", "");
    assert!(status.contains("200"), "{status} {body}");
    let after: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(after["models"]["champion"]["version"], vb.as_str());
    assert!(after["models"]["challenger"].is_null());
    let (status, _) = send(&admin, "POST", "/admin/promote", "");
    assert!(status.contains("422"), "nothing left to promote");
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
}
