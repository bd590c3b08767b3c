//! The per-record logic of the detector, independent of transport: parse and validate, update
//! the card's window, and turn a score into an alert.

use std::sync::Arc;

use serde_json::Value;

use super::records::{
    Alert, AttentionRef, DeadLetter, Envelope, ModelRef, ScoreRecord, Source, now_rfc3339,
    time_rfc3339,
};
use crate::features::{CardStore, StateLimits, wall_clock};
use crate::model::{Bundle, FastModel};
use crate::observe::Metrics;
use crate::observe::quality::{Joined, Label, LiveQuality, QualitySettings};
use crate::schema::FeatureSpec;

/// A transaction whose window is ready to score.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Where it came from.
    pub source: Source,
    /// Transport timestamp (ms), for end-to-end latency.
    pub timestamp_ms: Option<i64>,
    /// Transaction id.
    pub transaction_id: Option<String>,
    /// Card.
    pub card_id: String,
    /// Event time (seconds).
    pub ts: f64,
    /// Label carried inline, if any.
    pub label: Option<bool>,
    /// Real transactions in the window.
    pub len: usize,
    /// The window (`window * width` floats).
    pub window: Vec<f32>,
    /// Transaction ids aligned with the window's rows.
    pub window_ids: Vec<Option<std::sync::Arc<str>>>,
}

/// What one input message became.
#[derive(Debug, Clone)]
pub enum Ingested {
    /// Ready to score.
    Window(Box<Pending>),
    /// Bad input: publish this dead letter and move on.
    Invalid(Box<DeadLetter>),
    /// A redelivered transaction already in its card's window: nothing to do.
    Duplicate(Source),
}

/// The scored decision for one transaction.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The transaction.
    pub pending: Pending,
    /// Its score.
    pub score: f32,
    /// The current transaction's attention over its window.
    pub attention: Vec<f32>,
}

/// Card state plus model: everything needed to go from a message to a decision.
#[derive(Debug)]
pub struct Detector {
    spec: FeatureSpec,
    store: CardStore,
    model: Arc<FastModel>,
    threshold: f64,
    model_ref: ModelRef,
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
    quality: LiveQuality,
}

impl Detector {
    /// A detector for a loaded bundle; larger messages are dead-lettered unparsed.
    pub fn new(
        bundle: &Bundle,
        max_message_bytes: usize,
        limits: StateLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let m = &bundle.manifest;
        metrics
            .model_info
            .with_label_values(&[&m.name, &m.version, &m.threshold.value.to_string()])
            .set(1.0);
        Detector {
            spec: m.spec.clone(),
            store: CardStore::with_limits(bundle.window_builder(), limits, wall_clock()),
            model: Arc::new(bundle.fast.clone()),
            threshold: m.threshold.value,
            model_ref: ModelRef {
                name: m.name.clone(),
                version: m.version.clone(),
                sha256: m.weights_sha256.clone(),
            },
            max_message_bytes,
            metrics,
            quality: LiveQuality::new(
                QualitySettings {
                    max_scores: 0,
                    ..QualitySettings::default()
                },
                &m.version,
            ),
        }
    }

    /// Remembers scores for labels from a labels topic (by default only inline labels count).
    pub fn with_label_memory(mut self, settings: QualitySettings) -> Self {
        self.quality = LiveQuality::new(settings, &self.model_ref.version);
        self
    }

    /// Counts a decision once its outputs are handed on: metrics, the dashboard's alert table,
    /// and live quality (an inline label joins now; otherwise the score waits for its label).
    pub fn record(&self, d: &Decision, alert: Option<&Alert>) {
        let alerted = alert.is_some();
        self.metrics.scored(alerted);
        if let Some(a) = alert {
            self.metrics.recent.alert(a);
        }
        // The clock is read only when a label is counted or a score remembered.
        let now = || chrono::Utc::now().timestamp_millis();
        match (d.pending.label, &d.pending.transaction_id) {
            (Some(is_fraud), _) => {
                self.quality.inline(alerted, is_fraud, now(), &self.metrics);
            }
            (None, Some(id)) if self.quality.remembers() => {
                self.quality.remember(id, alerted, now(), &self.metrics)
            }
            _ => {}
        }
    }

    /// Joins a message from the labels topic to its score; a bad label comes back as the
    /// dead letter to publish.
    pub fn label(&self, env: &Envelope) -> Result<Joined, Box<DeadLetter>> {
        match Label::parse(&env.payload) {
            Ok(label) => {
                let now = chrono::Utc::now().timestamp_millis();
                Ok(self.quality.label(&label, now, &self.metrics))
            }
            Err(e) => Err(Box::new(DeadLetter::new(
                env,
                e.reason(),
                e.field(),
                e.to_string(),
                self.max_message_bytes,
            ))),
        }
    }

