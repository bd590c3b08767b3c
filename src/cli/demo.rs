//! `fraudstream demo`: the whole pipeline with no set-up.
//!
//! An embedded Kafka-protocol broker (librdkafka's in-process mock cluster) unless `--brokers`
//! is given; a few simulated days replayed into the input topic; the detector with the built-in
//! model consuming it; a live progress line; a summary; exit when everything is scored.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::features::DEFAULT_LABEL_DELAY;
use crate::model::Bundle;
use crate::observe::Metrics;
use crate::sim::{SimConfig, SimTx, Simulator};
use crate::stream::kafka::{
    InFlight, KafkaSettings, Pacer, client_config, ensure_topics, run_kafka,
};
use crate::stream::{Detector, DetectorSettings};

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Use this broker instead of the embedded one.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Days of simulated traffic streamed through the broker and scored.
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// Days simulated before them and loaded into the detector's state first (card windows and
    /// terminal fraud rates from labels known a week later), as a detector running for that
    /// long would hold: 37 days fill the default model's 30-day windows after a 7-day delay.
    #[arg(long, default_value_t = 37)]
    pub history_days: u32,
    /// Simulated cards.
    #[arg(long, default_value_t = 5_000)]
    pub cards: usize,
    /// Stream the live days at this many transactions per second while the detector consumes,
    /// as a live topic would (0: produce them all first, as fast as possible; latency then
    /// measures the backlog, not the detector). The default is well within what 2 cores
    /// sustain (about 3,400 tx/s flat out, `bench`).
    #[arg(long, default_value_t = DEFAULT_DEMO_RATE)]
    pub rate: f64,
    /// Simulation seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Serve the dashboard (/), /metrics, /healthz and /readyz here while the demo runs
    /// (skipped if taken).
    #[arg(long, default_value = "127.0.0.1:9898")]
    pub http: std::net::SocketAddr,
    /// Keep the dashboard and metrics up this many seconds after the summary (Ctrl-C ends it).
    #[arg(long, default_value_t = 0)]
    pub linger_s: u64,
}

