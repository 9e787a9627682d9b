//! Crash at any point: the real append path (`LogWriter`, the logs, the index, retention) runs
//! in a child process (this test binary re-run with `TEST_JETRELAY_CRASH_CHILD_DIR`) that is
//! killed with `SIGKILL` just before — or half-way through — one of its writes, chosen at
//! random: a log frame, a collection name, an index record, a chunk header, the durable mark,
//! or between retention's punches. The parent then recovers the directory with the relay's own
//! `recover` and checks against a model of what was appended:
//!
//! - nothing whose append completed is lost (a process crash keeps the page cache);
//! - every retained frame, in all four encodings (v1 JSON with the relay's `cursor`, v1 zstd,
//!   v2 JSON, v2 zstd), is byte-identical to the event appended at that position with the seq
//!   it was published with, and its index record matches it (DID hash, kind, collection name);
//! - seqs are never reused: every seq published for an event that recovery did not keep is
//!   below the next seq handed out, and retained events keep theirs;
//! - every cursor lookup finds the first retained event with `time_us >= cursor`, and lookups
//!   are monotonic in the cursor.
//!
//! A third of the iterations also simulate a power loss: whatever was written after the
//! durable mark is damaged at random (files cut, ranges zeroed) before recovery, which must
//! then keep everything before the mark and still serve only exact frames.
//!
//! The directory is reused across iterations (recovering a recovered directory, appending on
//! top), fresh every 25. `TEST_JETRELAY_CRASH_ITERATIONS=N` runs a longer soak (default 200)
//! and `TEST_JETRELAY_CRASH_SEED=S` replays one run.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use jetrelay::hub::Hub;
use jetrelay::index::{COLLECTION_NONE, COLLECTION_UNKNOWN};

/// Set in the child: the data directory to append to.
const CHILD_ENV: &str = "TEST_JETRELAY_CRASH_CHILD_DIR";
/// Set in the child: how many events to append.
const CHILD_EVENTS_ENV: &str = "TEST_JETRELAY_CRASH_CHILD_EVENTS";
/// Events a child appends when no crash point stops it first.
const CHILD_EVENTS: u64 = 600;
/// The child syncs (and moves the durable mark) every this many events.
const SYNC_EVERY: u64 = 97;
/// The child runs retention every this many events, dropping the oldest chunk.
const RETENTION_EVERY: u64 = 233;
/// The official zstd dictionaries, read independently of the relay's compress module.
const DICTIONARY: &[u8] = include_bytes!("../assets/zstd_dictionary");
const DICTIONARY_V2: &[u8] = include_bytes!("../assets/zstd_dictionary_v2");

/// The crash points of the append path: (name, how many times one child reaches it at least).
const POINTS: [(&str, u64); 9] = [
    ("plain", CHILD_EVENTS),
    ("zstd", CHILD_EVENTS),
    ("v2", CHILD_EVENTS),
    ("v2zstd", CHILD_EVENTS),
    ("collections", 10),
    ("events.idx", CHILD_EVENTS),
    ("chunks.idx", 2),
    ("durable.idx", 5),
    ("retention", 2),
];

/// `time_us` of event `seq`: not monotonic (every 7th is 3 ms early), like real traffic.
fn time_of(seq: u64) -> i64 {
    1_783_175_888_000_000 + seq as i64 * 500 - if seq.is_multiple_of(7) { 3_000 } else { 0 }
}

/// The collection of commit `seq`: a few common ones, and a new one every 37th event (each new
/// name is a write to `collections.txt`).
fn collection_of(seq: u64) -> String {
    if seq % 37 == 5 {
        format!("app.test.c{seq}")
    } else {
        [
            "app.bsky.feed.post",
            "app.bsky.feed.like",
            "app.bsky.graph.follow",
        ][(seq % 3) as usize]
            .to_owned()
    }
}

/// Event `seq` of the model: identity events every 11th, commits otherwise, sizes from a few
/// dozen bytes to 70 KB (all three frame header lengths).
fn event_of(seq: u64) -> String {
    let did = format!("did:plc:{:0>24}", seq % 53);
    let t = time_of(seq);
    if seq % 11 == 3 {
        return format!(
            r#"{{"did":"{did}","time_us":{t},"kind":"identity","identity":{{"did":"{did}","handle":"h{seq}.test","seq":{seq},"time":"2026-07-04T14:38:07.877Z"}}}}"#
        );
    }
    let c = collection_of(seq);
    let text_len = if seq % 251 == 17 {
        70_000
    } else {
        (seq * 31 % 300) as usize
    };
    let text: String = std::iter::repeat_n((b'a' + (seq % 26) as u8) as char, text_len).collect();
    format!(
        r#"{{"did":"{did}","time_us":{t},"kind":"commit","commit":{{"rev":"3mptbypluud2a","operation":"create","collection":"{c}","rkey":"k{seq}","record":{{"$type":"{c}","text":"{text}"}},"cid":"bafyrei{seq}"}}}}"#
    )
}

