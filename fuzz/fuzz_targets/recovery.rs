//! Log + index recovery (`relay::recover`) from damaged directory contents.
//!
//! A structured target: a plan of steps runs real appends through the writer's append path
//! (`LogWriter::append_event` into a hub built from `recover`) in a scratch directory, with
//! restarts, retention (`enforce_retention` and chunk drops with punching) and damage between
//! them, and checks every recovery against a model of what was appended.
//!
//! Two classes of damage:
//! - *Crash* damage is what a power loss can leave, given that the logs and the index are
//!   fdatasync'ed together once a second and nothing orders their writeback: any file cut
//!   short anywhere; the logs' tails (the frames of the newest 256 events, less than a
//!   second of the public feed) zeroed from any byte on, the size kept; the index files'
//!   newest records zeroed in whole records (16/32-byte records never straddle a page); a
//!   torn, unfinished last line in `collections.txt` (names are synced before any record
//!   names them); zeros appended; `durable.idx` (one 16-byte record) cut to a whole record.
//!   `seqs.idx` is rewritten and renamed into place after a sync: no crash damages it. After crash damage the oracle is strict: every retained event's frames are
//!   byte-identical to the ones appended under that sequence number, its index record names
//!   its DID hash, kind and collection, and a cursor never skips an event at or after it.
//! - *Corruption* (garbage anywhere, files deleted, an old copy of the index restored) has no
//!   such oracle; recovery must not panic, must hand back a consistent index (positions inside
//!   the files, appends work), and a clean restart must serve exactly what the previous one
//!   served.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use jetrelay::encoding::Encoding;
use jetrelay::event::{EventKind, did_hash, parse_event};
use jetrelay::hub::Hub;
use jetrelay::index::{COLLECTION_NONE, COLLECTION_UNKNOWN, kind_code};
use jetrelay::upstream::Incoming;
use jetrelay::writer::{LogWriter, RetentionPolicy, WriterOptions, enforce_retention};
use jetrelay_fuzz::ScratchDir;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The newest events whose bytes a crash may damage (see the module comment).
const CRASH_WINDOW_EVENTS: usize = 256;
/// Bounds one plan's cost: events per append step and steps per plan.
const MAX_APPEND: u16 = 700;
const MAX_STEPS: usize = 12;

const FILES: [&str; 9] = [
    "plain.log",
    "zstd.log",
    "v2.log",
    "v2zstd.log",
    "events.idx",
    "chunks.idx",
    "collections.txt",
    "seqs.idx",
    "durable.idx",
];

/// Files of the data directory (the four logs first, in [`Encoding`] order).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum FileSel {
    Plain,
    Zstd,
    V2,
    V2Zstd,
    Events,
    Chunks,
    Collections,
    /// The seq segments (rewritten whole and renamed into place).
    Seqs,
    /// The 16-byte durable mark (written in place at offset 0).
    Durable,
}

impl FileSel {
    fn name(self) -> &'static str {
        FILES[self as usize]
    }
}

#[derive(Arbitrary, Debug)]
enum Crash {
    /// Cut the file to `len - cut % (len + 1)` bytes.
    Truncate { file: FileSel, cut: u32 },
    /// Zero the last `n` bytes of a log (`log % 4`, by encoding) inside the crash window,
    /// size kept.
    ZeroLogTail { log: u8, n: u32 },
    /// Zero the last `n` records of an index file inside the crash window, size kept.
    ZeroRecords { chunks: bool, n: u16 },
    /// A name torn while being appended to `collections.txt` (interned names are synced
    /// before any record names them, so only an unfinished last line can be lost).
    TornName { bytes: Vec<u8> },
    /// Zeros appended (the size was extended, the data never written).
    Extend { file: FileSel, n: u16 },
}

#[derive(Arbitrary, Debug)]
enum Corruption {
    /// Cut `collections.txt` anywhere in the names the newest events interned.
    CutCollections {
        cut: u16,
    },
    Garbage {
        file: FileSel,
        at: u32,
        bytes: Vec<u8>,
    },
    Delete {
        file: FileSel,
    },
    /// Restore the index files saved at an earlier restart.
    OldIndex,
    Crash(Crash),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Append {
        count: u16,
        seed: u16,
    },
    Restart,
    /// `enforce_retention` with a zero disk cap (drops every complete chunk) or none.
    Retention {
        all: bool,
    },
    /// Drop `n` oldest chunks and punch the logs below them, as retention does.
    DropChunks {
        n: u8,
    },
    Crash(Vec<Crash>),
    Corrupt(Vec<Corruption>),
}

