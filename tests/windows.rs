//! The window code serves training (offline, a whole sorted file, labels merged in at their
//! known times) and serving (online, one message at a time through the detector, labels from
//! the labels topic): both must give exactly the same tensors, context features included, and
//! no feature may read a label before it is known.

mod common;

use std::sync::Arc;

use fraudstream::features::{DEFAULT_LABEL_DELAY, DEFAULT_WINDOW, WindowBuilder, fit_scaler};
use fraudstream::model::Bundle;
use fraudstream::observe::Metrics;
use fraudstream::schema::{FeatureSpec, Format, Span, Transaction, load};
use fraudstream::stream::{Detector, DetectorSettings, Ingest};
use fraudstream::train::{Period, TimeSplit};

fn sorted(path: &str, spec: &FeatureSpec) -> Vec<Transaction> {
    let mut loaded = load(path, Format::from_path(path.as_ref()), spec, 0, |_| {}).unwrap();
    assert_eq!(loaded.bad_rows, 0);
    loaded.sort_by_time();
    loaded.transactions
}

/// A detector whose bundle has `spec`, the scaler fitted on the file's training period, and
/// random weights (only the windows are compared).
fn detector_for(
    dir: &std::path::Path,
    spec: &FeatureSpec,
    txs: &[Transaction],
    window: usize,
) -> (Detector, WindowBuilder) {
    let split = TimeSplit::fractions(txs[0].ts, txs[txs.len() - 1].ts);
    let scaler = fit_scaler(spec, txs, DEFAULT_LABEL_DELAY, |t| {
        split.period(t.ts) == Period::Train
    });
    common::bundle::random(dir, spec.clone(), window, scaler.clone());
    let bundle = Bundle::load(dir, &candle_core::Device::Cpu).unwrap();
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
    let builder = WindowBuilder::new(spec.clone(), scaler, window);
    (
        Detector::new(&bundle, DetectorSettings::default(), metrics),
        builder,
    )
}

/// Offline windows of the whole file vs the detector fed the same file as a stream: each
/// transaction as a JSON message, each label as a labels-topic message at the moment it is
/// known (`labelled_at` = event time + the label delay).
fn online_equals_offline(path: &str, spec: FeatureSpec, window: usize) {
    let txs = sorted(path, &spec);
    let dir = tempfile::tempdir().unwrap();
    let (detector, builder) = detector_for(dir.path(), &spec, &txs, window);
    let offline = builder.build_offline(&txs, DEFAULT_LABEL_DELAY, |_| true);
    assert_eq!(offline.len(), txs.len());
    // The labels topic's messages, one per labelled transaction, in the order they are known.
    let delay = DEFAULT_LABEL_DELAY.as_secs_f64();
    let mut labels: Vec<(f64, serde_json::Value)> = txs
        .iter()
        .filter_map(|t| {
            spec.label_message(t, t.ts + delay)
                .map(|m| (t.ts + delay, m))
        })
        .collect();
    labels.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut pending = labels.iter().peekable();
    let mut n_labels = 0;
    let uses_labels = !spec.label_keys().is_empty();
    for (i, tx) in txs.iter().enumerate() {
        // Every label known by this transaction's time has arrived.
        while let Some((_, msg)) = pending.next_if(|(known, _)| *known <= tx.ts) {
            detector
                .label(&common::envelope(
                    serde_json::to_vec(msg).unwrap(),
                    n_labels,
                ))
                .unwrap();
            n_labels += 1;
        }
        let record = serde_json::to_vec(&transaction_json(&spec, tx)).unwrap();
        let Ingest::Window(p) = detector.ingest(&common::envelope(record, i as i64)).kind else {
            panic!("transaction {i} was not windowed")
        };
        assert_eq!(p.window, offline[i].data, "window {i} differs");
        assert_eq!(p.len, offline[i].len);
    }
    let i = txs.len();
    assert!(!uses_labels || n_labels > 0, "labels were interleaved");
    assert_eq!(i, offline.len());
    assert!(
        offline.iter().any(|w| w.len == window),
        "some cards fill their window"
    );
    assert!(
        offline.iter().any(|w| w.len < window),
        "some windows are padded"
    );
}

/// A transaction as the JSON object a producer sends, without its label (labels come apart).
fn transaction_json(spec: &FeatureSpec, tx: &Transaction) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if let Some(k) = &spec.key {
        m.insert(k.clone(), tx.key.clone().into());
    }
    m.insert(spec.time.clone(), tx.ts.into());
    if let (Some(f), Some(id)) = (&spec.id, &tx.id) {
        m.insert(f.clone(), id.clone().into());
    }
    for (f, v) in spec.numeric.iter().zip(&tx.numeric) {
        m.insert(f.clone(), (*v).into());
    }
    for (f, v) in spec.context.iter().zip(&tx.context) {
        m.insert(f.clone(), v.clone().into());
    }
    serde_json::Value::Object(m)
}

