//! `fraudstream validate` and `fraudstream spec` as a user runs them.

mod common;

use common::{fraudstream, simulate};
use predicates::str::contains;

#[test]
fn a_clean_file_validates() {
    let dir = tempfile::tempdir().unwrap();
    let path = simulate(dir.path(), "cards.csv", &[]);
    fraudstream()
        .args(["validate", "--spec", "cards", "--data"])
        .arg(&path)
        .assert()
        .success()
        .stdout(contains("bad rows:     0"));
}

#[test]
fn bad_rows_are_reported_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        concat!(
            "{\"transaction_id\":1,\"ts\":1,\"card_id\":1,\"amount\":5}\n",
            "{\"transaction_id\":2,\"ts\":2,\"card_id\":1,\"amount\":\"five\"}\n",
            "{\"transaction_id\":3,\"ts\":\"soon\",\"card_id\":1,\"amount\":5}\n",
            "{oops\n",
        ),
    )
    .unwrap();
    fraudstream()
        .args(["validate", "--data"])
        .arg(&path)
        .assert()
        .code(1)
        .stdout(contains("valid rows:   1"))
        .stdout(contains("bad rows:     3"))
        .stdout(contains("line 2: field `amount`: not a number: \"five\""))
        .stdout(contains(
            "line 3: field `ts`: unparseable timestamp: \"soon\"",
        ))
        .stdout(contains("line 4: invalid JSON"));
}

#[test]
fn spec_prints_toml_that_loads_back() {
    let out = fraudstream().args(["spec", "cards"]).output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .replace("name = \"cards\"", "name = \"mine\"");
    std::fs::write(&path, text).unwrap();
    fraudstream()
        .args(["spec"])
        .arg(&path)
        .assert()
        .success()
        .stdout(contains("name = \"mine\""));
    fraudstream()
        .args(["spec", "/no/such/spec.toml"])
        .assert()
        .code(2)
        .stderr(contains("reading spec /no/such/spec.toml"));
}
