//! FeatureSpec: which fields of a record feed the model, and how.
//!
//! A spec is data (serde), so a bundle can carry it and a user can write one in TOML. The
//! presets `ulb` and `cards` cover the public ULB data set and the simulator's layout.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::derived::{Derived, Span, StateScope};

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
    /// When the label became known (same formats as `time`), if a file records it; otherwise
    /// offline commands assume the event time plus `--label-delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled_at: Option<String>,
    /// Numeric fields fed to the model as they are (then scaled).
    #[serde(default)]
    pub numeric: Vec<String>,
    /// Features computed from the record and state, appended after `numeric`.
    #[serde(default)]
    pub derived: Vec<Derived>,
    /// Text fields carried with the transaction but not fed to the model (terminal id, merchant):
    /// the keys label-rate features are kept by, and context for alerts.
    #[serde(default)]
    pub context: Vec<String>,
    /// Accepted ranges of `numeric` fields: a value outside is dead-lettered (`out_of_range`)
    /// instead of reaching the scaler and the model (an amount of 1e308 would score as fraud,
    /// a negative one is a bug upstream).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bounds: BTreeMap<String, Bounds>,
}

/// The accepted range of one numeric field (either end optional, both inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Smallest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest accepted value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Bounds {
    /// Whether `x` is within the range.
    pub fn contains(&self, x: f64) -> bool {
        self.min.is_none_or(|m| x >= m) && self.max.is_none_or(|m| x <= m)
    }
}