/// The v1 JSON clients get for event `pos` published with `seq`: the relay's `cursor` right
/// after `time_us` (the official wire's place), everything else the upstream's bytes.
fn v1_json(pos: u64, seq: u64) -> Vec<u8> {
    let json = event_of(pos);
    let at = json.find(",\"kind\"").expect("kind after time_us");
    format!("{},\"cursor\":{seq}{}", &json[..at], &json[at..]).into_bytes()
}

/// The v2 message of event `pos` published with `seq` (witnessed at its `time_us`).
fn v2_json(pos: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::new();
    jetrelay::wire::v1_to_v2(event_of(pos).as_bytes(), seq, time_of(pos), &mut out)
        .expect("v2 form");
    out
}

/// The plain frame of a JSON payload, built here from RFC 6455 (not by the relay's code).
fn text_frame(json: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match json.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(json);
    f
}

/// The compressed frame's payload, if `frame` is a complete binary frame of `len` bytes.
fn binary_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 2 || frame[0] != 0x82 {
        return None;
    }
    let (len, at) = match frame[1] {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().ok()?) as usize,
            10,
        ),
        n if n < 126 => (n as usize, 2),
        _ => return None,
    };
    (frame.len() == at + len).then(|| &frame[at..])
}

fn hub_for(dir: &Path) -> (Arc<Hub>, jetrelay::index::Recovery) {
    let settings = jetrelay::config::RawSettings {
        data_dir: Some(dir.to_path_buf()),
        ..jetrelay::config::RawSettings::default()
    }
    .validate()
    .expect("default settings");
    jetrelay::relay::open_hub(&settings).expect("recover")
}

/// The child: recover, then append the model's events from where the log ends (syncing and
/// running retention now and then), printing `APPENDED <position> <seq>` after each completed
/// append.
#[test]
#[ignore = "not a test: the child process that crash_at_any_write_… starts"]
fn crash_child_process_body() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let events: u64 = std::env::var(CHILD_EVENTS_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CHILD_EVENTS);
    let (hub, _) = hub_for(&dir);
    let mut writer = jetrelay::writer::LogWriter::new(
        hub.clone(),
        Vec::new(),
        jetrelay::writer::WriterOptions::default(),
    )
    .expect("writer");
    let first = hub.index().next_seq();
    let mut out = std::io::stdout().lock();
    for seq in first..first + events {
        let json = event_of(seq);
        let meta = jetrelay::event::parse_event(json.as_bytes()).expect("model event");
        // The seq this append will get, told before it starts: a crash after the append's
        // writes but before APPENDED leaves an event in the logs whose size depends on it.
        let announced = hub.seq_of(seq);
        writeln!(out, "APPENDING {seq} {announced}").expect("stdout");
        out.flush().expect("stdout");
        writer
            .append_event(&jetrelay::upstream::Incoming::v1(json.as_bytes(), meta))
            .expect("append");
        let wire = hub.seq_of(seq);
        assert_eq!(wire, announced, "the seq announced for position {seq}");
        writeln!(out, "APPENDED {seq} {wire}").expect("stdout");
        out.flush().expect("stdout");
        if seq % SYNC_EVERY == 0 {
            jetrelay::writer::sync_logs(&hub).expect("sync");
        }
        if seq % RETENTION_EVERY == 0 && hub.index().chunk_count() > 3 {
            // Drop the oldest chunk: a cap just below what is allocated now.
            let allocated = hub.bases().iter().map(|s| s.allocated_bytes()).sum::<u64>()
                + hub.index().allocated_bytes();
            let policy = jetrelay::writer::RetentionPolicy {
                max_age: std::time::Duration::from_secs(3600),
                max_disk: allocated - 1,
            };
            jetrelay::writer::enforce_retention(&hub, policy).expect("retention");
        }
    }
}

