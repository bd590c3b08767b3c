//! Transaction: a record that passed the spec, with typed fields.

use chrono::{DateTime, NaiveDateTime};
use serde::{Deserialize, Serialize};

use super::error::{MAX_KEY_BYTES, MAX_TIMESTAMP, MIN_TIMESTAMP, SchemaError, clip};
use super::label::{Label, LabelContext, LabelError};
use super::record::{Field, Record};
use super::spec::{FeatureSpec, TimeFormat};

/// The card key used when a spec names no key field: every record is one stream.
pub const SINGLE_STREAM_KEY: &str = "all";

/// A validated transaction: everything the window and the alert need, nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// The card (window key).
    pub key: String,
    /// Event time in seconds (unix seconds, or relative seconds for ULB's `Time`).
    pub ts: f64,
    /// The transaction id, if the spec names one.
    pub id: Option<String>,
    /// The fraud label, when the record carries one.
    pub label: Option<bool>,
    /// When the label became known (seconds), when the record says (the spec's `labelled_at`).
    #[serde(default)]
    pub labelled_at: Option<f64>,
    /// Values of the spec's `numeric` fields, in order.
    pub numeric: Vec<f64>,
    /// Values of the spec's `context` fields (empty string when absent).
    pub context: Vec<String>,
}

impl FeatureSpec {
    /// Validates a record against the spec. The first bad field is reported.
    pub fn parse(&self, rec: &impl Record) -> Result<Transaction, SchemaError> {
        let key = match &self.key {
            None => SINGLE_STREAM_KEY.to_string(),
            Some(f) => parse_key(f, rec.field(f))?,
        };
        let ts = parse_time(&self.time, self.time_format, rec.field(&self.time))?;
        let id = match &self.id {
            None => None,
            Some(f) => match rec.field(f) {
                Field::Missing | Field::Null => None,
                v => Some(parse_key(f, v)?),
            },
        };
        let label = match &self.label {
            None => None,
            Some(f) => parse_label(f, rec.field(f))?,
        };
        let labelled_at = match &self.labelled_at {
            Some(f) => match rec.field(f) {
                Field::Missing | Field::Null => None,
                v => Some(parse_time(f, self.time_format, v)?),
            },
            None => None,
        };
        let numeric = self
            .numeric
            .iter()
            .map(|f| {
                let x = parse_number(f, rec.field(f))?;
                match self.bounds.get(f) {
                    Some(b) if !b.contains(x) => Err(SchemaError::OutOfRange {
                        field: f.clone(),
                        value: x,
                        min: b.min,
                        max: b.max,
                    }),
                    _ => Ok(x),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let context = self
            .context
            .iter()
            .map(|f| {
                let v = context_value(rec.field(f)).unwrap_or_default();
                if v.len() > MAX_KEY_BYTES {
                    return Err(SchemaError::TooLong {
                        field: f.clone(),
                        bytes: v.len(),
                        max: MAX_KEY_BYTES,
                    });
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Transaction {
            key,
            ts,
            id,
            label,
            labelled_at,
            numeric,
            context,
        })
    }
}

impl FeatureSpec {
    /// Parses a label message: its own fields ([`Label::parse`]) and, when the spec has
    /// label-rate features, the judged transaction's event time (the spec's `time` field) and
    /// its label keys, which every label must then carry.
    pub fn parse_label(&self, payload: &[u8]) -> Result<Label, LabelError> {
        let obj = Label::object(payload)?;
        let mut label = Label::parse_object(&obj)?;
        let keys = self.label_keys();
        if keys.is_empty() {
            return Ok(label);
        }
        let wrong = |e: SchemaError| LabelError::Field {
            field: e.field().to_string(),
            problem: e.to_string(),
        };
        let ts = parse_time(&self.time, self.time_format, obj.field(&self.time)).map_err(wrong)?;
        let keys = keys
            .iter()
            .map(|k| {
                let value = if self.key.as_ref() == Some(k) {
                    parse_key(k, obj.field(k)).ok()
                } else {
                    context_value(obj.field(k))
                };
                value
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| LabelError::Field {
                        field: k.clone(),
                        problem: "missing (label-rate features are kept by it)".into(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        label.context = Some(LabelContext { ts, keys });
        Ok(label)
    }
}

impl FeatureSpec {
    /// The label message of a labelled transaction, as [`FeatureSpec::parse_label`] reads it:
    /// `{transaction_id, is_fraud, labelled_at (RFC 3339), <time field>, <label keys>}`. None
    /// without an id or a label.
    pub fn label_message(&self, tx: &Transaction, labelled_at: f64) -> Option<serde_json::Value> {
        let (id, is_fraud) = (tx.id.as_ref()?, tx.label?);
        let mut m = serde_json::Map::new();
        m.insert("transaction_id".into(), id.clone().into());
        m.insert("is_fraud".into(), is_fraud.into());
        let at = chrono::DateTime::from_timestamp_micros((labelled_at * 1e6).round() as i64)?;
        m.insert(
            "labelled_at".into(),
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        if !self.label_keys().is_empty() {
            m.insert(self.time.clone(), tx.ts.into());
            for (k, v) in self.label_keys().iter().zip(self.label_key_values(tx)) {
                m.insert(k.clone(), v.into());
            }
        }
        Some(serde_json::Value::Object(m))
    }

    /// A transaction's values of the spec's label keys (what its label event is filed under).
    pub fn label_key_values(&self, tx: &Transaction) -> Vec<String> {
        self.label_keys()
            .iter()
            .map(|k| match self.context.iter().position(|c| c == k) {
                Some(i) => tx.context[i].clone(),
                None => tx.key.clone(),
            })
            .collect()
    }
}

/// A context field's text: numbers as [`format_number`] writes them, so `9` and `"9"` are the
/// same terminal; None when absent, null or nested.
fn context_value(v: Field<'_>) -> Option<String> {
    match v {
        Field::Str(s) => Some(s.to_string()),
        Field::Num(n) => Some(format_number(n)),
        Field::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Integers print without a fraction so `123` and `"123"` are the same card.
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

pub(crate) fn parse_key(field: &str, v: Field<'_>) -> Result<String, SchemaError> {
    let f = || field.to_string();
    match v {
        Field::Missing | Field::Null => Err(SchemaError::Missing { field: f() }),
        Field::Str(s) if s.trim().is_empty() => Err(SchemaError::EmptyKey { field: f() }),
        Field::Str(s) if s.trim().len() > MAX_KEY_BYTES => Err(SchemaError::TooLong {
            field: f(),
            bytes: s.trim().len(),
            max: MAX_KEY_BYTES,
        }),
        Field::Str(s) => Ok(s.trim().to_string()),
        Field::Num(n) if n.is_finite() => Ok(format_number(n)),
        other => Err(SchemaError::WrongType {
            field: f(),
            expected: "string or integer",
            got: other.type_name(),
        }),
    }
}

/// Parses a numeric field; text is accepted (CSV), NaN and infinities are not.
pub(crate) fn parse_number(field: &str, v: Field<'_>) -> Result<f64, SchemaError> {
    let f = || field.to_string();
    let x = match v {
        Field::Missing | Field::Null => return Err(SchemaError::Missing { field: f() }),
        Field::Num(n) => n,
        Field::Str(s) => s.parse::<f64>().map_err(|_| SchemaError::NotANumber {
            field: f(),
            value: clip(s),
        })?,
        other => {
            return Err(SchemaError::WrongType {
                field: f(),
                expected: "number",
                got: other.type_name(),
            });
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(SchemaError::NonFinite {
            field: f(),
            value: match v {
                Field::Str(s) => clip(s),
                _ => x.to_string(),
            },
        })
    }
}

pub(crate) fn parse_time(
    field: &str,
    format: TimeFormat,
    v: Field<'_>,
) -> Result<f64, SchemaError> {
    let bad = |s: &str| SchemaError::BadTimestamp {
        field: field.to_string(),
        value: clip(s),
    };
    let secs = match (format, v) {
        (_, Field::Missing | Field::Null) => {
            return Err(SchemaError::Missing {
                field: field.into(),
            });
        }
        (TimeFormat::Rfc3339, Field::Str(s)) => rfc3339(s).ok_or_else(|| bad(s))?,
        (TimeFormat::Rfc3339, Field::Num(n)) => return Err(bad(&n.to_string())),
        (TimeFormat::Millis, v) => parse_number(field, v).map_err(|_| bad(&show(v)))? / 1000.0,
        (TimeFormat::Seconds, v) => parse_number(field, v).map_err(|_| bad(&show(v)))?,
        (TimeFormat::Auto, Field::Num(n)) => n,
        (TimeFormat::Auto, Field::Str(s)) => match s.parse::<f64>() {
            Ok(n) => n,
            Err(_) => rfc3339(s).or_else(|| naive_utc(s)).ok_or_else(|| bad(s))?,
        },
        (_, other) => {
            return Err(SchemaError::WrongType {
                field: field.into(),
                expected: "timestamp",
                got: other.type_name(),
            });
        }
    };
    if !secs.is_finite() {
        Err(bad(&secs.to_string()))
    } else if !(MIN_TIMESTAMP..=MAX_TIMESTAMP).contains(&secs) {
        Err(SchemaError::TimeOutOfRange {
            field: field.to_string(),
            value: clip(&show(v)),
        })
    } else {
        Ok(secs)
    }
}

fn show(v: Field<'_>) -> String {
    match v {
        Field::Str(s) => s.to_string(),
        Field::Num(n) => n.to_string(),
        other => other.type_name().to_string(),
    }
}

fn rfc3339(s: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros() as f64 / 1e6)
}

fn naive_utc(s: &str) -> Option<f64> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc().timestamp_micros() as f64 / 1e6)
}

fn parse_label(field: &str, v: Field<'_>) -> Result<Option<bool>, SchemaError> {
    let bad = |s: String| SchemaError::BadLabel {
        field: field.to_string(),
        value: clip(&s),
    };
    match v {
        // Unlabelled records are normal in serving: labels arrive later.
        Field::Missing | Field::Null => Ok(None),
        Field::Bool(b) => Ok(Some(b)),
        Field::Num(0.0) => Ok(Some(false)),
        Field::Num(1.0) => Ok(Some(true)),
        Field::Num(n) => Err(bad(n.to_string())),
        Field::Str(s) => match s.to_ascii_lowercase().as_str() {
            "0" | "0.0" | "false" => Ok(Some(false)),
            "1" | "1.0" | "true" => Ok(Some(true)),
            _ => Err(bad(s.to_string())),
        },
        Field::Nested(t) => Err(SchemaError::WrongType {
            field: field.into(),
            expected: "0, 1 or boolean",
            got: t,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value, json};

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn good() -> Value {
        json!({"transaction_id": 7, "ts": 1522540800, "card_id": 42, "terminal_id": 9,
               "amount": 12.5, "is_fraud": 0})
    }

    fn err_for(patch: impl FnOnce(&mut Map<String, Value>)) -> SchemaError {
        let mut rec = obj(good());
        patch(&mut rec);
        FeatureSpec::cards().parse(&rec).unwrap_err()
    }

    #[test]
    fn parses_a_good_json_record() {
        let tx = FeatureSpec::cards().parse(&obj(good())).unwrap();
        assert_eq!(tx.key, "42");
        assert_eq!(tx.id.as_deref(), Some("7"));
        assert_eq!(tx.ts, 1522540800.0);
        assert_eq!(tx.label, Some(false));
        assert_eq!(tx.numeric, vec![12.5]);
        assert_eq!(tx.context, vec!["9".to_string()]);
    }

    #[test]
    fn each_error_names_field_and_reason() {
        let e = err_for(|r| {
            r.remove("amount");
        });
        assert_eq!(
            e,
            SchemaError::Missing {
                field: "amount".into()
            }
        );
        assert_eq!(e.to_string(), "field `amount`: missing");

        let e = err_for(|r| {
            r.insert("amount".into(), json!("12,5"));
        });
        assert_eq!(e.reason(), "not_a_number");
        assert!(e.to_string().contains("`amount`") && e.to_string().contains("12,5"));

        let e = err_for(|r| {
            r.insert("amount".into(), json!("NaN"));
        });
        assert_eq!(e.reason(), "non_finite");
        let e = err_for(|r| {
            r.insert("amount".into(), json!("-inf"));
        });
        assert_eq!(e.reason(), "non_finite");

        let e = err_for(|r| {
            r.insert("amount".into(), json!({"v": 1}));
        });
        assert_eq!(
            e,
            SchemaError::WrongType {
                field: "amount".into(),
                expected: "number",
                got: "object"
            }
        );

        let e = err_for(|r| {
            r.insert("ts".into(), json!("yesterday"));
        });
        assert_eq!(e.reason(), "bad_timestamp");
        assert_eq!(e.field(), "ts");

        let e = err_for(|r| {
            r.insert("card_id".into(), json!("  "));
        });
        assert_eq!(
            e,
            SchemaError::EmptyKey {
                field: "card_id".into()
            }
        );

        let e = err_for(|r| {
            r.insert("card_id".into(), json!([1]));
        });
        assert_eq!(e.reason(), "wrong_type");

        let e = err_for(|r| {
            r.insert("is_fraud".into(), json!(2));
        });
        assert_eq!(e.reason(), "bad_label");

        // Keys and ids are bounded: one card's state cannot grow with them.
        for field in ["card_id", "transaction_id", "terminal_id"] {
            let e = err_for(|r| {
                r.insert(field.into(), json!("k".repeat(MAX_KEY_BYTES + 1)));
            });
            assert_eq!(
                e,
                SchemaError::TooLong {
                    field: field.into(),
                    bytes: MAX_KEY_BYTES + 1,
                    max: MAX_KEY_BYTES
                }
            );
        }
        // The cards preset bounds the amount: no negative, nothing absurd.
        for amount in [json!(-0.01), json!(1e308), json!("2000000")] {
            let e = err_for(|r| {
                r.insert("amount".into(), amount.clone());
            });
            assert_eq!(e.reason(), "out_of_range", "{amount}");
            assert_eq!(e.field(), "amount");
        }
        // Times a transaction cannot have: the year 3000, 1e20, before 1970.
        for ts in [json!(32_503_680_000_i64), json!(1e20), json!(-5)] {
            let e = err_for(|r| {
                r.insert("ts".into(), ts.clone());
            });
            assert_eq!(e.reason(), "ts_out_of_range", "{ts}");
            assert_eq!(e.field(), "ts");
        }
    }

    #[test]
    fn timestamps_in_every_supported_form() {
        let mut spec = FeatureSpec::cards();
        spec.time_format = TimeFormat::Auto;
        for ts in [
            json!(1522540800),
            json!("1522540800"),
            json!("2018-04-01T00:00:00Z"),
            json!("2018-04-01T02:00:00+02:00"),
            json!("2018-04-01 00:00:00"),
        ] {
            let mut rec = obj(good());
            rec.insert("ts".into(), ts.clone());
            assert_eq!(spec.parse(&rec).unwrap().ts, 1522540800.0, "{ts}");
        }
        spec.time_format = TimeFormat::Millis;
        let mut rec = obj(good());
        rec.insert("ts".into(), json!(1522540800123_i64));
        assert!((spec.parse(&rec).unwrap().ts - 1522540800.123).abs() < 1e-6);
        spec.time_format = TimeFormat::Rfc3339;
        assert_eq!(
            spec.parse(&obj(good())).unwrap_err().reason(),
            "bad_timestamp"
        );
    }

    #[test]
    fn missing_label_is_unlabelled_and_no_key_is_one_stream() {
        let mut rec = obj(good());
        rec.remove("is_fraud");
        assert_eq!(FeatureSpec::cards().parse(&rec).unwrap().label, None);

        let mut row = Map::new();
        row.insert("Time".into(), json!("0.0"));
        for i in 1..=28 {
            row.insert(format!("V{i}"), json!(format!("{}", i as f64 / 10.0)));
        }
        row.insert("Amount".into(), json!("149.62"));
        row.insert("Class".into(), json!("\"0\"".trim_matches('"')));
        let tx = FeatureSpec::ulb().parse(&row).unwrap();
        assert_eq!(tx.key, SINGLE_STREAM_KEY);
        assert_eq!(tx.numeric.len(), 30);
        assert_eq!(tx.label, Some(false));
    }
}
