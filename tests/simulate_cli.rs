//! `fraudstream simulate` as a user runs it.

mod common;

use std::collections::HashMap;

use common::{fraudstream, simulate};
use fraudstream::schema::{FeatureSpec, Format, load};

#[test]
fn csv_has_the_documented_columns_and_is_time_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let path = simulate(dir.path(), "cards.csv", &[]);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "transaction_id,ts,card_id,terminal_id,amount,is_fraud,scenario"
    );
    let mut last_ts = i64::MIN;
    let mut n = 0;
    for (i, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 7, "{line}");
        assert_eq!(cells[0].parse::<usize>().unwrap(), i);
        let ts: i64 = cells[1].parse().unwrap();
        assert!(ts >= last_ts);
        last_ts = ts;
        assert!(
            cells[4].split('.').nth(1).unwrap().len() == 2,
            "cents: {line}"
        );
        assert_eq!(cells[5] == "1", cells[6] != "0");
        n += 1;
    }
    // 200 cards at ~2 transactions a day (a few have no terminal) over 30 days.
    assert!((6_000..=16_000).contains(&n), "{n} rows");
}

#[test]
fn same_seed_same_bytes_and_jsonl_carries_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let a = simulate(dir.path(), "a.csv", &["--seed", "9"]);
    let b = simulate(dir.path(), "b.csv", &["--seed", "9"]);
    let c = simulate(dir.path(), "c.csv", &["--seed", "10"]);
    let j = simulate(dir.path(), "a.jsonl", &["--seed", "9"]);
    let bytes = |p| std::fs::read(p).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));

    let spec = FeatureSpec::cards();
    let from_csv = load(a.to_str().unwrap(), Format::Csv, &spec, 0, |_| {}).unwrap();
    let from_jsonl = load(j.to_str().unwrap(), Format::Jsonl, &spec, 0, |_| {}).unwrap();
    assert_eq!(from_csv.bad_rows + from_jsonl.bad_rows, 0);
    assert_eq!(from_csv.transactions, from_jsonl.transactions);
}

#[test]
fn all_three_fraud_scenarios_appear_and_stdout_works() {
    let out = fraudstream()
        .args([
            "simulate",
            "--cards",
            "500",
            "--terminals",
            "1000",
            "--days",
            "40",
        ])
        .args(["--out", "-", "--format", "jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut by_scenario: HashMap<u64, usize> = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        *by_scenario
            .entry(v["scenario"].as_u64().unwrap())
            .or_default() += 1;
    }
    for s in 1..=3 {
        assert!(
            by_scenario.get(&s).copied().unwrap_or(0) > 0,
            "{by_scenario:?}"
        );
    }
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(
        summary.contains("simulated") && summary.contains("frauds"),
        "{summary}"
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    fraudstream()
        .args(["simulate", "--cards", "0", "--out", "-"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("--cards must be positive"));
    fraudstream()
        .args(["simulate", "--start", "April", "--out", "-"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("--start"));
}
