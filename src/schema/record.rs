//! A record as it arrives: a JSON object (Kafka message, JSONL line) or a CSV row.
//!
//! The feature spec reads fields by name through [`Record`], so one parser serves both formats.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

/// One field's raw value, before the spec decides what it must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    /// The record has no such field.
    Missing,
    /// JSON null, or an empty CSV cell.
    Null,
    /// Text (every CSV cell, JSON strings).
    Str(&'a str),
    /// A JSON number.
    Num(f64),
    /// A JSON boolean.
    Bool(bool),
    /// A JSON array or object: never valid for a spec field.
    Nested(&'static str),
}

impl Field<'_> {
    /// The JSON-ish type name, for "wrong type" errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Field::Missing => "nothing",
            Field::Null => "null",
            Field::Str(_) => "string",
            Field::Num(_) => "number",
            Field::Bool(_) => "boolean",
            Field::Nested(t) => t,
        }
    }
}

/// Anything whose fields can be looked up by name.
pub trait Record {
    /// The named field's raw value.
    fn field(&self, name: &str) -> Field<'_>;
}

impl Record for Map<String, Value> {
    fn field(&self, name: &str) -> Field<'_> {
        match self.get(name) {
            None => Field::Missing,
            Some(Value::Null) => Field::Null,
            Some(Value::String(s)) => Field::Str(s),
            // serde_json numbers always fit f64 (possibly losing precision for huge integers).
            Some(Value::Number(n)) => Field::Num(n.as_f64().unwrap_or(f64::NAN)),
            Some(Value::Bool(b)) => Field::Bool(*b),
            Some(Value::Array(_)) => Field::Nested("array"),
            Some(Value::Object(_)) => Field::Nested("object"),
        }
    }
}

/// Column positions of a CSV header, shared by every row of the file.
#[derive(Debug, Clone)]
pub struct CsvHeader {
    index: HashMap<String, usize>,
}

impl CsvHeader {
    /// Indexes a header row; a name that repeats keeps its first column.
    pub fn new(names: &csv::StringRecord) -> Self {
        let mut index = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            index.entry(name.trim().to_string()).or_insert(i);
        }
        CsvHeader { index }
    }

    /// Whether the header has this column.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// One CSV row seen through its file's header.
#[derive(Debug, Clone)]
pub struct CsvRow {
    /// The file's header, shared.
    pub header: Arc<CsvHeader>,
    /// The row's cells.
    pub cells: csv::StringRecord,
}

impl CsvRow {
    /// `(column, cell)` pairs in file order (for turning a row back into an object); a
    /// repeated column name keeps its first cell, as field lookups do.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut names: Vec<(&str, usize)> = self
            .header
            .index
            .iter()
            .map(|(k, &i)| (k.as_str(), i))
            .collect();
        names.sort_by_key(|&(_, i)| i);
        names
            .into_iter()
            .map(|(k, i)| (k, self.cells.get(i).unwrap_or("")))
    }
}

impl CsvRow {
    /// The row as the JSON object a producer of real data would send: numbers stay numbers,
    /// everything else is text. One conversion for every command that turns CSV into messages.
    pub fn to_json(&self) -> Map<String, Value> {
        self.fields()
            .map(|(k, v)| (k.to_string(), json_cell(v)))
            .collect()
    }
}

/// A CSV cell as a JSON value: an integer or finite number when it parses as one, else text.
fn json_cell(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::from(f),
        _ => Value::String(v.to_string()),
    }
}

impl Record for CsvRow {
    fn field(&self, name: &str) -> Field<'_> {
        match self.header.index.get(name).and_then(|&i| self.cells.get(i)) {
            None => Field::Missing,
            Some(s) if s.trim().is_empty() => Field::Null,
            Some(s) => Field::Str(s.trim()),
        }
    }
}
