//! The event index: for every retained event, where its frame is in each base log (one per
//! [`Encoding`]), what a filter needs to know about it (DID hash, collection id, kind) and the
//! upstream's sequence number — 32 bytes per event — grouped in chunks of [`CHUNK_EVENTS`]
//! whose headers carry the byte offsets, the running maximum of `time_us` (for cursors) and
//! the append time (for retention). An event's *position* (called `seq` here: its record
//! number) is dense; the seq clients see is mapped from it by [`Seqs`].
//!
//! Why a running maximum: `time_us` is not monotonic in real traffic, but its running maximum
//! is, and the first event whose `time_us >= C` is exactly the first event where the running
//! maximum reaches `C`. So a binary search over chunk maxima finds the chunk, and a binary
//! search over the chunk's per-event running maxima ([`ChunkTimes`], 4 bytes an event, kept in
//! memory for chunks appended by this process) finds the event: a cursor costs O(log n) in
//! memory, no disk read. Chunks recovered from disk have no per-event times (they are not
//! persisted); a cursor landing in one needs a scan of that chunk's frames, which the listener
//! hands to another thread ([`CursorStart::Scan`]). The times are indexed times (see
//! [`crate::clock`]), like the chunk maxima.
//!
//! Persistence (what makes a restart of a 10 GB log take seconds, not minutes):
//! - `events.idx`: record `seq` at byte `seq * 32` (punched with the log, a chunk per two
//!   blocks);
//! - `chunks.idx`: record `chunk` at byte `chunk * 64`, written when a chunk completes;
//! - `seqs.idx`, `seqs.reserve`, `seqs.clean`: the client-facing seqs (see [`Seqs`]);
//! - `collections.txt`: interned collection NSIDs, one per line, id = line number.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::encoding::{ENCODINGS, Encoding};
use crate::event::EventKind;
use crate::seqs::Seqs;

/// Events per chunk. Why 256: 256 × 32-byte records = two 4 KiB blocks of `events.idx`, so a
/// dropped chunk is exactly punched; and a cursor lookup scans at most 256 frames.
pub const CHUNK_EVENTS: u64 = 256;

/// Bytes per persisted event record.
pub const ENTRY_BYTES: u64 = 32;
/// Bytes per persisted chunk record (four offsets, two times, padding to a power of two so
/// that 64 records fill a block exactly).
const CHUNK_RECORD_BYTES: u64 = 64;

/// Collection id for "not interned" (the table is full): filters must look at the JSON.
pub const COLLECTION_UNKNOWN: u16 = u16::MAX;
/// Collection id for events without a collection (identity, account).
pub const COLLECTION_NONE: u16 = u16::MAX - 1;
/// Why bounded: an upstream could invent collections without limit; ids are u16.
const MAX_COLLECTIONS: usize = (u16::MAX - 2) as usize;

/// One event's record, persisted little-endian as 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventEntry {
    /// Frame length in each base log, by [`Encoding::index`] (0 in the v1 logs for a `#sync`
    /// event, which has no v1 form).
    pub lens: [u32; ENCODINGS],
    /// `event::did_hash` of the DID: DID filters compare hashes, then confirm on the JSON.
    pub did_hash: u32,
    /// Interned collection id, [`COLLECTION_NONE`] or [`COLLECTION_UNKNOWN`].
    pub collection: u16,
    /// 0 commit, 1 identity, 2 account, 3 sync.
    pub kind: u8,
    /// Reserved (0).
    pub flags: u8,
    /// The upstream's sequence number for this event (0 when its wire has none): where a
    /// restarted relay resumes exactly.
    pub upstream_seq: u64,
}

impl EventEntry {
    fn to_bytes(self) -> [u8; ENTRY_BYTES as usize] {
        let mut b = [0u8; ENTRY_BYTES as usize];
        for (i, len) in self.lens.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&len.to_le_bytes());
        }
        b[16..20].copy_from_slice(&self.did_hash.to_le_bytes());
        b[20..22].copy_from_slice(&self.collection.to_le_bytes());
        b[22] = self.kind;
        b[23] = self.flags;
        b[24..32].copy_from_slice(&self.upstream_seq.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> EventEntry {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[24..32]);
        EventEntry {
            lens: std::array::from_fn(|i| u32_at(i * 4)),
            did_hash: u32_at(16),
            collection: u16::from_le_bytes([b[20], b[21]]),
            kind: b[22],
            flags: b[23],
            upstream_seq: u64::from_le_bytes(seq),
        }
    }

    /// The event kind.
    pub fn kind(&self) -> EventKind {
        match self.kind {
            1 => EventKind::Identity,
            2 => EventKind::Account,
            3 => EventKind::Sync,
            _ => EventKind::Commit,
        }
    }

    /// Frame length in the base log of `enc`.
    pub fn frame_len(&self, enc: Encoding) -> u64 {
        self.lens[enc.index()] as u64
    }
}

/// Encodes a kind for [`EventEntry::kind`].
pub fn kind_code(kind: EventKind) -> u8 {
    match kind {
        EventKind::Commit => 0,
        EventKind::Identity => 1,
        EventKind::Account => 2,
        EventKind::Sync => 3,
    }
}

/// Byte offsets in each base log, by [`Encoding::index`].
pub type Offsets = [u64; ENCODINGS];

/// `offsets` advanced past the frames of `e`.
pub fn advance(offsets: Offsets, e: &EventEntry) -> Offsets {
    std::array::from_fn(|i| offsets[i] + e.lens[i] as u64)
}

/// A run of up to [`CHUNK_EVENTS`] consecutive events.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Sequence number of the first event (a multiple of `CHUNK_EVENTS`).
    pub first_seq: u64,
    /// Offsets of the first event's frames in each base log.
    pub offs: Offsets,
    /// Running maximum of `time_us` up to and including this chunk's last event.
    pub max_time_us: i64,
    /// Wall-clock time (µs) of the last append into this chunk: retention by age uses it.
    pub appended_at_us: i64,
    /// The events.
    pub entries: Vec<EventEntry>,
    /// The running maximum of `time_us` after each event, when known.
    pub times: ChunkTimes,
}

/// A chunk's running maximum of `time_us` after each of its events, for cursor lookups
/// without reading frames. Mutually exclusive representations of the same thing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkTimes {
    /// Not known: the chunk was recovered from disk (only chunk maxima are persisted). A
    /// cursor landing in it scans its frames.
    Unknown,
    /// Microseconds above the first event's running maximum, per event: 4 bytes an event,
    /// for chunks whose running maximum grows by less than `u32::MAX` µs (71 minutes).
    Compact {
        /// The first event's running maximum.
        first: i64,
        /// Each event's running maximum minus `first`.
        above: Vec<u32>,
    },
    /// Each event's running maximum, for a chunk whose maximum jumped further.
    Wide(Vec<i64>),
}

impl ChunkTimes {
    /// Empty, for a chunk this process starts.
    fn new() -> ChunkTimes {
        ChunkTimes::Compact {
            first: 0,
            above: Vec::with_capacity(CHUNK_EVENTS as usize),
        }
    }

    /// Records the running maximum after the next event.
    fn push(&mut self, running_max: i64) {
        match self {
            ChunkTimes::Unknown => {}
            ChunkTimes::Compact { first, above } => {
                if above.is_empty() {
                    *first = running_max;
                    above.push(0);
                    return;
                }
                match running_max
                    .checked_sub(*first)
                    .and_then(|d| u32::try_from(d).ok())
                {
                    Some(d) => above.push(d),
                    None => {
                        let mut wide: Vec<i64> =
                            above.iter().map(|d| *first + i64::from(*d)).collect();
                        wide.push(running_max);
                        *self = ChunkTimes::Wide(wide);
                    }
                }
            }
            ChunkTimes::Wide(v) => v.push(running_max),
        }
    }

