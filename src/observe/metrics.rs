//! The detector's Prometheus metrics, on a registry passed in (tests read it directly).
//!
//! Names follow `fraudstream_<noun>_<unit>`; label sets are small and fixed (never a card id).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric the detector exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry they are registered on.
    pub registry: Registry,
    /// Transactions consumed, by outcome: scored, invalid, duplicate.
    pub transactions: IntCounterVec,
    /// Alerts published.
    pub alerts: IntCounter,
    /// Records dead-lettered, by reason.
    pub dead_letters: IntCounterVec,
    /// Windows per scored batch.
    pub batch_size: Histogram,
    /// Time to score one batch.
    pub inference_seconds: Histogram,
    /// From the record's transport timestamp to its decision.
    pub end_to_end_seconds: Histogram,
    /// Cards whose windows are held.
    pub live_cards: IntGauge,
    /// Cards evicted (idle or over the cap).
    pub evicted_cards: IntCounter,
    /// Always 1, labelled with the model's name, version and threshold.
    pub model_info: GaugeVec,
    /// 1 once the detector can work (model loaded; Kafka partitions assigned).
    pub ready: Gauge,
    ready_flag: std::sync::Arc<AtomicBool>,
}

fn exponential(start: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, n).expect("valid buckets")
}

impl Metrics {
    /// Creates and registers the metrics (and process metrics where supported).
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let transactions = IntCounterVec::new(
            Opts::new(
                "fraudstream_transactions_total",
                "Transactions consumed, by outcome",
            ),
            &["outcome"],
        )?;
        let alerts = IntCounter::new("fraudstream_alerts_total", "Alerts published")?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "fraudstream_dead_letters_total",
                "Records dead-lettered, by reason",
            ),
            &["reason"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "fraudstream_inference_batch_size",
                "Windows per scored batch",
            )
            .buckets(exponential(1.0, 2.0, 10)),
        )?;
        let inference_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fraudstream_inference_duration_seconds",
                "Time to score one batch",
            )
            .buckets(exponential(0.0005, 2.0, 14)),
        )?;
        let end_to_end_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fraudstream_end_to_end_latency_seconds",
                "From the record's transport timestamp to its decision",
            )
            .buckets(exponential(0.001, 2.0, 16)),
        )?;
        let live_cards = IntGauge::new("fraudstream_live_cards", "Cards whose windows are held")?;
        let evicted_cards = IntCounter::new(
            "fraudstream_evicted_cards_total",
            "Cards evicted (idle or over the cap)",
        )?;
        let model_info = GaugeVec::new(
            Opts::new(
                "fraudstream_model_info",
                "The model in use (value is always 1)",
            ),
            &["name", "version", "threshold"],
        )?;
        let ready = Gauge::new("fraudstream_ready", "1 when the detector can work")?;
        for c in [
            Box::new(transactions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(alerts.clone()),
            Box::new(dead_letters.clone()),
            Box::new(batch_size.clone()),
            Box::new(inference_seconds.clone()),
            Box::new(end_to_end_seconds.clone()),
            Box::new(live_cards.clone()),
            Box::new(evicted_cards.clone()),
            Box::new(model_info.clone()),
            Box::new(ready.clone()),
        ] {
            registry.register(c)?;
        }
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            transactions,
            alerts,
            dead_letters,
            batch_size,
            inference_seconds,
            end_to_end_seconds,
            live_cards,
            evicted_cards,
            model_info,
            ready,
            ready_flag: Default::default(),
        })
    }

    /// Counts a scored transaction.
    pub fn scored(&self, alerted: bool, latency: Duration) {
        self.transactions.with_label_values(&["scored"]).inc();
        if alerted {
            self.alerts.inc();
        }
        self.end_to_end_seconds.observe(latency.as_secs_f64());
    }

    /// Counts a dead letter.
    pub fn dead_lettered(&self, reason: &str) {
        self.transactions.with_label_values(&["invalid"]).inc();
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    /// Counts a redelivered transaction.
    pub fn duplicate(&self) {
        self.transactions.with_label_values(&["duplicate"]).inc();
    }

    /// Records a scored batch.
    pub fn batch(&self, windows: usize, took: Duration) {
        self.batch_size.observe(windows as f64);
        self.inference_seconds.observe(took.as_secs_f64());
    }

    /// Marks the detector ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready_flag.store(ready, Ordering::Relaxed);
        self.ready.set(if ready { 1.0 } else { 0.0 });
    }

    /// Whether the detector is ready.
    pub fn is_ready(&self) -> bool {
        self.ready_flag.load(Ordering::Relaxed)
    }

    /// The registry in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        buf
    }
}
