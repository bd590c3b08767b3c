//! Raw (unscaled) feature vectors: a transaction's numeric fields plus derived features that
//! read the card's own history and the label-rate tables.

use std::f64::consts::TAU;

use super::aggregates::CardSeries;
use super::labels::{LabelTables, RateQuery};
use crate::schema::{Derived, FeatureSpec, Transaction};

/// What a card's derived features remember between its transactions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CardHistory {
    /// Event time of the card's latest transaction so far.
    pub last_ts: Option<f64>,
    /// Its transactions per hour, for count, mean and relative features.
    pub series: CardSeries,
}

/// A derived feature with its lookups resolved once, not per record.
#[derive(Debug, Clone)]
enum Step {
    Gap,
    Hour,
    Log1p {
        numeric: usize,
    },
    Weekend,
    Night,
    Count {
        window_secs: i64,
    },
    Mean {
        field: usize,
        window_secs: i64,
    },
    Relative {
        field: usize,
        numeric: usize,
        window_secs: i64,
    },
    Rate {
        query: RateQuery,
        key: KeySource,
    },
}

/// Where a label-rate feature finds its key value in a transaction.
#[derive(Debug, Clone, Copy)]
enum KeySource {
    Card,
    Context(usize),
}

/// Turns a transaction into its raw feature vector, in the spec's column order.
#[derive(Debug, Clone)]
pub struct Featurizer {
    spec: FeatureSpec,
    steps: Vec<Step>,
    /// Indices in `numeric` of the fields card aggregates sum.
    aggregated: Vec<usize>,
    /// The longest card-aggregate window: how long the card's buckets are kept.
    card_horizon_secs: i64,
    /// Features per transaction (asked for per record: computed once).
    width: usize,
}

impl Featurizer {
    /// Prepares a validated spec for per-record use.
    pub fn new(spec: FeatureSpec) -> Self {
        let numeric = |f: &str| {
            spec.numeric
                .iter()
                .position(|n| n == f)
                .expect("validated spec: the field is numeric")
        };
        let fields = spec.aggregated_fields();
        let field = |f: &str| fields.iter().position(|n| n == f).expect("aggregated");
        let keys = spec.label_keys();
        let secs = |s: crate::schema::Span| s.as_secs() as i64;
        let steps = spec
            .derived
            .iter()
            .map(|d| match d {
                Derived::SecondsSincePrevLog1p => Step::Gap,
                Derived::HourOfDay => Step::Hour,
                Derived::Log1p { field } => Step::Log1p {
                    numeric: numeric(field),
                },
                Derived::Weekend => Step::Weekend,
                Derived::Night => Step::Night,
                Derived::Count { window, .. } => Step::Count {
                    window_secs: secs(*window),
                },
                Derived::Mean {
                    field: f, window, ..
                } => Step::Mean {
                    field: field(f),
                    window_secs: secs(*window),
                },
                Derived::Relative {
                    field: f, window, ..
                } => Step::Relative {
                    field: field(f),
                    numeric: numeric(f),
                    window_secs: secs(*window),
                },
                Derived::LabelRate { key, window, delay } => Step::Rate {
                    query: RateQuery {
                        table: keys.iter().position(|k| k == key).expect("a label key"),
                        window_secs: secs(*window),
                        delay_secs: secs(*delay),
                    },
                    key: match spec.context.iter().position(|c| c == key) {
                        Some(i) => KeySource::Context(i),
                        None => KeySource::Card,
                    },
                },
            })
            .collect();
        let card_horizon_secs = spec
            .derived
            .iter()
            .filter_map(Derived::card_window)
            .map(secs)
            .max()
            .unwrap_or(0);
        Featurizer {
            width: spec.width(),
            aggregated: fields.iter().map(|f| numeric(f)).collect(),
            spec,
            steps,
            card_horizon_secs,
        }
    }

    /// How many numeric fields card aggregates sum (the sums per hourly bucket).
    pub fn aggregated_fields(&self) -> usize {
        self.aggregated.len()
    }

