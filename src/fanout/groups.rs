//! Groups of caught-up clients of one stream that rounds handle as one, plus the two small
//! policies that decide when a round may start (pacing) and when thin streams linger.
//!
//! A worker keeps two kinds of [`Groups`]:
//! - *holds*: the clients of a thin stream (a shape, or the compressed log) holding back their
//!   sends under load. They share one deadline and one size threshold, so they are all released
//!   by the same round (a few `io_uring_enter`s for all of them) instead of drifting into many
//!   small rounds;
//! - *waits*: the clients with nothing to send, skipped until their stream grows. With filters
//!   most rounds bring a given shape nothing (the post filter passes about one event in six),
//!   and walking every such client in every round was most of the worker's own CPU.
//!
//! Pure bookkeeping: no I/O, time passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::log::Stream;

/// Longest a busy worker holds back a round of live sends to batch more events into each
/// send. Why 10 ms: a few events' worth at the full firehose rate, small next to the network
/// latency every Jetstream consumer already has, and it bounds what pacing adds to p99.
pub const MAX_PACE_DELAY: Duration = Duration::from_millis(10);

/// What a lingering thin stream's send waits to carry: about what a full-stream send carries
/// when a busy worker paces its rounds (1,000 clients × 500 ev/s here: 4–5.5 KB). A send costs
/// nearly the same whatever its size, so this is what makes a filtered or compressed byte cost
/// about what a full-stream byte costs.
pub const THIN_SEND_BYTES: u64 = 4096;

/// Caught-up clients of one stream (see the module documentation).
pub struct Group {
    /// Names the group in its members' state: a member may leave, and its slot get a new
    /// client, while the group still lists the slot; the client's own state says whether it
    /// is still in this group.
    pub id: u64,
    /// The log its members read.
    pub stream: Arc<Stream>,
    /// When its first member joined (a hold is due `thin_linger` later).
    pub since: Instant,
    /// Lowest position among its members: a hold is also due once its stream has
    /// [`THIN_SEND_BYTES`] past it, a wait ends once its stream's end passes it.
    pub low: u64,
    /// Slots of its members (possibly stale: checked against `id` when taken out).
    pub members: Vec<u32>,
}

/// The groups of one kind in a worker: at most one per stream in use, so a handful.
#[derive(Default)]
pub struct Groups {
    /// The groups, in no particular order.
    list: Vec<Group>,
    /// Last id handed out (ids are never reused, so a stale member entry never matches).
    next_id: u64,
}

impl Groups {
    /// The group of `stream` (started at `now` if it has none), lowered to `pos`: the group a
    /// client at `pos` joins.
    pub fn join(&mut self, stream: &Arc<Stream>, pos: u64, now: Instant) -> &mut Group {
        let i = match self
            .list
            .iter()
            .position(|g| Arc::ptr_eq(&g.stream, stream))
        {
            Some(i) => i,
            None => {
                self.next_id += 1;
                self.list.push(Group {
                    id: self.next_id,
                    stream: stream.clone(),
                    since: now,
                    low: pos,
                    members: Vec::new(),
                });
                self.list.len() - 1
            }
        };
        let g = &mut self.list[i];
        g.low = g.low.min(pos);
        g
    }

