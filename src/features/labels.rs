//! Label-rate state: for each label key (e.g. `terminal_id`), per key value, the labelled
//! transactions and frauds per hour of their event time. Fed by label events (the labels topic
//! online, the file's labels at their known time offline); read by label-rate features.
//!
//! Only what is known counts: a label known at `k` counts for a transaction at `t` only if
//! `k <= t`. A label known within `delay` of its bucket's end is always known by the time its
//! bucket enters a window ending `delay` before `t`, so it is added to the bucket's counts
//! ("on time"); a later one is kept apart with its known time and checked against `t` at each
//! read. Either way the result does not depend on when a label arrived, only on whether it had
//! arrived: every instance that has read the same labels computes the same features.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::aggregates::{BUCKET_SECS, bucket_of, find_or_insert};
use crate::schema::{Derived, FeatureSpec, LabelEvent};

/// Labels of one key value, per hour of event time, oldest first.
#[derive(Debug, Clone, Default)]
struct Series {
    hours: VecDeque<i64>,
    labelled: VecDeque<u32>,
    frauds: VecDeque<u32>,
    /// Labels known later than their bucket's end + the shortest delay: (hour, known at, fraud).
    late: Vec<(i64, f64, bool)>,
}

impl Series {
    fn add(&mut self, hour: i64, on_time: bool, known_at: f64, fraud: bool) {
        if !on_time {
            self.late.push((hour, known_at, fraud));
            return;
        }
        let (i, new) = find_or_insert(&mut self.hours, hour);
        if new {
            self.labelled.insert(i, 0);
            self.frauds.insert(i, 0);
        }
        self.labelled[i] += 1;
        self.frauds[i] += u32::from(fraud);
    }

    /// (labelled, frauds) of the buckets inside [first, last], late labels known by `t`.
    fn totals(&self, first: i64, last: i64, t: f64) -> (u32, u32) {
        let (mut n, mut f) = (0, 0);
        for (i, &h) in self.hours.iter().enumerate().rev() {
            if h > last {
                continue;
            }
            if h < first {
                break;
            }
            n += self.labelled[i];
            f += self.frauds[i];
        }
        for &(h, k, fraud) in &self.late {
            if h >= first && h <= last && k <= t {
                n += 1;
                f += u32::from(fraud);
            }
        }
        (n, f)
    }

    /// Drops everything in hours before `oldest`; true when nothing is left.
    fn prune(&mut self, oldest: i64) -> bool {
        while self.hours.front().is_some_and(|&h| h < oldest) {
            self.hours.pop_front();
            self.labelled.pop_front();
            self.frauds.pop_front();
        }
        self.late.retain(|&(h, _, _)| h >= oldest);
        self.hours.is_empty() && self.late.is_empty()
    }
}

/// One label-rate feature, resolved: which table, and its window and delay in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateQuery {
    /// Index of the key among [`FeatureSpec::label_keys`].
    pub table: usize,
    /// Window length.
    pub window_secs: i64,
    /// Delay before now where the window ends.
    pub delay_secs: i64,
}

impl RateQuery {
    /// The hours a query at `t` reads: whole hours inside (t - delay - window, t - delay].
    fn hours(&self, t: f64) -> (i64, i64) {
        let end = t - self.delay_secs as f64;
        // The last whole hour ending at or before `end`, and the first starting at or after
        // `end - window`.
        let last = bucket_of(end) - 1;
        let first = ((end - self.window_secs as f64) / BUCKET_SECS as f64).ceil() as i64;
        (first, last)
    }
}

/// Every label key's tables, shared by all cards (and, online, updated by the labels
/// consumer while transactions are scored).
#[derive(Debug)]
pub struct LabelTables {
    tables: Vec<DashMap<String, Series>>,
    /// The shortest delay of any label-rate feature (seconds): a label known within it of its
    /// bucket's end is on time for every feature.
    min_delay_secs: i64,
    /// How far back buckets are needed: the longest window + delay, plus a day of slack for
    /// records that arrive out of order.
    horizon_secs: i64,
    /// The latest event time seen per input partition: the horizon is measured from the
    /// slowest, so a partition that lags (a replay, a catch-up) still finds its buckets.
    watermarks: Mutex<HashMap<i32, f64>>,
    /// Labels taken in.
    applied: AtomicU64,
}

