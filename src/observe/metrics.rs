//! The detector's Prometheus metrics, on a registry passed in (tests read it directly).
//!
//! Names follow `fraudstream_<noun>_<unit>`; label sets are small and fixed (never a card id).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
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
    /// Messages behind the partition's high watermark, from librdkafka's statistics.
    pub consumer_lag: IntGaugeVec,
    /// Labels received, by source: topic or inline.
    pub labels: IntCounterVec,
    /// Labels whose score is not remembered (expired, another instance's, never scored).
    pub labels_unmatched: IntCounter,
    /// Joined labels by model version and outcome (true/false positive/negative).
    pub label_outcomes: IntCounterVec,
    /// From the decision to its label's arrival.
    pub label_delay_seconds: Histogram,
    /// Precision of labelled decisions over a sliding window (5m, 1h).
    pub live_precision: GaugeVec,
    /// Recall over a sliding window.
    pub live_recall: GaugeVec,
    /// F1 over a sliding window.
    pub live_f1: GaugeVec,
    /// Scores waiting for their labels.
    pub remembered_scores: IntGauge,
    /// The latest alerts and sampled time series behind the dashboard.
    pub recent: std::sync::Arc<super::dashboard::Recent>,
    names: Vec<String>,
    ready_flag: std::sync::Arc<AtomicBool>,
    /// False while librdkafka's statistics show no broker connection up.
    broker_flag: std::sync::Arc<AtomicBool>,
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
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "fraudstream_consumer_lag",
                "Messages behind the partition's high watermark (librdkafka statistics)",
            ),
            &["topic", "partition"],
        )?;
        let labels = IntCounterVec::new(
            Opts::new(
                "fraudstream_labels_total",
                "Fraud labels received, by source",
            ),
            &["source"],
        )?;
        let labels_unmatched = IntCounter::new(
            "fraudstream_labels_unmatched_total",
            "Labels whose transaction's score is not remembered",
        )?;
        let label_outcomes = IntCounterVec::new(
            Opts::new(
                "fraudstream_label_outcomes_total",
                "Labelled decisions by model version and outcome",
            ),
            &["model_version", "outcome"],
        )?;
        let label_delay_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fraudstream_label_delay_seconds",
                "From the decision to the arrival of its label",
            )
            .buckets(exponential(1.0, 4.0, 12)),
        )?;
        let window = |name: &str, help: &str| {
            GaugeVec::new(Opts::new(name.to_string(), help.to_string()), &["window"])
        };
        let live_precision = window(
            "fraudstream_live_precision",
            "Precision of labelled decisions over a sliding window (NaN: no labelled alert)",
        )?;
        let live_recall = window(
            "fraudstream_live_recall",
            "Recall of labelled frauds over a sliding window (NaN: no labelled fraud)",
        )?;
        let live_f1 = window(
            "fraudstream_live_f1",
            "F1 of live precision and recall over a sliding window",
        )?;
        let remembered_scores = IntGauge::new(
            "fraudstream_remembered_scores",
            "Scores remembered until their labels arrive",
        )?;
        let mut names = Vec::new();
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
            Box::new(consumer_lag.clone()),
            Box::new(labels.clone()),
            Box::new(labels_unmatched.clone()),
            Box::new(label_outcomes.clone()),
            Box::new(label_delay_seconds.clone()),
            Box::new(live_precision.clone()),
            Box::new(live_recall.clone()),
            Box::new(live_f1.clone()),
            Box::new(remembered_scores.clone()),
        ] {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c)?;
        }
        // Undefined until labels arrive: NaN, which dashboards show as a gap, not as 0.
        for (w, _) in super::quality::WINDOWS {
            for g in [&live_precision, &live_recall, &live_f1] {
                g.with_label_values(&[w]).set(f64::NAN);
            }
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            use prometheus::core::Collector;
            names.extend(process.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(Box::new(process))?;
        }
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
            consumer_lag,
            labels,
            labels_unmatched,
            label_outcomes,
            label_delay_seconds,
            live_precision,
            live_recall,
            live_f1,
            remembered_scores,
            recent: Default::default(),
            names,
            ready_flag: Default::default(),
            broker_flag: std::sync::Arc::new(AtomicBool::new(true)),
        })
    }

    /// Counts a scored transaction.
    pub fn scored(&self, alerted: bool) {
        self.transactions.with_label_values(&["scored"]).inc();
        if alerted {
            self.alerts.inc();
        }
    }

    /// Records a decision's end-to-end latency, once its outputs are acknowledged.
    pub fn decided(&self, latency: Duration) {
        self.end_to_end_seconds.observe(latency.as_secs_f64());
    }

    /// Counts a dead letter.
    pub fn dead_lettered(&self, reason: &str) {
        self.transactions.with_label_values(&["invalid"]).inc();
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    /// Counts a bad message on the labels topic (not a transaction).
    pub fn dead_lettered_label(&self, reason: &str) {
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

    /// Marks the detector able to work (model loaded; on Kafka, partitions held) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready_flag.store(ready, Ordering::Relaxed);
        self.update_ready();
    }

    /// Records whether a broker connection is up (from librdkafka's statistics).
    pub fn set_broker_reachable(&self, up: bool) {
        self.broker_flag.store(up, Ordering::Relaxed);
        self.update_ready();
    }

    /// Whether the broker was reachable at the last statistics.
    pub fn is_broker_reachable(&self) -> bool {
        self.broker_flag.load(Ordering::Relaxed)
    }

    fn update_ready(&self) {
        self.ready.set(if self.is_ready() { 1.0 } else { 0.0 });
    }

    /// Every metric name a scrape can show, histogram series (`_bucket`, `_sum`, `_count`)
    /// included: what dashboards and alert rules may query.
    pub fn exported_names(&self) -> Vec<String> {
        let histograms = [
            &self.batch_size,
            &self.inference_seconds,
            &self.end_to_end_seconds,
            &self.label_delay_seconds,
        ];
        let histogram_names: Vec<String> = histograms
            .iter()
            .flat_map(|h| {
                use prometheus::core::Collector;
                h.desc()
                    .iter()
                    .map(|d| d.fq_name.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out = Vec::new();
        for n in &self.names {
            out.push(n.clone());
            if histogram_names.contains(n) {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.push(format!("{n}{suffix}"));
                }
            }
        }
        out
    }

    /// Whether the detector is ready: able to work and its broker reachable.
    pub fn is_ready(&self) -> bool {
        self.ready_flag.load(Ordering::Relaxed) && self.broker_flag.load(Ordering::Relaxed)
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
