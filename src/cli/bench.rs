//! `fraudstream bench`: inference and end-to-end throughput, printed as numbers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::model::{Bundle, FastModel};
use crate::schema::Format;
use crate::sim::{SimConfig, SimWriter, Simulator};
use crate::stream::{BatchSettings, Detector, EmbeddedConfig, Endpoint, run_embedded};

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
    #[arg(long, default_value_t = 3)]
    pub days: u32,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
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

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let bundle = Bundle::load_or_default(args.model.as_deref(), &Device::Cpu)
        .context("loading the model")?;
    let (window, width) = (bundle.manifest.window, bundle.manifest.architecture.input);
    let mut inference = serde_json::Map::new();
    for batch in [1usize, 32, 256] {
        let rate = inference_rate(&bundle.fast, window, width, batch, args.seconds);
        if !args.json {
            println!("inference batch {batch:>3}: {rate:>8.0} windows/s");
        }
        inference.insert(batch.to_string(), json!(rate.round()));
    }
    // End to end through the embedded transport: simulated JSONL in, alerts out.
    let dir = tempfile_dir()?;
    let input = dir.join("bench.jsonl");
    let sim = Simulator::new(SimConfig {
        days: args.days,
        ..SimConfig::default()
    });
    let mut w = SimWriter::new(std::fs::File::create(&input)?, Format::Jsonl, 5_000)?;
    for day in sim {
        w.write_day(&day)?;
    }
    let transactions = w.finish()?.transactions;
    let detector = Arc::new(Detector::new(&bundle, 1 << 20));
    let cfg = EmbeddedConfig {
        input: Endpoint::File(input),
        format: Some(Format::Jsonl),
        alerts: Endpoint::File(dir.join("alerts.jsonl")),
        scores: None,
        dead_letters: None,
        batch: BatchSettings {
            max_batch: 256,
            max_wait: Duration::from_millis(5),
            queue: 4096,
        },
    };
    let rt = tokio::runtime::Runtime::new()?;
    let stats = rt.block_on(run_embedded(detector, cfg, std::future::pending(), |_| {}))?;
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        stats.scored == transactions,
        "scored {} of {transactions}",
        stats.scored
    );
    let out = json!({
        "inference_windows_per_s": inference,
        "end_to_end_tx_per_s": stats.throughput().round(),
        "latency_ms": {"p50": stats.latency_ms(0.5), "p99": stats.latency_ms(0.99)},
        "end_to_end_transport": "embedded file (simulated JSONL in, alerts JSONL out)",
        "transactions": transactions,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "end to end ({} transactions, embedded file transport): {:.0} tx/s, latency p50 {:.2} ms, p99 {:.2} ms",
            transactions,
            stats.throughput(),
            stats.latency_ms(0.5),
            stats.latency_ms(0.99)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fraudstream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
