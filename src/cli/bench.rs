//! `fraudstream bench`: inference and end-to-end throughput, printed as numbers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::demo::{DemoBroker, commit_start_offsets, replay_days, replay_simulation};
use crate::features::StateLimits;
use crate::model::{Bundle, FastModel, ModelConfig, init, weights};
use crate::observe::Metrics;
use crate::sim::{SimConfig, Simulator};
use crate::stream::kafka::{KafkaSettings, run_kafka};
use crate::stream::{Detector, DetectorSettings, RunStats};
use crate::train::{Engine, FocalLoss, Optimiser, TrainSettings, WindowSet};

/// Options of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model bundle directory (default: the built-in `models/default`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Seconds per inference measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Days of simulated traffic for the end-to-end run (5,000 cards, ~9,900 transactions a day).
    #[arg(long, default_value_t = 2)]
    pub days: u32,
    /// Produce the end-to-end traffic at this many transactions per second (0: as fast as
    /// possible, which measures throughput but makes latency mostly queueing).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Use this broker for the end-to-end run instead of the embedded one.
    #[arg(long)]
    pub brokers: Option<String>,
    /// The producer's pacing check: `replay`'s pacer offers this many messages a second
    /// (0: skip the check).
    #[arg(long, default_value_t = 500.0)]
    pub replay_rate: f64,
    /// ... for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub replay_seconds: f64,
    /// Write each card's state to a changelog topic during the end-to-end run (its cost).
    #[arg(long)]
    pub changelog: bool,
    /// With --changelog: the changelog cache's flush interval (as `serve --changelog-flush-ms`).
    #[arg(long, default_value_t = crate::state::cache::DEFAULT_FLUSH_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=crate::state::cache::MAX_FLUSH_INTERVAL.as_millis() as u64))]
    pub changelog_flush_ms: u64,
    /// Run the end-to-end part exactly-once (Kafka transactions; its cost).
    #[arg(long)]
    pub exactly_once: bool,
    /// Restore this many cards (each with a full window) from a changelog topic and time it
    /// (0: skip).
    #[arg(long, default_value_t = 100_000)]
    pub restore_cards: usize,
    /// Latency at these fractions of the flat-out end-to-end rate (measured first), comma
    /// separated; empty (`--load-levels ''`) skips them.
    #[arg(long, default_value = "0.25,0.5,0.9", value_parser = parse_levels)]
    pub load_levels: LoadLevels,
    /// Scoring arithmetic (as `serve --precision`).
    #[arg(long, value_enum, default_value_t = crate::model::Precision::F32)]
    pub precision: crate::model::Precision,
    /// Measure the network only (scoring at batch 1, 32, 256, training at batch 128, and the
    /// machine's FMA peak): no memory, end-to-end, pacing or restore runs.
    #[arg(long)]
    pub inference_only: bool,
    /// Also measure a shadow challenger's cost: flat out end to end without and with this
    /// bundle as challenger (as `serve --challenger`).
    #[arg(long)]
    pub challenger: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Fractions of the flat-out rate, each in (0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct LoadLevels(pub Vec<f64>);

fn parse_levels(s: &str) -> Result<LoadLevels, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
            _ => Err(format!("{p:?} is not a fraction in (0, 1]")),
        })
        .collect::<Result<_, _>>()
        .map(LoadLevels)
}

/// Windows per second of the scoring network at one batch size, full 30-step windows.
fn inference_rate(
    model: &FastModel,
    window: usize,
    width: usize,
    batch: usize,
    seconds: f64,
) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data: Vec<Vec<f32>> = (0..batch)
        .map(|_| {
            (0..window * width)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect()
        })
        .collect();
    let ws: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let lens = vec![window; batch];
    model.predict(&ws, &lens);
    let began = Instant::now();
    let mut n = 0usize;
    while began.elapsed().as_secs_f64() < seconds {
        model.predict(&ws, &lens);
        n += batch;
    }
    n as f64 / began.elapsed().as_secs_f64()
}

