//! What a detector run did, for the summary line people read at the end (and the demo's live
//! line). Counts come from the run's [`Metrics`]: the pipeline counts each outcome once, there.
//! Only the latency distribution is kept here too, in a fixed-size HDR histogram, because the
//! exported Prometheus histogram's buckets are too coarse for a p50.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::observe::Metrics;
use crate::schema::Confusion;

/// Latencies above this (an hour) are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// The clock and latency record of one run; [`Run::stats`] reads the rest from the metrics.
#[derive(Debug)]
pub struct Run {
    started: Instant,
    /// When the first decision was acknowledged, in microseconds since `started` (`u64::MAX`
    /// before it).
    first_decided_us: AtomicU64,
    /// When the last decision was acknowledged, in microseconds since `started`.
    last_decided_us: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    metrics: Arc<Metrics>,
}

impl Run {
    /// A run reported through `metrics`, starting now.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Run {
            started: Instant::now(),
            first_decided_us: AtomicU64::new(u64::MAX),
            last_decided_us: AtomicU64::new(0),
            // 3 significant digits: a p99 of 41.2 ms is told apart from 41.3 ms.
            latency_us: Mutex::new(
                Histogram::new_with_max(MAX_LATENCY_US, 3).expect("valid histogram bounds"),
            ),
            metrics,
        }
    }

    /// Records a decision's end-to-end latency (also exported as a metric).
    pub fn decided(&self, latency: Duration) {
        self.metrics.decided(latency);
        let now = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.first_decided_us.fetch_min(now, Ordering::Relaxed);
        self.last_decided_us.fetch_max(now, Ordering::Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .lock()
            .expect("latency lock")
            .saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    /// The numbers so far.
    pub fn stats(&self) -> RunStats {
        let m = &self.metrics;
        let count = |o: &str| m.transactions.with_label_values(&[o]).get();
        let mut quality = Confusion::default();
        for child in children(&m.label_outcomes) {
            let outcome = child
                .get_label()
                .iter()
                .find(|l| l.name() == "outcome")
                .map(|l| l.value().to_string());
            let n = child.get_counter().get_value() as u64;
            match outcome.as_deref() {
                Some("true_positive") => quality.tp += n,
                Some("false_positive") => quality.fp += n,
                Some("false_negative") => quality.fn_ += n,
                Some("true_negative") => quality.tn += n,
                _ => {}
            }
        }
        let h = self.latency_us.lock().expect("latency lock");
        let ms = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        RunStats {
            scored: count("scored"),
            alerts: m.alerts.get(),
            invalid: count("invalid"),
            duplicates: count("duplicate"),
            labelled: quality,
            cards: m.live_cards.get().max(0) as u64,
            evicted: m.evicted_cards.get(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            first_decided_s: match self.first_decided_us.load(Ordering::Relaxed) {
                u64::MAX => 0.0,
                us => us as f64 / 1e6,
            },
            decided_s: self.last_decided_us.load(Ordering::Relaxed) as f64 / 1e6,
            latency_p50_ms: ms(0.5),
            latency_p99_ms: ms(0.99),
            latency_p999_ms: ms(0.999),
        }
    }
}

fn children(c: &impl prometheus::core::Collector) -> Vec<prometheus::proto::Metric> {
    c.collect()
        .first()
        .map(|f| f.get_metric().to_vec())
        .unwrap_or_default()
}

/// A run's numbers at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunStats {
    /// Transactions scored.
    pub scored: u64,
    /// Alerts published.
    pub alerts: u64,
    /// Records dead-lettered.
    pub invalid: u64,
    /// Redelivered transactions skipped.
    pub duplicates: u64,
    /// Decisions judged by a label so far (inline or from a labels topic).
    pub labelled: Confusion,
    /// Live cards (at the last sweep).
    pub cards: u64,
    /// Cards evicted (idle past the TTL, or beyond the cap).
    pub evicted: u64,
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Seconds from the start to the first acknowledged decision (0 before it): start-up,
    /// the consumer group's join included.
    pub first_decided_s: f64,
    /// Seconds from the start to the last acknowledged decision.
    pub decided_s: f64,
    /// Median end-to-end latency, milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile end-to-end latency, milliseconds.
    pub latency_p99_ms: f64,
    /// 99.9th percentile end-to-end latency, milliseconds.
    pub latency_p999_ms: f64,
}

impl RunStats {
    /// Scored transactions per second.
    pub fn throughput(&self) -> f64 {
        self.scored as f64 / self.elapsed_s.max(1e-9)
    }

    /// Scored transactions per second from the first acknowledged decision to the last (a
    /// benchmark's measure: diluted neither by start-up, where a consumer group's join waits
    /// out the broker's rebalance delay, nor by the time a run takes to notice it is done and
    /// shut down). The scored count over the span: the first decision's batch arrived with the
    /// span's start, and a run is thousands of decisions long. A run decided in one instant
    /// (a single batch) counts from the start instead.
    pub fn decided_throughput(&self) -> f64 {
        let span = self.decided_s - self.first_decided_s;
        let span = if span > 0.0 { span } else { self.decided_s };
        self.scored as f64 / span.max(1e-9)
    }

    /// Precision against labels; 0 before any labelled alert (printed, not exported).
    pub fn precision(&self) -> f64 {
        self.labelled.precision().unwrap_or(0.0)
    }

    /// Recall against labels; 0 before any labelled fraud.
    pub fn recall(&self) -> f64 {
        self.labelled.recall().unwrap_or(0.0)
    }

    /// F1 against labels; 0 while undefined.
    pub fn f1(&self) -> f64 {
        self.labelled.f1().unwrap_or(0.0)
    }

    /// A one-paragraph summary for people.
    pub fn summary(&self) -> String {
        format!(
            "scored {} transactions ({} dead-lettered, {} duplicates) for {} cards ({} evicted) in {:.1}s: {:.0} tx/s, \
             latency p50 {:.1} ms p99 {:.1} ms; {} alerts; against labels precision {:.3} recall {:.3} F1 {:.3}",
            self.scored,
            self.invalid,
            self.duplicates,
            self.cards,
            self.evicted,
            self.elapsed_s,
            self.throughput(),
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.alerts,
            self.precision(),
            self.recall(),
            self.f1()
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_read_the_metrics_and_latency_percentiles() {
        let m = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let run = Run::new(m.clone());
        let one_instant = RunStats {
            scored: 5,
            first_decided_s: 2.0,
            decided_s: 2.0,
            ..RunStats::default()
        };
        assert_eq!(one_instant.decided_throughput(), 2.5, "from the start");
        m.scored(true);
        m.scored(false);
        m.dead_lettered("invalid_json");
        m.label_outcomes
            .with_label_values(&["v1", "true_positive"])
            .inc();
        m.label_outcomes
            .with_label_values(&["v1", "false_negative"])
            .inc_by(3);
        assert_eq!(run.stats().first_decided_s, 0.0, "no decision yet");
        std::thread::sleep(Duration::from_millis(30));
        for ms in 1..=100 {
            run.decided(Duration::from_millis(ms));
            if ms == 1 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let s = run.stats();
        // Throughput counts from the first decision (after 30 ms of start-up) to the last
        // (at least 20 ms later).
        assert!(
            s.first_decided_s >= 0.03 && s.decided_s - s.first_decided_s >= 0.02,
            "{s:?}"
        );
        assert!(
            (s.decided_throughput() - 2.0 / (s.decided_s - s.first_decided_s)).abs() < 1e-6,
            "{s:?}"
        );
        assert_eq!((s.scored, s.alerts, s.invalid), (2, 1, 1));
        assert_eq!((s.labelled.tp, s.labelled.fn_), (1, 3));
        assert_eq!((s.precision(), s.recall()), (1.0, 0.25));
        assert!(
            (s.latency_p50_ms - 50.0).abs() < 0.1,
            "{}",
            s.latency_p50_ms
        );
        assert!(
            (s.latency_p99_ms - 99.0).abs() < 0.1,
            "{}",
            s.latency_p99_ms
        );
        assert_eq!(m.end_to_end_seconds.get_sample_count(), 100);
    }
}
