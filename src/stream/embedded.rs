//! The embedded transport: the same pipeline reading JSONL or CSV from a file or stdin and
//! writing alerts (and optionally scores and dead letters) as JSONL to stdout or files.
//!
//! source thread (read, ingest) -> bounded queue -> batcher/scorer -> bounded queue -> sink

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

use super::batcher::{BatchSettings, Outcome, score_loop};
use super::detector::{Detector, spawn_evictor};
use super::records::Envelope;
use super::stats::{RunStats, latency};
use crate::schema::Format;

/// Where records come from: `file:PATH` or `-` (stdin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A file.
    File(PathBuf),
    /// Standard input or output.
    Std,
}

/// A `--input`/`--output` value that is neither `-` nor `file:PATH`.
#[derive(Debug, Error)]
#[error("{0:?}: expected `-` or `file:PATH`")]
pub struct EndpointError(String);

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "-" => Ok(Endpoint::Std),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Endpoint::File(PathBuf::from(p))),
                _ => Err(EndpointError(s.to_string())),
            },
        }
    }
}

impl Endpoint {
    fn label(&self) -> String {
        match self {
            Endpoint::File(p) => format!("file:{}", p.display()),
            Endpoint::Std => "stdin".into(),
        }
    }

    fn writer(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Endpoint::File(p) => Box::new(File::create(p)?),
            Endpoint::Std => Box::new(std::io::stdout()),
        })
    }
}

/// Settings of an embedded run.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Input records.
    pub input: Endpoint,
    /// Input format (default: from the file extension; stdin is JSONL).
    pub format: Option<Format>,
    /// Alerts, as JSONL.
    pub alerts: Endpoint,
    /// Every score, as JSONL (optional).
    pub scores: Option<Endpoint>,
    /// Dead letters, as JSONL (optional; they are always counted and logged).
    pub dead_letters: Option<Endpoint>,
    /// Micro-batching.
    pub batch: BatchSettings,
}

/// Reads the input as envelopes: JSONL lines as they are, CSV rows turned into JSON objects of
/// strings (the spec parses numbers from text). Stops early when `stop` is set.
fn read_input(
    cfg: &EmbeddedConfig,
    stop: &AtomicBool,
    mut emit: impl FnMut(Envelope) -> bool,
) -> std::io::Result<()> {
    let topic = cfg.input.label();
    let src: Box<dyn Read + Send> = match &cfg.input {
        Endpoint::File(p) => Box::new(File::open(p)?),
        Endpoint::Std => Box::new(std::io::stdin()),
    };
    let format = cfg.format.unwrap_or(match &cfg.input {
        Endpoint::File(p) => Format::from_path(p),
        Endpoint::Std => Format::Jsonl,
    });
    let envelope = |payload: Vec<u8>, line: u64| Envelope {
        payload,
        topic: topic.clone(),
        partition: 0,
        offset: line as i64,
        timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
    };
    match format {
        Format::Jsonl => {
            let mut reader = BufReader::with_capacity(1 << 16, src);
            let mut buf = Vec::new();
            let mut line = 0u64;
            while !stop.load(Ordering::Relaxed) {
                buf.clear();
                if reader.read_until(b'\n', &mut buf)? == 0 {
                    break;
                }
                line += 1;
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if !emit(envelope(std::mem::take(&mut buf), line)) {
                    break;
                }
            }
        }
        Format::Csv => {
            let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(src);
            let headers = rdr.headers()?.clone();
            for row in rdr.records() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (payload, line) = match row {
                    Ok(r) => {
                        let map: serde_json::Map<String, serde_json::Value> = headers
                            .iter()
                            .zip(r.iter())
                            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                            .collect();
                        let line = r.position().map_or(0, |p| p.line());
                        (serde_json::to_vec(&map).expect("a map serialises"), line)
                    }
                    // A malformed CSV row is passed on as its error text: it will be dead-lettered.
                    Err(e) => (
                        format!("malformed CSV row: {e}").into_bytes(),
                        e.position().map_or(0, |p| p.line()),
                    ),
                };
                if !emit(envelope(payload, line)) {
                    break;
                }
            }
        }
    }
    Ok(())
}

struct JsonlSink {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl JsonlSink {
    fn open(e: &Endpoint) -> std::io::Result<Self> {
        Ok(JsonlSink {
            out: BufWriter::new(e.writer()?),
        })
    }
    fn write<T: Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")
    }
}

/// Runs the pipeline until the input ends or `shutdown` resolves; everything read is scored and
/// written before it returns.
pub async fn run_embedded(
    detector: Arc<Detector>,
    cfg: EmbeddedConfig,
    shutdown: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(&RunStats),
) -> anyhow::Result<RunStats> {
    let (in_tx, in_rx) = mpsc::channel(cfg.batch.queue);
    let (out_tx, mut out_rx) = mpsc::channel(cfg.batch.queue);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (detector, cfg, stop) = (detector.clone(), cfg.clone(), stop.clone());
        std::thread::spawn(move || {
            read_input(&cfg, &stop, |env| {
                let item = (detector.ingest(&env), Instant::now());
                in_tx.blocking_send(item).is_ok()
            })
        })
    };
    let scorer = tokio::spawn(score_loop(
        detector.model(),
        detector.metrics().clone(),
        cfg.batch,
        in_rx,
        out_tx,
    ));
    detector.metrics().set_ready(true);
    let evictor = spawn_evictor(detector.clone());
    let mut alerts = JsonlSink::open(&cfg.alerts)?;
    let mut scores = cfg.scores.as_ref().map(JsonlSink::open).transpose()?;
    let mut dead = cfg.dead_letters.as_ref().map(JsonlSink::open).transpose()?;
    let mut stats = RunStats::new();
    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        let next = tokio::select! {
            item = out_rx.recv() => item,
            () = &mut shutdown, if !stopping => {
                // Stop reading; what was read still drains through the pipeline.
                stop.store(true, Ordering::Relaxed);
                stopping = true;
                continue;
            }
        };
        let Some((outcome, at)) = next else { break };
        match outcome {
            Outcome::Decision(d) => {
                let alert = detector.alerts(&d).then(|| detector.alert(&d));
                let alerted = alert.is_some();
                if let Some(a) = &alert {
                    alerts.write(a)?;
                }
                if let Some(s) = scores.as_mut() {
                    s.write(&detector.score_record(&d))?;
                }
                detector.record(&d, alert.as_ref());
                stats.scored(alerted, d.pending.label);
                let took = latency(d.pending.timestamp_ms, at);
                detector.metrics().decided(took);
                stats.latency(took);
            }
            Outcome::Invalid(letter) => {
                tracing::warn!(topic = %letter.topic, offset = letter.offset, reason = %letter.reason, "dead-lettered: {}", letter.error);
                if let Some(s) = dead.as_mut() {
                    s.write(&letter)?;
                }
                detector.metrics().dead_lettered(&letter.reason);
                stats.invalid += 1;
            }
            Outcome::Duplicate(_) => {
                detector.metrics().duplicate();
                stats.duplicates += 1;
            }
        }
        if out_rx.is_empty() {
            alerts.out.flush()?;
            progress(&stats);
        }
    }
    scorer.await?;
    reader.join().expect("reader thread panicked")?;
    alerts.out.flush()?;
    if let Some(s) = scores.as_mut() {
        s.out.flush()?;
    }
    if let Some(s) = dead.as_mut() {
        s.out.flush()?;
    }
    evictor.abort();
    stats.cards = detector.cards();
    stats.evicted = detector.evicted();
    Ok(stats)
}
