//! What enters and leaves the detector: envelopes in; alerts, score records and dead letters out.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// The version of the model that made the score.
    pub model_version: String,
    /// `champion` (its scores alert) or `challenger` (a shadow score: `alert` says whether it
    /// would have alerted).
    pub role: std::borrow::Cow<'static, str>,
    /// Where the transaction was read.
    pub source: Origin,
}

/// Reasons the detector itself gives, besides the spec's: the message is larger than
/// `--max-message-bytes`, is not JSON, or is JSON but not an object (before the spec sees a
/// field), or its transaction id belonged to another card recently.
pub const TRANSPORT_REASONS: [&str; 4] =
    ["oversized", "invalid_json", "not_an_object", "duplicate_id"];

/// Every `reason` a dead letter (and `fraudstream_dead_letters_total`) can carry.
pub fn dead_letter_reasons() -> Vec<&'static str> {
    TRANSPORT_REASONS
        .iter()
        .chain(&crate::schema::SchemaError::REASONS)
        .chain(&crate::schema::LabelError::REASONS)
        .copied()
        .collect()
}

/// The longest error text a dead letter carries: errors quote the offending value, which may be
/// as large as the message; a kilobyte names the problem.
pub const MAX_ERROR_BYTES: usize = 1024;

/// A record that could not be scored, with enough to find it and to recognise it. The payload is
/// the message's first bytes (at most the detector's dead-letter payload limit), so the dead
/// letter itself always fits under the broker's message limit; `payload_bytes` and
/// `payload_sha256` describe the whole message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The original message, or its first bytes: text when it is UTF-8, else base64.
    pub payload: String,
    /// `utf8` or `base64`.
    pub payload_encoding: String,
    /// Size of the whole original message in bytes.
    pub payload_bytes: usize,
    /// Whether `payload` is only a prefix of the message.
    pub payload_truncated: bool,
    /// SHA-256 of the whole original message, hex.
    pub payload_sha256: String,
    /// What was wrong, naming the field.
    pub error: String,
    /// Short reason (`invalid_json`, `not_an_object`, `oversized`, or a schema reason).
    pub reason: String,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// The card the record names, when it is an object with a card field (at most 256 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
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
    /// The same dead letter, naming the card of the record (cut to 256 bytes).
    pub fn with_card(mut self, card: Option<&serde_json::Value>) -> Self {
        self.card = card.and_then(|v| match v {
            serde_json::Value::String(s) => Some(cut_text(s.trim().to_string(), 256)),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        self
    }

    /// Builds the dead letter of `env`, its payload cut to at most `keep` bytes once encoded.
    pub fn new(
        env: &Envelope,
        reason: &str,
        field: Option<&str>,
        error: String,
        keep: usize,
    ) -> Self {
        let (payload, payload_encoding, kept) = encode_prefix(&env.payload, keep);
        DeadLetter {
            payload,
            payload_encoding: payload_encoding.into(),
            payload_bytes: env.payload.len(),
            payload_truncated: kept < env.payload.len(),
            payload_sha256: hex::encode(Sha256::digest(&env.payload)),
            error: cut_text(error, MAX_ERROR_BYTES),
            reason: reason.into(),
            field: field.map(str::to_string),
            card: None,
            topic: env.topic.clone(),
            partition: env.partition,
            offset: env.offset,
            at: now_rfc3339(),
        }
    }
}

/// The longest prefix of `bytes` that encodes in at most `keep` bytes: as text when that prefix
/// is UTF-8 (cut at a character boundary), else as base64 (4 bytes per 3). Returns the
/// encoding's name and how many of the message's bytes it holds.
fn encode_prefix(bytes: &[u8], keep: usize) -> (String, &'static str, usize) {
    let head = &bytes[..bytes.len().min(keep)];
    let text = match std::str::from_utf8(head) {
        Ok(s) => Some(s),
        // Our cut split the last character in two: keep the text before it.
        Err(e) if e.error_len().is_none() && head.len() < bytes.len() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(s) => (s.to_string(), "utf8", s.len()),
        None => {
            let raw = &bytes[..bytes.len().min(keep / 4 * 3)];
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            (encoded, "base64", raw.len())
        }
    }
}

/// `text` cut to at most `max` bytes at a character boundary, saying how long it was.
fn cut_text(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(payload: Vec<u8>) -> Envelope {
        Envelope {
            payload,
            topic: "t".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: None,
            generation: 0,
        }
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_large_text_message_keeps_a_prefix_its_size_and_the_hash_of_the_whole() {
        let payload = format!("{{\"amount\": \"{}\"}}", "é".repeat(600_000)).into_bytes();
        let error = format!("field `amount`: not a number: {:?}", "é".repeat(600_000));
        let d = DeadLetter::new(&env(payload.clone()), "not_a_number", None, error, 1001);
        assert_eq!(d.payload_encoding, "utf8");
        // "é" is 2 bytes: a cut at 1001 would split one, so the prefix stops before it.
        assert!(
            d.payload.len() <= 1001 && d.payload.len() >= 999,
            "{}",
            d.payload.len()
        );
        assert!(payload.starts_with(d.payload.as_bytes()));
        assert!(d.payload_truncated);
        assert_eq!(d.payload_bytes, payload.len());
        assert_eq!(d.payload_sha256, sha(&payload));
        assert!(d.error.len() < MAX_ERROR_BYTES + 40, "{}", d.error.len());
        assert!(d.error.ends_with("bytes in all)"), "{}", d.error);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.len() < 4_000, "{}", json.len());
    }

    #[test]
    fn binary_messages_are_cut_so_that_their_base64_fits() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
        let d = DeadLetter::new(
            &env(payload.clone()),
            "invalid_json",
            None,
            "x".into(),
            1000,
        );
        assert_eq!(d.payload_encoding, "base64");
        assert!(d.payload.len() <= 1000, "{}", d.payload.len());
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&d.payload)
            .unwrap();
        assert!(payload.starts_with(&decoded) && decoded.len() >= 740);
        assert!(d.payload_truncated);
        assert_eq!(d.payload_sha256, sha(&payload));
    }

    #[test]
    fn a_small_message_is_kept_whole() {
        let payload = b"{\"card_id\": 1}".to_vec();
        let d = DeadLetter::new(
            &env(payload.clone()),
            "not_a_number",
            None,
            "e".into(),
            1000,
        );
        assert_eq!(d.payload.as_bytes(), &payload[..]);
        assert!(!d.payload_truncated);
        assert_eq!(d.payload_bytes, payload.len());
        // Invalid UTF-8 at the very end of a short message is the message's, not our cut's.
        let odd = b"{\"a\": \"\xc3".to_vec();
        let d = DeadLetter::new(&env(odd.clone()), "invalid_json", None, "e".into(), 1000);
        assert_eq!(d.payload_encoding, "base64");
        assert!(!d.payload_truncated);
    }
}
