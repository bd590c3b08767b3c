//! The detector's pipeline: source -> card state -> micro-batcher -> scorer -> sink.
//!
//! [`Detector::ingest`] turns a message into a window (or a dead letter), [`batcher`] scores
//! windows in batches off the async reactor, and a transport writes alerts, scores and dead
//! letters. [`embedded`] is the file/stdin transport.

pub mod batcher;
mod detector;
pub mod embedded;
pub mod kafka;
mod records;
mod stats;

pub use batcher::{BatchSettings, Outcome};
pub use detector::{Decision, Detector, Ingested, Pending};
pub use embedded::{EmbeddedConfig, Endpoint, run_embedded};
pub use kafka::{KafkaSettings, run_kafka};
pub use records::{Alert, AttentionRef, DeadLetter, Envelope, ModelRef, ScoreRecord, Source};
pub use stats::RunStats;
