//! The hub: state shared by the writer, the fan-out workers, the listener and retention —
//! the base logs, the event index, and the counters everyone bumps.
//!
//! Four base streams are written for every event, one per [`Encoding`]: the v1 JSON (with the
//! relay's `cursor`) in text frames, that JSON compressed once with the v1 dictionary in binary
//! frames, the v2 message in text frames, and that message compressed once with the v2
//! dictionary. Every client is served from the page cache exactly like every other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::encoding::{ENCODINGS, Encoding};
use crate::index::{CursorStart, EventEntry, EventIndex, EventPos};
use crate::lock_order::{Level, OrderedRwLock, ReadGuard, WriteGuard};
use crate::log::Stream;
use crate::upstream::SkipReason;

/// Counters for the metrics endpoint. Each is bumped where the work already happens, with a
/// Relaxed add, never per event per client. They are read only when metrics are collected.
#[derive(Default)]
pub struct Counters {
    /// Upstream events appended.
    pub events_appended: AtomicU64,
    /// Upstream messages skipped (malformed, duplicate, ...), all reasons.
    pub upstream_skipped: AtomicU64,
    /// Upstream messages skipped, per reason (index = position in [`SkipReason::ALL`]).
    pub upstream_skipped_by: [AtomicU64; SkipReason::ALL.len()],
    /// Upstream (re)connections.
    pub upstream_reconnects: AtomicU64,
    /// 1 while an upstream connection is up.
    pub upstream_connected: AtomicU64,
    /// Wall clock (µs) of the last append, for readiness and lag.
    pub last_append_us: AtomicU64,
    /// Newest `time_us` appended (running max).
    pub newest_time_us: AtomicU64,
    /// Bytes handed to client sockets.
    pub bytes_sent: AtomicU64,
    /// Events handed to client sockets (counted per completed range, not per event).
    pub events_delivered: AtomicU64,
    /// Clients connected right now.
    pub clients: AtomicU64,
    /// Clients connected right now, per subscription shape and encoding (index =
    /// [`ShapeClass::index`]).
    pub clients_by_shape: [AtomicU64; ShapeClass::COUNT],
    /// Clients accepted (upgraded) in total.
    pub clients_accepted: AtomicU64,
    /// Handshakes refused in total.
    pub handshakes_refused: AtomicU64,
    /// Handshakes refused, per HTTP status (index = position in [`REFUSAL_STATUSES`], the
    /// last slot counts any other status).
    pub refused_by_status: [AtomicU64; REFUSAL_STATUSES.len() + 1],
    /// Connections refused at accept because their address already held
    /// `--max-handshakes-per-ip` handshakes in progress.
    pub refused_handshakes_per_ip: AtomicU64,
    /// Connections refused because every handshake slot (`--max-handshakes`) was taken and
    /// no address held more than one slot more than theirs (nothing fair to evict).
    pub refused_handshakes_full: AtomicU64,
    /// Cursor handshakes refused (429) because their address already had its share of the
    /// cursor-scan queue.
    pub refused_cursor_scans_per_ip: AtomicU64,
    /// Cursor handshakes refused (503) because the cursor-scan queue was full.
    pub refused_cursor_scans_full: AtomicU64,
    /// Queued cursor handshakes answered 503 because they waited past their deadline.
    pub cursor_scans_expired: AtomicU64,
    /// Handshakes closed (503) to give their slot to an address holding fewer (fair eviction
    /// when the handshake slots are full).
    pub handshakes_evicted: AtomicU64,
    /// Handshakes in progress right now (a gauge the listener stores).
    pub handshakes_pending: AtomicU64,
    /// Trusted-listener connections closed at accept: their source is not in
    /// `--trusted-allow-ip`.
    pub refused_trusted_source: AtomicU64,
    /// Clients disconnected because they fell behind retention.
    pub kicked_retention: AtomicU64,
    /// Clients disconnected because they stopped answering pings.
    pub kicked_dead: AtomicU64,
    /// Clients disconnected for protocol violations or invalid options.
    pub kicked_protocol: AtomicU64,
    /// Retention punches done.
    pub punches: AtomicU64,
    /// Bytes punched.
    pub punched_bytes: AtomicU64,
    /// Splice errors seen by workers.
    pub splice_errors: AtomicU64,
    /// io_uring submissions (loops) across workers.
    pub ring_loops: AtomicU64,
    /// SQEs submitted across workers.
    pub sqes: AtomicU64,
    /// Data sends that moved bytes to a client (ring `SEND`s and splices out of a pipe).
    pub data_sends: AtomicU64,
    /// Live rounds started (each hands newly appended data to every idle client).
    pub rounds: AtomicU64,
    /// Rounds held back by pacing (`--fanout-duty`) to batch more events per send.
    pub rounds_held: AtomicU64,
    /// Sends to thin streams that lingered (`--thin-linger`) to carry more bytes.
    pub lingered_sends: AtomicU64,
    /// Holds of lingering clients released (each lets its members' sends go in one round).
    pub linger_releases: AtomicU64,
    /// Parked DID-filtered clients woken because a new event has one of their DIDs' hashes.
    pub did_wakes: AtomicU64,
    /// Append → handed to the socket, recorded once per completed send range.
    pub delivery_latency: LatencyHistogram,
    /// Failed attempts to append an event (a full disk, an I/O error); each is retried.
    pub append_errors: AtomicU64,
    /// Failed syncs of the logs and index to disk.
    pub sync_errors: AtomicU64,
}

