//! Streams simulated transactions to CSV or JSONL and keeps the run's statistics.

use std::io::{self, BufWriter, Write};

use serde::Serialize;

use super::SimTx;
use crate::schema::Format;

/// The columns, in file order.
pub const COLUMNS: [&str; 7] = [
    "transaction_id",
    "ts",
    "card_id",
    "terminal_id",
    "amount",
    "is_fraud",
    "scenario",
];

/// Counts of what was written.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Transactions written.
    pub transactions: u64,
    /// Fraudulent transactions written.
    pub frauds: u64,
    /// Frauds per scenario 1, 2, 3.
    pub by_scenario: [u64; 3],
    /// Distinct cards that made at least one transaction.
    pub active_cards: u64,
    /// Days simulated.
    pub days: u32,
}

impl Summary {
    /// Fraction of transactions that are fraud.
    pub fn fraud_rate(&self) -> f64 {
        self.frauds as f64 / self.transactions.max(1) as f64
    }
}

/// Writes rows in one format to any sink, one day at a time.
pub struct SimWriter<W: Write> {
    out: BufWriter<W>,
    format: Format,
    summary: Summary,
    seen_cards: Vec<bool>,
}

impl<W: Write> SimWriter<W> {
    /// Starts a file (writes the CSV header).
    pub fn new(sink: W, format: Format, cards: usize) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, sink);
        if format == Format::Csv {
            writeln!(out, "{}", COLUMNS.join(","))?;
        }
        Ok(SimWriter {
            out,
            format,
            summary: Summary::default(),
            seen_cards: vec![false; cards],
        })
    }

    /// Appends one day.
    pub fn write_day(&mut self, txs: &[SimTx]) -> io::Result<()> {
        for t in txs {
            let fraud = u8::from(t.is_fraud);
            match self.format {
                Format::Csv => writeln!(
                    self.out,
                    "{},{},{},{},{:.2},{},{}",
                    t.transaction_id, t.ts, t.card_id, t.terminal_id, t.amount, fraud, t.scenario
                )?,
                Format::Jsonl => writeln!(
                    self.out,
                    "{{\"transaction_id\":{},\"ts\":{},\"card_id\":{},\"terminal_id\":{},\"amount\":{:.2},\"is_fraud\":{},\"scenario\":{}}}",
                    t.transaction_id, t.ts, t.card_id, t.terminal_id, t.amount, fraud, t.scenario
                )?,
            }
            self.summary.transactions += 1;
            if t.is_fraud {
                self.summary.frauds += 1;
                self.summary.by_scenario[usize::from(t.scenario) - 1] += 1;
            }
            let seen = &mut self.seen_cards[t.card_id as usize];
            if !*seen {
                *seen = true;
                self.summary.active_cards += 1;
            }
        }
        self.summary.days += 1;
        Ok(())
    }

    /// Flushes and returns the statistics.
    pub fn finish(mut self) -> io::Result<Summary> {
        self.out.flush()?;
        Ok(self.summary)
    }
}
