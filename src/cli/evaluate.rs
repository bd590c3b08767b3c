//! `fraudstream evaluate`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use serde_json::json;

use super::data::{load_sorted, show_time};
use crate::model::Bundle;
use crate::report::{self, ReportInput};
use crate::schema::Format;
use crate::schema::RecordReader;
use crate::schema::Span;
use crate::train::metrics::{GroupRecall, Summary, daily_card_precision, f1, recall_by_group};
use crate::train::{TrainingReport, WindowSet, parse_date};

/// Options of `evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Model bundle directory (default: the built-in `models/default`). Give it twice to compare
    /// two bundles on the same transactions (`builtin` names the built-in model).
    #[arg(long, num_args = 1)]
    pub model: Vec<PathBuf>,
    /// Labelled transactions (CSV or JSONL) in the bundle's spec.
    #[arg(long)]
    pub data: PathBuf,
    /// File format; by default from the extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Count transactions from this time on (earlier ones still feed the windows).
    #[arg(long)]
    pub from: Option<String>,
    /// Count transactions before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Directory for the HTML report and its PNG plots.
    #[arg(long, default_value = "report")]
    pub report: PathBuf,
    /// Skip the HTML report.
    #[arg(long)]
    pub no_report: bool,
    /// Labels without a `labelled_at` column count as known this long after their transaction
    /// (default: the delay the model was trained with).
    #[arg(long)]
    pub label_delay: Option<Span>,
    /// Also report recall per value of this column of the file (e.g. the simulator's
    /// `scenario`); needs the spec's transaction id to join rows.
    #[arg(long)]
    pub group_by: Option<String>,
    /// Write per-transaction scores as CSV (transaction_id, card_id, ts, score, label).
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
    /// Scoring arithmetic (as `serve --precision`): compare bf16 or int8 with f32 on the same file.
    #[arg(long, value_enum, default_value_t = crate::model::Precision::F32)]
    pub precision: crate::model::Precision,
    /// Also score at this precision and report what `--precision` changes against it: the
    /// score differences, the alert decisions that differ at the bundle's threshold, and both
    /// average precisions (e.g. `--precision int8 --against-precision f32`).
    #[arg(long, value_enum)]
    pub against_precision: Option<crate::model::Precision>,
    /// Comparing two models: bootstrap resamples for the interval on the AP difference.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Comparing two models: the bootstrap's seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Loads `--model DIR` (or the built-in model for none or `builtin`).
pub(crate) fn load_bundle(dir: Option<&std::path::Path>) -> anyhow::Result<Bundle> {
    let dir = dir.filter(|d| d.as_os_str() != "builtin" || d.exists());
    Bundle::load_or_default(dir, &Device::Cpu).with_context(|| match dir {
        Some(dir) => format!("loading model {}", dir.display()),
        None => "loading the built-in model".into(),
    })
}