/// `train`'s default batch size, what training throughput is measured at.
const TRAIN_BATCH: usize = 128;

/// Training windows per second (forward, backward, Adam step) with `engine` on full random
/// windows, a tenth of them fraud.
fn training_rate(
    cfg: &ModelConfig,
    engine: Engine,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut set = WindowSet::new(cfg.window, cfg.input);
    let n = 4 * batch;
    set.data = (0..n * cfg.window * cfg.input)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    set.lens = vec![cfg.window; n];
    set.labels = (0..n).map(|i| i % 10 == 0).collect();
    let (model, varmap) = init(cfg, 1, &Device::Cpu)?;
    let settings = TrainSettings {
        epochs: 1,
        batch_size: batch,
        lr: 1e-3,
        loss: FocalLoss::default(),
        neg_per_pos: None,
        patience: 1,
        seed: 1,
        time_budget_s: None,
        engine,
    };
    let mut opt = Optimiser::new(&model, &varmap, &settings)?;
    let idx: Vec<usize> = (0..n).collect();
    let chunks: Vec<&[usize]> = idx.chunks(batch).collect();
    opt.step(&set, chunks[0], &settings.loss, [1, 2])?;
    let began = Instant::now();
    let mut done = 0usize;
    // At least one timed step, however short `seconds`.
    loop {
        let chunk = chunks[done / batch % chunks.len()];
        opt.step(&set, chunk, &settings.loss, [1, 2])?;
        done += batch;
        if began.elapsed().as_secs_f64() >= seconds {
            break;
        }
    }
    Ok(done as f64 / began.elapsed().as_secs_f64())
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    crate::model::set_precision(args.precision).map_err(anyhow::Error::msg)?;
    let bundle = Bundle::load_or_default(args.model.as_deref(), &Device::Cpu)
        .context("loading the model")?;
    let inference = inference(&args)?;
    if args.inference_only {
        if args.json {
            println!(
                "{}",
                serde_json::Value::Object(
                    inference
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                )
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let memory = memory(&bundle, args.json);
    let e2e = end_to_end(&bundle, &args)?;
    let loads = load_levels(&bundle, &args)?;
    let pacing = replay_pacing(&args)?;
    let restore = restore(&bundle, &args)?;
    let challenger = match &args.challenger {
        Some(dir) => challenger_cost(&bundle, dir, &args)?,
        None => Vec::new(),
    };
    if args.json {
        let mut out = json!({});
        for (k, v) in inference
            .into_iter()
            .chain(memory)
            .chain(e2e)
            .chain(loads)
            .chain(pacing)
            .chain(restore)
            .chain(challenger)
        {
            out[k] = v;
        }
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Inference windows/s and GFLOP/s at batch 1, 32 and 256, the FLOP count they are computed
/// from, and the kernels' instruction set.
fn inference(args: &BenchArgs) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    // Inference is measured on the notebook's architecture with 30 input features (the ULB
    // layout, 312,833 parameters), window 30: the size reference numbers are quoted for. The
    // cost hardly depends on the weights, so seeded random ones do.
    let cfg = ModelConfig::notebook(30, 30);
    let (_, varmap) = init(&cfg, 1, &Device::Cpu)?;
    let network = FastModel::new(&cfg, &weights(&varmap)?)?;
    let flops = cfg.flops_per_window();
    let isa = crate::model::kernel::isa().name();
    let precision = format!("{:?}", crate::model::precision()).to_lowercase();
    // int8 runs on VNNI's `vpdpbusd` where present, else on AVX-512 BW's byte products.
    let int8 = crate::model::precision() == crate::model::Precision::Int8;
    let int8_instructions = int8.then(crate::model::int8::instructions);
    let shown = match int8_instructions {
        Some(with) => format!("{precision} ({with})"),
        None => precision.clone(),
    };
    let mut inference = serde_json::Map::new();
    let mut gflops = serde_json::Map::new();
    for batch in [1usize, 32, 256] {
        let rate = inference_rate(&network, cfg.window, cfg.input, batch, args.seconds);
        let achieved = rate * flops as f64 / 1e9;
        if !args.json {
            println!(
                "inference batch {batch:>3}: {rate:>8.0} windows/s, {achieved:>6.1} GFLOP/s \
                 (30 features, window 30, {:.1} MFLOP a window, {isa} kernels, {shown} \
                 products)",
                flops as f64 / 1e6
            );
        }
        inference.insert(batch.to_string(), json!(rate.round()));
        gflops.insert(batch.to_string(), json!((achieved * 10.0).round() / 10.0));
    }
    // The hardware limit: independent FMAs only, on every core at once.
    let kernel_isa = crate::model::kernel::isa();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let seconds = args.seconds.min(1.0);
    let on_every_core = |peak: fn(crate::model::kernel::Isa, f64) -> f64| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| scope.spawn(move || peak(kernel_isa, seconds)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("peak thread"))
                .sum::<f64>()
        }) / 1e9
    };
    let peak = on_every_core(crate::model::kernel::fma_peak_flops);
    let gemm = on_every_core(crate::model::kernel::gemm_peak_flops);
    let at_256 = gflops
        .get("256")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    if !args.json {
        println!(
            "fp32 FMA peak on {threads} threads: {peak:.1} GFLOP/s ({isa}; batch 256 reaches {:.0}% of it)",
            100.0 * at_256 / peak
        );
        println!(
            "fp32 GEMM on {threads} threads: {gemm:.1} GFLOP/s (512^3 products with these \
             kernels; batch 256 reaches {:.0}% of it)",
            100.0 * at_256 / gemm
        );
    }
    let mut training = serde_json::Map::new();
    for engine in [Engine::Kernels, Engine::Candle] {
        let rate = training_rate(&cfg, engine, TRAIN_BATCH, args.seconds)?;
        if !args.json {
            println!(
                "training batch {TRAIN_BATCH}: {rate:>8.0} windows/s ({} engine, forward and \
                 backward pass and Adam step, same network)",
                engine.name()
            );
        }
        training.insert(engine.name().to_string(), json!(rate.round()));
    }
    Ok(vec![
        ("training_windows_per_s", training.into()),
        ("training_batch", json!(TRAIN_BATCH)),
        ("fp32_peak_gflop_per_s", json!((peak * 10.0).round() / 10.0)),
        ("fp32_peak_threads", json!(threads)),
        ("fp32_gemm_gflop_per_s", json!((gemm * 10.0).round() / 10.0)),
        ("inference_windows_per_s", inference.into()),
        ("inference_gflop_per_s", gflops.into()),
        ("inference_flop_per_window", json!(flops)),
        ("inference_isa", json!(isa)),
        ("inference_precision", json!(precision)),
        // null unless int8: "avx512vnni" or "avx512bw".
        ("inference_int8_instructions", json!(int8_instructions)),
    ])
}

/// Memory per card, per terminal of the label tables, per remembered score.
fn memory(bundle: &Bundle, quiet: bool) -> Vec<(&'static str, serde_json::Value)> {
    let measured = [
        (
            "memory_per_card_bytes",
            memory_per_card(bundle, 50_000),
            "card state: {} bytes per card with a full 30-transaction window (RSS growth over 50,000 cards)",
        ),
        (
            "memory_per_card_worst_bytes",
            memory_per_card_worst(bundle, 1_000),
            "card state, worst case: {} bytes per card with 256-byte card and transaction ids and a transaction every hour for 30 days (heap growth over 1,000 cards)",
        ),
        (
            "memory_per_terminal_bytes",
            memory_per_terminal(bundle, 100_000),
            "label tables: {} bytes per terminal with 37 days of daily labels (heap growth over 100,000 terminals)",
        ),
        (
            "memory_per_remembered_score_bytes",
            memory_per_remembered_score(200_000),
            "label memory: {} bytes per score awaiting its label (heap growth over 200,000 scores)",
        ),
    ];
    measured
        .into_iter()
        .map(|(key, bytes, line)| {
            if !quiet {
                let shown =
                    bytes.map_or("(not measurable here)".to_string(), |b| format!("{b:.0}"));
                println!("{}", line.replace("{}", &shown));
            }
            (key, json!(bytes.map(f64::round)))
        })
        .collect()
}

/// One end-to-end run: the simulated days produced at `rate` a second (0: as fast as possible)
/// while a detector consumes them; latency is from each message's Kafka timestamp to its
/// acknowledgement. Topics and group are named after the process and `tag`.
fn e2e_run(
    bundle: &Bundle,
    args: &BenchArgs,
    rate: f64,
    tag: &str,
    challenger: Option<(&Bundle, &std::path::Path)>,
) -> anyhow::Result<(RunStats, Arc<Metrics>, u64)> {
    let suffix = format!("{}-{tag}", std::process::id());
    let (input, alerts) = (
        format!("bench-transactions-{suffix}"),
        format!("bench-alerts-{suffix}"),
    );
    let rt = tokio::runtime::Runtime::new()?;
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    let settings = DetectorSettings {
        changelog: args.changelog,
        ..DetectorSettings::default()
    };
    let detector = Arc::new(Detector::new(bundle, settings, metrics.clone()));
    if let Some((b, dir)) = challenger {
        detector
            .install(
                crate::observe::Role::Challenger,
                Some((b, Some(dir.to_path_buf()))),
            )
            .map_err(anyhow::Error::msg)?;
    }
    let sim = SimConfig {
        days: args.days,
        ..SimConfig::default()
    };
    let transactions: u64 = Simulator::new(sim.clone()).map(|d| d.len() as u64).sum();
    let broker = rt.block_on(DemoBroker::start(args.brokers.clone(), &input, &alerts))?;
    let changelog = format!("bench-changelog-{suffix}");
    if args.changelog {
        rt.block_on(broker.create_topic(&changelog, 4))?;
    }
    let brokers = broker.brokers.clone();
    let group = format!("bench-{suffix}");
    commit_start_offsets(&brokers, &group, &input)?;
    let stats = rt.block_on(async {
        // Production starts once the detector holds its partitions, so the group join is not
        // counted as latency.
        let assigned = Arc::new(tokio::sync::Notify::new());
        let producer = {
            let (brokers, input, assigned) = (brokers.clone(), input.clone(), assigned.clone());
            let rate = (rate > 0.0).then_some(rate);
            tokio::spawn(async move {
                let start = async move { assigned.notified().await };
                replay_simulation(&brokers, &input, sim, rate, start).await
            })
        };
        let mut settings = KafkaSettings::new(&brokers, &group, &input, &alerts);
        settings.on_assigned = Some(assigned);
        settings.extra = broker.detector_overrides();
        settings.changelog_topic = args.changelog.then(|| changelog.clone());
        settings.changelog_flush = std::time::Duration::from_millis(args.changelog_flush_ms);
        settings.exactly_once = args
            .exactly_once
            .then_some(crate::stream::kafka::DEFAULT_TRANSACTION_INTERVAL);
        let done = Arc::new(tokio::sync::Notify::new());
        let finished = done.clone();
        let stats = run_kafka(
            detector,
            settings,
            async move { finished.notified().await },
            |s| {
                if s.scored + s.invalid >= transactions {
                    done.notify_one();
                }
            },
        )
        .await?;
        producer.await??;
        Ok::<_, anyhow::Error>(stats)
    })?;
    drop(broker);
    anyhow::ensure!(
        stats.scored == transactions,
        "scored {} of {transactions}",
        stats.scored
    );
    Ok((stats, metrics, transactions))
}

/// A shadow challenger's cost: flat-out end-to-end throughput without and with it.
fn challenger_cost(
    bundle: &Bundle,
    dir: &std::path::Path,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    let challenger = crate::stream::rollout::verified(dir).map_err(anyhow::Error::msg)?;
    let (alone, _, _) = e2e_run(bundle, args, 0.0, "champion", None)?;
    let (shadowed, _, _) = e2e_run(bundle, args, 0.0, "challenger", Some((&challenger, dir)))?;
    let (a, b) = (alone.decided_throughput(), shadowed.decided_throughput());
    let cost = 1.0 - b / a.max(1e-9);
    if !args.json {
        println!(
            "challenger {} {}: flat out {a:.0} tx/s alone, {b:.0} tx/s with it in the shadow ({:.0}% slower)",
            challenger.manifest.name,
            challenger.manifest.version,
            100.0 * cost
        );
    }
    Ok(vec![(
        "challenger",
        json!({
            "name": challenger.manifest.name,
            "version": challenger.manifest.version,
            "flat_out_alone_tx_per_s": a.round(),
            "flat_out_with_challenger_tx_per_s": b.round(),
            "cost_fraction": (cost * 1000.0).round() / 1000.0,
        }),
    )])
}

/// End to end through a broker at `--rate`: throughput, latency, and with `--changelog` the
/// changelog's cost.
fn end_to_end(
    bundle: &Bundle,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    let (stats, metrics, transactions) = e2e_run(bundle, args, args.rate, "main", None)?;
    if !args.json {
        let rate = if args.rate > 0.0 {
            args.rate.to_string()
        } else {
            "full speed".into()
        };
        println!(
            "end to end through the broker ({transactions} transactions produced at {rate} per second): \
             {:.0} tx/s (first decision to last; the first came {:.1} s after start, the group join \
             included), latency p50 {:.1} ms, p99 {:.1} ms",
            stats.decided_throughput(),
            stats.first_decided_s,
            stats.latency_p50_ms,
            stats.latency_p99_ms
        );
    }
    let broker_kind = if args.brokers.is_some() {
        "external"
    } else {
        "embedded (librdkafka mock cluster)"
    };
    let mut out = Vec::new();
    if args.changelog {
        let (records, coalesced) = (
            metrics.changelog_records.get(),
            metrics.changelog_coalesced.get(),
        );
        // Every scored transaction changed its card once: written, or coalesced into a later
        // change of the same card.
        let changes = records + coalesced;
        let bytes = metrics.changelog_bytes.get() as f64;
        let per_tx = bytes / changes.max(1) as f64;
        let per_record = bytes / records.max(1) as f64;
        let flush_ms = args.changelog_flush_ms;
        if !args.json {
            println!(
                "changelog (flush every {flush_ms} ms): {records} records for {changes} card changes \
                 ({:.1}% coalesced), {per_record:.0} bytes per record, {per_tx:.0} bytes per scored transaction",
                100.0 * coalesced as f64 / changes.max(1) as f64
            );
        }
        out.push((
            "changelog",
            json!({
                "flush_ms": flush_ms,
                "records": records,
                "coalesced": coalesced,
                "bytes_per_record": per_record.round(),
                "bytes_per_transaction": per_tx.round(),
            }),
        ));
    }
    Ok([
        out,
        vec![
            (
                "end_to_end_tx_per_s",
                json!(stats.decided_throughput().round()),
            ),
            (
                "end_to_end_first_decision_s",
                json!((stats.first_decided_s * 1000.0).round() / 1000.0),
            ),
            (
                "latency_ms",
                json!({"p50": stats.latency_p50_ms, "p99": stats.latency_p99_ms, "p99_9": stats.latency_p999_ms}),
            ),
            ("end_to_end_broker", json!(broker_kind)),
            ("end_to_end_rate_limit_per_s", json!(args.rate)),
            ("end_to_end_exactly_once", json!(args.exactly_once)),
            ("transactions", json!(transactions)),
        ],
    ]
    .concat())
}

/// Latency at fractions of the flat-out rate: one run as fast as possible, then one per
/// `--load-levels` fraction at that share of the rate it reached.
fn load_levels(
    bundle: &Bundle,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    if args.load_levels.0.is_empty() {
        return Ok(vec![]);
    }
    let (flat, _, _) = e2e_run(bundle, args, 0.0, "flat", None)?;
    let max = flat.decided_throughput();
    let mut levels = Vec::new();
    for (i, fraction) in args.load_levels.0.iter().enumerate() {
        let offered = (fraction * max).max(1.0);
        let (stats, _, _) = e2e_run(bundle, args, offered, &format!("load{i}"), None)?;
        if !args.json {
            println!(
                "at {:.0}% of the flat-out {max:.0} tx/s ({offered:.0} tx/s offered): latency p50 \
                 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
                fraction * 100.0,
                stats.latency_p50_ms,
                stats.latency_p99_ms,
                stats.latency_p999_ms
            );
        }
        levels.push(json!({
            "fraction": fraction,
            "offered_tx_per_s": offered.round(),
            "achieved_tx_per_s": stats.decided_throughput().round(),
            "p50_ms": stats.latency_p50_ms,
            "p99_ms": stats.latency_p99_ms,
            "p99_9_ms": stats.latency_p999_ms,
        }));
    }
    Ok(vec![
        ("flat_out_tx_per_s", json!(max.round())),
        ("latency_at_load", json!(levels)),
    ])
}

/// Restore from a changelog: `--restore-cards` cards, each with a full window of the model,
/// produced to a 4-partition changelog topic on the broker, then read back and decoded the way
/// a detector restores newly assigned partitions.
fn restore(
    bundle: &Bundle,
    args: &BenchArgs,
) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    use crate::features::{CardStore, wall_clock};
    use crate::schema::Transaction;
    use crate::state::{Restorer, encode};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cards = args.restore_cards;
    if cards == 0 {
        return Ok(Vec::new());
    }
    let builder = bundle.window_builder();
    let recipe = builder.fingerprint();
    let store = CardStore::with_limits(builder.clone(), StateLimits::default(), wall_clock());
    let suffix = std::process::id();
    let topic = format!("bench-restore-{suffix}");
    let rt = tokio::runtime::Runtime::new()?;
    let broker = rt.block_on(DemoBroker::start(
        args.brokers.clone(),
        &format!("bench-restore-input-{suffix}"),
        &format!("bench-restore-alerts-{suffix}"),
    ))?;
    // The embedded broker keeps at most 5 MB per partition (librdkafka's mock cluster drops
    // older segments): enough partitions that 100,000 cards of about 3 KB all stay.
    let partitions: i32 = if broker.embedded() {
        (cards * 3_500 / (3 << 20) + 1).clamp(4, 1_000) as i32
    } else {
        8
    };
    rt.block_on(broker.create_topic(&topic, partitions))?;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?;
    let mut bytes = 0usize;
    for card in 0..cards {
        let key = format!("card-{card}");
        for i in 0..bundle.manifest.window {
            store.observe(&Transaction {
                key: key.clone(),
                ts: 1_522_540_800.0 + (i * 3_600) as f64,
                id: Some(format!("{card}-{i}")),
                label: None,
                labelled_at: None,
                numeric: vec![42.0 + (i % 5) as f64],
                context: vec!["1234".into()],
            });
        }
        let record = store
            .with_card(&key, |c| encode(c, recipe, 0))
            .expect("just observed");
        bytes += record.len();
        let partition = (card % partitions as usize) as i32;
        let mut next = BaseRecord::to(&topic)
            .key(&key)
            .payload(&record)
            .partition(partition);
        loop {
            match producer.send(next) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(std::time::Duration::from_millis(10));
                    next = back;
                }
            }
        }
        // The card's state is in the record; the store need not keep it.
        store.forget_shards(&[0]);
    }
    producer.flush(std::time::Duration::from_secs(120))?;
    let config = crate::stream::kafka::client_config(
        &broker.brokers,
        &[],
        &[("group.id", &format!("bench-restore-{suffix}"))],
    );
    let restorer = Restorer::new(config, &topic);
    let parts: Vec<(i32, Option<i64>)> = (0..partitions).map(|p| (p, Some(i64::MAX))).collect();
    let (restored, stats) = restorer.restore(&parts, &builder)?;
    drop(broker);
    anyhow::ensure!(
        restored.len() == cards,
        "restored {} of {cards} cards",
        restored.len()
    );
    let per_s = cards as f64 / stats.seconds;
    let per_record = bytes as f64 / cards as f64;
    if !args.json {
        println!(
            "restore: {cards} cards ({per_record:.0} bytes each) from a {partitions}-partition changelog in {:.2} s: {per_s:.0} cards/s",
            stats.seconds
        );
    }
    Ok(vec![(
        "restore",
        json!({"cards": cards, "seconds": (stats.seconds * 1000.0).round() / 1000.0,
               "cards_per_s": per_s.round(), "bytes_per_card": per_record.round(),
               "partitions": partitions}),
    )])
}

