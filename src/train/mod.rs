//! Training and offline evaluation: time split, datasets of windows, focal loss, the training
//! loop, threshold choice and metrics.

pub mod backprop;
mod dataset;
mod loss;
pub mod metrics;
mod pipeline;
mod split;
mod threshold;
mod trainer;

pub use dataset::{Dataset, WindowSet, card_count, card_fraction, epoch_sample};
pub use loss::FocalLoss;
pub use pipeline::{
    DataReport, JobObserver, PeriodCount, PeriodsReport, TrainError, TrainJob, TrainOutcome,
    TrainingReport, run_job,
};
pub use split::{DateError, Period, TimeSplit, parse_date};
pub use trainer::{Engine, EpochRecord, Optimiser, TrainObserver, TrainSettings, Trained, fit};
