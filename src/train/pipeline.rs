//! The whole training job, from time-sorted transactions to a saved bundle: scaler fitted on
//! the training period, windows per period, the training loop, the threshold chosen on
//! validation, validation and test metrics, and a typed [`TrainingReport`] that the manifest
//! carries. The CLI loads the file, reports progress and prints; this does the work.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::dataset::{Dataset, WindowSet, card_count, card_fraction};
use super::metrics::Summary;
use super::split::{Period, TimeSplit};
use super::trainer::{EpochRecord, TrainObserver, TrainSettings, fit};
use crate::features::{DEFAULT_LABEL_DELAY, WindowBuilder, fit_scaler};
use crate::model::{
    Bundle, BundleError, Choice, FastModel, MANIFEST_FORMAT, Manifest, ModelConfig, ThresholdInfo,
    ThresholdRule, init,
};
use crate::schema::{FeatureSpec, Span, Transaction};

/// Windows scored per call when validating and testing: large batches use both cores.
const SCORE_BATCH: usize = 512;

/// What to train, on what, and where to save it.
#[derive(Debug, Clone)]
pub struct TrainJob {
    /// The file the transactions came from (recorded in the report).
    pub data: PathBuf,
    /// The feature spec.
    pub spec: FeatureSpec,
    /// Bundle directory to write.
    pub out: PathBuf,
    /// Model name carried by alerts.
    pub name: String,
    /// Period boundaries.
    pub split: TimeSplit,
    /// Layer sizes, input width and window length.
    pub architecture: ModelConfig,
    /// The training loop's settings.
    pub settings: TrainSettings,
    /// How the threshold is chosen on validation.
    pub rule: ThresholdRule,
    /// Fraction of validation cards scored after each epoch for early stopping.
    pub valid_cards: f64,
    /// When a label counts as known if the file has no `labelled_at`: after this long.
    pub label_delay: Span,
    /// A scaler to reuse (another bundle's) instead of fitting one on the training period.
    pub scaler: Option<crate::features::RobustScaler>,
}

/// Why training could not produce a bundle.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The periods hold nothing to fit the scaler on.
    #[error("the training period holds no transactions")]
    NoTrainingRows,
    /// The scaler given to reuse is for other features.
    #[error("the reused scaler is for features {theirs:?}, the spec has {ours:?}")]
    ScalerMismatch {
        /// The scaler's features.
        theirs: Vec<String>,
        /// The spec's.
        ours: Vec<String>,
    },
    /// No fraud in the training period.
    #[error("the training period holds no fraud to learn from")]
    NoTrainingFraud,
    /// No fraud in validation: neither early stopping nor the threshold can work.
    #[error("the validation period holds no fraud: move --valid-from or --test-from")]
    NoValidationFraud,
    /// The network failed (a bug, or out of memory).
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// The bundle could not be written.
    #[error("saving the bundle: {0}")]
    Bundle(#[from] BundleError),
}

/// What the input file held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// The file.
    pub file: String,
    /// Valid transactions.
    pub rows: usize,
    /// Distinct cards.
    pub cards: usize,
    /// Fraud transactions.
    pub frauds: usize,
    /// frauds / rows.
    pub fraud_rate: f64,
    /// First event time.
    pub first_ts: f64,
    /// Last event time.
    pub last_ts: f64,
}

/// Windows and frauds of one period.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PeriodCount {
    /// Windows (one per target transaction).
    pub windows: usize,
    /// Fraud targets.
    pub frauds: usize,
}

/// The periods as used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeriodsReport {
    /// Their boundaries.
    pub split: TimeSplit,
    /// Training targets.
    pub train: PeriodCount,
    /// Validation targets.
    pub valid: PeriodCount,
    /// Test targets.
    pub test: PeriodCount,
    /// Fraction of validation cards scored after each epoch.
    pub early_stopping_cards_fraction: f64,
    /// When labels without `labelled_at` counted as known: this long after their transaction
    /// (recorded so evaluation replays labels the same way).
    #[serde(default = "default_label_delay")]
    pub label_delay: Span,
}

fn default_label_delay() -> Span {
    DEFAULT_LABEL_DELAY
}

/// The manifest's `training` section: what the model learnt from, how, and how well it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingReport {
    /// The input file.
    pub data: DataReport,
    /// The periods.
    pub periods: PeriodsReport,
    /// The training loop's settings.
    pub settings: TrainSettings,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Every epoch.
    pub history: Vec<EpochRecord>,
    /// Mean training throughput.
    pub train_windows_per_s: f64,
    /// Wall time of the whole job.
    pub seconds: f64,
    /// Metrics on the validation period at the chosen threshold.
    pub validation: Summary,
    /// Metrics on the test period at the chosen threshold.
    pub test: Summary,
}

impl TrainingReport {
    /// The report a manifest carries (None for bundles written before reports were typed, or
    /// by other tools).
    pub fn of(manifest: &Manifest) -> Option<TrainingReport> {
        serde_json::from_value(manifest.training.clone()).ok()
    }

    /// The label delay a bundle was trained with (the default for older bundles).
    pub fn label_delay_of(manifest: &Manifest) -> Span {
        manifest
            .training
            .pointer("/periods/label_delay")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or(DEFAULT_LABEL_DELAY)
    }
}

