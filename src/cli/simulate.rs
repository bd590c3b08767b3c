//! `fraudstream simulate`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chrono::NaiveDate;
use clap::Args;

use crate::schema::Format;
use crate::sim::{SimConfig, SimWriter, Simulator};

/// Options of `simulate`; defaults reproduce the Fraud Detection Handbook's data set.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of cards.
    #[arg(long, default_value_t = 5_000)]
    pub cards: usize,
    /// Number of terminals.
    #[arg(long, default_value_t = 10_000)]
    pub terminals: usize,
    /// Number of days to simulate.
    #[arg(long, default_value_t = 183)]
    pub days: u32,
    /// First day (UTC), YYYY-MM-DD.
    #[arg(long, default_value = "2018-04-01")]
    pub start: NaiveDate,
    /// Random seed: the same seed gives the same file.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output file, or `-` for standard output.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Output format; by default from the file extension (.jsonl is JSONL, else CSV).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

pub(crate) fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.cards > 0, "--cards must be positive");
    anyhow::ensure!(args.terminals > 0, "--terminals must be positive");
    let cfg = SimConfig {
        cards: args.cards,
        terminals: args.terminals,
        days: args.days,
        start: args.start,
        seed: args.seed,
        ..SimConfig::default()
    };
    let format = args.format.unwrap_or_else(|| Format::from_path(&args.out));
    let sink: Box<dyn Write> = if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?,
        )
    };
    let began = Instant::now();
    let sim = Simulator::new(cfg.clone());
    let mut writer = SimWriter::new(sink, format, cfg.cards)?;
    let bar = super::progress(u64::from(cfg.days), "days");
    for day in sim {
        writer.write_day(&day).context("writing transactions")?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let s = writer.finish().context("flushing output")?;
    eprintln!(
        "simulated {} transactions over {} days ({} active cards): {} frauds ({:.3}%) \
         [scenario 1: {}, 2: {}, 3: {}] in {:.1}s -> {}",
        s.transactions,
        s.days,
        s.active_cards,
        s.frauds,
        100.0 * s.fraud_rate(),
        s.by_scenario[0],
        s.by_scenario[1],
        s.by_scenario[2],
        began.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
