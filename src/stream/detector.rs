//! The per-record logic of the detector, independent of transport: parse and validate a message,
//! update its card's window (`ingest`), and say what a score means (alert or not).

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::explain::{Explainer, Reason};
use super::ids::RecentIds;
use super::lineup::{Lineup, Models, Scorer};
use super::records::{
    Alert, AttentionRef, DeadLetter, Envelope, Origin, ScoreRecord, now_rfc3339, time_rfc3339,
};
use super::watermark::{TimeLimits, Watermarks};
use crate::features::{CardStore, StateLimits, wall_clock};
use crate::model::{Bundle, FastModel};
use crate::observe::{Joined, LiveQuality, Metrics, QualitySettings, Role, Verdicts};
use crate::schema::{FeatureSpec, Transaction};
use crate::state;

/// Messages larger than this are dead-lettered unparsed (1 MiB, Kafka's default
/// `message.max.bytes`: nothing larger reaches a default topic anyway).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A dead letter carries at most this many bytes of its message (64 KiB: enough to read what
/// was wrong, small enough that a dead letter always fits under a broker's message limit,
/// 1 MB by default; the whole message's size and SHA-256 are in the dead letter too).
pub const DEFAULT_MAX_DEAD_LETTER_PAYLOAD_BYTES: usize = 64 << 10;

/// How many of the attended transactions an alert names: enough for an analyst to look at,
/// few enough to read at a glance.
pub const TOP_ATTENTION: usize = 3;

/// What the detector keeps and accepts, besides its model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorSettings {
    /// Larger messages are dead-lettered without parsing.
    pub max_message_bytes: usize,
    /// A dead letter keeps at most this many bytes of its message.
    pub max_dead_letter_payload_bytes: usize,
    /// How many cards' windows are kept, and for how long.
    pub limits: StateLimits,
    /// Scores remembered for labels from a labels topic (`max_scores` 0: only inline labels).
    pub quality: QualitySettings,
    /// Event times accepted around each partition's watermark.
    pub time: TimeLimits,
    /// Whether each card's new state is written to a changelog (see [`crate::state`]).
    pub changelog: bool,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        DetectorSettings {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_dead_letter_payload_bytes: DEFAULT_MAX_DEAD_LETTER_PAYLOAD_BYTES,
            limits: StateLimits::default(),
            quality: QualitySettings {
                max_scores: 0,
                ..QualitySettings::default()
            },
            time: TimeLimits::default(),
            changelog: false,
        }
    }
}

/// A transaction whose window is ready to score.
#[derive(Debug, Clone)]
pub struct Pending {
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
    pub window_ids: Vec<Option<Arc<str>>>,
    /// The current transaction's raw features (for an alert's reasons).
    pub raw: Vec<f64>,
    /// The card's state after this transaction, as a changelog record (when the detector
    /// writes a changelog).
    pub state: Option<Vec<u8>>,
}

/// What one input message became.
#[derive(Debug, Clone)]
pub enum Ingest {
    /// Ready to score.
    Window(Box<Pending>),
    /// Bad input: publish this dead letter and move on.
    Invalid(Box<DeadLetter>),
    /// A redelivered transaction already in its card's window: nothing to do.
    Duplicate,
}

/// An ingested message with where and when it came from.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Where it was read (and under which assignment generation).
    pub origin: Origin,
    /// Transport timestamp (ms), for end-to-end latency.
    pub timestamp_ms: Option<i64>,
    /// When it was ingested, for latency when there is no transport timestamp.
    pub at: Instant,
    /// What it became.
    pub kind: Ingest,
}

/// What a label from the labels topic is to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelUse {
    /// History read at start-up to restore the label tables: not joined.
    History,
    /// A label of a card this instance scores: joined to its score.
    Live,
    /// A label of a card another instance scores (its partition is not held here): it feeds
    /// the tables, the other instance joins it.
    Elsewhere,
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
    /// For an alert: the features that made it suspicious.
    pub reasons: Vec<Reason>,
    /// The models that scored it: the champion made `score`, the challenger (if any)
    /// `challenger_score`.
    pub lineup: Arc<Lineup>,
    /// The shadow challenger's score.
    pub challenger_score: Option<f32>,
}

impl Decision {
    /// Whether the champion's score alerts.
    pub fn alerts(&self) -> bool {
        f64::from(self.score) >= self.lineup.champion.threshold
    }