    /// Index of the first event whose running maximum is at least `cursor` (the number of
    /// events if none), or None when unknown.
    fn first_reaching(&self, cursor: i64) -> Option<usize> {
        match self {
            ChunkTimes::Unknown => None,
            ChunkTimes::Compact { first, above } => {
                Some(above.partition_point(|d| first.saturating_add(i64::from(*d)) < cursor))
            }
            ChunkTimes::Wide(v) => Some(v.partition_point(|t| *t < cursor)),
        }
    }

    /// Heap bytes held.
    fn memory_bytes(&self) -> usize {
        match self {
            ChunkTimes::Unknown => 0,
            ChunkTimes::Compact { above, .. } => above.capacity() * 4,
            ChunkTimes::Wide(v) => v.capacity() * 8,
        }
    }
}

/// Where a cursor starts, as far as memory knows (see [`EventIndex::cursor_start`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CursorStart {
    /// At this event: the first retained one whose `time_us >= cursor`.
    At(EventPos),
    /// No retained event reaches the cursor: live.
    Live,
    /// In the chunk starting at this position, whose per-event times are not in memory: the
    /// caller scans these entries' frames (see `Hub::finish_cursor_scan`).
    Scan(EventPos, Vec<EventEntry>),
}

impl Chunk {
    /// Offsets just past this chunk's last frame.
    pub fn end_offsets(&self) -> Offsets {
        self.entries.iter().fold(self.offs, advance)
    }

    /// Position of its first event.
    pub fn start(&self) -> EventPos {
        EventPos {
            seq: self.first_seq,
            offs: self.offs,
        }
    }
}

/// A position in the event sequence with its byte offsets in every base log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventPos {
    /// Sequence number (index position) of the next event.
    pub seq: u64,
    /// Its frame offsets in each base log.
    pub offs: Offsets,
}

impl EventPos {
    /// The later of two positions (by sequence number).
    pub fn max_seq(self, other: EventPos) -> EventPos {
        if other.seq > self.seq { other } else { self }
    }

    /// Offset in the base log of `enc`.
    pub fn offset(&self, enc: Encoding) -> u64 {
        self.offs[enc.index()]
    }

    /// The position after the event `e` at this one.
    pub fn after(&self, e: &EventEntry) -> EventPos {
        EventPos {
            seq: self.seq + 1,
            offs: advance(self.offs, e),
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
    /// Append-only persistence (`collections.txt`, one name per line, id = line number).
    file: Option<File>,
    /// Bytes of `file` holding complete lines: the next name is written here, so a failed
    /// write's partial line is overwritten, never continued.
    file_len: u64,
}

impl Collections {
    /// Reads `path` (creating it if absent). A torn last line (no newline: a crash or a full
    /// disk mid-write) and anything from an unreadable line on (NUL bytes, invalid UTF-8: a
    /// zero-filled range) are cut off; returns how many bytes were cut.
    fn load(path: &Path) -> io::Result<(Collections, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let mut c = Collections::default();
        let mut good = 0usize;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let Some(name) = line.strip_suffix(b"\n") else {
                break;
            };
            let Ok(name) = std::str::from_utf8(name) else {
                break;
            };
            if name.contains('\0') || c.names.len() >= MAX_COLLECTIONS {
                break;
            }
            let id = c.names.len() as u16;
            // A name listed twice (only after damage) keeps its first id; both lines still
            // name the same collection, so records with either id stay correct.
            c.ids.entry(name.to_owned()).or_insert(id);
            c.names.push(name.to_owned());
            good += line.len();
        }
        let cut = (bytes.len() - good) as u64;
        if cut > 0 {
            file.set_len(good as u64)?;
        }
        c.file = Some(file);
        c.file_len = good as u64;
        Ok((c, cut))
    }

    /// The id for `name`, if interned.
    pub fn id_of(&self, name: &str) -> Option<u16> {
        self.ids.get(name).copied()
    }

    /// The id for `name`, interning (and persisting) it if new.
    pub fn intern(&mut self, name: &str) -> io::Result<u16> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        if self.names.len() >= MAX_COLLECTIONS || name.contains('\n') || name.contains('\0') {
            return Ok(COLLECTION_UNKNOWN);
        }
        let id = self.names.len() as u16;
        if let Some(f) = &self.file {
            let line = format!("{name}\n");
            if let Err(e) =
                crate::failpoint::write_all_at(f, line.as_bytes(), self.file_len, "collections")
            {
                // Best effort: the next attempt overwrites from `file_len` anyway, and
                // recovery cuts a torn last line.
                let _ = f.set_len(self.file_len);
                return Err(e);
            }
            self.file_len += line.len() as u64;
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
    /// `durable.idx`: the durable mark (see [`SyncHandles::mark_durable`]).
    durable_file: Option<File>,
    /// The seqs clients see, mapped from positions; the writer reserves them.
    pub seqs: Seqs,
}

/// What recovery's frame check expects of an event's collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectionCheck<'a> {
    /// Not checked (the record says "not interned").
    Any,
    /// The event has no collection (identity, account).
    Absent,
    /// The event's collection is this one.
    Named(&'a str),
}

/// Recovery's frame check: are the event's frames at `pos` valid in every base log (complete,
/// the lengths of the record) and do they match the record (kind, DID hash) and
/// `collection`? Returns the event's `time_us` if so.
pub type CheckFn<'a> = dyn FnMut(EventPos, &EventEntry, CollectionCheck<'_>) -> Option<i64> + 'a;

/// A base log as recovery sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogExtent {
    /// Its length (bytes).
    pub len: u64,
    /// First byte not in a punched hole.
    pub first_data: u64,
}

/// What recovery found and did, for the startup log lines and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Retained events after recovery.
    pub events: u64,
    /// Index records past the recovered end (a torn tail: records without their frames, or
    /// not locatable).
    pub dropped_records: u64,
    /// Events whose frames failed verification (and everything after them was dropped).
    pub invalid_tail_events: u64,
    /// Events verified frame by frame (everything after the durable mark).
    pub verified_events: u64,
    /// Chunk headers rebuilt from the chain of records (missing, zeroed or contradicting).
    pub rebuilt_headers: u64,
    /// How the client-facing seqs continued (a gap after an unclean stop).
    pub seqs: Option<crate::seqs::Start>,
    /// Events discarded because damage in the synced part of the index made them
    /// unlocatable: the damaged chunk and everything older (logged as an error).
    pub discarded_events: u64,
    /// Records whose collection id was not in `collections.txt`: served as "unknown"
    /// (filters read the JSON).
    pub unknown_collections: u64,
    /// Bytes cut from the end of `collections.txt` (a torn or damaged last line).
    pub collections_cut_bytes: u64,
}

impl Recovery {
    /// Whether recovery found anything to repair.
    pub fn repaired(&self) -> bool {
        self.dropped_records
            + self.invalid_tail_events
            + self.rebuilt_headers
            + self.discarded_events
            + self.unknown_collections
            + self.collections_cut_bytes
            > 0
    }
}

/// A chunk header as persisted in `chunks.idx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkHeader {
    /// Offsets of the chunk's first frames in each base log.
    offs: Offsets,
    /// Running maximum of indexed `time_us` up to the chunk's last event.
    max_time_us: i64,
    /// Wall clock of the chunk's last append.
    appended_at_us: i64,
}