    /// Forgets expired scores and updates the live precision/recall gauges.
    pub fn refresh_quality(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        self.quality.refresh(now, &self.metrics);
    }

    /// The metrics every stage updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The scoring network (shared with the scorer thread).
    pub fn model(&self) -> Arc<FastModel> {
        self.model.clone()
    }

    /// The alert threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Live cards.
    pub fn cards(&self) -> usize {
        self.store.len()
    }

    /// Evicts idle cards and those beyond the cap; returns how many.
    pub fn evict(&self) -> usize {
        self.store.evict()
    }

    /// Cards evicted so far.
    pub fn evicted(&self) -> u64 {
        self.store.evicted()
    }

    /// Parses, validates and windows one message. Never panics on input.
    pub fn ingest(&self, env: &Envelope) -> Ingested {
        let dead = |reason: &str, field: Option<&str>, error: String| {
            Ingested::Invalid(Box::new(DeadLetter::new(
                env,
                reason,
                field,
                error,
                self.max_message_bytes,
            )))
        };
        if env.payload.len() > self.max_message_bytes {
            let error = format!(
                "message of {} bytes exceeds the {} byte limit",
                env.payload.len(),
                self.max_message_bytes
            );
            return dead("oversized", None, error);
        }
        let map = match serde_json::from_slice::<Value>(&env.payload) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return dead(
                    "not_an_object",
                    None,
                    "message is JSON but not an object".into(),
                );
            }
            Err(e) => return dead("invalid_json", None, format!("invalid JSON: {e}")),
        };
        let tx = match self.spec.parse(&map) {
            Ok(tx) => tx,
            Err(e) => return dead(e.reason(), Some(e.field()), e.to_string()),
        };
        match self.store.observe_with_ids(&tx) {
            None => Ingested::Duplicate(Source::from(env)),
            Some((w, ids)) => Ingested::Window(Box::new(Pending {
                source: Source::from(env),
                timestamp_ms: env.timestamp_ms,
                transaction_id: tx.id,
                card_id: tx.key,
                ts: tx.ts,
                label: tx.label,
                len: w.len,
                window: w.data,
                window_ids: ids,
            })),
        }
    }

    /// Whether a decision alerts.
    pub fn alerts(&self, d: &Decision) -> bool {
        f64::from(d.score) >= self.threshold
    }

    /// The alert for a decision (whether or not it reaches the threshold).
    pub fn alert(&self, d: &Decision) -> Alert {
        let p = &d.pending;
        let mut order: Vec<usize> = (0..d.attention.len()).collect();
        order.sort_by(|&a, &b| d.attention[b].total_cmp(&d.attention[a]).then(b.cmp(&a)));
        let last = d.attention.len().saturating_sub(1);
        let top_attention = order
            .into_iter()
            .take(3)
            .filter(|&i| d.attention[i] > 0.0)
            .map(|i| AttentionRef {
                age: last - i,
                weight: d.attention[i],
                transaction_id: p
                    .window_ids
                    .get(i)
                    .cloned()
                    .flatten()
                    .map(|id| id.to_string()),
            })
            .collect();
        Alert {
            transaction_id: p.transaction_id.clone(),
            card_id: p.card_id.clone(),
            event_time: time_rfc3339(p.ts),
            score: d.score,
            threshold: self.threshold,
            model: self.model_ref.clone(),
            window_length: p.len,
            top_attention,
            detected_at: now_rfc3339(),
            source: p.source.clone(),
        }
    }

    /// The score record for a decision.
    pub fn score_record(&self, d: &Decision) -> ScoreRecord {
        let p = &d.pending;
        ScoreRecord {
            transaction_id: p.transaction_id.clone(),
            card_id: p.card_id.clone(),
            event_time: time_rfc3339(p.ts),
            score: d.score,
            alert: self.alerts(d),
            model_version: self.model_ref.version.clone(),
            source: p.source.clone(),
        }
    }
}

/// Sweeps idle and excess cards every second until the returned handle is aborted.
pub fn spawn_evictor(detector: Arc<Detector>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let n = detector.evict();
            detector.refresh_quality();
            let m = detector.metrics();
            m.evicted_cards.inc_by(n as u64);
            m.live_cards.set(detector.cards() as i64);
            if n > 0 {
                tracing::debug!(evicted = n, "evicted idle cards");
            }
        }
    })
}
