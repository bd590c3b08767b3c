//! The detector's HTTP server under a slowloris: connections that never finish their headers
//! are closed after the header timeout, connections beyond the limit are closed at once, and
//! the server answers normally afterwards.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fraudstream::observe::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

/// Whether the server closed `stream` before `deadline` (a read returns end of file or a reset).
fn closed_by(mut stream: &TcpStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn half_open_connections_are_closed_and_capped() {
    // A detector on stdin kept open: it runs until the test ends.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fraudstream"));
    cmd.args(["serve", "--input", "-", "--http", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    common::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr = common::wait_until(Duration::from_secs(60), "the HTTP address", || {
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        log.push_str(&line);
        common::detector::http_addr(&log)
    });
    // A slowloris: more connections than the limit, each sending part of a request's headers.
    let extra = 40;
    let began = Instant::now();
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS + extra)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // Those beyond the limit are closed at once.
    let soon = Instant::now() + Duration::from_secs(2);
    let refused = held
        .iter()
        .rev()
        .take(extra)
        .filter(|s| closed_by(s, soon))
        .count();
    assert!(
        refused >= extra / 2,
        "{refused} of {extra} over the limit closed at once"
    );
    // Every one is closed by the server within the header timeout (plus slack).
    let deadline = began + HEADER_READ_TIMEOUT + Duration::from_secs(5);
    let open = held.iter().filter(|s| !closed_by(s, deadline)).count();
    assert_eq!(
        open,
        0,
        "half-open connections still held after {:?}",
        began.elapsed()
    );
    // And the server still answers.
    let (status, body) = common::detector::get(&addr, "/healthz");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");
    let _ = child.kill();
    let _ = child.wait();
}
