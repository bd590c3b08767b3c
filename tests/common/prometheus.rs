//! A real Prometheus server (Debian package `prometheus`, installed by .ci/test) scraping one
//! target every second, and queries through its HTTP API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prometheus; killed when dropped.
pub struct Prometheus {
    child: Child,
    /// Its `host:port`.
    pub addr: String,
}

impl Prometheus {
    /// Starts Prometheus in `dir`, scraping `target` (`host:port`) as job `fraudstream`.
    pub fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: fraudstream\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", super::free_port());
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        super::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("prometheus is installed by .ci/test (Debian package prometheus)");
        let p = Prometheus { child, addr };
        let began = Instant::now();
        while !super::detector::get(&p.addr, "/-/ready").0.contains("200") {
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "Prometheus did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The value of an instant query's first sample, if it has one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) =
            super::detector::get(&self.addr, &format!("/api/v1/query?query={encoded}"));
        assert!(status.contains("200"), "{status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }

    /// Waits until `promql` has a value satisfying `ok`; returns it.
    pub fn wait_for(&self, promql: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let began = Instant::now();
        loop {
            let v = self.query(promql);
            if let Some(x) = v.filter(|x| ok(*x)) {
                return x;
            }
            assert!(
                began.elapsed() < timeout,
                "{promql}: still {v:?} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
