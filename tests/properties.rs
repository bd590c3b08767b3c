//! Property tests of what input can do to the detector: arbitrary JSON (objects with the spec's
//! fields holding any kind of value, and arbitrary bytes), arbitrary labels and arbitrary CSV
//! never panic, and every rejection names a reason the README lists (and, for a field's fault,
//! the field).

mod common;

use std::sync::Arc;

use fraudstream::model::Bundle;
use fraudstream::observe::Metrics;
use fraudstream::schema::{FeatureSpec, Format, SchemaError, load};
use fraudstream::stream::{Detector, DetectorSettings, Ingest, dead_letter_reasons};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn detector() -> &'static Detector {
    static DETECTOR: std::sync::OnceLock<Detector> = std::sync::OnceLock::new();
    DETECTOR.get_or_init(|| {
        let bundle = Bundle::embedded_default(&candle_core::Device::Cpu).unwrap();
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        Detector::new(&bundle, DetectorSettings::default(), metrics)
    })
}

/// Any JSON value, nested a little.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![
            Just(1e308),
            Just(-1e308),
            Just(0.0),
            Just(-0.0),
            Just(1e20),
            Just(-1.0)
        ]
        .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        "[0-9]{1,25}(\\.[0-9]{0,5})?".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(".{0,4}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with each of the `cards` spec's fields present (any value) or absent, and maybe
/// an extra field.
fn any_transaction() -> impl Strategy<Value = Map<String, Value>> {
    let fields = [
        "card_id",
        "ts",
        "transaction_id",
        "is_fraud",
        "labelled_at",
        "amount",
        "terminal_id",
    ];
    (
        prop::collection::vec(prop::option::of(any_value()), fields.len()),
        prop::option::of((".{1,6}", any_value())),
    )
        .prop_map(move |(values, extra)| {
            let mut map: Map<String, Value> = fields
                .iter()
                .zip(values)
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect();
            if let Some((k, v)) = extra {
                map.insert(k, v);
            }
            map
        })
}

fn check_ingest(payload: Vec<u8>) -> Result<(), TestCaseError> {
    match detector().ingest(&common::envelope(payload, 1)).kind {
        Ingest::Invalid(letter) => {
            prop_assert!(
                dead_letter_reasons().contains(&letter.reason.as_str()),
                "undocumented reason {}",
                letter.reason
            );
            if SchemaError::REASONS.contains(&letter.reason.as_str()) {
                let field = letter.field.as_deref().unwrap_or("");
                prop_assert!(!field.is_empty(), "no field named: {}", letter.error);
                prop_assert!(letter.error.contains(field), "{}", letter.error);
            }
        }
        Ingest::Window(pending) => {
            prop_assert!(pending.len >= 1);
        }
        Ingest::Duplicate => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_transaction_object_is_windowed_or_rejected_with_a_named_field(tx in any_transaction()) {
        let spec = FeatureSpec::cards();
        if let Err(e) = spec.parse(&tx) {
            prop_assert!(SchemaError::REASONS.contains(&e.reason()));
            prop_assert!(!e.field().is_empty());
        }
        check_ingest(serde_json::to_vec(&Value::Object(tx)).unwrap())?;
    }

    #[test]
    fn any_bytes_are_windowed_or_dead_lettered(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_ingest(bytes)?;
    }

    #[test]
    fn any_label_message_is_accepted_or_rejected_with_a_reason(label in any_transaction()) {
        let payload = serde_json::to_vec(&Value::Object(label)).unwrap();
        if let Err(letter) = detector().label(&common::envelope(payload, 1)) {
            prop_assert!(dead_letter_reasons().contains(&letter.reason.as_str()), "{}", letter.reason);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_csv_loads_or_reports_bad_rows_by_line(
        rows in prop::collection::vec(prop::collection::vec("[^\\n\\r]{0,8}", 0..9), 0..6)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv");
        let mut text = "transaction_id,ts,card_id,terminal_id,amount,is_fraud\n".to_string();
        for row in &rows {
            text.push_str(&row.join(","));
            text.push('\n');
        }
        std::fs::write(&path, &text).unwrap();
        let spec = FeatureSpec::cards();
        if let Ok(loaded) = load(path.to_str().unwrap(), Format::Csv, &spec, 100, |_| {}) {
            for bad in &loaded.first_bad {
                prop_assert!(bad.line >= 2, "line {} of a file whose header is line 1", bad.line);
            }
            prop_assert!(loaded.transactions.len() as u64 + loaded.bad_rows <= rows.len() as u64 + 1);
        }
    }
}
