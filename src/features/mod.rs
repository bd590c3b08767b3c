//! From transaction to model input: raw features, robust scaling, and the per-card window.
//!
//! [`WindowBuilder::observe`] is the single implementation used offline (training, evaluation)
//! and online (the detector's [`CardStore`]).

mod aggregates;
mod builder;
mod featurizer;
mod labels;
pub mod offline;
mod scaler;
mod window;

pub use aggregates::{BUCKET_SECS, CardSeries};
pub use builder::{
    CardState, CardStore, Clock, DEFAULT_WINDOW, Observed, StateLimits, WindowBuilder,
    WindowSample, fit_scaler, wall_clock,
};
pub use featurizer::{CardHistory, Featurizer};
pub use labels::{LabelTables, RateQuery};
pub use offline::DEFAULT_LABEL_DELAY;
pub use scaler::{RobustScaler, quantile_sorted};
pub use window::Window;
