//! Streaming readers for CSV and JSONL files of transactions.
//!
//! Used by train, evaluate and replay: rows stream one at a time, a bad row is reported with its
//! line number and skipped, and only an I/O failure stops the read.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use thiserror::Error;

use super::error::SchemaError;
use super::record::{CsvHeader, CsvRow};
use super::spec::FeatureSpec;
use super::transaction::Transaction;

/// A file's layout.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// Guesses the format from a file name: `.jsonl`, `.ndjson` and `.json` are JSONL, the rest CSV.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

/// Why a single row was skipped.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RowError {
    /// The row is not valid CSV/JSON, or not a JSON object.
    #[error("{0}")]
    Syntax(String),
    /// The row parsed but a field does not fit the spec.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

/// A skipped row and where it was.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("line {line}: {error}")]
pub struct BadRow {
    /// 1-based line number in the file (the header is line 1 in a CSV).
    pub line: u64,
    /// Why it was skipped.
    pub error: RowError,
}

/// Failures that end a read: the file itself is unusable.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The CSV header lacks a column the spec needs.
    #[error("{path}: CSV header has no column `{column}` (spec `{spec}` needs it)")]
    MissingColumn {
        /// The file.
        path: String,
        /// The column.
        column: String,
        /// The spec's name.
        spec: String,
    },
}

enum Inner {
    Csv {
        rdr: csv::Reader<Box<dyn Read + Send>>,
        header: Arc<CsvHeader>,
    },
    Jsonl {
        lines: BufReader<Box<dyn Read + Send>>,
        line: u64,
        /// The last line read, as bytes: a line that is not UTF-8 is a bad row, not a failure.
        buf: Vec<u8>,
    },
}

/// Streams a file's records as raw JSON objects (CSV cells become strings), with line numbers.
pub struct RecordReader {
    inner: Inner,
    path: String,
}

