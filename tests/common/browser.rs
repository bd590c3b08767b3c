//! Headless Chromium (Debian package `chromium`, installed by .ci/test): the DOM of a page after
//! its scripts ran, what it printed to the console, and screenshots.

use std::path::Path;
use std::process::Command;

fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        // Console messages go to stderr as `INFO:CONSOLE` lines.
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Loads `url`, lets its scripts run for `budget_ms` of virtual time, and returns the DOM and
/// every console message (errors, uncaught exceptions, failed loads, logs).
pub fn dump_dom(url: &str, profile: &Path, budget_ms: u32) -> (String, Vec<String>) {
    let out = chromium(profile)
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium is installed by .ci/test (Debian package chromium)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    assert!(out.status.success(), "chromium failed:\n{stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// Saves a PNG of `url` after `budget_ms` of virtual time.
pub fn screenshot(url: &str, profile: &Path, budget_ms: u32, png: &Path) {
    let out = chromium(profile)
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--window-size=1400,1400")
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .expect("chromium is installed by .ci/test");
    assert!(
        out.status.success() && png.exists(),
        "no screenshot:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
