//! A card's state as one changelog record: `[format version][input offset, 8 bytes LE][postcard
//! body]`. The input offset (of the transaction whose processing produced this state) comes
//! first so a restore can choose which records to apply without decoding the rest.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::features::{CardHistory, CardSeries, CardState, Window, WindowBuilder};

/// The record layout's version; a record of another version is skipped (counted), never guessed.
pub const FORMAT_VERSION: u8 = 1;

const HEADER_BYTES: usize = 1 + 8;

/// Why a changelog record was not restored.
#[derive(Debug, Error, PartialEq)]
pub enum ImageError {
    /// Shorter than its header.
    #[error("record of {0} bytes is shorter than its header")]
    Truncated(usize),
    /// Written by another version of the layout.
    #[error("record format {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    /// The body does not decode.
    #[error("record body does not decode: {0}")]
    Corrupt(String),
    /// Written for another model's features or scaler: its rows would mean something else.
    #[error("record was written for another model's features")]
    OtherModel,
    /// Its rows or buckets do not fit this model's window.
    #[error("record's rows do not fit the window")]
    Shape,
}

impl ImageError {
    /// The `reason` label of `fraudstream_state_restore_skipped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Truncated(_) | ImageError::Corrupt(_) | ImageError::Shape => "corrupt",
            ImageError::Version(_) => "version",
            ImageError::OtherModel => "other_model",
        }
    }

    /// Every reason [`ImageError::reason`] gives.
    pub const REASONS: [&'static str; 3] = ["corrupt", "version", "other_model"];
}

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    recipe: u64,
    last_seen_ms: u64,
    last_ts: Option<f64>,
    rows: Vec<f32>,
    ids: Vec<Option<String>>,
    ts: Vec<f64>,
    hours: Vec<i64>,
    counts: Vec<u32>,
    sums: Vec<f64>,
}

/// The record for `card`'s state right after the transaction at `input_offset`; `recipe` is
/// [`WindowBuilder::fingerprint`].
pub fn encode(card: &CardState, recipe: u64, input_offset: i64) -> Vec<u8> {
    let (rows, ids, ts) = card.window.rows();
    let (hours, counts, sums) = card.history.series.parts();
    let body = Body {
        recipe,
        last_seen_ms: card.last_seen_ms,
        last_ts: card.history.last_ts,
        rows,
        ids: ids.into_iter().map(|i| i.map(|s| s.to_string())).collect(),
        ts,
        hours,
        counts,
        sums,
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + 4 * body.rows.len() + 256);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&input_offset.to_le_bytes());
    postcard::to_io(&body, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// The input offset a record was written after (its header only).
pub fn input_offset(record: &[u8]) -> Result<i64, ImageError> {
    if record.len() < HEADER_BYTES {
        return Err(ImageError::Truncated(record.len()));
    }
    if record[0] != FORMAT_VERSION {
        return Err(ImageError::Version(record[0]));
    }
    let offset: [u8; 8] = record[1..HEADER_BYTES].try_into().expect("8 bytes");
    Ok(i64::from_le_bytes(offset))
}

/// The card state a record holds, checked against the model that will use it. `shard` is the
/// input partition the card belongs to.
pub fn decode(record: &[u8], builder: &WindowBuilder, shard: i32) -> Result<CardState, ImageError> {
    input_offset(record)?;
    let body: Body = postcard::from_bytes(&record[HEADER_BYTES..])
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if body.recipe != builder.fingerprint() {
        return Err(ImageError::OtherModel);
    }
    let ids: Vec<Option<Arc<str>>> = body.ids.into_iter().map(|i| i.map(Arc::from)).collect();
    let window = Window::from_rows(
        builder.window_len(),
        builder.width(),
        &body.rows,
        ids,
        &body.ts,
    )
    .ok_or(ImageError::Shape)?;
    let series = CardSeries::from_parts(
        body.hours,
        body.counts,
        body.sums,
        builder.aggregated_fields(),
    )
    .ok_or(ImageError::Shape)?;
    Ok(CardState {
        history: CardHistory {
            last_ts: body.last_ts,
            series,
        },
        window,
        last_seen_ms: body.last_seen_ms,
        shard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::CardStore;
    use crate::model::Bundle;
    use crate::schema::Transaction;

    fn builder() -> WindowBuilder {
        Bundle::embedded_default(&candle_core::Device::Cpu)
            .unwrap()
            .window_builder()
    }

    fn tx(i: u32) -> Transaction {
        Transaction {
            key: "card-1".into(),
            ts: 1_522_540_800.0 + f64::from(i) * 5_000.0,
            id: Some(format!("t{i}")),
            label: None,
            labelled_at: None,
            numeric: vec![10.0 + f64::from(i % 7) * 13.0],
            context: vec![format!("term{}", i % 3)],
        }
    }

    fn window_after(store: &CardStore, i: u32) -> Vec<f32> {
        match store.observe(&tx(i)) {
            crate::features::Observed::Window(w) => w.data,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_restored_card_scores_its_next_transactions_exactly_like_the_uninterrupted_one() {
        let b = builder();
        for seen in [1u32, 12, 45] {
            let original = CardStore::new(b.clone());
            for i in 0..seen {
                window_after(&original, i);
            }
            let record = original
                .with_card("card-1", |c| encode(c, b.fingerprint(), 41))
                .unwrap();
            assert_eq!(input_offset(&record), Ok(41));
            let restored = CardStore::new(b.clone());
            restored.restore(vec![("card-1".into(), decode(&record, &b, 3).unwrap())]);
            assert_eq!(restored.with_card("card-1", |c| c.shard), Some(3));
            for i in seen..seen + 35 {
                assert_eq!(
                    window_after(&original, i),
                    window_after(&restored, i),
                    "{seen}/{i}"
                );
            }
            // A redelivered transaction still in the window is recognised after a restore.
            assert_eq!(
                restored.observe(&tx(seen + 34)),
                crate::features::Observed::Duplicate
            );
        }
    }

    #[test]
    fn records_of_another_model_another_version_or_broken_are_refused() {
        let b = builder();
        let store = CardStore::new(b.clone());
        window_after(&store, 0);
        let record = store.with_card("card-1", |c| encode(c, 7, 0)).unwrap();
        assert_eq!(decode(&record, &b, 0).unwrap_err(), ImageError::OtherModel);
        let good = store
            .with_card("card-1", |c| encode(c, b.fingerprint(), 0))
            .unwrap();
        let mut other_version = good.clone();
        other_version[0] = 9;
        assert_eq!(
            decode(&other_version, &b, 0).unwrap_err(),
            ImageError::Version(9)
        );
        assert_eq!(input_offset(&good[..5]), Err(ImageError::Truncated(5)));
        let cut = decode(&good[..good.len() - 3], &b, 0).unwrap_err();
        assert_eq!(cut.reason(), "corrupt", "{cut}");
        for e in [cut, ImageError::OtherModel, ImageError::Version(2)] {
            assert!(ImageError::REASONS.contains(&e.reason()));
        }
    }

    #[test]
    fn the_fingerprint_tells_recipes_apart_and_is_stable() {
        let b = builder();
        assert_eq!(b.fingerprint(), builder().fingerprint());
        let mut scaler = b.scaler().clone();
        scaler.center[0] += 1.0;
        let spec = crate::model::Bundle::embedded_default(&candle_core::Device::Cpu)
            .unwrap()
            .manifest
            .spec;
        let other = WindowBuilder::new(spec, scaler, b.window_len());
        assert_ne!(other.fingerprint(), b.fingerprint());
    }
}
