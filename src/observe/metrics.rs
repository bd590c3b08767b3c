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
    /// Messages read from a partition revoked since, dropped before publishing.
    pub revoked_drops: IntCounter,
    /// Messages with an output the broker did not acknowledge (offset not stored).
    pub delivery_failures: IntCounter,
    /// 1 while librdkafka's statistics show a broker connection up.
    pub broker_up: IntGauge,
    /// Changelog records produced (with `--changelog-topic`: one per card changed within a flush
    /// interval).
    pub changelog_records: IntCounter,
    /// Bytes of changelog record payloads produced.
    pub changelog_bytes: IntCounter,
    /// Card-state changes coalesced into a later change of the same card before being written.
    pub changelog_coalesced: IntCounter,
    /// Cards restored from the changelog.
    pub restored_cards: IntCounter,
    /// Changelog records or cards not restored, by reason.
    pub restore_skipped: IntCounterVec,
    /// Restores that failed (their cards start empty).
    pub restore_failures: IntCounter,
    /// Time to restore the cards of newly assigned partitions.
    pub restore_seconds: Histogram,
    /// Local snapshots written or failed (`--state-dir`).
    pub snapshots: IntCounterVec,
    /// Size of the last snapshot written.
    pub snapshot_bytes: IntGauge,
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
    /// The challenger's labelled decisions by its version and outcome.
    pub challenger_label_outcomes: IntCounterVec,
    /// Per model (role, version) precision over windows 5m, 1h, 1d.
    pub model_precision: GaugeVec,
    /// Per model recall.
    pub model_recall: GaugeVec,
    /// Per model F1.
    pub model_f1: GaugeVec,
    /// Model loads into a running detector by role and result.
    pub model_reloads: IntCounterVec,
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
    /// Key values (e.g. terminals) held in the label-rate tables.
    pub label_keys: IntGauge,
    /// The latest alerts, for the dashboard's table.
    pub recent_alerts: std::sync::Arc<RecentAlerts>,
    names: Vec<String>,
    ready_flag: std::sync::Arc<AtomicBool>,
    /// False while librdkafka's statistics show no broker connection up.
    broker_flag: std::sync::Arc<AtomicBool>,
    /// False while label-rate tables are restored from the labels topic's history.
    restored_flag: std::sync::Arc<AtomicBool>,
}

/// Alerts kept for the dashboard's table.
const RECENT_ALERTS: usize = 25;

/// The latest alerts as published, newest first (a short fixed-size log, not a metric series:
/// it carries card ids, which labels must never do).
#[derive(Debug, Default)]
pub struct RecentAlerts(std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>);

impl RecentAlerts {
    /// Keeps an alert.
    pub fn push(&self, alert: &impl serde::Serialize) {
        if let Ok(v) = serde_json::to_value(alert) {
            let mut a = self.0.lock().expect("alerts lock");
            a.push_front(v);
            a.truncate(RECENT_ALERTS);
        }
    }

    /// The kept alerts, newest first.
    pub fn latest(&self) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .expect("alerts lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// Registers collectors and remembers every name they export.
struct Registrar<'a> {
    registry: &'a Registry,
    names: Vec<String>,
}

impl Registrar<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(
        &mut self,
        c: C,
    ) -> prometheus::Result<C> {
        self.names
            .extend(c.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }
}

/// The sliding windows of the live-quality gauges, with the label value each exports under.
pub const WINDOWS: [(&str, i64); 2] = [("5m", 5 * 60_000), ("1h", 3_600_000)];

fn exponential(start: f64, factor: f64, n: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, n).expect("valid buckets")
}

