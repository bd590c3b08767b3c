//! Training-side data handling. So far: the time split into periods.

mod split;

pub use split::{DateError, Period, TimeSplit, parse_date};
