//! Event times checked against the stream's own clock. A transaction far ahead of or far behind
//! its stream is not a transaction of this stream: a year-3000 time would freeze its card's
//! clock, a 1970 one would shift the next scores. Such records are dead-lettered as
//! `ts_out_of_range`.
//!
//! The reference is each input partition's watermark, the stream's own time rather than the wall
//! clock, so replays of historical files keep working. The watermark is the median of the
//! partition's last [`WATERMARK_SAMPLES`] event times (accepted or not), not their maximum: one
//! wrong record cannot move it (a maximum would jump to a bad clock's year and then refuse the
//! whole stream behind it), and a stream that really jumps (a replay of a later file) moves it
//! after half that many records. A time close to the wall clock is always in the window, so a
//! partition quiet for days accepts its next live record.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::schema::Span;

/// How many recent event times of a partition its watermark is the median of.
pub const WATERMARK_SAMPLES: usize = 64;

/// How far an event time may run ahead of its partition's watermark, or either side of the wall
/// clock (1 day: terminals' clocks and time zones are off by hours, not days).
pub const DEFAULT_MAX_FUTURE_SKEW: Span = Span::days(1);

/// How far an event time may lag behind its partition's watermark (7 days: late batches and
/// redeliveries land within days; older is a wrong clock).
pub const DEFAULT_MAX_PAST_AGE: Span = Span::days(7);

/// The accepted window around a partition's watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLimits {
    /// Ahead of the watermark (and either side of the wall clock).
    pub max_future_skew: Span,
    /// Behind the watermark.
    pub max_past_age: Span,
}

impl Default for TimeLimits {
    fn default() -> Self {
        TimeLimits {
            max_future_skew: DEFAULT_MAX_FUTURE_SKEW,
            max_past_age: DEFAULT_MAX_PAST_AGE,
        }
    }
}

/// Why an event time was refused (seconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutOfWindow {
    /// More than `skew` ahead of the watermark, and not within `skew` of the wall clock (or a
    /// partition's first record, more than `skew` ahead of the wall clock).
    Ahead {
        /// The partition's watermark, or the wall clock for its first record.
        reference: f64,
        /// The limit it passed.
        skew: Span,
    },
    /// More than `age` behind the partition's watermark.
    Behind {
        /// The partition's watermark.
        watermark: f64,
        /// The limit it passed.
        age: Span,
    },
}

impl OutOfWindow {
    /// The dead letter's error text for event time `ts` on `partition`.
    pub fn describe(&self, field: &str, ts: f64, partition: i32) -> String {
        let at = super::records::time_rfc3339;
        match *self {
            OutOfWindow::Ahead { reference, skew } => format!(
                "field `{field}`: event time {} is more than {skew} ahead of partition \
                 {partition}'s watermark {} and not within {skew} of the wall clock; see \
                 --max-future-skew",
                at(ts),
                at(reference)
            ),
            OutOfWindow::Behind { watermark, age } => format!(
                "field `{field}`: event time {} is more than {age} behind partition \
                 {partition}'s watermark {}; see --max-past-age",
                at(ts),
                at(watermark)
            ),
        }
    }
}

/// A partition's last event times, oldest overwritten first.
#[derive(Debug, Default)]
struct Samples {
    times: Vec<f64>,
    next: usize,
}

impl Samples {
    fn median(&self) -> Option<f64> {
        if self.times.is_empty() {
            return None;
        }
        let mut sorted = self.times.clone();
        let mid = sorted.len() / 2;
        let (_, m, _) = sorted.select_nth_unstable_by(mid, f64::total_cmp);
        Some(*m)
    }

    fn push(&mut self, ts: f64) {
        if self.times.len() < WATERMARK_SAMPLES {
            self.times.push(ts);
        } else {
            self.times[self.next] = ts;
        }
        self.next = (self.next + 1) % WATERMARK_SAMPLES;
    }
}

/// Each input partition's watermark.
#[derive(Debug, Default)]
pub struct Watermarks {
    limits: TimeLimits,
    samples: Mutex<HashMap<i32, Samples>>,
}

impl Watermarks {
    /// Watermarks checking against `limits`.
    pub fn new(limits: TimeLimits) -> Self {
        Watermarks {
            limits,
            samples: Mutex::default(),
        }
    }

    /// Accepts `ts` from `partition` or says why not; `now` is the wall clock in seconds. Either
    /// way the time joins the partition's samples.
    pub fn admit(&self, partition: i32, ts: f64, now: f64) -> Result<(), OutOfWindow> {
        let mut all = self.samples.lock().expect("watermarks lock");
        let samples = all.entry(partition).or_default();
        let verdict = self.check(samples.median(), ts, now);
        samples.push(ts);
        verdict
    }

