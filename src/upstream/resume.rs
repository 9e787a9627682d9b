//! Where the follower resumes after a disconnect, a failover or a restart, and which replayed
//! events it drops: the decisions, without sockets (simulated in the tests).
//!
//! Each connection resumes one of three ways ([`Plan`]):
//! - **By seq**, exact: the last appended event carried the upstream's seq and the connection
//!   goes to the same upstream URL. `?cursor=<seq>` replays from that event inclusively; it
//!   must come first again — same seq, same content — and is dropped, and from then on an
//!   event is new exactly when its seq is above the last appended one. No rewind, no content
//!   comparison. Anything else first (an older seq, no seq, our last event at another seq)
//!   means the URL no longer numbers events as it did (a reset, another instance behind the
//!   name): the follower resumes by time instead.
//! - **By time**, the fallback: a legacy host (no seqs), another instance (seqs are
//!   instance-local), a restart without a usable checkpoint. `cursor = reference − rewind`
//!   (another `max_skew` earlier on another instance; see [`crate::clock`]); the replayed
//!   overlap is dropped by content keys ([`super::dedup`]).
//! - **Live**: nothing appended yet.
//!
//! **Before the relay's history.** A resume by time can reach back before the first event the
//! relay ever appended (the connection dropped within the rewind of the relay's first
//! connection, or a young log after a restart). The upstream then replays events the relay
//! never had, from before its first one; appending them would put them after newer ones (a
//! client saw upstream events 0–61 after 998). While the relay's first event is within a
//! resume's reach, a resume by time that may reach before it drops new events stamped before
//! that first event (plus the resume's clock allowance) until the first already-appended
//! event arrives ([`SkipReason::BeforeHistory`](super::SkipReason::BeforeHistory)): in
//! upstream order, everything before our first event precedes our first duplicate.

use std::time::Duration;

use tracing::{info, warn};

use super::dedup::DedupWindow;
use super::duration_us;
use crate::clock::UpstreamClock;
use crate::event::EventMeta;
use crate::wire::SEQ_CURSOR_LIMIT;

/// The upstream seq of the last appended event and the URL (index into the configured URLs)
/// that numbered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SeqPosition {
    /// Index into `UpstreamConfig::urls`.
    pub url: usize,
    /// The upstream's seq of the last appended event.
    pub seq: u64,
}

/// How a connection resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Nothing appended yet: no cursor (the URL's own, if it has one).
    Live,
    /// `?cursor=seq`, exact (see the module documentation).
    Seq(u64),
    /// `?cursor=<µs>`: rewound by `allowed`, overlap dropped by content.
    Time {
        /// The cursor, unix µs on the upstream's clock.
        cursor: i64,
        /// The clock difference the cursor absorbs (the rewind, plus the skew on another
        /// instance).
        allowed: Duration,
        /// The seq position this resume could not use (it is another URL's).
        instead_of: Option<SeqPosition>,
    },
}

impl Plan {
    /// The `cursor` query value.
    pub(super) fn cursor(&self) -> Option<i64> {
        match *self {
            Plan::Live => None,
            // Below SEQ_CURSOR_LIMIT (checked by `plan`), so it fits.
            Plan::Seq(seq) => i64::try_from(seq).ok(),
            Plan::Time { cursor, .. } => Some(cursor),
        }
    }
}

/// The relay's first appended event, while a resume by time can still reach before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    /// Nothing appended yet.
    Unknown,
    /// The indexed `time_us` of the relay's first appended event.
    At(i64),
    /// Older than any resume reaches (out of the dedup window), or unknown after a restart
    /// with a long history.
    Passed,
}

/// What the current session's first events are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing to check (a live start, or checked).
    Steady,
    /// Resumed by seq: the first event must be the re-delivered `seq`, our last appended event
    /// (whose dedup key is `key`, when known).
    ExpectRedelivery {
        /// The cursor asked for.
        seq: u64,
        /// The dedup key of the last appended event.
        key: Option<u64>,
    },
    /// Resumed by time: the first events should be ones already appended.
    ExpectOverlap {
        /// The cursor asked for.
        cursor: i64,
        /// The clock difference it absorbs.
        allowed: Duration,
        /// The relay's first event's time, when this resume may reach before it.
        floor: Option<i64>,
        /// New events dropped so far as replayed from before the relay's history.
        before_history: u64,
    },
}

