//! What a transaction is: records, the feature spec that validates them, and file readers.

mod error;
mod label;
pub mod reader;
mod record;
mod spec;
mod transaction;

pub use error::SchemaError;
pub use label::{Confusion, Label, LabelError, LabelOutcome, f1};
pub use reader::{BadRow, Format, Loaded, RawRow, ReadError, RecordReader, RowError, load};
pub use record::{CsvHeader, CsvRow, Field, Record};
pub use spec::{Derived, FeatureSpec, SpecError, StateScope, TimeFormat};
pub use transaction::{SINGLE_STREAM_KEY, Transaction};
