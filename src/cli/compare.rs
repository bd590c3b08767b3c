//! `fraudstream evaluate --model A --model B`: two bundles scored on the same transactions,
//! side by side, with a paired bootstrap interval on the difference in average precision, so a
//! team knows whether a retrained model is really better before it promotes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use super::data::show_time;
use super::evaluate::{EvaluateArgs, load_bundle, windows};
use crate::model::Bundle;
use crate::report;
use crate::train::WindowSet;
use crate::train::metrics::{ApDifference, Summary, paired_bootstrap_ap};

/// One side of the comparison.
struct Side {
    bundle: Bundle,
    set: WindowSet,
    scores: Vec<f32>,
    summary: Summary,
}

pub(crate) fn run(args: &EvaluateArgs) -> anyhow::Result<ExitCode> {
    crate::model::set_precision(args.precision).map_err(anyhow::Error::msg)?;
    let mut sides = Vec::with_capacity(2);
    for (name, dir) in ["A", "B"].iter().zip(&args.model) {
        let bundle = load_bundle(Some(dir))?;
        let mut set = windows(args, &bundle)?;
        let bar = super::progress(set.len() as u64, "windows");
        bar.set_prefix(format!("model {name}"));
        bar.set_message("scoring");
        let scores = set.score(&bundle.fast, 512, |n| bar.set_position(n as u64));
        bar.finish_and_clear();
        // The windows are scored: free them before the second model builds its own.
        set.data = Vec::new();
        let summary =
            Summary::compute(&scores, &set.labels, &set.keys, &set.ts, bundle.threshold());
        sides.push(Side {
            bundle,
            set,
            scores,
            summary,
        });
    }
    let (a, b) = (&sides[0], &sides[1]);
    paired(&a.set, &b.set, &args.model)?;
    let bar = super::progress(args.bootstrap as u64, "resamples");
    bar.set_message("paired bootstrap of the AP difference");
    let diff = paired_bootstrap_ap(
        &a.scores,
        &b.scores,
        &a.set.labels,
        args.bootstrap,
        args.seed,
        || bar.inc(1),
    );
    bar.finish_and_clear();
    if let Some(path) = &args.scores_out {
        write_scores(path, a, b).with_context(|| format!("writing {}", path.display()))?;
    }
    let report_path = if args.no_report {
        None
    } else {
        let data_label = format!(
            "{} from {} to {}",
            args.data.display(),
            show_time(a.set.ts[0]),
            show_time(a.set.ts[a.set.len() - 1])
        );
        let input = report::CompareInput {
            data_label,
            models: [side_input(a), side_input(b)],
            labels: &a.set.labels,
            difference: &diff,
        };
        Some(report::write_comparison(&args.report, &input)?)
    };
    if args.json {
        let side = |s: &Side| {
            let m = &s.bundle.manifest;
            let mut v = serde_json::to_value(&s.summary).expect("a summary serialises");
            v["model"] = json!({"name": m.name, "version": m.version, "sha256": m.weights_sha256});
            v
        };
        let mut v = json!({
            "a": side(a),
            "b": side(b),
            "ap_difference": diff,
            "verdict": diff.verdict(),
        });
        if let Some(p) = &report_path {
            v["report"] = json!(p.display().to_string());
        }
        println!("{v}");
    } else {
        print_text(a, b, &diff, report_path.as_deref());
    }
    Ok(ExitCode::SUCCESS)
}

fn side_input(s: &Side) -> report::CompareSide<'_> {
    report::CompareSide {
        manifest: &s.bundle.manifest,
        summary: &s.summary,
        scores: &s.scores,
    }
}

/// Both bundles must have read the same transactions in the same order (a different spec can
/// parse a file differently): the bootstrap pairs them row by row.
fn paired(a: &WindowSet, b: &WindowSet, dirs: &[PathBuf]) -> anyhow::Result<()> {
    let same = a.len() == b.len()
        && a.keys == b.keys
        && a.ts == b.ts
        && a.labels == b.labels
        && a.ids == b.ids;
    anyhow::ensure!(
        same,
        "{} and {} read the data differently ({} vs {} transactions scored, or different cards, \
         times or labels): their specs differ, so their scores cannot be paired",
        dirs[0].display(),
        dirs[1].display(),
        a.len(),
        b.len()
    );
    Ok(())
}

fn write_scores(path: &Path, a: &Side, b: &Side) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "transaction_id,card_id,ts,score_a,score_b,label")?;
    let set = &a.set;
    for i in 0..set.len() {
        writeln!(
            out,
            "{},{},{},{:.6},{:.6},{}",
            set.ids[i].as_deref().unwrap_or(""),
            set.keys[i],
            set.ts[i],
            a.scores[i],
            b.scores[i],
            u8::from(set.labels[i])
        )?;
    }
    out.flush()
}

fn print_text(a: &Side, b: &Side, d: &ApDifference, report: Option<&Path>) {
    let (sa, sb) = (&a.summary, &b.summary);
    let (ma, mb) = (&a.bundle.manifest, &b.bundle.manifest);
    println!(
        "transactions:    {} ({} fraud, {:.3}%)",
        sa.transactions,
        sa.frauds,
        100.0 * sa.frauds as f64 / sa.transactions.max(1) as f64
    );
    println!();
    println!("{:<22} {:>24} {:>24}", "", "A", "B");
    let row = |name: &str, x: String, y: String| println!("{name:<22} {x:>24} {y:>24}");
    row("model", ma.name.clone(), mb.name.clone());
    row("version", ma.version.clone(), mb.version.clone());
    row(
        "threshold",
        format!("{:.4}", sa.threshold),
        format!("{:.4}", sb.threshold),
    );
    let num = |name: &str, f: &dyn Fn(&Summary) -> f64| {
        row(name, format!("{:.4}", f(sa)), format!("{:.4}", f(sb)));
    };
    num("avg precision", &|s| s.average_precision);
    num("ROC AUC", &|s| s.roc_auc);
    num("precision", &|s| s.precision);
    num("recall", &|s| s.recall);
    num("F1", &|s| s.f1);
    num("alert rate %", &|s| 100.0 * s.alert_rate);
    num("card precision@100", &|s| s.card_precision_at_100);
    row(
        "alerts",
        (sa.confusion.tp + sa.confusion.fp).to_string(),
        (sb.confusion.tp + sb.confusion.fp).to_string(),
    );
    println!();
    println!(
        "AP(B) - AP(A):   {:+.4}, 95% interval [{:+.4}, {:+.4}] (paired bootstrap, {} resamples, seed {}; B higher in {:.1}% of them)",
        d.difference,
        d.low,
        d.high,
        d.resamples,
        d.seed,
        100.0 * d.b_better_fraction
    );
    println!("verdict:         {}", d.verdict());
    if let Some(p) = report {
        println!();
        println!("report: {}", p.display());
    }
}
