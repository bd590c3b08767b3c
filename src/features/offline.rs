//! Offline files replayed as the stream a detector would have seen: the transactions in event
//! time order, and each label at the moment it became known (the file's `labelled_at`, else
//! event time + the label delay), merged in. Training, evaluation and warm-up all read files
//! this way, so a label is never used before it was known.

use crate::schema::{FeatureSpec, LabelEvent, Span, Transaction};

/// How long after its transaction a label is assumed known when the file does not say: a week,
/// the Fraud Detection Handbook's (and the default features') delay.
pub const DEFAULT_LABEL_DELAY: Span = Span::days(7);

/// One step of the merged stream.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// A label becomes known.
    Label(&'a LabelEvent),
    /// A transaction happens.
    Transaction(&'a Transaction),
}

/// The label events of the labelled transactions of `sorted`, in the order they become known
/// (none when the spec has no label-rate feature: nothing would read them).
pub fn label_events(spec: &FeatureSpec, sorted: &[Transaction], delay: Span) -> Vec<LabelEvent> {
    if spec.label_keys().is_empty() {
        return Vec::new();
    }
    let mut events: Vec<LabelEvent> = sorted
        .iter()
        .filter_map(|tx| {
            tx.label.map(|is_fraud| LabelEvent {
                ts: tx.ts,
                known_at: tx.labelled_at.unwrap_or(tx.ts + delay.as_secs_f64()),
                is_fraud,
                keys: spec.label_key_values(tx),
            })
        })
        .collect();
    events.sort_by(|a, b| a.known_at.total_cmp(&b.known_at));
    events
}

/// Calls `f` with every label and transaction in time order; a label known at a transaction's
/// time comes first (it is known then).
pub fn merged<'a>(
    sorted: &'a [Transaction],
    labels: &'a [LabelEvent],
    mut f: impl FnMut(Step<'a>),
) {
    let mut next = labels.iter().peekable();
    for tx in sorted {
        while let Some(l) = next.next_if(|l| l.known_at <= tx.ts) {
            f(Step::Label(l));
        }
        f(Step::Transaction(tx));
    }
    next.for_each(|l| f(Step::Label(l)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(ts: f64, label: Option<bool>, labelled_at: Option<f64>) -> Transaction {
        Transaction {
            key: "c".into(),
            ts,
            id: None,
            label,
            labelled_at,
            numeric: vec![1.0],
            context: vec!["T".into()],
        }
    }

    #[test]
    fn labels_join_the_stream_when_they_become_known() {
        let spec = FeatureSpec::cards();
        let day = 86_400.0;
        let txs = vec![
            tx(0.0, Some(true), None),
            tx(day, Some(false), Some(2.0 * day)),
            tx(7.0 * day, None, None),
            tx(9.0 * day, Some(false), None),
        ];
        let labels = label_events(&spec, &txs, Span::days(7));
        assert_eq!(labels.len(), 3, "the unlabelled one has no label");
        let mut order = Vec::new();
        merged(&txs, &labels, |s| {
            order.push(match s {
                Step::Label(l) => format!("L{}", l.ts / day),
                Step::Transaction(t) => format!("T{}", t.ts / day),
            })
        });
        // Day 1's label says it was known on day 2; day 0's is known on day 7 (with the
        // transaction of day 7, before it); day 9's after the file ends.
        assert_eq!(order, ["T0", "T1", "L1", "L0", "T7", "T9", "L9"]);
        assert_eq!(labels[0].keys, ["T"]);
        assert!(label_events(&FeatureSpec::ulb(), &txs, Span::days(7)).is_empty());
    }
}