/// The statuses the listener refuses handshakes with, each counted on its own so that the
/// metrics can name the reason without a lock or a map on the refusal path.
pub const REFUSAL_STATUSES: [u16; 10] = [400, 404, 405, 408, 426, 429, 431, 500, 503, 505];

impl Counters {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    /// Counts one refused handshake under its HTTP status.
    pub fn refused(&self, status: u16) {
        Counters::add(&self.handshakes_refused, 1);
        let i = REFUSAL_STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(REFUSAL_STATUSES.len());
        Counters::add(&self.refused_by_status[i], 1);
    }

    /// Counts one skipped upstream message under its reason.
    pub fn upstream_skip(&self, reason: SkipReason) {
        Counters::add(&self.upstream_skipped, 1);
        if let Some(i) = SkipReason::ALL.iter().position(|r| *r == reason) {
            Counters::add(&self.upstream_skipped_by[i], 1);
        }
    }
}

/// What kind of filter a client subscribed with, as a small closed set so it can label metrics
/// and logs without unbounded cardinality (the filters themselves never become labels). Not to
/// be confused with [`crate::shapes::Shape`], one pre-filtered log per exact filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeClass {
    /// Everything (no collection or DID filter).
    All,
    /// A `wantedCollections` filter only.
    Collections,
    /// A `wantedDids` filter only.
    Dids,
    /// Both filters.
    CollectionsAndDids,
}

impl ShapeClass {
    /// Shape classes × encodings.
    pub const COUNT: usize = 4 * ENCODINGS;
    /// Every shape, in index order.
    pub const ALL: [ShapeClass; 4] = [
        ShapeClass::All,
        ShapeClass::Collections,
        ShapeClass::Dids,
        ShapeClass::CollectionsAndDids,
    ];

    /// The shape of a subscription. A `requireHello` client is classified by its options at
    /// connect time (it usually has none yet, so it counts as `all`).
    pub fn of(options: &crate::subscription::SubscriberOptions) -> ShapeClass {
        match (
            options.wanted_collections.is_empty(),
            options.wanted_dids.is_empty(),
        ) {
            (true, true) => ShapeClass::All,
            (false, true) => ShapeClass::Collections,
            (true, false) => ShapeClass::Dids,
            (false, false) => ShapeClass::CollectionsAndDids,
        }
    }

    /// Stable lower-case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ShapeClass::All => "all",
            ShapeClass::Collections => "collections",
            ShapeClass::Dids => "dids",
            ShapeClass::CollectionsAndDids => "collections_dids",
        }
    }

    /// Slot in [`Counters::clients_by_shape`] for this shape and encoding.
    pub fn index(self, encoding: Encoding) -> usize {
        self as usize * ENCODINGS + encoding.index()
    }
}

impl std::fmt::Display for ShapeClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Buckets of [`LatencyHistogram`]: upper bounds 1 µs · 2^k for k in 0..LATENCY_BUCKETS-1, then
/// +Inf. Why powers of two: the bucket is one `leading_zeros` away (no search on the record
/// path), and 2^24 µs ≈ 17 s covers everything from a live send to a stalled client.
pub const LATENCY_BUCKETS: usize = 26;

/// A lock-free fixed-bucket histogram of microsecond durations: one Relaxed add per bucket
/// hit plus one for the sum, cheap enough for the fan-out workers to record every completed
/// send. Readers see each bucket's count exactly; across buckets a snapshot may be a few
/// records apart, which is harmless for metrics.
#[derive(Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS],
    /// Sum of all observations, in µs.
    sum_us: AtomicU64,
}

