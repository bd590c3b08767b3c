//! The window code serves training (offline, a whole sorted file) and serving (online, one
//! record at a time): both must give exactly the same tensors.

mod common;

use fraudstream::features::{CardStore, DEFAULT_WINDOW, Observed, WindowBuilder, fit_scaler};
use fraudstream::schema::{FeatureSpec, Format, RecordReader, Transaction, load};
use fraudstream::train::{Period, TimeSplit};

fn sorted(path: &str, spec: &FeatureSpec) -> Vec<Transaction> {
    let mut loaded = load(path, Format::from_path(path.as_ref()), spec, 0, |_| {}).unwrap();
    assert_eq!(loaded.bad_rows, 0);
    loaded.sort_by_time();
    loaded.transactions
}

fn online_equals_offline(path: &str, spec: FeatureSpec, window: usize) {
    let txs = sorted(path, &spec);
    let split = TimeSplit::fractions(txs[0].ts, txs[txs.len() - 1].ts);
    let scaler = fit_scaler(&spec, &txs, |t| split.period(t.ts) == Period::Train);
    let builder = WindowBuilder::new(spec.clone(), scaler, window);
    let offline = builder.build_offline(&txs, |_| true);
    assert_eq!(offline.len(), txs.len());

    // Online: records straight from the file, parsed one at a time, into the shared store.
    let store = CardStore::new(builder);
    let mut reader = RecordReader::open(path, Format::from_path(path.as_ref())).unwrap();
    let mut i = 0;
    while let Some(row) = reader.next_row() {
        let (_line, raw) = row.unwrap();
        let tx = raw.unwrap().parse(&spec).unwrap();
        let Observed::Window(w) = store.observe(&tx) else {
            panic!("no duplicates in a simulated file")
        };
        assert_eq!(w, offline[i], "window {i} differs");
        i += 1;
    }
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

#[test]
fn cards_layout_online_equals_offline() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::simulate(dir.path(), "cards.jsonl", &[]);
    online_equals_offline(path.to_str().unwrap(), FeatureSpec::cards(), DEFAULT_WINDOW);
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

#[test]
fn scaler_is_fitted_on_the_training_period_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::simulate(dir.path(), "cards.csv", &[]);
    let spec = FeatureSpec::cards();
    let txs = sorted(path.to_str().unwrap(), &spec);
    let split = TimeSplit::fractions(txs[0].ts, txs[txs.len() - 1].ts);
    let in_train = |t: &Transaction| split.period(t.ts) == Period::Train;
    let scaler = fit_scaler(&spec, &txs, in_train);
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
    assert_eq!(fit_scaler(&spec, &shifted, in_train), scaler);
    // ...while fitting on everything would have.
    assert_ne!(fit_scaler(&spec, &shifted, |_| true), scaler);
}
