//! The event writer and retention.
//!
//! The writer is the upstream follower's sink: for every accepted event it reserves the
//! event's seq and builds the four frames clients will receive, once for everyone (see
//! [`Encoding`]): the v1 JSON with the relay's `cursor` (a text frame), that JSON compressed
//! with the v1 dictionary (binary), the v2 message (text), and that message compressed with
//! the v2 dictionary (binary); it appends them to the four base logs and the matching shapes,
//! publishes them, records the event in the index and wakes the fan-out workers. Nothing else
//! ever touches a payload.
//!
//! An append is two phases. First every write that can fail, in an order whose every prefix
//! recovery repairs (`relay::recover`): the four frames, the shapes' frames, a new collection's
//! line, the index record and, when the event completes a chunk, the chunk header. Nothing is
//! visible to readers yet, so a write that fails — a full disk, an I/O error — leaves nothing
//! half-published: the writer waits and retries the whole event at the same offsets until it
//! succeeds (`/readyz` says why meanwhile, a metric counts the failures). An event that cannot
//! be encoded is never retried: it is refused before any write ([`UnconvertibleEvent`]) and
//! the follower skips it. Then the publish, which cannot fail: ring copies, log ends, shape
//! tables, the index entry in memory.
//!
//! Retention runs on its own thread: once a second it drops whole index chunks that are older
//! than the retention age or that push the logs over the disk cap, after the readers still
//! positioned there have been kicked (with a close frame) by their workers; then it syncs the
//! logs and the index to disk and records how far they are durable — until a sync fails, which
//! ends the process (see [`retention_loop`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::compress::{Dictionary, EventCompressor};
use crate::encoding::{ENCODINGS, Encoding};
use crate::event::{EventKind, did_hash};
use crate::fanout::Waker;
use crate::frame::{MAX_HEADER_LEN, Opcode, write_server_header};
use crate::hub::{Counters, Hub};
use crate::index::{COLLECTION_NONE, EventEntry, kind_code, now_us};
use crate::upstream::{ConnectionState, EventSink, Incoming, SkipReason, UnconvertibleEvent};

/// First wait before retrying a failed append. Why 50 ms: a transient error clears fast.
const APPEND_RETRY_MIN: Duration = Duration::from_millis(50);
/// Longest wait between append retries. Why 2 s: once space returns (retention punched, an
/// operator freed some), ingestion resumes within that; an attempt costs a few failed writes.
const APPEND_RETRY_MAX: Duration = Duration::from_secs(2);
/// At most one warning per this interval while appends keep failing (the first failure and the
/// recovery are always logged).
const APPEND_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Appends failing right now.
#[derive(Clone, Debug)]
struct AppendFailure {
    /// When the first attempt of the current event failed.
    since: Instant,
    /// The latest error.
    error: String,
    /// Failed attempts so far.
    attempts: u64,
    /// When a warning was last logged.
    logged: Instant,
}

/// How storage is doing, for `/readyz` and the status line: appends failing (a full disk) and
/// the last failed sync.
#[derive(Default)]
pub struct StorageHealth {
    /// Set while an event cannot be appended (it is being retried).
    append_failure: Mutex<Option<AppendFailure>>,
    /// The first failed `fdatasync` of a log or index file in this process: when, and what.
    /// Never cleared: after a writeback error the kernel may not report it twice, so a later
    /// successful sync proves nothing about the data before it (see [`sync_logs`]).
    sync_failure: Mutex<Option<(Instant, String)>>,
}

impl StorageHealth {
    fn append_failure(&self) -> MutexGuard<'_, Option<AppendFailure>> {
        self.append_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn sync_failure(&self) -> MutexGuard<'_, Option<(Instant, String)>> {
        self.sync_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether appends are failing right now.
    pub fn appends_failing(&self) -> bool {
        self.append_failure().is_some()
    }