/// What to do with one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// New: append it.
    Append,
    /// Already appended (by seq or by content).
    Duplicate,
    /// Replayed from before the relay's first event: never appended after it.
    BeforeHistory,
    /// A resume by seq met a stream numbered otherwise: resume by time instead (says why).
    Renumbered(String),
}

/// The current connection.
#[derive(Clone, Copy, Debug)]
struct Session {
    /// Index of its URL.
    url: usize,
    /// Whether it resumed by seq (events with a seq are then judged by it alone).
    by_seq: bool,
    /// Events it appended.
    appended: u64,
}

/// The follower's position and memory (see the module documentation).
#[derive(Debug)]
pub(super) struct Tracker {
    /// How far a resume by time rewinds before the reference.
    rewind: Duration,
    /// Extra rewind on another instance.
    max_skew: Duration,
    /// How far back appended events are remembered (dedup keys, the floor).
    window: Duration,
    /// The upstream's clock as seen through appended events.
    clock: UpstreamClock,
    /// Index of the URL whose clock `clock` follows; `None` when unknown.
    clock_source: Option<usize>,
    /// Content keys of recently appended events.
    dedup: DedupWindow,
    /// Where an exact resume can start, if the last appended event had a seq.
    position: Option<SeqPosition>,
    /// Dedup key of the last appended event.
    last_key: Option<u64>,
    /// The relay's first event, for resumes that may reach before it.
    floor: Floor,
    /// What the current session's first events are checked against.
    phase: Phase,
    /// The current connection.
    session: Session,
}

impl Tracker {
    pub(super) fn new(rewind: Duration, max_skew: Duration, window: Duration) -> Tracker {
        Tracker {
            rewind,
            max_skew,
            window,
            clock: UpstreamClock::new(),
            clock_source: None,
            dedup: DedupWindow::new(window, super::MAX_DEDUP_KEYS),
            position: None,
            last_key: None,
            floor: Floor::Unknown,
            phase: Phase::Steady,
            session: Session {
                url: 0,
                by_seq: false,
                appended: 0,
            },
        }
    }

    /// After a restart: the clock seeded with `recent_raw_times`, the dedup memory with
    /// `recent_keys` (`(indexed time, key)` in log order, the dedup window before the newest),
    /// and the exact position when the restart checkpoint names a configured URL. When the
    /// keys do not fill the window, the log is younger than it and its first event is the
    /// relay's first: resumes that may reach before it drop what precedes it.
    pub(super) fn resume_from(
        &mut self,
        recent_raw_times: impl IntoIterator<Item = i64>,
        recent_keys: impl IntoIterator<Item = (i64, u64)>,
        position: Option<SeqPosition>,
    ) {
        self.clock = UpstreamClock::seeded(recent_raw_times);
        // Which instance stamped them is not known: the first connection counts as a failover.
        self.clock_source = None;
        let mut first = None;
        for (time, key) in recent_keys {
            first.get_or_insert(time);
            self.dedup.insert(key, time);
            self.last_key = Some(key);
        }
        let reference = self.clock.reference();
        if let Some(reference) = reference {
            self.dedup.prune(reference);
        }
        self.floor = match (first, reference) {
            (None, None) => Floor::Unknown,
            (Some(first), Some(reference))
                if first >= reference.saturating_sub(duration_us(self.window)) =>
            {
                Floor::At(first)
            }
            _ => Floor::Passed,
        };
        self.position = position;
    }

    /// The clock's reference (the robust newest `time_us` appended), if any.
    pub(super) fn reference_time_us(&self) -> Option<i64> {
        self.clock.reference()
    }

    /// How a connection to URL `url` resumes.
    pub(super) fn plan(&self, url: usize) -> Plan {
        if let Some(p) = self.position
            && p.url == url
            && p.seq < SEQ_CURSOR_LIMIT as u64
        {
            return Plan::Seq(p.seq);
        }
        let Some(reference) = self.clock.reference() else {
            return Plan::Live;
        };
        let mut allowed = self.rewind;
        if self.clock_source != Some(url) {
            allowed = allowed.saturating_add(self.max_skew);
        }
        Plan::Time {
            cursor: reference.saturating_sub(duration_us(allowed)),
            allowed,
            instead_of: self.position.filter(|p| p.url != url),
        }
    }

