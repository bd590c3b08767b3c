//! `fraudstream replay`: produce a file's transactions into Kafka, in time order.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::schema::{FeatureSpec, Format, RecordReader};
use crate::stream::kafka::{InFlight, Pacer, client_config, ensure_topics, parse_kafka_setting};

/// Options of `replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The transaction file, its feature spec and format.
    #[command(flatten)]
    pub input: super::data::DataArgs,
    /// Bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Topic to produce to.
    #[arg(long)]
    pub topic: String,
    /// Messages per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many messages.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Create the topic with this many partitions when it does not exist.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Publish each transaction's fraud label to this topic, `--label-delay` seconds after the
    /// transaction, as `{transaction_id, is_fraud, labelled_at}` plus, for label-rate features,
    /// the transaction's time and label keys (`labelled_at` is the transaction's event time plus
    /// the delay); the label field is then removed from the transactions (as in live traffic).
    #[arg(long)]
    pub labels_topic: Option<String>,
    /// Seconds between a transaction and its label (with `--labels-topic`).
    #[arg(long, default_value_t = 0.0, requires = "labels_topic")]
    pub label_delay: f64,
    /// Give up (exit 2) when the broker does not acknowledge a message, or answer the topic
    /// creation, within this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Any librdkafka setting, `key=value`; repeatable.
    #[arg(long = "kafka", value_parser = parse_kafka_setting)]
    pub kafka: Vec<(String, String)>,
}

/// One transaction to produce.
struct Row {
    ts: f64,
    key: String,
    payload: Vec<u8>,
    /// The label message, when labels go to their own topic.
    label: Option<Vec<u8>>,
}

/// Reads every valid row, sorted by time. With `split_labels`, rows must carry an id and a
/// label, and the label field leaves the transaction.
fn read_sorted(args: &ReplayArgs, spec: &FeatureSpec) -> anyhow::Result<Vec<Row>> {
    let split_labels = args.labels_topic.is_some();
    if split_labels {
        anyhow::ensure!(
            spec.id.is_some() && spec.label.is_some(),
            "--labels-topic needs a spec with an id and a label field (spec {:?} has id {:?}, label {:?})",
            spec.name,
            spec.id,
            spec.label
        );
    }
    let format = args
        .input
        .format
        .unwrap_or_else(|| Format::from_path(&args.input.data));
    let mut reader = RecordReader::open(&args.input.data.to_string_lossy(), format)?;
    reader.check_columns(spec)?;
    let mut rows = Vec::new();
    let mut bad = 0u64;
    while let Some(next) = reader.next_row() {
        let (line, row) = next?;
        let parsed = row.map_err(|e| e.to_string()).and_then(|r| {
            let tx = r.parse(spec).map_err(|e| e.to_string())?;
            let mut obj = r.into_json();
            let label = if split_labels {
                let field = spec.label.as_deref().unwrap_or_default();
                obj.remove(field);
                // As if made `--label-delay` after the transaction, in its own time.
                match spec.label_message(&tx, tx.ts + args.label_delay.max(0.0)) {
                    Some(m) => Some(serde_json::to_vec(&m).expect("label serialises")),
                    None => return Err(format!("no transaction id or no `{field}` label")),
                }
            } else {
                None
            };
            Ok(Row {
                ts: tx.ts,
                key: tx.key,
                payload: serde_json::to_vec(&obj).expect("object serialises"),
                label,
            })
        });
        match parsed {
            Ok(row) => rows.push(row),
            Err(e) => {
                bad += 1;
                if bad <= 5 {
                    eprintln!("skipping line {line}: {e}");
                }
            }
        }
    }
    if bad > 0 {
        eprintln!("skipped {bad} invalid rows");
    }
    rows.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    Ok(rows)
}

/// Hands one record to the producer; its delivery joins `pending`.
fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    let record = FutureRecord::to(topic).key(key).payload(payload);
    producer
        .send_result(record)
        .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))
}

pub(crate) fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let spec = FeatureSpec::resolve(&args.input.spec)?;
    let mut rows = read_sorted(&args, &spec)?;
    if let Some(limit) = args.limit {
        rows.truncate(limit);
    }
    anyhow::ensure!(args.timeout_s > 0.0, "--timeout-s must be positive");
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if let Some(p) = args.partitions {
            let mut topics = vec![args.topic.as_str()];
            topics.extend(args.labels_topic.as_deref());
            tokio::time::timeout(
                timeout,
                ensure_topics(&args.brokers, &args.kafka, &topics, p),
            )
            .await
            .map_err(|_| unreachable(&args.brokers, timeout))??;
        }
        let message_timeout_ms = timeout.as_millis().to_string();
        let producer: FutureProducer = client_config(
            &args.brokers,
            &args.kafka,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "10"),
                // A delivery not acknowledged in this time fails: replay exits instead of
                // retrying forever against a broker that is gone.
                ("message.timeout.ms", &message_timeout_ms),
            ],
        )
        .create()
        .context("creating the producer")?;
        let bar = super::progress(rows.len() as u64, "messages");
        let began = Instant::now();
        let delay = Duration::from_secs_f64(args.label_delay.max(0.0));
        // Labels wait here, in the order they fall due, until `delay` after their transaction.
        let mut labels: std::collections::VecDeque<(Instant, String, Vec<u8>)> = Default::default();
        let mut in_flight = InFlight::default();
        let mut pacer = Pacer::new(args.rate);
        let mut labelled = 0usize;
        let failed = |e: String| {
            anyhow::anyhow!(
                "{e} (after {}s: is the broker at {} up? --timeout-s sets the wait)",
                args.timeout_s,
                args.brokers
            )
        };
        for (i, row) in rows.iter().enumerate() {
            pacer.wait().await;
            let sent = send(&producer, &args.topic, &row.key, &row.payload)?;
            in_flight.push(sent).await.map_err(failed)?;
            if let Some(label) = &row.label {
                labels.push_back((Instant::now() + delay, row.key.clone(), label.clone()));
            }
            if let Some(lt) = &args.labels_topic {
                while labels
                    .front()
                    .is_some_and(|(due, _, _)| *due <= Instant::now())
                {
                    let (_, key, payload) = labels.pop_front().expect("front exists");
                    in_flight
                        .push(send(&producer, lt, &key, &payload)?)
                        .await
                        .map_err(failed)?;
                    labelled += 1;
                }
            }
            bar.set_position(i as u64 + 1);
        }
        if let Some(lt) = &args.labels_topic {
            bar.set_message("waiting to publish the remaining labels");
            for (due, key, payload) in labels.drain(..) {
                tokio::time::sleep_until(due.into()).await;
                in_flight
                    .push(send(&producer, lt, &key, &payload)?)
                    .await
                    .map_err(failed)?;
                labelled += 1;
            }
        }
        in_flight.finish().await.map_err(failed)?;
        producer.flush(timeout)?;
        bar.finish_and_clear();
        eprintln!(
            "replayed {} messages to {} in {:.1}s ({:.0}/s)",
            rows.len(),
            args.topic,
            began.elapsed().as_secs_f64(),
            rows.len() as f64 / began.elapsed().as_secs_f64().max(1e-9)
        );
        if let Some(lt) = &args.labels_topic {
            eprintln!(
                "published {labelled} labels to {lt}, each {:.1}s after its transaction",
                delay.as_secs_f64()
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn unreachable(brokers: &str, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "no answer from the broker at {brokers} in {}s (--timeout-s)",
        timeout.as_secs_f64()
    )
}