/// A point-in-time copy of a [`LatencyHistogram`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Observations per bucket (not cumulative).
    pub counts: [u64; LATENCY_BUCKETS],
    /// Sum of all observations, in µs.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, us: u64) {
        // Smallest k with us <= 2^k: the bit length of us - 1.
        let k = (u64::BITS - us.saturating_sub(1).leading_zeros()) as usize;
        self.buckets[k.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Upper bound (µs, inclusive) of bucket `i`; None for the last (+Inf) bucket.
    pub fn upper_bound_us(i: usize) -> Option<u64> {
        (i < LATENCY_BUCKETS - 1).then(|| 1u64 << i)
    }

    /// Copies the counts.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl LatencySnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Where a seq cursor starts (see [`Hub::resolve_seq`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStart {
    /// At this event (inclusive).
    At(EventPos),
    /// Below what is retained: the oldest retained event is at `oldest` with seq `oldest_seq`
    /// (`/subscribe` clamps there silently; `subscribeEvents` answers `CursorTooOld`).
    TooOld { oldest: EventPos, oldest_seq: u64 },
    /// At or past the next seq to be assigned: live. `future` when strictly past it
    /// (`subscribeEvents` says `FutureCursor`), with that next seq.
    Live {
        end: EventPos,
        future: bool,
        next_seq: u64,
    },
}

/// Shared state.
pub struct Hub {
    /// The base logs, by [`Encoding::index`]: every event's frames in every encoding.
    streams: [Arc<Stream>; ENCODINGS],
    /// The index, behind a lock: the writer holds it for microseconds per append. Its place
    /// in the global lock order ([`crate::lock_order`]): after the shapes registry, before any
    /// shape's table.
    index: OrderedRwLock<EventIndex>,
    /// Set on SIGTERM/SIGINT: everyone winds down.
    pub shutdown: AtomicBool,
    /// Metrics.
    pub counters: Counters,
    /// Abuse controls; workers release a client's count when it leaves.
    pub limits: crate::limits::Limits,
    /// The index's next sequence number when the relay started: with `events_appended` it
    /// gives the sequence number after the newest appended event without taking the index
    /// lock (see [`Hub::appended_seq`]).
    seq_base: u64,
    /// Shared pre-filtered logs.
    pub shapes: crate::shapes::Shapes,
    /// The relay's critical threads and whether each makes progress.
    pub liveness: Arc<crate::liveness::Liveness>,
    /// Appends and syncs failing (a full disk), for readiness.
    pub storage: crate::writer::StorageHealth,
    /// Memory budget for clients' filter state: the listener charges a client's filters at
    /// its handshake, workers its `options_update`s (see [`crate::filter_budget`]).
    pub filter_budget: Arc<crate::filter_budget::FilterBudget>,
}

impl Hub {
    /// Builds the hub from recovered parts.
    pub fn new(
        streams: [Stream; ENCODINGS],
        index: EventIndex,
        limits: crate::limits::Limits,
        shapes: crate::shapes::Shapes,
        filter_budget: Arc<crate::filter_budget::FilterBudget>,
    ) -> Hub {
        Hub {
            streams: streams.map(Arc::new),
            seq_base: index.next_seq(),
            index: OrderedRwLock::new(Level::Index, index),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            limits,
            shapes,
            liveness: Arc::new(crate::liveness::Liveness::new(
                crate::liveness::DEFAULT_STUCK_AFTER,
            )),
            storage: crate::writer::StorageHealth::default(),
            filter_budget,
        }
    }

