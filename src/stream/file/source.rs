//! Reads a file or stdin on a thread of its own and hands envelopes to the pipeline: a blocked
//! read (stdin) never holds up shutdown, and the queue between them is bounded.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Endpoint;
use crate::schema::{Format, ReadError, RecordReader};
use crate::stream::acks::{Assignment, NoOffsets, OffsetStore};
use crate::stream::{Envelope, Source};

/// Lines read ahead of the pipeline: enough to keep the scorer fed, few enough to stop quickly.
const READ_AHEAD: usize = 1024;

/// A file's (or stdin's) records as envelopes: JSONL lines as they are, CSV rows as JSON
/// objects; the offset is the line number; the timestamp is the read time.
pub struct FileSource {
    rx: mpsc::Receiver<Envelope>,
    reader: Option<std::thread::JoinHandle<Result<(), ReadError>>>,
    assignment: Arc<Assignment>,
}

impl FileSource {
    /// Opens the input (format from the file name unless given; stdin is JSONL) and starts
    /// reading. A file that cannot be opened is an error now, not later.
    pub fn open(input: &Endpoint, format: Option<Format>) -> Result<Self, ReadError> {
        let format = format.unwrap_or(match input {
            Endpoint::File(p) => Format::from_path(p),
            Endpoint::Std => Format::Jsonl,
        });
        let reader = RecordReader::open(&input.path(), format)?;
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let topic = input.label();
        let reader = std::thread::Builder::new()
            .name("file-source".into())
            .spawn(move || read(reader, &topic, &tx))
            .map_err(|source| ReadError::Io {
                path: input.path(),
                source,
            })?;
        Ok(FileSource {
            rx,
            reader: Some(reader),
            assignment: Arc::new(Assignment::default()),
        })
    }
}

/// Sends every row as an envelope until the input ends or the pipeline stops listening.
fn read(
    mut reader: RecordReader,
    topic: &str,
    tx: &mpsc::Sender<Envelope>,
) -> Result<(), ReadError> {
    while let Some(next) = reader.next_row() {
        let (line, row) = next?;
        let payload = match (reader.last_line(), row) {
            // JSONL: the line exactly as written (a dead letter shows it byte for byte).
            (Some(text), _) => text.to_vec(),
            (None, Ok(row)) => serde_json::to_vec(&row.into_json()).expect("a map serialises"),
            // A malformed CSV row is passed on as its error text: it will be dead-lettered.
            (None, Err(e)) => format!("malformed CSV row: {e}").into_bytes(),
        };
        let env = Envelope {
            payload,
            topic: topic.to_string(),
            partition: 0,
            offset: line as i64,
            timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
            generation: 0,
        };
        if tx.blocking_send(env).is_err() {
            break;
        }
    }
    Ok(())
}

impl Source for FileSource {
    async fn next(&mut self) -> Option<Envelope> {
        self.rx.recv().await
    }

    fn offsets(&self) -> Arc<dyn OffsetStore> {
        Arc::new(NoOffsets)
    }

    fn assignment(&self) -> Arc<Assignment> {
        self.assignment.clone()
    }

    async fn close(mut self) {
        // Stop the reader: it ends at its next line. One blocked on stdin is left behind (the
        // process is about to exit); one that finished reports a read failure here.
        self.rx.close();
        if let Some(h) = self.reader.take()
            && h.is_finished()
            && let Ok(Err(e)) = h.join()
        {
            tracing::error!("reading input: {e}");
        }
    }
}
