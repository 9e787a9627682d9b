//! The event index: for every retained event, where its frame is in each base log and what a
//! filter needs to know about it (DID hash, collection id, kind) — 16 bytes per event — grouped
//! in chunks of [`CHUNK_EVENTS`] whose headers carry the byte offsets, the running maximum of
//! `time_us` (for cursors) and the append time (for retention).
//!
//! Why a running maximum: `time_us` is not monotonic in real traffic, but its running maximum
//! is, and the first event whose `time_us >= C` is exactly the first event where the running
//! maximum reaches `C`. So a binary search over chunk maxima finds the chunk, and a scan of at
//! most one chunk's frames finds the event.
//!
//! Persistence (what makes a restart of a 10 GB log take seconds, not minutes):
//! - `events.idx`: record `seq` at byte `seq * 16` (punched with the log, a chunk per block);
//! - `chunks.idx`: record `chunk` at byte `chunk * 32`, written when a chunk completes;
//! - `collections.txt`: interned collection NSIDs, one per line, id = line number.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::event::EventKind;

/// Events per chunk. Why 256: 256 × 16-byte records = one 4 KiB block of `events.idx`, so a
/// dropped chunk is exactly one punched block; and a cursor lookup scans at most 256 frames.
pub const CHUNK_EVENTS: u64 = 256;

/// Bytes per persisted event record.
pub const ENTRY_BYTES: u64 = 16;
/// Bytes per persisted chunk record.
const CHUNK_RECORD_BYTES: u64 = 32;

/// Collection id for "not interned" (the table is full): filters must look at the JSON.
pub const COLLECTION_UNKNOWN: u16 = u16::MAX;
/// Collection id for events without a collection (identity, account).
pub const COLLECTION_NONE: u16 = u16::MAX - 1;
/// Why bounded: an upstream could invent collections without limit; ids are u16.
const MAX_COLLECTIONS: usize = (u16::MAX - 2) as usize;

/// One event's record. `repr(C)` and little-endian persisted as-is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventEntry {
    /// Frame length in the plain (text) log.
    pub plain_len: u32,
    /// Frame length in the zstd (binary) log.
    pub zstd_len: u32,
    /// `event::did_hash` of the DID: DID filters compare hashes, then confirm on the JSON.
    pub did_hash: u32,
    /// Interned collection id, [`COLLECTION_NONE`] or [`COLLECTION_UNKNOWN`].
    pub collection: u16,
    /// 0 commit, 1 identity, 2 account.
    pub kind: u8,
    /// Reserved (0).
    pub flags: u8,
}

impl EventEntry {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.plain_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.zstd_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.did_hash.to_le_bytes());
        b[12..14].copy_from_slice(&self.collection.to_le_bytes());
        b[14] = self.kind;
        b[15] = self.flags;
        b
    }

    fn from_bytes(b: &[u8]) -> EventEntry {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        EventEntry {
            plain_len: u32_at(0),
            zstd_len: u32_at(4),
            did_hash: u32_at(8),
            collection: u16::from_le_bytes([b[12], b[13]]),
            kind: b[14],
            flags: b[15],
        }
    }

    /// The event kind.
    pub fn kind(&self) -> EventKind {
        match self.kind {
            1 => EventKind::Identity,
            2 => EventKind::Account,
            _ => EventKind::Commit,
        }
    }

    /// Frame length in the chosen base log.
    pub fn frame_len(&self, compressed: bool) -> u64 {
        if compressed {
            self.zstd_len as u64
        } else {
            self.plain_len as u64
        }
    }
}

/// Encodes a kind for [`EventEntry::kind`].
pub fn kind_code(kind: EventKind) -> u8 {
    match kind {
        EventKind::Commit => 0,
        EventKind::Identity => 1,
        EventKind::Account => 2,
    }
}

/// A run of up to [`CHUNK_EVENTS`] consecutive events.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Sequence number of the first event (a multiple of `CHUNK_EVENTS`).
    pub first_seq: u64,
    /// Offset of the first event's frame in the plain log.
    pub plain_off: u64,
    /// Offset of the first event's frame in the zstd log.
    pub zstd_off: u64,
    /// Running maximum of `time_us` up to and including this chunk's last event.
    pub max_time_us: i64,
    /// Wall-clock time (µs) of the last append into this chunk: retention by age uses it.
    pub appended_at_us: i64,
    /// The events.
    pub entries: Vec<EventEntry>,
}

