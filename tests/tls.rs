//! TLS to the broker: the README's `--kafka security.protocol=SSL` set-up, end to end. The test
//! broker (tansu) speaks plain Kafka, so Debian's stunnel4 terminates TLS in front of it with a
//! certificate signed by a CA made for the test; the broker advertises the TLS address, so every
//! connection of `replay` and `serve` goes through TLS.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::broker::{own_tansu_behind, unique};
use common::detector::{Serve, metric};
use common::{fraudstream, simulate};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl)");
    common::assert_success(&out);
}

/// A CA, and a server certificate for 127.0.0.1 signed by it: `ca.pem`, `server.pem`,
/// `server.key` in `dir`.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=fraudstream test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
}

/// A child process killed (and reaped) when the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// stunnel4 accepting TLS on `tls_port` and forwarding to `plain_port`.
fn stunnel(dir: &Path, tls_port: u16, plain_port: u16) -> Killed {
    let conf = dir.join("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls_port}\n\
             connect = 127.0.0.1:{plain_port}\ncert = {}\nkey = {}\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("stunnel4");
    cmd.arg(&conf).stdout(Stdio::null()).stderr(Stdio::null());
    common::die_with_parent(&mut cmd);
    let child = cmd.spawn().expect("stunnel4 (Debian package stunnel4)");
    let child = Killed(child);
    common::wait_until(Duration::from_secs(20), "stunnel listening", || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port))
            .ok()
            .map(|_| ())
    });
    child
}

#[test]
fn replay_and_serve_work_over_tls_with_the_documented_settings() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let tls_port = common::free_port();
    let (tansu, plain_port) = own_tansu_behind(tls_port);
    let _tansu = Killed(tansu);
    let _tls = stunnel(dir.path(), tls_port, plain_port);
    let brokers = format!("127.0.0.1:{tls_port}");
    let ca = format!("ssl.ca.location={}", dir.path().join("ca.pem").display());
    let tls = ["--kafka", "security.protocol=SSL", "--kafka", &ca];
    let file = simulate(dir.path(), "cards.csv", &["--days", "2", "--cards", "60"]);
    let count = std::fs::read_to_string(&file).unwrap().lines().count() - 1;
    let (input, alerts) = (unique("tx"), unique("alerts"));
    fraudstream()
        .args(["replay", "--brokers", &brokers, "--topic", &input])
        .args(["--partitions", "2", "--timeout-s", "20"])
        .args(tls)
        .arg("--data")
        .arg(&file)
        .assert()
        .success();
    let serve = Serve::start_on(
        &brokers,
        &[
            &["--group", &unique("group"), "--input-topic", &input],
            &["--alerts-topic", &alerts][..],
            &tls[..],
        ]
        .concat(),
    );
    serve.wait_metrics(
        Duration::from_secs(90),
        "every transaction scored over TLS",
        |t| {
            t.contains("fraudstream_transactions_total{outcome=\"scored\"}")
                && metric(t, "fraudstream_transactions_total{outcome=\"scored\"}") as usize == count
        },
    );
    let (code, log) = serve.stop(Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    // Without the CA the broker's certificate is not trusted: replay gives up.
    let out = fraudstream()
        .args(["replay", "--brokers", &brokers, "--topic", &input])
        .args(["--timeout-s", "5", "--kafka", "security.protocol=SSL"])
        .arg("--data")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