impl ChunkHeader {
    fn to_bytes(self) -> [u8; CHUNK_RECORD_BYTES as usize] {
        let mut b = [0u8; CHUNK_RECORD_BYTES as usize];
        for (i, o) in self.offs.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&o.to_le_bytes());
        }
        b[32..40].copy_from_slice(&self.max_time_us.to_le_bytes());
        b[40..48].copy_from_slice(&self.appended_at_us.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; CHUNK_RECORD_BYTES as usize]) -> ChunkHeader {
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            a
        };
        ChunkHeader {
            offs: std::array::from_fn(|i| u64::from_le_bytes(w(i))),
            max_time_us: i64::from_le_bytes(w(4)),
            appended_at_us: i64::from_le_bytes(w(5)),
        }
    }
}

/// Events verified frame by frame at startup when there is no durable mark (a data directory
/// from before the mark existed). Why 64 chunks: several seconds of the firehose, far more than
/// a crash can tear, read in well under a second.
const VERIFY_WITHOUT_MARK_EVENTS: u64 = 64 * CHUNK_EVENTS;

/// Checksum salt of the durable mark ("jetrelay"), so a zeroed or garbage mark is not trusted.
const DURABLE_MARK_SALT: u64 = 0x6a65_7472_656c_6179;

/// Largest frame a record may describe: the largest event plus the longest frame header.
const MAX_RECORD_FRAME: u32 = crate::event::MAX_EVENT_BYTES as u32 + 16;

/// Whether a record can describe an event at all (a zero-filled or torn range cannot): every
/// frame of a sane length — a `#sync` event has no v1 frames — a known kind, no flags.
fn record_is_sane(e: &EventEntry) -> bool {
    let frame = |enc: Encoding| (2..=MAX_RECORD_FRAME).contains(&e.lens[enc.index()]);
    let v1 = if e.kind == 3 {
        e.lens[0] == 0 && e.lens[1] == 0
    } else {
        frame(Encoding::V1Json) && frame(Encoding::V1Zstd)
    };
    v1 && frame(Encoding::V2Json) && frame(Encoding::V2Zstd) && e.kind <= 3 && e.flags == 0
}

/// Reads the durable mark: every event before it was synced to disk (with its index records
/// and collection names) before the mark was written.
fn read_durable_mark(f: &File) -> io::Result<Option<u64>> {
    let mut b = [0u8; 16];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let (seq, check) = (word(0), word(8));
    Ok((check == seq ^ DURABLE_MARK_SALT).then_some(seq))
}

fn durable_mark_bytes(seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..].copy_from_slice(&(seq ^ DURABLE_MARK_SALT).to_le_bytes());
    b
}

/// Duplicated handles on the index files, to sync them without holding the index lock (an
/// `fdatasync` can take long, and the writer needs the lock for every append).
pub struct SyncHandles {
    /// `events.idx`, `chunks.idx`, `collections.txt`.
    files: Vec<File>,
    /// `durable.idx`.
    durable: Option<File>,
}

impl SyncHandles {
    /// Flushes the index files.
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Records that every event before `seq` is durable: call only after its frames (both
    /// logs) and [`SyncHandles::sync`] succeeded. Recovery trusts the events before the mark
    /// and verifies every event after it frame by frame, so a power loss that zeroes or loses
    /// unsynced data is repaired, never served.
    pub fn mark_durable(&self, seq: u64) -> io::Result<()> {
        if let Some(f) = &self.durable {
            crate::failpoint::write_all_at(f, &durable_mark_bytes(seq), 0, "durable.idx")?;
            f.sync_data()?;
        }
        Ok(())
    }
}

/// How a chunk's first frame was located during recovery.
enum Located {
    /// At the end of the previous chunk (the chain of records), its header agreeing.
    Chained(ChunkHeader),
    /// At the end of the previous chunk (or at 0); its header missing, zeroed or contradicting.
    Rebuilt(Offsets),
    /// By its own header (the first chunk of a chain).
    Anchored(ChunkHeader),
}

/// Drops the chain kept so far (and `also` more events), loudly; returns the count.
fn discard(
    chunks: &mut VecDeque<Chunk>,
    rebuilt: &mut VecDeque<bool>,
    also: u64,
    why: &str,
    at_seq: u64,
) -> u64 {
    let n = chunks.iter().map(|c| c.entries.len() as u64).sum::<u64>() + also;
    tracing::error!(
        at_seq,
        why,
        discarded_events = n,
        "index damaged in its synced part: discarding the damaged chunk and everything older \
         (as retention would); newer events are kept"
    );
    chunks.clear();
    rebuilt.clear();
    n
}

impl EventIndex {
    /// An empty, unpersisted index (tests, and the base for `open`).
    pub fn in_memory() -> EventIndex {
        EventIndex {
            chunks: VecDeque::from([Chunk {
                first_seq: 0,
                offs: [0; ENCODINGS],
                max_time_us: i64::MIN,
                appended_at_us: 0,
                entries: Vec::with_capacity(CHUNK_EVENTS as usize),
                times: ChunkTimes::new(),
            }]),
            collections: Collections::default(),
            events_file: None,
            chunks_file: None,
            durable_file: None,
            seqs: Seqs::in_memory(),
        }
    }

