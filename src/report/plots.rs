//! PNG plots for the evaluation report (plotters, bitmap backend).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::train::EpochRecord;
use crate::train::metrics::{Confusion, PrPoint};

type PlotResult = Result<(), String>;

const W: u32 = 720;
const H: u32 = 480;

/// Fonts are looked up once: `FRAUDSTREAM_FONT`, then common DejaVu/Liberation locations
/// (Debian's `fonts-dejavu-core`). Plots need one to draw text.
pub fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var("FRAUDSTREAM_FONT").into_iter().chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/Library/Fonts/Arial.ttf",
            ]
            .map(String::from),
        );
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                for style in [FontStyle::Normal, FontStyle::Bold] {
                    plotters::style::register_font("sans-serif", style, bytes)
                        .map_err(|_| format!("{path} is not a usable font"))?;
                }
                return Ok(());
            }
        }
        Err(
            "no TrueType font found for plots: install fonts-dejavu-core or set FRAUDSTREAM_FONT"
                .into(),
        )
    })
    .clone()
}

/// Pixel offset that centres `text` on its anchor; estimated from the font size, because the
/// bitmap backend ignores a text style's anchor.
fn center_offset(text: &str, size: u32) -> (i32, i32) {
    let half_width = (text.chars().count() as f64 * f64::from(size) * 0.28) as i32;
    (-half_width, -(size as i32) / 2)
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// Bar chart of legitimate vs fraud counts (log scale: fraud is rare).
pub fn class_distribution(path: &Path, legit: u64, fraud: u64) -> PlotResult {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = (legit.max(fraud).max(1) as f64 * 3.0).log10();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Class distribution ({:.3}% fraud)",
                100.0 * fraud as f64 / (legit + fraud).max(1) as f64
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..1u32).into_segmented(), 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(0) => "legitimate".into(),
            SegmentValue::CenterOf(1) => "fraud".into(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{:.0}", 10f64.powf(*y)))
        .y_desc("transactions (log scale)")
        .draw()
        .map_err(err)?;
    for (i, n, color) in [(0u32, legit, BLUE), (1, fraud, RED)] {
        let h = (n.max(1) as f64).log10();
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), h),
                ],
                color.mix(0.6).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once({
                let label = n.to_string();
                let at = (SegmentValue::CenterOf(i), h + top * 0.04);
                EmptyElement::at(at)
                    + Text::new(label.clone(), center_offset(&label, 18), ("sans-serif", 18))
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Precision-recall curve with the operating threshold marked.
pub fn pr_curve(
    path: &Path,
    curve: &[PrPoint],
    chosen: (f64, f64),
    ap: f64,
    prevalence: f64,
) -> PlotResult {
    let (r, p) = chosen;
    let label = format!("model; threshold: P {p:.3}, R {r:.3}");
    pr_curves(
        path,
        &format!("Precision-recall (AP {ap:.3})"),
        &[(label, curve.to_vec(), chosen)],
        prevalence,
    )
}

/// Several precision-recall curves on one chart, each with its operating point: `(label,
/// curve, (recall, precision) at its threshold)`.
pub fn pr_curves(
    path: &Path,
    caption: &str,
    curves: &[(String, Vec<PrPoint>, (f64, f64))],
    prevalence: f64,
) -> PlotResult {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .draw()
        .map_err(err)?;
    let colours = [BLUE, RED, GREEN, MAGENTA];
    for (k, (label, curve, (r, p))) in curves.iter().enumerate() {
        let c = colours[k % colours.len()];
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|p| (p.recall, p.precision)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Circle::new((*r, *p), 7, c.filled())))
            .map_err(err)?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, prevalence), (1.0, prevalence)],
            BLACK.mix(0.4),
        ))
        .map_err(err)?
        .label(format!("no skill ({prevalence:.4}); dots: thresholds"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// ROC curve.
pub fn roc_curve(path: &Path, points: &[(f64, f64)], auc: f64) -> PlotResult {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("ROC (AUC {auc:.3})"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate")
        .y_desc("true-positive rate")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?;
    root.present().map_err(err)
}

/// Confusion matrix as a heat map (colour by share of the true class).
pub fn confusion(path: &Path, c: &Confusion) -> PlotResult {
    let root = BitMapBackend::new(path, (560, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Confusion matrix at the threshold", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d((0u32..1u32).into_segmented(), (0u32..1u32).into_segmented())
        .map_err(err)?;
    let name = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(0) => "legitimate".to_string(),
        SegmentValue::CenterOf(1) => "fraud".to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_label_formatter(&|v| name(v))
        .y_label_formatter(&|v| name(v))
        .x_desc("predicted")
        .y_desc("actual")
        .draw()
        .map_err(err)?;
    // (actual, predicted, count, row total)
    let cells = [
        (0u32, 0u32, c.tn, c.tn + c.fp),
        (0, 1, c.fp, c.tn + c.fp),
        (1, 0, c.fn_, c.tp + c.fn_),
        (1, 1, c.tp, c.tp + c.fn_),
    ];
    for (actual, predicted, n, total) in cells {
        let share = n as f64 / total.max(1) as f64;
        let color = RGBColor(
            (255.0 - 200.0 * share) as u8,
            (255.0 - 150.0 * share) as u8,
            255,
        );
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(predicted), SegmentValue::Exact(actual)),
                    (
                        SegmentValue::Exact(predicted + 1),
                        SegmentValue::Exact(actual + 1),
                    ),
                ],
                color.filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once({
                let label = format!("{n} ({:.1}%)", 100.0 * share);
                let at = (
                    SegmentValue::CenterOf(predicted),
                    SegmentValue::CenterOf(actual),
                );
                EmptyElement::at(at)
                    + Text::new(label.clone(), center_offset(&label, 20), ("sans-serif", 20))
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Score histograms per class (each normalised to its own class, so the rare class shows).
pub fn score_histograms(
    path: &Path,
    scores: &[f32],
    labels: &[bool],
    threshold: f64,
) -> PlotResult {
    const BINS: usize = 50;
    let mut counts = [[0u64; BINS]; 2];
    for (&s, &y) in scores.iter().zip(labels) {
        let b = ((s.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1);
        counts[usize::from(y)][b] += 1;
    }
    let share = |c: usize, b: usize| {
        let total: u64 = counts[c].iter().sum();
        counts[c][b] as f64 / total.max(1) as f64
    };
    let top = (0..BINS)
        .flat_map(|b| [share(0, b), share(1, b)])
        .fold(0.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Score distribution per class", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1f64, 0f64..top.max(1e-3))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("score")
        .y_desc("share of the class")
        .draw()
        .map_err(err)?;
    for (c, color, label) in [(0, BLUE, "legitimate"), (1, RED, "fraud")] {
        chart
            .draw_series((0..BINS).map(|b| {
                let x0 = b as f64 / BINS as f64;
                Rectangle::new(
                    [(x0, 0.0), (x0 + 1.0 / BINS as f64, share(c, b))],
                    color.mix(0.4).filled(),
                )
            }))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.mix(0.4).filled())
            });
    }
    chart
        .draw_series(LineSeries::new(
            [(threshold, 0.0), (threshold, top)],
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label(format!("threshold {threshold:.3}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Training curves: loss (left axis) and validation AP and recall per epoch.
pub fn training_curves(path: &Path, history: &[EpochRecord]) -> PlotResult {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = history.len().max(2) as f64;
    let max_loss = history.iter().map(|r| r.loss).fold(0.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training curves", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(1f64..n, 0f64..max_loss.max(1e-6))
        .map_err(err)?
        .set_secondary_coord(1f64..n, 0f64..1f64);
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("training loss")
        .x_labels(history.len().max(2))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("validation AP / recall")
        .draw()
        .map_err(err)?;
    let pts = |f: fn(&EpochRecord) -> f64| history.iter().map(move |r| (r.epoch as f64, f(r)));
    chart
        .draw_series(LineSeries::new(pts(|r| r.loss), BLACK.stroke_width(2)))
        .map_err(err)?
        .label("loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    for (f, color, label) in [
        (
            (|r: &EpochRecord| r.valid_ap) as fn(&EpochRecord) -> f64,
            BLUE,
            "validation AP",
        ),
        (|r: &EpochRecord| r.valid_recall, RED, "validation recall"),
        (
            |r: &EpochRecord| r.valid_precision,
            GREEN,
            "validation precision",
        ),
    ] {
        chart
            .draw_secondary_series(LineSeries::new(pts(f), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Card precision@100 per day.
pub fn daily_card_precision(path: &Path, daily: &[(i64, f64)]) -> PlotResult {
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (lo, hi) = (
        daily.first().map_or(0, |d| d.0),
        daily
            .last()
            .map_or(1, |d| d.0)
            .max(daily.first().map_or(0, |d| d.0) + 1),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption("Card precision@100 per day", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi, 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("day")
        .y_desc("fraction of top-100 cards with fraud")
        .x_label_formatter(&|d| {
            chrono::DateTime::from_timestamp(d * 86_400, 0)
                .map_or(d.to_string(), |t| t.format("%m-%d").to_string())
        })
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(daily.iter().copied(), BLUE.stroke_width(2)))
        .map_err(err)?;
    chart
        .draw_series(
            daily
                .iter()
                .map(|&(d, p)| Circle::new((d, p), 3, BLUE.filled())),
        )
        .map_err(err)?;
    root.present().map_err(err)
}