/// demo's streaming rate: about 60% of what this 2-core machine sustains flat out, so the
/// latency it reports is the detector's, not a queue's.
pub const DEFAULT_DEMO_RATE: f64 = 2_000.0;

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let bundle = Bundle::embedded_default(&Device::Cpu).context("loading the built-in model")?;
    let rt = tokio::runtime::Runtime::new()?;
    let suffix = std::process::id();
    let (input, alerts) = (
        format!("demo-transactions-{suffix}"),
        format!("demo-alerts-{suffix}"),
    );
    let broker = rt.block_on(DemoBroker::start(args.brokers.clone(), &input, &alerts))?;
    let brokers = broker.brokers.clone();
    eprintln!(
        "fraudstream demo: {} broker at {brokers}; model {} {} (threshold {:.3})",
        if broker.embedded() {
            "embedded"
        } else {
            "external"
        },
        bundle.manifest.name,
        bundle.manifest.version,
        bundle.threshold()
    );
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    // The dashboard's model panel reads the detector once it exists.
    let running: Arc<std::sync::OnceLock<Arc<Detector>>> = Arc::default();
    let models: crate::observe::ModelsReport = {
        let running = running.clone();
        Arc::new(move || {
            running.get().map_or(serde_json::Value::Null, |d| {
                crate::stream::rollout::models_report(d, chrono::Utc::now().timestamp_millis())
            })
        })
    };
    let served = match rt.block_on(crate::observe::spawn_server_with(
        args.http,
        metrics.clone(),
        Some(models),
    )) {
        Ok(addr) => {
            eprintln!("dashboard: http://{addr}/  (Prometheus metrics: http://{addr}/metrics)");
            Some(addr)
        }
        Err(e) => {
            eprintln!("not serving HTTP on {}: {e}", args.http);
            None
        }
    };
    let sim = SimConfig {
        cards: args.cards,
        days: args.history_days + args.days,
        seed: args.seed,
        ..SimConfig::default()
    };
    let mut days = Simulator::new(sim);
    let history: Vec<SimTx> = days
        .by_ref()
        .take(args.history_days as usize)
        .flatten()
        .collect();
    let detector = Arc::new(Detector::new(
        &bundle,
        DetectorSettings::default(),
        metrics.clone(),
    ));
    warm_up(&detector, &history)?;
    let _ = running.set(detector.clone());
    let live: Vec<Vec<SimTx>> = days.collect();
    let total: u64 = live.iter().map(|d| d.len() as u64).sum();
    let rate = (args.rate > 0.0).then_some(args.rate);
    let group = format!("demo-{suffix}");
    commit_start_offsets(&brokers, &group, &input)?;
    let stats = rt.block_on(async {
        let mut settings = KafkaSettings::new(&brokers, &group, &input, &alerts);
        settings.extra = broker.detector_overrides();
        let producer = match rate {
            Some(r) => {
                // Streamed once the detector holds its partitions, as a live topic would be.
                let assigned = Arc::new(tokio::sync::Notify::new());
                settings.on_assigned = Some(assigned.clone());
                let (brokers, input) = (brokers.clone(), input.clone());
                eprintln!(
                    "streaming {total} simulated transactions ({} days, {} cards) into {input} at {r:.0} tx/s while the detector consumes",
                    args.days, args.cards
                );
                Some(tokio::spawn(async move {
                    let start = async move { assigned.notified().await };
                    replay_days(&brokers, &input, &live, Some(r), DEMO_LINGER_MS, start).await
                }))
            }
            None => {
                let start = std::future::ready(());
                let n = replay_days(&brokers, &input, &live, None, DEMO_LINGER_MS, start)
                    .await?
                    .count;
                eprintln!("replayed {n} simulated transactions ({} days, {} cards) into {input} before the detector starts (latency includes that backlog)", args.days, args.cards);
                None
            }
        };
        let done = Arc::new(tokio::sync::Notify::new());
        let finished = done.clone();
        // With --linger-s the detector keeps consuming after the stream ends, so the
        // dashboard shows it idle and caught up (ready, lag 0), not stopped; the summary is
        // printed once every transaction's outputs are acknowledged.
        let linger = (served.is_some() && args.linger_s > 0).then_some(args.linger_s);
        let stop = async move {
            finished.notified().await;
            if let Some(s) = linger {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(s)) => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
        };
        let mut told = false;
        let stats = run_kafka(detector, settings, stop, |s| {
            if told {
                return;
            }
            eprint!(
                "\r  scored {:>7}/{total}  {:>6.0} tx/s  alerts {:>5}  precision {:.3}  recall {:.3}   ",
                s.scored,
                s.throughput(),
                s.alerts,
                s.precision(),
                s.recall()
            );
            let _ = std::io::stderr().flush();
            let acknowledged = metrics.end_to_end_seconds.get_sample_count();
            if s.scored + s.invalid >= total && (linger.is_none() || acknowledged >= s.scored) {
                told = true;
                if let (Some(secs), Some(addr)) = (linger, served) {
                    eprintln!();
                    summarise(s, rate);
                    eprintln!(
                        "the stream has ended; the detector stays up, idle, with its dashboard at http://{addr}/ for {secs} s (Ctrl-C ends it)"
                    );
                }
                done.notify_one();
            }
        })
        .await?;
        eprintln!();
        if let Some(p) = producer {
            p.await??;
        }
        Ok::<_, anyhow::Error>(stats)
    })?;
    if served.is_none() || args.linger_s == 0 {
        summarise(&stats, rate);
    }
    drop(broker);
    Ok(ExitCode::SUCCESS)
}

