//! The Kafka transport: a consumer group on the input topic ([`KafkaSource`], with the
//! rebalance and statistics handling of [`GroupContext`]), an idempotent producer for alerts,
//! scores and dead letters ([`KafkaSink`]), the labels consumer, and topic administration.
//! [`run_kafka`] only wires them into [`crate::stream::run`].

mod admin;
mod config;
mod context;
mod labels;
mod produce;
mod sink;
mod source;
mod txn;

use std::future::Future;
use std::sync::Arc;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;

pub use admin::{AdminError, ensure_topics};
pub use config::{
    KafkaSettings, client_config, consumer_config, parse_kafka_setting, producer_config,
};
pub use context::{GroupContext, REVOKE_DRAIN_WAIT};
pub use produce::{InFlight, MAX_IN_FLIGHT, Pacer};
pub use sink::KafkaSink;
pub use source::KafkaSource;
pub use txn::{DEFAULT_TRANSACTION_INTERVAL, TRANSACTION_TIMEOUT_MS, Transactor};

use crate::state::Restorer;
use crate::stream::{Assignment, Detector, RunStats, StreamError};

fn setup(e: impl std::fmt::Display) -> StreamError {
    StreamError::Setup(e.to_string())
}

/// Runs the detector on Kafka until `shutdown` resolves, then drains, flushes and commits.
pub async fn run_kafka(
    detector: Arc<Detector>,
    s: KafkaSettings,
    shutdown: impl Future<Output = ()>,
    progress: impl FnMut(&RunStats),
) -> Result<RunStats, StreamError> {
    warn_if_dead_letters_may_not_fit(&detector, &s);
    let assignment = Arc::new(Assignment::default());
    let mut context =
        GroupContext::new(detector.clone(), assignment.clone(), s.on_assigned.clone());
    check_partitions(&s).await?;
    if let Some(topic) = &s.changelog_topic {
        let config = config::client_config(
            &s.brokers,
            &s.extra,
            &[("group.id", &format!("{}-restore", s.group))],
        );
        let mut restorer = Restorer::new(config, topic);
        if let Some((dir, _)) = &s.state_dir {
            restorer = restorer.with_snapshot(crate::state::snapshot::path(dir, &s.group));
        }
        context = context.with_restorer(restorer);
    }
    let producer: FutureProducer = config::producer_config(&s).create().map_err(setup)?;
    let transactor = match s.exactly_once {
        Some(interval) => {
            let p = producer.clone();
            let t = tokio::task::spawn_blocking(move || Transactor::new(p, interval))
                .await
                .map_err(StreamError::Task)?
                .map_err(setup)?;
            tracing::info!(
                transactional_id = %config::transactional_id(&s),
                interval_ms = interval.as_millis() as u64,
                "exactly-once: outputs and offsets in one transaction"
            );
            Some(Arc::new(t))
        }
        None => None,
    };
    if let Some(t) = &transactor {
        context = context.with_transactor(t.clone());
    }
    let consumer: Arc<StreamConsumer<GroupContext>> = Arc::new(
        config::consumer_config(&s)
            .create_with_context(context)
            .map_err(setup)?,
    );
    consumer.subscribe(&[&s.input_topic]).map_err(setup)?;
    // Dead letters of labels carry no offsets: outside any transaction. (Without exactly-once,
    // the sink's producer; held to the end, where it is closed.)
    let label_producer = if transactor.is_some() {
        let plain = KafkaSettings {
            exactly_once: None,
            ..s.clone()
        };
        config::producer_config(&plain).create().map_err(setup)?
    } else {
        producer.clone()
    };
    let labels = match &s.labels_topic {
        Some(topic) => Some(
            labels::spawn_labels(detector.clone(), &s, topic, label_producer.clone())
                .map_err(setup)?,
        ),
        None => None,
    };
    let restored = labels.as_ref().map(|l| l.restored.clone());
    let mut source = KafkaSource::new(consumer.clone(), assignment, restored, transactor.is_some());
    let snapshots = match (&s.state_dir, &s.changelog_topic) {
        (Some((dir, every)), Some(_)) => {
            let path = crate::state::snapshot::path(dir, &s.group);
            let final_one = (detector.clone(), path.clone());
            source = source.before_close(Box::new(move || {
                write_snapshot(&final_one.0, &final_one.1);
            }));
            Some(spawn_snapshots(detector.clone(), path, *every))
        }
        (Some(_), None) => {
            tracing::warn!(
                "--state-dir without --changelog-topic: no snapshots (they start from the changelog)"
            );
            None
        }
        _ => None,
    };
    let mut sink = KafkaSink::new(
        producer,
        s.alerts_topic.clone(),
        s.scores_topic.clone(),
        s.dead_letter_topic.clone(),
    );
    if let Some(topic) = &s.changelog_topic {
        sink = sink.with_changelog(topic.clone(), s.changelog_flush, detector.metrics().clone());
    }
    if let Some(t) = transactor {
        sink = sink.with_transactions(t, consumer.clone());
    }
    let stats = crate::stream::run(detector, source, sink, s.batch, shutdown, progress).await;
    let mut clients: Vec<Closing> = Vec::new();
    if let Some(l) = labels {
        l.task.abort();
        // Resolves once the task's future (and its clones of the clients) is dropped: at its
        // next await, at once.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), l.task).await;
        clients.push(("labels consumer", Box::new(l.consumer)));
    }
    if let Some(t) = snapshots {
        t.abort();
    }
    // The consumer leaves the group and the producer is destroyed here, bounded: both are held
    // to the end for that (the source, the sink and the tasks that held clones are gone by now).
    // After a drain timeout the source was left as it was, holding its clone.
    let others = Arc::strong_count(&consumer) - 1;
    if others > 0 && stats.is_ok() {
        tracing::warn!(
            others,
            "the consumer is still referenced elsewhere: it leaves the group when the last \
             reference goes, without the close timeout"
        );
    }
    clients.push(("consumer", Box::new(consumer)));
    clients.push(("producer", Box::new(label_producer)));
    close_clients(clients, CLOSE_TIMEOUT).await;
    stats
}

