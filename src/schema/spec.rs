//! FeatureSpec: which fields of a record feed the model, and how.
//!
//! A spec is data (serde), so a bundle can carry it and a user can write one in TOML. The
//! presets `ulb` and `cards` cover the public ULB data set and the simulator's layout.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How the event-time field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// A number is unix seconds; text is tried as a number, RFC 3339, then `YYYY-MM-DD HH:MM:SS` (UTC).
    #[default]
    Auto,
    /// Seconds (unix, or relative as in the ULB `Time` column).
    Seconds,
    /// Milliseconds since the unix epoch (Kafka's own timestamp unit).
    Millis,
    /// RFC 3339 text only, e.g. `2018-04-01T08:00:00Z`.
    Rfc3339,
}

/// A feature computed from state rather than read from the record.
///
/// Today every derived feature depends on the record and its own card's history. The enum is the
/// place to add features from state keyed by something else (a terminal's recent fraud rate
/// learned from delayed labels, say): such a variant would name its key among `context` fields,
/// and [`Derived::scope`] would report that key, so the window code knows which state to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Derived {
    /// log1p(seconds since the same card's previous transaction); 0 for a card's first one.
    SecondsSincePrevLog1p,
    /// Hour of day (UTC) of the event time as two columns, sin and cos, so 23:59 is next to 00:00.
    HourOfDay,
    /// log1p of a numeric field (clamped at 0): amounts are heavy-tailed.
    Log1p {
        /// A field listed in `numeric`.
        field: String,
    },
}

/// Whose state a derived feature needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateScope {
    /// Only the record itself.
    Record,
    /// The record's card's own history.
    Card,
}

impl Derived {
    /// Column names this feature contributes, in order.
    pub fn columns(&self) -> Vec<String> {
        match self {
            Derived::SecondsSincePrevLog1p => vec!["log1p_secs_since_prev".into()],
            Derived::HourOfDay => vec!["hour_sin".into(), "hour_cos".into()],
            Derived::Log1p { field } => vec![format!("log1p_{field}")],
        }
    }

    /// Which state the feature reads.
    pub fn scope(&self) -> StateScope {
        match self {
            Derived::SecondsSincePrevLog1p => StateScope::Card,
            Derived::HourOfDay | Derived::Log1p { .. } => StateScope::Record,
        }
    }
}

/// How a record (JSON object or CSV row) becomes the model's input vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// A short name, stored in model bundles (`ulb`, `cards`, or the user's own).
    pub name: String,
    /// The field that identifies the card; None puts every record in one stream (ULB has no card).
    #[serde(default)]
    pub key: Option<String>,
    /// The event-time field: windows are ordered and periods split by it.
    pub time: String,
    /// How `time` is written.
    #[serde(default)]
    pub time_format: TimeFormat,
    /// The transaction id, used in alerts and to drop redelivered records from a window.
    #[serde(default)]
    pub id: Option<String>,
    /// The fraud label (0/1 or boolean), present in training data and labelled replays.
    #[serde(default)]
    pub label: Option<String>,
    /// Numeric fields fed to the model as they are (then scaled).
    #[serde(default)]
    pub numeric: Vec<String>,
    /// Features computed from the record and state, appended after `numeric`.
    #[serde(default)]
    pub derived: Vec<Derived>,
    /// Text fields carried with the transaction but not fed to the model (terminal id, merchant):
    /// the keys a future non-card state would be kept by, and context for alerts.
    #[serde(default)]
    pub context: Vec<String>,
}

