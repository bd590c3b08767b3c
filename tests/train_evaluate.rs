//! `fraudstream train` then `fraudstream evaluate`, end to end on small data, both layouts.

mod common;

use std::fmt::Write as _;
use std::path::Path;

use common::fraudstream;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Simulator-layout data where fraud is exactly scenario 1 (amount > 220): 100 cards, 80
/// transactions each, ~4% of amounts above 220.
fn amount_fraud_csv(path: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rows = Vec::new();
    for card in 0..100u32 {
        let mut ts = 1_522_540_800i64 + rng.random_range(0..3_600);
        for _ in 0..80 {
            ts += rng.random_range(3_600..86_400);
            let amount: f64 = if rng.random_bool(0.04) {
                rng.random_range(225.0..900.0)
            } else {
                rng.random_range(1.0..200.0)
            };
            rows.push((ts, card, amount));
        }
    }
    rows.sort_by_key(|r| (r.0, r.1));
    let mut text = String::from("transaction_id,ts,card_id,terminal_id,amount,is_fraud,scenario\n");
    for (i, (ts, card, amount)) in rows.iter().enumerate() {
        let fraud = u8::from(*amount > 220.0);
        writeln!(text, "{i},{ts},{card},0,{amount:.2},{fraud},{fraud}").unwrap();
    }
    std::fs::write(path, text).unwrap();
}