/// One appended event as the model remembers it.
#[derive(Clone)]
struct Appended {
    /// Its frames as written, by encoding.
    frames: [Vec<u8>; 4],
    time_us: i64,
    did: String,
    kind: EventKind,
    collection: Option<String>,
}

/// What was appended, by sequence number, and what `collections.txt` should hold.
#[derive(Default)]
struct Model {
    events: Vec<Appended>,
    /// Oldest sequence number retention has not dropped.
    first: usize,
    /// Lines of `collections.txt` with the sequence number that interned each.
    names: Vec<(String, usize)>,
    /// Whether the strict oracle still applies (no corruption so far).
    strict: bool,
    /// Whether retention ever dropped a chunk (cursor lookups are then only conservative).
    dropped: bool,
}

struct Live {
    hub: Arc<Hub>,
    writer: LogWriter,
}

/// Stands for an event the model no longer knows (never compared: it is not retained).
fn placeholder() -> Appended {
    Appended {
        frames: Default::default(),
        time_us: 0,
        did: String::new(),
        kind: EventKind::Commit,
        collection: None,
    }
}

fn templates() -> &'static [Value] {
    static T: OnceLock<Vec<Value>> = OnceLock::new();
    T.get_or_init(|| {
        include_str!("../../assets/jetstream-v1-sample.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("sample event"))
            .collect()
    })
}

/// Event `k` of an append step: a real event with a fresh DID, a non-monotonic `time_us`,
/// and now and then a new collection (so `collections.txt` keeps growing).
fn make_event(seed: u16, k: usize, seq: usize) -> Vec<u8> {
    let t = templates();
    let mut v = t[(usize::from(seed) + k * 7) % t.len()].clone();
    let jitter = ((seed as i64).wrapping_mul(31) + k as i64 * 977) % 400_000 - 200_000;
    v["time_us"] = (1_700_000_000_000_000i64 + seq as i64 * 1_000 + jitter).into();
    v["did"] = format!("did:plc:fuzz{}", (usize::from(seed) + k) % 23).into();
    if k % 11 == 3
        && let Some(c) = v.get_mut("commit")
    {
        c["collection"] = format!("com.example.c{}x{}", seed % 5, k % 37).into();
    }
    serde_json::to_vec(&v).expect("serializes")
}

fn open(dir: &Path) -> anyhow::Result<Live> {
    let settings = jetrelay::config::RawSettings {
        data_dir: Some(dir.to_path_buf()),
        ..jetrelay::config::RawSettings::default()
    }
    .validate()?;
    let (hub, _) = jetrelay::relay::open_hub(&settings)?;
    let writer = LogWriter::new(hub.clone(), Vec::new(), WriterOptions::default())?;
    Ok(Live { hub, writer })
}

fn read_at(file: &std::fs::File, off: u64, len: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    file.read_exact_at(&mut buf, off).ok()?;
    Some(buf)
}

/// Every retained event as served: (seq, its frames by encoding).
fn served(live: &Live) -> Vec<(u64, [Vec<u8>; 4])> {
    let hub = &live.hub;
    let index = hub.index();
    let end = index.end_pos();
    for enc in Encoding::ALL {
        let len = hub.base(enc).file().metadata().expect("stat").len();
        assert!(end.offset(enc) <= len, "index past the {enc} log");
        assert_eq!(hub.base(enc).end(), end.offset(enc), "{enc} log end");
    }
    let mut out = Vec::new();
    let mut expect_seq = index.first_seq();
    index.walk(index.start_pos(), usize::MAX, |pos, e| {
        assert_eq!(pos.seq, expect_seq, "sequence numbers are contiguous");
        expect_seq += 1;
        assert_eq!(pos, index.pos_of(pos.seq));
        let frames = Encoding::ALL.map(|enc| {
            read_at(hub.base(enc).file(), pos.offset(enc), e.frame_len(enc))
                .expect("frame inside the log")
        });
        out.push((pos.seq, frames));
        true
    });
    assert_eq!(expect_seq, index.next_seq());
    out
}