/// What the job reports while it runs, besides the training loop's epochs.
pub trait JobObserver: TrainObserver {
    /// The data is split into periods.
    fn prepared(&mut self, data: &DataReport, periods: &PeriodsReport);
    /// The model is built; early stopping scores `windows` windows of `cards` cards.
    fn model_ready(&mut self, parameters: usize, windows: usize, cards: usize);
    /// Scoring `total` windows of a period starts; `progress` gets the count done.
    fn scoring(&mut self, what: &str, total: usize) -> Box<dyn FnMut(usize) + '_>;
}

/// The saved bundle's manifest and the chosen threshold.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// As saved (with version and checksum).
    pub manifest: Manifest,
    /// The threshold choice on validation.
    pub choice: Choice,
    /// The report inside the manifest.
    pub report: TrainingReport,
}

/// Runs the job on time-sorted transactions and saves the bundle.
pub fn run_job(
    job: &TrainJob,
    txs: &[Transaction],
    observer: &mut dyn JobObserver,
) -> Result<TrainOutcome, TrainError> {
    let began = Instant::now();
    let split = &job.split;
    let scaler = match &job.scaler {
        Some(s) if s.names != job.spec.feature_names() => {
            return Err(TrainError::ScalerMismatch {
                theirs: s.names.clone(),
                ours: job.spec.feature_names(),
            });
        }
        Some(s) => s.clone(),
        None => fit_scaler(&job.spec, txs, job.label_delay, |t| {
            split.period(t.ts) == Period::Train
        }),
    };
    if scaler.fitted_rows == 0 {
        return Err(TrainError::NoTrainingRows);
    }
    let builder = WindowBuilder::new(job.spec.clone(), scaler.clone(), job.architecture.window);
    let ds = Dataset::build(&builder, txs, split, job.label_delay);
    let data = data_report(&job.data, txs);
    let count = |s: &WindowSet| PeriodCount {
        windows: s.len(),
        frauds: s.frauds(),
    };
    let periods = PeriodsReport {
        split: *split,
        train: count(&ds.train),
        valid: count(&ds.valid),
        test: count(&ds.test),
        early_stopping_cards_fraction: job.valid_cards,
        label_delay: job.label_delay,
    };
    observer.prepared(&data, &periods);
    if ds.train.frauds() == 0 {
        return Err(TrainError::NoTrainingFraud);
    }
    if ds.valid.frauds() == 0 {
        return Err(TrainError::NoValidationFraud);
    }
    let probe = ds.valid.cards_subset(card_fraction(job.valid_cards));
    let probe = if probe.frauds() > 0 {
        probe
    } else {
        ds.valid.clone()
    };
    let cfg = &job.architecture;
    observer.model_ready(cfg.parameter_count(), probe.len(), card_count(&probe));
    let (model, varmap) = init(cfg, job.settings.seed, &Device::Cpu)?;
    let trained = fit(
        &model,
        &varmap,
        &ds.train,
        &probe,
        &job.settings,
        job.rule,
        observer,
    )?;
    let fast = FastModel::new(cfg, &trained.weights)?;
    let mut score = |set: &WindowSet, what: &str| {
        let mut progress = observer.scoring(what, set.len());
        set.score(&fast, SCORE_BATCH, &mut *progress)
    };
    let valid_scores = score(&ds.valid, "validation");
    let test_scores = score(&ds.test, "test");
    let choice = job.rule.choose(&valid_scores, &ds.valid.labels);
    let summary = |set: &WindowSet, scores: &[f32]| {
        Summary::compute(scores, &set.labels, &set.keys, &set.ts, choice.threshold)
    };
    let report = TrainingReport {
        data,
        periods,
        settings: job.settings.clone(),
        best_epoch: trained.best_epoch,
        train_windows_per_s: trained.history.iter().map(|r| r.windows_per_s).sum::<f64>()
            / trained.history.len() as f64,
        history: trained.history,
        seconds: began.elapsed().as_secs_f64(),
        validation: summary(&ds.valid, &valid_scores),
        test: summary(&ds.test, &test_scores),
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: job.name.clone(),
        version: String::new(),
        created_at: chrono::Utc::now().to_rfc3339(),
        architecture: cfg.clone(),
        parameters: cfg.parameter_count(),
        spec: job.spec.clone(),
        scaler,
        window: cfg.window,
        threshold: ThresholdInfo {
            value: choice.threshold,
            rule: job.rule,
            on_validation: choice,
        },
        training: serde_json::to_value(&report).expect("the training report serialises"),
        weights_sha256: String::new(),
    };
    let manifest = Bundle::save(&job.out, &trained.weights, manifest)?;
    Ok(TrainOutcome {
        manifest,
        choice,
        report,
    })
}

fn data_report(file: &Path, txs: &[Transaction]) -> DataReport {
    let frauds = txs.iter().filter(|t| t.label == Some(true)).count();
    let cards: HashSet<&str> = txs.iter().map(|t| t.key.as_str()).collect();
    DataReport {
        file: file.display().to_string(),
        rows: txs.len(),
        cards: cards.len(),
        frauds,
        fraud_rate: frauds as f64 / txs.len().max(1) as f64,
        first_ts: txs.first().map_or(0.0, |t| t.ts),
        last_ts: txs.last().map_or(0.0, |t| t.ts),
    }
}
