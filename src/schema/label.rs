//! Fraud labels and what they make of decisions.
//!
//! A label judges one transaction after the fact (a chargeback, an analyst's review). Joined to
//! the decision the detector made, it becomes a true/false positive/negative; [`Confusion`]
//! counts those, for offline metrics, live quality and run summaries alike.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// A label message (the labels topic, or a replayed label).
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// The transaction it judges.
    pub transaction_id: String,
    /// Whether it was fraud.
    pub is_fraud: bool,
    /// When the label became known (event-time seconds), from `labelled_at` (RFC 3339 or
    /// seconds); None when the message does not say (it is then known on arrival).
    pub labelled_at: Option<f64>,
    /// What label-rate features need: the judged transaction's event time and context keys
    /// (present when the spec has label-rate features).
    pub context: Option<LabelContext>,
}

/// The judged transaction as label-rate features need it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelContext {
    /// Its event time (seconds).
    pub ts: f64,
    /// Its values of the spec's label keys ([`crate::schema::FeatureSpec::label_keys`]).
    pub keys: Vec<String>,
}

/// A label as the label-rate tables take it: what it judges, and from when it may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEvent {
    /// The judged transaction's event time.
    pub ts: f64,
    /// From when the label is known (it must not count for any transaction before).
    pub known_at: f64,
    /// Whether it was fraud.
    pub is_fraud: bool,
    /// The transaction's values of the spec's label keys.
    pub keys: Vec<String>,
}

/// A label message that cannot be used, naming the field at fault.
#[derive(Debug, Error, PartialEq)]
pub enum LabelError {
    /// Not JSON, or not an object.
    #[error("label is not a JSON object: {0}")]
    NotAnObject(String),
    /// A required field is missing or of the wrong type.
    #[error("label field `{field}`: {problem}")]
    Field {
        /// The field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl LabelError {
    /// Every [`LabelError::reason`].
    pub const REASONS: [&'static str; 2] = ["invalid_label_json", "invalid_label"];

    /// The dead-letter reason.
    pub fn reason(&self) -> &'static str {
        match self {
            LabelError::NotAnObject(_) => "invalid_label_json",
            LabelError::Field { .. } => "invalid_label",
        }
    }

    /// The field at fault, if one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            LabelError::NotAnObject(_) => None,
            LabelError::Field { field, .. } => Some(field),
        }
    }
}

impl Label {
    /// Parses a label's own fields: `transaction_id` (string or number), `is_fraud` (boolean or
    /// 0/1), optional `labelled_at` (RFC 3339 or unix seconds). See
    /// [`crate::schema::FeatureSpec::parse_label`] for the context label-rate features need.
    pub fn parse(payload: &[u8]) -> Result<Label, LabelError> {
        Self::parse_object(&Self::object(payload)?)
    }

    /// The payload as a JSON object.
    pub(crate) fn object(payload: &[u8]) -> Result<Map<String, Value>, LabelError> {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(LabelError::NotAnObject("not an object".into())),
            Err(e) => Err(LabelError::NotAnObject(e.to_string())),
        }
    }

    pub(crate) fn parse_object(obj: &Map<String, Value>) -> Result<Label, LabelError> {
        let field = |field: &str, problem: &str| LabelError::Field {
            field: field.to_string(),
            problem: problem.to_string(),
        };
        let transaction_id = match obj.get("transaction_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Err(field("transaction_id", "must be a non-empty string")),
            None => return Err(field("transaction_id", "missing")),
        };
        let is_fraud = match obj.get("is_fraud") {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
            Some(_) => return Err(field("is_fraud", "must be true/false or 1/0")),
            None => return Err(field("is_fraud", "missing")),
        };
        let labelled_at = match obj.get("labelled_at") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_f64().filter(|x| x.is_finite()),
            Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.timestamp_micros() as f64 / 1e6),
            Some(_) => None,
        };
        if obj.get("labelled_at").is_some_and(|v| !v.is_null()) && labelled_at.is_none() {
            return Err(field("labelled_at", "must be RFC 3339 or unix seconds"));
        }
        Ok(Label {
            transaction_id,
            is_fraud,
            labelled_at,
            context: None,
        })
    }

    /// The label as label-rate tables take it, when it carries their context; a label that does
    /// not say when it was made is known from `arrived_s`.
    pub fn event(&self, arrived_s: f64) -> Option<LabelEvent> {
        self.context.as_ref().map(|c| LabelEvent {
            ts: c.ts,
            known_at: self.labelled_at.unwrap_or(arrived_s),
            is_fraud: self.is_fraud,
            keys: c.keys.clone(),
        })
    }
}

/// A label's verdict on a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOutcome {
    /// Alerted, and fraud.
    TruePositive,
    /// Alerted, and legitimate.
    FalsePositive,
    /// Not alerted, and fraud.
    FalseNegative,
    /// Not alerted, and legitimate.
    TrueNegative,
}