    /// The spec this featurizer follows.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// The number of features per transaction.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Writes the raw features of `tx` into `out` (cleared first) and advances the card's
    /// history. Label-rate features read `tables` as of `tx`'s event time.
    pub fn raw(
        &self,
        history: &mut CardHistory,
        tables: &LabelTables,
        tx: &Transaction,
        out: &mut Vec<f64>,
    ) {
        out.clear();
        out.extend_from_slice(&tx.numeric);
        if self.card_horizon_secs > 0 {
            let values: Vec<f64> = self.aggregated.iter().map(|&i| tx.numeric[i]).collect();
            history.series.add(tx.ts, &values, self.card_horizon_secs);
        }
        let k = self.aggregated.len();
        for step in &self.steps {
            match *step {
                Step::Gap => {
                    // A card's first transaction has no gap; out-of-order records count as 0.
                    let gap = history.last_ts.map_or(0.0, |p| (tx.ts - p).max(0.0));
                    out.push(gap.ln_1p());
                }
                Step::Hour => {
                    let angle = TAU * tx.ts.rem_euclid(86_400.0) / 86_400.0;
                    out.push(angle.sin());
                    out.push(angle.cos());
                }
                Step::Log1p { numeric } => out.push(tx.numeric[numeric].max(0.0).ln_1p()),
                Step::Weekend => {
                    // 1970-01-01 was a Thursday: (days + 3) mod 7 is 0 on Mondays.
                    let weekday = ((tx.ts / 86_400.0).floor() as i64 + 3).rem_euclid(7);
                    out.push(f64::from(u8::from(weekday >= 5)));
                }
                Step::Night => {
                    let hour = (tx.ts.rem_euclid(86_400.0) / 3_600.0).floor();
                    out.push(f64::from(u8::from(hour <= 6.0)));
                }
                Step::Count { window_secs } => {
                    let t = history.series.totals(tx.ts, window_secs, 0, k);
                    out.push(f64::from(t.count));
                }
                Step::Mean { field, window_secs } => {
                    let t = history.series.totals(tx.ts, window_secs, field, k);
                    out.push(t.sum / f64::from(t.count.max(1)));
                }
                Step::Relative {
                    field,
                    numeric,
                    window_secs,
                } => {
                    let t = history.series.totals(tx.ts, window_secs, field, k);
                    let x = tx.numeric[numeric];
                    // The mean of the earlier transactions: the window minus this one.
                    let earlier = t.count.saturating_sub(1);
                    out.push(if earlier == 0 {
                        0.0
                    } else {
                        let mean = (t.sum - x) / f64::from(earlier);
                        x.max(0.0).ln_1p() - mean.max(0.0).ln_1p()
                    });
                }
                Step::Rate { query, key } => {
                    let value = match key {
                        KeySource::Card => tx.key.as_str(),
                        KeySource::Context(i) => tx.context[i].as_str(),
                    };
                    let (labelled, rate) = tables.rate(&query, value, tx.ts);
                    out.push(labelled);
                    out.push(rate);
                }
            }
        }
        history.last_ts = Some(history.last_ts.map_or(tx.ts, |p| p.max(tx.ts)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::LabelEvent;

    fn tx(ts: f64, amount: f64) -> Transaction {
        Transaction {
            key: "c".into(),
            ts,
            id: None,
            label: None,
            labelled_at: None,
            numeric: vec![amount],
            context: vec!["T1".into()],
        }
    }

    fn column(spec: &FeatureSpec, name: &str) -> usize {
        spec.feature_names().iter().position(|n| n == name).unwrap()
    }

    #[test]
    fn derived_features_follow_the_card_history() {
        let spec = FeatureSpec::cards();
        let f = Featurizer::new(spec.clone());
        let tables = LabelTables::new(&spec);
        let mut h = CardHistory::default();
        let mut out = Vec::new();
        // Sunday 2018-04-01 06:00 UTC: angle is a quarter turn; weekend; night (hour 6).
        let t0 = 1_522_562_400.0;
        f.raw(&mut h, &tables, &tx(t0, 99.0), &mut out);
        assert_eq!(out.len(), spec.width());
        assert_eq!(out[0], 99.0);
        assert_eq!(out[1], 0.0, "first transaction has no gap");
        assert!((out[2] - 1.0).abs() < 1e-12 && out[3].abs() < 1e-12);
        assert!((out[4] - 100f64.ln()).abs() < 1e-12);
        assert_eq!((out[5], out[6]), (1.0, 1.0), "weekend, night");
        assert_eq!(out[column(&spec, "card_id_count_1d")], 1.0);
        assert_eq!(out[column(&spec, "card_id_mean_amount_7d")], 99.0);
        assert_eq!(
            out[column(&spec, "card_id_relative_amount_30d")],
            0.0,
            "no earlier one"
        );
        // Monday 07:40: a weekday, not night; a second and third transaction.
        let t1 = t0 + 86_400.0 + 6_000.0;
        f.raw(&mut h, &tables, &tx(t1, 1.0), &mut out);
        assert!((out[1] - (86_400f64 + 6_000.0 + 1.0).ln()).abs() < 1e-9);
        assert_eq!((out[5], out[6]), (0.0, 0.0));
        f.raw(&mut h, &tables, &tx(t1 + 60.0, 9.0), &mut out);
        assert_eq!(
            out[column(&spec, "card_id_count_1d")],
            2.0,
            "the first is 25 h back"
        );
        assert_eq!(out[column(&spec, "card_id_count_7d")], 3.0);
        assert!((out[column(&spec, "card_id_mean_amount_7d")] - 109.0 / 3.0).abs() < 1e-12);
        let rel = out[column(&spec, "card_id_relative_amount_30d")];
        assert!(
            (rel - (10f64.ln() - 51f64.ln())).abs() < 1e-12,
            "9 against a mean of 50"
        );
        assert_eq!(h.last_ts, Some(t1 + 60.0));
    }

    /// The out-of-order rule: a late record is accepted with a time gap of 0, and the card's
    /// clock never moves backwards, so the records after it see gaps from the latest time.
    #[test]
    fn a_late_record_does_not_move_the_card_clock_back() {
        let spec = FeatureSpec::cards();
        let f = Featurizer::new(spec.clone());
        let tables = LabelTables::new(&spec);
        let mut h = CardHistory::default();
        let mut out = vec![0.0; f.width()];
        let t0 = 1_522_540_800.0;
        f.raw(&mut h, &tables, &tx(t0, 10.0), &mut out);
        f.raw(&mut h, &tables, &tx(t0 - 86_400.0, 10.0), &mut out);
        assert_eq!(out[1], 0.0, "a late record's gap is 0, not negative");
        assert_eq!(h.last_ts, Some(t0), "the clock stays at the latest time");
        f.raw(&mut h, &tables, &tx(t0 + 60.0, 10.0), &mut out);
        assert!(
            (out[1] - 61f64.ln()).abs() < 1e-9,
            "gap from t0, not from the late one"
        );
    }

    #[test]
    fn terminal_fraud_rates_come_from_known_labels() {
        let spec = FeatureSpec::cards();
        let f = Featurizer::new(spec.clone());
        let tables = LabelTables::new(&spec);
        let t0 = 1_522_540_800.0;
        for (i, fraud) in [true, false, false, true].iter().enumerate() {
            let ts = t0 + i as f64 * 3_600.0;
            tables.apply(&LabelEvent {
                ts,
                known_at: ts + 7.0 * 86_400.0,
                is_fraud: *fraud,
                keys: vec!["T1".into()],
            });
        }
        let mut out = Vec::new();
        let mut h = CardHistory::default();
        f.raw(&mut h, &tables, &tx(t0 + 10.0 * 86_400.0, 5.0), &mut out);
        let (n, rate) = (
            out[column(&spec, "terminal_id_labelled_7d_delay_7d")],
            out[column(&spec, "terminal_id_fraud_rate_7d_delay_7d")],
        );
        assert_eq!((n, rate), (4.0, 0.5));
        // Nothing known a week after the transactions: the window ends before they happened.
        f.raw(&mut h, &tables, &tx(t0 + 7.0 * 86_400.0, 5.0), &mut out);
        assert_eq!(out[column(&spec, "terminal_id_labelled_30d_delay_7d")], 0.0);
    }
}