impl Metrics {
    /// Creates and registers the metrics (and process metrics where supported).
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let mut r = Registrar {
            registry: &registry,
            names: Vec::new(),
        };
        let vec = |name: &str, help: &str| Opts::new(name, help);
        let histogram = |name: &str, help: &str, b: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(b))
        };
        let window = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["window"]);
        let m = Metrics {
            transactions: r.add(IntCounterVec::new(
                vec("fraudstream_transactions_total", "Transactions consumed, by outcome"),
                &["outcome"],
            )?)?,
            alerts: r.add(IntCounter::new("fraudstream_alerts_total", "Alerts published")?)?,
            dead_letters: r.add(IntCounterVec::new(
                vec("fraudstream_dead_letters_total", "Records dead-lettered, by reason"),
                &["reason"],
            )?)?,
            revoked_drops: r.add(IntCounter::new(
                "fraudstream_revoked_dropped_total",
                "Messages dropped unpublished because their partition was revoked (the next owner scores them)",
            )?)?,
            broker_up: r.add(IntGauge::new(
                "fraudstream_broker_up",
                "1 while the consumer has a broker connection up (librdkafka statistics, every 5 s), else 0",
            )?)?,
            changelog_records: r.add(IntCounter::new(
                "fraudstream_changelog_records_total",
                "Card-state records produced to the changelog topic",
            )?)?,
            changelog_bytes: r.add(IntCounter::new(
                "fraudstream_changelog_bytes_total",
                "Bytes of card-state records produced to the changelog topic (payloads)",
            )?)?,
            changelog_coalesced: r.add(IntCounter::new(
                "fraudstream_changelog_coalesced_total",
                "Card-state changes replaced by a later change of the same card within a flush interval (never written)",
            )?)?,
            restored_cards: r.add(IntCounter::new(
                "fraudstream_state_restored_cards_total",
                "Cards restored from the changelog topic on partition assignment",
            )?)?,
            restore_skipped: r.add(IntCounterVec::new(
                vec(
                    "fraudstream_state_restore_skipped_total",
                    "Changelog records or cards not restored, by reason (corrupt, version, other_model)",
                ),
                &["reason"],
            )?)?,
            restore_failures: r.add(IntCounter::new(
                "fraudstream_state_restore_failures_total",
                "Restores from the changelog that failed (broker error or deadline): those partitions' cards start empty",
            )?)?,
            restore_seconds: r.add(histogram(
                "fraudstream_state_restore_duration_seconds",
                "Time to restore the cards of newly assigned partitions from the changelog",
                exponential(0.01, 2.0, 14),
            )?)?,
            snapshots: r.add(IntCounterVec::new(
                vec(
                    "fraudstream_state_snapshots_total",
                    "Local card-store snapshots (--state-dir), by outcome (written, failed)",
                ),
                &["outcome"],
            )?)?,
            snapshot_bytes: r.add(IntGauge::new(
                "fraudstream_state_snapshot_bytes",
                "Size of the last local card-store snapshot written",
            )?)?,
            delivery_failures: r.add(IntCounter::new(
                "fraudstream_delivery_failures_total",
                "Messages with an alert, score or dead letter the broker did not acknowledge (offset not stored: read again after a restart)",
            )?)?,
            batch_size: r.add(histogram(
                "fraudstream_inference_batch_size",
                "Windows per scored batch",
                exponential(1.0, 2.0, 10),
            )?)?,
            inference_seconds: r.add(histogram(
                "fraudstream_inference_duration_seconds",
                "Time to score one batch",
                exponential(0.0005, 2.0, 14),
            )?)?,
            end_to_end_seconds: r.add(histogram(
                "fraudstream_end_to_end_latency_seconds",
                "From the record's transport timestamp to its decision",
                exponential(0.001, 2.0, 16),
            )?)?,
            live_cards: r.add(IntGauge::new(
                "fraudstream_live_cards",
                "Cards whose windows are held",
            )?)?,
            evicted_cards: r.add(IntCounter::new(
                "fraudstream_evicted_cards_total",
                "Cards evicted (idle or over the cap)",
            )?)?,
            model_info: r.add(GaugeVec::new(
                vec("fraudstream_model_info", "The model in use (value is always 1)"),
                &["name", "version", "threshold", "role"],
            )?)?,
            ready: r.add(Gauge::new(
                "fraudstream_ready",
                "1 when the detector can work",
            )?)?,
            consumer_lag: r.add(IntGaugeVec::new(
                vec(
                    "fraudstream_consumer_lag",
                    "Messages behind the partition's high watermark (librdkafka statistics)",
                ),
                &["topic", "partition"],
            )?)?,
            labels: r.add(IntCounterVec::new(
                vec("fraudstream_labels_total", "Fraud labels received, by source"),
                &["source"],
            )?)?,
            labels_unmatched: r.add(IntCounter::new(
                "fraudstream_labels_unmatched_total",
                "Labels whose transaction's score is not remembered",
            )?)?,
            label_outcomes: r.add(IntCounterVec::new(
                vec(
                    "fraudstream_label_outcomes_total",
                    "Labelled decisions by model version and outcome",
                ),
                &["model_version", "outcome"],
            )?)?,
            challenger_label_outcomes: r.add(IntCounterVec::new(
                vec(
                    "fraudstream_challenger_label_outcomes_total",
                    "Labelled decisions the shadow challenger would have made, by its version and outcome",
                ),
                &["model_version", "outcome"],
            )?)?,
            model_precision: r.add(GaugeVec::new(
                vec(
                    "fraudstream_model_precision",
                    "Precision of each model's labelled decisions over a sliding window, champion and challenger (NaN: no labelled alert)",
                ),
                &["role", "model_version", "window"],
            )?)?,
            model_recall: r.add(GaugeVec::new(
                vec(
                    "fraudstream_model_recall",
                    "Recall of each model over a sliding window (NaN: no labelled fraud)",
                ),
                &["role", "model_version", "window"],
            )?)?,
            model_f1: r.add(GaugeVec::new(
                vec(
                    "fraudstream_model_f1",
                    "F1 of each model over a sliding window",
                ),
                &["role", "model_version", "window"],
            )?)?,
            model_reloads: r.add(IntCounterVec::new(
                vec(
                    "fraudstream_model_reloads_total",
                    "Model loads into a running detector (swap, challenger, promotion), by role and result (loaded, refused)",
                ),
                &["role", "result"],
            )?)?,
            label_delay_seconds: r.add(histogram(
                "fraudstream_label_delay_seconds",
                "From the decision to the arrival of its label",
                exponential(1.0, 4.0, 12),
            )?)?,
            live_precision: r.add(window(
                "fraudstream_live_precision",
                "Precision of labelled decisions over a sliding window (NaN: no labelled alert)",
            )?)?,
            live_recall: r.add(window(
                "fraudstream_live_recall",
                "Recall of labelled frauds over a sliding window (NaN: no labelled fraud)",
            )?)?,
            live_f1: r.add(window(
                "fraudstream_live_f1",
                "F1 of live precision and recall over a sliding window",
            )?)?,
            remembered_scores: r.add(IntGauge::new(
                "fraudstream_remembered_scores",
                "Scores remembered until their labels arrive",
            )?)?,
            label_keys: r.add(IntGauge::new(
                "fraudstream_label_keys",
                "Key values (e.g. terminals) held in the label-rate tables",
            )?)?,
            recent_alerts: Default::default(),
            names: Vec::new(),
            ready_flag: Default::default(),
            broker_flag: std::sync::Arc::new(AtomicBool::new(true)),
            restored_flag: std::sync::Arc::new(AtomicBool::new(true)),
            registry: registry.clone(),
        };
        // Undefined until labels arrive: NaN, which dashboards show as a gap, not as 0.
        for (w, _) in WINDOWS {
            for g in [&m.live_precision, &m.live_recall, &m.live_f1] {
                g.with_label_values(&[w]).set(f64::NAN);
            }
        }
        #[cfg(target_os = "linux")]
        {
            use prometheus::core::Collector;
            let process = prometheus::process_collector::ProcessCollector::for_self();
            r.names
                .extend(process.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(Box::new(process))?;
        }
        Ok(Metrics {
            names: r.names,
            ..m
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
        self.broker_up.set(i64::from(up));
        self.update_ready();
    }

    /// Marks whether the label-rate tables are restored (not ready while they are not).
    pub fn set_restored(&self, restored: bool) {
        self.restored_flag.store(restored, Ordering::Relaxed);
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
        self.ready_flag.load(Ordering::Relaxed)
            && self.broker_flag.load(Ordering::Relaxed)
            && self.restored_flag.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_table_keeps_the_latest_first() {
        let r = RecentAlerts::default();
        for i in 0..(RECENT_ALERTS + 5) {
            r.push(&serde_json::json!({ "n": i }));
        }
        let a = r.latest();
        assert_eq!(a.len(), RECENT_ALERTS);
        assert_eq!(a[0]["n"], RECENT_ALERTS + 4);
    }
}