/// The strict oracle: what is served is what was appended.
fn check_strict(live: &Live, model: &mut Model) {
    let hub = &live.hub;
    let (first, next) = {
        let index = hub.index();
        (index.first_seq() as usize, index.next_seq() as usize)
    };
    if first == next && next > model.events.len() {
        // Nothing retained and the numbering moved on: an index file of holes reads as one
        // that retention punched whole. Harmless (no event is served); keep numbering along.
        model.events.resize(next, placeholder());
    }
    assert!(
        next <= model.events.len(),
        "recovered {next} events, {} were appended",
        model.events.len()
    );
    // Recovery may drop a torn tail (never more than the crash could have touched is not
    // checked here: losing events is allowed, serving wrong ones is not).
    model.events.truncate(next);
    if first > model.first {
        model.first = first;
    }
    let index = hub.index();
    let mut n = 0;
    index.walk(index.start_pos(), usize::MAX, |pos, e| {
        let seq = pos.seq as usize;
        let want = &model.events[seq];
        for enc in Encoding::ALL {
            let got = read_at(hub.base(enc).file(), pos.offset(enc), e.frame_len(enc));
            assert!(
                got.as_deref() == Some(&want.frames[enc.index()][..]),
                "seq {seq}: {enc} frame differs from the one appended"
            );
        }
        assert_eq!(e.did_hash, did_hash(&want.did), "seq {seq}: DID hash");
        assert_eq!(e.kind, kind_code(want.kind), "seq {seq}: kind");
        match (&want.collection, e.collection) {
            (None, c) => assert_eq!(c, COLLECTION_NONE, "seq {seq}: collection of a non-commit"),
            (Some(_), COLLECTION_UNKNOWN) => {}
            (Some(name), id) => assert_eq!(
                index.collections.name(id),
                Some(name.as_str()),
                "seq {seq}: collection id {id} names another collection"
            ),
        }
        n += 1;
        true
    });
    assert_eq!(n, next - first);
    drop(index);
    // Cursors: the first retained event at or after the cursor, never later.
    let retained = &model.events[first..next];
    let mut cursors: Vec<i64> = retained.iter().step_by(17).map(|e| e.time_us).collect();
    cursors.extend([i64::MIN, 0, 1_700_000_000_000_000, i64::MAX / 2]);
    if let Some(max) = retained.iter().map(|e| e.time_us).max() {
        cursors.extend([max, max + 1]);
    }
    for c in cursors {
        let exact = retained
            .iter()
            .position(|e| e.time_us >= c)
            .map_or(next, |i| first + i) as u64;
        let got = hub.resolve_cursor(Some(c));
        assert_eq!(
            got,
            hub.index().pos_of(got.seq),
            "cursor position is an event boundary"
        );
        assert!(
            got.seq <= exact,
            "cursor {c}: resolved to seq {}, but seq {exact} is the first at or after it",
            got.seq
        );
        if !model.dropped {
            assert_eq!(got.seq, exact, "cursor {c}");
        }
    }
}

fn file_len(dir: &Path, f: FileSel) -> u64 {
    std::fs::metadata(dir.join(f.name())).map_or(0, |m| m.len())
}

fn write_at(dir: &Path, f: FileSel, at: u64, bytes: &[u8]) {
    if let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(f.name()))
    {
        let _ = file.write_all_at(bytes, at);
    }
}

fn set_len(dir: &Path, f: FileSel, len: u64) {
    if let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(f.name()))
    {
        let _ = file.set_len(len);
    }
}

/// Byte offset in a log where the crash window starts (the newest 256 events' frames).
fn window_start(model: &Model, enc: Encoding, log_len: u64) -> u64 {
    let n = model.events.len();
    let from = n.saturating_sub(CRASH_WINDOW_EVENTS);
    let tail: u64 = model.events[from..]
        .iter()
        .map(|e| e.frames[enc.index()].len() as u64)
        .sum();
    log_len.saturating_sub(tail)
}