/// The run's summary and what its latency measures, on stdout.
fn summarise(stats: &crate::stream::RunStats, rate: Option<f64>) {
    println!("{}", stats.summary());
    println!(
        "latency: from each transaction's Kafka timestamp (when the simulator produced it) to the broker's acknowledgement of its alert or score, {}",
        match rate {
            Some(r) => format!("streamed at {r:.0} tx/s: the detector's own latency"),
            None => "everything produced before the detector started: mostly time spent waiting in the topic".into(),
        }
    );
    let _ = std::io::stdout().flush();
}

/// The detector's fetch wait against the embedded broker (see
/// [`DemoBroker::detector_overrides`]).
const EMBEDDED_FETCH_WAIT_MS: &str = "5";

/// The broker of a self-contained run: the one given, or librdkafka's in-process mock cluster,
/// which lives as long as this value. The input (4 partitions) and alerts topics exist once it
/// is started.
pub(crate) struct DemoBroker {
    mock: Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    /// Bootstrap servers.
    pub brokers: String,
}

impl DemoBroker {
    /// Starts (or connects) and creates the topics.
    pub(crate) async fn start(
        brokers: Option<String>,
        input: &str,
        alerts: &str,
    ) -> anyhow::Result<Self> {
        match brokers {
            Some(b) => {
                ensure_topics(&b, &[], &[input, alerts], 4).await?;
                Ok(DemoBroker {
                    mock: None,
                    brokers: b,
                })
            }
            None => {
                let cluster = rdkafka::mocking::MockCluster::new(1)
                    .context("starting the embedded broker")?;
                cluster.create_topic(input, 4, 1)?;
                cluster.create_topic(alerts, 1, 1)?;
                let brokers = cluster.bootstrap_servers();
                Ok(DemoBroker {
                    mock: Some(cluster),
                    brokers,
                })
            }
        }
    }

    /// Creates one more topic (when it does not exist).
    pub(crate) async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        match &self.mock {
            Some(cluster) => cluster.create_topic(name, partitions, 1)?,
            None => ensure_topics(&self.brokers, &[], &[name], partitions).await?,
        }
        Ok(())
    }

    /// Whether the broker runs in this process.
    pub(crate) fn embedded(&self) -> bool {
        self.mock.is_some()
    }

    /// Consumer settings the detector needs with this broker. The mock cluster answers a fetch
    /// that found nothing only when its wait (`fetch.wait.max.ms`, 20 ms by default) ends, not
    /// when a record arrives as Kafka does, so that wait would be added to every record's
    /// latency: with it the detector fetches every 5 ms (measured: p50 18 -> 8 ms at 1,000
    /// tx/s). Against a real broker the wait costs no latency and nothing is changed.
    pub(crate) fn detector_overrides(&self) -> Vec<(String, String)> {
        if self.embedded() {
            vec![("fetch.wait.max.ms".into(), EMBEDDED_FETCH_WAIT_MS.into())]
        } else {
            vec![]
        }
    }
}

/// Loads simulated history into the detector's state the way the offline path replays a file
/// (labels known a week after their transactions), and says what it loaded.
fn warm_up(detector: &Detector, history: &[SimTx]) -> anyhow::Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let began = std::time::Instant::now();
    let txs = history
        .iter()
        .map(|t| detector.spec().parse(&t.to_json()))
        .collect::<Result<Vec<_>, _>>()
        .context("simulated history does not fit the model's spec")?;
    let (n, labels) = detector.warm(&txs, DEFAULT_LABEL_DELAY);
    detector.sync_card_metrics();
    let (terminals, _) = detector.label_state();
    eprintln!(
        "warmed up on {n} simulated transactions of history ({labels} labels, known {} later; \
         {} cards, {terminals} terminals) in {:.1}s",
        DEFAULT_LABEL_DELAY,
        detector.cards(),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Commits offset 0 on every partition of `topic` for `group` before the detector joins, so the
/// detector starts from committed offsets as a deployed one restarts. A group with none resets
/// each partition with an offset query that librdkafka sends 100 ms late (its backoff after the
/// "no offset" answer), and the records produced in the first 100 ms after the detector took
/// its partitions waited for it (bench at 1,000 tx/s: p99.9 83-85 ms in runs whose p99 was
/// 11-13 ms; every record over 30 ms was among the first 10 ms of decisions).
pub(crate) fn commit_start_offsets(brokers: &str, group: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = std::time::Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    let mut start = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        start.add_partition_offset(topic, i32::try_from(p)?, rdkafka::Offset::Offset(0))?;
    }
    consumer
        .commit(&start, CommitMode::Sync)
        .with_context(|| format!("committing the start offsets of {group}"))
}

