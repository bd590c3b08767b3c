//! Card state that survives crashes, restarts and rebalances. Every change of a card's state is
//! written, as a whole, to a compacted changelog topic keyed by card and partitioned like the
//! input ([`image`] is the record); when partitions are assigned, their cards are restored from
//! the changelog before any of their records is scored ([`changelog`]).
//!
//! Which records a restore applies: each record carries the input offset whose processing
//! produced it, and only records below the group's committed offset of that partition are
//! applied. The records at or after it are read again from the input and rebuild the same state,
//! so every score after a restore equals the score of an uninterrupted run, and a transaction
//! whose outputs were lost in a crash is scored (and published) again rather than skipped as a
//! redelivery. A card's changes within a flush interval are coalesced into one record ([`cache`]);
//! input offsets are then stored only at flush boundaries, so a commit never falls inside the
//! range of offsets one record covers.

pub mod cache;
pub mod changelog;
pub mod image;
pub mod snapshot;

pub use cache::{CachedRecord, RecordCache};
pub use changelog::{RestoreError, RestoreStats, Restorer, fold};
pub use image::{FORMAT_VERSION, ImageError, decode, encode, input_offset};
pub use snapshot::{Snapshot, SnapshotCard, SnapshotError};