    /// Read access to the index (a poisoned lock means a writer panicked mid-append; the data
    /// it guards is still consistent at chunk granularity, so keep serving).
    /// Lock order: never while holding the index or a shape table; the shapes registry may
    /// be held (see [`crate::lock_order`]).
    pub fn index(&self) -> ReadGuard<'_, EventIndex> {
        self.index.read()
    }

    /// Write access to the index (same order as [`Hub::index`]).
    pub fn index_mut(&self) -> WriteGuard<'_, EventIndex> {
        self.index.write()
    }

    /// The base stream of an encoding.
    pub fn base(&self, enc: Encoding) -> &Arc<Stream> {
        &self.streams[enc.index()]
    }

    /// Every base stream, by [`Encoding::index`].
    pub fn bases(&self) -> &[Arc<Stream>; ENCODINGS] {
        &self.streams
    }

    /// The v1 JSON log (the event as received, plus the relay's `cursor`): what filters and
    /// cursor lookups read an event's fields from.
    pub fn plain(&self) -> &Arc<Stream> {
        self.base(Encoding::V1Json)
    }

    /// Sequence number after the newest event whose index entry is written. It may trail the
    /// published log end by the event being appended, never lead it; it only grows.
    pub fn appended_seq(&self) -> u64 {
        self.seq_base + self.counters.events_appended.load(Ordering::Relaxed)
    }

    /// Whether shutdown was requested.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Resolves a µs cursor to the position of the first retained event with
    /// `time_us >= cursor` (in log order), or the live end. May read one chunk's frames from
    /// the plain log (see [`Hub::cursor_in_memory`]): not for the listener thread.
    pub fn resolve_cursor(&self, cursor: Option<i64>) -> EventPos {
        match self.cursor_in_memory(cursor) {
            CursorLookup::Ready(pos) => pos,
            CursorLookup::NeedsScan(scan) => self.finish_cursor_scan(scan),
        }
    }

    /// Resolves a seq cursor (inclusive: the event with that seq, or the first after it).
    /// O(log n) and exact whatever `time_us` does.
    pub fn resolve_seq(&self, seq: u64) -> SeqStart {
        let index = self.index();
        let next = index.next_seq();
        let next_seq = index.seqs.seq_of(next);
        if seq >= next_seq {
            return SeqStart::Live {
                end: index.end_pos(),
                future: seq > next_seq,
                next_seq,
            };
        }
        let first = index.first_seq();
        let at = index.seqs.pos_of(seq);
        let pos = if at < first {
            index.start_pos()
        } else {
            index.pos_of(at)
        };
        // Events retention is kicking readers off are as good as gone: a seq among them is
        // too old (named by the first event a client can really get), never a silent skip.
        let servable = self.clamp_to_kicks(pos, &index);
        if at < first || servable != pos {
            return SeqStart::TooOld {
                oldest: servable,
                oldest_seq: index.seqs.seq_of(servable.seq),
            };
        }
        SeqStart::At(pos)
    }

    /// The seq of the event at index position `pos`.
    pub fn seq_of(&self, pos: u64) -> u64 {
        self.index().seqs.seq_of(pos)
    }

    /// Resolves a µs cursor from memory alone, in O(log n) (the listener's path): ready,
    /// unless it lands in a chunk recovered from disk whose per-event times are not in memory;
    /// then [`Hub::finish_cursor_scan`] reads that chunk's frames (off the listener thread).
    pub fn cursor_in_memory(&self, cursor: Option<i64>) -> CursorLookup {
        let index = self.index();
        let Some(cursor) = cursor else {
            return CursorLookup::Ready(self.clamp_to_kicks(index.end_pos(), &index));
        };
        // A cursor in the future is live (official semantics) — in the future of the upstream
        // clock that stamped the events, never the relay's own: that is exactly a cursor past
        // the running maximum of the indexed times, where no chunk is found (Live below).
        let start = index.start_pos();
        let pos = match index.cursor_start(cursor) {
            CursorStart::Live => index.end_pos(),
            CursorStart::At(pos) => pos.max_seq(start),
            CursorStart::Scan(chunk, _) if chunk.seq < start.seq => start,
            CursorStart::Scan(chunk, entries) => {
                return CursorLookup::NeedsScan(CursorScan {
                    cursor,
                    chunk,
                    entries,
                });
            }
        };
        CursorLookup::Ready(self.clamp_to_kicks(pos, &index))
    }

    /// Retention may be about to drop the start of what is retained (it is kicking the
    /// readers there): new clients start past that point rather than be refused. Takes the
    /// caller's index guard (lock order: the index is never taken twice by one thread).
    fn clamp_to_kicks(&self, pos: EventPos, index: &EventIndex) -> EventPos {
        let kicks: [u64; ENCODINGS] = std::array::from_fn(|i| self.streams[i].kick_below());
        if (0..ENCODINGS).all(|i| pos.offs[i] >= kicks[i]) {
            return pos;
        }
        index.first_pos_at_or_after(kicks)
    }

    /// Finishes a cursor lookup that needs a scan: reads the chunk's frames from the plain
    /// log (blocking disk I/O) and returns the first event with `time_us >= cursor`.
    pub fn finish_cursor_scan(&self, scan: CursorScan) -> EventPos {
        let pos = self.scan_chunk(scan);
        let index = self.index();
        self.clamp_to_kicks(pos.max_seq(index.start_pos()), &index)
    }

    fn scan_chunk(&self, scan: CursorScan) -> EventPos {
        let CursorScan {
            cursor,
            chunk: mut pos,
            entries,
        } = scan;
        let plain = Encoding::V1Json;
        let total: u64 = entries.iter().map(|e| e.frame_len(plain)).sum();
        let mut buf = vec![0u8; total as usize];
        if std::os::unix::fs::FileExt::read_exact_at(
            self.plain().file(),
            &mut buf,
            pos.offset(plain),
        )
        .is_err()
        {
            return pos;
        }
        let mut off = 0usize;
        for e in &entries {
            // A `#sync` event has no v1 frame (its time is the next event's, for this scan).
            let len = e.frame_len(plain) as usize;
            let frame = &buf[off..off + len];
            let payload = &frame[stored_header_len(frame).min(frame.len())..];
            if len > 0 && crate::event::scan_time_us(payload).is_some_and(|t| t >= cursor) {
                return pos;
            }
            off += len;
            pos = pos.after(e);
        }
        pos
    }
}

