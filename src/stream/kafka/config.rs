//! Kafka settings: what the detector reads and writes, and librdkafka client configs with the
//! detector's defaults and the user's `--kafka key=value` overrides applied last.

use std::sync::Arc;

use rdkafka::ClientConfig;

use crate::stream::BatchSettings;

/// Where the detector reads and writes.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Consumer group id.
    pub group: String,
    /// Transactions topic.
    pub input_topic: String,
    /// Alerts topic.
    pub alerts_topic: String,
    /// Every score (optional).
    pub scores_topic: Option<String>,
    /// Dead letters (optional; always counted and logged).
    pub dead_letter_topic: Option<String>,
    /// Fraud labels (JSON `{transaction_id, is_fraud, labelled_at}`) joined to remembered scores
    /// for live precision and recall. Every instance reads every partition of it.
    pub labels_topic: Option<String>,
    /// Card-state changelog (compacted, partitioned like the input; see [`crate::state`]).
    pub changelog_topic: Option<String>,
    /// How long a card's changes are coalesced before its changelog record is written
    /// ([`crate::state::cache`]).
    pub changelog_flush: std::time::Duration,
    /// Static group membership (`group.instance.id`): a member that comes back within the
    /// session timeout gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// Exactly-once: outputs and consumed offsets in one Kafka transaction (see `txn`); None:
    /// at-least-once. The duration is how long a transaction stays open at most.
    pub exactly_once: Option<std::time::Duration>,
    /// Local snapshots of the card store (with a changelog): the directory, and how often.
    pub state_dir: Option<(std::path::PathBuf, std::time::Duration)>,
    /// librdkafka settings applied last (SASL, TLS, timeouts).
    pub extra: Vec<(String, String)>,
    /// Micro-batching.
    pub batch: BatchSettings,
    /// Notified whenever partitions are assigned (the benchmark waits on it).
    pub on_assigned: Option<Arc<tokio::sync::Notify>>,
}

impl KafkaSettings {
    /// Settings with no scores, dead-letter or labels topic, no overrides, default batching.
    pub fn new(brokers: &str, group: &str, input_topic: &str, alerts_topic: &str) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            group: group.into(),
            input_topic: input_topic.into(),
            alerts_topic: alerts_topic.into(),
            scores_topic: None,
            dead_letter_topic: None,
            labels_topic: None,
            changelog_topic: None,
            changelog_flush: crate::state::cache::DEFAULT_FLUSH_INTERVAL,
            instance_id: None,
            exactly_once: None,
            state_dir: None,
            extra: vec![],
            batch: BatchSettings::default(),
            on_assigned: None,
        }
    }
}

/// A detector wants records as they arrive, not in librdkafka's default half-second fetch
/// rounds: 20 ms bounds the wait on a quiet partition.
pub const FETCH_WAIT_MAX_MS: &str = "20";
/// librdkafka statistics (consumer lag, broker state) every 5 s: the lag gauge's resolution,
/// cheap for the client.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// Cooperative incremental rebalancing: a member joining or leaving moves only the partitions
/// that change owner; the others keep being consumed (and keep their cards) throughout.
pub const ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";
/// The producer waits up to 2 ms to fill a batch: a small share of the latency budget that
/// still batches under load.
pub const PRODUCER_LINGER_MS: &str = "2";

/// librdkafka's default `message.max.bytes`: the largest record the producer sends.
pub const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Room a dead letter needs besides its payload: the error (at most
/// [`crate::stream::records::MAX_ERROR_BYTES`]), the field names, topic and times, and the
/// record's framing.
pub const DEAD_LETTER_OVERHEAD_BYTES: usize = 4 << 10;

/// The largest record the producer will send (`message.max.bytes`, from `--kafka` or
/// librdkafka's default).
pub fn producer_message_limit(s: &KafkaSettings) -> usize {
    s.extra
        .iter()
        .rev()
        .find(|(k, _)| k == "message.max.bytes")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES)
}

/// Parses `key=value` (the `--kafka` option).
pub fn parse_kafka_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

/// A client config with the detector's defaults and the user's overrides last.
pub fn client_config(
    brokers: &str,
    extra: &[(String, String)],
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// The consumer group's config: at-least-once offsets (stored by the acknowledger, committed
/// by librdkafka), low fetch wait, statistics for lag and reachability.
pub fn consumer_config(s: &KafkaSettings) -> ClientConfig {
    let instance = s.instance_id.as_deref();
    let static_membership = instance.map(|id| ("group.instance.id", id));
    let defaults: Vec<(&str, &str)> = [
        ("group.id", s.group.as_str()),
        ("partition.assignment.strategy", ASSIGNMENT_STRATEGY),
        // Exactly-once commits offsets in its transactions, never on its own.
        (
            "enable.auto.commit",
            if s.exactly_once.is_some() {
                "false"
            } else {
                "true"
            },
        ),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS),
        ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ]
    .into_iter()
    .chain(static_membership)
    .collect();
    client_config(&s.brokers, &s.extra, &defaults)
}

/// The producer's config: idempotent, acknowledged by all in-sync replicas; with exactly-once,
/// transactional, its id stable per member (`{group}-{instance id}`) so that a restarted member
/// fences its previous incarnation and aborts what it left open.
pub fn producer_config(s: &KafkaSettings) -> ClientConfig {
    let mut defaults = vec![
        ("enable.idempotence", "true".to_string()),
        ("acks", "all".to_string()),
        ("linger.ms", PRODUCER_LINGER_MS.to_string()),
    ];
    if s.exactly_once.is_some() {
        defaults.push(("transactional.id", transactional_id(s)));
        defaults.push((
            "transaction.timeout.ms",
            super::txn::TRANSACTION_TIMEOUT_MS.to_string(),
        ));
    }
    let defaults: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
    client_config(&s.brokers, &s.extra, &defaults)
}

/// The member's transactional id: `{group}-{instance id}`, or without `--instance-id` one of
/// this process alone (a killed process's open transaction then ends by the broker's timeout).
pub fn transactional_id(s: &KafkaSettings) -> String {
    match &s.instance_id {
        Some(id) => format!("{}-{id}", s.group),
        None => {
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{}-p{}-{started}", s.group, std::process::id())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_come_last_and_settings_parse() {
        let mut s = KafkaSettings::new("b:9092", "g", "in", "out");
        s.extra = vec![
            parse_kafka_setting("fetch.wait.max.ms=100").unwrap(),
            parse_kafka_setting(" security.protocol =SASL_SSL").unwrap(),
        ];
        let c = consumer_config(&s);
        assert_eq!(c.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(producer_config(&s).get("enable.idempotence"), Some("true"));
        assert_eq!(producer_message_limit(&s), LIBRDKAFKA_MESSAGE_MAX_BYTES);
        s.extra
            .push(parse_kafka_setting("message.max.bytes=2000").unwrap());
        assert_eq!(producer_message_limit(&s), 2000);
        assert!(parse_kafka_setting("novalue").is_err());
        assert!(parse_kafka_setting("=x").is_err());
        assert_eq!(
            parse_kafka_setting("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
    }
}