impl LabelOutcome {
    /// From the decision and the label.
    pub fn of(alerted: bool, is_fraud: bool) -> Self {
        match (alerted, is_fraud) {
            (true, true) => LabelOutcome::TruePositive,
            (true, false) => LabelOutcome::FalsePositive,
            (false, true) => LabelOutcome::FalseNegative,
            (false, false) => LabelOutcome::TrueNegative,
        }
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelOutcome::TruePositive => "true_positive",
            LabelOutcome::FalsePositive => "false_positive",
            LabelOutcome::FalseNegative => "false_negative",
            LabelOutcome::TrueNegative => "true_negative",
        }
    }
}

/// Counts of decisions by label outcome (an alert is a positive).
///
/// One convention for ratios that have no denominator yet (no alert, or no fraud): they are
/// `None`, undefined, never a made-up 0. Each consumer says how it shows "undefined": offline
/// reports and run summaries print 0 (scikit-learn's `zero_division=0`), Prometheus gauges
/// export NaN (no data), the dashboard shows a dash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Frauds alerted.
    pub tp: u64,
    /// Legitimate transactions alerted.
    pub fp: u64,
    /// Legitimate transactions not alerted.
    pub tn: u64,
    /// Frauds missed.
    pub fn_: u64,
}

impl Confusion {
    /// Counts the outcomes of `scores` against `labels` at `threshold` (score >= threshold alerts).
    pub fn at(scores: &[f32], labels: &[bool], threshold: f64) -> Self {
        let mut c = Confusion::default();
        for (&s, &y) in scores.iter().zip(labels) {
            c.add(LabelOutcome::of(f64::from(s) >= threshold, y));
        }
        c
    }

    /// Counts one outcome.
    pub fn add(&mut self, o: LabelOutcome) {
        match o {
            LabelOutcome::TruePositive => self.tp += 1,
            LabelOutcome::FalsePositive => self.fp += 1,
            LabelOutcome::FalseNegative => self.fn_ += 1,
            LabelOutcome::TrueNegative => self.tn += 1,
        }
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, o: &Confusion) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.tn += o.tn;
    }

    /// Alerts that were fraud: tp / (tp + fp); None before any alert.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Frauds that were alerted: tp / (tp + fn); None before any fraud.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of precision and recall; None when either is undefined, 0 when both are 0.
    pub fn f1(&self) -> Option<f64> {
        Some(f1(self.precision()?, self.recall()?))
    }

    /// Precision and recall of the legitimate class (the classification report's other row).
    pub fn negative_precision_recall(&self) -> (Option<f64>, Option<f64>) {
        (
            ratio(self.tn, self.tn + self.fn_),
            ratio(self.tn, self.tn + self.fp),
        )
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Harmonic mean of two defined ratios; 0 when both are 0.
pub fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_by_hand_and_undefined_ratios() {
        // threshold 0.4: alerted 0.4, 0.8, 0.4, 0.9 -> tp 2 (0.8, 0.9), fp 2; missed 0.35.
        let y = [false, false, true, true, false, true];
        let s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9];
        let c = Confusion::at(&s, &y, 0.4);
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 2,
                tn: 1,
                fn_: 1
            }
        );
        assert_eq!(c.precision(), Some(0.5));
        assert!((c.recall().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.f1().unwrap() - 4.0 / 7.0).abs() < 1e-12);
        let none = Confusion::default();
        assert_eq!(
            (none.precision(), none.recall(), none.f1()),
            (None, None, None)
        );
        let missed = Confusion {
            fn_: 3,
            ..Confusion::default()
        };
        assert_eq!((missed.precision(), missed.recall()), (None, Some(0.0)));
        let wrong = Confusion {
            fp: 1,
            fn_: 1,
            ..Confusion::default()
        };
        assert_eq!(wrong.f1(), Some(0.0), "both 0: F1 is 0, not undefined");
    }

    #[test]
    fn label_messages_are_validated_field_by_field() {
        let ok = Label::parse(
            br#"{"transaction_id":"t1","is_fraud":1,"labelled_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!((ok.transaction_id.as_str(), ok.is_fraud), ("t1", true));
        assert!(
            !Label::parse(br#"{"transaction_id":7,"is_fraud":false}"#)
                .unwrap()
                .is_fraud
        );
        let e = Label::parse(br#"{"is_fraud":true}"#).unwrap_err();
        assert_eq!(e.field(), Some("transaction_id"));
        let e = Label::parse(br#"{"transaction_id":"t","is_fraud":"yes"}"#).unwrap_err();
        assert_eq!((e.field(), e.reason()), (Some("is_fraud"), "invalid_label"));
        let e = Label::parse(b"not json").unwrap_err();
        assert_eq!(e.reason(), "invalid_label_json");
        let e = Label::parse(br#"{"transaction_id":"t","is_fraud":true,"labelled_at":"soon"}"#)
            .unwrap_err();
        assert_eq!(e.field(), Some("labelled_at"));
        let secs = Label::parse(br#"{"transaction_id":"t","is_fraud":true,"labelled_at":5}"#);
        assert_eq!(secs.unwrap().labelled_at, Some(5.0));
        assert_eq!(ok.labelled_at, Some(1_767_225_600.0));
    }
}
