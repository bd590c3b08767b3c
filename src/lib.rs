//! fraudstream: a streaming credit-card fraud detector.
//!
//! # Layout
//! Modules in the order a transaction travels through them:
//!
//! - [`sim`]: the synthetic card-stream simulator (where test and demo transactions come from).
//! - [`schema`]: a record (JSON object or CSV row) enters here; the [`schema::FeatureSpec`]
//!   validates it into a [`schema::Transaction`] or a typed [`schema::SchemaError`]; file readers.
//! - [`features`]: raw features, the robust scaler, and the per-card ring-buffer window
//!   ([`features::WindowBuilder::observe`]), one implementation for training and serving; the
//!   online per-card state lives in [`features::CardStore`].
//! - [`state`]: card state that survives restarts and rebalances: each card's state as a
//!   changelog record, and its restore from the changelog topic.
//! - [`model`]: the attention-LSTM (candle layers for training, a plain-Rust forward for
//!   scoring) and the model bundle (safetensors + manifest).
//! - [`train`]: time split into periods, window datasets, focal loss, the training loop,
//!   threshold rules and offline metrics.
//! - [`report`]: PNG plots and the HTML evaluation report.
//! - [`stream`]: the detector, one pipeline for every transport ([`stream::run`]): a
//!   [`stream::Source`] reads envelopes (Kafka partitions, or a file through the schema's reader),
//!   [`stream::Detector::ingest`] turns each into its card's window (or a dead letter), the
//!   [`stream::batcher`] scores windows in micro-batches off the reactor, [`stream::settle()`]
//!   decides alert / score / dead letter (logging and counting each once), a [`stream::Sink`]
//!   publishes, and [`stream::acks::acknowledge`] stores each offset once its outputs are
//!   acknowledged, in order. `stream::kafka` and `stream::file` are the transports.
//! - [`observe`]: Prometheus metrics, live precision/recall from delayed labels, the dashboard
//!   and the HTTP server.
//! - [`cli`]: the subcommands that tie the stages together.

pub mod cli;
pub mod features;
pub mod model;
pub mod observe;
pub mod report;
pub mod schema;
pub mod sim;
pub mod state;
pub mod stream;
pub mod train;