/// Outcome of [`Hub::cursor_in_memory`].
#[derive(Debug)]
pub enum CursorLookup {
    /// The start position.
    Ready(EventPos),
    /// A chunk's frames must be read to finish it ([`Hub::finish_cursor_scan`]).
    NeedsScan(CursorScan),
}

impl CursorLookup {
    /// A position to hold until the lookup completes (the start when ready).
    pub fn placeholder(&self) -> EventPos {
        match self {
            CursorLookup::Ready(pos) => *pos,
            CursorLookup::NeedsScan(scan) => scan.chunk,
        }
    }
}

/// A cursor lookup waiting for a scan of one chunk recovered from disk.
#[derive(Debug)]
pub struct CursorScan {
    /// The cursor.
    cursor: i64,
    /// The chunk's first event.
    chunk: EventPos,
    /// The chunk's events (at most [`crate::index::CHUNK_EVENTS`]).
    entries: Vec<EventEntry>,
}

/// Header length of a frame the writer stored (unmasked, so 2, 4 or 10 bytes).
pub fn stored_header_len(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// Payload length of a stored frame of `frame_len` bytes (inverse of the header length rule).
pub fn stored_payload_len(frame_len: u64) -> u64 {
    if frame_len <= 127 {
        frame_len - 2
    } else if frame_len <= 65_535 + 4 {
        frame_len - 4
    } else {
        frame_len - 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        let h = LatencyHistogram::default();
        for us in [0, 1, 2, 3, 4, 5, 1000, 1024, 1025, u64::MAX / 2] {
            h.record(us);
        }
        let s = h.snapshot();
        // 0 and 1 → le 1; 2 → le 2; 3, 4 → le 4; 5 → le 8; 1000, 1024 → le 1024;
        // 1025 → le 2048; huge → +Inf.
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[2], 2);
        assert_eq!(s.counts[3], 1);
        assert_eq!(s.counts[10], 2);
        assert_eq!(s.counts[11], 1);
        assert_eq!(s.counts[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.count(), 10);
        assert_eq!(LatencyHistogram::upper_bound_us(10), Some(1024));
        assert_eq!(LatencyHistogram::upper_bound_us(LATENCY_BUCKETS - 1), None);
        assert_eq!(
            s.sum_us,
            1 + 2 + 3 + 4 + 5 + 1000 + 1024 + 1025 + u64::MAX / 2
        );
    }

    #[test]
    fn shape_slots_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for shape in ShapeClass::ALL {
            for enc in Encoding::ALL {
                let i = shape.index(enc);
                assert!(i < ShapeClass::COUNT);
                assert!(seen.insert(i), "{shape} {enc} collides");
            }
        }
        assert_eq!(seen.len(), ShapeClass::COUNT);
    }

    #[test]
    fn refusals_count_by_status() {
        let c = Counters::default();
        c.refused(429);
        c.refused(429);
        c.refused(418);
        assert_eq!(c.handshakes_refused.load(Ordering::Relaxed), 3);
        let i429 = REFUSAL_STATUSES.iter().position(|s| *s == 429).unwrap();
        assert_eq!(c.refused_by_status[i429].load(Ordering::Relaxed), 2);
        assert_eq!(
            c.refused_by_status[REFUSAL_STATUSES.len()].load(Ordering::Relaxed),
            1
        );
    }
}
