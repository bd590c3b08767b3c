//! The evaluation report: PNG plots and one HTML page that shows them with the numbers.

pub mod plots;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::model::Manifest;
use crate::train::metrics::{self, Summary};
use crate::train::{EpochRecord, TrainingReport};

/// Why the report could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The directory or the page could not be written.
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
    /// No font to draw the plots' text with.
    #[error("{0}")]
    Font(String),
    /// A plot failed.
    #[error("plot {name}: {message}")]
    Plot {
        /// Which plot.
        name: &'static str,
        /// The plotting library's error.
        message: String,
    },
}

/// Everything the report shows.
pub struct ReportInput<'a> {
    /// The evaluated bundle's manifest.
    pub manifest: &'a Manifest,
    /// Which data was evaluated (shown in the header).
    pub data_label: String,
    /// The headline numbers.
    pub summary: &'a Summary,
    /// Scores of the evaluated transactions.
    pub scores: &'a [f32],
    /// Their labels.
    pub labels: &'a [bool],
    /// Card precision@100 per day.
    pub daily: &'a [(i64, f64)],
}

/// Writes `index.html` and its PNGs into `dir`; returns the HTML path.
pub fn write(dir: &Path, input: &ReportInput) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir)?;
    plots::ensure_font().map_err(ReportError::Font)?;
    let s = input.summary;
    let png = |name: &str| dir.join(name);
    let history: Vec<EpochRecord> = TrainingReport::of(input.manifest)
        .map(|r| r.history)
        .unwrap_or_default();
    let curve = metrics::pr_curve(input.scores, input.labels);
    let roc = metrics::roc_curve(input.scores, input.labels);
    let thin = |n: usize| (n / 2000).max(1);
    let curve_thin: Vec<_> = curve.iter().step_by(thin(curve.len())).copied().collect();
    let roc_thin: Vec<_> = roc
        .iter()
        .step_by(thin(roc.len()))
        .copied()
        .chain(roc.last().copied())
        .collect();
    let prevalence = s.frauds as f64 / s.transactions.max(1) as f64;
    let plot = |r: Result<(), String>, name: &'static str| {
        r.map_err(|message| ReportError::Plot { name, message })
    };
    plot(
        plots::class_distribution(
            &png("class_distribution.png"),
            s.transactions - s.frauds,
            s.frauds,
        ),
        "classes",
    )?;
    plot(
        plots::pr_curve(
            &png("pr_curve.png"),
            &curve_thin,
            (s.recall, s.precision),
            s.average_precision,
            prevalence,
        ),
        "pr",
    )?;
    plot(
        plots::roc_curve(&png("roc_curve.png"), &roc_thin, s.roc_auc),
        "roc",
    )?;
    plot(
        plots::confusion(&png("confusion_matrix.png"), &s.confusion),
        "confusion",
    )?;
    plot(
        plots::score_histograms(
            &png("score_histograms.png"),
            input.scores,
            input.labels,
            s.threshold,
        ),
        "scores",
    )?;
    plot(
        plots::daily_card_precision(&png("card_precision_daily.png"), input.daily),
        "daily",
    )?;
    let has_history = !history.is_empty();
    if has_history {
        plot(
            plots::training_curves(&png("training_curves.png"), &history),
            "training",
        )?;
    }
    let html = dir.join("index.html");
    std::fs::write(&html, render(input, &history, has_history))?;
    Ok(html)
}

/// One model of a comparison.
pub struct CompareSide<'a> {
    /// Its manifest.
    pub manifest: &'a Manifest,
    /// Its headline numbers.
    pub summary: &'a Summary,
    /// Its scores, row for row with the other model's.
    pub scores: &'a [f32],
}

/// What `evaluate --model A --model B` shows.
pub struct CompareInput<'a> {
    /// Which data was evaluated.
    pub data_label: String,
    /// A and B.
    pub models: [CompareSide<'a>; 2],
    /// The labels both were scored against.
    pub labels: &'a [bool],
    /// The paired bootstrap of the AP difference.
    pub difference: &'a metrics::ApDifference,
}