/// `replay`'s pacer against the broker: simulated transactions offered at `--replay-rate` for
/// `--replay-seconds`; the rate achieved is messages over the time until the last was
/// acknowledged.
fn replay_pacing(args: &BenchArgs) -> anyhow::Result<Vec<(&'static str, serde_json::Value)>> {
    if args.replay_rate <= 0.0 {
        return Ok(Vec::new());
    }
    let count = (args.replay_rate * args.replay_seconds).round().max(1.0) as usize;
    let mut days: Vec<Vec<crate::sim::SimTx>> = Vec::new();
    let mut taken = 0;
    for day in Simulator::new(SimConfig::default()) {
        let day: Vec<_> = day.into_iter().take(count - taken).collect();
        taken += day.len();
        days.push(day);
        if taken == count {
            break;
        }
    }
    let suffix = std::process::id();
    let topic = format!("bench-replay-{suffix}");
    let rt = tokio::runtime::Runtime::new()?;
    let broker = rt.block_on(DemoBroker::start(
        args.brokers.clone(),
        &topic,
        &format!("bench-replay-alerts-{suffix}"),
    ))?;
    // The pacer is timed, not the producer's start: its clock starts once the producer has had
    // time to get its idempotent producer id.
    let replayed = rt.block_on(replay_days(
        &broker.brokers,
        &topic,
        &days,
        Some(args.replay_rate),
        super::demo::BENCH_LINGER_MS,
        async { tokio::time::sleep(super::demo::PRODUCER_ID_RETRY).await },
    ))?;
    let (sent, achieved) = (replayed.count, replayed.count as f64 / replayed.seconds);
    drop(broker);
    if !args.json {
        println!(
            "replay pacing: {sent} messages offered at {} per second, {achieved:.1} per second achieved \
             ({:+.1}%)",
            args.replay_rate,
            (achieved / args.replay_rate - 1.0) * 100.0
        );
    }
    Ok(vec![(
        "replay_messages_per_s",
        json!({"offered": args.replay_rate, "achieved": (achieved * 10.0).round() / 10.0, "messages": sent}),
    )])
}