    /// What each model decided, for live quality.
    pub fn verdicts(&self) -> Verdicts {
        Verdicts {
            champion: (self.lineup.champion.version.clone(), self.alerts()),
            challenger: self
                .lineup
                .challenger
                .as_ref()
                .zip(self.challenger_score)
                .map(|(c, score)| (c.version.clone(), f64::from(score) >= c.threshold)),
        }
    }
}

/// Card state plus model: everything needed to go from a message to a decision, and the live
/// quality that labels update.
#[derive(Debug)]
pub struct Detector {
    spec: FeatureSpec,
    store: CardStore,
    /// The models scoring now (champion and challenger), replaced between batches.
    models: Arc<Models>,
    /// One model change at a time.
    swapping: std::sync::Mutex<()>,
    settings: DetectorSettings,
    metrics: Arc<Metrics>,
    quality: LiveQuality,
    /// Which card each recent transaction id belonged to.
    recent_ids: RecentIds,
    /// Each input partition's latest accepted event time.
    watermarks: Watermarks,
    /// The window recipe's fingerprint, stamped on changelog records.
    recipe: u64,
    /// Input partitions held (None: all).
    held: std::sync::RwLock<Option<std::collections::HashSet<i32>>>,
    /// The last input offset ingested per partition (what a snapshot covers).
    ingested: std::sync::Mutex<std::collections::HashMap<i32, i64>>,
}

impl Detector {
    /// A detector for a loaded bundle.
    pub fn new(bundle: &Bundle, settings: DetectorSettings, metrics: Arc<Metrics>) -> Self {
        let m = &bundle.manifest;
        let builder = bundle.window_builder();
        let champion =
            Scorer::for_bundle(bundle, &builder, None).expect("a bundle reads its own windows");
        model_info(&metrics, &champion, Role::Champion, 1.0);
        Detector {
            spec: m.spec.clone(),
            store: CardStore::with_limits(builder, settings.limits, wall_clock()),
            models: Arc::new(Models::new(Lineup {
                champion,
                challenger: None,
            })),
            swapping: std::sync::Mutex::default(),
            settings,
            metrics,
            quality: LiveQuality::new(settings.quality),
            recent_ids: RecentIds::default(),
            watermarks: Watermarks::new(settings.time),
            recipe: bundle.window_builder().fingerprint(),
            held: std::sync::RwLock::new(None),
            ingested: std::sync::Mutex::default(),
        }
    }

    /// The metrics every stage updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Live precision and recall from labels.
    pub fn quality(&self) -> &LiveQuality {
        &self.quality
    }

    /// The champion's network (shared with the scorer thread, not copied).
    pub fn model(&self) -> Arc<FastModel> {
        self.models.current().champion.model.clone()
    }

    /// How the champion's alerts are explained.
    pub fn explainer(&self) -> Arc<Explainer> {
        self.models.current().champion.explainer.clone()
    }

    /// The champion's alert threshold.
    pub fn threshold(&self) -> f64 {
        self.models.current().champion.threshold
    }

