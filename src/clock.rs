//! The upstream's clock, as the relay sees it through `time_us`.
//!
//! Every cursor is a `time_us` stamped by an upstream Jetstream instance with its own clock, so
//! everything the relay decides about time — whether a cursor is in the future, where an
//! upstream reconnect resumes, which duplicates to remember — is measured on that clock, never
//! on the relay's wall clock. Real `time_us` are not monotonic (hundreds of ms of reordering),
//! and a faulty upstream may stamp one event far in the future or the past. [`UpstreamClock`]
//! turns the raw stamps into two robust quantities:
//!
//! - the **reference**: the [`REFERENCE_RANK`]-th highest `time_us` among the last
//!   [`RECENT_EVENTS`] appended events. Fewer outliers than the rank cannot move it; a real
//!   jump (failover to an instance whose clock is ahead) moves it after that many events. The
//!   follower resumes from it and prunes its duplicate memory by it.
//! - an event's **indexed time**: its `time_us`, but at most [`FUTURE_TOLERANCE`] plus the time
//!   elapsed since the previous event (measured on the relay's monotonic clock, which has no
//!   skew) beyond the reference. The index's running maximum — cursor lookups, "a cursor past
//!   the newest event is live" — is built from indexed times, so one far-future event moves it
//!   by at most the tolerance. A quiet stream whose events come minutes apart is not mistaken
//!   for outliers: the allowance grows with the silence.
//!
//! Events in the far past need no bound: they never raise a maximum, so they cannot move the
//! replay index or the resume point; they are appended and served like any other.

use std::collections::VecDeque;
use std::time::Duration;

/// Events the reference is taken from. Why 32: a tenth of a second of the real firehose, so
/// the reference follows the stream closely; enough to outvote a burst of a few outliers.
pub const RECENT_EVENTS: usize = 32;
/// The reference is the this-many-th highest recent `time_us`: up to `REFERENCE_RANK - 1`
/// outliers among the recent events cannot move it.
pub const REFERENCE_RANK: usize = 3;
/// How far beyond the reference (plus the silence since the previous event) an event's
/// `time_us` counts for the index. Why 60 s: far beyond reordering and any sane clock
/// difference between an upstream and its own recent events, while it bounds what one outlier
/// can do to cursor lookups: a cursor up to this much past the newest real event replays from
/// the outlier instead of going live.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(60);

/// Robust view of one upstream's clock (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct UpstreamClock {
    /// The last [`RECENT_EVENTS`] appended events, oldest first: raw `time_us`, and when each
    /// arrived on the relay's monotonic timeline (the sum of the `since_previous` given).
    recent: VecDeque<(i64, Duration)>,
    /// Arrival time of the newest event on that timeline.
    now: Duration,
}

impl UpstreamClock {
    /// A clock that has seen nothing yet.
    pub fn new() -> UpstreamClock {
        UpstreamClock::default()
    }

    /// A clock that has seen `times` (raw `time_us`, oldest first): after a restart, the last
    /// events of the log, taken as having arrived together just now.
    pub fn seeded(times: impl IntoIterator<Item = i64>) -> UpstreamClock {
        let mut clock = UpstreamClock::new();
        for t in times {
            clock.push(t);
        }
        clock
    }

    fn push(&mut self, time_us: i64) {
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((time_us, self.now));
    }

    /// The reference event: `(time_us, arrival)` of the [`REFERENCE_RANK`]-th highest recent
    /// `time_us` (with fewer events seen, the lowest of them).
    fn reference_event(&self) -> Option<(i64, Duration)> {
        if self.recent.is_empty() {
            return None;
        }
        let mut top = [(i64::MIN, Duration::ZERO); REFERENCE_RANK];
        for &(t, at) in &self.recent {
            // Insert into the descending top-k (k is tiny: a few compares per event).
            if t > top[REFERENCE_RANK - 1].0 {
                let mut i = REFERENCE_RANK - 1;
                while i > 0 && top[i - 1].0 < t {
                    top[i] = top[i - 1];
                    i -= 1;
                }
                top[i] = (t, at);
            }
        }
        let k = REFERENCE_RANK.min(self.recent.len());
        Some(top[k - 1])
    }

    /// The reference (see the module documentation); `None` before the first event.
    pub fn reference(&self) -> Option<i64> {
        self.reference_event().map(|(t, _)| t)
    }