/// Resident set size in bytes (Linux).
fn rss_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}

/// Bytes of resident memory per card once `cards` cards each hold a full window, measured as
/// RSS growth of a fresh card store (ids like the simulator's).
fn memory_per_card(bundle: &Bundle, cards: usize) -> Option<f64> {
    use crate::features::{CardStore, wall_clock};
    use crate::schema::Transaction;
    let store = CardStore::with_limits(
        bundle.window_builder(),
        StateLimits::default(),
        wall_clock(),
    );
    let window = bundle.manifest.window;
    let before = rss_bytes()?;
    let mut id = 0u64;
    for round in 0..window {
        for card in 0..cards {
            id += 1;
            let tx = Transaction {
                key: card.to_string(),
                ts: 1_522_540_800.0 + (round * 3600) as f64,
                id: Some(id.to_string()),
                label: None,
                labelled_at: None,
                numeric: vec![42.0],
                context: vec!["1234".into()],
            };
            store.observe(&tx);
        }
    }
    let after = rss_bytes()?;
    Some((after - before) / cards as f64)
}

/// Bytes of heap per card in the worst case the input checks allow: card and transaction ids
/// of the longest accepted length ([`crate::schema::MAX_KEY_BYTES`]) and a transaction every
/// hour for 30 days, which fills every hourly bucket of the 30-day aggregates.
fn memory_per_card_worst(bundle: &Bundle, cards: usize) -> Option<f64> {
    use crate::features::{CardStore, wall_clock};
    use crate::schema::{MAX_KEY_BYTES, Transaction};
    let store = CardStore::with_limits(
        bundle.window_builder(),
        StateLimits::default(),
        wall_clock(),
    );
    let long = |prefix: &str, n: u64| {
        let head = format!("{prefix}{n}-");
        format!("{head}{}", "x".repeat(MAX_KEY_BYTES - head.len()))
    };
    let keys: Vec<String> = (0..cards as u64).map(|c| long("card", c)).collect();
    let before = heap_in_use()?;
    let mut id = 0u64;
    for hour in 0..=30 * 24 {
        for key in &keys {
            id += 1;
            store.observe(&Transaction {
                key: key.clone(),
                ts: 1_522_540_800.0 + f64::from(hour) * 3_600.0,
                id: Some(long("tx", id)),
                label: None,
                labelled_at: None,
                numeric: vec![42.0],
                context: vec!["1234".into()],
            });
        }
    }
    let after = heap_in_use()?;
    Some((after - before) / cards as f64)
}