    /// A connection to `url` resumed as `plan` (see [`Tracker::plan`]).
    pub(super) fn start_session(&mut self, url: usize, plan: Plan) {
        self.session = Session {
            url,
            by_seq: matches!(plan, Plan::Seq(_)),
            appended: 0,
        };
        if self.clock_source != Some(url) {
            // Until this session has appended enough events, the clock still follows the
            // previous instance (or an unknown one).
            self.clock_source = None;
        }
        self.phase = match plan {
            Plan::Live => Phase::Steady,
            Plan::Seq(seq) => Phase::ExpectRedelivery {
                seq,
                key: self.last_key,
            },
            Plan::Time {
                cursor, allowed, ..
            } => Phase::ExpectOverlap {
                cursor,
                allowed,
                floor: match self.floor {
                    Floor::At(first) if cursor < first.saturating_add(duration_us(allowed)) => {
                        Some(first)
                    }
                    _ => None,
                },
                before_history: 0,
            },
        };
    }

    /// Whether the current session resumed by seq.
    pub(super) fn resumed_by_seq(&self) -> bool {
        self.session.by_seq
    }

    /// The exact position is not valid for its URL any more (the upstream refused or
    /// contradicted it): the next connection resumes by time, as on another instance.
    pub(super) fn forget_seq(&mut self) {
        self.position = None;
        self.clock_source = None;
    }

    /// Judges one event of the current session (its upstream `time_us` in `meta`).
    pub(super) fn judge(&mut self, meta: &EventMeta<'_>, upstream_seq: Option<u64>) -> Verdict {
        match self.phase {
            Phase::Steady => self.judge_steady(meta, upstream_seq),
            Phase::ExpectRedelivery { seq: last, key } => {
                self.phase = Phase::Steady;
                self.check_redelivery(meta, upstream_seq, last, key)
            }
            Phase::ExpectOverlap {
                cursor,
                allowed,
                floor,
                before_history,
            } => {
                let first_copy = self.dedup.get(meta.dedup_key);
                if first_copy.is_none()
                    && let Some(first) = floor
                    && meta.time_us < first.saturating_add(duration_us(allowed))
                {
                    self.phase = Phase::ExpectOverlap {
                        cursor,
                        allowed,
                        floor,
                        before_history: before_history + 1,
                    };
                    return Verdict::BeforeHistory;
                }
                self.phase = Phase::Steady;
                if before_history > 0 {
                    info!(
                        dropped = before_history,
                        "dropped events the upstream replayed from before the relay's first \
                         event (the resume reached back before it; they are never appended \
                         after newer ones)"
                    );
                }
                check_overlap(cursor, allowed, meta.time_us, first_copy, before_history);
                match first_copy {
                    Some(_) => Verdict::Duplicate,
                    None => Verdict::Append,
                }
            }
        }
    }

    fn judge_steady(&self, meta: &EventMeta<'_>, upstream_seq: Option<u64>) -> Verdict {
        if self.session.by_seq
            && let Some(seq) = upstream_seq
        {
            return match self.position {
                Some(p) if p.url == self.session.url && seq <= p.seq => Verdict::Duplicate,
                _ => Verdict::Append,
            };
        }
        match self.dedup.get(meta.dedup_key) {
            Some(_) => Verdict::Duplicate,
            None => Verdict::Append,
        }
    }

    /// The first event of a resume by seq: the one appended last, delivered again.
    fn check_redelivery(
        &self,
        meta: &EventMeta<'_>,
        upstream_seq: Option<u64>,
        last: u64,
        key: Option<u64>,
    ) -> Verdict {
        let Some(seq) = upstream_seq else {
            return Verdict::Renumbered(format!(
                "resumed at seq {last} but the first event carries no seq"
            ));
        };
        if seq < last {
            return Verdict::Renumbered(format!(
                "resumed at seq {last} but the first event has seq {seq}"
            ));
        }
        if seq == last {
            return match key {
                Some(key) if key != meta.dedup_key => Verdict::Renumbered(format!(
                    "seq {seq} is not the event appended last at that seq"
                )),
                _ => {
                    info!(seq, "resumed exactly at the upstream seq appended last");
                    Verdict::Duplicate
                }
            };
        }
        if self.dedup.get(meta.dedup_key).is_some() {
            return Verdict::Renumbered(format!(
                "resumed at seq {last} but an event appended before came at seq {seq}"
            ));
        }
        warn!(
            last_appended_seq = last,
            first_seq = seq,
            "resumed by seq, but the event appended last was not delivered again (the \
             upstream no longer has it): events between may be missing"
        );
        Verdict::Append
    }

