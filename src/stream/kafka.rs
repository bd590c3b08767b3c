//! The Kafka transport: a consumer group on the input topic, an idempotent producer for alerts,
//! scores and dead letters, and at-least-once offsets.
//!
//! Offsets: `enable.auto.commit=true` with `enable.auto.offset.store=false`. Outcomes leave the
//! scorer in consumption order, so the acknowledger awaits each message's deliveries in that
//! order and only then stores its offset: a stored offset always has its alert (and every
//! earlier message of the partition) acknowledged by the broker. Stored offsets are committed
//! synchronously when partitions are revoked and on shutdown.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Message};
use tokio::sync::mpsc;

use super::batcher::{BatchSettings, Outcome, score_loop};
use super::detector::{Detector, spawn_evictor};
use super::records::{Envelope, Source};
use super::stats::{RunStats, latency};

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
    /// librdkafka settings applied last (SASL, TLS, timeouts).
    pub extra: Vec<(String, String)>,
    /// Micro-batching.
    pub batch: BatchSettings,
    /// Notified whenever partitions are assigned (readiness; the benchmark waits on it).
    pub on_assigned: Option<Arc<tokio::sync::Notify>>,
}

impl KafkaSettings {
    /// Settings with no scores or dead-letter topic, no overrides and default batching.
    pub fn new(brokers: &str, group: &str, input_topic: &str, alerts_topic: &str) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            group: group.into(),
            input_topic: input_topic.into(),
            alerts_topic: alerts_topic.into(),
            scores_topic: None,
            dead_letter_topic: None,
            labels_topic: None,
            extra: vec![],
            batch: BatchSettings::default(),
            on_assigned: None,
        }
    }
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

/// Commits stored offsets before partitions are taken away, so the next owner starts after
/// everything this instance acknowledged.
struct CommitOnRevoke {
    on_assigned: Option<Arc<tokio::sync::Notify>>,
    metrics: Arc<crate::observe::Metrics>,
}

impl ClientContext for CommitOnRevoke {
    /// Broker reachability and consumer lag per assigned partition, from librdkafka's statistics
    /// (`statistics.interval.ms`): behind the stored offset when one is stored, else behind the
    /// committed one. Partitions with no known lag (not assigned here) are removed.
    fn stats(&self, stats: rdkafka::Statistics) {
        // Readiness needs a reachable broker: some connection in state UP.
        let up = stats.brokers.values().any(|b| b.state == "UP");
        if up != self.metrics.is_broker_reachable() {
            tracing::warn!(up, "broker reachability changed");
        }
        self.metrics.set_broker_reachable(up);
        for (topic, t) in &stats.topics {
            for p in t.partitions.values().filter(|p| p.partition >= 0) {
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                let partition = p.partition.to_string();
                let labels = [topic.as_str(), partition.as_str()];
                if lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&labels)
                        .set(lag);
                } else {
                    let _ = self.metrics.consumer_lag.remove_label_values(&labels);
                }
            }
        }
    }
}

impl ConsumerContext for CommitOnRevoke {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked: committing");
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!("commit on revoke: {e}");
                }
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Ready while this member holds partitions.
        let held = consumer.assignment().map_or(0, |a| a.count());
        self.metrics.set_ready(held > 0);
        if let (Rebalance::Assign(tpl), Some(n)) = (rebalance, &self.on_assigned)
            && tpl.count() > 0
        {
            n.notify_waiters();
            n.notify_one();
        }
    }
}

/// What must be acknowledged before a message's offset is stored: its deliveries, where it came
/// from, and for a decision its transport timestamp and ingestion instant (for the latency).
type Acks = (Vec<DeliveryFuture>, Source, Option<(Option<i64>, Instant)>);