    /// Opens (or creates) the persisted index in `dir` and reconciles it with the base logs
    /// (`logs`, by [`Encoding::index`]), repairing whatever prefix of the last writes a crash
    /// left on disk:
    ///
    /// - records are kept only while they form a chain: each chunk starts where the previous
    ///   one ends. A chunk header that is missing (a crash between the last record and the
    ///   header), zeroed (a zero-extended `chunks.idx`) or contradicting the chain is rebuilt
    ///   from the chain, its running maximum rescanned from the frames;
    /// - the first frame of every chunk is checked, and every event after the durable mark
    ///   (not yet known to be on disk) is checked frame by frame; the index is cut at the
    ///   first event that fails, or at the first record that cannot describe an event;
    /// - damage in the synced part that breaks the chain (a zeroed range of records, a chunk
    ///   whose frames are not where the index says) discards that chunk and everything older,
    ///   as retention would, with an error log line: never a misaligned frame;
    /// - collection ids missing from `collections.txt` become "unknown" (filters then read
    ///   the JSON), and a torn last line there is cut.
    pub fn open(
        dir: &Path,
        logs: [LogExtent; ENCODINGS],
        check: &mut CheckFn<'_>,
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
        let durable_file = open("durable.idx")?;
        let (collections, collections_cut_bytes) = Collections::load(&dir.join("collections.txt"))?;
        let mut recovery = Recovery {
            collections_cut_bytes,
            ..Recovery::default()
        };

        let n_records = events_file.metadata()?.len() / ENTRY_BYTES;
        let n_chunk_records = chunks_file.metadata()?.len() / CHUNK_RECORD_BYTES;
        let first_record_byte = seek_data(&events_file)?.unwrap_or(n_records * ENTRY_BYTES);
        let first_chunk = first_record_byte / (CHUNK_EVENTS * ENTRY_BYTES);
        let last_chunk = n_records / CHUNK_EVENTS; // possibly partial (or empty)
        let verify_from = match read_durable_mark(&durable_file)? {
            Some(mark) => mark.min(n_records),
            None => n_records.saturating_sub(VERIFY_WITHOUT_MARK_EVENTS),
        };
        let read_header = |c: u64| -> io::Result<Option<ChunkHeader>> {
            if c >= n_chunk_records {
                return Ok(None);
            }
            let mut b = [0u8; CHUNK_RECORD_BYTES as usize];
            chunks_file.read_exact_at(&mut b, c * CHUNK_RECORD_BYTES)?;
            Ok(Some(ChunkHeader::from_bytes(&b)))
        };
        let collection_check = |e: &EventEntry| match e.collection {
            COLLECTION_UNKNOWN => CollectionCheck::Any,
            COLLECTION_NONE => CollectionCheck::Absent,
            id => collections
                .name(id)
                .map_or(CollectionCheck::Any, CollectionCheck::Named),
        };
        let unlogged = |offs: Offsets| (0..ENCODINGS).any(|i| offs[i] < logs[i].first_data);

        // 1. The chain of chunks, oldest first.
        let mut chunks: VecDeque<Chunk> = VecDeque::new();
        // Per chunk in `chunks`: whether its maximum must be rescanned (and, if complete, its
        // header rewritten).
        let mut rebuilt: VecDeque<bool> = VecDeque::new();
        let mut entries_buf = vec![0u8; (CHUNK_EVENTS * ENTRY_BYTES) as usize];
        for c in first_chunk..=last_chunk {
            let first_seq = c * CHUNK_EVENTS;
            let count = n_records.saturating_sub(first_seq).min(CHUNK_EVENTS);
            let bytes = &mut entries_buf[..(count * ENTRY_BYTES) as usize];
            events_file.read_exact_at(bytes, first_seq * ENTRY_BYTES)?;
            let mut entries: Vec<EventEntry> = bytes
                .chunks_exact(ENTRY_BYTES as usize)
                .map(EventEntry::from_bytes)
                .collect();
            // Past the durable mark, anything wrong is a torn tail: cut there. Before it, it
            // is damage: discard what cannot be trusted and look for a chain further on.
            let unsynced = |seq: u64| seq >= verify_from;
            let mut torn = false;
            if let Some(k) = entries.iter().position(|e| !record_is_sane(e)) {
                if unsynced(first_seq + k as u64) || c == last_chunk {
                    entries.truncate(k);
                    torn = true;
                } else {
                    recovery.discarded_events += discard(
                        &mut chunks,
                        &mut rebuilt,
                        count,
                        "unreadable record",
                        first_seq,
                    );
                    continue;
                }
            }
            // A partial chunk has a header only as the oldest retained one (its start is
            // known from nowhere else: see `persist_front_header`).
            let header = if entries.len() as u64 == CHUNK_EVENTS || chunks.is_empty() {
                read_header(c)?
            } else {
                None
            };
            let chained = chunks.back().map(|p| p.end_offsets());
            let mut first_ok = |offs: Offsets| -> bool {
                let Some(e) = entries.first() else {
                    return true;
                };
                let pos = EventPos {
                    seq: first_seq,
                    offs,
                };
                !unlogged(offs) && check(pos, e, collection_check(e)).is_some()
            };
            let located = match (chained, header) {
                (Some(o), Some(h)) if h.offs == o && first_ok(o) => Some(Located::Chained(h)),
                (Some(o), _) if first_ok(o) => Some(Located::Rebuilt(o)),
                (_, Some(h)) if first_ok(h.offs) => Some(Located::Anchored(h)),
                (None, None) if c == 0 && first_ok([0; ENCODINGS]) => {
                    Some(Located::Rebuilt([0; ENCODINGS]))
                }
                _ => None,
            };
            let Some(located) = located else {
                if unsynced(first_seq) || torn {
                    // The tail's frames are not there (yet): cut here.
                    break;
                }
                if chained.is_none() && header.is_none() {
                    // Not locatable (the header of the oldest retained chunk is gone) and
                    // nothing kept before it: skip it.
                    recovery.discarded_events += entries.len() as u64;
                } else {
                    recovery.discarded_events += discard(
                        &mut chunks,
                        &mut rebuilt,
                        entries.len() as u64,
                        "frames not where the index says",
                        first_seq,
                    );
                }
                continue;
            };
            let (offs, max_time_us, appended_at_us, needs_rescan) = match located {
                Located::Chained(h) => (h.offs, h.max_time_us, h.appended_at_us, false),
                Located::Anchored(h) => {
                    if chained.is_some() {
                        // The chain disagrees and only the header's offsets verify: the older
                        // records are damaged.
                        recovery.discarded_events += discard(
                            &mut chunks,
                            &mut rebuilt,
                            0,
                            "records disagree with the next chunk header",
                            first_seq,
                        );
                    }
                    (h.offs, h.max_time_us, h.appended_at_us, false)
                }
                Located::Rebuilt(o) => (o, i64::MIN, 0, true),
            };
            // A complete chunk's header is rewritten if it was rebuilt; a partial chunk has no
            // header yet, its maximum is rescanned like a rebuilt one's. So is the maximum of a
            // chunk reaching past the durable mark: its header was not synced either, and a
            // power loss may have torn it (offsets intact, maximum not).
            let complete = entries.len() as u64 == CHUNK_EVENTS;
            if needs_rescan && complete {
                recovery.rebuilt_headers += 1;
            }
            let rescan = needs_rescan || !complete || unsynced(first_seq + CHUNK_EVENTS - 1);
            chunks.push_back(Chunk {
                first_seq,
                offs,
                max_time_us,
                appended_at_us: if rescan { 0 } else { appended_at_us },
                entries,
                // Per-event times are not persisted: a cursor here scans the frames.
                times: ChunkTimes::Unknown,
            });
            rebuilt.push_back(rescan);
            if torn || !complete {
                break;
            }
        }
        if chunks.is_empty() {
            // Nothing usable: start empty after whatever the logs and the index hold (their
            // bytes are punched).
            let seq = first_chunk.max(n_records.div_ceil(CHUNK_EVENTS)) * CHUNK_EVENTS;
            chunks.push_back(Chunk {
                first_seq: seq,
                offs: std::array::from_fn(|i| logs[i].len),
                max_time_us: i64::MIN,
                appended_at_us: now_us(),
                entries: Vec::new(),
                times: ChunkTimes::new(),
            });
            rebuilt.push_back(false);
        }

        // 2. Records whose frames the logs do not (fully) hold: a torn tail.
        while let Some(last) = chunks.back_mut() {
            let end = last.end_offsets();
            if (0..ENCODINGS).all(|i| end[i] <= logs[i].len) {
                break;
            }
            if last.entries.pop().is_some() {
                if let Some(r) = rebuilt.back_mut() {
                    *r = true;
                }
            } else if chunks.len() > 1 {
                chunks.pop_back();
                rebuilt.pop_back();
            } else {
                break;
            }
        }
        let mut index = EventIndex {
            chunks,
            collections,
            events_file: Some(events_file),
            chunks_file: Some(chunks_file),
            durable_file: Some(durable_file),
            seqs: Seqs::in_memory(),
        };
        recovery.dropped_records = n_records.saturating_sub(index.next_seq());

        // 3. Every event after the durable mark, frame by frame; cut at the first bad one.
        let mut times: HashMap<u64, i64> = HashMap::new();
        let from = index.pos_of(verify_from.max(index.first_seq()));
        let end_seq = index.next_seq();
        let mut bad_at = None;
        index.walk(from, usize::MAX, |pos, e| {
            let expect = match e.collection {
                COLLECTION_UNKNOWN => CollectionCheck::Any,
                COLLECTION_NONE => CollectionCheck::Absent,
                id => index
                    .collections
                    .name(id)
                    .map_or(CollectionCheck::Any, CollectionCheck::Named),
            };
            match check(pos, e, expect) {
                Some(t) => {
                    times.insert(pos.seq, t);
                    true
                }
                None => {
                    bad_at = Some(pos.seq);
                    false
                }
            }
        });
        recovery.verified_events = end_seq.saturating_sub(from.seq);
        if let Some(seq) = bad_at {
            recovery.invalid_tail_events = end_seq - seq;
            recovery.verified_events -= end_seq - seq;
            index.truncate_to(seq);
            rebuilt.truncate(index.chunks.len());
            // The chunk the cut fell in is partial now: its maximum is rescanned.
            if let Some(r) = rebuilt.back_mut() {
                *r = true;
            }
        }

        // A complete last chunk is followed by an empty one (appends go there).
        let last = index
            .chunks
            .back()
            .map(|c| (c.entries.len(), c.end_offsets(), c.first_seq));
        if let Some((len, offs, first_seq)) = last
            && len as u64 == CHUNK_EVENTS
        {
            index.chunks.push_back(Chunk {
                first_seq: first_seq + CHUNK_EVENTS,
                offs,
                max_time_us: i64::MIN,
                appended_at_us: 0,
                entries: Vec::with_capacity(CHUNK_EVENTS as usize),
                times: ChunkTimes::new(),
            });
            rebuilt.push_back(true);
        }

        // 4. Running maxima: rescan rebuilt and partial chunks through the upstream clock,
        // then make the whole sequence monotonic, whatever the headers said.
        for (i, rescan) in rebuilt.iter().copied().enumerate() {
            if rescan {
                let max = index.rescan_max(i, &mut times, check);
                let c = &mut index.chunks[i];
                c.max_time_us = max;
                if c.appended_at_us == 0 {
                    c.appended_at_us = now_us();
                }
            }
            if i > 0 {
                let prev = index.chunks[i - 1].max_time_us;
                let c = &mut index.chunks[i];
                c.max_time_us = c.max_time_us.max(prev);
            }
        }

        // 5. Collection ids the table does not have (lost lines): "unknown", so that filters
        // read the JSON instead of trusting a name — also on disk, or a name interned later
        // would take the lost id.
        let known = index.collections.len();
        let mut remapped = Vec::new();
        for (i, c) in index.chunks.iter_mut().enumerate() {
            let mut any = false;
            for e in c.entries.iter_mut() {
                if !matches!(e.collection, COLLECTION_NONE | COLLECTION_UNKNOWN)
                    && e.collection as usize >= known
                {
                    e.collection = COLLECTION_UNKNOWN;
                    recovery.unknown_collections += 1;
                    any = true;
                }
            }
            if any {
                remapped.push(i);
            }
        }

        // 6. Make the files agree with memory.
        for (i, c) in index.chunks.iter().enumerate() {
            if rebuilt[i] && c.entries.len() as u64 == CHUNK_EVENTS {
                index.write_header(c)?;
            }
        }
        for i in remapped {
            let c = &index.chunks[i];
            let bytes: Vec<u8> = c.entries.iter().flat_map(|e| e.to_bytes()).collect();
            if let Some(f) = &index.events_file {
                f.write_all_at(&bytes, c.first_seq * ENTRY_BYTES)?;
            }
        }
        index.rewrite_tail_records()?;
        recovery.events = index.next_seq() - index.first_seq();
        // The seqs continue after the recovered end (past anything published, after an
        // unclean stop).
        let (seqs, start) = Seqs::open(dir, index.next_seq())?;
        index.seqs = seqs;
        recovery.seqs = Some(start);
        Ok((index, recovery))
    }

