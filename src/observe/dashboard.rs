//! What the dashboard at `/` shows: time series sampled from the metrics every
//! [`SAMPLE_EVERY`] and the latest alerts, served as JSON at `/api/dashboard`. The page itself
//! (`dashboard.html`) is compiled into the binary: no build step, no CDN.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::Histogram;
use serde::Serialize;

use super::metrics::Metrics;

/// How often the series are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept (15 minutes).
const MAX_SAMPLES: usize = 450;

/// One point of the dashboard's charts. `None` (JSON null) where a value is undefined, e.g.
/// precision before any labelled alert.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time, milliseconds.
    pub t_ms: i64,
    /// Transactions consumed per second over the last interval.
    pub tx_per_s: f64,
    /// Alerts per second over the last interval.
    pub alerts_per_s: f64,
    /// Live precision, 5-minute window.
    pub precision: Option<f64>,
    /// Live recall, 5-minute window.
    pub recall: Option<f64>,
    /// Live F1, 5-minute window.
    pub f1: Option<f64>,
    /// 99th percentile end-to-end latency over the last interval, milliseconds.
    pub p99_latency_ms: Option<f64>,
    /// Consumer lag summed over partitions (None when not on Kafka).
    pub lag: Option<f64>,
}

#[derive(Debug, Default)]
struct Previous {
    t_ms: i64,
    consumed: f64,
    alerts: f64,
    latency_buckets: Vec<(f64, u64)>,
}

/// The models scoring now and how each did on labels (`/models`, the dashboard's
/// champion/challenger panel): given by whoever holds the detector.
pub type ModelsReport = std::sync::Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The sampled series, and the metrics they (and the latest alerts) are read from.
pub struct Dashboard {
    metrics: std::sync::Arc<Metrics>,
    samples: Mutex<VecDeque<Sample>>,
    previous: Mutex<Option<Previous>>,
    models: Option<ModelsReport>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard").finish_non_exhaustive()
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Cumulative (upper bound, count) pairs of a histogram.
fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    use prometheus::core::Collector;
    h.collect()
        .first()
        .and_then(|mf| mf.get_metric().first().cloned())
        .map(|m| {
            m.get_histogram()
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect()
        })
        .unwrap_or_default()
}

/// The q-quantile of the observations between two snapshots of cumulative buckets, linearly
/// interpolated inside its bucket as PromQL's `histogram_quantile` does.
pub fn quantile_between(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .enumerate()
        .map(|(i, (ub, c))| (*ub, c - before.get(i).map_or(0, |b| b.1)))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (ub, c) in &delta {
        if *c as f64 >= rank {
            if ub.is_infinite() {
                // Beyond the last finite bucket: its bound, as histogram_quantile reports.
                return Some(lower.0);
            }
            let in_bucket = (*c - lower.1) as f64;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1 as f64) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (ub - lower.0) * frac.clamp(0.0, 1.0));
        }
        lower = (*ub, *c);
    }
    Some(lower.0)
}

impl Dashboard {
    /// A dashboard of `metrics` with no samples yet.
    pub fn new(metrics: std::sync::Arc<Metrics>) -> Self {
        Self::with_models(metrics, None)
    }

    /// A dashboard that also shows the model lineup.
    pub fn with_models(metrics: std::sync::Arc<Metrics>, models: Option<ModelsReport>) -> Self {
        Dashboard {
            metrics,
            samples: Mutex::default(),
            previous: Mutex::default(),
            models,
        }
    }

    /// The models scoring now and how each did (None: not known here).
    pub fn models(&self) -> Option<serde_json::Value> {
        self.models.as_ref().map(|f| f())
    }

    /// The metrics shown.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Takes a sample at `now_ms`; the first call only sets the baseline.
    pub fn sample(&self, now_ms: i64) {
        let m = &*self.metrics;
        let consumed: f64 = ["scored", "invalid", "duplicate"]
            .iter()
            .map(|o| m.transactions.with_label_values(&[o]).get() as f64)
            .sum();
        let alerts = m.alerts.get() as f64;
        let latency_buckets = buckets(&m.end_to_end_seconds);
        let now = Previous {
            t_ms: now_ms,
            consumed,
            alerts,
            latency_buckets,
        };
        let mut prev = self.previous.lock().expect("previous lock");
        if let Some(p) = prev.as_ref() {
            let dt = ((now_ms - p.t_ms) as f64 / 1000.0).max(1e-3);
            let gauge = |g: &prometheus::GaugeVec| finite(g.with_label_values(&["5m"]).get());
            let lag = lag_total(m);
            let s = Sample {
                t_ms: now_ms,
                tx_per_s: (consumed - p.consumed) / dt,
                alerts_per_s: (alerts - p.alerts) / dt,
                precision: gauge(&m.live_precision),
                recall: gauge(&m.live_recall),
                f1: gauge(&m.live_f1),
                p99_latency_ms: quantile_between(&p.latency_buckets, &now.latency_buckets, 0.99)
                    .map(|s| s * 1000.0),
                lag,
            };
            let mut samples = self.samples.lock().expect("samples lock");
            samples.push_back(s);
            while samples.len() > MAX_SAMPLES {
                samples.pop_front();
            }
        }
        *prev = Some(now);
    }