/// How long closing the clients at the end may take, all of them together (leaving the group,
/// destroying the producers): offsets are already committed, so a close that waits on a
/// rebalance the broker does not finish, or on a broker that stopped answering, is given up (the
/// broker expires the membership after `session.timeout.ms`) rather than holding the process
/// past its shutdown deadline.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client whose last reference is dropped at the end (which closes it: librdkafka's
/// `rd_kafka_consumer_close` and `rd_kafka_destroy` block until the broker answers or the
/// client gives up).
type Closing = (&'static str, Box<dyn Send>);

/// Closes `clients` (their last references), each on its own thread, waiting at most `timeout`
/// for all of them together. The wait does not depend on the runtime's timers (it blocks a
/// blocking-pool thread on a channel), so a runtime whose workers are busy cannot stretch it.
/// Each close is logged with its duration; one not finished in time is logged and left behind.
async fn close_clients(clients: Vec<Closing>, timeout: std::time::Duration) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let names: Vec<&'static str> = clients.iter().map(|c| c.0).collect();
    let began = std::time::Instant::now();
    for (name, client) in clients {
        let done = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("close-{name}"))
            .spawn(move || {
                drop(client);
                let _ = done.send(name);
            });
        if let Err(e) = spawned {
            tracing::warn!("closing the {name}: no thread for it ({e}); left open");
        }
    }
    drop(done_tx);
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = began + timeout;
        let mut closed = Vec::new();
        while closed.len() < names.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match done_rx.recv_timeout(left) {
                Ok(name) => {
                    tracing::info!(seconds = began.elapsed().as_secs_f64(), "{name} closed");
                    closed.push(name);
                }
                Err(_) => break,
            }
        }
        names
            .into_iter()
            .filter(|n| !closed.contains(n))
            .collect::<Vec<_>>()
    })
    .await;
    match waited {
        Ok(open) => {
            for name in open {
                tracing::warn!(
                    timeout_s = timeout.as_secs_f64(),
                    "the {name} did not close in time: left behind (offsets are committed; the \
                     broker expires a membership after the session timeout)"
                );
            }
        }
        Err(e) => tracing::warn!("closing the Kafka clients: {e}"),
    }
}