    /// Takes out every group `done` says is done.
    fn take(&mut self, mut done: impl FnMut(&Group) -> bool) -> Vec<Group> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if done(&self.list[i]) {
                out.push(self.list.swap_remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Holds: takes out every hold that is due at `now` (all of them when lingering is off:
    /// `linger` is None). Returns them, and the deadline of the earliest hold that keeps
    /// waiting.
    pub fn take_due(
        &mut self,
        linger: Option<Duration>,
        now: Instant,
    ) -> (Vec<Group>, Option<Instant>) {
        let waiting_until = |h: &Group| {
            let pending = h.stream.end().saturating_sub(h.low);
            linger
                .map(|wait| h.since + wait)
                .filter(|&due| linger_holds(pending, due, now))
        };
        let next_due = self.list.iter().filter_map(waiting_until).min();
        (self.take(|h| waiting_until(h).is_none()), next_due)
    }

    /// Waits: takes out every wait whose stream grew past it.
    pub fn take_grown(&mut self) -> Vec<Group> {
        self.take(|w| w.stream.end() > w.low)
    }

    /// Drops members that left (and groups left empty, with their stream): a stream that
    /// never grows must not collect the slots of every client that ever waited on it.
    /// `member_of(slot, group id)` says whether the client in a slot is still in that group.
    pub fn prune(&mut self, member_of: impl Fn(u32, u64) -> bool) {
        for g in &mut self.list {
            let id = g.id;
            g.members.retain(|&slot| member_of(slot, id));
        }
        self.list.retain(|g| !g.members.is_empty());
    }

    /// The groups (for the simulation's invariants).
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.list.iter()
    }
}

/// Whether a lingering send with `pending` bytes keeps waiting at `now`: it is neither big
/// enough nor due.
pub fn linger_holds(pending: u64, due: Instant, now: Instant) -> bool {
    pending < THIN_SEND_BYTES && now < due
}

/// Hysteresis on the worker's busy share: thin streams start lingering once it reaches
/// `threshold` and stop only below a third of it, so that the relief lingering brings does not
/// switch it straight off again (and on, and off…). A zero `linger` never lingers.
pub fn linger_gate(on: bool, load: f64, linger: Duration, threshold: f64) -> bool {
    if linger.is_zero() {
        return false;
    }
    if on {
        load >= threshold / 3.0
    } else {
        load >= threshold
    }
}

/// When the next live round may start, given when the current one started, the work done
/// since, and the duty cycle: the work plus `(1/duty − 1)` times as much waiting, capped at
/// [`MAX_PACE_DELAY`]. With `duty` = 1 that is "as soon as the work is done", i.e. now.
pub fn next_round_at(started: Instant, busy: Duration, duty: f64) -> Instant {
    let wait = if duty >= 1.0 {
        Duration::ZERO
    } else {
        busy.mul_f64(1.0 / duty - 1.0).min(MAX_PACE_DELAY)
    };
    started + busy + wait
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two empty logs in a fresh directory (removed by the caller).
    fn two_streams(name: &str) -> (std::path::PathBuf, Arc<Stream>, Arc<Stream>) {
        let dir = std::env::temp_dir().join(format!("jetrelay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let open = |n: &str| Arc::new(Stream::create(n, &dir.join(n), 1 << 16).expect("stream"));
        (dir.clone(), open("posts.log"), open("likes.log"))
    }

    #[test]
    fn pacing_waits_in_proportion_to_the_work_and_never_beyond_the_cap() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Duty 1: the next round may start as soon as the current one's work is done.
        assert_eq!(next_round_at(t, ms(4), 1.0), t + ms(4));
        // Duty ½: as much waiting as working.
        assert_eq!(next_round_at(t, ms(4), 0.5), t + ms(8));
        // Duty ¼: three times as much waiting...
        assert_eq!(next_round_at(t, ms(2), 0.25), t + ms(8));
        // ...but never more than MAX_PACE_DELAY of it.
        assert_eq!(next_round_at(t, ms(4), 0.05), t + ms(4) + MAX_PACE_DELAY);
        // An idle worker (no work since the last round) starts the next one at once.
        assert_eq!(next_round_at(t, Duration::ZERO, 0.5), t);
    }

    #[test]
    fn a_thin_streams_clients_share_one_hold_released_by_its_deadline_or_its_size() {
        let (dir, posts, likes) = two_streams("holds");
        let (t, ms) = (Instant::now(), Duration::from_millis);
        let wait = Some(ms(40));
        let mut holds = Groups::default();
        // Clients of one stream join one hold whenever they come: one deadline for all.
        let first = holds.join(&posts, 0, t);
        first.members.push(1);
        let id = first.id;
        let later = holds.join(&posts, 0, t + ms(30));
        assert_eq!(
            (later.id, later.since),
            (id, t),
            "the later client joins the first's hold"
        );
        later.members.push(2);
        let other = holds.join(&likes, 0, t + ms(10)).id;
        assert_ne!(other, id, "another stream holds on its own");
        // Nothing is due before the earliest deadline, which is what the timer is armed for.
        let (due, next) = holds.take_due(wait, t + ms(39));
        assert!(due.is_empty());
        assert_eq!(next, Some(t + ms(40)));
        // At its deadline the posts hold goes out whole; the likes hold keeps waiting.
        let (due, next) = holds.take_due(wait, t + ms(40));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].id, due[0].members.as_slice()), (id, &[1, 2][..]));
        assert_eq!(next, Some(t + ms(50)));
        // A new hold of posts: due early once the stream has THIN_SEND_BYTES past its lowest
        // member, even if that member joined last.
        let mut end = 0;
        posts.append(&[b'x'; 1000], &mut end).unwrap();
        posts.publish(end);
        holds.join(&posts, 1000, t + ms(41)).members.push(1);
        holds.join(&posts, 0, t + ms(42)).members.push(2);
        assert!(
            holds.take_due(wait, t + ms(43)).0.is_empty(),
            "1,000 bytes past the lowest"
        );
        posts
            .append(&vec![b'y'; THIN_SEND_BYTES as usize - 1000], &mut end)
            .unwrap();
        posts.publish(end);
        let (due, _) = holds.take_due(wait, t + ms(43));
        assert_eq!(due.len(), 1, "THIN_SEND_BYTES past the lowest member: due");
        assert_eq!(due[0].members, vec![1, 2]);
        // Lingering switched off: every hold goes at once.
        let (due, next) = holds.take_due(None, t + ms(44));
        assert_eq!((due.len(), next), (1, None));
        assert!(holds.list.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn caught_up_clients_wait_per_stream_until_it_grows_and_leavers_are_pruned() {
        let (dir, posts, likes) = two_streams("waits");
        let t = Instant::now();
        let mut waits = Groups::default();
        let a = waits.join(&posts, 0, t).id;
        waits.join(&posts, 0, t).members.extend([1, 2]);
        assert_eq!(waits.join(&posts, 0, t).id, a, "one wait per stream");
        let b = waits.join(&likes, 0, t);
        b.members.push(3);
        let b = b.id;
        assert_ne!(a, b);
        assert!(
            waits.take_grown().is_empty(),
            "nothing appended: every client is skipped"
        );
        let mut end = 0;
        posts.append(b"{}", &mut end).unwrap();
        posts.publish(end);
        let grown = waits.take_grown();
        assert_eq!(grown.len(), 1, "only the stream that grew");
        assert_eq!((grown[0].id, grown[0].members.as_slice()), (a, &[1, 2][..]));
        // Slot 3 left (or went to another client): the likes wait is dropped.
        let c = waits.join(&posts, end, t);
        c.members.push(4);
        let c = c.id;
        waits.prune(|slot, id| slot == 4 && id == c);
        assert_eq!(waits.list.len(), 1);
        assert_eq!(
            (waits.list[0].id, waits.list[0].members.as_slice()),
            (c, &[4][..])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lingering_starts_at_the_load_threshold_and_stops_below_a_third_of_it() {
        let ms = Duration::from_millis;
        assert!(
            !linger_gate(false, 0.0, ms(40), 0.3),
            "an idle worker starts without lingering"
        );
        assert!(!linger_gate(false, 0.29, ms(40), 0.3));
        assert!(linger_gate(false, 0.3, ms(40), 0.3), "on at the threshold");
        // Lingering lowers the load; it stays on down to a third of the threshold...
        assert!(linger_gate(true, 0.15, ms(40), 0.3));
        assert!(linger_gate(true, 0.1, ms(40), 0.3));
        // ...and goes off below it.
        assert!(!linger_gate(true, 0.09, ms(40), 0.3));
        // Threshold 0: always on, from the start.
        assert!(linger_gate(false, 0.0, ms(40), 0.0));
        // A zero linger never lingers, whatever the load.
        assert!(!linger_gate(false, 1.0, Duration::ZERO, 0.0));
        assert!(!linger_gate(true, 1.0, Duration::ZERO, 0.0));
    }
}