/// Heap bytes in use (glibc's allocator statistics): unlike RSS, not hidden by memory that
/// earlier measurements freed.
fn heap_in_use() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as f64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        rss_bytes()
    }
}

/// Bytes per key value of the label-rate tables (a terminal with one label a day for the 37
/// days the default features reach back), as heap growth over `n` terminals; None when the
/// model has no label-rate feature.
fn memory_per_terminal(bundle: &Bundle, n: usize) -> Option<f64> {
    use crate::features::LabelTables;
    use crate::schema::LabelEvent;
    let spec = &bundle.manifest.spec;
    let keys = spec.label_keys().len();
    if keys == 0 {
        return None;
    }
    let tables = LabelTables::new(spec);
    let before = heap_in_use()?;
    let start = 1_522_540_800.0;
    for day in 0..37 {
        for t in 0..n {
            let ts = start + f64::from(day) * 86_400.0 + (t % 24) as f64 * 3_600.0;
            tables.apply(&LabelEvent {
                ts,
                known_at: ts + 7.0 * 86_400.0,
                is_fraud: t % 97 == 0,
                keys: vec![(5_000_000 + t).to_string(); keys],
            });
        }
    }
    let after = heap_in_use()?;
    Some((after - before) / n as f64)
}

/// Bytes per score remembered for live precision/recall (`--labels-topic`), measured as heap
/// growth while `n` scores with simulator-like ids are remembered.
fn memory_per_remembered_score(n: usize) -> Option<f64> {
    use crate::observe::{LiveQuality, QualitySettings};
    let metrics = Metrics::new(prometheus::Registry::new()).ok()?;
    let quality = LiveQuality::new(QualitySettings::default());
    // Every decision shares its model's version string, as in the detector.
    let version: std::sync::Arc<str> = "bench".into();
    let before = heap_in_use()?;
    for i in 0..n {
        let verdicts = crate::observe::Verdicts {
            champion: (version.clone(), i % 100 == 0),
            challenger: None,
        };
        quality.remember(&(10_000_000 + i).to_string(), verdicts, 0, &metrics);
    }
    let after = heap_in_use()?;
    Some((after - before) / n as f64)
}