    /// The running maximum of chunk `i` rebuilt from its frames: the previous chunk's maximum
    /// and the indexed times of its events, through an upstream clock seeded with the events
    /// before it. `times` caches what verification already read.
    fn rescan_max(&self, i: usize, times: &mut HashMap<u64, i64>, check: &mut CheckFn<'_>) -> i64 {
        let chunk = &self.chunks[i];
        let prev = i.checked_sub(1).map(|p| &self.chunks[p]);
        let mut time_of = |pos: EventPos, e: &EventEntry| -> Option<i64> {
            if let Some(t) = times.get(&pos.seq) {
                return Some(*t);
            }
            let t = check(pos, e, CollectionCheck::Any)?;
            times.insert(pos.seq, t);
            Some(t)
        };
        let seed_from = chunk
            .first_seq
            .saturating_sub(crate::clock::RECENT_EVENTS as u64)
            .max(self.first_seq());
        let mut seed = Vec::new();
        if seed_from < chunk.first_seq {
            self.walk(
                self.pos_of(seed_from),
                (chunk.first_seq - seed_from) as usize,
                |pos, e| {
                    seed.extend(time_of(pos, e));
                    true
                },
            );
        }
        let mut clock = crate::clock::UpstreamClock::seeded(seed);
        // The silence before the chunk is unknown; the chunk's own append span (wall clock,
        // when both ends are known) stands in for the time that passed.
        let span = match prev {
            Some(p) if chunk.appended_at_us > 0 && p.appended_at_us > 0 => {
                chunk.appended_at_us.saturating_sub(p.appended_at_us).max(0)
            }
            _ => 0,
        };
        let mut since = std::time::Duration::from_micros(span as u64);
        let mut max = prev.map_or(i64::MIN, |p| p.max_time_us);
        self.walk(chunk.start(), chunk.entries.len(), |pos, e| {
            if let Some(t) = time_of(pos, e) {
                max = max.max(clock.observe(t, since));
                since = std::time::Duration::ZERO;
            }
            true
        });
        max
    }

