//! `fraudstream serve` (embedded file/stdin transport).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::model::Bundle;
use crate::schema::Format;
use crate::stream::{BatchSettings, Detector, EmbeddedConfig, Endpoint, run_embedded};

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model bundle directory (default: the built-in `models/default`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Transactions to score: `file:PATH` (JSONL or CSV) or `-` (JSONL on stdin).
    #[arg(long)]
    pub input: Endpoint,
    /// Input format; by default from the file extension (stdin: JSONL).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Where alerts go, as JSONL: `file:PATH` or `-` (stdout).
    #[arg(long, default_value = "-")]
    pub output: Endpoint,
    /// Also write every score, as JSONL.
    #[arg(long)]
    pub scores_output: Option<Endpoint>,
    /// Write dead letters (bad records) as JSONL; they are always counted and logged.
    #[arg(long)]
    pub dead_letter_output: Option<Endpoint>,
    /// Score a batch when this many windows wait...
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// ...or when the oldest has waited this long (milliseconds).
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Capacity of the queues between stages (back-pressure beyond it).
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    /// Larger messages are dead-lettered without parsing.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested: draining");
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.max_batch > 0 && args.queue > 0,
        "--max-batch and --queue must be positive"
    );
    let bundle = Bundle::load_or_default(args.model.as_deref(), &Device::Cpu)
        .context("loading the model")?;
    tracing::info!(
        model = %bundle.manifest.name,
        version = %bundle.manifest.version,
        threshold = bundle.threshold(),
        "model loaded"
    );
    let detector = Arc::new(Detector::new(&bundle, args.max_message_bytes));
    let cfg = EmbeddedConfig {
        input: args.input,
        format: args.format,
        alerts: args.output,
        scores: args.scores_output,
        dead_letters: args.dead_letter_output,
        batch: BatchSettings {
            max_batch: args.max_batch,
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue: args.queue,
        },
    };
    let rt = tokio::runtime::Runtime::new()?;
    let stats = rt.block_on(run_embedded(detector, cfg, shutdown_signal(), |_| {}))?;
    eprintln!("{}", stats.summary());
    Ok(ExitCode::SUCCESS)
}
