//! Time-based split into train, validation and test periods. Never shuffled across time:
//! a model is judged on transactions that happen after everything it learnt from.

use chrono::{DateTime, NaiveDate};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which period a transaction's event time falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Before `train_from`: history only, never a target.
    History,
    /// Fits the scaler and the weights.
    Train,
    /// Early stopping and threshold choice.
    Valid,
    /// Reported metrics only.
    Test,
    /// At or after `until`: ignored.
    After,
}

/// Period boundaries in event-time seconds: `[train_from, valid_from)` is train, and so on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimeSplit {
    /// Start of training targets.
    pub train_from: f64,
    /// Start of validation.
    pub valid_from: f64,
    /// Start of test.
    pub test_from: f64,
    /// End (exclusive) of test.
    pub until: f64,
}

/// A date given on the command line that could not be read.
#[derive(Debug, Error)]
#[error("unreadable date {0:?}: use YYYY-MM-DD, RFC 3339, or seconds")]
pub struct DateError(pub String);

/// Reads `YYYY-MM-DD` (UTC midnight), an RFC 3339 time, or a number of seconds.
pub fn parse_date(s: &str) -> Result<f64, DateError> {
    if let Ok(n) = s.parse::<f64>() {
        return Ok(n);
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp() as f64);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp() as f64)
        .map_err(|_| DateError(s.to_string()))
}

impl TimeSplit {
    /// 70/15/15% of `[first, last]`, the default when no dates are given.
    pub fn fractions(first: f64, last: f64) -> Self {
        let span = last - first;
        TimeSplit {
            train_from: first,
            valid_from: first + 0.70 * span,
            test_from: first + 0.85 * span,
            // Inclusive of the last transaction.
            until: last + 1e-6_f64.max(span * 1e-12),
        }
    }

    /// The period of an event time.
    pub fn period(&self, ts: f64) -> Period {
        if ts < self.train_from {
            Period::History
        } else if ts < self.valid_from {
            Period::Train
        } else if ts < self.test_from {
            Period::Valid
        } else if ts < self.until {
            Period::Test
        } else {
            Period::After
        }
    }

    /// Whether the boundaries are in order.
    pub fn is_ordered(&self) -> bool {
        self.train_from <= self.valid_from
            && self.valid_from <= self.test_from
            && self.test_from <= self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_boundaries() {
        let s = TimeSplit::fractions(0.0, 100.0);
        assert_eq!(s.period(-1.0), Period::History);
        assert_eq!(s.period(0.0), Period::Train);
        assert_eq!(s.period(69.9), Period::Train);
        assert_eq!(s.period(70.0), Period::Valid);
        assert_eq!(s.period(85.0), Period::Test);
        assert_eq!(s.period(100.0), Period::Test);
        assert_eq!(s.period(101.0), Period::After);
        assert!(s.is_ordered());
    }

    #[test]
    fn dates_parse() {
        assert_eq!(parse_date("2018-04-01").unwrap(), 1_522_540_800.0);
        assert_eq!(parse_date("2018-04-01T01:00:00Z").unwrap(), 1_522_544_400.0);
        assert_eq!(parse_date("12.5").unwrap(), 12.5);
        assert!(parse_date("April").is_err());
    }
}