    fn write_header(&self, c: &Chunk) -> io::Result<()> {
        let header = ChunkHeader {
            offs: c.offs,
            max_time_us: c.max_time_us,
            appended_at_us: c.appended_at_us,
        };
        if let Some(f) = &self.chunks_file {
            f.write_all_at(
                &header.to_bytes(),
                c.first_seq / CHUNK_EVENTS * CHUNK_RECORD_BYTES,
            )?;
        }
        Ok(())
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

    /// After recovery: make the files agree with memory — cut records past the end, punch the
    /// records of discarded chunks, and pull the durable mark back if the end is now below it
    /// (what is appended next is not durable yet).
    fn rewrite_tail_records(&mut self) -> io::Result<()> {
        let next = self.next_seq();
        let first = self.first_seq() / CHUNK_EVENTS * CHUNK_EVENTS;
        if let Some(f) = &self.events_file {
            f.set_len(next * ENTRY_BYTES)?;
            if first > 0 && seek_data(f)?.is_some_and(|d| d < first * ENTRY_BYTES) {
                punch(f, 0, first * ENTRY_BYTES)?;
            }
        }
        if let Some(f) = &self.chunks_file {
            let complete = next / CHUNK_EVENTS;
            f.set_len(complete * CHUNK_RECORD_BYTES)?;
        }
        self.persist_front_header()?;
        if let Some(f) = &self.durable_file
            && read_durable_mark(f)?.is_some_and(|m| m > next)
        {
            f.write_all_at(&durable_mark_bytes(next), 0)?;
            f.sync_data()?;
        }
        Ok(())
    }

    /// When the oldest retained chunk is also the partial last one (retention dropped every
    /// complete chunk, or recovery cut into the oldest one), nothing else records where its
    /// frames start: the chain of records before it is punched and its own header is only
    /// written when it completes. Write that header now, or the next recovery cannot locate
    /// the chunk and discards every event in it.
    fn persist_front_header(&self) -> io::Result<()> {
        if self.chunks.len() != 1 {
            return Ok(());
        }
        match self.chunks.front() {
            Some(c) if c.first_seq > 0 => self.write_header(c),
            _ => Ok(()),
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
        EventPos {
            seq: self.next_seq(),
            offs: last.end_offsets(),
        }
    }

    /// Position of the oldest retained event.
    pub fn start_pos(&self) -> EventPos {
        match self.chunks.iter().find(|c| !c.entries.is_empty()) {
            Some(c) => c.start(),
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

    /// Writes the records of the event that will get [`EventIndex::next_seq`] — its 16-byte
    /// record and, if it completes its chunk, the chunk's header — without changing what
    /// readers see. Positional writes: a failed attempt is simply retried. `indexed_time_us`
    /// is the event's time for cursor lookups (see [`crate::clock`]).
    pub fn write_record(
        &self,
        entry: &EventEntry,
        indexed_time_us: i64,
        now_us: i64,
    ) -> io::Result<()> {
        let seq = self.next_seq();
        if let Some(f) = &self.events_file {
            crate::failpoint::write_all_at(f, &entry.to_bytes(), seq * ENTRY_BYTES, "events.idx")?;
        }
        let last = self.chunks.back().expect("index always has a chunk");
        if last.entries.len() as u64 + 1 == CHUNK_EVENTS
            && let Some(f) = &self.chunks_file
        {
            let header = ChunkHeader {
                offs: last.offs,
                max_time_us: last.max_time_us.max(indexed_time_us),
                appended_at_us: now_us,
            };
            let chunk_no = last.first_seq / CHUNK_EVENTS;
            crate::failpoint::write_all_at(
                f,
                &header.to_bytes(),
                chunk_no * CHUNK_RECORD_BYTES,
                "chunks.idx",
            )?;
        }
        Ok(())
    }

    /// Makes the event whose records [`EventIndex::write_record`] wrote visible to readers;
    /// returns its sequence number.
    pub fn push(&mut self, entry: EventEntry, indexed_time_us: i64, now_us: i64) -> u64 {
        let seq = self.next_seq();
        let last = self.chunks.back_mut().expect("index always has a chunk");
        last.entries.push(entry);
        last.max_time_us = last.max_time_us.max(indexed_time_us);
        last.times.push(last.max_time_us);
        last.appended_at_us = now_us;
        if last.entries.len() as u64 == CHUNK_EVENTS {
            let offs = last.end_offsets();
            let max_time_us = last.max_time_us;
            self.chunks.push_back(Chunk {
                first_seq: seq + 1,
                offs,
                max_time_us,
                appended_at_us: now_us,
                entries: Vec::with_capacity(CHUNK_EVENTS as usize),
                times: ChunkTimes::new(),
            });
        }
        seq
    }

    /// [`EventIndex::write_record`] then [`EventIndex::push`].
    pub fn append(&mut self, entry: EventEntry, time_us: i64, now_us: i64) -> io::Result<u64> {
        self.write_record(&entry, time_us, now_us)?;
        Ok(self.push(entry, time_us, now_us))
    }

    /// The first retained chunk whose running max reaches `cursor`: a binary search (chunk
    /// maxima never decrease; only the newest chunk can be empty, and it carries its
    /// predecessor's maximum, so it is never the answer unless nothing reaches the cursor).
    fn chunk_reaching(&self, cursor: i64) -> Option<&Chunk> {
        let i = self.chunks.partition_point(|c| c.max_time_us < cursor);
        self.chunks.get(i).filter(|c| !c.entries.is_empty())
    }

    /// Finds the first chunk a cursor can start in: the first whose running max reaches
    /// `cursor`. Returns (chunk start, its entries), or None if no retained event has
    /// `time_us >= cursor` (the cursor is live). O(log chunks) plus the entries' copy.
    pub fn cursor_chunk(&self, cursor: i64) -> Option<(EventPos, Vec<EventEntry>)> {
        let c = self.chunk_reaching(cursor)?;
        Some((c.start(), c.entries.clone()))
    }

    /// Where a cursor starts: the first retained event whose `time_us >= cursor`, found in
    /// memory in O(log n) when its chunk's per-event times are known, else the chunk to scan.
    pub fn cursor_start(&self, cursor: i64) -> CursorStart {
        let Some(c) = self.chunk_reaching(cursor) else {
            return CursorStart::Live;
        };
        let mut pos = c.start();
        let Some(k) = c.times.first_reaching(cursor) else {
            return CursorStart::Scan(pos, c.entries.clone());
        };
        for e in &c.entries[..k.min(c.entries.len())] {
            pos = pos.after(e);
        }
        CursorStart::At(pos)
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
        c.entries[..(seq - c.first_seq) as usize]
            .iter()
            .fold(c.start(), |pos, e| pos.after(e))
    }

    /// The first chunk start whose offsets are at or past all the given offsets (or the end).
    pub fn first_pos_at_or_after(&self, offs: Offsets) -> EventPos {
        self.chunks
            .iter()
            .filter(|c| !c.entries.is_empty())
            .find(|c| (0..ENCODINGS).all(|i| c.offs[i] >= offs[i]))
            .map_or_else(|| self.end_pos(), Chunk::start)
    }

    /// Sequence number of the frame starting at `offset` in the base log of `enc`, if it is a
    /// retained frame boundary there. (Events without a frame in that log — `#sync` in the
    /// v1 logs — share the boundary with the next event; the first of them is returned.)
    pub fn seq_at_offset(&self, offset: u64, enc: Encoding) -> Option<u64> {
        let key = |c: &Chunk| c.offs[enc.index()];
        let i = self.chunks.partition_point(|c| key(c) <= offset);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        let mut off = key(c);
        for (k, e) in c.entries.iter().enumerate() {
            if off == offset {
                return Some(c.first_seq + k as u64);
            }
            off += e.frame_len(enc);
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
                pos = pos.after(e);
            }
        }
    }

    /// End offsets of the newest chunk retention wants gone: every complete chunk last
    /// appended to before `cutoff_us`, and enough of the oldest ones to free `excess` bytes.
    /// Readers below it are all kicked at once, so that one stalled reader does not hold the
    /// others' kicks back chunk by chunk.
    pub fn retention_target(&self, cutoff_us: i64, excess: u64) -> Option<Offsets> {
        let complete = self.chunks.len().saturating_sub(1);
        let mut freed = 0u64;
        let mut target = None;
        for c in self.chunks.iter().take(complete) {
            if c.appended_at_us >= cutoff_us && freed >= excess {
                break;
            }
            let end = c.end_offsets();
            freed += (0..ENCODINGS).map(|i| end[i] - c.offs[i]).sum::<u64>();
            target = Some(end);
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
    pub fn seq_at_or_before_offset(&self, offset: u64, enc: Encoding) -> Option<u64> {
        let key = |c: &Chunk| c.offs[enc.index()];
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
        // chunks.idx: punch whole blocks only, once all 64 records in a block are dropped.
        let per_block = 4096 / CHUNK_RECORD_BYTES;
        if (chunk_no + 1).is_multiple_of(per_block)
            && let Some(f) = &self.chunks_file
        {
            punch(f, (chunk_no + 1 - per_block) * CHUNK_RECORD_BYTES, 4096)?;
        }
        self.persist_front_header()?;
        Ok(Some(self.start_pos()))
    }

    /// Duplicated handles on the index files, for syncing them without the index lock.
    pub fn sync_handles(&self) -> io::Result<SyncHandles> {
        let mut files = Vec::new();
        for f in [&self.events_file, &self.chunks_file, &self.collections.file]
            .into_iter()
            .flatten()
        {
            files.push(f.try_clone()?);
        }
        let durable = self
            .durable_file
            .as_ref()
            .map(File::try_clone)
            .transpose()?;
        Ok(SyncHandles { files, durable })
    }

    /// Flushes the index files (tests; the relay syncs through [`EventIndex::sync_handles`]).
    pub fn sync(&self) -> io::Result<()> {
        self.sync_handles()?.sync()
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
        self.chunks
            .iter()
            .map(|c| {
                std::mem::size_of::<Chunk>()
                    + c.entries.capacity() * std::mem::size_of::<EventEntry>()
                    + c.times.memory_bytes()
            })
            .sum()
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
            lens: [p, p / 2, p + 30, p / 3],
            did_hash: p,
            collection: 0,
            kind: 0,
            flags: 0,
            upstream_seq: p as u64 * 7,
        }
    }

    const PLAIN: Encoding = Encoding::V1Json;

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

    /// Seeded property test: for random non-monotonic times (including clock jumps of more
    /// than 71 minutes inside a chunk, which switch it to wide times), the in-memory lookup
    /// lands exactly on the first event with `time_us >= cursor`, with its offsets.
    #[test]
    fn in_memory_cursor_start_is_exact() {
        for seed in 0..30 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut idx = EventIndex::in_memory();
            let n = rng.usize(1..1500);
            let mut t = 1_700_000_000_000_000i64;
            let mut times = Vec::with_capacity(n);
            for i in 0..n {
                t += match rng.u8(0..100) {
                    0 => 5_000_000_000,           // a jump of 83 minutes
                    1..=30 => -rng.i64(0..3_000), // backwards
                    _ => rng.i64(0..2_000),
                };
                times.push(t);
                idx.append(entry(50 + (i as u32 * 7) % 300), t, 0).unwrap();
            }
            let probes: Vec<i64> = times
                .iter()
                .flat_map(|t| [*t - 1, *t, *t + 1])
                .chain([i64::MIN, 0, i64::MAX])
                .collect();
            for cursor in probes {
                let expected = times.iter().position(|t| *t >= cursor);
                match idx.cursor_start(cursor) {
                    CursorStart::At(pos) => {
                        let k = expected.expect("found an event none reaches");
                        assert_eq!(pos, idx.pos_of(k as u64), "seed {seed} cursor {cursor}");
                    }
                    CursorStart::Live => assert_eq!(expected, None, "seed {seed} {cursor}"),
                    CursorStart::Scan(..) => panic!("times are known for appended chunks"),
                }
            }
        }
    }

    #[test]
    fn chunk_times_switch_to_wide_on_big_jumps() {
        let mut times = ChunkTimes::new();
        times.push(10);
        times.push(10 + u32::MAX as i64);
        assert!(matches!(times, ChunkTimes::Compact { .. }));
        times.push(11 + u32::MAX as i64);
        assert_eq!(
            times,
            ChunkTimes::Wide(vec![10, 10 + u32::MAX as i64, 11 + u32::MAX as i64])
        );
        assert_eq!(times.first_reaching(11), Some(1));
        assert_eq!(ChunkTimes::Unknown.first_reaching(0), None);
    }

    #[test]
    fn positions_offsets_and_walk() {
        let mut idx = EventIndex::in_memory();
        for i in 0..600u32 {
            idx.append(entry(10 + i % 5), i as i64, 0).unwrap();
        }
        let pos = idx.pos_of(300);
        let expect: u64 = (0..300u32).map(|i| 10 + (i % 5) as u64).sum();
        assert_eq!(pos.offset(PLAIN), expect);
        assert_eq!(idx.seq_at_offset(expect, PLAIN), Some(300));
        assert_eq!(idx.seq_at_offset(expect + 1, PLAIN), None);
        let v2: u64 = (0..300u32).map(|i| 40 + (i % 5) as u64).sum();
        assert_eq!(pos.offset(Encoding::V2Json), v2);
        assert_eq!(idx.seq_at_offset(v2, Encoding::V2Json), Some(300));
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

    /// What was appended: per seq, its record, offsets and time.
    struct Model {
        entries: Vec<EventEntry>,
        offsets: Vec<Offsets>,
        times: Vec<i64>,
    }

    impl Model {
        fn end(&self) -> Offsets {
            advance(*self.offsets.last().unwrap(), self.entries.last().unwrap())
        }
    }

    fn extents(offs: Offsets) -> [LogExtent; ENCODINGS] {
        offs.map(|len| LogExtent { len, first_data: 0 })
    }

    fn test_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "jetrelay-idx-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A fresh persisted index in `dir` with `n` events (non-monotonic times, two
    /// collections), synced; `durable`: also mark them all durable.
    fn build(dir: &Path, n: u64, durable: bool) -> Model {
        let mut check = |_: EventPos, _: &EventEntry, _: CollectionCheck<'_>| Some(0);
        let (mut idx, rec) =
            EventIndex::open(dir, [LogExtent::default(); ENCODINGS], &mut check).unwrap();
        assert_eq!(rec.events, 0);
        assert_eq!(idx.collections.intern("app.bsky.feed.post").unwrap(), 0);
        assert_eq!(idx.collections.intern("app.bsky.feed.like").unwrap(), 1);
        let mut m = Model {
            entries: Vec::new(),
            offsets: Vec::new(),
            times: Vec::new(),
        };
        for i in 0..n {
            let mut e = entry(20 + (i % 3) as u32);
            e.collection = (i % 2) as u16;
            let t = 1_000_000 + i as i64 * 20 - if i % 3 == 0 { 45 } else { 0 };
            m.offsets.push(idx.end_pos().offs);
            idx.append(e, t, 1 + i as i64).unwrap();
            m.entries.push(e);
            m.times.push(t);
        }
        let h = idx.sync_handles().unwrap();
        h.sync().unwrap();
        if durable {
            h.mark_durable(n).unwrap();
        }
        m
    }

    /// Recovery against the model: an event's frames "are there" iff it is asked for at the
    /// model's offsets with the model's record, and its seq is below `logged` (what reached
    /// the logs).
    fn reopen(dir: &Path, m: &Model, logged: u64) -> (EventIndex, Recovery) {
        let logged = logged.min(m.entries.len() as u64);
        let end = if logged == 0 {
            [0; ENCODINGS]
        } else {
            let i = logged as usize - 1;
            advance(m.offsets[i], &m.entries[i])
        };
        let mut check = |pos: EventPos, e: &EventEntry, _: CollectionCheck<'_>| {
            let i = pos.seq as usize;
            (pos.seq < logged && m.offsets.get(i) == Some(&pos.offs) && m.entries[i] == *e)
                .then(|| m.times[i])
        };
        EventIndex::open(dir, extents(end), &mut check).unwrap()
    }

    /// Every retained event is where the model says, and every cursor lookup finds the first
    /// retained event with time ≥ cursor (or the end), monotonically.
    fn assert_consistent(idx: &EventIndex, m: &Model) {
        let first = idx.first_seq();
        let mut seen = 0;
        idx.walk(idx.start_pos(), usize::MAX, |pos, e| {
            let i = pos.seq as usize;
            assert_eq!(pos.offs, m.offsets[i], "seq {i}");
            assert_eq!(*e, m.entries[i], "seq {i}");
            seen += 1;
            true
        });
        assert_eq!(seen, idx.next_seq() - first);
        let retained = first as usize..idx.next_seq() as usize;
        let mut last = 0;
        for cursor in (0..200).map(|k| 999_900 + k * 157) {
            let want = retained
                .clone()
                .find(|&i| m.times[i] >= cursor)
                .unwrap_or(retained.end) as u64;
            let got = idx
                .cursor_chunk(cursor)
                .map_or(idx.next_seq(), |(pos, entries)| {
                    (pos.seq..pos.seq + entries.len() as u64)
                        .find(|&s| m.times[s as usize] >= cursor)
                        .unwrap_or(pos.seq + entries.len() as u64)
                });
            assert_eq!(got, want, "cursor {cursor}");
            assert!(got >= last, "monotonic");
            last = got;
        }
    }

    #[test]
    fn persist_and_recover_with_torn_tail() {
        let dir = test_dir("torn");
        let m = build(&dir, 700, false);
        // The logs lost the last 2 events' frames (crash before they were written).
        let (idx, rec) = reopen(&dir, &m, 698);
        assert_eq!(rec.dropped_records + rec.invalid_tail_events, 2);
        assert_eq!(idx.next_seq(), 698);
        assert_eq!(idx.collections.name(0), Some("app.bsky.feed.post"));
        assert_consistent(&idx, &m);
        drop(idx);
        // Verification rejects event 650 onwards.
        let (idx, rec) = reopen(&dir, &m, 650);
        assert_eq!(idx.next_seq(), 650);
        assert_eq!(rec.dropped_records + rec.invalid_tail_events, 48);
        assert_eq!(idx.cursor_chunk(1_006_000).unwrap().0.seq, 256);
        // Recovered chunks have no per-event times: a cursor there needs a scan.
        match idx.cursor_start(1_006_000) {
            CursorStart::Scan(pos, entries) => {
                assert_eq!(pos.seq, 256);
                assert_eq!(entries.len(), 256);
            }
            other => panic!("{other:?}"),
        }
        assert_consistent(&idx, &m);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_complete_chunk_without_its_header_is_rebuilt() {
        let dir = test_dir("noheader");
        let m = build(&dir, 522, false);
        // A crash between chunk 1's last record and its header.
        let chunks = OpenOptions::new()
            .write(true)
            .open(dir.join("chunks.idx"))
            .unwrap();
        chunks.set_len(CHUNK_RECORD_BYTES).unwrap();
        let (idx, rec) = reopen(&dir, &m, 522);
        assert_eq!(rec.rebuilt_headers, 1);
        assert_eq!(idx.next_seq(), 522);
        assert_consistent(&idx, &m);
        drop(idx);
        assert_eq!(
            std::fs::metadata(dir.join("chunks.idx")).unwrap().len(),
            2 * CHUNK_RECORD_BYTES,
            "the header was written back"
        );
        let (idx, rec) = reopen(&dir, &m, 522);
        assert!(!rec.repaired(), "{rec:?}");
        assert_consistent(&idx, &m);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn zeroed_or_wrong_chunk_headers_are_rebuilt_from_the_chain() {
        let dir = test_dir("zeroheader");
        let m = build(&dir, 1300, false);
        let chunks = OpenOptions::new()
            .write(true)
            .open(dir.join("chunks.idx"))
            .unwrap();
        // Chunk 1's header zeroed (a zero-extended file), chunk 3's pointing elsewhere with a
        // running maximum far too high.
        chunks
            .write_all_at(&[0u8; CHUNK_RECORD_BYTES as usize], CHUNK_RECORD_BYTES)
            .unwrap();
        let bogus = ChunkHeader {
            offs: [17, 3, 4, 5],
            max_time_us: i64::MAX,
            appended_at_us: 5,
        };
        chunks
            .write_all_at(&bogus.to_bytes(), 3 * CHUNK_RECORD_BYTES)
            .unwrap();
        let (idx, rec) = reopen(&dir, &m, 1300);
        assert_eq!(rec.rebuilt_headers, 2, "{rec:?}");
        assert_eq!(rec.discarded_events, 0);
        assert_eq!(idx.next_seq(), 1300);
        assert_consistent(&idx, &m);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn damage_in_the_synced_part_discards_the_older_events_never_misaligns() {
        let dir = test_dir("zerorecords");
        let m = build(&dir, 1300, true);
        // Chunk 1's records zero-filled (256..511): they cannot be located, and neither can
        // chunk 0's successors through them.
        let events = OpenOptions::new()
            .write(true)
            .open(dir.join("events.idx"))
            .unwrap();
        events
            .write_all_at(
                &vec![0u8; (CHUNK_EVENTS * ENTRY_BYTES) as usize],
                CHUNK_EVENTS * ENTRY_BYTES,
            )
            .unwrap();
        let (idx, rec) = reopen(&dir, &m, 1300);
        assert_eq!(rec.discarded_events, 512, "{rec:?}");
        assert_eq!(idx.first_seq(), 512);
        assert_eq!(idx.next_seq(), 1300);
        assert_consistent(&idx, &m);
        drop(idx);
        assert_eq!(
            seek_data(&File::open(dir.join("events.idx")).unwrap()).unwrap(),
            Some(512 * ENTRY_BYTES),
            "the discarded records are punched"
        );
        std::fs::remove_dir_all(&dir).ok();

        // A record altered so that it still looks sane: the chain points chunk 2 at the wrong
        // offsets, its header at the right ones; the older chunks are discarded.
        let dir = test_dir("badrecord");
        let m = build(&dir, 1300, true);
        let mut e = m.entries[300];
        e.lens[0] += 1;
        let events = OpenOptions::new()
            .write(true)
            .open(dir.join("events.idx"))
            .unwrap();
        events
            .write_all_at(&e.to_bytes(), 300 * ENTRY_BYTES)
            .unwrap();
        let (idx, rec) = reopen(&dir, &m, 1300);
        assert_eq!(idx.first_seq(), 512, "{rec:?}");
        assert_eq!(rec.discarded_events, 512);
        assert_consistent(&idx, &m);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn collections_torn_or_lost_lines_never_name_the_wrong_collection() {
        let dir = test_dir("collections");
        let m = build(&dir, 300, false);
        // A torn third line: cut. Then the second line lost too: ids 1 become "unknown".
        let path = dir.join("collections.txt");
        std::fs::write(
            &path,
            "app.bsky.feed.post\napp.bsky.feed.like\napp.bsky.gra",
        )
        .unwrap();
        let (idx, rec) = reopen(&dir, &m, 300);
        assert_eq!(rec.collections_cut_bytes, 12);
        assert_eq!(rec.unknown_collections, 0);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        drop(idx);
        std::fs::write(&path, "app.bsky.feed.post\n").unwrap();
        let (idx, rec) = reopen(&dir, &m, 300);
        assert_eq!(rec.unknown_collections, 150);
        let mut unknown = 0;
        idx.walk(idx.start_pos(), usize::MAX, |pos, e| {
            if pos.seq % 2 == 1 {
                assert_eq!(e.collection, COLLECTION_UNKNOWN);
                unknown += 1;
            } else {
                assert_eq!(e.collection, 0);
            }
            true
        });
        assert_eq!(unknown, 150);
        drop(idx);
        // Persisted: a name interned later does not take the lost id over.
        let (idx, rec) = {
            let mut check = |pos: EventPos, _: &EventEntry, _: CollectionCheck<'_>| {
                Some(m.times[pos.seq as usize])
            };
            EventIndex::open(&dir, extents(m.end()), &mut check).unwrap()
        };
        assert_eq!(rec.unknown_collections, 0);
        assert_eq!(idx.first_seq(), 0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn records_round_trip_and_sync_events_have_no_v1_frames() {
        let e = entry(300);
        assert_eq!(EventEntry::from_bytes(&e.to_bytes()), e);
        assert!(record_is_sane(&e));
        let sync = EventEntry {
            lens: [0, 0, 200, 90],
            kind: kind_code(EventKind::Sync),
            ..entry(1)
        };
        assert_eq!(sync.kind(), EventKind::Sync);
        assert!(record_is_sane(&sync));
        assert!(
            !record_is_sane(&EventEntry {
                lens: [0, 0, 200, 90],
                ..entry(1)
            }),
            "a commit without v1 frames"
        );
        assert!(!record_is_sane(&EventEntry::default()), "a zeroed record");
        let h = ChunkHeader {
            offs: [1, 2, 3, 4],
            max_time_us: -5,
            appended_at_us: 9,
        };
        assert_eq!(ChunkHeader::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn a_failed_collection_write_leaves_no_partial_line() {
        let dir = test_dir("intern");
        let path = dir.join("collections.txt");
        let (mut c, _) = Collections::load(&path).unwrap();
        assert_eq!(c.intern("a.b").unwrap(), 0);
        // As if a write had failed half-way: a torn tail beyond the known length.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"tor", 4).unwrap();
        assert_eq!(c.intern("c.d").unwrap(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a.b\nc.d\n");
        let (c, cut) = Collections::load(&path).unwrap();
        assert_eq!((c.len(), cut), (2, 0));
        std::fs::remove_dir_all(&dir).ok();
    }
}
