//! `serve --config FILE`: flags > FRAUDSTREAM_* environment > file > defaults, secrets
//! redacted in the start-up line, unknown keys refused by name.

mod common;

use common::{fraudstream, simulate};

/// The settings string of serve's start-up configuration event (JSON logs).
fn settings_line(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("configuration"))
        })
        .and_then(|e| e["settings"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no configuration event in {stderr}"))
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults_and_secrets_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let input = simulate(dir.path(), "cards.jsonl", &["--days", "1", "--cards", "10"]);
    let alerts = dir.path().join("from-file.jsonl");
    let config = dir.path().join("fraudstream.toml");
    std::fs::write(
        &config,
        format!(
            "max_batch = 7\nmax-wait-ms = 3\nqueue = 100\nhttp = \"127.0.0.1:0\"\noutput = \"file:{}\"\n\
             [kafka]\n\"sasl.password\" = \"hunter2\"\n\"socket.timeout.ms\" = 5000\n",
            alerts.display()
        ),
    )
    .unwrap();
    let out = fraudstream()
        .env("FRAUDSTREAM_LOG_FORMAT", "json")
        .env("FRAUDSTREAM_MAX_BATCH", "9")
        .env("FRAUDSTREAM_MAX_WAIT_MS", "4")
        .args(["serve", "--max-wait-ms", "5", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(format!("file:{}", input.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let line = settings_line(&stderr);
    for want in [
        "max-wait-ms=5 (flag)",
        "max-batch=9 (env)",
        "queue=100 (file)",
        "max-cards=1000000 (default)",
        "kafka=sasl.password=*** (file)",
        "kafka=socket.timeout.ms=5000 (file)",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
    assert!(!stderr.contains("hunter2"), "a secret was logged: {stderr}");
    // The file's output took effect: the alerts file exists.
    assert!(alerts.exists(), "{stderr}");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fraudstream.toml");
    std::fs::write(&config, "max_batch = 7\nmax_bacth = 8\n").unwrap();
    let out = fraudstream()
        .args(["serve", "--input", "-", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("unknown key `max_bacth`"), "{stderr}");
}