    /// The models scoring now; the scoring loop reads the lineup once per batch.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// Puts a bundle in a role while the detector runs: `bundle` None removes the challenger.
    /// The bundle must read the cards' windows (same features, a window no longer than the
    /// store's; another scaler is fine: windows are re-scaled for it). The next batch scores
    /// with it; card state is kept. A bundle that cannot is refused, counted and the lineup
    /// left as it was. Returns the new lineup.
    pub fn install(
        &self,
        role: Role,
        bundle: Option<(&Bundle, Option<std::path::PathBuf>)>,
    ) -> Result<Arc<Lineup>, String> {
        let _one = self.swapping.lock().expect("swap lock");
        let scorer = match bundle {
            Some((b, dir)) => match Scorer::for_bundle(b, self.store.builder(), dir) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.refuse(role, &e);
                    return Err(e);
                }
            },
            None if role == Role::Champion => {
                return Err("the champion cannot be removed, only replaced".into());
            }
            None => None,
        };
        let mut lineup = (*self.models.current()).clone();
        match role {
            Role::Champion => lineup.champion = scorer.expect("a champion"),
            Role::Challenger => lineup.challenger = scorer,
        }
        Ok(self.put(lineup, role))
    }

    /// The challenger becomes the champion (and there is no challenger any more).
    pub fn promote(&self) -> Result<Arc<Lineup>, String> {
        let _one = self.swapping.lock().expect("swap lock");
        let mut lineup = (*self.models.current()).clone();
        let Some(challenger) = lineup.challenger.take() else {
            let e = "no challenger to promote".to_string();
            self.refuse(Role::Champion, &e);
            return Err(e);
        };
        lineup.champion = challenger;
        Ok(self.put(lineup, Role::Champion))
    }

    /// Logs and counts a bundle that was not put in `role` (the running lineup stays).
    pub fn refuse(&self, role: Role, reason: &str) {
        tracing::error!(
            role = role.as_str(),
            "model refused, the running one keeps scoring: {reason}"
        );
        self.metrics
            .model_reloads
            .with_label_values(&[role.as_str(), "refused"])
            .inc();
    }

    fn put(&self, lineup: Lineup, role: Role) -> Arc<Lineup> {
        let old = self.models.replace(lineup);
        let new = self.models.current();
        for (r, before, after) in [
            (Role::Champion, Some(&old.champion), Some(&new.champion)),
            (
                Role::Challenger,
                old.challenger.as_ref(),
                new.challenger.as_ref(),
            ),
        ] {
            if let Some(b) = before {
                model_info(&self.metrics, b, r, f64::NAN);
            }
            if let Some(a) = after {
                model_info(&self.metrics, a, r, 1.0);
            }
        }
        self.metrics
            .model_reloads
            .with_label_values(&[role.as_str(), "loaded"])
            .inc();
        let s = match role {
            Role::Champion => Some(&new.champion),
            Role::Challenger => new.challenger.as_ref(),
        };
        match s {
            Some(s) => tracing::info!(
                role = role.as_str(),
                model = %s.model_ref.name,
                version = %s.model_ref.version,
                threshold = s.threshold,
                rescaled = s.adapt.is_some(),
                "model in place: the next batch scores with it, card state kept"
            ),
            None => tracing::info!(role = role.as_str(), "challenger removed"),
        }
        new
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &DetectorSettings {
        &self.settings
    }

    /// Live cards.
    pub fn cards(&self) -> usize {
        self.store.len()
    }

    /// Warms card windows and label tables from a labelled, time-sorted history (see
    /// [`CardStore::warm`]); returns (transactions, labels).
    pub fn warm(&self, sorted: &[Transaction], label_delay: crate::schema::Span) -> (usize, usize) {
        self.store.warm(sorted, label_delay)
    }

    /// The spec records are parsed with.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// Key values held in the label-rate tables, and labels taken in.
    pub fn label_state(&self) -> (usize, u64) {
        let t = self.store.tables();
        (t.keys(), t.applied())
    }

    /// Evicts idle cards and those beyond the cap; returns how many.
    pub fn evict(&self) -> usize {
        self.store.evict()
    }

    /// Cards evicted so far, by the sweep or by the cap.
    pub fn evicted(&self) -> u64 {
        self.store.evicted()
    }

    /// Brings the card gauges up to date: live cards, and evictions (by the sweep or the cap)
    /// counted from the store's own total.
    pub fn sync_card_metrics(&self) {
        let m = &self.metrics;
        m.evicted_cards
            .inc_by(self.evicted().saturating_sub(m.evicted_cards.get()));
        m.live_cards.set(self.cards() as i64);
        m.label_keys.set(self.store.tables().keys() as i64);
    }

    /// Forgets the cards read from these input partitions (revoked: their next owner keeps
    /// them). A card whose transactions come back later starts from an empty window rather than
    /// one holding transactions whose outputs were dropped.
    pub fn forget_partitions(&self, partitions: &[i32]) -> usize {
        self.watermarks.forget(partitions);
        let mut ingested = self.ingested.lock().expect("ingested lock");
        for p in partitions {
            ingested.remove(p);
        }
        drop(ingested);
        self.store.forget_shards(partitions)
    }

    /// The store's window recipe (what restored card states must have been written with).
    pub fn window_builder(&self) -> &crate::features::WindowBuilder {
        self.store.builder()
    }

    /// Every card's state as its changelog record, with the input offsets covered: what
    /// `--state-dir` keeps (see [`state::snapshot`]). The offsets are read after the cards, so
    /// every card's record is at or below them.
    pub fn snapshot(&self) -> state::Snapshot {
        let created_ms = chrono::Utc::now().timestamp_millis();
        let mut cards = Vec::with_capacity(self.store.len());
        self.store.for_each_card(|key, card| {
            cards.push(state::SnapshotCard {
                key: key.to_string(),
                shard: card.shard,
                // The snapshot's `covered` offsets say which input it reflects.
                record: state::encode(card, self.recipe, -1),
            });
        });
        let covered = self.ingested.lock().expect("ingested lock").clone();
        state::Snapshot {
            created_ms,
            recipe: self.recipe,
            covered,
            cards,
        }
    }

    /// Puts cards restored from the changelog in place and counts them.
    pub fn restore_cards(&self, cards: Vec<(String, crate::features::CardState)>) {
        self.metrics.restored_cards.inc_by(cards.len() as u64);
        self.store.restore(cards);
        self.sync_card_metrics();
    }

    /// Parses, validates and windows one message. Never panics on input.
    pub fn ingest(&self, env: &Envelope) -> Ingested {
        Ingested {
            origin: Origin::from(env),
            timestamp_ms: env.timestamp_ms,
            at: Instant::now(),
            kind: self.window(env),
        }
    }

    fn window(&self, env: &Envelope) -> Ingest {
        if self.settings.changelog {
            let mut ingested = self.ingested.lock().expect("ingested lock");
            let last = ingested.entry(env.partition).or_insert(env.offset);
            *last = (*last).max(env.offset);
        }
        let limit = self.settings.max_message_bytes;
        let keep = self.settings.max_dead_letter_payload_bytes;
        let dead = |reason: &str, field: Option<&str>, error: String| {
            Ingest::Invalid(Box::new(DeadLetter::new(env, reason, field, error, keep)))
        };
        if env.payload.len() > limit {
            let error = format!(
                "message of {} bytes exceeds the {limit} byte limit",
                env.payload.len()
            );
            return dead("oversized", None, error);
        }
        let map = match serde_json::from_slice::<Value>(&env.payload) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                let error = "message is JSON but not an object".to_string();
                return dead("not_an_object", None, error);
            }
            Err(e) => return dead("invalid_json", None, format!("invalid JSON: {e}")),
        };
        let card = self.spec.key.as_deref().and_then(|k| map.get(k));
        let dead =
            |reason: &str, field: Option<&str>, error: String| match dead(reason, field, error) {
                Ingest::Invalid(d) => Ingest::Invalid(Box::new(d.with_card(card))),
                other => other,
            };
        let tx = match self.spec.parse(&map) {
            Ok(tx) => tx,
            Err(e) => return dead(e.reason(), Some(e.field()), e.to_string()),
        };
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        if let Err(out) = self.watermarks.admit(env.partition, tx.ts, now) {
            let field = &self.spec.time;
            let error = out.describe(field, tx.ts, env.partition);
            return dead("ts_out_of_range", Some(field), error);
        }
        if let (Some(id), Some(field)) = (&tx.id, &self.spec.id)
            && !self.recent_ids.claim(id, &tx.key)
        {
            // Ids are at most MAX_KEY_BYTES long: quoting one keeps the error short.
            let error = format!("field `{field}`: transaction id {id:?} belongs to another card");
            return dead("duplicate_id", Some(field), error);
        }
        match self.store.observe_with_ids(&tx, env.partition) {
            None => Ingest::Duplicate,
            Some((w, ids)) => Ingest::Window(Box::new(Pending {
                state: self.settings.changelog.then(|| {
                    let encode = |c: &_| state::encode(c, self.recipe, env.offset);
                    self.store.with_card(&tx.key, encode).unwrap_or_default()
                }),
                transaction_id: tx.id,
                card_id: tx.key,
                ts: tx.ts,
                label: tx.label,
                len: w.len,
                window: w.data,
                window_ids: ids,
                raw: w.raw,
            })),
        }
    }

    /// Parses a message of the labels topic, feeds the label-rate tables (when the spec has
    /// label-rate features) and joins it to its score for live quality; a bad label comes back
    /// as the dead letter to publish. A label without `labelled_at` is known from now.
    pub fn label(&self, env: &Envelope) -> Result<Joined, Box<DeadLetter>> {
        self.label_at(env, LabelUse::Live)
    }

    /// Which input partitions this instance holds (None: all of them, as in file mode). Labels
    /// follow the cards: a label from another partition is another instance's to join.
    pub fn set_held(&self, partitions: Option<std::collections::HashSet<i32>>) {
        *self.held.write().expect("held lock") = partitions;
    }

    /// Whether this instance holds some input partition of a consumer group (a snapshot taken
    /// before the first assignment would hold nothing).
    pub fn holds_any(&self) -> bool {
        matches!(&*self.held.read().expect("held lock"), Some(h) if !h.is_empty())
    }

    /// Whether this instance holds input partition `p` (and so joins its labels).
    pub fn holds(&self, p: i32) -> bool {
        self.held
            .read()
            .expect("held lock")
            .as_ref()
            .is_none_or(|h| h.contains(&p))
    }

    /// Like [`Detector::label`], saying what the label is to this process: history read at
    /// start-up and labels of cards another instance scores feed the tables but are not joined
    /// to scores (this process made none for them).
    pub fn label_at(&self, env: &Envelope, use_: LabelUse) -> Result<Joined, Box<DeadLetter>> {
        match self.spec.parse_label(&env.payload) {
            Ok(label) => {
                let now = chrono::Utc::now().timestamp_millis();
                if let Some(event) = label.event(now as f64 / 1000.0) {
                    self.store.label(&event);
                }
                let source = match use_ {
                    LabelUse::Live => return Ok(self.quality.label(&label, now, &self.metrics)),
                    LabelUse::History => "history",
                    LabelUse::Elsewhere => "elsewhere",
                };
                self.metrics.labels.with_label_values(&[source]).inc();
                Ok(Joined::Unmatched)
            }
            Err(e) => Err(Box::new(DeadLetter::new(
                env,
                e.reason(),
                e.field(),
                e.to_string(),
                self.settings.max_dead_letter_payload_bytes,
            ))),
        }
    }

    /// Whether a decision alerts.
    pub fn alerts(&self, d: &Decision) -> bool {
        d.alerts()
    }

    /// The alert for a decision (whether or not it reaches the threshold).
    pub fn alert(&self, d: &Decision, origin: &Origin) -> Alert {
        let p = &d.pending;
        let mut order: Vec<usize> = (0..d.attention.len()).collect();
        order.sort_by(|&a, &b| d.attention[b].total_cmp(&d.attention[a]).then(b.cmp(&a)));
        let last = d.attention.len().saturating_sub(1);
        // A champion with a shorter window than the store's attends to its last rows.
        let skip = p.window_ids.len().saturating_sub(d.attention.len());
        let top_attention = order
            .into_iter()
            .take(TOP_ATTENTION)
            .filter(|&i| d.attention[i] > 0.0)
            .map(|i| AttentionRef {
                age: last - i,
                weight: d.attention[i],
                transaction_id: p
                    .window_ids
                    .get(skip + i)
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
            threshold: d.lineup.champion.threshold,
            model: d.lineup.champion.model_ref.clone(),
            window_length: p.len,
            top_attention,
            reasons: d.reasons.clone(),
            detected_at: now_rfc3339(),
            source: origin.clone(),
        }
    }

    /// The score record for a decision.
    pub fn score_record(&self, d: &Decision, origin: &Origin) -> ScoreRecord {
        let p = &d.pending;
        ScoreRecord {
            transaction_id: p.transaction_id.clone(),
            card_id: p.card_id.clone(),
            event_time: time_rfc3339(p.ts),
            score: d.score,
            alert: self.alerts(d),
            model_version: d.lineup.champion.model_ref.version.clone(),
            role: Role::Champion.as_str().into(),
            source: origin.clone(),
        }
    }

    /// The challenger's score record for a decision (tagged `challenger`; it never alerts:
    /// `alert` says whether it would have).
    pub fn challenger_record(&self, d: &Decision, origin: &Origin) -> Option<ScoreRecord> {
        let (c, score) = d.lineup.challenger.as_ref().zip(d.challenger_score)?;
        let p = &d.pending;
        Some(ScoreRecord {
            transaction_id: p.transaction_id.clone(),
            card_id: p.card_id.clone(),
            event_time: time_rfc3339(p.ts),
            score,
            alert: f64::from(score) >= c.threshold,
            model_version: c.model_ref.version.clone(),
            role: Role::Challenger.as_str().into(),
            source: origin.clone(),
        })
    }
}

/// Marks a model in `fraudstream_model_info` (1: in use; NaN: removes its series).
fn model_info(m: &Metrics, s: &Scorer, role: Role, value: f64) {
    let labels = [
        s.model_ref.name.as_str(),
        s.model_ref.version.as_str(),
        &s.threshold.to_string(),
        role.as_str(),
    ];
    if value.is_nan() {
        let _ = m.model_info.remove_label_values(&labels);
    } else {
        m.model_info.with_label_values(&labels).set(value);
    }
}

/// How often idle and excess cards are swept and the live-quality gauges refreshed.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sweeps idle and excess cards and refreshes live quality every [`SWEEP_EVERY`] until the
/// returned handle is aborted. Evictions are counted from the store's own total, so those the
/// cap makes between sweeps count too.
pub fn spawn_evictor(detector: Arc<Detector>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            let n = detector.evict();
            let m = detector.metrics();
            detector
                .quality
                .refresh(chrono::Utc::now().timestamp_millis(), m);
            detector.sync_card_metrics();
            if n > 0 {
                tracing::debug!(evicted = n, "evicted idle cards");
            }
        }
    })
}