#[test]
fn cards_layout_online_equals_offline_with_context_features() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::simulate(dir.path(), "cards.jsonl", &["--days", "45"]);
    let spec = FeatureSpec::cards();
    online_equals_offline(path.to_str().unwrap(), spec.clone(), DEFAULT_WINDOW);
    // The terminal rates were not all zero: labels did reach the features.
    let txs = sorted(path.to_str().unwrap(), &spec);
    let split = TimeSplit::fractions(txs[0].ts, txs[txs.len() - 1].ts);
    let scaler = fit_scaler(&spec, &txs, DEFAULT_LABEL_DELAY, |t| {
        split.period(t.ts) == Period::Train
    });
    let b = WindowBuilder::new(spec.clone(), scaler.clone(), 1);
    let rate = spec
        .feature_names()
        .iter()
        .position(|n| n == "terminal_id_fraud_rate_30d_delay_7d")
        .unwrap();
    let scaled_zero = -scaler.center[rate] / scaler.scale[rate];
    let nonzero = b
        .build_offline(&txs, DEFAULT_LABEL_DELAY, |_| true)
        .iter()
        .filter(|w| (w.data[rate] as f64 - scaled_zero).abs() > 1e-6)
        .count();
    assert!(
        nonzero > 100,
        "{nonzero} windows see a known terminal fraud"
    );
}

#[test]
fn ulb_layout_online_equals_offline() {
    // A small ULB-shaped file: Time, V1..V28, Amount, Class; one stream, no card column.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ulb.csv");
    let mut text = String::from("Time");
    (1..=28).for_each(|i| text.push_str(&format!(",V{i}")));
    text.push_str(",Amount,Class\n");
    for r in 0..120 {
        text.push_str(&format!("{}", r * 7));
        (1..=28).for_each(|i| text.push_str(&format!(",{:.4}", ((r * i) % 13) as f64 / 3.0 - 2.0)));
        text.push_str(&format!(
            ",{:.2},{}\n",
            (r % 17) as f64 * 9.5,
            u8::from(r % 40 == 0)
        ));
    }
    std::fs::write(&path, text).unwrap();
    online_equals_offline(path.to_str().unwrap(), FeatureSpec::ulb(), 8);
}

/// Labels that arrive early (a detector reading the labels topic ahead of the transactions)
/// must not change any feature: a label counts only from the time it is known. Here labels are
/// known 10 days after their transactions, later than the features' 7-day delay, so a window
/// ending 7 days back holds transactions whose labels are not known yet. If the tables used
/// labels on arrival, windows would differ from the offline ones and this test would fail.
#[test]
fn a_label_is_never_used_before_it_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::simulate(dir.path(), "cards.jsonl", &["--days", "45"]);
    let spec = FeatureSpec::cards();
    let txs = sorted(path.to_str().unwrap(), &spec);
    let known_after = Span::days(10);
    let model_dir = tempfile::tempdir().unwrap();
    let (detector, builder) = detector_for(model_dir.path(), &spec, &txs, 4);
    let offline = builder.build_offline(&txs, known_after, |_| true);
    let ingest_all = |d: &Detector| -> usize {
        txs.iter()
            .enumerate()
            .filter(|(i, tx)| {
                let record = serde_json::to_vec(&transaction_json(&spec, tx)).unwrap();
                let Ingest::Window(p) = d.ingest(&common::envelope(record, *i as i64)).kind else {
                    panic!()
                };
                p.window != offline[*i].data
            })
            .count()
    };
    // Every label arrives before the first transaction: as early as possible.
    for (n, tx) in txs.iter().enumerate() {
        let msg = spec
            .label_message(tx, tx.ts + known_after.as_secs_f64())
            .unwrap();
        detector
            .label(&common::envelope(
                serde_json::to_vec(&msg).unwrap(),
                n as i64,
            ))
            .unwrap();
    }
    assert_eq!(
        ingest_all(&detector),
        0,
        "windows that read labels not yet known"
    );

    // The same labels claiming to be known at once: now windows change, so the comparison
    // above does see a label used before its time.
    let eager_dir = tempfile::tempdir().unwrap();
    let (eager, _) = detector_for(eager_dir.path(), &spec, &txs, 4);
    for (n, tx) in txs.iter().enumerate() {
        let msg = spec.label_message(tx, tx.ts).unwrap();
        eager
            .label(&common::envelope(
                serde_json::to_vec(&msg).unwrap(),
                n as i64,
            ))
            .unwrap();
    }
    assert!(
        ingest_all(&eager) > 0,
        "labels known earlier must show in some window"
    );
}

#[test]
fn scaler_is_fitted_on_the_training_period_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::simulate(dir.path(), "cards.csv", &[]);
    let spec = FeatureSpec::cards();
    let txs = sorted(path.to_str().unwrap(), &spec);
    let split = TimeSplit::fractions(txs[0].ts, txs[txs.len() - 1].ts);
    let in_train = |t: &Transaction| split.period(t.ts) == Period::Train;
    let scaler = fit_scaler(&spec, &txs, DEFAULT_LABEL_DELAY, in_train);
    assert_eq!(
        scaler.fitted_rows as usize,
        txs.iter().filter(|t| in_train(t)).count()
    );

    // Inflate every amount after the training period: the scaler must not move.
    let mut shifted = txs.clone();
    for t in shifted
        .iter_mut()
        .filter(|t| split.period(t.ts) != Period::Train)
    {
        t.numeric[0] *= 1000.0;
    }
    assert_eq!(
        fit_scaler(&spec, &shifted, DEFAULT_LABEL_DELAY, in_train),
        scaler
    );
    // ...while fitting on everything would have.
    assert_ne!(
        fit_scaler(&spec, &shifted, DEFAULT_LABEL_DELAY, |_| true),
        scaler
    );
}
