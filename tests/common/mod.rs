//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod broker;
pub mod browser;
pub mod bundle;
pub mod detector;
pub mod prometheus;
pub mod proxy;

use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// The longest any one command of a test may run: a hang fails the test instead of stalling CI.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The built `fraudstream` binary, killed if it runs past [`COMMAND_TIMEOUT`].
pub fn fraudstream() -> Command {
    let mut cmd = Command::cargo_bin("fraudstream").expect("binary is built");
    cmd.timeout(COMMAND_TIMEOUT);
    cmd
}

/// Polls `check` every 100 ms until it returns `Some`, and returns that; fails the test with
/// `what` (and the last state `check` described through `state`) after `timeout`. The one way
/// tests wait for something: no fixed sleeps.
pub fn wait_until<T>(
    timeout: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let began = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            began.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Fails the test with the command's stderr unless it exited successfully.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free local TCP port (for a service a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// Makes a spawned service die with the thread that spawns it (Linux `PR_SET_PDEATHSIG`), so a
/// failed or killed test run leaves no broker or Prometheus behind.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and only sets the child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// A message as a transport would hand it to the detector: partition 0 of topic `t`, no
/// transport timestamp.
pub fn envelope(payload: Vec<u8>, offset: i64) -> fraudstream::stream::Envelope {
    fraudstream::stream::Envelope {
        payload,
        topic: "t".into(),
        partition: 0,
        offset,
        timestamp_ms: None,
        generation: 0,
    }
}

/// A child process killed when the test lets go of it (a failed test leaves nothing running).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