impl Chunk {
    /// Offsets just past this chunk's last frame.
    pub fn end_offsets(&self) -> (u64, u64) {
        self.entries
            .iter()
            .fold((self.plain_off, self.zstd_off), |(p, z), e| {
                (p + e.plain_len as u64, z + e.zstd_len as u64)
            })
    }
}

/// A position in the event sequence with its byte offsets in both base logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventPos {
    /// Sequence number of the next event.
    pub seq: u64,
    /// Its frame offset in the plain log.
    pub plain_off: u64,
    /// Its frame offset in the zstd log.
    pub zstd_off: u64,
}

impl EventPos {
    /// Offset in the chosen base log.
    pub fn offset(&self, compressed: bool) -> u64 {
        if compressed {
            self.zstd_off
        } else {
            self.plain_off
        }
    }
}

/// Interned collection NSIDs.
#[derive(Default)]
pub struct Collections {
    /// id → name.
    names: Vec<String>,
    /// name → id.
    ids: HashMap<String, u16>,
    /// Append-only persistence.
    file: Option<File>,
}

impl Collections {
    /// The id for `name`, interning (and persisting) it if new.
    pub fn intern(&mut self, name: &str) -> io::Result<u16> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        if self.names.len() >= MAX_COLLECTIONS || name.contains('\n') {
            return Ok(COLLECTION_UNKNOWN);
        }
        let id = self.names.len() as u16;
        if let Some(f) = self.file.as_mut() {
            f.write_all(format!("{name}\n").as_bytes())?;
        }
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        Ok(id)
    }

    /// The name behind an id.
    pub fn name(&self, id: u16) -> Option<&str> {
        self.names.get(id as usize).map(|s| s.as_str())
    }

    /// Number of interned names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether nothing is interned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The whole index. Owned behind a lock shared by the writer (appends), retention (drops),
/// the listener (cursor lookups) and workers (filter walks).
pub struct EventIndex {
    /// Retained chunks, oldest first; the last may be partial.
    chunks: VecDeque<Chunk>,
    /// Interned collections.
    pub collections: Collections,
    /// `events.idx`.
    events_file: Option<File>,
    /// `chunks.idx`.
    chunks_file: Option<File>,
}

/// Recovery's frame check: given events with their positions, how many (from the start) are
/// valid in the logs.
pub type VerifyFn<'a> = dyn FnMut(&[(EventPos, EventEntry)]) -> usize + 'a;

/// What recovery found and did, for the startup log line and tests.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Retained events after recovery.
    pub events: u64,
    /// Index records dropped because the log did not hold their frames.
    pub dropped_records: u64,
    /// Events whose frames failed verification (and everything after them was dropped).
    pub invalid_tail_events: u64,
}

impl EventIndex {
    /// An empty, unpersisted index (tests, and the base for `open`).
    pub fn in_memory() -> EventIndex {
        EventIndex {
            chunks: VecDeque::from([Chunk {
                first_seq: 0,
                plain_off: 0,
                zstd_off: 0,
                max_time_us: i64::MIN,
                appended_at_us: 0,
                entries: Vec::with_capacity(CHUNK_EVENTS as usize),
            }]),
            collections: Collections::default(),
            events_file: None,
            chunks_file: None,
        }
    }

