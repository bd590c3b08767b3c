//! Writes alerts (and optionally scores and dead letters) as JSONL to files or stdout.

use std::fs::File;
use std::io::{BufWriter, Write};

use serde::Serialize;

use super::Endpoint;
use crate::stream::acks::Ack;
use crate::stream::{Settled, Sink, StreamError};

struct Jsonl {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl Jsonl {
    fn open(e: &Endpoint) -> std::io::Result<Self> {
        let w: Box<dyn Write + Send> = match e {
            Endpoint::File(p) => Box::new(File::create(p)?),
            Endpoint::Std => Box::new(std::io::stdout()),
        };
        Ok(Jsonl {
            out: BufWriter::new(w),
        })
    }

    /// Writes one record as one line in one call: when several outputs share stdout, a buffer
    /// flushed by one of them never ends in the middle of a line.
    fn write<T: Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        self.out.write_all(&line)
    }
}

/// JSONL outputs: alerts always; scores and dead letters when asked for. Written synchronously,
/// so a record's acknowledgement is immediate; a write error stops the run.
pub struct FileSink {
    alerts: Jsonl,
    scores: Option<Jsonl>,
    dead_letters: Option<Jsonl>,
}

impl FileSink {
    /// Creates (truncates) the outputs.
    pub fn create(
        alerts: &Endpoint,
        scores: Option<&Endpoint>,
        dead_letters: Option<&Endpoint>,
    ) -> std::io::Result<Self> {
        Ok(FileSink {
            alerts: Jsonl::open(alerts)?,
            scores: scores.map(Jsonl::open).transpose()?,
            dead_letters: dead_letters.map(Jsonl::open).transpose()?,
        })
    }

    fn write_all(&mut self, s: &Settled) -> std::io::Result<()> {
        if let Some(a) = &s.alert {
            self.alerts.write(a)?;
        }
        if let Some(out) = self.scores.as_mut() {
            for score in s.score.iter().chain(&s.challenger) {
                out.write(score)?;
            }
        }
        if let (Some(out), Some(letter)) = (self.dead_letters.as_mut(), &s.dead_letter) {
            out.write(letter)?;
        }
        Ok(())
    }

    fn flush_all(&mut self) -> std::io::Result<()> {
        self.alerts.out.flush()?;
        for out in [self.scores.as_mut(), self.dead_letters.as_mut()]
            .into_iter()
            .flatten()
        {
            out.out.flush()?;
        }
        Ok(())
    }
}

fn sink_error(e: std::io::Error) -> StreamError {
    StreamError::Sink(e.to_string())
}

impl Sink for FileSink {
    fn wants_scores(&self) -> bool {
        self.scores.is_some()
    }

    fn publish(&mut self, s: &mut Settled) -> Result<Vec<Ack>, StreamError> {
        self.write_all(s).map_err(sink_error)?;
        Ok(Vec::new())
    }

    fn idle(&mut self) -> Result<(), StreamError> {
        // Every output, not only alerts: a reader following the scores file sees them too.
        self.flush_all().map_err(sink_error)
    }

    async fn flush(&mut self) -> Result<(), StreamError> {
        self.flush_all().map_err(sink_error)
    }
}