/// What one child run did.
struct ChildRun {
    /// The last position whose append completed, if any.
    completed: Option<u64>,
    /// (position, seq) of every completed append, in order.
    published: Vec<(u64, u64)>,
    /// (position, seq) of every append started (announced before its first write).
    announced: Vec<(u64, u64)>,
    /// Whether the crash point killed it (else it appended everything and exited).
    killed: bool,
}

fn run_child(dir: &Path, crash: &str) -> ChildRun {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child_process_body",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, dir)
        .env(jetrelay::failpoint::CRASH_ENV, crash)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints "test crash_child_process_body ... " on the line the first report
    // continues.
    let reports = |tag: &str| -> Vec<(u64, u64)> {
        stdout
            .lines()
            .filter_map(|l| l.split_once(tag).map(|(_, rest)| rest))
            .filter_map(|l| {
                let (pos, seq) = l.trim().split_once(' ')?;
                Some((pos.parse().ok()?, seq.parse().ok()?))
            })
            .collect()
    };
    let published = reports("APPENDED ");
    let announced = reports("APPENDING ");
    let completed = published.last().map(|&(pos, _)| pos);
    let killed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9);
    assert!(
        killed || out.status.success(),
        "child failed ({}) at {crash}:\n{stdout}",
        out.status
    );
    ChildRun {
        completed,
        published,
        announced,
        killed,
    }
}

/// What the model knows of the directory: the seq each position was last published with.
#[derive(Default)]
struct Published {
    /// Position → the seq its event was (last) published with.
    seqs: std::collections::HashMap<u64, u64>,
    /// Position → the seq its last started append was to get: the same as `seqs` once it
    /// completed; for an append cut short, what its bytes (if they reached the logs) carry.
    announced: std::collections::HashMap<u64, u64>,
    /// Seqs published for events that recovery dropped and a later append replaced.
    retired: Vec<u64>,
}

/// The frame header length of a payload of `len` bytes.
fn header_len(len: usize) -> u64 {
    if len < 126 {
        2
    } else if len <= 0xffff {
        4
    } else {
        10
    }
}

/// Sizes of the model's files once events `0..pos` are appended: the four logs (by encoding)
/// and `collections.txt`. Every position below a durable mark was published (printed) before
/// the sync that set the mark, so its seq is known.
fn durable_sizes(pos: u64, published: &Published) -> ([u64; 4], u64) {
    let mut v1 = jetrelay::compress::EventCompressor::new().expect("compressor");
    let mut v2 =
        jetrelay::compress::EventCompressor::with_dictionary(jetrelay::compress::Dictionary::V2)
            .expect("compressor");
    let mut logs = [0u64; 4];
    for p in 0..pos {
        let seq = published.seqs.get(&p).or(published.announced.get(&p));
        let seq = *seq
            .unwrap_or_else(|| panic!("position {p} below the durable mark was never announced"));
        let (j1, j2) = (v1_json(p, seq), v2_json(p, seq));
        let (mut z1, mut z2) = (Vec::new(), Vec::new());
        v1.compress(&j1, &mut z1).expect("zstd");
        v2.compress(&j2, &mut z2).expect("zstd");
        for (i, len) in [j1.len(), z1.len(), j2.len(), z2.len()]
            .into_iter()
            .enumerate()
        {
            logs[i] += len as u64 + header_len(len);
        }
    }
    let mut names: Vec<String> = Vec::new();
    for s in 0..pos {
        if s % 11 != 3 {
            let c = collection_of(s);
            if !names.contains(&c) {
                names.push(c);
            }
        }
    }
    let c = names.iter().map(|n| n.len() as u64 + 1).sum();
    (logs, c)
}

