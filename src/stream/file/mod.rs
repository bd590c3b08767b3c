//! The file transport: transactions from a JSONL or CSV file or stdin (read through
//! [`crate::schema::RecordReader`]), alerts, scores and dead letters written as JSONL.

mod sink;
mod source;

use std::path::PathBuf;

use thiserror::Error;

pub use sink::FileSink;
pub use source::FileSource;

/// Where records come from or go: `file:PATH` or `-` (stdin / stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A file.
    File(PathBuf),
    /// Standard input or output.
    Std,
}

/// A `--input`/`--output` value that is neither `-` nor `file:PATH`.
#[derive(Debug, Error)]
#[error("{0:?}: expected `-` or `file:PATH`")]
pub struct EndpointError(String);

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "-" => Ok(Endpoint::Std),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Endpoint::File(PathBuf::from(p))),
                _ => Err(EndpointError(s.to_string())),
            },
        }
    }
}

impl Endpoint {
    /// How records read here are named in alerts and dead letters (`file:PATH` or `stdin`).
    pub fn label(&self) -> String {
        match self {
            Endpoint::File(p) => format!("file:{}", p.display()),
            Endpoint::Std => "stdin".into(),
        }
    }

    /// The path a reader opens (`-` is stdin).
    pub fn path(&self) -> String {
        match self {
            Endpoint::File(p) => p.to_string_lossy().into_owned(),
            Endpoint::Std => "-".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_name_themselves() {
        assert_eq!("-".parse::<Endpoint>().unwrap(), Endpoint::Std);
        let f: Endpoint = "file:/tmp/x.csv".parse().unwrap();
        assert_eq!(f.label(), "file:/tmp/x.csv");
        assert_eq!(f.path(), "/tmp/x.csv");
        for bad in ["file:", "x.csv", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
