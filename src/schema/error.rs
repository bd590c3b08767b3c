//! Typed errors for records that do not fit the feature spec.
//!
//! Bad input is expected in production: every variant names the field and the reason so that
//! a dead-letter record, a log line and a counter can all say what was wrong.

use thiserror::Error;

/// Why one field of one record could not be turned into model input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SchemaError {
    /// The spec needs this field and the record does not have it (or it is null/empty).
    #[error("field `{field}`: missing")]
    Missing {
        /// The field's name in the spec.
        field: String,
    },
    /// A numeric field held text that does not parse as a number.
    #[error("field `{field}`: not a number: {value:?}")]
    NotANumber {
        /// The field's name in the spec.
        field: String,
        /// The offending text (truncated to 64 characters).
        value: String,
    },
    /// A numeric field parsed to NaN or an infinity, which would poison the scaler and model.
    #[error("field `{field}`: NaN or infinite: {value:?}")]
    NonFinite {
        /// The field's name in the spec.
        field: String,
        /// The offending text.
        value: String,
    },
    /// The JSON value has a type the field cannot take (an object where a number belongs).
    #[error("field `{field}`: wrong type: expected {expected}, got {got}")]
    WrongType {
        /// The field's name in the spec.
        field: String,
        /// What the spec expects there.
        expected: &'static str,
        /// What the record had.
        got: &'static str,
    },
    /// The event-time field is neither unix seconds nor a recognised date-time.
    #[error("field `{field}`: unparseable timestamp: {value:?}")]
    BadTimestamp {
        /// The field's name in the spec.
        field: String,
        /// The offending text.
        value: String,
    },
    /// The key (card) field is present but empty, so the record belongs to no card.
    #[error("field `{field}`: empty key")]
    EmptyKey {
        /// The field's name in the spec.
        field: String,
    },
    /// A numeric field outside the spec's `bounds` for it.
    #[error("field `{field}`: {value} is outside the accepted range [{}, {}]",
        min.map_or("-inf".to_string(), |m| m.to_string()),
        max.map_or("inf".to_string(), |m| m.to_string()))]
    OutOfRange {
        /// The field's name in the spec.
        field: String,
        /// The value.
        value: f64,
        /// The smallest accepted value, if bounded below.
        min: Option<f64>,
        /// The largest accepted value, if bounded above.
        max: Option<f64>,
    },
    /// A key or id is longer than [`MAX_KEY_BYTES`]: it would make one card's state (its id
    /// and its window's 30 transaction ids) unbounded.
    #[error("field `{field}`: {bytes} bytes, longer than the {max} allowed")]
    TooLong {
        /// The field's name in the spec.
        field: String,
        /// Its length in bytes.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A time outside [`MIN_TIMESTAMP`, `MAX_TIMESTAMP`] (before 1970 or after 2200): not a
    /// transaction's time, and it would freeze or shift its card's clock.
    #[error("field `{field}`: time out of range (1970 to 2200): {value:?}")]
    TimeOutOfRange {
        /// The field's name in the spec.
        field: String,
        /// The offending value.
        value: String,
    },
    /// The label field is not one of 0, 1, true, false.
    #[error("field `{field}`: not a fraud label (expected 0, 1, true or false): {value:?}")]
    BadLabel {
        /// The field's name in the spec.
        field: String,
        /// The offending text.
        value: String,
    },
}

impl SchemaError {
    /// Every [`SchemaError::reason`], for documentation and the metric's label values.
    pub const REASONS: [&'static str; 10] = [
        "missing",
        "not_a_number",
        "non_finite",
        "out_of_range",
        "wrong_type",
        "bad_timestamp",
        "empty_key",
        "too_long",
        "ts_out_of_range",
        "bad_label",
    ];

    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            SchemaError::Missing { field }
            | SchemaError::NotANumber { field, .. }
            | SchemaError::NonFinite { field, .. }
            | SchemaError::OutOfRange { field, .. }
            | SchemaError::WrongType { field, .. }
            | SchemaError::BadTimestamp { field, .. }
            | SchemaError::EmptyKey { field }
            | SchemaError::TooLong { field, .. }
            | SchemaError::TimeOutOfRange { field, .. }
            | SchemaError::BadLabel { field, .. } => field,
        }
    }

    /// A short, fixed reason name: small enough to be a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            SchemaError::Missing { .. } => "missing",
            SchemaError::NotANumber { .. } => "not_a_number",
            SchemaError::NonFinite { .. } => "non_finite",
            SchemaError::OutOfRange { .. } => "out_of_range",
            SchemaError::WrongType { .. } => "wrong_type",
            SchemaError::BadTimestamp { .. } => "bad_timestamp",
            SchemaError::EmptyKey { .. } => "empty_key",
            SchemaError::TooLong { .. } => "too_long",
            SchemaError::TimeOutOfRange { .. } => "ts_out_of_range",
            SchemaError::BadLabel { .. } => "bad_label",
        }
    }
}

/// The longest key or id accepted (card, transaction, context keys), in bytes: far above any
/// real identifier, and it bounds one card's state (its key and 30 ids) to a few kilobytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Earliest event time accepted (1970-01-01, seconds).
pub const MIN_TIMESTAMP: f64 = 0.0;

/// Latest event time accepted (2200-01-01, seconds): anything later is a broken clock or a
/// unit mistake, and would freeze its card's time-gap feature for as long as the card lives.
pub const MAX_TIMESTAMP: f64 = 7_258_118_400.0;

/// Cuts a value quoted in an error to a bounded length, so a huge bad field cannot bloat logs.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_listed_reason() {
        let f = || "f".to_string();
        let all = [
            SchemaError::Missing { field: f() },
            SchemaError::NotANumber {
                field: f(),
                value: f(),
            },
            SchemaError::NonFinite {
                field: f(),
                value: f(),
            },
            SchemaError::OutOfRange {
                field: f(),
                value: -1.0,
                min: Some(0.0),
                max: None,
            },
            SchemaError::WrongType {
                field: f(),
                expected: "x",
                got: "y",
            },
            SchemaError::BadTimestamp {
                field: f(),
                value: f(),
            },
            SchemaError::EmptyKey { field: f() },
            SchemaError::TooLong {
                field: f(),
                bytes: 300,
                max: 256,
            },
            SchemaError::TimeOutOfRange {
                field: f(),
                value: f(),
            },
            SchemaError::BadLabel {
                field: f(),
                value: f(),
            },
        ];
        let reasons: Vec<&str> = all.iter().map(SchemaError::reason).collect();
        assert_eq!(reasons, SchemaError::REASONS);
        assert!(all.iter().all(|e| e.field() == "f"));
    }
}
