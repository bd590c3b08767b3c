//! What a transaction is: records, the feature spec that validates them, and file readers.

mod derived;
mod error;
mod label;
pub mod reader;
mod record;
mod spec;
mod transaction;

pub use derived::{Derived, Span, StateScope};
pub use error::{MAX_KEY_BYTES, MAX_TIMESTAMP, MIN_TIMESTAMP, SchemaError};
pub use label::{Confusion, Label, LabelContext, LabelError, LabelEvent, LabelOutcome, f1};
pub use reader::{BadRow, Format, Loaded, RawRow, ReadError, RecordReader, RowError, load};
pub use record::{CsvHeader, CsvRow, Field, Record};
pub use spec::{AMOUNT_CEILING, Bounds, FeatureSpec, SpecError, TimeFormat};
pub use transaction::{SINGLE_STREAM_KEY, Transaction};