    /// The dashboard's JSON: model, totals, series and latest alerts.
    pub fn snapshot(&self) -> serde_json::Value {
        let m = &*self.metrics;
        let model: serde_json::Map<String, serde_json::Value> = champion_labels(&m.model_info);
        let count = |o: &str| m.transactions.with_label_values(&[o]).get();
        let dead = sum(&m.dead_letters) as u64;
        let window = |w: &str| {
            serde_json::json!({
                "precision": finite(m.live_precision.with_label_values(&[w]).get()),
                "recall": finite(m.live_recall.with_label_values(&[w]).get()),
                "f1": finite(m.live_f1.with_label_values(&[w]).get()),
            })
        };
        serde_json::json!({
            "model": model,
            "ready": m.is_ready(),
            "totals": {
                "scored": count("scored"),
                "invalid": count("invalid"),
                "duplicates": count("duplicate"),
                "alerts": m.alerts.get(),
                "dead_letters": dead,
                "labels_unmatched": m.labels_unmatched.get(),
                "live_cards": m.live_cards.get(),
            },
            "live": { "5m": window("5m"), "1h": window("1h") },
            "series": *self.samples.lock().expect("samples lock"),
            "alerts": m.recent_alerts.latest(),
            "models": self.models(),
        })
    }
}

/// The children of a labelled metric.
fn children(c: &impl prometheus::core::Collector) -> Vec<prometheus::proto::Metric> {
    c.collect()
        .first()
        .map(|f| f.get_metric().to_vec())
        .unwrap_or_default()
}

/// A counter or gauge summed over its label values (the other kind reads 0).
fn sum(c: &impl prometheus::core::Collector) -> f64 {
    children(c)
        .iter()
        .map(|x| x.get_counter().get_value() + x.get_gauge().get_value())
        .sum()
}

/// The label pairs of the model info gauge's champion.
fn champion_labels(
    c: &impl prometheus::core::Collector,
) -> serde_json::Map<String, serde_json::Value> {
    children(c)
        .iter()
        .find(|x| {
            x.get_label()
                .iter()
                .any(|l| l.name() == "role" && l.value() == "champion")
        })
        .map(|x| {
            x.get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().into()))
                .collect()
        })
        .unwrap_or_default()
}

/// Lag summed over the partitions this instance holds (None when none is reported).
fn lag_total(m: &Metrics) -> Option<f64> {
    if children(&m.consumer_lag).is_empty() {
        return None;
    }
    Some(sum(&m.consumer_lag))
}

/// Samples every [`SAMPLE_EVERY`] until the runtime stops.
pub fn spawn_sampler(d: std::sync::Arc<Dashboard>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            d.sample(chrono::Utc::now().timestamp_millis());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_inside_the_bucket_like_promql() {
        let before = [(0.1, 0), (0.2, 0), (f64::INFINITY, 0)];
        // 100 observations: 50 under 0.1, 50 in (0.1, 0.2].
        let after = [(0.1, 50), (0.2, 100), (f64::INFINITY, 100)];
        let p99 = quantile_between(&before, &after, 0.99).unwrap();
        assert!((p99 - 0.198).abs() < 1e-9, "{p99}");
        let p50 = quantile_between(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9);
        assert_eq!(quantile_between(&after, &after, 0.99), None);
        let slow = [(0.1, 0), (0.2, 0), (f64::INFINITY, 10)];
        assert_eq!(quantile_between(&before, &slow, 0.99), Some(0.2));
    }

    #[test]
    fn samples_are_rates_between_calls() {
        let m = std::sync::Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let d = Dashboard::new(m.clone());
        d.sample(0);
        for _ in 0..20 {
            m.scored(false);
            m.decided(Duration::from_millis(30));
        }
        m.scored(true);
        m.decided(Duration::from_millis(30));
        d.sample(2_000);
        let snap = d.snapshot();
        let s = &snap["series"][0];
        assert_eq!(s["tx_per_s"], 10.5);
        assert_eq!(s["alerts_per_s"], 0.5);
        // No labels yet: precision is null, not 0.
        assert!(s["precision"].is_null());
        let p99 = s["p99_latency_ms"].as_f64().unwrap();
        assert!((16.0..=32.0).contains(&p99), "{p99}");
        assert!(s["lag"].is_null());
        assert_eq!(snap["totals"]["alerts"], 1);
    }
}