    /// Why storage makes the relay unready, if it does.
    pub fn problem(&self) -> Option<String> {
        if let Some(f) = &*self.append_failure() {
            return Some(format!(
                "log appends failing for {}s ({} attempts, retrying): {}",
                f.since.elapsed().as_secs(),
                f.attempts,
                f.error
            ));
        }
        self.sync_failure().as_ref().map(|(at, error)| {
            format!(
                "log sync to disk failed {}s ago, the durable mark no longer moves: {error}",
                at.elapsed().as_secs()
            )
        })
    }

    fn append_failed(&self, error: &anyhow::Error) {
        let mut failure = self.append_failure();
        let error = format!("{error:#}");
        match failure.as_mut() {
            None => {
                tracing::error!(
                    %error,
                    "log append failed; retrying until it succeeds (nothing was published, \
                     nothing is skipped)"
                );
                *failure = Some(AppendFailure {
                    since: Instant::now(),
                    error,
                    attempts: 1,
                    logged: Instant::now(),
                });
            }
            Some(f) => {
                f.attempts += 1;
                f.error = error;
                if f.logged.elapsed() >= APPEND_LOG_INTERVAL {
                    f.logged = Instant::now();
                    tracing::warn!(
                        error = %f.error,
                        attempts = f.attempts,
                        failing_for_s = f.since.elapsed().as_secs(),
                        "log appends still failing"
                    );
                }
            }
        }
    }

    fn append_succeeded(&self) {
        let mut failure = self.append_failure();
        if let Some(f) = failure.take() {
            tracing::info!(
                failed_attempts = f.attempts,
                failing_for_ms = f.since.elapsed().as_millis() as u64,
                "log appends resumed"
            );
        }
    }

    fn sync_failed(&self, error: &std::io::Error) {
        self.sync_failure()
            .get_or_insert_with(|| (Instant::now(), error.to_string()));
    }

    /// Whether a sync failed in this process.
    pub fn sync_ever_failed(&self) -> bool {
        self.sync_failure().is_some()
    }
}

/// How the writer encodes events.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Whether `/subscribe` frames carry the relay's seq as a top-level `cursor` (as the
    /// official server's do). Off for fleets with v1 clients that refuse unknown fields.
    pub v1_cursor_field: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            v1_cursor_field: true,
        }
    }
}

/// Appends upstream events to the logs.
pub struct LogWriter {
    /// Shared state.
    hub: Arc<Hub>,
    /// How events are encoded.
    options: WriterOptions,
    /// zstd compressor with the v1 dictionary loaded once.
    v1_compressor: EventCompressor,
    /// zstd compressor with the v2 dictionary loaded once.
    v2_compressor: EventCompressor,
    /// Scratch: each encoding's payload (by [`Encoding::index`]; empty = no frame).
    payloads: [Vec<u8>; ENCODINGS],
    /// Scratch: each encoding's frame.
    frames: [Vec<u8>; ENCODINGS],
    /// Scratch: the shapes an event was written to (index in the registry, frame).
    shape_frames: Vec<(usize, crate::shapes::UnpublishedFrame)>,
    /// `upstream.url`, the URL half of the restart checkpoint (`None`: not recorded, e.g. an
    /// in-memory test writer).
    url_file: Option<crate::upstream::UrlFile>,
    /// The configured upstream URL of the current session (from
    /// [`ConnectionState::Connected`]); recorded before its first event is appended.
    session_upstream: Option<String>,
    /// Workers to wake after each publish.
    wakers: Vec<Arc<Waker>>,
}

impl LogWriter {
    /// A writer appending at the hub's current end.
    pub fn new(
        hub: Arc<Hub>,
        wakers: Vec<Arc<Waker>>,
        options: WriterOptions,
    ) -> anyhow::Result<LogWriter> {
        Ok(LogWriter {
            hub,
            options,
            v1_compressor: EventCompressor::new()?,
            v2_compressor: EventCompressor::with_dictionary(Dictionary::V2)?,
            payloads: std::array::from_fn(|_| Vec::with_capacity(64 * 1024)),
            frames: std::array::from_fn(|_| Vec::with_capacity(64 * 1024)),
            shape_frames: Vec::new(),
            url_file: None,
            session_upstream: None,
            wakers,
        })
    }

