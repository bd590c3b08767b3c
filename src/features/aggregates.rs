//! A card's transactions over time, kept in hourly buckets for count, mean and relative
//! features: bounded memory (at most one bucket per hour of the longest window, however busy the
//! card), and windows aligned to the hour (a 1-day window is the current hour and the 23 before).

use std::collections::VecDeque;

/// Width of a bucket. An hour keeps 1-day windows within an hour of exact while a card doing a
/// few transactions a day holds a few dozen buckets for 30 days.
pub const BUCKET_SECS: i64 = 3_600;

/// The hour a time falls in.
pub fn bucket_of(ts: f64) -> i64 {
    (ts / BUCKET_SECS as f64).floor() as i64
}

/// The position of `hour` in the ascending `hours`, inserted there when absent (then `true`):
/// usually the newest bucket or a new one; an out-of-order record finds its own.
pub(super) fn find_or_insert(hours: &mut VecDeque<i64>, hour: i64) -> (usize, bool) {
    let at = hours.iter().rposition(|&h| h <= hour);
    match at {
        Some(i) if hours[i] == hour => (i, false),
        _ => {
            let i = at.map_or(0, |i| i + 1);
            hours.insert(i, hour);
            (i, true)
        }
    }
}

/// Hourly counts and sums of one card's transactions, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CardSeries {
    hours: VecDeque<i64>,
    counts: VecDeque<u32>,
    /// `fields` sums per bucket, bucket after bucket.
    sums: VecDeque<f64>,
}

/// One window's totals.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    /// Transactions.
    pub count: u32,
    /// Sum of the field asked for.
    pub sum: f64,
}

impl CardSeries {
    /// Adds a transaction at `ts` with the values of the aggregated fields; drops buckets older
    /// than `horizon` before the newest one.
    pub fn add(&mut self, ts: f64, values: &[f64], horizon_secs: i64) {
        let k = values.len();
        let (i, new) = find_or_insert(&mut self.hours, bucket_of(ts));
        if new {
            self.counts.insert(i, 0);
            for j in 0..k {
                self.sums.insert(i * k + j, 0.0);
            }
        }
        self.counts[i] += 1;
        for (j, v) in values.iter().enumerate() {
            self.sums[i * k + j] += v;
        }
        let newest = *self.hours.back().expect("just added");
        let oldest_kept = newest - horizon_secs / BUCKET_SECS;
        while self.hours.front().is_some_and(|&h| h < oldest_kept) {
            self.hours.pop_front();
            self.counts.pop_front();
            for _ in 0..k {
                self.sums.pop_front();
            }
        }
    }

    /// Totals of field `field` (of `fields` aggregated) over the buckets of the window of
    /// `window_secs` ending with the hour of `ts`.
    pub fn totals(&self, ts: f64, window_secs: i64, field: usize, fields: usize) -> Totals {
        let hour = bucket_of(ts);
        let first = hour - (window_secs / BUCKET_SECS).max(1) + 1;
        let mut t = Totals::default();
        for (i, &h) in self.hours.iter().enumerate().rev() {
            if h > hour {
                continue;
            }
            if h < first {
                break;
            }
            t.count += self.counts[i];
            if fields > 0 {
                t.sum += self.sums[i * fields + field];
            }
        }
        t
    }

    /// Hours, counts and sums (`fields` per bucket), oldest first: what a changelog record keeps.
    pub fn parts(&self) -> (Vec<i64>, Vec<u32>, Vec<f64>) {
        (
            self.hours.iter().copied().collect(),
            self.counts.iter().copied().collect(),
            self.sums.iter().copied().collect(),
        )
    }

    /// The series [`CardSeries::parts`] gave; None unless the hours ascend and the lengths agree
    /// (`fields` sums per hour).
    pub fn from_parts(
        hours: Vec<i64>,
        counts: Vec<u32>,
        sums: Vec<f64>,
        fields: usize,
    ) -> Option<Self> {
        let ascending = hours.windows(2).all(|w| w[0] < w[1]);
        if !ascending || counts.len() != hours.len() || sums.len() != hours.len() * fields {
            return None;
        }
        Some(CardSeries {
            hours: hours.into(),
            counts: counts.into(),
            sums: sums.into(),
        })
    }

    /// Buckets held (for memory accounting).
    pub fn buckets(&self) -> usize {
        self.hours.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: f64 = BUCKET_SECS as f64;
    const DAY: i64 = 86_400;

    #[test]
    fn windows_count_whole_hours_back_from_the_current_one() {
        let mut s = CardSeries::default();
        let base = 1_000.0 * H;
        for (hours_ago, amount) in [(40.0, 5.0), (23.5, 7.0), (2.0, 10.0), (0.0, 20.0)] {
            s.add(base - hours_ago * H + 60.0, &[amount], 30 * DAY);
        }
        let day = s.totals(base + 60.0, DAY, 0, 1);
        // The current hour and the 23 before it: 23.5 hours ago is the 24th hour back, out.
        assert_eq!(
            day,
            Totals {
                count: 2,
                sum: 30.0
            }
        );
        let two_days = s.totals(base + 60.0, 2 * DAY, 0, 1);
        assert_eq!(
            two_days,
            Totals {
                count: 4,
                sum: 42.0
            }
        );
        // Out of order: lands in its own hour, and windows ending earlier do not see later ones.
        s.add(base - 2.0 * H + 10.0, &[1.0], 30 * DAY);
        assert_eq!(
            s.totals(base - 2.0 * H, DAY, 0, 1),
            Totals {
                count: 3,
                sum: 18.0
            }
        );
        assert_eq!(s.buckets(), 4);
    }

    #[test]
    fn buckets_beyond_the_horizon_are_dropped() {
        let mut s = CardSeries::default();
        for day in 0..100 {
            s.add(day as f64 * 86_400.0, &[], 30 * DAY);
        }
        assert_eq!(s.buckets(), 31, "today and the 30 days before");
        assert_eq!(s.totals(99.0 * 86_400.0, 7 * DAY, 0, 0).count, 7);
    }
}