/// The `cards` preset's largest accepted amount: far above any card payment in the simulation
/// (amounts there stay below a few thousand), low enough that an absurd value is caught.
pub const AMOUNT_CEILING: f64 = 1_000_000.0;

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
            labelled_at: None,
            numeric,
            derived: vec![],
            context: vec![],
            bounds: BTreeMap::new(),
        }
    }

    /// The simulator's layout, keyed by card: the amount and the card's own history (time since
    /// its previous transaction, counts and mean amounts over 1, 7 and 30 days, the amount
    /// against its 30-day mean), calendar flags, and the terminal's fraud rate from labels
    /// known 7 days later (over 1, 7 and 30 days): the Fraud Detection Handbook's features.
    pub fn cards() -> Self {
        let (card, terminal) = ("card_id".to_string(), "terminal_id".to_string());
        let windows = [Span::days(1), Span::days(7), Span::days(30)];
        let mut derived = vec![
            Derived::SecondsSincePrevLog1p,
            Derived::HourOfDay,
            Derived::Log1p {
                field: "amount".into(),
            },
            Derived::Weekend,
            Derived::Night,
        ];
        derived.extend(windows.map(|window| Derived::Count {
            key: card.clone(),
            window,
        }));
        derived.extend(windows.map(|window| Derived::Mean {
            field: "amount".into(),
            key: card.clone(),
            window,
        }));
        derived.push(Derived::Relative {
            field: "amount".into(),
            key: card.clone(),
            window: Span::days(30),
        });
        derived.extend(windows.map(|window| Derived::LabelRate {
            key: terminal.clone(),
            window,
            delay: Span::days(7),
        }));
        FeatureSpec {
            name: "cards".into(),
            key: Some(card),
            time: "ts".into(),
            time_format: TimeFormat::Seconds,
            id: Some("transaction_id".into()),
            label: Some("is_fraud".into()),
            labelled_at: Some("labelled_at".into()),
            numeric: vec!["amount".into()],
            derived,
            context: vec![terminal],
            bounds: BTreeMap::from([(
                "amount".to_string(),
                Bounds {
                    min: Some(0.0),
                    max: Some(AMOUNT_CEILING),
                },
            )]),
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
            self.validate_derived(d).map_err(invalid)?;
        }
        if self.time.is_empty() {
            return Err(invalid("`time` names no field".into()));
        }
        for (field, b) in &self.bounds {
            if !self.numeric.contains(field) {
                return Err(invalid(format!(
                    "bounds for `{field}`, which is not in `numeric`"
                )));
            }
            if let (Some(lo), Some(hi)) = (b.min, b.max)
                && lo > hi
            {
                return Err(invalid(format!(
                    "bounds for `{field}`: min {lo} > max {hi}"
                )));
            }
        }
        Ok(())
    }

    fn validate_derived(&self, d: &Derived) -> Result<(), String> {
        let numeric = |field: &String, kind: &str| {
            if self.numeric.contains(field) {
                Ok(())
            } else {
                Err(format!(
                    "{kind} field `{field}` must also be listed in `numeric`"
                ))
            }
        };
        let positive = |w: Span| {
            if w.as_secs() > 0 {
                Ok(())
            } else {
                Err("a window must be longer than 0".to_string())
            }
        };
        match d {
            Derived::Log1p { field } => numeric(field, "log1p"),
            Derived::Count { key, window } => {
                self.card_key(key)?;
                positive(*window)
            }
            Derived::Mean { field, key, window } | Derived::Relative { field, key, window } => {
                numeric(field, "mean")?;
                self.card_key(key)?;
                positive(*window)
            }
            Derived::LabelRate { key, window, .. } => {
                if !self.context.contains(key) && self.key.as_ref() != Some(key) {
                    return Err(format!(
                        "label_rate key `{key}` must be listed in `context` (or be the card key)"
                    ));
                }
                if self.label.is_none() {
                    return Err("label_rate needs a `label` field to learn from".into());
                }
                positive(*window)
            }
            Derived::SecondsSincePrevLog1p
            | Derived::HourOfDay
            | Derived::Weekend
            | Derived::Night => Ok(()),
        }
    }

    /// Count, mean and relative features keep state per card, which lives where the card's
    /// partition is consumed: they must be keyed by the card. (Per-terminal counts would need
    /// every instance to see every transaction; label rates get theirs from labels instead.)
    fn card_key(&self, key: &str) -> Result<(), String> {
        if self.key.as_deref() == Some(key) {
            Ok(())
        } else {
            Err(format!(
                "count, mean and relative features are kept per card: key `{key}` must be the card key ({:?})",
                self.key
            ))
        }
    }

    /// The context keys that label-rate features are kept by, each once, in spec order.
    pub fn label_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for d in &self.derived {
            if let Derived::LabelRate { key, .. } = d
                && !keys.contains(key)
            {
                keys.push(key.clone());
            }
        }
        keys
    }

    /// The numeric fields card aggregates (mean, relative) sum, each once, in spec order.
    pub fn aggregated_fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = Vec::new();
        for d in &self.derived {
            if let Derived::Mean { field, .. } | Derived::Relative { field, .. } = d
                && !fields.contains(field)
            {
                fields.push(field.clone());
            }
        }
        fields
    }

    /// Whether any feature reads state of a given scope.
    pub fn needs(&self, scope: StateScope) -> bool {
        self.derived.iter().any(|d| d.scope() == scope)
    }

    /// The model's input columns, in order: numeric fields, then derived columns.
    pub fn feature_names(&self) -> Vec<String> {
        let mut names = self.numeric.clone();
        names.extend(self.derived.iter().flat_map(Derived::columns));
        names
    }

    /// The model's input width.
    pub fn width(&self) -> usize {
        self.numeric.len()
            + self
                .derived
                .iter()
                .map(|d| d.columns().len())
                .sum::<usize>()
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
                "log1p_amount",
                "weekend",
                "night",
                "card_id_count_1d",
                "card_id_count_7d",
                "card_id_count_30d",
                "card_id_mean_amount_1d",
                "card_id_mean_amount_7d",
                "card_id_mean_amount_30d",
                "card_id_relative_amount_30d",
                "terminal_id_labelled_1d_delay_7d",
                "terminal_id_fraud_rate_1d_delay_7d",
                "terminal_id_labelled_7d_delay_7d",
                "terminal_id_fraud_rate_7d_delay_7d",
                "terminal_id_labelled_30d_delay_7d",
                "terminal_id_fraud_rate_30d_delay_7d",
            ]
        );
        assert_eq!(FeatureSpec::cards().label_keys(), ["terminal_id"]);
        assert_eq!(FeatureSpec::cards().aggregated_fields(), ["amount"]);
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

        let mut spec = FeatureSpec::cards();
        spec.derived.push(Derived::Count {
            key: "terminal_id".into(),
            window: Span::days(2),
        });
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("kept per card"), "{err}");

        let mut spec = FeatureSpec::cards();
        spec.context.clear();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("label_rate key `terminal_id`"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "name = \"x\"\ntime = \"ts\"\nbogus = 1\n").unwrap();
        let err = FeatureSpec::resolve(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