/// Simulates and produces the transactions, keyed by card, in time order, at `rate` per second
/// (None: as fast as possible) once `start` completes. Returns what was sent.
pub(crate) async fn replay_simulation(
    brokers: &str,
    topic: &str,
    sim: SimConfig,
    rate: Option<f64>,
    start: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Replayed> {
    let days: Vec<Vec<SimTx>> = Simulator::new(sim).collect();
    replay_days(brokers, topic, &days, rate, BENCH_LINGER_MS, start).await
}

/// The demo's producer lingers 5 ms: the embedded broker (librdkafka's mock cluster) finds a
/// fetch's offset by walking the partition's message sets one by one, so with one message a
/// set (1 ms at these rates) every fetch slows as the week's log grows and the tail latency
/// grew with it (p99 145-740 ms at 1,000-1,500 tx/s over 50-70 s; 19-22 ms with 5 ms).
pub(crate) const DEMO_LINGER_MS: &str = "5";

/// bench's load generator lingers 1 ms: its runs are short (2 simulated days), so the log
/// stays small and the latency it reports is the detector's with the least producer delay.
pub(crate) const BENCH_LINGER_MS: &str = "1";

/// How long an idempotent producer can take to get its producer id: librdkafka asks once when
/// it is created and, when no broker connection is up yet, again 500 ms later. Records produced
/// meanwhile wait in its queue with their timestamps already set.
pub(crate) const PRODUCER_ID_RETRY: Duration = Duration::from_millis(600);

/// What [`replay_days`] sent: the count, and the seconds from `start` to the last
/// acknowledgement.
pub(crate) struct Replayed {
    pub count: u64,
    pub seconds: f64,
}

/// Produces simulated days, keyed by card, in time order, at `rate` per second (None: as fast
/// as possible). The producer is created and connected first, then `start` is awaited, then the
/// clock starts: a load generator that only connects when its traffic is due held its first
/// records for up to half a second while it got its idempotent producer id (one run in two at
/// 1,000 tx/s: p99 330 ms, p99.9 500 ms, every one of them before the first delivery), so its
/// warm-up was reported as the detector's latency.
pub(crate) async fn replay_days(
    brokers: &str,
    topic: &str,
    days: &[Vec<SimTx>],
    rate: Option<f64>,
    linger_ms: &str,
    start: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Replayed> {
    let producer: FutureProducer = client_config(
        brokers,
        &[],
        &[("linger.ms", linger_ms), ("enable.idempotence", "true")],
    )
    .create()?;
    {
        let (producer, name) = (producer.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(30))
                .map(|_| ())
        })
        .await?
        .with_context(|| format!("connecting the producer for {topic}"))?;
    }
    start.await;
    let began = std::time::Instant::now();
    let mut pacer = Pacer::new(rate);
    let mut in_flight = InFlight::default();
    let mut total = 0u64;
    for tx in days.iter().flatten() {
        pacer.wait().await;
        let payload = serde_json::to_vec(&tx.to_json())?;
        let key = tx.card_id.to_string();
        match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
            Ok(f) => in_flight.push(f).await.map_err(anyhow::Error::msg)?,
            Err((e, _)) => anyhow::bail!("producing: {e}"),
        }
        total += 1;
    }
    in_flight.finish().await.map_err(anyhow::Error::msg)?;
    producer.flush(Duration::from_secs(30))?;
    Ok(Replayed {
        count: total,
        seconds: began.elapsed().as_secs_f64(),
    })
}
