//! What enters and leaves the detector: envelopes in; alerts, score records and dead letters out.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// One input message with where it came from, whatever the transport.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The raw message (a JSON object).
    pub payload: Vec<u8>,
    /// Topic, or `file:PATH` / `stdin` for the embedded transport.
    pub topic: String,
    /// Partition (0 for files).
    pub partition: i32,
    /// Offset within the partition (the line number for files).
    pub offset: i64,
    /// When the message entered the transport (Kafka timestamp), milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The partition's assignment generation at read time (see [`Origin::generation`]).
    pub generation: u64,
}

/// Where a record came from, as alerts and dead letters report it (`source` in their JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Topic or file.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset (line number for files).
    pub offset: i64,
    /// The partition's assignment generation when the record was read: work from an earlier
    /// generation (the partition was revoked since) is dropped, not published. Not serialised.
    #[serde(skip)]
    pub generation: u64,
}

impl From<&Envelope> for Origin {
    fn from(e: &Envelope) -> Self {
        Origin {
            topic: e.topic.clone(),
            partition: e.partition,
            offset: e.offset,
            generation: e.generation,
        }
    }
}

/// Which model made a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Bundle name.
    pub name: String,
    /// Bundle version id.
    pub version: String,
    /// sha256 of the weights.
    pub sha256: String,
}

/// One of the transactions the model attended to most when it scored the current one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionRef {
    /// How many transactions before the current one (0 is the current transaction).
    pub age: usize,
    /// Attention weight (the current transaction's weights over its window sum to 1).
    pub weight: f32,
    /// That transaction's id, when the spec has one.
    pub transaction_id: Option<String>,
}

/// The alert published when a score reaches the threshold. Keyed by card id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The scored transaction.
    pub transaction_id: Option<String>,
    /// Its card.
    pub card_id: String,
    /// Its event time, RFC 3339 (UTC).
    pub event_time: String,
    /// Fraud score in [0, 1].
    pub score: f32,
    /// The model's alert threshold.
    pub threshold: f64,
    /// The model.
    pub model: ModelRef,
    /// Real transactions in the window (at most the window length).
    pub window_length: usize,
    /// The three window positions with the highest attention: which of the card's
    /// transactions the model looked at.
    pub top_attention: Vec<AttentionRef>,
    /// The features of this transaction that made it suspicious, most first (see
    /// [`crate::stream::explain`]).
    pub reasons: Vec<super::explain::Reason>,
    /// When the detector decided, RFC 3339.
    pub detected_at: String,
    /// Where the transaction was read.
    pub source: Origin,
}

/// Every score (optional output): the small record dashboards and audits need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    /// The scored transaction.
    pub transaction_id: Option<String>,
    /// Its card.
    pub card_id: String,
    /// Its event time, RFC 3339.
    pub event_time: String,
    /// Fraud score in [0, 1].
    pub score: f32,
    /// Whether it alerted.
    pub alert: bool,
    /// The model version.
    pub model_version: String,
    /// Where the transaction was read.
    pub source: Origin,
}

/// Reasons the detector itself gives, before the spec sees a field: the message is larger than
/// `--max-message-bytes`, is not JSON, or is JSON but not an object.
pub const TRANSPORT_REASONS: [&str; 3] = ["oversized", "invalid_json", "not_an_object"];

/// Every `reason` a dead letter (and `fraudstream_dead_letters_total`) can carry.
pub fn dead_letter_reasons() -> Vec<&'static str> {
    TRANSPORT_REASONS
        .iter()
        .chain(&crate::schema::SchemaError::REASONS)
        .chain(&crate::schema::LabelError::REASONS)
        .copied()
        .collect()
}

/// A record that could not be scored, with enough to find and replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The original message: text when it is UTF-8, else base64.
    pub payload: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    /// What was wrong, naming the field.
    pub error: String,
    /// Short reason (`invalid_json`, `not_an_object`, `oversized`, or a schema reason).
    pub reason: String,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// Topic or file.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset (line number for files).
    pub offset: i64,
    /// When it was dead-lettered, RFC 3339.
    pub at: String,
}

impl DeadLetter {
    /// Builds the dead letter of `env`. Oversized payloads are cut to `keep` bytes.
    pub fn new(
        env: &Envelope,
        reason: &str,
        field: Option<&str>,
        error: String,
        keep: usize,
    ) -> Self {
        let bytes = &env.payload[..env.payload.len().min(keep)];
        let (payload, payload_encoding) = match std::str::from_utf8(bytes) {
            Ok(s) => (s.to_string(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(bytes),
                "base64",
            ),
        };
        DeadLetter {
            payload,
            payload_encoding: payload_encoding.into(),
            error,
            reason: reason.into(),
            field: field.map(str::to_string),
            topic: env.topic.clone(),
            partition: env.partition,
            offset: env.offset,
            at: now_rfc3339(),
        }
    }
}

/// The current time, RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Event-time seconds as RFC 3339.
pub fn time_rfc3339(ts: f64) -> String {
    chrono::DateTime::from_timestamp_millis((ts * 1000.0).round() as i64).map_or_else(
        || ts.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}