    /// The time `meta` is indexed at (see [`crate::clock`]), given the monotonic time since
    /// the previous append.
    pub(super) fn indexed_time(&self, time_us: i64, since_previous: Duration) -> i64 {
        self.clock.indexed_time(time_us, since_previous)
    }

    /// Records an appended event: `meta` with its indexed time, its upstream `time_us`, and
    /// its upstream seq.
    pub(super) fn appended(
        &mut self,
        meta: &EventMeta<'_>,
        raw_time_us: i64,
        since_previous: Duration,
        upstream_seq: Option<u64>,
    ) {
        self.dedup.insert(meta.dedup_key, meta.time_us);
        self.clock.record(raw_time_us, since_previous);
        self.session.appended += 1;
        if self.session.appended == crate::clock::RECENT_EVENTS as u64 {
            self.clock_source = Some(self.session.url);
        }
        self.position = upstream_seq.map(|seq| SeqPosition {
            url: self.session.url,
            seq,
        });
        self.last_key = Some(meta.dedup_key);
        if self.floor == Floor::Unknown {
            self.floor = Floor::At(meta.time_us);
        }
        if let Some(reference) = self.clock.reference() {
            self.dedup.prune(reference);
            if let Floor::At(first) = self.floor
                && first < reference.saturating_sub(duration_us(self.window))
            {
                self.floor = Floor::Passed;
            }
        }
    }

    /// The exact resume position, if there is one.
    #[cfg(test)]
    pub(super) fn position(&self) -> Option<SeqPosition> {
        self.position
    }
}