fn evaluate_json(model: &Path, data: &Path, report: &Path, extra: &[&str]) -> serde_json::Value {
    let out = fraudstream()
        .args(["evaluate", "--json", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--report")
        .arg(report)
        .args(extra)
        .output()
        .unwrap();
    common::assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn learns_the_amount_scenario_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("amounts.csv");
    amount_fraud_csv(&data);
    let model = dir.path().join("model");
    fraudstream()
        .args([
            "train",
            "--spec",
            "cards",
            "--window",
            "5",
            "--epochs",
            "4",
            "--batch-size",
            "64",
        ])
        .args(["--neg-per-pos", "4", "--seed", "3", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .assert()
        .success();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["threshold"]["rule"]["rule"], "max_f1");
    assert!(manifest["training"]["history"].as_array().unwrap().len() >= 2);
    let test_from = manifest["training"]["periods"]["split"]["test_from"]
        .as_f64()
        .unwrap();
    // The scaler saw exactly the training period's rows (not validation, test or history).
    let split = &manifest["training"]["periods"]["split"];
    let (train_from, valid_from) = (
        split["train_from"].as_f64().unwrap(),
        split["valid_from"].as_f64().unwrap(),
    );
    let times: Vec<f64> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap())
        .collect();
    let in_train = times
        .iter()
        .filter(|&&t| t >= train_from && t < valid_from)
        .count();
    assert!(in_train > 0 && in_train < times.len(), "{in_train}");
    assert_eq!(
        manifest["scaler"]["fitted_rows"].as_u64().unwrap() as usize,
        in_train
    );

    let report = dir.path().join("report");
    let scores = dir.path().join("scores.csv");
    let v = evaluate_json(
        &model,
        &data,
        &report,
        &[
            "--from",
            &test_from.to_string(),
            "--scores-out",
            scores.to_str().unwrap(),
            "--group-by",
            "scenario",
        ],
    );
    // Recall per value of the file's scenario column: all frauds are scenario 1 here.
    let by = &v["recall_by"]["scenario"];
    assert_eq!(by["1"]["frauds"], v["frauds"]);
    assert_eq!(by["0"]["frauds"], 0);
    let alerted = by["1"]["alerted"].as_f64().unwrap();
    let recall = v["recall"].as_f64().unwrap();
    assert!((alerted / v["frauds"].as_f64().unwrap() - recall).abs() < 1e-9);
    for key in [
        "average_precision",
        "roc_auc",
        "precision",
        "recall",
        "f1",
        "threshold",
        "card_precision_at_100",
        "transactions",
        "frauds",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    let prevalence = v["frauds"].as_f64().unwrap() / v["transactions"].as_f64().unwrap();
    let ap = v["average_precision"].as_f64().unwrap();
    assert!(
        ap > 0.6 && ap > 10.0 * prevalence,
        "AP {ap} at prevalence {prevalence}"
    );
    assert!(v["roc_auc"].as_f64().unwrap() > 0.9, "{v}");
    // Exactly the rows from --from on are counted (earlier ones only feed windows).
    let n = v["transactions"].as_u64().unwrap();
    let expected = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap() >= test_from)
        .count();
    assert_eq!(n as usize, expected);
    let csv = std::fs::read_to_string(&scores).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "transaction_id,card_id,ts,score,label"
    );
    assert_eq!(csv.lines().count() as u64, n + 1);
    for png in [
        "class_distribution.png",
        "pr_curve.png",
        "roc_curve.png",
        "confusion_matrix.png",
        "score_histograms.png",
        "training_curves.png",
        "card_precision_daily.png",
    ] {
        let bytes = std::fs::read(report.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(html.contains("Classification report") && html.contains("pr_curve.png"));

    // Text mode prints the notebook's classification report and confusion matrix.
    fraudstream()
        .args(["evaluate", "--no-report", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .assert()
        .success()
        .stdout(predicates::str::contains("classification report"))
        .stdout(predicates::str::contains("confusion matrix"))
        .stdout(predicates::str::contains("card precision@100"));

    // Two models on the same transactions: the trained one (A) against the built-in one (B).
    let from = test_from.to_string();
    let compared = dir.path().join("compared");
    let both = fraudstream()
        .args(["evaluate", "--json", "--bootstrap", "300", "--model"])
        .arg(&model)
        .args(["--model", "builtin", "--data"])
        .arg(&data)
        .args(["--from", &from, "--report"])
        .arg(&compared)
        .output()
        .unwrap();
    common::assert_success(&both);
    let c: serde_json::Value = serde_json::from_slice(&both.stdout).unwrap();
    let builtin = evaluate_json(Path::new("builtin"), &data, &compared, &["--from", &from]);
    for (side, alone) in [("a", &v), ("b", &builtin)] {
        for key in [
            "average_precision",
            "precision",
            "recall",
            "transactions",
            "frauds",
        ] {
            assert_eq!(c[side][key], alone[key], "{side} {key}: {c}");
        }
    }
    let d = &c["ap_difference"];
    let f = |k: &str| d[k].as_f64().unwrap();
    let expected = builtin["average_precision"].as_f64().unwrap() - ap;
    assert!((f("difference") - expected).abs() < 1e-12, "{d}");
    assert!(
        f("low") <= f("difference") && f("difference") <= f("high"),
        "{d}"
    );
    assert_eq!(d["resamples"], 300);
    let verdict = c["verdict"].as_str().unwrap();
    let expected_verdict = if f("low") > 0.0 {
        "B is better"
    } else if f("high") < 0.0 {
        "A is better"
    } else {
        "no significant difference"
    };
    assert!(verdict.starts_with(expected_verdict), "{verdict} for {d}");
    assert_eq!(
        &std::fs::read(compared.join("pr_compare.png")).unwrap()[1..4],
        b"PNG"
    );
    let html = std::fs::read_to_string(compared.join("compare.html")).unwrap();
    assert!(
        html.contains(verdict) && html.contains("pr_compare.png"),
        "{html}"
    );
    // A model against itself: no difference, and the paired interval says so exactly.
    let same = fraudstream()
        .args(["evaluate", "--no-report", "--bootstrap", "100", "--model"])
        .arg(&model)
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    common::assert_success(&same);
    let text = String::from_utf8_lossy(&same.stdout);
    assert!(
        text.contains("AP(B) - AP(A):   +0.0000, 95% interval [+0.0000, +0.0000]")
            && text.contains("verdict:         no significant difference"),
        "{text}"
    );
    // A retrain that reuses the first model's scaler has its exact window recipe.
    let again = dir.path().join("again");
    fraudstream()
        .args(["train", "--spec", "cards", "--window", "5", "--epochs", "1"])
        .args([
            "--batch-size",
            "64",
            "--neg-per-pos",
            "4",
            "--seed",
            "4",
            "--data",
        ])
        .arg(&data)
        .arg("--scaler-from")
        .arg(&model)
        .arg("--out")
        .arg(&again)
        .assert()
        .success();
    let read = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap()
    };
    assert_eq!(read(&again)["scaler"], read(&model)["scaler"]);
    assert_ne!(
        read(&again)["weights_sha256"],
        read(&model)["weights_sha256"]
    );
    // Three models are refused by name.
    fraudstream()
        .args([
            "evaluate", "--model", "a", "--model", "b", "--model", "c", "--data",
        ])
        .arg(&data)
        .assert()
        .failure()
        .stderr(predicates::str::contains("compares at most two models"));
}

/// A ULB-shaped CSV (Time, V1..V28, Amount, Class): fraud shows in V1 and V2.
fn ulb_csv(path: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut text = String::from("Time");
    (1..=28).for_each(|i| write!(text, ",V{i}").unwrap());
    text.push_str(",Amount,Class\n");
    for r in 0..2_500 {
        let fraud = rng.random_bool(0.04);
        write!(text, "{}", r * 30).unwrap();
        for i in 1..=28 {
            let shift = if fraud && i <= 2 { 3.0 } else { 0.0 };
            write!(text, ",{:.4}", rng.random_range(-1.0..1.0) + shift).unwrap();
        }
        writeln!(
            text,
            ",{:.2},{}",
            rng.random_range(0.0..300.0),
            u8::from(fraud)
        )
        .unwrap();
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn ulb_layout_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("creditcard.csv");
    ulb_csv(&data);
    let model = dir.path().join("ulb-model");
    fraudstream()
        .args([
            "train",
            "--spec",
            "ulb",
            "--window",
            "3",
            "--epochs",
            "3",
            "--batch-size",
            "64",
        ])
        .args(["--min-precision", "0.5", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&model)
        .assert()
        .success();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["architecture"]["input"], 30);
    assert_eq!(
        manifest["parameters"], 312_833,
        "the notebook's count for 30 features"
    );
    assert_eq!(manifest["threshold"]["rule"]["rule"], "min_precision");
    let v = evaluate_json(&model, &data, &dir.path().join("r"), &["--no-report"]);
    assert_eq!(v["transactions"], 2_500);
    assert!(v["average_precision"].as_f64().unwrap() > 0.5, "{v}");
}

#[test]
fn train_refuses_a_validation_period_without_fraud() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("amounts.csv");
    amount_fraud_csv(&data);
    // A validation period of one second holds no fraud.
    let text = std::fs::read_to_string(&data).unwrap();
    let last_ts: f64 = text
        .lines()
        .last()
        .unwrap()
        .split(',')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    fraudstream()
        .args(["train", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("m"))
        .args([
            "--valid-from",
            &(last_ts - 2.0).to_string(),
            "--test-from",
            &(last_ts - 1.0).to_string(),
        ])
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "validation period holds no fraud",
        ));
}

#[test]
fn layer_sizes_are_configurable_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("amounts.csv");
    amount_fraud_csv(&data);
    let out = dir.path().join("small");
    fraudstream()
        .args([
            "train",
            "--window",
            "4",
            "--epochs",
            "1",
            "--lstm1",
            "16",
            "--attention",
            "8",
        ])
        .args(["--lstm2", "8", "--dense", "4", "--dropout", "0", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["architecture"]["lstm1"], 16);
    // Trained by the hand-written passes (the default engine), and the bundle says so.
    assert_eq!(m["training"]["settings"]["engine"], "kernels");
    // The `cards` spec's 20 features: 2·4·16·(20+16+1) + 3·(32·8+8) + 4·8·(40+8+1) + (8·4+4) + (4+1)
    assert_eq!(fraudstream::schema::FeatureSpec::cards().width(), 20);
    assert_eq!(m["parameters"], 4_736 + 792 + 1_568 + 36 + 5);
    fraudstream()
        .args(["evaluate", "--no-report", "--json", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .assert()
        .success();
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("amounts.csv");
    amount_fraud_csv(&data);
    let sha = |name: &str, seed: &str, engine: &str| {
        let out = dir.path().join(name);
        fraudstream()
            .args([
                "train",
                "--window",
                "3",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--seed",
                seed,
                "--engine",
                engine,
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .assert()
            .success();
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["training"]["settings"]["engine"], engine);
        m["weights_sha256"].as_str().unwrap().to_string()
    };
    assert_eq!(sha("a", "1", "kernels"), sha("b", "1", "kernels"));
    assert_ne!(sha("a", "1", "kernels"), sha("c", "2", "kernels"));
    // Candle's autograd, kept as `--engine candle`, is deterministic too.
    assert_eq!(sha("d", "1", "candle"), sha("e", "1", "candle"));
}
