//! A running detector (`fraudstream serve` on the test broker) and its HTTP endpoints, and
//! Kafka helpers shared by the tests that run one.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;

use super::broker::{brokers, unique};

pub const GROUP_TIMEOUTS: [&str; 6] = [
    "--kafka",
    "session.timeout.ms=6000",
    "--kafka",
    "max.poll.interval.ms=6000",
    "--http",
    "127.0.0.1:0",
];

/// The HTTP address a detector's log names, once it does.
pub fn http_addr(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("/metrics") && l.contains("bound="))
        .and_then(|l| l.split("bound=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap().to_string())
}

/// GET `path` from the detector whose log names its HTTP address; returns (status line, body).
pub fn http_get(log: &str, path: &str) -> (String, String) {
    let addr = http_addr(log).expect("the detector logs its HTTP address");
    get(&addr, path)
}

/// GET `http://addr/path` (HTTP/1.0: no chunked bodies); returns (status line, body), or the
/// connection error as the status when nothing listens yet.
pub fn get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return (format!("connect failed: {e}"), String::new()),
    };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of a metric line (name with labels exactly as written) in Prometheus text, if any.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

/// A counter's value in Prometheus text, 0 while it has no series yet (a labelled counter
/// appears at its first increment): for polls that run before anything was counted.
pub fn counter(text: &str, name: &str) -> f64 {
    value(text, name).unwrap_or(0.0)
}

/// The value of a metric line (name with labels exactly as written) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    value(text, name).unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

pub fn create_topics(topics: &[&str], partitions: i32) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(fraudstream::stream::kafka::ensure_topics(
        &brokers(),
        &[],
        topics,
        partitions,
    ))
    .unwrap();
}

/// How long a topic must stay quiet before a read counts as complete. (Tests read a topic's
/// end by quiet rather than by its high watermark: tansu reports a high watermark short of the
/// last batch.)
pub const QUIET: Duration = Duration::from_millis(1500);

/// Everything of one topic from its beginning, read without a group, as (partition, offset,
/// JSON value).
pub struct TopicReader {
    consumer: BaseConsumer,
    /// What was read so far.
    pub messages: Vec<(i32, i64, Value)>,
}

impl TopicReader {
    /// Assigns every partition of `topic` from the beginning.
    pub fn new(topic: &str) -> TopicReader {
        TopicReader::on(&brokers(), topic)
    }

    /// Like [`TopicReader::new`], on another broker.
    pub fn on(brokers: &str, topic: &str) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let meta = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in meta.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        TopicReader {
            consumer,
            messages: Vec::new(),
        }
    }

    /// Reads until nothing new arrives for `quiet`; returns how many messages are read in all.
    pub fn drain(&mut self, quiet: Duration) -> usize {
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                let v = serde_json::from_slice(m.payload().unwrap()).unwrap();
                self.messages.push((m.partition(), m.offset(), v));
                last = Instant::now();
            }
        }
        self.messages.len()
    }
}

/// Every message of `topic`: waits (up to `timeout`) until at least `expected` arrived, then
/// reads on until the topic is quiet, so a duplicate beyond `expected` shows as a longer result.
pub fn read_topic(topic: &str, expected: usize, timeout: Duration) -> Vec<(i32, i64, Value)> {
    let mut reader = TopicReader::new(topic);
    super::wait_until(timeout, &format!("{expected} messages in {topic}"), || {
        (reader.drain(Duration::from_millis(200)) >= expected).then_some(())
    });
    reader.drain(QUIET);
    reader.messages
}

/// Every message of `topic` so far, however many there are.
pub fn read_all(topic: &str) -> Vec<(i32, i64, Value)> {
    read_topic(topic, 0, Duration::from_secs(1))
}

/// A running `serve` whose stderr is collected.
pub struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The topics of one detector under test, each named for this test run.
pub struct Topics {
    pub input: String,
    pub alerts: String,
    pub scores: String,
    pub dlq: String,
}

impl Topics {
    pub fn new() -> Topics {
        Topics {
            input: unique("tx"),
            alerts: unique("alerts"),
            scores: unique("scores"),
            dlq: unique("dlq"),
        }
    }
}

impl Serve {
    /// `serve` in consumer group `group` on `topics` (scores and dead letters included), with
    /// `extra` flags after.
    pub fn start_for(topics: &Topics, group: &str, extra: &[&str]) -> Serve {
        let mut args = vec![
            "--group",
            group,
            "--input-topic",
            &topics.input,
            "--alerts-topic",
            &topics.alerts,
            "--scores-topic",
            &topics.scores,
            "--dead-letter-topic",
            &topics.dlq,
        ];
        args.extend_from_slice(extra);
        Serve::start(&args)
    }

    pub fn start(args: &[&str]) -> Serve {
        Serve::start_on(&brokers(), args)
    }

    /// `serve` on the given broker.
    pub fn start_on(brokers: &str, args: &[&str]) -> Serve {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("fraudstream"))
            .args(["serve", "--brokers", brokers])
            .args(GROUP_TIMEOUTS)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Serve {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Waits until /readyz answers 200 (partitions assigned); returns the HTTP address.
    pub fn wait_ready(&self, timeout: Duration) -> String {
        let addr = self.wait_http(timeout);
        super::wait_until(timeout, "/readyz 200", || {
            get(&addr, "/readyz").0.contains("200").then_some(())
        });
        addr
    }

    /// Waits until the HTTP server is up; returns its address.
    pub fn wait_http(&self, timeout: Duration) -> String {
        super::wait_until(timeout, "the detector's HTTP address in its log", || {
            http_addr(&self.log())
        })
    }

    /// Waits until `/metrics` satisfies `ok`; returns that scrape.
    pub fn wait_metrics(&self, timeout: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let addr = self.wait_http(timeout);
        super::wait_until(timeout, what, || {
            let (_, text) = get(&addr, "/metrics");
            ok(&text).then_some(text)
        })
    }

    /// Its process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status within `timeout`.
    pub fn stop(mut self, timeout: Duration) -> (i32, String) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The log is complete once the reader has seen stderr close.
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return (status.code().unwrap_or(-1), self.log());
            }
            if began.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "serve did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Serve {
    /// Waits for it to exit by itself; the exit code and its log.
    pub fn wait(mut self, timeout: Duration) -> (i32, String) {
        let status = super::wait_until(timeout, "serve to exit", || self.child.try_wait().unwrap());
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status.code().unwrap_or(-1), self.log())
    }

    /// SIGKILL: no drain, no commit, no goodbye (a crash or an OOM kill).
    pub fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.log()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A failed test must not leave a detector running.
        let _ = self.child.kill();
    }
}

/// Produces raw payloads to `topic` with one key.
pub fn produce_raw(topic: &str, key: &str, payloads: &[&[u8]]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        // Tests send records far above the default 1 MB limit.
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap();
    for p in payloads {
        producer
            .send(BaseRecord::to(topic).key(key).payload(*p))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}
