//! The README says what the code does: every metric and dead-letter reason it lists exists,
//! and every one the code exports is listed.

use std::collections::BTreeSet;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The table rows under the heading line that starts with `heading` (until the next blank line
/// after the table).
fn table_rows(text: &str, header: &str) -> Vec<String> {
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("README has no table headed {header:?}"));
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(str::to_string)
        .collect()
}

/// Backticked words of a table cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, w)| w.to_string())
        .collect()
}

#[test]
fn the_metrics_table_lists_exactly_the_exported_metrics() {
    let text = readme();
    let listed: BTreeSet<String> = table_rows(&text, "| metric | type, labels | meaning |")
        .iter()
        .flat_map(|row| ticked(row.split('|').nth(1).unwrap()))
        .filter(|n| n.starts_with("fraudstream_"))
        .collect();
    let metrics = fraudstream::observe::Metrics::new(prometheus::Registry::new()).unwrap();
    let all = metrics.exported_names();
    // A histogram's `_bucket`, `_sum` and `_count` series are documented by its base name.
    let is_series = |n: &str| {
        ["_bucket", "_sum", "_count"].iter().any(|s| {
            n.strip_suffix(s)
                .is_some_and(|base| all.iter().any(|b| b == base))
        })
    };
    let exported: BTreeSet<String> = all
        .iter()
        .filter(|n| n.starts_with("fraudstream_") && !is_series(n))
        .cloned()
        .collect();
    let missing: Vec<&String> = exported.difference(&listed).collect();
    let unknown: Vec<&String> = listed.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "exported but not in the README: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "in the README but not exported: {unknown:?}"
    );
}

#[test]
fn the_dead_letter_table_lists_exactly_the_reasons_the_code_gives() {
    let text = readme();
    let listed: BTreeSet<String> = table_rows(&text, "| reason | field named | what was wrong |")
        .iter()
        .flat_map(|row| ticked(row.split('|').nth(1).unwrap()))
        .collect();
    let code: BTreeSet<String> = fraudstream::stream::dead_letter_reasons()
        .into_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, code);
    assert!(!text.contains("missing_field"), "the reason is `missing`");
}
