//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod broker;
pub mod browser;
pub mod detector;
pub mod prometheus;

use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// The built `fraudstream` binary.
pub fn fraudstream() -> Command {
    Command::cargo_bin("fraudstream").expect("binary is built")
}

/// Runs `fraudstream simulate` into `dir/name` with small defaults (200 cards, 400 terminals,
/// 30 days), each overridden when `extra` names it.
pub fn simulate(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = fraudstream();
    cmd.arg("simulate");
    for (flag, value) in [("--cards", "200"), ("--terminals", "400"), ("--days", "30")] {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra).arg("--out").arg(&out);
    cmd.assert().success();
    out
}
