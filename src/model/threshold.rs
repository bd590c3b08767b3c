//! The alert threshold a bundle carries: the rule that chose it and what it gave. The rules
//! are applied in `train` (on the validation period); the types live here because the manifest
//! records them.

use serde::{Deserialize, Serialize};

/// How the threshold is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum ThresholdRule {
    /// The threshold with the highest F1: balanced precision and recall (the default).
    MaxF1,
    /// The best recall whose precision is at least this.
    MinPrecision {
        /// Required precision in (0, 1].
        precision: f64,
    },
    /// Alert on this fraction of transactions (the team's review capacity).
    AlertRate {
        /// Fraction of transactions in (0, 1].
        rate: f64,
    },
}

/// The chosen threshold and what it gave on the data it was chosen on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Alert when score >= threshold.
    pub threshold: f64,
    /// Precision there.
    pub precision: f64,
    /// Recall there.
    pub recall: f64,
    /// F1 there.
    pub f1: f64,
    /// Fraction alerted there.
    pub alert_rate: f64,
    /// False when the rule could not be met (no threshold reaches the precision asked for):
    /// the most precise threshold is used instead.
    pub rule_met: bool,
}
