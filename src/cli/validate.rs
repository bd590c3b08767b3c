//! `fraudstream validate` and `fraudstream spec`.

use std::collections::HashSet;
use std::process::ExitCode;

use clap::Args;

use crate::schema::{FeatureSpec, Format, load};

/// Options of `validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The transaction file, its feature spec and format.
    #[command(flatten)]
    pub input: super::data::DataArgs,
    /// How many bad rows to print.
    #[arg(long, default_value_t = 10)]
    pub show: usize,
}

/// Options of `spec`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// `ulb`, `cards`, or a TOML file to check and print.
    #[arg(default_value = "cards")]
    pub spec: String,
}

pub(crate) fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let spec = FeatureSpec::resolve(&args.input.spec)?;
    let format = args
        .input
        .format
        .unwrap_or_else(|| Format::from_path(&args.input.data));
    let path = args.input.data.to_string_lossy();
    let bar = indicatif::ProgressBar::new_spinner();
    let loaded = load(&path, format, &spec, args.show, |line| {
        if line % 100_000 == 0 {
            bar.set_message(format!("line {line}"));
            bar.tick();
        }
    })?;
    bar.finish_and_clear();
    let txs = &loaded.transactions;
    let cards: HashSet<&str> = txs.iter().map(|t| t.key.as_str()).collect();
    let labelled = txs.iter().filter(|t| t.label.is_some()).count();
    let frauds = txs.iter().filter(|t| t.label == Some(true)).count();
    let (lo, hi) = txs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), t| {
            (lo.min(t.ts), hi.max(t.ts))
        });
    println!("spec:         {} ({} features)", spec.name, spec.width());
    println!("valid rows:   {}", txs.len());
    println!("bad rows:     {}", loaded.bad_rows);
    println!("cards:        {}", cards.len());
    println!("labelled:     {labelled} ({frauds} fraud)");
    if !txs.is_empty() {
        println!("event time:   {lo} .. {hi}");
    }
    for bad in &loaded.first_bad {
        println!("  {path}: {bad}");
    }
    Ok(if loaded.bad_rows == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn print_spec(args: SpecArgs) -> anyhow::Result<ExitCode> {
    let spec = FeatureSpec::resolve(&args.spec)?;
    print!("{}", spec.to_toml());
    Ok(ExitCode::SUCCESS)
}