/// A power loss: everything written after the durable mark may be lost or zeroed.
fn lose_unsynced_writes(dir: &Path, rng: &mut fastrand::Rng, published: &Published) -> u64 {
    let mark = std::fs::read(dir.join("durable.idx"))
        .ok()
        .filter(|b| b.len() >= 8)
        .map_or(0, |b| {
            u64::from_le_bytes(b[..8].try_into().unwrap_or_default())
        });
    let ([plain, zstd, v2, v2zstd], collections) = durable_sizes(mark, published);
    let durable = [
        ("plain.log", plain),
        ("zstd.log", zstd),
        ("v2.log", v2),
        ("v2zstd.log", v2zstd),
        ("events.idx", mark * 32),
        ("chunks.idx", mark / 256 * 64),
        ("collections.txt", collections),
    ];
    for (name, keep) in durable {
        let path = dir.join(name);
        let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else {
            continue;
        };
        if len <= keep {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        match rng.u8(0..3) {
            // The unsynced tail never reached the disk.
            0 => f.set_len(rng.u64(keep..=len)).expect("cut"),
            // It reached the disk as zeros (delayed allocation), in part.
            1 => {
                let from = rng.u64(keep..len);
                let to = rng.u64(from..=len);
                f.write_all_at(&vec![0u8; (to - from) as usize], from)
                    .expect("zero");
            }
            // It is intact.
            _ => {}
        }
    }
    mark
}

/// Checks the recovered directory against the model; returns the retained range.
fn check_recovered(
    hub: &Hub,
    dir: &Path,
    rng: &mut fastrand::Rng,
    published: &Published,
    what: &str,
) -> (u64, u64) {
    use jetrelay::encoding::Encoding;
    let index = hub.index();
    let (first, next) = (index.first_seq(), index.next_seq());
    // Seqs are never reused: every seq published for an event recovery did not keep is below
    // the next one handed out.
    let next_seq = index.seqs.seq_of(next);
    for (&pos, &seq) in &published.seqs {
        if pos >= next {
            assert!(
                seq < next_seq,
                "{what}: seq {seq} (position {pos}) was published and would be reused (next {next_seq})"
            );
        }
    }
    for &seq in &published.retired {
        assert!(
            seq < next_seq,
            "{what}: seq {seq} was published, its event replaced, and would be reused (next {next_seq})"
        );
    }
    let mut v1z = zstd::bulk::Decompressor::with_dictionary(DICTIONARY).expect("dictionary");
    let mut v2z = zstd::bulk::Decompressor::with_dictionary(DICTIONARY_V2).expect("dictionary");
    let mut count = 0;
    let mut last_seq = 0;
    index.walk(index.start_pos(), usize::MAX, |pos, e| {
        let read = |enc: Encoding| -> Vec<u8> {
            let mut got = vec![0u8; e.frame_len(enc) as usize];
            hub.base(enc)
                .file()
                .read_exact_at(&mut got, pos.offset(enc))
                .unwrap_or_else(|err| {
                    panic!("{what}: position {} {enc} frame unreadable: {err}", pos.seq)
                });
            got
        };
        // Retained events keep the seq they were published with (if the model saw it: an
        // append killed before it was printed is retained with a seq nobody saw yet).
        let seq = index.seqs.seq_of(pos.seq);
        assert!(seq > last_seq, "{what}: seqs increase");
        last_seq = seq;
        if let Some(&p) = published.seqs.get(&pos.seq) {
            assert_eq!(seq, p, "{what}: position {} changed its seq", pos.seq);
        }
        let json = event_of(pos.seq);
        let v1 = v1_json(pos.seq, seq);
        assert!(
            read(Encoding::V1Json) == text_frame(&v1),
            "{what}: position {} plain frame differs",
            pos.seq
        );
        let unzstd = |d: &mut zstd::bulk::Decompressor<'_>, frame: &[u8], cap: usize| {
            let payload = binary_payload(frame)
                .unwrap_or_else(|| panic!("{what}: position {} zstd frame malformed", pos.seq));
            d.decompress(payload, cap)
                .unwrap_or_else(|err| panic!("{what}: position {} zstd frame: {err}", pos.seq))
        };
        assert!(
            unzstd(&mut v1z, &read(Encoding::V1Zstd), v1.len()) == v1,
            "{what}: position {} zstd differs",
            pos.seq
        );
        let v2 = v2_json(pos.seq, seq);
        assert!(
            read(Encoding::V2Json) == text_frame(&v2),
            "{what}: position {} v2 frame differs",
            pos.seq
        );
        assert!(
            unzstd(&mut v2z, &read(Encoding::V2Zstd), v2.len()) == v2,
            "{what}: position {} v2 zstd differs",
            pos.seq
        );
        let meta = jetrelay::event::parse_event(json.as_bytes()).expect("model");
        assert_eq!(e.did_hash, jetrelay::event::did_hash(&meta.did), "{what}");
        assert_eq!(e.kind, jetrelay::index::kind_code(meta.kind), "{what}");
        match e.collection {
            COLLECTION_NONE => assert!(meta.collection.is_none(), "{what}: seq {}", pos.seq),
            COLLECTION_UNKNOWN => {}
            id => assert_eq!(
                index.collections.name(id),
                meta.collection.as_deref(),
                "{what}: seq {} collection",
                pos.seq
            ),
        }
        count += 1;
        true
    });
    assert_eq!(
        count,
        next - first,
        "{what}: walk covers the retained range"
    );
    let end = index.end_pos();
    drop(index);
    for enc in Encoding::ALL {
        assert_eq!(
            hub.base(enc).end(),
            end.offset(enc),
            "{what}: {enc} log cut at the end"
        );
        assert_eq!(
            std::fs::metadata(dir.join(enc.log_name()))
                .expect("log")
                .len(),
            end.offset(enc),
            "{what}"
        );
    }
    // Cursor lookups against the model, monotonic in the cursor.
    let lo = time_of(first).min(time_of(first + 1)) - 5_000;
    let hi = time_of(next) + 5_000;
    let mut cursors: Vec<i64> = (0..60).map(|_| rng.i64(lo..hi)).collect();
    cursors.extend((first..next).step_by(41).map(time_of));
    cursors.sort_unstable();
    let mut last = 0;
    for c in cursors {
        let want = (first..next).find(|&s| time_of(s) >= c).unwrap_or(next);
        let got = hub.resolve_cursor(Some(c)).seq;
        assert_eq!(got, want, "{what}: cursor {c}");
        assert!(got >= last, "{what}: cursor lookups are monotonic");
        last = got;
    }
    (first, next)
}

