//! Loading a transaction file for train/evaluate: spinner, bad-row report, time sort.

use std::path::Path;

use anyhow::Context;

use crate::schema::{FeatureSpec, Format, Transaction, load};

/// `--data FILE [--spec S] [--format F]`: the options of every command that reads a transaction
/// file through a feature spec.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Transactions (CSV or JSONL; `-` is standard input where the command streams).
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Feature spec: `cards`, `ulb`, or a TOML file (gives the card, time, id and label fields).
    #[arg(long, default_value = "cards")]
    pub spec: String,
    /// File format; by default from the extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

/// Reads `path` through `spec`, warns about bad rows (the first few with line numbers), and
/// returns the valid transactions sorted by event time.
pub(crate) fn load_sorted(
    path: &Path,
    format: Option<Format>,
    spec: &FeatureSpec,
) -> anyhow::Result<Vec<Transaction>> {
    let format = format.unwrap_or_else(|| Format::from_path(path));
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("reading {}", path.display()));
    let mut loaded = load(&path.to_string_lossy(), format, spec, 5, |line| {
        if line % 50_000 == 0 {
            bar.set_message(format!("reading {}: line {line}", path.display()));
            bar.tick();
        }
    })
    .with_context(|| format!("loading {}", path.display()))?;
    bar.finish_and_clear();
    if loaded.bad_rows > 0 {
        eprintln!(
            "skipped {} bad rows in {}:",
            loaded.bad_rows,
            path.display()
        );
        for bad in &loaded.first_bad {
            eprintln!("  {bad}");
        }
    }
    anyhow::ensure!(
        !loaded.transactions.is_empty(),
        "{} has no valid transactions for spec `{}`",
        path.display(),
        spec.name
    );
    loaded.sort_by_time();
    Ok(loaded.transactions)
}

/// Formats event-time seconds as a UTC date-time when they look like unix time.
pub(crate) fn show_time(ts: f64) -> String {
    if ts > 1e8 {
        chrono::DateTime::from_timestamp(ts as i64, 0).map_or_else(
            || ts.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
        )
    } else {
        format!("{ts}s")
    }
}