    /// Records each session's upstream URL in `file` before the session's first event is
    /// appended (see [`crate::upstream::checkpoint`]).
    pub fn with_url_file(mut self, file: crate::upstream::UrlFile) -> LogWriter {
        self.url_file = Some(file);
        self
    }

    /// Makes `upstream.url` name the current session's upstream (no write when it does).
    fn record_session_url(&mut self) -> anyhow::Result<()> {
        if let (Some(file), Some(url)) = (&mut self.url_file, &self.session_upstream) {
            file.record(url)
                .map_err(|e| anyhow::anyhow!("recording the upstream URL: {e}"))?;
        }
        Ok(())
    }

    /// Builds the event's four payloads and frames for the relay's `seq`. A `#sync` event has
    /// no v1 form: its v1 payloads stay empty (no frame in the v1 logs).
    fn encode(&mut self, ev: &Incoming<'_>, seq: u64) -> anyhow::Result<()> {
        let [v1, v1z, v2, v2z] = &mut self.payloads;
        for p in [&mut *v1, &mut *v1z, &mut *v2, &mut *v2z] {
            p.clear();
        }
        // Witnessed by the upstream instance when its wire says; a legacy v1 instance's
        // `time_us` is the time it received the event.
        let witnessed_us = ev.witnessed_us.unwrap_or(ev.meta.time_us);
        if ev.meta.kind == EventKind::Sync {
            let parts = ev
                .sync
                .ok_or_else(|| anyhow::anyhow!("a #sync event without its parts"))?;
            parts.render_v2(seq, witnessed_us, v2)?;
        } else {
            if self.options.v1_cursor_field {
                crate::wire::with_cursor(ev.v1_json, seq, v1)?;
            } else {
                v1.extend_from_slice(ev.v1_json);
            }
            self.v1_compressor.compress(v1, v1z)?;
            crate::wire::v1_to_v2(ev.v1_json, seq, witnessed_us, v2)?;
        }
        self.v2_compressor.compress(v2, v2z)?;
        for enc in Encoding::ALL {
            let (payload, frame) = (&self.payloads[enc.index()], &mut self.frames[enc.index()]);
            if payload.is_empty() {
                frame.clear();
            } else {
                frame_into(enc.opcode(), payload, frame);
            }
        }
        Ok(())
    }