fn apply_crash(dir: &Path, model: &Model, c: &Crash) {
    match *c {
        Crash::Truncate { file, cut } => {
            let len = file_len(dir, file);
            let mut new_len = len - u64::from(cut) % (len + 1);
            match file {
                FileSel::Collections => {
                    // Synced names survive a crash; only an unfinished last line can be cut.
                    let text = std::fs::read(dir.join(file.name())).unwrap_or_default();
                    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    new_len = new_len.max(complete as u64);
                }
                // Renamed into place after a sync: a crash leaves it whole.
                FileSel::Seqs => return,
                // One 16-byte record in one sector: there or not (a file created, never
                // written).
                FileSel::Durable => new_len = new_len / 16 * 16,
                _ => {}
            }
            set_len(dir, file, new_len);
        }
        Crash::ZeroLogTail { log, n } => {
            let enc = Encoding::ALL[usize::from(log) % 4];
            let file = [FileSel::Plain, FileSel::Zstd, FileSel::V2, FileSel::V2Zstd][enc.index()];
            let len = file_len(dir, file);
            let start = window_start(model, enc, len);
            let n = u64::from(n) % (len - start + 1);
            write_at(dir, file, len - n, &vec![0u8; n as usize]);
        }
        Crash::ZeroRecords { chunks, n } => {
            let (file, size, window) = if chunks {
                (FileSel::Chunks, 64u64, 2u64)
            } else {
                (FileSel::Events, 32, CRASH_WINDOW_EVENTS as u64)
            };
            let len = file_len(dir, file) / size * size;
            let n = u64::from(n) % (window.min(len / size) + 1);
            write_at(dir, file, len - n * size, &vec![0u8; (n * size) as usize]);
        }
        Crash::TornName { ref bytes } => {
            let len = file_len(dir, FileSel::Collections);
            let partial: Vec<u8> = bytes
                .iter()
                .copied()
                .filter(|&b| b != b'\n')
                .take(40)
                .collect();
            write_at(dir, FileSel::Collections, len, &partial);
        }
        Crash::Extend { file, n } => {
            if let FileSel::Seqs = file {
                // Renamed into place after a sync: a crash leaves it as it was.
                return;
            }
            let len = file_len(dir, file);
            set_len(dir, file, len + u64::from(n % 8192));
        }
    }
}

/// Cuts `collections.txt` anywhere in the names the newest events interned (corruption: those
/// names were synced before any record named them).
fn cut_collections(dir: &Path, model: &Model, cut: u16) {
    let recent = model.events.len().saturating_sub(CRASH_WINDOW_EVENTS);
    let len = file_len(dir, FileSel::Collections);
    let keep: u64 = model
        .names
        .iter()
        .take_while(|(_, seq)| *seq < recent)
        .map(|(name, _)| name.len() as u64 + 1)
        .sum();
    if len > keep {
        set_len(
            dir,
            FileSel::Collections,
            len - u64::from(cut) % (len - keep + 1),
        );
    }
}