/// Writes a snapshot of the card store (blocking: call off the reactor), counted and logged.
fn write_snapshot(detector: &Detector, path: &std::path::Path) {
    let began = std::time::Instant::now();
    let snapshot = detector.snapshot();
    let m = detector.metrics();
    match crate::state::snapshot::write(path, &snapshot) {
        Ok(bytes) => {
            m.snapshots.with_label_values(&["written"]).inc();
            m.snapshot_bytes.set(bytes as i64);
            tracing::info!(
                path = %path.display(),
                cards = snapshot.cards.len(),
                bytes,
                seconds = began.elapsed().as_secs_f64(),
                "card store snapshot written"
            );
        }
        Err(e) => {
            m.snapshots.with_label_values(&["failed"]).inc();
            tracing::error!("writing the card store snapshot: {e}");
        }
    }
}

/// Writes a snapshot every `every` until aborted.
fn spawn_snapshots(
    detector: Arc<Detector>,
    path: std::path::PathBuf,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            // Before the first assignment (and its restore) the store is empty: writing it would
            // replace a useful snapshot with nothing.
            if !detector.holds_any() {
                continue;
            }
            let (d, p) = (detector.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || write_snapshot(&d, &p)).await;
        }
    })
}

/// How long start-up metadata requests may take.
const METADATA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Topics keyed by card must have the input's partition count: a card's state lives in its input
/// partition's changelog partition, and its labels in the same partition of the labels topic.
/// A missing changelog is an error; a missing labels topic is waited for (see `labels`).
async fn check_partitions(s: &KafkaSettings) -> Result<(), StreamError> {
    use rdkafka::producer::Producer;
    let config = config::client_config(&s.brokers, &s.extra, &[]);
    let (input, changelog, labels) = (
        s.input_topic.clone(),
        s.changelog_topic.clone(),
        s.labels_topic.clone(),
    );
    if changelog.is_none() && labels.is_none() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::producer::BaseProducer = config.create().map_err(setup)?;
        let count = |topic: &str| -> Result<Option<usize>, StreamError> {
            let meta = client
                .client()
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                .map_err(|e| setup(format!("metadata of topic {topic}: {e}")))?;
            let t = meta.topics().iter().find(|t| t.name() == topic);
            Ok(match t {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    Some(t.partitions().len())
                }
                _ => None,
            })
        };
        let n = count(&input)?.ok_or_else(|| setup(format!("topic {input} does not exist")))?;
        let mismatch = |topic: &str, m: usize, why: &str| {
            setup(format!(
                "{topic} has {m} partitions but input topic {input} has {n}: they must match \
                 ({why})"
            ))
        };
        if let Some(topic) = &changelog {
            let m = count(topic)?.ok_or_else(|| {
                setup(format!(
                    "changelog topic {topic} does not exist: create it with {n} partitions (the \
                     input's) and cleanup.policy=compact (see deploy/)"
                ))
            })?;
            if m != n {
                let why = "a card's state lives in its input partition's changelog partition";
                return Err(mismatch(&format!("changelog topic {topic}"), m, why));
            }
        }
        if let Some(topic) = &labels
            && let Some(m) = count(topic)?
            && m != n
        {
            let why = "labels are keyed by card, and each member joins the labels of the \
                       partitions it holds";
            return Err(mismatch(&format!("labels topic {topic}"), m, why));
        }
        Ok(())
    })
    .await
    .map_err(StreamError::Task)?
}

/// A dead letter larger than the producer's limit is never delivered (its record's offset is then
/// never stored, and the partition stops committing): say so at start-up rather than at the
/// first bad record.
fn warn_if_dead_letters_may_not_fit(detector: &Detector, s: &KafkaSettings) {
    let limit = config::producer_message_limit(s);
    let largest =
        detector.settings().max_dead_letter_payload_bytes + config::DEAD_LETTER_OVERHEAD_BYTES;
    if s.dead_letter_topic.is_some() && largest > limit {
        tracing::warn!(
            "dead letters may reach {largest} bytes but the producer's message.max.bytes is \
             {limit}: lower --max-dead-letter-payload-bytes; an undeliverable dead letter \
             stops its partition's offsets"
        );
    }
}