    /// Appends one validated event (see the module documentation): on error nothing was
    /// published and the same event may be appended again. `ev.meta.time_us` is the event's
    /// indexed time. An event that cannot be encoded fails with an [`UnconvertibleEvent`]
    /// before anything is written (only its seq reserved, which the next event reuses).
    pub fn append_event(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()> {
        let meta = &ev.meta;
        // The writer is the only appender: the next position is stable until it appends. Its
        // seq is reserved (durably) before anything can publish it.
        let pos = self.hub.index().next_seq();
        let seq = self.hub.index_mut().seqs.reserve(pos)?;
        self.encode(ev, seq)
            .map_err(|e| UnconvertibleEvent(format!("{e:#}")))?;

        let hub = &self.hub;
        // Phase 1: every write that can fail, nothing visible.
        let mut ends: [u64; ENCODINGS] = std::array::from_fn(|i| hub.bases()[i].end());
        for enc in Encoding::ALL {
            let frame = &self.frames[enc.index()];
            if !frame.is_empty() {
                hub.base(enc).append(frame, &mut ends[enc.index()])?;
            }
        }
        // The shapes' registry is read-locked until the index entry exists, so that a shape
        // created concurrently starts exactly at an event boundary.
        let shapes = hub.shapes.lock();
        self.shape_frames.clear();
        let payload_lens: [usize; ENCODINGS] = std::array::from_fn(|i| self.payloads[i].len());
        for (i, shape) in shapes.iter().enumerate() {
            let frame = &self.frames[shape.key.encoding.index()];
            if !frame.is_empty() && shape.wants(meta, &payload_lens) {
                let written = crate::shapes::write_frame(shape, frame)?;
                self.shape_frames.push((i, written));
            }
        }
        let collection = match &meta.collection {
            Some(c) => {
                let known = hub.index().collections.id_of(c);
                match known {
                    Some(id) => id,
                    None => hub.index_mut().collections.intern(c)?,
                }
            }
            None => COLLECTION_NONE,
        };
        let entry = EventEntry {
            lens: std::array::from_fn(|i| self.frames[i].len() as u32),
            did_hash: did_hash(&meta.did),
            collection,
            kind: kind_code(meta.kind),
            flags: 0,
            upstream_seq: ev.upstream_seq.unwrap_or(0),
        };
        let appended_at = now_us();
        hub.index()
            .write_record(&entry, meta.time_us, appended_at)?;

        // Phase 2: publish. The bytes before the index entry: a filtered reader finds events
        // through the index and must never be pointed at bytes that are not visible yet.
        for (stream, end) in hub.bases().iter().zip(ends) {
            stream.publish(end);
        }
        for (i, written) in self.shape_frames.drain(..) {
            crate::shapes::publish_frame(&shapes[i], pos, written);
        }
        hub.index_mut().push(entry, meta.time_us, appended_at);
        drop(shapes);

        let c = &hub.counters;
        Counters::add(&c.events_appended, 1);
        let appended_us = now_us() as u64;
        c.last_append_us.store(appended_us, Ordering::Relaxed);
        c.newest_time_us
            .fetch_max(meta.time_us.max(0) as u64, Ordering::Relaxed);
        for w in &self.wakers {
            w.wake(appended_us);
        }
        Ok(())
    }
}

/// Writes a complete server frame (header + payload) into `out`.
fn frame_into(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = write_server_header(opcode, payload.len() as u64, &mut header);
    out.clear();
    out.extend_from_slice(&header[..n]);
    out.extend_from_slice(payload);
}

impl EventSink for LogWriter {
    /// Appends the event, retrying with backoff while appends fail (a full disk): the follower
    /// waits here, and resumes reading (or reconnects from the last appended event) once the
    /// event is in. Gives up only when the relay shuts down, or at once on an event it cannot
    /// encode ([`UnconvertibleEvent`]): retrying that would fail forever and, since the
    /// upstream re-delivers it after a restart, stop ingestion for good. Every other error is
    /// a write to disk (the URL file, a log, the index), retried.
    fn append(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()> {
        let mut delay = APPEND_RETRY_MIN;
        loop {
            // The URL first: the newest event's upstream seq must never be paired with a URL
            // older than the session that delivered it.
            match self
                .record_session_url()
                .and_then(|()| self.append_event(ev))
            {
                Ok(()) => {
                    self.hub.storage.append_succeeded();
                    return Ok(());
                }
                Err(e) if e.is::<UnconvertibleEvent>() => return Err(e),
                Err(e) => {
                    if self.hub.shutting_down() {
                        return Err(e.context("shutting down while log appends fail"));
                    }
                    Counters::add(&self.hub.counters.append_errors, 1);
                    self.hub.storage.append_failed(&e);
                    let _idle = crate::liveness::idle("waiting for log appends to succeed");
                    let until = Instant::now() + delay;
                    while Instant::now() < until && !self.hub.shutting_down() {
                        std::thread::sleep(Duration::from_millis(20).min(delay));
                    }
                    delay = (delay * 2).min(APPEND_RETRY_MAX);
                }
            }
        }
    }

    fn skipped(&mut self, reason: SkipReason, detail: &str) {
        self.hub.counters.upstream_skip(reason);
        tracing::debug!(reason = reason.as_str(), detail, "upstream message skipped");
    }

    fn connection(&mut self, state: ConnectionState) {
        let c = &self.hub.counters;
        match state {
            ConnectionState::Connected { url, upstream } => {
                self.session_upstream = Some(upstream);
                c.upstream_connected.store(1, Ordering::Relaxed);
                Counters::add(&c.upstream_reconnects, 1);
                tracing::info!(%url, "upstream connected");
            }
            ConnectionState::Disconnected { url, reason } => {
                c.upstream_connected.store(0, Ordering::Relaxed);
                tracing::warn!(%url, %reason, "upstream disconnected");
            }
            ConnectionState::Reconnecting { attempt, delay } => {
                tracing::info!(attempt, ?delay, "upstream reconnecting");
            }
        }
    }
}

/// Retention policy (the shapes' own disk budget is in [`crate::shapes::ShapeLimits`]).
#[derive(Clone, Copy, Debug)]
pub struct RetentionPolicy {
    /// Events older than this (by append time) are dropped.
    pub max_age: Duration,
    /// Allocated bytes of the base logs + index above this are dropped, oldest first.
    pub max_disk: u64,
}

/// Drops what retention says can go; returns the chunks dropped. One pass; call periodically.
pub fn enforce_retention(hub: &Hub, policy: RetentionPolicy) -> std::io::Result<usize> {
    let mut dropped = 0;
    {
        let cutoff = now_us() - policy.max_age.as_micros() as i64;
        // Base logs and index only: shapes have their own budget and never shrink this one.
        let index = hub.index();
        let allocated = base_bytes(hub) + index.allocated_bytes();
        if let Some(target) =
            index.retention_target(cutoff, allocated.saturating_sub(policy.max_disk))
        {
            // Readers still below are kicked by their workers (close frame 1008).
            for (stream, off) in hub.bases().iter().zip(target) {
                stream.request_kick(off);
            }
        }
    }
    loop {
        // Dropping a long backlog (a shorter retention after a restart) takes a while.
        crate::liveness::beat();
        let now = now_us();
        let index = hub.index();
        let Some(oldest) = index.oldest_chunk() else {
            break;
        };
        let too_old = oldest.appended_at_us < now - policy.max_age.as_micros() as i64;
        let allocated = base_bytes(hub) + index.allocated_bytes();
        let too_big = allocated > policy.max_disk;
        if !(too_old || too_big) {
            break;
        }
        let next = oldest.end_offsets();
        drop(index);
        // Punch only once no reader is left below.
        if hub
            .bases()
            .iter()
            .zip(next)
            .any(|(stream, off)| stream.lowest_reader() < off)
        {
            break;
        }
        hub.index_mut().drop_oldest_chunk()?;
        crate::failpoint::crash_point("retention");
        let mut freed = 0;
        for (stream, off) in hub.bases().iter().zip(next) {
            freed += stream.punch_below(off)?;
        }
        Counters::add(&hub.counters.punches, 1);
        Counters::add(&hub.counters.punched_bytes, freed);
        dropped += 1;
    }
    // Shapes follow the base logs and stay within their own disk budget, trimmed on their own
    // (a shape whose readers are still being kicked catches up on a later pass). Lock order
    // (crate::lock_order): the index is released before the shapes are touched.
    let (first_seq, next_seq) = {
        let index = hub.index();
        (index.first_seq(), index.next_seq())
    };
    let cutoff = hub.shapes.budget_cutoff(first_seq, next_seq);
    let freed = hub.shapes.drop_before(cutoff)?;
    Counters::add(&hub.counters.punched_bytes, freed);
    if cutoff > first_seq {
        Counters::add(&hub.shapes.counters.trimmed_bytes, freed);
    }
    hub.shapes.retire_idle();
    Ok(dropped)
}

/// Bytes allocated on disk by the base logs.
fn base_bytes(hub: &Hub) -> u64 {
    hub.bases().iter().map(|s| s.allocated_bytes()).sum()
}

/// Syncs the base logs and the index files to disk, then records how far they are durable
/// (see [`crate::index::SyncHandles::mark_durable`]). The index lock is not held while syncing.
///
/// Once a sync failed, the mark never moves again in this process (this returns an error
/// instead): the kernel may report a writeback error only once and drop the pages it could
/// not write, so the next sync may succeed although data before it never reached the disk.
/// Recovery trusts everything before the mark, so that data must stay after it.
pub fn sync_logs(hub: &Hub) -> std::io::Result<()> {
    // Read first: every write of the events before it was issued before the syncs start.
    let durable = hub.appended_seq();
    let handles = sync_files(hub).inspect_err(|e| hub.storage.sync_failed(e))?;
    if hub.storage.sync_ever_failed() {
        return Err(std::io::Error::other(
            "a sync failed earlier in this process: the durable mark stays where it was",
        ));
    }
    handles
        .mark_durable(durable)
        .inspect_err(|e| hub.storage.sync_failed(e))
}

/// Syncs the base logs and the index files; returns the handles that mark them durable.
fn sync_files(hub: &Hub) -> std::io::Result<crate::index::SyncHandles> {
    let handles = hub.index().sync_handles()?;
    for stream in hub.bases() {
        stream.sync()?;
    }
    handles.sync()?;
    Ok(handles)
}

/// Runs retention and a sync once a second until `stop`. Retention errors are logged and the
/// loop goes on (the next pass retries); a failed sync ends the loop with an error, which ends
/// the process (status 70, see [`crate::liveness::spawn_critical`]).
///
/// Why exit on a failed sync: [`sync_logs`] never moves the durable mark again, so a process
/// that went on would leave an ever longer stretch that recovery must verify, and keep serving
/// data its disk may not have. Ending it at once bounds that stretch to the last second or so;
/// the service manager restarts the relay and recovery verifies every event past the mark frame
/// by frame, as after a crash. Simpler and safer than running on with storage in an unknown
/// state.
pub fn retention_loop(
    hub: Arc<Hub>,
    policy: RetentionPolicy,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    while !stop.load(Ordering::Relaxed) {
        crate::liveness::beat();
        match enforce_retention(&hub, policy) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(chunks = n, "retention dropped old events"),
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
        // Keep data durable at a bounded cost: one fdatasync per file per second.
        let synced = {
            let _idle = crate::liveness::idle("syncing the logs to disk");
            sync_logs(&hub)
        };
        if let Err(e) = synced {
            Counters::add(&hub.counters.sync_errors, 1);
            return Err(format!(
                "syncing the logs to disk failed: {e}; recent events may not survive a power \
                 loss, restart so that recovery verifies everything after the last durable mark"
            ));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_v1_event;

    const SAMPLE: &str = include_str!("../assets/jetstream-v1-sample.jsonl");

    /// A relay data directory opened the way the relay starts, and a writer on it.
    fn open(name: &str) -> (std::path::PathBuf, Arc<Hub>, LogWriter) {
        let dir = std::env::temp_dir().join(format!(
            "jetrelay-writer-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let settings = crate::config::RawSettings {
            data_dir: Some(dir.clone()),
            ..crate::config::RawSettings::default()
        }
        .validate()
        .unwrap();
        let (hub, _) = crate::relay::open_hub(&settings).unwrap();
        let writer = LogWriter::new(hub.clone(), Vec::new(), WriterOptions::default()).unwrap();
        (dir, hub, writer)
    }

    fn append(writer: &mut LogWriter, json: &str) -> anyhow::Result<()> {
        let (meta, _) = parse_v1_event(json.as_bytes()).unwrap();
        EventSink::append(writer, &Incoming::v1(json.as_bytes(), meta))
    }

    /// Ends any append still retrying after a while (shutdown makes it give up), so that a
    /// writer that retries what it cannot encode fails the test instead of hanging it.
    fn give_up_after(hub: &Arc<Hub>, after: Duration) -> std::thread::JoinHandle<()> {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + after;
            while Instant::now() < until && Arc::strong_count(&hub) > 1 {
                std::thread::sleep(Duration::from_millis(10));
            }
            hub.shutdown.store(true, Ordering::Relaxed);
        })
    }

    /// An event the writer cannot encode (here one the follower's decoder would have skipped
    /// already) is refused at once as an [`UnconvertibleEvent`], not retried as if the disk
    /// were full; what was appended before is untouched and the next event is appended.
    #[test]
    fn an_unencodable_event_is_refused_at_once_and_the_next_one_appended() {
        let (dir, hub, mut writer) = open("unencodable");
        let lines: Vec<&str> = SAMPLE.lines().take(3).collect();
        let time = parse_v1_event(lines[0].as_bytes()).unwrap().0.time_us;
        let poison = [
            lines[0].replace(&time.to_string(), "300000000000000000"),
            lines[0].replace(r#""time_us":"#, r#""\u0074ime_us":"#),
            lines[0].replace(r#""cid":"bafyreig"#, r#""cid":5,"x":"bafyreig"#),
        ];
        let watchdog = give_up_after(&hub, Duration::from_secs(10));
        append(&mut writer, lines[0]).unwrap();
        for (i, json) in poison.iter().enumerate() {
            let started = Instant::now();
            let e = append(&mut writer, json).expect_err(json);
            assert!(e.is::<UnconvertibleEvent>(), "{json}: {e:#}");
            assert!(started.elapsed() < APPEND_RETRY_MIN, "{json}: retried");
            append(&mut writer, lines[1 + i % 2]).unwrap();
        }
        let c = &hub.counters;
        assert_eq!(c.events_appended.load(Ordering::Relaxed), 4);
        assert_eq!(c.append_errors.load(Ordering::Relaxed), 0);
        assert_eq!(hub.storage.problem(), None);
        let first = hub.index().first_seq();
        assert_eq!(hub.index().next_seq() - first, 4);
        drop((writer, hub));
        watchdog.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The durable mark as `durable.idx` holds it.
    fn durable_mark(dir: &std::path::Path) -> u64 {
        let bytes = std::fs::read(dir.join("durable.idx")).unwrap();
        u64::from_le_bytes(bytes[..8].try_into().unwrap())
    }

    /// After one failed sync (simulated: what the retention loop records), a later sync that
    /// succeeds must not move the durable mark past the events whose writeback may have
    /// failed, for the rest of the process (the relay's final sync at shutdown included);
    /// `/readyz` says so, and the retention loop ends (which ends the process).
    #[test]
    fn after_a_failed_sync_the_durable_mark_never_moves() {
        let (dir, hub, mut writer) = open("sync-failure");
        let lines: Vec<&str> = SAMPLE.lines().take(5).collect();
        for line in &lines[..3] {
            append(&mut writer, line).unwrap();
        }
        sync_logs(&hub).unwrap();
        let mark = durable_mark(&dir);
        assert_eq!(mark, hub.appended_seq());

        hub.storage
            .sync_failed(&std::io::Error::other("Input/output error (simulated)"));
        for line in &lines[3..] {
            append(&mut writer, line).unwrap();
        }
        assert!(sync_logs(&hub).is_err());
        assert!(sync_logs(&hub).is_err());
        assert_eq!(
            durable_mark(&dir),
            mark,
            "the mark moved past a failed sync"
        );
        let problem = hub.storage.problem().unwrap_or_default();
        assert!(
            problem.contains("durable mark no longer moves"),
            "{problem}"
        );

        let stop = Arc::new(AtomicBool::new(false));
        let retention = {
            let (hub, stop) = (hub.clone(), stop.clone());
            std::thread::spawn(move || {
                let policy = RetentionPolicy {
                    max_age: Duration::from_secs(3600),
                    max_disk: u64::MAX,
                };
                retention_loop(hub, policy, stop)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !retention.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let ended = retention.join().unwrap();
        assert!(
            ended.is_err(),
            "the retention loop went on after a failed sync"
        );
        assert_eq!(durable_mark(&dir), mark);
        drop((writer, hub));
        std::fs::remove_dir_all(&dir).ok();
    }
}