/// Why a spec itself (not a record) is unusable.
#[derive(Debug, Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("reading spec {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The spec file is not valid TOML for a FeatureSpec.
    #[error("parsing spec {path}: {source}")]
    Toml {
        /// The file.
        path: String,
        /// The cause.
        source: Box<toml::de::Error>,
    },
    /// The spec is well-formed but inconsistent.
    #[error("invalid spec `{name}`: {reason}")]
    Invalid {
        /// The spec's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl FeatureSpec {
    /// The public ULB credit-card CSV (Time, V1..V28, Amount, Class): the notebook's 30 features.
    pub fn ulb() -> Self {
        let mut numeric = vec!["Time".to_string()];
        numeric.extend((1..=28).map(|i| format!("V{i}")));
        numeric.push("Amount".into());
        FeatureSpec {
            name: "ulb".into(),
            key: None,
            time: "Time".into(),
            time_format: TimeFormat::Seconds,
            id: None,
            label: Some("Class".into()),
            numeric,
            derived: vec![],
            context: vec![],
        }
    }

    /// The simulator's layout, keyed by card, with the card-history features.
    pub fn cards() -> Self {
        FeatureSpec {
            name: "cards".into(),
            key: Some("card_id".into()),
            time: "ts".into(),
            time_format: TimeFormat::Seconds,
            id: Some("transaction_id".into()),
            label: Some("is_fraud".into()),
            numeric: vec!["amount".into()],
            derived: vec![
                Derived::SecondsSincePrevLog1p,
                Derived::HourOfDay,
                Derived::Log1p {
                    field: "amount".into(),
                },
            ],
            context: vec!["terminal_id".into()],
        }
    }

    /// `ulb`, `cards`, or a path to a TOML spec.
    pub fn resolve(name_or_path: &str) -> Result<Self, SpecError> {
        match name_or_path {
            "ulb" => Ok(Self::ulb()),
            "cards" => Ok(Self::cards()),
            path => Self::from_toml_file(Path::new(path)),
        }
    }

    /// Loads and validates a TOML spec file.
    pub fn from_toml_file(path: &Path) -> Result<Self, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: shown.clone(),
            source,
        })?;
        let spec: FeatureSpec = toml::from_str(&text).map_err(|source| SpecError::Toml {
            path: shown,
            source: Box::new(source),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as TOML, a starting point for a custom one.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a FeatureSpec always serialises")
    }

    /// Checks the spec is usable: at least one feature, no duplicate columns, log1p fields known.
    pub fn validate(&self) -> Result<(), SpecError> {
        let invalid = |reason: String| SpecError::Invalid {
            name: self.name.clone(),
            reason,
        };
        if self.feature_names().is_empty() {
            return Err(invalid("no numeric or derived features".into()));
        }
        let names = self.feature_names();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(invalid(format!("feature `{n}` appears twice")));
            }
        }
        for d in &self.derived {
            if let Derived::Log1p { field } = d
                && !self.numeric.contains(field)
            {
                return Err(invalid(format!(
                    "log1p field `{field}` must also be listed in `numeric`"
                )));
            }
        }
        if self.time.is_empty() {
            return Err(invalid("`time` names no field".into()));
        }
        Ok(())
    }

    /// The model's input columns, in order: numeric fields, then derived columns.
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = self.numeric.clone();
        names.extend(self.derived.iter().flat_map(Derived::columns));
        names
    }

    /// The model's input width.
    pub fn width(&self) -> usize {
        self.feature_names().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_expected_widths() {
        assert_eq!(FeatureSpec::ulb().width(), 30);
        assert_eq!(
            FeatureSpec::cards().feature_names(),
            [
                "amount",
                "log1p_secs_since_prev",
                "hour_sin",
                "hour_cos",
                "log1p_amount"
            ]
        );
        FeatureSpec::ulb().validate().unwrap();
        FeatureSpec::cards().validate().unwrap();
    }

    #[test]
    fn toml_round_trip_and_file_load() {
        let spec = FeatureSpec::cards();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, spec.to_toml()).unwrap();
        assert_eq!(FeatureSpec::resolve(path.to_str().unwrap()).unwrap(), spec);
    }

    #[test]
    fn invalid_specs_are_refused() {
        let mut spec = FeatureSpec::cards();
        spec.numeric.clear();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("log1p field `amount`"), "{err}");

        let mut spec = FeatureSpec::cards();
        spec.numeric.push("amount".into());
        assert!(spec.validate().unwrap_err().to_string().contains("twice"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "name = \"x\"\ntime = \"ts\"\nbogus = 1\n").unwrap();
        let err = FeatureSpec::resolve(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