/// A consumed message as the transport-independent envelope (the payload is copied so the
/// message can be released at once).
fn envelope(m: &impl Message) -> Envelope {
    Envelope {
        payload: m.payload().unwrap_or_default().to_vec(),
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// Runs the detector on Kafka until `shutdown` resolves, then drains, flushes and commits.
pub async fn run_kafka(
    detector: Arc<Detector>,
    s: KafkaSettings,
    shutdown: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(&RunStats),
) -> anyhow::Result<RunStats> {
    let consumer: Arc<StreamConsumer<CommitOnRevoke>> = Arc::new(
        client_config(
            &s.brokers,
            &s.extra,
            &[
                ("group.id", &s.group),
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "false"),
                // A detector wants records as they arrive, not in half-second fetch rounds.
                ("fetch.wait.max.ms", "20"),
                // Statistics carry the consumer lag exported per partition.
                ("statistics.interval.ms", "5000"),
            ],
        )
        .create_with_context(CommitOnRevoke {
            on_assigned: s.on_assigned.clone(),
            metrics: detector.metrics().clone(),
        })?,
    );
    consumer.subscribe(&[&s.input_topic])?;
    let producer: FutureProducer = client_config(
        &s.brokers,
        &s.extra,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "2"),
        ],
    )
    .create()?;
    let (in_tx, in_rx) = mpsc::channel(s.batch.queue);
    let (out_tx, mut out_rx) = mpsc::channel(s.batch.queue);
    let (ack_tx, ack_rx) = mpsc::channel::<Acks>(s.batch.queue);
    let scorer = tokio::spawn(score_loop(
        detector.model(),
        detector.metrics().clone(),
        s.batch,
        in_rx,
        out_tx,
    ));
    let evictor = spawn_evictor(detector.clone());
    let labels = match &s.labels_topic {
        Some(topic) => Some(spawn_labels(detector.clone(), &s, topic, producer.clone())?),
        None => None,
    };
    let stats = Arc::new(Mutex::new(RunStats::new()));
    let acker = tokio::spawn(acknowledge(
        consumer.clone(),
        ack_rx,
        detector.metrics().clone(),
        stats.clone(),
    ));
    let sink = {
        let (detector, producer, stats, s) =
            (detector.clone(), producer.clone(), stats.clone(), s.clone());
        tokio::spawn(async move {
            while let Some((outcome, at)) = out_rx.recv().await {
                let acks = publish(&detector, &producer, &s, outcome, at, &stats);
                if ack_tx.send(acks).await.is_err() {
                    break;
                }
            }
        })
    };
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => progress(&stats.lock().expect("stats lock")),
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let env = envelope(&m);
                    drop(m);
                    // A full queue makes this wait: fetching pauses until the scorer catches up.
                    if in_tx.send((detector.ingest(&env), Instant::now())).await.is_err() {
                        break;
                    }
                }
                Err(e) => tracing::warn!("consumer: {e}"),
            },
        }
    }
    tracing::info!("draining: scoring, publishing and acknowledging what was consumed");
    drop(in_tx);
    scorer.await?;
    sink.await?;
    acker.await?;
    producer.flush(Duration::from_secs(30))?;
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed"),
        // Nothing stored since the last automatic commit: everything is already committed.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {
            tracing::info!("offsets already committed")
        }
        Err(e) => tracing::warn!("final commit: {e}"),
    }
    let mut stats = stats.lock().expect("stats lock").clone();
    evictor.abort();
    if let Some(l) = labels {
        l.abort();
    }
    stats.cards = detector.cards();
    stats.evicted = detector.evicted();
    Ok(stats)
}

