//! `fraudstream replay`: produce a file's transactions into Kafka, in time order.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{Map, Value};

use crate::schema::{FeatureSpec, Format, RawRow, RecordReader};
use crate::stream::kafka::{client_config, ensure_topics, parse_kafka_setting};

/// Options of `replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Transactions (CSV or JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Feature spec: gives the key (card) and time fields.
    #[arg(long, default_value = "cards")]
    pub spec: String,
    /// File format; by default from the extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
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
    /// Any librdkafka setting, `key=value`; repeatable.
    #[arg(long = "kafka", value_parser = parse_kafka_setting)]
    pub kafka: Vec<(String, String)>,
}

/// A CSV cell as the JSON value a producer of real data would send: numbers stay numbers.
fn cell(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::from(f),
        _ => Value::String(v.to_string()),
    }
}

/// Reads every valid row as (event time, card key, JSON object), sorted by time.
fn read_sorted(
    args: &ReplayArgs,
    spec: &FeatureSpec,
) -> anyhow::Result<Vec<(f64, String, Vec<u8>)>> {
    let format = args.format.unwrap_or_else(|| Format::from_path(&args.data));
    let mut reader = RecordReader::open(&args.data.to_string_lossy(), format)?;
    reader.check_columns(spec)?;
    let mut rows = Vec::new();
    let mut bad = 0u64;
    while let Some(next) = reader.next_row() {
        let (line, row) = next?;
        let parsed = row.map_err(|e| e.to_string()).and_then(|r| {
            let tx = r.parse(spec).map_err(|e| e.to_string())?;
            let obj: Map<String, Value> = match r {
                RawRow::Json(m) => m,
                RawRow::Csv(c) => c.fields().map(|(k, v)| (k.to_string(), cell(v))).collect(),
            };
            Ok((
                tx.ts,
                tx.key,
                serde_json::to_vec(&obj).expect("object serialises"),
            ))
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
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(rows)
}

pub(crate) fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let spec = FeatureSpec::resolve(&args.spec)?;
    let mut rows = read_sorted(&args, &spec)?;
    if let Some(limit) = args.limit {
        rows.truncate(limit);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if let Some(p) = args.partitions {
            ensure_topics(&args.brokers, &args.kafka, &[&args.topic], p).await?;
        }
        let producer: FutureProducer = client_config(
            &args.brokers,
            &args.kafka,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "10"),
            ],
        )
        .create()
        .context("creating the producer")?;
        let bar = super::progress(rows.len() as u64, "messages");
        let began = Instant::now();
        let mut pending = Vec::with_capacity(10_000);
        for (i, (_, key, payload)) in rows.iter().enumerate() {
            if let Some(rate) = args.rate {
                let due = began + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let record = FutureRecord::to(&args.topic)
                .key(key.as_str())
                .payload(payload.as_slice());
            match producer.send_result(record) {
                Ok(f) => pending.push(f),
                Err((e, _)) => anyhow::bail!("producing message {i}: {e}"),
            }
            if pending.len() >= 10_000 || args.rate.is_some() {
                for f in pending.drain(..) {
                    f.await?
                        .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
                }
            }
            bar.set_position(i as u64 + 1);
        }
        for f in pending.drain(..) {
            f.await?
                .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
        }
        producer.flush(Duration::from_secs(30))?;
        bar.finish_and_clear();
        eprintln!(
            "replayed {} messages to {} in {:.1}s ({:.0}/s)",
            rows.len(),
            args.topic,
            began.elapsed().as_secs_f64(),
            rows.len() as f64 / began.elapsed().as_secs_f64().max(1e-9)
        );
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
