//! The hub: state shared by the writer, the fan-out workers, the listener and retention —
//! the two base logs, the event index, and the counters everyone bumps.
//!
//! Two base streams are written for every event: `plain` (text frames, the JSON as received)
//! and `zstd` (binary frames, each event compressed once with the official dictionary), so a
//! compressed client is served from the page cache exactly like a plain one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::index::{EventIndex, EventPos};
use crate::log::Stream;

/// Counters for the metrics endpoint. Each is bumped where the work already happens, with a
/// Relaxed add, never per event per client.
#[derive(Default)]
pub struct Counters {
    /// Upstream events appended.
    pub events_appended: AtomicU64,
    /// Upstream messages skipped (malformed, duplicate, ...).
    pub upstream_skipped: AtomicU64,
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
    /// Clients connected right now.
    pub clients: AtomicU64,
    /// Clients accepted (upgraded) in total.
    pub clients_accepted: AtomicU64,
    /// Handshakes refused in total.
    pub handshakes_refused: AtomicU64,
    /// Clients disconnected because they fell behind retention.
    pub kicked_retention: AtomicU64,
    /// Clients disconnected for other protocol reasons (dead, violations).
    pub kicked_other: AtomicU64,
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
}

impl Counters {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Shared state.
pub struct Hub {
    /// Text frames of every event.
    pub plain: Arc<Stream>,
    /// zstd binary frames of every event.
    pub zstd: Arc<Stream>,
    /// The index, behind a lock: the writer holds it for microseconds per append.
    index: RwLock<EventIndex>,
    /// Set on SIGTERM/SIGINT: everyone winds down.
    pub shutdown: AtomicBool,
    /// Metrics.
    pub counters: Counters,
    /// Abuse controls; workers release a client's count when it leaves.
    pub limits: crate::limits::Limits,
    /// Shared pre-filtered logs.
    pub shapes: crate::shapes::Shapes,
}

impl Hub {
    /// Builds the hub from recovered parts.
    pub fn new(
        plain: Stream,
        zstd: Stream,
        index: EventIndex,
        limits: crate::limits::Limits,
        shapes: crate::shapes::Shapes,
    ) -> Hub {
        Hub {
            plain: Arc::new(plain),
            zstd: Arc::new(zstd),
            index: RwLock::new(index),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            limits,
            shapes,
        }
    }

    /// Read access to the index (a poisoned lock means a writer panicked mid-append; the data
    /// it guards is still consistent at chunk granularity, so keep serving).
    pub fn index(&self) -> RwLockReadGuard<'_, EventIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Write access to the index.
    pub fn index_mut(&self) -> RwLockWriteGuard<'_, EventIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The base stream for a client's encoding.
    pub fn base(&self, compressed: bool) -> &Arc<Stream> {
        if compressed { &self.zstd } else { &self.plain }
    }

    /// Whether shutdown was requested.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Resolves a cursor to the position of the first retained event with `time_us >= cursor`
    /// (in log order), or the live end. Scans at most one chunk's frames from the plain log.
    pub fn resolve_cursor(&self, cursor: Option<i64>) -> EventPos {
        let pos = self.resolve_cursor_unclamped(cursor);
        // Retention may be about to drop the start of what is retained (it is kicking the
        // readers there): start new clients past that point rather than refuse them.
        let (kp, kz) = (self.plain.kick_below(), self.zstd.kick_below());
        if pos.plain_off >= kp && pos.zstd_off >= kz {
            return pos;
        }
        self.index().first_pos_at_or_after(kp, kz)
    }

    fn resolve_cursor_unclamped(&self, cursor: Option<i64>) -> EventPos {
        let index = self.index();
        let Some(cursor) = cursor else {
            return index.end_pos();
        };
        // A cursor in the future is live (official semantics).
        if cursor > crate::index::now_us() {
            return index.end_pos();
        }
        let Some((mut pos, entries)) = index.cursor_chunk(cursor) else {
            return index.end_pos();
        };
        let start = index.start_pos();
        drop(index);
        if pos.seq < start.seq {
            return start;
        }
        let total: u64 = entries.iter().map(|e| e.plain_len as u64).sum();
        let mut buf = vec![0u8; total as usize];
        if std::os::unix::fs::FileExt::read_exact_at(self.plain.file(), &mut buf, pos.plain_off)
            .is_err()
        {
            return pos;
        }
        let mut off = 0usize;
        for e in &entries {
            let frame = &buf[off..off + e.plain_len as usize];
            let payload = &frame[stored_header_len(frame).min(frame.len())..];
            if crate::event::scan_time_us(payload).is_some_and(|t| t >= cursor) {
                return pos;
            }
            off += e.plain_len as usize;
            pos.seq += 1;
            pos.plain_off += e.plain_len as u64;
            pos.zstd_off += e.zstd_len as u64;
        }
        pos
    }
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