/// Produces what an outcome publishes and returns the deliveries to await before its offset
/// may be stored.
fn publish(
    detector: &Detector,
    producer: &FutureProducer,
    s: &KafkaSettings,
    outcome: Outcome,
    at: Instant,
    stats: &Mutex<RunStats>,
) -> Acks {
    let mut futures = Vec::new();
    let mut send = |topic: &str, key: Option<&str>, payload: String| {
        let mut record = FutureRecord::<str, str>::to(topic).payload(&payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        match producer.send_result(record) {
            Ok(f) => futures.push(f),
            Err((e, _)) => tracing::error!(topic, "produce failed: {e}"),
        }
    };
    let mut timing = None;
    let source = match outcome {
        Outcome::Decision(d) => {
            let alert = detector.alerts(&d).then(|| detector.alert(&d));
            let alerted = alert.is_some();
            let card = d.pending.card_id.as_str();
            if let Some(a) = &alert {
                send(
                    &s.alerts_topic,
                    Some(card),
                    serde_json::to_string(a).expect("alert serialises"),
                );
            }
            if let Some(topic) = &s.scores_topic {
                let record =
                    serde_json::to_string(&detector.score_record(&d)).expect("score serialises");
                send(topic, Some(card), record);
            }
            detector.record(&d, alert.as_ref());
            stats
                .lock()
                .expect("stats lock")
                .scored(alerted, d.pending.label);
            timing = Some((d.pending.timestamp_ms, at));
            d.pending.source.clone()
        }
        Outcome::Invalid(letter) => {
            tracing::warn!(topic = %letter.topic, partition = letter.partition, offset = letter.offset,
                reason = %letter.reason, "dead-lettered: {}", letter.error);
            if let Some(topic) = &s.dead_letter_topic {
                send(
                    topic,
                    None,
                    serde_json::to_string(&*letter).expect("dead letter serialises"),
                );
            }
            detector.metrics().dead_lettered(&letter.reason);
            stats.lock().expect("stats lock").invalid += 1;
            Source {
                topic: letter.topic.clone(),
                partition: letter.partition,
                offset: letter.offset,
            }
        }
        Outcome::Duplicate(src) => {
            detector.metrics().duplicate();
            stats.lock().expect("stats lock").duplicates += 1;
            src
        }
    };
    (futures, source, timing)
}

/// Awaits deliveries in consumption order and stores each message's offset once they are all
/// acknowledged; a decision's end-to-end latency ends here. A partition with a failed delivery
/// stores nothing more in this run, so the failed message is consumed again after a restart
/// (at-least-once).
async fn acknowledge(
    consumer: Arc<StreamConsumer<CommitOnRevoke>>,
    mut rx: mpsc::Receiver<Acks>,
    metrics: Arc<crate::observe::Metrics>,
    stats: Arc<Mutex<RunStats>>,
) {
    let mut failed: HashSet<(String, i32)> = HashSet::new();
    while let Some((futures, src, timing)) = rx.recv().await {
        let mut ok = true;
        for f in futures {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    tracing::error!(
                        partition = src.partition,
                        offset = src.offset,
                        "delivery failed: {e}"
                    );
                    ok = false;
                }
                Err(_) => ok = false,
            }
        }
        if let (true, Some((ts, at))) = (ok, timing) {
            let took = latency(ts, at);
            metrics.decided(took);
            stats.lock().expect("stats lock").latency(took);
        }
        let key = (src.topic.clone(), src.partition);
        if !ok {
            failed.insert(key);
            continue;
        }
        if failed.contains(&key) {
            continue;
        }
        if let Err(e) = consumer.store_offset(&src.topic, src.partition, src.offset) {
            // The partition was revoked meanwhile: its next owner re-reads from the commit.
            tracing::debug!(
                partition = src.partition,
                offset = src.offset,
                "store offset: {e}"
            );
        }
    }
}

/// Reads every partition of the labels topic from its end (labels for scores this process has
/// not made cannot match) and joins each label to its score. Bad labels are dead-lettered.
/// Labels need no offsets: a restarted detector remembers no scores to join them to.
fn spawn_labels(
    detector: Arc<Detector>,
    s: &KafkaSettings,
    topic: &str,
    producer: FutureProducer,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        client_config(
            &s.brokers,
            &s.extra,
            &[
                ("group.id", &format!("{}-labels", s.group)),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                ("fetch.wait.max.ms", "100"),
            ],
        )
        .create()?,
    );
    let (topic, dead_letter_topic) = (topic.to_string(), s.dead_letter_topic.clone());
    Ok(tokio::spawn(async move {
        // Wait for the topic to exist, then take all of its partitions.
        loop {
            let (c, t) = (consumer.clone(), topic.clone());
            let assigned = tokio::task::spawn_blocking(move || assign_from_end(&c, &t))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
            match assigned {
                Ok(n) => {
                    tracing::info!(topic, partitions = n, "reading labels");
                    break;
                }
                Err(e) => {
                    tracing::warn!(topic, "labels topic not readable yet: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    let env = envelope(&m);
                    if let Err(letter) = detector.label(&env) {
                        tracing::warn!(topic = %letter.topic, partition = letter.partition, offset = letter.offset,
                            reason = %letter.reason, "dead-lettered label: {}", letter.error);
                        detector.metrics().dead_lettered_label(&letter.reason);
                        if let Some(dlq) = &dead_letter_topic {
                            let payload =
                                serde_json::to_string(&*letter).expect("dead letter serialises");
                            let record = FutureRecord::<str, str>::to(dlq).payload(&payload);
                            if let Err((e, _)) = producer.send_result(record) {
                                tracing::error!(topic = %dlq, "produce failed: {e}");
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("labels consumer: {e}"),
            }
        }
    }))
}

/// Assigns every partition of `topic` at its end; returns how many.
fn assign_from_end(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<usize> {
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = meta
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow::anyhow!("no metadata"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("{e:?}");
    }
    anyhow::ensure!(!t.partitions().is_empty(), "no partitions");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::End)?;
    }
    consumer.assign(&tpl)?;
    Ok(t.partitions().len())
}

/// Creates the topics that do not exist yet, with `partitions` partitions each.
pub async fn ensure_topics(
    brokers: &str,
    extra: &[(String, String)],
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, extra, &[]).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) => {}
            Err((topic, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "topic exists");
            }
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}