/// After a resume by time, the first event that is not from before the relay's history shows
/// whether the cursor reached back far enough: it should be a duplicate, and its two copies'
/// times give the instances' clock difference.
fn check_overlap(
    cursor: i64,
    allowed: Duration,
    time_us: i64,
    first_copy: Option<i64>,
    dropped_before_history: u64,
) {
    match first_copy {
        Some(before) => {
            let offset_us = time_us.saturating_sub(before);
            let offset = Duration::from_micros(offset_us.unsigned_abs());
            if offset > allowed {
                warn!(
                    clock_offset_ms = offset_us / 1000,
                    allowed_ms = allowed.as_millis() as u64,
                    "upstream clocks differ by more than the resume cursor allows: events \
                     may have been missed (this instance is behind) or duplicated (ahead); \
                     raise --upstream-skew"
                );
            } else {
                info!(
                    clock_offset_ms = offset_us / 1000,
                    "resumed with overlap; upstream clock offset vs the previous copy"
                );
            }
        }
        None => warn!(
            cursor,
            time_us,
            dropped_before_history,
            "resumed upstream without overlap: the first event is not one already \
             appended, so events between may be missing (clock skew beyond \
             --upstream-skew, or a gap in the upstream's history); the events dropped as \
             from before the relay's first event may have been among them"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use std::borrow::Cow;

    const S: i64 = 1_000_000;
    const T0: i64 = 1_783_175_888 * S;

    fn tracker(rewind_s: u64, skew_s: u64) -> Tracker {
        let (rewind, skew) = (Duration::from_secs(rewind_s), Duration::from_secs(skew_s));
        let window = rewind + 2 * skew + super::super::DEDUP_MARGIN;
        Tracker::new(rewind, skew, window)
    }

    fn meta(key: u64, time_us: i64) -> EventMeta<'static> {
        EventMeta {
            did: Cow::Borrowed("did:plc:sim"),
            time_us,
            kind: EventKind::Commit,
            collection: None,
            dedup_key: key,
        }
    }

    #[test]
    fn plans_by_seq_on_the_numbering_url_by_time_elsewhere() {
        let mut t = tracker(5, 60);
        assert_eq!(t.plan(0), Plan::Live, "no history: live");
        // The newest events are at 10 s, then 9.9 s and 9.8 s: the reference is the third.
        t.resume_from([9_700_000, 9_900_000, 10_000_000, 9_800_000], [], None);
        assert_eq!(t.reference_time_us(), Some(9_800_000));
        // After a restart the instance is unknown: every URL counts as a failover.
        let failover = Duration::from_secs(65);
        let by_time = |cursor, allowed, instead_of| Plan::Time {
            cursor,
            allowed,
            instead_of,
        };
        assert_eq!(t.plan(0), by_time(9_800_000 - 65_000_000, failover, None));
        // Once the clock follows instance 0, reconnecting there rewinds only.
        t.clock_source = Some(0);
        assert_eq!(t.plan(0), by_time(4_800_000, Duration::from_secs(5), None));
        assert_eq!(t.plan(1), by_time(9_800_000 - 65_000_000, failover, None));
        // With a seq from URL 1: exact there, by time (saying what it could not use) on 0.
        let p = SeqPosition { url: 1, seq: 77 };
        t.position = Some(p);
        assert_eq!(t.plan(1), Plan::Seq(77));
        assert_eq!(t.plan(1).cursor(), Some(77));
        assert_eq!(
            t.plan(0),
            by_time(4_800_000, Duration::from_secs(5), Some(p))
        );
        // A seq that the cursor namespace cannot express as one (≥ 10^15) resumes by time.
        t.position = Some(SeqPosition {
            url: 1,
            seq: SEQ_CURSOR_LIMIT as u64,
        });
        assert!(matches!(t.plan(1), Plan::Time { .. }));
        t.position = Some(p);
        t.forget_seq();
        assert_eq!(t.plan(1), by_time(9_800_000 - 65_000_000, failover, None));
    }

    /// Appends `(key, time, seq)` as the follower would, in a session already started.
    fn append(t: &mut Tracker, key: u64, time_us: i64, seq: Option<u64>) {
        assert_eq!(t.judge(&meta(key, time_us), seq), Verdict::Append);
        let indexed = t.indexed_time(time_us, Duration::from_millis(1));
        t.appended(&meta(key, indexed), time_us, Duration::from_millis(1), seq);
    }

    #[test]
    fn a_resume_by_seq_checks_the_redelivered_event_then_judges_by_seq_alone() {
        let fresh = || {
            let mut t = tracker(1, 0);
            t.start_session(0, Plan::Live);
            for i in 0..10u64 {
                append(&mut t, 100 + i, T0 + i as i64 * 1000, Some(50 + i));
            }
            assert_eq!(t.position(), Some(SeqPosition { url: 0, seq: 59 }));
            assert_eq!(t.plan(0), Plan::Seq(59));
            t.start_session(0, Plan::Seq(59));
            assert!(t.resumed_by_seq());
            t
        };
        // As it should be: the last event again, then new seqs; an old seq is a duplicate
        // even with new content, new content with a new seq is appended whatever its key.
        let mut t = fresh();
        assert_eq!(t.judge(&meta(109, T0), Some(59)), Verdict::Duplicate);
        append(&mut t, 110, T0 + 10_000, Some(61));
        assert_eq!(t.judge(&meta(999, T0), Some(61)), Verdict::Duplicate);
        assert_eq!(t.judge(&meta(105, T0), Some(62)), Verdict::Append);
        // The event at our seq is another one: renumbered.
        let mut t = fresh();
        assert!(matches!(
            t.judge(&meta(555, T0), Some(59)),
            Verdict::Renumbered(_)
        ));
        // An older seq first, or no seq at all.
        let mut t = fresh();
        assert!(matches!(
            t.judge(&meta(109, T0), Some(58)),
            Verdict::Renumbered(_)
        ));
        let mut t = fresh();
        assert!(matches!(
            t.judge(&meta(109, T0), None),
            Verdict::Renumbered(_)
        ));
        // A later seq carrying an event already appended: renumbered.
        let mut t = fresh();
        assert!(matches!(
            t.judge(&meta(104, T0), Some(70)),
            Verdict::Renumbered(_)
        ));
        // A later seq with a new event: the last one is gone upstream; appended (and logged).
        let mut t = fresh();
        assert_eq!(t.judge(&meta(777, T0), Some(70)), Verdict::Append);
    }

    #[test]
    fn a_restart_checkpoint_is_exact_only_on_its_url() {
        let times: Vec<i64> = (0..40).map(|i| T0 + i * 1000).collect();
        let keys: Vec<(i64, u64)> = times.iter().map(|&t| (t, t as u64)).collect();
        let mut t = tracker(1, 2);
        t.resume_from(
            times.iter().copied(),
            keys.iter().copied(),
            Some(SeqPosition { url: 1, seq: 40 }),
        );
        assert_eq!(t.plan(1), Plan::Seq(40));
        t.start_session(1, Plan::Seq(40));
        // The re-delivered event must be the log's last one.
        let last = *keys.last().unwrap();
        assert_eq!(t.judge(&meta(last.1, last.0), Some(40)), Verdict::Duplicate);
        let mut t = tracker(1, 2);
        t.resume_from(
            times.iter().copied(),
            keys.iter().copied(),
            Some(SeqPosition { url: 1, seq: 40 }),
        );
        t.start_session(1, Plan::Seq(40));
        assert!(matches!(
            t.judge(&meta(keys[3].1, keys[3].0), Some(40)),
            Verdict::Renumbered(_)
        ));
    }

    /// One simulated upstream instance: the same events as every other, its own numbering
    /// and clock.
    #[derive(Clone, Copy, Debug)]
    struct Instance {
        /// Its seq of event `i` is `i + seq_offset`; `None`: a legacy host without seqs.
        seq_offset: Option<u64>,
        /// Added to every `time_us` it stamps.
        skew_us: i64,
    }

    /// Event `i`: key, the time instance `at` stamps it with (1 ms apart, ~30 % of them up
    /// to 40 ms early, as real traffic reorders), its seq there.
    fn sim_event(seed: u64, i: usize, at: Instance) -> (u64, i64, Option<u64>) {
        let h = crate::mock::mix64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
        let jitter = if h % 10 < 3 {
            (h >> 8) as i64 % 40_000
        } else {
            0
        };
        let time = T0 + i as i64 * 1000 - jitter + at.skew_us;
        (
            1_000_000 + i as u64,
            time,
            at.seq_offset.map(|o| i as u64 + o),
        )
    }

    /// Where an instance's replay starts for `plan` when the stream is at `now`: the first
    /// event with a seq ≥ the cursor, or (like the mock and a legacy host) the first event in
    /// history order stamped at or after the time cursor; live is `now`.
    fn replay_from(seed: u64, plan: Plan, at: Instance, now: usize) -> usize {
        let first = |pred: &dyn Fn(usize) -> bool| (0..now).find(|&i| pred(i)).unwrap_or(now);
        match (plan, at.seq_offset) {
            (Plan::Live, _) => now,
            (Plan::Seq(s), Some(offset)) => first(&|i| i as u64 + offset >= s),
            // A legacy host reads a small seq cursor as a time in 1970: everything.
            (Plan::Seq(_), None) => 0,
            (Plan::Time { cursor, .. }, _) => first(&|i| sim_event(seed, i, at).1 >= cursor),
        }
    }

    /// Drives a tracker through a stream of `total` events with seeded drops, reconnects
    /// (to a random instance when there are several) and restarts (a new tracker seeded from
    /// what was appended, with the checkpoint of the last seq): returns the indices of the
    /// events appended, in order, and how many resumes went each way.
    fn simulate(
        seed: u64,
        instances: &[Instance],
        total: usize,
        restarts: bool,
    ) -> (Vec<usize>, [u32; 3], usize) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (rewind_s, skew_s) = (1, 2);
        let mut t = tracker(rewind_s, skew_s);
        let window_us = duration_us(t.window);
        let mut appended: Vec<usize> = Vec::new();
        // (index, indexed time, key) of every append, as a log would keep them.
        let mut log: Vec<(usize, i64, u64)> = Vec::new();
        // The relay starts live somewhere in the upstream's history.
        let first_live = rng.usize(50..400);
        let mut now = first_live;
        let mut url = 0;
        let mut plans = [0u32; 3];
        let mut replayed_before_history = 0;
        loop {
            let at = instances[url];
            let plan = t.plan(url);
            plans[match plan {
                Plan::Live => 0,
                Plan::Seq(_) => 1,
                Plan::Time { .. } => 2,
            }] += 1;
            t.start_session(url, plan);
            let from = replay_from(seed, plan, at, now);
            // The first drops come within the first second (the rewind of the first session).
            let until = (now + rng.usize(20..1500)).min(total);
            let mut resync = false;
            for i in from..until {
                let (key, time, seq) = sim_event(seed, i, at);
                match t.judge(&meta(key, time), seq) {
                    Verdict::Append => {
                        let indexed = t.indexed_time(time, Duration::from_millis(1));
                        t.appended(&meta(key, indexed), time, Duration::from_millis(1), seq);
                        appended.push(i);
                        log.push((i, indexed, key));
                    }
                    Verdict::Duplicate => {}
                    Verdict::BeforeHistory => {
                        assert!(
                            i < first_live,
                            "seed {seed}: {i} is not before {first_live}"
                        );
                        replayed_before_history += 1;
                    }
                    Verdict::Renumbered(_) => {
                        t.forget_seq();
                        resync = true;
                        break;
                    }
                }
            }
            if resync {
                continue;
            }
            if until == total {
                break;
            }
            // Down for a while; the upstream moves on.
            now = (until + rng.usize(0..200)).min(total);
            if instances.len() > 1 && rng.bool() {
                url = rng.usize(..instances.len());
            }
            if restarts && rng.u8(..) < 40 {
                // A restart: a new tracker with the log's recent events and the checkpoint.
                let newest = log.iter().map(|e| e.1).max().unwrap_or(0);
                let recent: Vec<(i64, u64)> = log
                    .iter()
                    .filter(|e| e.1 >= newest - window_us)
                    .map(|e| (e.1, e.2))
                    .collect();
                let times: Vec<i64> = log
                    .iter()
                    .rev()
                    .take(crate::clock::RECENT_EVENTS)
                    .rev()
                    .map(|&(i, _, _)| sim_event(seed, i, instances[t.session.url]).1)
                    .collect();
                let checkpoint = t.position;
                t = tracker(rewind_s, skew_s);
                t.resume_from(times, recent, checkpoint);
            }
        }
        (appended, plans, replayed_before_history)
    }

    fn assert_exact(seed: u64, appended: &[usize], total: usize) {
        let first = appended[0];
        let want: Vec<usize> = (first..total).collect();
        if appended != want {
            let bad = appended
                .iter()
                .zip(&want)
                .position(|(a, w)| a != w)
                .unwrap_or(want.len().min(appended.len()));
            panic!(
                "seed {seed}: appended diverges at position {bad}: {:?} (want {:?}); {} vs {} events",
                &appended[bad.saturating_sub(3)..(bad + 5).min(appended.len())],
                &want[bad.saturating_sub(3)..(bad + 5).min(want.len())],
                appended.len(),
                want.len()
            );
        }
    }

    /// Seeded simulation: every event from the first live one on is appended exactly once, in
    /// upstream order, from one legacy host (by time, the relay's first connection dropping
    /// within its rewind), one seq host (by seq), and failovers between instances with other
    /// numberings and clocks (by time), with restarts.
    #[test]
    fn simulated_drops_failovers_and_restarts_append_every_event_once_in_order() {
        let legacy = Instance {
            seq_offset: None,
            skew_us: 0,
        };
        let a = Instance {
            seq_offset: Some(1),
            skew_us: 0,
        };
        // Clocks within the tolerated skew (2 s) of each other.
        let b = Instance {
            seq_offset: Some(1_000_000),
            skew_us: 900_000,
        };
        let c = Instance {
            seq_offset: Some(7),
            skew_us: -900_000,
        };
        let mut totals = [0u32; 3];
        let mut before_history = 0;
        for seed in 0..60u64 {
            let total = 6_000;
            for (instances, restarts) in [
                (&[legacy][..], false),
                (&[legacy][..], true),
                (&[a][..], true),
                (&[a, b, c][..], false),
                (&[a, b, legacy, c][..], true),
            ] {
                let (appended, plans, dropped) = simulate(seed, instances, total, restarts);
                assert_exact(seed, &appended, total);
                for (t, p) in totals.iter_mut().zip(plans) {
                    *t += p;
                }
                before_history += dropped;
            }
        }
        let [live, by_seq, by_time] = totals;
        println!(
            "{live} live starts, {by_seq} resumes by seq, {by_time} by time; \
             {before_history} events replayed from before the first one dropped"
        );
        assert!(by_seq > 500 && by_time > 500, "{totals:?}");
        assert!(before_history > 1000, "the first-connection case happened");
    }
}
