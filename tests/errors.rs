//! A newcomer's first mistakes, and the exact line each one gets (a snapshot: a change to any
//! of these messages must change this file). Each names its cause once, and commands that take
//! `--model` work without it (the built-in model), from any directory.

mod common;

use std::path::Path;

use common::{fraudstream, simulate};

/// The last line of stderr of a failed run (exit 2), with the temporary directory as `$DIR`.
fn error_line(cmd: &mut assert_cmd::Command, dir: &Path) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default().to_string();
    line.replace(&dir.display().to_string(), "$DIR")
}

#[test]
fn common_mistakes_get_one_clear_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cards = simulate(d, "cards.csv", &["--days", "2", "--cards", "20"]);
    std::fs::write(d.join("ulb.csv"), "Time,V1,Amount,Class\n0,1.0,2.0,0\n").unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let brokers = format!("127.0.0.1:{port}");
    let cases: Vec<(&str, assert_cmd::Command, String)> = vec![
        (
            "a data file that is not there",
            {
                let mut c = fraudstream();
                c.current_dir(d)
                    .args(["evaluate", "--no-report", "--data", "missing.csv"]);
                c
            },
            "error: loading missing.csv: reading missing.csv: No such file or directory (os error 2)"
                .into(),
        ),
        (
            "a model directory that is not a bundle",
            {
                let mut c = fraudstream();
                c.current_dir(d)
                    .args(["evaluate", "--no-report", "--model", "nomodel", "--data"])
                    .arg(&cards);
                c
            },
            "error: loading model nomodel: nomodel is not a model bundle (no manifest.json): give a \
             directory `fraudstream train --out` wrote, or leave out --model for the built-in model"
                .into(),
        ),
        (
            "a file in another layout than the model's spec",
            {
                let mut c = fraudstream();
                c.current_dir(d)
                    .args(["evaluate", "--no-report", "--data", "ulb.csv"]);
                c
            },
            "error: loading ulb.csv: ulb.csv: CSV header has no column `card_id` (spec `cards` needs it)"
                .into(),
        ),
        (
            "training on a file that is not there",
            {
                let mut c = fraudstream();
                c.current_dir(d)
                    .args(["train", "--data", "missing.csv", "--out", "m"]);
                c
            },
            "error: loading missing.csv: reading missing.csv: No such file or directory (os error 2)"
                .into(),
        ),
        (
            "a broker that is not there",
            {
                let mut c = fraudstream();
                c.current_dir(d)
                    .args(["replay", "--topic", "t", "--timeout-s", "1", "--brokers", &brokers, "--data"])
                    .arg(&cards);
                c
            },
            format!(
                "error: delivery failed: Message production error: MessageTimedOut (Local: Message \
                 timed out) (after 1s: is the broker at {brokers} up? --timeout-s sets the wait)"
            ),
        ),
    ];
    for (what, mut cmd, want) in cases {
        assert_eq!(error_line(&mut cmd, d), want, "{what}");
    }
}

/// `evaluate` without `--model`, run outside the repository, uses the built-in model.
#[test]
fn evaluate_uses_the_built_in_model_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cards = simulate(dir.path(), "cards.csv", &["--days", "3", "--cards", "30"]);
    let out = fraudstream()
        .current_dir(dir.path())
        .args(["evaluate", "--no-report", "--json", "--data"])
        .arg(&cards)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["transactions"].as_u64().unwrap() > 0, "{report}");
}