impl RecordReader {
    /// Opens a file (`-` is standard input) in the given format.
    pub fn open(path: &str, format: Format) -> Result<Self, ReadError> {
        let io = |source| ReadError::Io {
            path: path.to_string(),
            source,
        };
        let src: Box<dyn Read + Send> = if path == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(File::open(path).map_err(io)?)
        };
        let inner = match format {
            Format::Csv => {
                let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(src);
                let names = rdr.headers().map_err(|e| io(e.into()))?.clone();
                Inner::Csv {
                    rdr,
                    header: Arc::new(CsvHeader::new(&names)),
                }
            }
            Format::Jsonl => Inner::Jsonl {
                lines: BufReader::with_capacity(1 << 16, src),
                line: 0,
                buf: Vec::new(),
            },
        };
        Ok(RecordReader {
            inner,
            path: path.to_string(),
        })
    }

    /// Fails early when a CSV header lacks a column the spec requires.
    pub fn check_columns(&self, spec: &FeatureSpec) -> Result<(), ReadError> {
        if let Inner::Csv { header, .. } = &self.inner {
            let required = spec.key.iter().chain([&spec.time]).chain(&spec.numeric);
            for column in required {
                if !header.has(column) {
                    return Err(ReadError::MissingColumn {
                        path: self.path.clone(),
                        column: column.clone(),
                        spec: spec.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The text of the JSONL line [`RecordReader::next_row`] last returned (None for CSV): what
    /// a dead letter should carry, byte for byte.
    pub fn last_line(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Jsonl { buf, .. } => {
                let end = buf
                    .iter()
                    .rposition(|b| *b != b'\n' && *b != b'\r')
                    .map_or(0, |i| i + 1);
                Some(&buf[..end])
            }
            Inner::Csv { .. } => None,
        }
    }

    /// The next row: `None` at end of file, `Some(Err)` for a fatal I/O error.
    pub fn next_row(&mut self) -> Option<Result<NumberedRow, ReadError>> {
        match &mut self.inner {
            Inner::Csv { rdr, header } => {
                let mut cells = csv::StringRecord::new();
                match rdr.read_record(&mut cells) {
                    Ok(false) => None,
                    Ok(true) => {
                        let line = cells.position().map_or(0, |p| p.line());
                        let row = RawRow::Csv(CsvRow {
                            header: header.clone(),
                            cells,
                        });
                        Some(Ok((line, Ok(row))))
                    }
                    Err(e) if e.is_io_error() => Some(Err(ReadError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })),
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        Some(Ok((line, Err(RowError::Syntax(e.to_string())))))
                    }
                }
            }
            Inner::Jsonl { lines, line, buf } => loop {
                buf.clear();
                match lines.read_until(b'\n', buf) {
                    Ok(0) => return None,
                    Ok(_) => *line += 1,
                    Err(source) => {
                        return Some(Err(ReadError::Io {
                            path: self.path.clone(),
                            source,
                        }));
                    }
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let row = match serde_json::from_slice::<Value>(buf) {
                    Ok(Value::Object(map)) => Ok(RawRow::Json(map)),
                    Ok(_) => Err(RowError::Syntax("not a JSON object".into())),
                    Err(e) => Err(RowError::Syntax(format!("invalid JSON: {e}"))),
                };
                return Some(Ok((*line, row)));
            },
        }
    }
}

/// A row and its 1-based line number; the row itself may be unparseable.
pub type NumberedRow = (u64, Result<RawRow, RowError>);

/// One row before validation.
#[derive(Debug, Clone)]
pub enum RawRow {
    /// A JSONL object.
    Json(Map<String, Value>),
    /// A CSV row.
    Csv(CsvRow),
}

impl RawRow {
    /// The row as a JSON object (CSV cells through [`CsvRow::to_json`]).
    pub fn into_json(self) -> Map<String, Value> {
        match self {
            RawRow::Json(m) => m,
            RawRow::Csv(c) => c.to_json(),
        }
    }

    /// Validates the row against a spec.
    pub fn parse(&self, spec: &FeatureSpec) -> Result<Transaction, SchemaError> {
        match self {
            RawRow::Json(m) => spec.parse(m),
            RawRow::Csv(r) => spec.parse(r),
        }
    }
}

/// Every good transaction of a file, and what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Valid transactions in file order.
    pub transactions: Vec<Transaction>,
    /// How many rows were skipped.
    pub bad_rows: u64,
    /// The first skipped rows (at most the number asked for), to show the user.
    pub first_bad: Vec<BadRow>,
}

impl Loaded {
    /// Sorts by event time, keeping file order among equal times, as windows must be built.
    pub fn sort_by_time(&mut self) {
        self.transactions.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    }
}

/// Reads a whole file through the spec, keeping up to `report` bad rows for display.
pub fn load(
    path: &str,
    format: Format,
    spec: &FeatureSpec,
    report: usize,
    mut on_row: impl FnMut(u64),
) -> Result<Loaded, ReadError> {
    let mut reader = RecordReader::open(path, format)?;
    reader.check_columns(spec)?;
    let mut out = Loaded::default();
    while let Some(next) = reader.next_row() {
        let (line, row) = next?;
        on_row(line);
        match row.and_then(|r| r.parse(spec).map_err(RowError::from)) {
            Ok(tx) => out.transactions.push(tx),
            Err(error) => {
                out.bad_rows += 1;
                if out.first_bad.len() < report {
                    out.first_bad.push(BadRow { line, error });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap().to_string();
        (dir, p)
    }

    const CSV: &str = "transaction_id,ts,card_id,terminal_id,amount,is_fraud,scenario\n\
        0,100,1,5,10.00,0,0\n\
        1,101,2,5,abc,0,0\n\
        2,102,,5,3.00,0,0\n\
        3,103,1,5,4.00,1,1\n";

    #[test]
    fn csv_rows_stream_with_line_numbers_for_bad_ones() {
        let (_d, path) = write("t.csv", CSV);
        let loaded = load(&path, Format::Csv, &FeatureSpec::cards(), 10, |_| {}).unwrap();
        assert_eq!(loaded.transactions.len(), 2);
        assert_eq!(loaded.bad_rows, 2);
        assert_eq!(loaded.first_bad[0].line, 3);
        assert_eq!(
            loaded.first_bad[0].to_string(),
            "line 3: field `amount`: not a number: \"abc\""
        );
        assert_eq!(loaded.first_bad[1].line, 4);
        assert_eq!(
            loaded.first_bad[1].error.to_string(),
            "field `card_id`: missing"
        );
    }

    #[test]
    fn jsonl_syntax_errors_are_rows_not_failures() {
        let text = "{\"transaction_id\":0,\"ts\":1,\"card_id\":1,\"amount\":2}\n\
                    not json\n\n[1,2]\n{\"transaction_id\":1,\"ts\":2,\"card_id\":1,\"amount\":3}\n";
        let (_d, path) = write("t.jsonl", text);
        let loaded = load(&path, Format::Jsonl, &FeatureSpec::cards(), 1, |_| {}).unwrap();
        assert_eq!(loaded.transactions.len(), 2);
        assert_eq!(loaded.bad_rows, 2);
        assert_eq!(
            loaded.first_bad.len(),
            1,
            "only as many as asked for are kept"
        );
        assert_eq!(loaded.first_bad[0].line, 2);
        assert!(matches!(loaded.first_bad[0].error, RowError::Syntax(_)));
    }

    #[test]
    fn missing_csv_column_and_missing_file_are_fatal() {
        let (_d, path) = write("t.csv", "ts,card_id\n1,2\n");
        let err = load(&path, Format::Csv, &FeatureSpec::cards(), 10, |_| {}).unwrap_err();
        assert!(err.to_string().contains("no column `amount`"), "{err}");
        assert!(matches!(
            load(
                "/nonexistent/x.csv",
                Format::Csv,
                &FeatureSpec::cards(),
                1,
                |_| {}
            ),
            Err(ReadError::Io { .. })
        ));
    }

    #[test]
    fn sort_by_time_is_stable() {
        let (_d, path) = write(
            "t.csv",
            "transaction_id,ts,card_id,amount\n0,5,1,1\n1,3,1,1\n2,5,1,1\n3,1,1,1\n",
        );
        let mut loaded = load(&path, Format::Csv, &FeatureSpec::cards(), 0, |_| {}).unwrap();
        loaded.sort_by_time();
        let ids: Vec<_> = loaded
            .transactions
            .iter()
            .map(|t| t.id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["3", "1", "0", "2"]);
    }
}