fn run(plan: &[Step]) {
    let scratch = ScratchDir::new("recovery");
    let dir = scratch.0.as_path();
    let mut model = Model {
        strict: true,
        ..Model::default()
    };
    let mut live = Some(open(dir).expect("an empty directory recovers"));
    let mut saved_index: Option<(Vec<u8>, Vec<u8>)> = None;
    for step in plan.iter().take(MAX_STEPS) {
        // Damage happens to a stopped relay.
        let damage = matches!(step, Step::Crash(_) | Step::Corrupt(_));
        if damage || matches!(step, Step::Restart) {
            drop(live.take());
            saved_index = Some((
                std::fs::read(dir.join("events.idx")).unwrap_or_default(),
                std::fs::read(dir.join("chunks.idx")).unwrap_or_default(),
            ));
        }
        match step {
            Step::Append { count, seed } => {
                let Some(l) = live.as_mut() else { continue };
                for k in 0..usize::from(count % MAX_APPEND) {
                    let seq = model.events.len();
                    assert_eq!(
                        l.hub.index().next_seq(),
                        seq as u64,
                        "model and index number alike"
                    );
                    let json = make_event(*seed, k, seq);
                    let meta = parse_event(&json).expect("template events are valid");
                    let names_before = l.hub.index().collections.len();
                    let (time_us, did, kind) = (meta.time_us, meta.did.to_string(), meta.kind);
                    let collection = meta.collection.as_ref().map(|c| c.to_string());
                    l.writer
                        .append_event(&Incoming::v1(&json, meta))
                        .expect("append");
                    let index = l.hub.index();
                    if index.collections.len() > names_before
                        && let Some(c) = &collection
                    {
                        model.names.push((c.clone(), seq));
                    }
                    let pos = index.pos_of(seq as u64);
                    let e_end = index.end_pos();
                    drop(index);
                    let frames = Encoding::ALL.map(|enc| {
                        read_at(
                            l.hub.base(enc).file(),
                            pos.offset(enc),
                            e_end.offset(enc) - pos.offset(enc),
                        )
                        .expect("appended")
                    });
                    assert!(
                        frames[0].windows(8).any(|w| w == b"\"cursor\""),
                        "the text frame carries the relay's seq"
                    );
                    model.events.push(Appended {
                        frames,
                        time_us,
                        did,
                        kind,
                        collection,
                    });
                }
            }
            Step::Retention { all } => {
                let Some(l) = live.as_ref() else { continue };
                let policy = RetentionPolicy {
                    max_age: std::time::Duration::from_secs(1 << 40),
                    max_disk: if *all { 0 } else { u64::MAX },
                };
                if enforce_retention(&l.hub, policy).expect("retention") > 0 {
                    model.dropped = true;
                }
            }
            Step::DropChunks { n } => {
                let Some(l) = live.as_ref() else { continue };
                for _ in 0..n % 4 {
                    let Some(ends) = l.hub.index().oldest_chunk().map(|c| c.end_offsets()) else {
                        break;
                    };
                    l.hub.index_mut().drop_oldest_chunk().expect("drop");
                    for (stream, end) in l.hub.bases().iter().zip(ends) {
                        stream.punch_below(end).expect("punch");
                    }
                    model.dropped = true;
                }
            }
            Step::Restart => {}
            Step::Crash(crashes) => {
                for c in crashes.iter().take(4) {
                    apply_crash(dir, &model, c);
                }
                // A torn last line is forgotten by recovery: the model's names stay.
            }
            Step::Corrupt(corruptions) => {
                for c in corruptions.iter().take(4) {
                    match c {
                        Corruption::Garbage { file, at, bytes } => {
                            let len = file_len(dir, *file);
                            write_at(dir, *file, u64::from(*at) % (len + 64), bytes);
                        }
                        Corruption::CutCollections { cut } => cut_collections(dir, &model, *cut),
                        Corruption::Delete { file } => {
                            let _ = std::fs::remove_file(dir.join(file.name()));
                        }
                        Corruption::OldIndex => {
                            if let Some((events, chunks)) = &saved_index {
                                let _ = std::fs::write(dir.join("events.idx"), events);
                                let _ = std::fs::write(dir.join("chunks.idx"), chunks);
                            }
                        }
                        Corruption::Crash(c) => apply_crash(dir, &model, c),
                    }
                }
                model.strict = false;
            }
        }
        if live.is_none() {
            // Restart: recover, check, and check that a clean restart changes nothing.
            let Ok(l) = open(dir) else {
                assert!(!model.strict, "recovery failed after crash damage");
                return;
            };
            let first = served(&l);
            if model.strict {
                check_strict(&l, &mut model);
            }
            drop(l);
            let l = open(dir).expect("a recovered directory recovers again");
            let again = served(&l);
            // Recovery repairs what it finds, so a second recovery has nothing left to change:
            // after crash damage and after corruption alike.
            if again != first {
                let at = first.iter().zip(&again).position(|(a, b)| a != b);
                let seqs =
                    |v: &[(u64, [Vec<u8>; 4])]| (v.first().map(|e| e.0), v.last().map(|e| e.0));
                panic!(
                    "a clean restart changed what is served: {} events {:?} then {} events {:?}, first difference at {at:?}",
                    first.len(),
                    seqs(&first),
                    again.len(),
                    seqs(&again)
                );
            }
            if !model.strict {
                // The model is meaningless now; keep only the sequence numbering.
                let next = l.hub.index().next_seq() as usize;
                model.events.truncate(next);
                model.events.resize(next, placeholder());
            }
            live = Some(l);
        }
    }
}

fuzz_target!(|plan: Vec<Step>| {
    run(&plan);
});
