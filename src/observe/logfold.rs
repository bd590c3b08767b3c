//! Folding repeated librdkafka log lines. With a broker down, librdkafka reports every failed
//! connection attempt (about 20 lines a second); an operator needs one line saying it is still
//! failing, and the `fraudstream_broker_up` gauge. Each librdkafka facility (`FAIL`, `ERROR`,
//! `REQTMOUT`, `Global` errors, ...) logs at most once per [`FOLD_INTERVAL`]; the next line it
//! logs after that is preceded by how many were folded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter};

/// One line per librdkafka facility per interval.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(10);

/// How rust-rdkafka starts every line it relays from librdkafka.
const PREFIX: &str = "librdkafka: ";

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Log it; `folded` lines of its facility were dropped since its facility last logged.
    Log {
        /// Lines dropped before this one.
        folded: u64,
    },
    /// Drop it (its facility logged less than an interval ago).
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Facility {
    logged_at: Instant,
    folded: u64,
}

/// Per-facility state of the folding, with the clock passed in (tests control it).
#[derive(Debug, Default)]
pub struct Folder {
    facilities: Mutex<HashMap<String, Facility>>,
}

impl Folder {
    /// Decides about one line of `facility` at `now`.
    pub fn admit(&self, facility: &str, now: Instant) -> Fold {
        let mut map = self.facilities.lock().expect("log fold lock");
        match map.get_mut(facility) {
            Some(f) if now.duration_since(f.logged_at) < FOLD_INTERVAL => {
                f.folded += 1;
                Fold::Drop
            }
            Some(f) => {
                let folded = f.folded;
                *f = Facility {
                    logged_at: now,
                    folded: 0,
                };
                Fold::Log { folded }
            }
            None => {
                map.insert(
                    facility.to_string(),
                    Facility {
                        logged_at: now,
                        folded: 0,
                    },
                );
                Fold::Log { folded: 0 }
            }
        }
    }
}

/// The facility of a librdkafka line: rust-rdkafka logs `librdkafka: FAC message`.
fn facility(message: &str) -> &str {
    let rest = message.strip_prefix(PREFIX).unwrap_or(message);
    rest.split_whitespace().next().unwrap_or("")
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}

/// A per-layer filter that folds librdkafka's repeated lines and passes everything else.
#[derive(Debug, Default)]
pub struct FoldRdkafka {
    folder: Folder,
}

impl<S: Subscriber> Filter<S> for FoldRdkafka {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        // librdkafka's lines reach tracing through the `log` bridge (whose metadata names the
        // bridge, not `librdkafka`) and rust-rdkafka's error callback: both start the message
        // with the prefix.
        let mut message = Message(String::new());
        event.record(&mut message);
        if !message.0.starts_with(PREFIX) {
            return true;
        }
        let fac = facility(&message.0);
        match self.folder.admit(fac, Instant::now()) {
            Fold::Drop => false,
            Fold::Log { folded: 0 } => true,
            Fold::Log { folded } => {
                // An event emitted from inside a filter would be dropped by tracing (no nested
                // dispatch), so the count goes straight to the log's stream, before the line.
                eprintln!(
                    "librdkafka: {folded} more {fac} line(s) folded in the last {}s",
                    FOLD_INTERVAL.as_secs()
                );
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_facility_per_interval_then_the_count() {
        let folder = Folder::default();
        let t0 = Instant::now();
        assert_eq!(folder.admit("FAIL", t0), Fold::Log { folded: 0 });
        // 20 a second for the rest of the interval: all folded.
        for i in 1..200u64 {
            let at = t0 + Duration::from_millis(i * 50);
            assert_eq!(folder.admit("FAIL", at), Fold::Drop, "{i}");
        }
        // Another facility is independent.
        assert_eq!(
            folder.admit("ERROR", t0 + Duration::from_secs(1)),
            Fold::Log { folded: 0 }
        );
        // Past the interval: logged again, saying how many were folded.
        assert_eq!(
            folder.admit("FAIL", t0 + FOLD_INTERVAL),
            Fold::Log { folded: 199 }
        );
        assert_eq!(
            folder.admit("FAIL", t0 + FOLD_INTERVAL + Duration::from_secs(1)),
            Fold::Drop
        );
    }

    #[test]
    fn the_facility_is_the_first_word_after_the_prefix() {
        assert_eq!(
            facility("librdkafka: FAIL [thrd:127.0.0.1:9/bootstrap]: Connect failed"),
            "FAIL"
        );
        assert_eq!(facility("REQTMOUT x"), "REQTMOUT");
        assert_eq!(facility(""), "");
    }
}