    /// The highest indexed time an event arriving now may have: the reference, advanced by
    /// the relay's monotonic time since the reference event arrived, plus the tolerance.
    fn limit(&self, now: Duration) -> Option<i64> {
        let (t, at) = self.reference_event()?;
        let allowance = FUTURE_TOLERANCE.saturating_add(now.saturating_sub(at));
        Some(t.saturating_add(i64::try_from(allowance.as_micros()).unwrap_or(i64::MAX)))
    }

    /// The indexed time of an event with `time_us` arriving `since_previous` after the previous
    /// one (on the relay's monotonic clock), without recording it.
    pub fn indexed_time(&self, time_us: i64, since_previous: Duration) -> i64 {
        self.limit(self.now.saturating_add(since_previous))
            .map_or(time_us, |limit| time_us.min(limit))
    }

    /// Records one appended event (after [`UpstreamClock::indexed_time`] was used for it).
    pub fn record(&mut self, time_us: i64, since_previous: Duration) {
        self.now = self.now.saturating_add(since_previous);
        self.push(time_us);
    }

    /// [`UpstreamClock::indexed_time`] then [`UpstreamClock::record`].
    pub fn observe(&mut self, time_us: i64, since_previous: Duration) -> i64 {
        let indexed = self.indexed_time(time_us, since_previous);
        self.record(time_us, since_previous);
        indexed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000;
    const S: i64 = 1_000_000;
    const GAP: Duration = Duration::from_millis(2);

    #[test]
    fn the_reference_ignores_up_to_two_outliers_and_follows_a_real_jump() {
        let t0 = 1_783_000_000 * S;
        let mut c = UpstreamClock::new();
        assert_eq!(c.reference(), None);
        for i in 0..40 {
            // Non-monotonic like real traffic.
            let t = t0 + i * 2 * MS - if i % 3 == 0 { 300 * MS } else { 0 };
            assert_eq!(c.observe(t, GAP), t, "normal events are indexed as stamped");
        }
        // The newest real times are 76, 74 and 70 ms past t0.
        let before = c.reference().unwrap();
        assert_eq!(before, t0 + 70 * MS);
        let newest_real = t0 + 76 * MS;
        // One far-future and one far-past event: the reference stays among the real times,
        // the future one is indexed at most the tolerance (plus the gap) ahead of it.
        let far = t0 + 3_600 * S;
        let indexed = c.observe(far, GAP);
        assert!(indexed < far);
        assert!(indexed <= before + FUTURE_TOLERANCE.as_micros() as i64 + 20 * MS);
        assert_eq!(c.observe(0, GAP), 0);
        assert!(c.reference().unwrap() <= newest_real);
        // A second future outlier still does not move it beyond the real times; a third in a
        // row does (a real jump).
        c.observe(far + 1, GAP);
        assert!(c.reference().unwrap() <= newest_real);
        let third = c.observe(far + 2, GAP);
        assert!(third < far, "clamped until the jump is established");
        assert_eq!(c.reference(), Some(far));
        assert_eq!(
            c.observe(far + 3, GAP),
            far + 3,
            "the new time base is accepted"
        );
    }

    #[test]
    fn a_quiet_stream_is_not_mistaken_for_outliers() {
        let mut c = UpstreamClock::new();
        let mut t = 1_783_000_000 * S;
        for _ in 0..10 {
            // Ten minutes between events: the allowance grows with the silence.
            t += 600 * S;
            assert_eq!(c.observe(t, Duration::from_secs(600)), t);
        }
    }

    #[test]
    fn seeding_restores_the_reference() {
        let times: Vec<i64> = (0..100).map(|i| 1_000 * S + i * MS).collect();
        let c = UpstreamClock::seeded(times.iter().copied());
        assert_eq!(c.reference(), Some(1_000 * S + 97 * MS));
        let few = UpstreamClock::seeded([5, 9]);
        assert_eq!(few.reference(), Some(5), "fewer than the rank: the lowest");
        assert_eq!(
            c.indexed_time(1_000 * S + 200 * MS, GAP),
            1_000 * S + 200 * MS
        );
        assert!(c.indexed_time(2_000 * S, GAP) < 2_000 * S);
    }
}
