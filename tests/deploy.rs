//! The deployment files are valid: `docker-compose config` parses the compose file (installed
//! by .ci/test from Debian's docker-compose package; no Docker engine is needed for this).

use std::process::Command;

#[test]
fn compose_file_validates_and_runs_the_detector() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(root)
        .output()
        .expect("docker-compose is installed by .ci/test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = String::from_utf8(out.stdout).unwrap();
    for service in ["kafka:", "create-topics:", "detector:", "replay:"] {
        assert!(config.contains(service), "{service} missing");
    }
    assert!(config.contains("dockerfile: deploy/Dockerfile"));
    // The detector's command line is one the binary accepts.
    let help = Command::new(env!("CARGO_BIN_EXE_fraudstream"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--brokers",
        "--group",
        "--input-topic",
        "--alerts-topic",
        "--scores-topic",
        "--dead-letter-topic",
    ] {
        assert!(config.contains(flag) && help.contains(flag), "{flag}");
    }
}