    fn check(&self, watermark: Option<f64>, ts: f64, now: f64) -> Result<(), OutOfWindow> {
        let skew = self.limits.max_future_skew;
        let near_now = (ts - now).abs() <= skew.as_secs_f64();
        let Some(watermark) = watermark else {
            return if ts <= now + skew.as_secs_f64() {
                Ok(())
            } else {
                Err(OutOfWindow::Ahead {
                    reference: now,
                    skew,
                })
            };
        };
        if ts > watermark + skew.as_secs_f64() && !near_now {
            return Err(OutOfWindow::Ahead {
                reference: watermark,
                skew,
            });
        }
        let age = self.limits.max_past_age;
        if ts < watermark - age.as_secs_f64() {
            return Err(OutOfWindow::Behind { watermark, age });
        }
        Ok(())
    }

    /// The partition's watermark, if it has seen a record.
    pub fn watermark(&self, partition: i32) -> Option<f64> {
        let all = self.samples.lock().expect("watermarks lock");
        all.get(&partition).and_then(Samples::median)
    }

    /// Forgets revoked partitions' watermarks (their next owner keeps its own).
    pub fn forget(&self, partitions: &[i32]) {
        let mut all = self.samples.lock().expect("watermarks lock");
        for p in partitions {
            all.remove(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: f64 = 86_400.0;
    /// 2026-11-30, as "now".
    const NOW: f64 = 1_796_000_000.0;
    /// 2018-04-01, where the simulator starts.
    const PAST: f64 = 1_522_540_800.0;
    const YEAR_3000: f64 = 32_503_680_000.0;

    fn marks() -> Watermarks {
        Watermarks::new(TimeLimits::default())
    }

    fn replay(w: &Watermarks, partition: i32, start: f64, n: u32) {
        for i in 0..n {
            w.admit(partition, start + f64::from(i) * 60.0, NOW)
                .unwrap();
        }
    }

    #[test]
    fn a_historical_replay_is_accepted_because_its_watermark_is_its_own_past() {
        let w = marks();
        replay(&w, 0, PAST, 200);
        let m = w.watermark(0).unwrap();
        assert!(m > PAST + 100.0 * 60.0 && m < PAST + 200.0 * 60.0, "{m}");
    }

    #[test]
    fn a_time_far_ahead_is_refused_and_one_wrong_record_cannot_move_the_watermark() {
        let w = marks();
        replay(&w, 0, PAST, 100);
        let e = w.admit(0, YEAR_3000, NOW).unwrap_err();
        assert!(matches!(e, OutOfWindow::Ahead { .. }), "{e:?}");
        // Three years ahead of a 2018 replay, though years before the wall clock: refused.
        assert!(w.admit(0, PAST + 3.0 * 365.0 * DAY, NOW).is_err());
        let m = w.watermark(0).unwrap();
        assert!(
            m < PAST + 100.0 * 60.0,
            "the median ignores two outliers: {m}"
        );
        // The replay goes on.
        w.admit(0, PAST + 101.0 * 60.0, NOW).unwrap();
        // A partition's first record is checked against the wall clock.
        assert!(w.admit(1, YEAR_3000, NOW).is_err());
        w.admit(2, NOW + 0.5 * DAY, NOW).unwrap();
    }

    #[test]
    fn a_time_far_behind_the_watermark_is_refused_but_a_late_one_within_the_age_is_not() {
        let w = marks();
        replay(&w, 0, NOW - DAY, 10);
        w.admit(0, NOW - 6.0 * DAY, NOW).unwrap();
        let e = w.admit(0, 0.0, NOW).unwrap_err();
        assert!(matches!(e, OutOfWindow::Behind { .. }), "{e:?}");
        assert!(e.describe("ts", 0.0, 0).contains("1970-01-01T00:00:00"));
        // Partitions keep their own clocks.
        w.admit(1, NOW - 30.0 * DAY, NOW).unwrap();
    }

    #[test]
    fn a_partition_quiet_for_days_accepts_its_next_live_record() {
        let w = marks();
        replay(&w, 0, NOW - 10.0 * DAY, 100);
        w.admit(0, NOW, NOW).unwrap();
    }

    #[test]
    fn a_stream_that_really_jumps_moves_the_watermark_after_half_the_samples() {
        let w = marks();
        replay(&w, 0, PAST, WATERMARK_SAMPLES as u32);
        let later = PAST + 365.0 * DAY;
        let refused = (0..WATERMARK_SAMPLES as u32)
            .filter(|&i| w.admit(0, later + f64::from(i), NOW).is_err())
            .count();
        assert!(refused <= WATERMARK_SAMPLES / 2 + 1, "{refused}");
        w.admit(0, later + 1_000.0, NOW).unwrap();
    }

    #[test]
    fn forgetting_a_partition_resets_its_clock() {
        let w = marks();
        replay(&w, 3, NOW - DAY, 10);
        w.forget(&[3]);
        assert_eq!(w.watermark(3), None);
        w.admit(3, NOW - 30.0 * DAY, NOW).unwrap();
    }

    #[test]
    fn limits_are_configurable() {
        let w = Watermarks::new(TimeLimits {
            max_future_skew: Span::secs(60),
            max_past_age: Span::secs(60),
        });
        replay(&w, 0, PAST, 1);
        assert!(w.admit(0, PAST + 61.0, NOW).is_err());
        assert!(w.admit(0, PAST - 61.0, NOW).is_err());
        w.admit(0, PAST + 59.0, NOW).unwrap();
    }
}