pub(crate) fn run(args: EvaluateArgs) -> anyhow::Result<ExitCode> {
    crate::model::set_precision(args.precision).map_err(anyhow::Error::msg)?;
    if args.model.len() > 2 {
        anyhow::bail!(
            "--model given {} times: evaluate compares at most two models",
            args.model.len()
        );
    }
    let bundle = load_bundle(args.model.first().map(PathBuf::as_path))?;
    let m = &bundle.manifest;
    let set = windows(&args, &bundle)?;
    let bar = super::progress(set.len() as u64, "windows");
    bar.set_message("scoring");
    let scores = set.score(&bundle.fast, 512, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    let threshold = bundle.threshold();
    let summary = Summary::compute(&scores, &set.labels, &set.keys, &set.ts, threshold);
    let against = match args.against_precision {
        Some(p) => {
            let path = p.path().map_err(anyhow::Error::msg)?;
            let bar = super::progress(set.len() as u64, "windows");
            bar.set_message(format!("scoring again at {}", precision_name(p)));
            let other = set.score_on(&bundle.fast, 512, path, |n| bar.set_position(n as u64));
            bar.finish_and_clear();
            let other_summary =
                Summary::compute(&other, &set.labels, &set.keys, &set.ts, threshold);
            Some(PrecisionComparison::new(
                p,
                &scores,
                &other,
                threshold,
                summary.average_precision,
                other_summary.average_precision,
            ))
        }
        None => None,
    };
    let daily = daily_card_precision(&scores, &set.labels, &set.keys, &set.ts, 100);
    let groups = match &args.group_by {
        Some(column) => {
            let values = group_values(&args.data, args.format, m, column)?;
            let of = |id: &Option<String>| {
                id.as_ref()
                    .and_then(|i| values.get(i))
                    .cloned()
                    .unwrap_or_default()
            };
            let g: Vec<String> = set.ids.iter().map(of).collect();
            Some((column, recall_by_group(&scores, &set.labels, &g, threshold)))
        }
        None => None,
    };
    if let Some(path) = &args.scores_out {
        write_scores(path, &set, &scores).with_context(|| format!("writing {}", path.display()))?;
    }
    let report_path = if args.no_report {
        None
    } else {
        let input = ReportInput {
            manifest: m,
            data_label: format!(
                "{} from {} to {}",
                args.data.display(),
                show_time(set.ts[0]),
                show_time(set.ts[set.len() - 1])
            ),
            summary: &summary,
            scores: &scores,
            labels: &set.labels,
            daily: &daily,
        };
        Some(report::write(&args.report, &input)?)
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["model"] = json!({"name": m.name, "version": m.version, "sha256": m.weights_sha256});
        v["card_precision_at_100_daily"] = json!(daily);
        if let Some((column, g)) = &groups {
            v["recall_by"] = json!({ column.as_str(): g });
        }
        if let Some(c) = &against {
            v["against_precision"] = serde_json::to_value(c)?;
        }
        if let Some(p) = &report_path {
            v["report"] = json!(p.display().to_string());
        }
        println!("{v}");
    } else {
        print_text(&bundle, &summary, &daily, report_path.as_deref());
        if let Some((column, g)) = &groups {
            print_groups(column, g);
        }
        if let Some(c) = &against {
            c.print(args.precision);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn precision_name(p: crate::model::Precision) -> String {
    format!("{p:?}").to_lowercase()
}

/// What scoring at `--precision` changes against `--against-precision`, on the same windows.
#[derive(Debug, serde::Serialize)]
struct PrecisionComparison {
    /// The precision compared against.
    against: String,
    /// Largest, 99.9th percentile and mean absolute score difference.
    max_score_difference: f64,
    p999_score_difference: f64,
    mean_score_difference: f64,
    /// Transactions alerted by one and not the other at the bundle's threshold.
    decisions_changed: u64,
    /// The fraction of transactions whose alert decision is the same.
    decisions_kept: f64,
    /// Average precision at `against` and this precision's minus it.
    against_average_precision: f64,
    average_precision_difference: f64,
}

impl PrecisionComparison {
    fn new(
        against: crate::model::Precision,
        scores: &[f32],
        other: &[f32],
        threshold: f64,
        ap: f64,
        other_ap: f64,
    ) -> Self {
        let mut diffs: Vec<f64> = scores
            .iter()
            .zip(other)
            .map(|(a, b)| f64::from((a - b).abs()))
            .collect();
        diffs.sort_by(f64::total_cmp);
        let n = diffs.len().max(1);
        let alert = |s: f32| f64::from(s) >= threshold;
        let changed = scores
            .iter()
            .zip(other)
            .filter(|(a, b)| alert(**a) != alert(**b))
            .count() as u64;
        PrecisionComparison {
            against: precision_name(against),
            max_score_difference: diffs.last().copied().unwrap_or(0.0),
            p999_score_difference: diffs.get(n * 999 / 1000).copied().unwrap_or(0.0),
            mean_score_difference: diffs.iter().sum::<f64>() / n as f64,
            decisions_changed: changed,
            decisions_kept: 1.0 - changed as f64 / n as f64,
            against_average_precision: other_ap,
            average_precision_difference: ap - other_ap,
        }
    }

    fn print(&self, precision: crate::model::Precision) {
        println!();
        println!("{} against {}:", precision_name(precision), self.against);
        println!(
            "  score difference: max {:.4}  p99.9 {:.4}  mean {:.5}",
            self.max_score_difference, self.p999_score_difference, self.mean_score_difference
        );
        println!(
            "  alert decisions changed: {} ({:.4}% kept)",
            self.decisions_changed,
            100.0 * self.decisions_kept
        );
        println!(
            "  average precision: {:.5} against {:.5} ({:+.5})",
            self.against_average_precision + self.average_precision_difference,
            self.against_average_precision,
            self.average_precision_difference
        );
    }
}

/// The windows of the transactions between --from and --until, every earlier one feeding them,
/// labels known as the bundle was trained to assume (unless --label-delay says otherwise).
pub(crate) fn windows(args: &EvaluateArgs, bundle: &Bundle) -> anyhow::Result<WindowSet> {
    let m = &bundle.manifest;
    let bound = |v: &Option<String>, default: f64| -> anyhow::Result<f64> {
        Ok(v.as_deref().map(parse_date).transpose()?.unwrap_or(default))
    };
    let (from, until) = (
        bound(&args.from, f64::NEG_INFINITY)?,
        bound(&args.until, f64::INFINITY)?,
    );
    let txs = load_sorted(&args.data, args.format, &m.spec)?;
    let builder = bundle.window_builder();
    let mut set = WindowSet::new(builder.window_len(), builder.width());
    let label_delay = args
        .label_delay
        .unwrap_or_else(|| TrainingReport::label_delay_of(m));
    builder.replay(&txs, label_delay, |tx, w| {
        if tx.ts >= from && tx.ts < until {
            set.push(w);
        }
    });
    anyhow::ensure!(
        !set.is_empty(),
        "no transactions between --from and --until"
    );
    Ok(set)
}

fn print_groups(column: &str, g: &std::collections::BTreeMap<String, GroupRecall>) {
    println!();
    println!("recall by {column} (at the threshold):");
    for (value, r) in g.iter().filter(|(_, r)| r.frauds > 0) {
        println!(
            "  {column} {value:<10} {:>6} frauds  {:>6} alerted  recall {:.3}",
            r.frauds, r.alerted, r.recall
        );
    }
}

/// Each transaction id's value of `column`, read from the file (the spec does not carry it).
pub(crate) fn group_values(
    path: &std::path::Path,
    format: Option<Format>,
    m: &crate::model::Manifest,
    column: &str,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let id = m
        .spec
        .id
        .as_deref()
        .context("--group-by needs a spec with a transaction id to join on")?;
    let format = format.unwrap_or_else(|| Format::from_path(path));
    let mut reader = RecordReader::open(&path.to_string_lossy(), format)?;
    let mut out = std::collections::HashMap::new();
    let text = |obj: &serde_json::Map<String, serde_json::Value>, f: &str| {
        obj.get(f).map(|v| match v {
            serde_json::Value::String(s) => s.trim().to_string(),
            v => v.to_string(),
        })
    };
    while let Some(row) = reader.next_row() {
        let Ok(r) = row?.1 else { continue };
        let obj = r.into_json();
        if let (Some(i), Some(g)) = (text(&obj, id), text(&obj, column)) {
            out.insert(i, g);
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no row of {} has a `{column}` column",
        path.display()
    );
    Ok(out)
}

fn write_scores(path: &std::path::Path, set: &WindowSet, scores: &[f32]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "transaction_id,card_id,ts,score,label")?;
    for (i, score) in scores.iter().enumerate() {
        let id = set.ids[i].as_deref().unwrap_or("");
        writeln!(
            out,
            "{id},{},{},{:.6},{}",
            set.keys[i],
            set.ts[i],
            score,
            u8::from(set.labels[i])
        )?;
    }
    out.flush()
}

fn print_text(
    bundle: &Bundle,
    s: &Summary,
    daily: &[(i64, f64)],
    report: Option<&std::path::Path>,
) {
    let m = &bundle.manifest;
    let c = &s.confusion;
    // Undefined ratios print as 0, as scikit-learn's classification report does.
    let (np, nr) = c.negative_precision_recall();
    let (np, nr) = (np.unwrap_or(0.0), nr.unwrap_or(0.0));
    println!(
        "model:          {} {} (threshold {:.4}, {})",
        m.name,
        m.version,
        s.threshold,
        serde_json::to_string(&m.threshold.rule).unwrap_or_default()
    );
    println!(
        "transactions:   {} ({} fraud, {:.3}%)",
        s.transactions,
        s.frauds,
        100.0 * s.frauds as f64 / s.transactions.max(1) as f64
    );
    println!("ROC AUC:        {:.4}", s.roc_auc);
    println!("avg precision:  {:.4}", s.average_precision);
    println!(
        "at threshold:   precision {:.4}  recall {:.4}  F1 {:.4}  alert rate {:.3}%",
        s.precision,
        s.recall,
        s.f1,
        100.0 * s.alert_rate
    );
    println!();
    println!("classification report:");
    println!("              precision    recall  f1-score   support");
    println!(
        "  legitimate     {np:.4}    {nr:.4}    {:.4}  {:>8}",
        f1(np, nr),
        c.tn + c.fp
    );
    println!(
        "  fraud          {:.4}    {:.4}    {:.4}  {:>8}",
        s.precision,
        s.recall,
        s.f1,
        c.tp + c.fn_
    );
    println!();
    println!("confusion matrix (rows actual, columns predicted):");
    println!("                 legitimate      fraud");
    println!("  legitimate   {:>11} {:>10}", c.tn, c.fp);
    println!("  fraud        {:>11} {:>10}", c.fn_, c.tp);
    println!();
    println!(
        "card precision@100: {:.4} (mean of {} days)",
        s.card_precision_at_100,
        daily.len()
    );
    for chunk in daily.chunks(7) {
        let line: Vec<String> = chunk
            .iter()
            .map(|(d, p)| {
                let day = chrono::DateTime::from_timestamp(d * 86_400, 0)
                    .map_or(d.to_string(), |t| t.format("%m-%d").to_string());
                format!("{day} {p:.2}")
            })
            .collect();
        println!("  {}", line.join("  "));
    }
    if let Some(p) = report {
        println!();
        println!("report: {}", p.display());
    }
}