/// Slack on the horizon for out-of-order records: a day.
const HORIZON_SLACK_SECS: i64 = 86_400;

impl LabelTables {
    /// Empty tables for the spec's label keys (none when it has no label-rate feature).
    pub fn new(spec: &FeatureSpec) -> Self {
        let (mut min_delay, mut horizon) = (i64::MAX, 0);
        for d in &spec.derived {
            if let Derived::LabelRate { window, delay, .. } = d {
                min_delay = min_delay.min(delay.as_secs() as i64);
                horizon = horizon.max((window.as_secs() + delay.as_secs()) as i64);
            }
        }
        LabelTables {
            tables: spec.label_keys().iter().map(|_| DashMap::new()).collect(),
            min_delay_secs: if min_delay == i64::MAX { 0 } else { min_delay },
            horizon_secs: horizon + HORIZON_SLACK_SECS,
            watermarks: Mutex::default(),
            applied: AtomicU64::new(0),
        }
    }

    /// Whether there is anything to keep (the spec has label-rate features).
    pub fn is_used(&self) -> bool {
        !self.tables.is_empty()
    }

    /// Takes in one label.
    pub fn apply(&self, e: &LabelEvent) {
        if !self.is_used() {
            return;
        }
        let hour = bucket_of(e.ts);
        let bucket_end = ((hour + 1) * BUCKET_SECS) as f64;
        let on_time = e.known_at <= bucket_end + self.min_delay_secs as f64;
        let oldest = self.oldest_hour();
        if hour < oldest {
            return;
        }
        for (table, key) in self.tables.iter().zip(&e.keys) {
            let mut s = table.entry(key.clone()).or_default();
            s.add(hour, on_time, e.known_at, e.is_fraud);
            s.prune(oldest);
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
    }

    /// (labelled transactions, fraud rate) for key value `key` of a feature, at time `t`.
    pub fn rate(&self, q: &RateQuery, key: &str, t: f64) -> (f64, f64) {
        let (first, last) = q.hours(t);
        let (n, f) = self.tables[q.table]
            .get(key)
            .map_or((0, 0), |s| s.totals(first, last, t));
        let rate = if n == 0 {
            0.0
        } else {
            f64::from(f) / f64::from(n)
        };
        (f64::from(n), rate)
    }

    fn watermarks(&self) -> std::sync::MutexGuard<'_, HashMap<i32, f64>> {
        self.watermarks.lock().expect("watermarks lock")
    }

    /// Moves input partition `shard`'s watermark on to event time `t` (its latest
    /// transaction). Offline streams are one shard.
    pub fn advance(&self, shard: i32, t: f64) {
        if !self.is_used() {
            return;
        }
        let mut w = self.watermarks();
        let e = w.entry(shard).or_insert(t);
        *e = e.max(t);
    }

    /// Stops waiting for partitions this instance no longer reads.
    pub fn forget_shards(&self, shards: &[i32]) {
        self.watermarks().retain(|s, _| !shards.contains(s));
    }

    /// The oldest hour any partition may still read: the slowest partition's watermark minus
    /// the horizon (everything, before the first transaction).
    fn oldest_hour(&self) -> i64 {
        match self.watermarks().values().copied().reduce(f64::min) {
            Some(w) => bucket_of(w - self.horizon_secs as f64),
            None => i64::MIN,
        }
    }

    /// Drops buckets no feature can read any more; returns the key values still held.
    pub fn prune(&self) -> usize {
        let oldest = self.oldest_hour();
        self.tables
            .iter()
            .map(|t| {
                t.retain(|_, s| !s.prune(oldest));
                t.len()
            })
            .sum()
    }

    /// Key values held, over all tables.
    pub fn keys(&self) -> usize {
        self.tables.iter().map(DashMap::len).sum()
    }

    /// Labels taken in so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Span;

    const DAY: f64 = 86_400.0;