    /// Opens (or creates) the persisted index in `dir` and reconciles it with the two base
    /// logs' lengths and first data offsets. `verify` checks the frames of the events it is
    /// given (the caller reads the logs) and returns how many of them are valid.
    pub fn open(
        dir: &Path,
        plain_len: u64,
        zstd_len: u64,
        plain_first_data: u64,
        zstd_first_data: u64,
        verify: &mut VerifyFn<'_>,
    ) -> io::Result<(EventIndex, Recovery)> {
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let events_file = open("events.idx")?;
        let chunks_file = open("chunks.idx")?;
        let coll_path = dir.join("collections.txt");
        let mut collections = Collections::default();
        if coll_path.exists() {
            for line in io::BufReader::new(File::open(&coll_path)?).lines() {
                let line = line?;
                let id = collections.names.len() as u16;
                collections.ids.insert(line.clone(), id);
                collections.names.push(line);
            }
        }
        collections.file = Some(
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(&coll_path)?,
        );

        let mut recovery = Recovery::default();
        let n_records = events_file.metadata()?.len() / ENTRY_BYTES;
        let first_record_byte = seek_data(&events_file)?.unwrap_or(n_records * ENTRY_BYTES);
        let mut first_chunk = first_record_byte.div_ceil(CHUNK_EVENTS * ENTRY_BYTES);
        let n_chunk_records = chunks_file.metadata()?.len() / CHUNK_RECORD_BYTES;
        let last_chunk = n_records / CHUNK_EVENTS; // possibly partial (or empty)

        // Complete chunks need their header record; find the first chunk whose header exists and
        // whose frames are not punched in either log.
        let read_header = |c: u64| -> io::Result<Option<(u64, u64, i64, i64)>> {
            if c >= n_chunk_records {
                return Ok(None);
            }
            let mut b = [0u8; CHUNK_RECORD_BYTES as usize];
            chunks_file.read_exact_at(&mut b, c * CHUNK_RECORD_BYTES)?;
            let w = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[i * 8..i * 8 + 8]);
                a
            };
            Ok(Some((
                u64::from_le_bytes(w(0)),
                u64::from_le_bytes(w(1)),
                i64::from_le_bytes(w(2)),
                i64::from_le_bytes(w(3)),
            )))
        };
        let mut chunks = VecDeque::new();
        // Chunk `last_chunk` (partial) has no header yet: its offsets follow from the previous one.
        while first_chunk < last_chunk {
            match read_header(first_chunk)? {
                Some((p, z, _, _)) if p >= plain_first_data && z >= zstd_first_data => break,
                _ => first_chunk += 1,
            }
        }
        let mut entries_buf = vec![0u8; (CHUNK_EVENTS * ENTRY_BYTES) as usize];
        let mut next_offsets: Option<(u64, u64)> = None;
        for c in first_chunk..=last_chunk {
            let first_seq = c * CHUNK_EVENTS;
            let count = (n_records - first_seq).min(CHUNK_EVENTS);
            let header = read_header(c)?;
            let (plain_off, zstd_off, max_time_us, appended_at_us) = match (header, next_offsets) {
                (Some(h), _) if count == CHUNK_EVENTS => h,
                (_, Some((p, z))) => (p, z, i64::MIN, now_us()),
                (_, None) if c == 0 => (0, 0, i64::MIN, now_us()),
                // A partial chunk right after a fully punched region, or a missing header:
                // nothing before it is usable, and without offsets it is unusable too.
                _ => break,
            };
            let bytes = &mut entries_buf[..(count * ENTRY_BYTES) as usize];
            events_file.read_exact_at(bytes, first_seq * ENTRY_BYTES)?;
            let entries: Vec<EventEntry> = bytes
                .chunks_exact(ENTRY_BYTES as usize)
                .map(EventEntry::from_bytes)
                .collect();
            let chunk = Chunk {
                first_seq,
                plain_off,
                zstd_off,
                max_time_us,
                appended_at_us,
                entries,
            };
            next_offsets = Some(chunk.end_offsets());
            chunks.push_back(chunk);
        }
        if chunks.is_empty() {
            let seq = n_records.min(first_chunk * CHUNK_EVENTS);
            chunks.push_back(Chunk {
                first_seq: seq / CHUNK_EVENTS * CHUNK_EVENTS,
                plain_off: plain_len,
                zstd_off: zstd_len,
                max_time_us: i64::MIN,
                appended_at_us: now_us(),
                entries: Vec::new(),
            });
        }

        // Drop records whose frames the logs do not (fully) hold: a torn tail.
        while let Some(last) = chunks.back_mut() {
            let (p, z) = last.end_offsets();
            if p <= plain_len && z <= zstd_len {
                break;
            }
            if last.entries.pop().is_some() {
                recovery.dropped_records += 1;
            } else if chunks.len() > 1 {
                chunks.pop_back();
            } else {
                break;
            }
        }

        let mut index = EventIndex {
            chunks,
            collections,
            events_file: Some(events_file),
            chunks_file: Some(chunks_file),
        };
        // Verify the newest two chunks' frames (where a crash tears things) and truncate at the
        // first bad one; older chunks were verified when they were written and synced.
        let verify_from = index.chunks.len().saturating_sub(2);
        let mut to_verify = Vec::new();
        for chunk in index.chunks.iter().skip(verify_from) {
            let mut pos = EventPos {
                seq: chunk.first_seq,
                plain_off: chunk.plain_off,
                zstd_off: chunk.zstd_off,
            };
            for e in &chunk.entries {
                to_verify.push((pos, *e));
                pos = EventPos {
                    seq: pos.seq + 1,
                    plain_off: pos.plain_off + e.plain_len as u64,
                    zstd_off: pos.zstd_off + e.zstd_len as u64,
                };
            }
        }
        let valid = verify(&to_verify);
        if valid < to_verify.len() {
            let keep_seq = to_verify[valid].0.seq;
            recovery.invalid_tail_events = (to_verify.len() - valid) as u64;
            index.truncate_to(keep_seq);
        }
        index.rewrite_tail_records()?;
        recovery.events = index.next_seq() - index.first_seq();
        Ok((index, recovery))
    }

    /// Drops every event with `seq >= keep_seq` (recovery only).
    fn truncate_to(&mut self, keep_seq: u64) {
        loop {
            let len = self.chunks.len();
            let Some(last) = self.chunks.back_mut() else {
                break;
            };
            if last.first_seq >= keep_seq && len > 1 {
                self.chunks.pop_back();
                continue;
            }
            let keep = keep_seq.saturating_sub(last.first_seq) as usize;
            last.entries.truncate(keep);
            break;
        }
    }

    /// After recovery: make the files agree with memory (truncate extra records) and recompute
    /// the partial chunk's running max from its predecessor (the caller rescans time_us).
    fn rewrite_tail_records(&mut self) -> io::Result<()> {
        let next = self.next_seq();
        if let Some(f) = &self.events_file {
            f.set_len(next * ENTRY_BYTES)?;
        }
        if let Some(f) = &self.chunks_file {
            let complete = next / CHUNK_EVENTS;
            f.set_len(complete * CHUNK_RECORD_BYTES)?;
        }
        Ok(())
    }

    /// Sets the running max of the newest (partial) chunk after recovery rescanned it.
    pub fn set_tail_time_scan(&mut self, scanned_times: &[i64]) {
        let prev_max = if self.chunks.len() >= 2 {
            self.chunks[self.chunks.len() - 2].max_time_us
        } else {
            i64::MIN
        };
        if let Some(last) = self.chunks.back_mut() {
            last.max_time_us = scanned_times.iter().copied().fold(prev_max, i64::max);
        }
    }

    /// Sequence number the next appended event gets.
    pub fn next_seq(&self) -> u64 {
        self.chunks
            .back()
            .map_or(0, |c| c.first_seq + c.entries.len() as u64)
    }

    /// Sequence number of the oldest retained event.
    pub fn first_seq(&self) -> u64 {
        self.chunks
            .iter()
            .find(|c| !c.entries.is_empty())
            .map_or_else(|| self.next_seq(), |c| c.first_seq)
    }

    /// Position just past the newest event.
    pub fn end_pos(&self) -> EventPos {
        let last = self.chunks.back().expect("index always has a chunk");
        let (plain_off, zstd_off) = last.end_offsets();
        EventPos {
            seq: self.next_seq(),
            plain_off,
            zstd_off,
        }
    }

    /// Position of the oldest retained event.
    pub fn start_pos(&self) -> EventPos {
        match self.chunks.iter().find(|c| !c.entries.is_empty()) {
            Some(c) => EventPos {
                seq: c.first_seq,
                plain_off: c.plain_off,
                zstd_off: c.zstd_off,
            },
            None => self.end_pos(),
        }
    }

    /// Newest running max of `time_us` (None when empty).
    pub fn max_time_us(&self) -> Option<i64> {
        self.chunks
            .back()
            .map(|c| c.max_time_us)
            .filter(|t| *t != i64::MIN)
    }

    /// Number of retained chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Appends one event; returns its sequence number.
    pub fn append(&mut self, entry: EventEntry, time_us: i64, now_us: i64) -> io::Result<u64> {
        let seq = self.next_seq();
        if let Some(f) = &self.events_file {
            f.write_all_at(&entry.to_bytes(), seq * ENTRY_BYTES)?;
        }
        let last = self.chunks.back_mut().expect("index always has a chunk");
        last.entries.push(entry);
        last.max_time_us = last.max_time_us.max(time_us);
        last.appended_at_us = now_us;
        if last.entries.len() as u64 == CHUNK_EVENTS {
            let (plain_off, zstd_off) = last.end_offsets();
            let record = [
                last.plain_off.to_le_bytes(),
                last.zstd_off.to_le_bytes(),
                last.max_time_us.to_le_bytes(),
                last.appended_at_us.to_le_bytes(),
            ]
            .concat();
            let chunk_no = last.first_seq / CHUNK_EVENTS;
            let max_time_us = last.max_time_us;
            if let Some(f) = &self.chunks_file {
                f.write_all_at(&record, chunk_no * CHUNK_RECORD_BYTES)?;
            }
            self.chunks.push_back(Chunk {
                first_seq: seq + 1,
                plain_off,
                zstd_off,
                max_time_us,
                appended_at_us: now_us,
                entries: Vec::with_capacity(CHUNK_EVENTS as usize),
            });
        }
        Ok(seq)
    }

    /// Finds the first chunk a cursor can start in: the first whose running max reaches
    /// `cursor`. Returns (chunk start, running max before the chunk), or None if no retained
    /// event has `time_us >= cursor` (the cursor is live).
    pub fn cursor_chunk(&self, cursor: i64) -> Option<(EventPos, Vec<EventEntry>)> {
        let retained: Vec<&Chunk> = self
            .chunks
            .iter()
            .filter(|c| !c.entries.is_empty())
            .collect();
        let i = retained.partition_point(|c| c.max_time_us < cursor);
        let c = retained.get(i)?;
        Some((
            EventPos {
                seq: c.first_seq,
                plain_off: c.plain_off,
                zstd_off: c.zstd_off,
            },
            c.entries.clone(),
        ))
    }

    /// Position of event `seq` (clamped to the retained range).
    pub fn pos_of(&self, seq: u64) -> EventPos {
        let start = self.start_pos();
        if seq <= start.seq {
            return start;
        }
        if seq >= self.next_seq() {
            return self.end_pos();
        }
        let i = self
            .chunks
            .partition_point(|c| c.first_seq + CHUNK_EVENTS <= seq);
        let c = &self.chunks[i];
        let mut pos = EventPos {
            seq: c.first_seq,
            plain_off: c.plain_off,
            zstd_off: c.zstd_off,
        };
        for e in &c.entries[..(seq - c.first_seq) as usize] {
            pos.seq += 1;
            pos.plain_off += e.plain_len as u64;
            pos.zstd_off += e.zstd_len as u64;
        }
        pos
    }

    /// The first chunk start whose offsets are at or past both given offsets (or the end).
    pub fn first_pos_at_or_after(&self, plain_off: u64, zstd_off: u64) -> EventPos {
        self.chunks
            .iter()
            .filter(|c| !c.entries.is_empty())
            .find(|c| c.plain_off >= plain_off && c.zstd_off >= zstd_off)
            .map_or_else(
                || self.end_pos(),
                |c| EventPos {
                    seq: c.first_seq,
                    plain_off: c.plain_off,
                    zstd_off: c.zstd_off,
                },
            )
    }

    /// Sequence number of the frame starting at `offset` in a base log, if it is a retained
    /// frame boundary.
    pub fn seq_at_offset(&self, offset: u64, compressed: bool) -> Option<u64> {
        let key = |c: &Chunk| if compressed { c.zstd_off } else { c.plain_off };
        let i = self.chunks.partition_point(|c| key(c) <= offset);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        let mut off = key(c);
        for (k, e) in c.entries.iter().enumerate() {
            if off == offset {
                return Some(c.first_seq + k as u64);
            }
            off += e.frame_len(compressed);
        }
        (off == offset).then(|| c.first_seq + c.entries.len() as u64)
    }

    /// Calls `f` for each event from `from` on (at most `max` events), with its position.
    pub fn walk(
        &self,
        from: EventPos,
        max: usize,
        mut f: impl FnMut(EventPos, &EventEntry) -> bool,
    ) {
        let i = self
            .chunks
            .partition_point(|c| c.first_seq + CHUNK_EVENTS <= from.seq);
        let mut pos = from;
        let mut n = 0;
        for c in self.chunks.iter().skip(i) {
            let skip = pos.seq.saturating_sub(c.first_seq) as usize;
            for e in c.entries.iter().skip(skip) {
                if n >= max || !f(pos, e) {
                    return;
                }
                n += 1;
                pos.seq += 1;
                pos.plain_off += e.plain_len as u64;
                pos.zstd_off += e.zstd_len as u64;
            }
        }
    }

    /// End offsets (plain, zstd) of the newest chunk retention wants gone: every complete chunk
    /// last appended to before `cutoff_us`, and enough of the oldest ones to free `excess`
    /// bytes. Readers below it are all kicked at once, so that one stalled reader does not
    /// hold the others' kicks back chunk by chunk.
    pub fn retention_target(&self, cutoff_us: i64, excess: u64) -> Option<(u64, u64)> {
        let complete = self.chunks.len().saturating_sub(1);
        let mut freed = 0u64;
        let mut target = None;
        for c in self.chunks.iter().take(complete) {
            if c.appended_at_us >= cutoff_us && freed >= excess {
                break;
            }
            let (p, z) = c.end_offsets();
            freed += (p - c.plain_off) + (z - c.zstd_off);
            target = Some((p, z));
        }
        target
    }

    /// Append time (µs) of the chunk holding event `seq` (its last append), if retained.
    pub fn appended_at_of(&self, seq: u64) -> Option<i64> {
        let i = self
            .chunks
            .partition_point(|c| c.first_seq + CHUNK_EVENTS <= seq);
        self.chunks.get(i).map(|c| c.appended_at_us)
    }

    /// Seq of the chunk start at or before `offset` in a base log (chunk granularity is enough
    /// for lag estimates).
    pub fn seq_at_or_before_offset(&self, offset: u64, compressed: bool) -> Option<u64> {
        let key = |c: &Chunk| if compressed { c.zstd_off } else { c.plain_off };
        let i = self.chunks.partition_point(|c| key(c) <= offset);
        self.chunks.get(i.checked_sub(1)?).map(|c| c.first_seq)
    }

    /// The oldest complete chunk, if any (retention looks at it).
    pub fn oldest_chunk(&self) -> Option<&Chunk> {
        self.chunks.front().filter(|_| self.chunks.len() > 1)
    }

    /// Drops the oldest chunk from memory and punches its records; returns the position just
    /// past it (the new start).
    pub fn drop_oldest_chunk(&mut self) -> io::Result<Option<EventPos>> {
        if self.chunks.len() <= 1 {
            return Ok(None);
        }
        let Some(c) = self.chunks.pop_front() else {
            return Ok(None);
        };
        if let Some(f) = &self.events_file {
            punch(f, c.first_seq * ENTRY_BYTES, CHUNK_EVENTS * ENTRY_BYTES)?;
        }
        let chunk_no = c.first_seq / CHUNK_EVENTS;
        // chunks.idx: punch whole blocks only, once all 128 records in a block are dropped.
        let per_block = 4096 / CHUNK_RECORD_BYTES;
        if (chunk_no + 1).is_multiple_of(per_block)
            && let Some(f) = &self.chunks_file
        {
            punch(f, (chunk_no + 1 - per_block) * CHUNK_RECORD_BYTES, 4096)?;
        }
        Ok(Some(self.start_pos()))
    }

    /// Flushes the index files.
    pub fn sync(&self) -> io::Result<()> {
        for f in [&self.events_file, &self.chunks_file].into_iter().flatten() {
            f.sync_data()?;
        }
        if let Some(f) = &self.collections.file {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Bytes allocated on disk by the index files.
    pub fn allocated_bytes(&self) -> u64 {
        [&self.events_file, &self.chunks_file]
            .into_iter()
            .flatten()
            .filter_map(|f| rustix::fs::fstat(f).ok())
            .map(|st| st.st_blocks as u64 * 512)
            .sum()
    }

    /// Approximate heap bytes used by retained entries (for metrics and the README's claim).
    pub fn memory_bytes(&self) -> usize {
        self.chunks.len() * (std::mem::size_of::<Chunk>() + CHUNK_EVENTS as usize * 16)
    }
}

/// First data offset of a file (SEEK_DATA), None if it is all hole / empty.
pub fn seek_data(file: &File) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(0)) {
        Ok(off) => Ok(Some(off)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn punch(f: &File, off: u64, len: u64) -> io::Result<()> {
    rustix::fs::fallocate(
        f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    )?;
    Ok(())
}

/// Wall clock in µs since the epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: u32) -> EventEntry {
        EventEntry {
            plain_len: p,
            zstd_len: p / 2,
            did_hash: p,
            collection: 0,
            kind: 0,
            flags: 0,
        }
    }

    #[test]
    fn non_monotonic_cursor_lookup() {
        let mut idx = EventIndex::in_memory();
        // time_us goes backwards inside and across chunks.
        let times: Vec<i64> = (0..1000)
            .map(|i| 1_000 + i * 10 - if i % 3 == 0 { 25 } else { 0 })
            .collect();
        for (i, t) in times.iter().enumerate() {
            idx.append(entry(100 + i as u32 % 7), *t, 0).unwrap();
        }
        assert_eq!(idx.next_seq(), 1000);
        for cursor in [0, 975, 1_000, 1_005, 5_000, 5_001, 10_985, 10_990] {
            let expected = times.iter().position(|t| *t >= cursor);
            let got = idx.cursor_chunk(cursor).map(|(pos, entries)| {
                // The caller scans the chunk's events: emulate with the known times.
                let k = (pos.seq..pos.seq + entries.len() as u64)
                    .find(|s| times[*s as usize] >= cursor)
                    .unwrap();
                k as usize
            });
            assert_eq!(got, expected, "cursor {cursor}");
        }
        assert!(idx.cursor_chunk(20_000).is_none(), "future cursor is live");
    }

    #[test]
    fn positions_offsets_and_walk() {
        let mut idx = EventIndex::in_memory();
        for i in 0..600u32 {
            idx.append(entry(10 + i % 5), i as i64, 0).unwrap();
        }
        let pos = idx.pos_of(300);
        let expect: u64 = (0..300u32).map(|i| 10 + (i % 5) as u64).sum();
        assert_eq!(pos.plain_off, expect);
        assert_eq!(idx.seq_at_offset(expect, false), Some(300));
        assert_eq!(idx.seq_at_offset(expect + 1, false), None);
        let mut seen = Vec::new();
        idx.walk(pos, 10, |p, _| {
            seen.push(p.seq);
            true
        });
        assert_eq!(seen, (300..310).collect::<Vec<_>>());
        assert_eq!(idx.end_pos().seq, 600);
        let dropped = idx.drop_oldest_chunk().unwrap().unwrap();
        assert_eq!(dropped.seq, 256);
        assert_eq!(idx.pos_of(0).seq, 256, "clamped to the retained start");
    }

    #[test]
    fn persist_and_recover_with_torn_tail() {
        let dir = std::env::temp_dir().join(format!("jetrelay-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let total_plain;
        let total_zstd;
        {
            let (mut idx, rec) = EventIndex::open(&dir, 0, 0, 0, 0, &mut |v| v.len()).unwrap();
            assert_eq!(rec.events, 0);
            assert_eq!(idx.collections.intern("app.bsky.feed.post").unwrap(), 0);
            for i in 0..700u32 {
                idx.append(entry(20 + i % 3), i as i64 * 2, 0).unwrap();
            }
            let end = idx.end_pos();
            total_plain = end.plain_off;
            total_zstd = end.zstd_off;
            idx.sync().unwrap();
        }
        // The logs lost the last 2 events' frames (crash before they were written).
        let short_plain = total_plain - 20 - 21;
        let (idx, rec) =
            EventIndex::open(&dir, short_plain, total_zstd, 0, 0, &mut |v| v.len()).unwrap();
        assert_eq!(rec.dropped_records, 2);
        assert_eq!(idx.next_seq(), 698);
        assert_eq!(idx.collections.name(0), Some("app.bsky.feed.post"));
        drop(idx);
        // Verification rejects event 650 onwards.
        let (idx, rec) = EventIndex::open(&dir, total_plain, total_zstd, 0, 0, &mut |v| {
            v.iter().position(|(p, _)| p.seq == 650).unwrap_or(v.len())
        })
        .unwrap();
        assert_eq!(idx.next_seq(), 650);
        assert_eq!(rec.invalid_tail_events, 48);
        assert_eq!(idx.cursor_chunk(600).unwrap().0.seq, 256);
        std::fs::remove_dir_all(&dir).ok();
    }
}