/// Writes `compare.html` and `pr_compare.png` into `dir`; returns the HTML path.
pub fn write_comparison(dir: &Path, input: &CompareInput) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir)?;
    plots::ensure_font().map_err(ReportError::Font)?;
    let thin = |n: usize| (n / 2000).max(1);
    let curves: Vec<(String, Vec<metrics::PrPoint>, (f64, f64))> = ["A", "B"]
        .iter()
        .zip(&input.models)
        .map(|(name, m)| {
            let curve = metrics::pr_curve(m.scores, input.labels);
            let thinned = curve.iter().step_by(thin(curve.len())).copied().collect();
            let s = m.summary;
            let label = format!(
                "{name}: {} {} (AP {:.3})",
                m.manifest.name, m.manifest.version, s.average_precision
            );
            (label, thinned, (s.recall, s.precision))
        })
        .collect();
    let s = input.models[0].summary;
    let prevalence = s.frauds as f64 / s.transactions.max(1) as f64;
    plots::pr_curves(
        &dir.join("pr_compare.png"),
        "Precision-recall: A and B",
        &curves,
        prevalence,
    )
    .map_err(|message| ReportError::Plot {
        name: "pr_compare",
        message,
    })?;
    let d = input.difference;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>fraudstream comparison</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f4f4f4}}img{{max-width:720px;margin:6px;border:1px solid #eee}}code{{background:#f4f4f4}}</style></head><body>
<h1>fraudstream: model A against model B</h1>
<p>Data: {data}. Natural prevalence: {n} transactions, {f} frauds ({prev:.3}%); both models scored every one of them.</p>
<h2>Is B better?</h2><p><b>{verdict}</b>.<br>AP(B) &minus; AP(A) = {diff:+.4}, 95% interval [{lo:+.4}, {hi:+.4}]
(paired bootstrap: {k} resamples of the transactions, both models scored on each; seed {seed}; B higher in {pct:.1}% of them).</p>
<table><tr><th></th><th>A</th><th>B</th></tr>"#,
        data = esc(&input.data_label),
        n = s.transactions,
        f = s.frauds,
        prev = 100.0 * prevalence,
        verdict = esc(d.verdict()),
        diff = d.difference,
        lo = d.low,
        hi = d.high,
        k = d.resamples,
        seed = d.seed,
        pct = 100.0 * d.b_better_fraction,
    );
    let [a, b] = &input.models;
    let mut row = |name: &str, x: String, y: String| {
        let _ = write!(
            h,
            "<tr><th>{}</th><td>{}</td><td>{}</td></tr>",
            esc(name),
            esc(&x),
            esc(&y)
        );
    };
    row("model", a.manifest.name.clone(), b.manifest.name.clone());
    row(
        "version",
        a.manifest.version.clone(),
        b.manifest.version.clone(),
    );
    type Field = (&'static str, fn(&Summary) -> f64);
    let fields: [Field; 8] = [
        ("threshold", |s| s.threshold),
        ("average precision", |s| s.average_precision),
        ("ROC AUC", |s| s.roc_auc),
        ("precision", |s| s.precision),
        ("recall", |s| s.recall),
        ("F1", |s| s.f1),
        ("alert rate %", |s| 100.0 * s.alert_rate),
        ("card precision@100", |s| s.card_precision_at_100),
    ];
    for (name, f) in fields {
        row(
            name,
            format!("{:.4}", f(a.summary)),
            format!("{:.4}", f(b.summary)),
        );
    }
    h.push_str(
        r#"</table><h2>Precision-recall</h2><img src="pr_compare.png" alt="precision-recall curves of A and B"></body></html>"#,
    );
    let html = dir.join("compare.html");
    std::fs::write(&html, h)?;
    Ok(html)
}

fn render(input: &ReportInput, history: &[EpochRecord], has_history: bool) -> String {
    let m = input.manifest;
    let s = input.summary;
    let c = &s.confusion;
    // Undefined ratios print as 0, as scikit-learn's classification report does.
    let (np, nr) = c.negative_precision_recall();
    let (np, nr) = (np.unwrap_or(0.0), nr.unwrap_or(0.0));
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>fraudstream evaluation: {name}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f4f4f4}}img{{max-width:540px;margin:6px;border:1px solid #eee}}code{{background:#f4f4f4}}</style></head><body>
<h1>fraudstream evaluation</h1>
<p>Model <b>{name}</b> version <code>{version}</code> ({params} parameters, window {window}, spec <code>{spec}</code>),
threshold <b>{thr:.4}</b> chosen on validation by <code>{rule}</code>.<br>Data: {data}.
Natural prevalence: {n} transactions, {f} frauds ({prev:.3}%); no re-balancing.</p>
<h2>Headline</h2><table><tr><th>average precision</th><th>ROC AUC</th><th>precision</th><th>recall</th><th>F1</th><th>alert rate</th><th>card precision@100</th></tr>
<tr><td>{ap:.4}</td><td>{auc:.4}</td><td>{p:.4}</td><td>{r:.4}</td><td>{f1:.4}</td><td>{ar:.4}%</td><td>{cp:.4}</td></tr></table>
<h2>Classification report</h2><table><tr><th></th><th>precision</th><th>recall</th><th>f1-score</th><th>support</th></tr>
<tr><th>legitimate</th><td>{np:.4}</td><td>{nr:.4}</td><td>{nf:.4}</td><td>{ns}</td></tr>
<tr><th>fraud</th><td>{p:.4}</td><td>{r:.4}</td><td>{f1:.4}</td><td>{f}</td></tr></table>
<h2>Confusion matrix</h2><table><tr><th></th><th>predicted legitimate</th><th>predicted fraud</th></tr>
<tr><th>actual legitimate</th><td>{tn}</td><td>{fp}</td></tr><tr><th>actual fraud</th><td>{fn_}</td><td>{tp}</td></tr></table>
<h2>Plots</h2>
<img src="class_distribution.png" alt="class distribution"><img src="pr_curve.png" alt="precision-recall curve">
<img src="roc_curve.png" alt="ROC curve"><img src="confusion_matrix.png" alt="confusion matrix">
<img src="score_histograms.png" alt="score histograms"><img src="card_precision_daily.png" alt="card precision per day">
"#,
        name = esc(&m.name),
        version = esc(&m.version),
        params = m.parameters,
        window = m.window,
        spec = esc(&m.spec.name),
        thr = m.threshold.value,
        rule = esc(&serde_json::to_string(&m.threshold.rule).unwrap_or_default()),
        data = esc(&input.data_label),
        n = s.transactions,
        f = s.frauds,
        prev = 100.0 * s.frauds as f64 / s.transactions.max(1) as f64,
        ap = s.average_precision,
        auc = s.roc_auc,
        p = s.precision,
        r = s.recall,
        f1 = s.f1,
        ar = 100.0 * s.alert_rate,
        cp = s.card_precision_at_100,
        nf = metrics::f1(np, nr),
        ns = c.tn + c.fp,
        tn = c.tn,
        fp = c.fp,
        fn_ = c.fn_,
        tp = c.tp,
    );
    if has_history {
        h.push_str(r#"<img src="training_curves.png" alt="training curves"><h2>Training history</h2><table><tr><th>epoch</th><th>loss</th><th>validation AP</th><th>precision</th><th>recall</th><th>windows/s</th><th>seconds</th></tr>"#);
        for e in history {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.5}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.0}</td><td>{:.0}</td></tr>",
                e.epoch,
                e.loss,
                e.valid_ap,
                e.valid_precision,
                e.valid_recall,
                e.windows_per_s,
                e.seconds
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Card precision@100 per day</h2><table><tr><th>day</th><th>card precision@100</th></tr>");
    for (d, p) in input.daily {
        let day = chrono::DateTime::from_timestamp(d * 86_400, 0)
            .map_or(d.to_string(), |t| t.format("%Y-%m-%d").to_string());
        let _ = write!(h, "<tr><td>{day}</td><td>{p:.2}</td></tr>");
    }
    h.push_str("</table></body></html>\n");
    h
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