#[test]
fn crash_at_any_write_recovers_exact_frames_and_monotonic_cursors() {
    if !cfg!(debug_assertions) {
        println!("SKIPPED: the crash points are compiled into debug builds only");
        return;
    }
    let iterations: u64 = std::env::var("TEST_JETRELAY_CRASH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("TEST_JETRELAY_CRASH_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("TEST_JETRELAY_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let root = std::env::temp_dir().join(format!("jetrelay-crash-{}", std::process::id()));
    let mut dir = root.join("0");
    let mut published = Published::default();
    let (mut killed, mut torn, mut power_losses, mut repaired) = (0u64, 0u64, 0u64, 0u64);
    let mut by_point = std::collections::BTreeMap::new();
    // Events in the directory as the last recovery left it.
    let mut before = 0;
    for it in 0..iterations {
        if it % 25 == 0 {
            let _ = std::fs::remove_dir_all(&dir);
            dir = root.join(it.to_string());
            std::fs::create_dir_all(&dir).expect("dir");
            before = 0;
            published = Published::default();
        }
        let (point, reach) = POINTS[rng.usize(..POINTS.len())];
        let nth = rng.u64(1..=reach);
        let is_torn = point != "retention" && rng.bool();
        let crash = format!("{point}:{nth}{}", if is_torn { ":torn" } else { "" });
        let run = run_child(&dir, &crash);
        for &(pos, seq) in &run.announced {
            // A position appended again (recovery had dropped it): its event is replaced, and
            // the seq it was published with is retired, never to be handed out again.
            if let Some(old) = published.seqs.get(&pos).copied().filter(|&old| old != seq) {
                published.seqs.remove(&pos);
                published.retired.push(old);
            }
            published.announced.insert(pos, seq);
        }
        published.seqs.extend(run.published.iter().copied());
        let what = format!("iteration {it} (seed {seed}), crash at {crash}");
        if run.killed {
            killed += 1;
            torn += u64::from(is_torn);
            *by_point.entry(point).or_insert(0u64) += 1;
        }
        let mark = if rng.u8(0..3) == 0 {
            power_losses += 1;
            Some(lose_unsynced_writes(&dir, &mut rng, &published))
        } else {
            None
        };
        let (hub, recovery) = hub_for(&dir);
        repaired += u64::from(recovery.repaired());
        let (first, next) = check_recovered(&hub, &dir, &mut rng, &published, &what);
        match mark {
            // A power loss keeps what was durable.
            Some(mark) => assert!(
                next >= mark.min(before.max(mark)),
                "{what}: durable events lost (next {next}, mark {mark})"
            ),
            // A process crash keeps every completed append (the page cache survives).
            None => {
                if let Some(done) = run.completed {
                    assert!(
                        next > done,
                        "{what}: completed append {done} lost (next {next})"
                    );
                }
                assert!(
                    next >= before,
                    "{what}: events lost (before {before}, next {next})"
                );
            }
        }
        assert!(first <= next);
        before = next;
    }
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "crash points exercised: {killed} kills ({torn} torn writes) in {iterations} runs, \
         {power_losses} with simulated power loss, {repaired} recoveries repaired something; \
         by point: {by_point:?}"
    );
    assert!(
        killed >= iterations / 2,
        "most runs must hit their crash point"
    );
}