    fn spec(delay_days: u64) -> FeatureSpec {
        let mut spec = FeatureSpec::cards();
        spec.derived = vec![Derived::LabelRate {
            key: "terminal_id".into(),
            window: Span::days(7),
            delay: Span::days(delay_days),
        }];
        spec
    }

    fn query(delay_days: i64) -> RateQuery {
        RateQuery {
            table: 0,
            window_secs: 7 * 86_400,
            delay_secs: delay_days * 86_400,
        }
    }

    fn label(ts: f64, known_at: f64, is_fraud: bool) -> LabelEvent {
        LabelEvent {
            ts,
            known_at,
            is_fraud,
            keys: vec!["T1".into()],
        }
    }

    #[test]
    fn a_label_never_counts_before_it_is_known() {
        let tables = LabelTables::new(&spec(7));
        let t0 = 100.0 * DAY;
        // Fraud on day 100, known 9 days later (late for the 7-day delay); a legitimate one
        // known on time.
        tables.apply(&label(t0, t0 + 9.0 * DAY, true));
        tables.apply(&label(t0 + 60.0, t0 + 7.0 * DAY, false));
        let q = query(7);
        // Day 108: the window (day 94, day 101] holds both transactions, but the fraud is not
        // known until day 109.
        assert_eq!(tables.rate(&q, "T1", t0 + 8.0 * DAY), (1.0, 0.0));
        assert_eq!(tables.rate(&q, "T1", t0 + 9.0 * DAY - 1.0), (1.0, 0.0));
        assert_eq!(tables.rate(&q, "T1", t0 + 9.0 * DAY), (2.0, 0.5));
        // Before the window reaches them, nothing; other keys, nothing.
        assert_eq!(tables.rate(&q, "T1", t0 + 6.0 * DAY), (0.0, 0.0));
        assert_eq!(tables.rate(&q, "T2", t0 + 9.0 * DAY), (0.0, 0.0));
        // A transaction scored "before" the labels arrived reads the same as one after: order
        // of arrival does not matter, only known times.
        let late_first = LabelTables::new(&spec(7));
        late_first.apply(&label(t0 + 60.0, t0 + 7.0 * DAY, false));
        late_first.apply(&label(t0, t0 + 9.0 * DAY, true));
        for day in [6.0, 8.0, 9.0, 12.0] {
            let t = t0 + day * DAY;
            assert_eq!(late_first.rate(&q, "T1", t), tables.rate(&q, "T1", t));
        }
    }

    #[test]
    fn the_window_ends_a_delay_before_now_on_whole_hours() {
        let tables = LabelTables::new(&spec(7));
        let t0 = 200.0 * DAY;
        tables.apply(&label(t0, t0, true));
        let q = query(7);
        // The label's hour ends at t0 + 1h - (t0 mod 1h): counted once now - 7d is past it.
        assert_eq!(tables.rate(&q, "T1", t0 + 7.0 * DAY + 3_600.0).1, 1.0);
        assert_eq!(
            tables.rate(&q, "T1", t0 + 7.0 * DAY).1,
            0.0,
            "its hour is not over"
        );
        // 14 days later it has left the 7-day window.
        assert_eq!(tables.rate(&q, "T1", t0 + 15.0 * DAY), (0.0, 0.0));
    }

    #[test]
    fn old_buckets_are_pruned_behind_the_watermark() {
        let tables = LabelTables::new(&spec(7));
        for day in 0..60 {
            let ts = f64::from(day) * DAY;
            tables.apply(&LabelEvent {
                keys: vec![format!("T{}", day % 3)],
                ..label(ts, ts, false)
            });
        }
        tables.advance(0, 60.0 * DAY);
        assert_eq!(tables.keys(), 3);
        // A second partition behind the first holds the horizon back.
        tables.advance(1, 30.0 * DAY);
        tables.advance(0, 100.0 * DAY);
        assert_eq!(tables.prune(), 3, "partition 1 still reads from day 15 on");
        tables.forget_shards(&[1]);
        assert_eq!(
            tables.prune(),
            0,
            "everything is older than 7 + 7 days + a day"
        );
        assert_eq!(tables.applied(), 60);
    }
}
