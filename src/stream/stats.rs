//! Counters and latency of a detector run, and the summary it prints.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::train::metrics::f1;

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    /// Transactions scored.
    pub scored: u64,
    /// Alerts published.
    pub alerts: u64,
    /// Records dead-lettered.
    pub invalid: u64,
    /// Redelivered transactions skipped.
    pub duplicates: u64,
    /// Alerted transactions labelled fraud inline.
    pub true_positives: u64,
    /// Alerted transactions labelled legitimate.
    pub false_positives: u64,
    /// Frauds (labelled inline) not alerted.
    pub false_negatives: u64,
    /// Live cards at the end.
    pub cards: usize,
    /// Cards evicted (idle past the TTL, or beyond the cap).
    pub evicted: u64,
    /// Latency per scored transaction (see [`latency`]), microseconds.
    #[serde(skip)]
    latencies_us: Vec<u32>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl RunStats {
    /// Empty counters; the clock starts now.
    pub fn new() -> Self {
        RunStats {
            scored: 0,
            alerts: 0,
            invalid: 0,
            duplicates: 0,
            true_positives: 0,
            false_positives: 0,
            false_negatives: 0,
            cards: 0,
            evicted: 0,
            latencies_us: Vec::new(),
            started: Some(Instant::now()),
        }
    }

    /// Counts one scored transaction.
    pub fn scored(&mut self, alerted: bool, label: Option<bool>) {
        self.scored += 1;
        self.alerts += u64::from(alerted);
        match (alerted, label) {
            (true, Some(true)) => self.true_positives += 1,
            (true, Some(false)) => self.false_positives += 1,
            (false, Some(true)) => self.false_negatives += 1,
            _ => {}
        }
    }

    /// Records a decision's end-to-end latency (see [`latency`]).
    pub fn latency(&mut self, latency: Duration) {
        self.latencies_us
            .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    /// Precision of alerts against inline labels.
    pub fn precision(&self) -> f64 {
        let d = self.true_positives + self.false_positives;
        if d == 0 {
            0.0
        } else {
            self.true_positives as f64 / d as f64
        }
    }

    /// Recall of inline-labelled frauds.
    pub fn recall(&self) -> f64 {
        let d = self.true_positives + self.false_negatives;
        if d == 0 {
            0.0
        } else {
            self.true_positives as f64 / d as f64
        }
    }

    /// F1 of the two.
    pub fn f1(&self) -> f64 {
        f1(self.precision(), self.recall())
    }

    /// Seconds since the run started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Scored transactions per second so far.
    pub fn throughput(&self) -> f64 {
        self.scored as f64 / self.elapsed_s().max(1e-9)
    }

    /// Latency percentile in milliseconds (q in [0, 1]).
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies_us.clone();
        let k = ((v.len() - 1) as f64 * q).round() as usize;
        let (_, x, _) = v.select_nth_unstable(k);
        f64::from(*x) / 1000.0
    }

    /// A one-paragraph summary for people.
    pub fn summary(&self) -> String {
        format!(
            "scored {} transactions ({} dead-lettered, {} duplicates) for {} cards ({} evicted) in {:.1}s: {:.0} tx/s, \
             latency p50 {:.1} ms p99 {:.1} ms; {} alerts; against inline labels precision {:.3} recall {:.3} F1 {:.3}",
            self.scored,
            self.invalid,
            self.duplicates,
            self.cards,
            self.evicted,
            self.elapsed_s(),
            self.throughput(),
            self.latency_ms(0.5),
            self.latency_ms(0.99),
            self.alerts,
            self.precision(),
            self.recall(),
            self.f1()
        )
    }
}

impl Default for RunStats {
    fn default() -> Self {
        Self::new()
    }
}

/// A decision's latency: from the record's transport timestamp (Kafka's message timestamp; the
/// read time for files) to now, when the broker has acknowledged its outputs (files: when they
/// are written); from ingestion when the record has no timestamp.
pub fn latency(timestamp_ms: Option<i64>, ingested: Instant) -> Duration {
    match timestamp_ms {
        Some(ts) => {
            let now = chrono::Utc::now().timestamp_millis();
            Duration::from_millis(now.saturating_sub(ts).max(0) as u64)
        }
        None => ingested.elapsed(),
    }
}
