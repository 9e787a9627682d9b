//! Regression tests for recovery bugs the `recovery` fuzz target found (fuzz/regressions/recovery
//! holds the fuzzer's inputs). Each builds the damaged directory by hand through the real append
//! path, then recovers it the way the relay starts.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use jetrelay::compress::EventDecompressor;
use jetrelay::encoding::Encoding;
use jetrelay::event::parse_event;
use jetrelay::hub::{Hub, stored_header_len};
use jetrelay::upstream::Incoming;
use jetrelay::writer::{LogWriter, WriterOptions};

const SAMPLE: &str = include_str!("../assets/jetstream-v1-sample.jsonl");

fn open(dir: &Path) -> (Arc<Hub>, LogWriter) {
    let settings = jetrelay::config::RawSettings {
        data_dir: Some(dir.to_path_buf()),
        ..jetrelay::config::RawSettings::default()
    }
    .validate()
    .expect("default settings");
    let (hub, _) = jetrelay::relay::open_hub(&settings).expect("recovers");
    let writer = LogWriter::new(hub.clone(), Vec::new(), WriterOptions::default()).expect("writer");
    (hub, writer)
}

/// Appends `n` sample events, the `k`-th with `collection(k)` if given.
fn append(writer: &mut LogWriter, n: usize, collection: impl Fn(usize) -> Option<String>) {
    let lines: Vec<&str> = SAMPLE.lines().collect();
    for k in 0..n {
        let mut v: serde_json::Value = serde_json::from_str(lines[k % lines.len()]).unwrap();
        if let (Some(c), Some(commit)) = (collection(k), v.get_mut("commit")) {
            commit["collection"] = c.into();
        }
        let json = serde_json::to_vec(&v).unwrap();
        let meta = parse_event(&json).unwrap();
        writer.append_event(&Incoming::v1(&json, meta)).unwrap();
    }
}

/// Every retained event's frames as served: (plain payload, zstd payload).
fn served(hub: &Hub) -> Vec<(Vec<u8>, Vec<u8>)> {
    let index = hub.index();
    let mut out = Vec::new();
    index.walk(index.start_pos(), usize::MAX, |pos, e| {
        assert_eq!(
            pos,
            index.pos_of(pos.seq),
            "walk and pos_of agree at {}",
            pos.seq
        );
        let read = |f: &std::fs::File, off: u64, len: u32| {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, off).unwrap();
            let h = stored_header_len(&buf);
            buf.split_off(h)
        };
        let frame = |enc: Encoding| {
            read(
                hub.base(enc).file(),
                pos.offset(enc),
                e.frame_len(enc) as u32,
            )
        };
        out.push((frame(Encoding::V1Json), frame(Encoding::V1Zstd)));
        true
    });
    out
}

/// A crash zeroes the tail of `zstd.log` from inside the last frame's payload, its header
/// intact: recovery used to check only zstd headers and served the damaged frame to
/// compressed clients. Fails without the content check in `relay::frame_ok`.
#[test]
fn crash_zeroed_zstd_tail_is_not_served() {
    let dir = common::temp_dir("recovery-zstd-tail");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 300, |_| None);
    let zstd_len = hub.base(Encoding::V1Zstd).end();
    drop((hub, writer));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("zstd.log"))
        .unwrap();
    f.write_all_at(&[0u8; 40], zstd_len - 40).unwrap();
    drop(f);

    let (hub, _writer) = open(&dir);
    let events = served(&hub);
    assert_eq!(
        events.len(),
        299,
        "the damaged newest event is dropped, the rest kept"
    );
    let mut decompressor = EventDecompressor::new().unwrap();
    for (i, (plain, zstd)) in events.iter().enumerate() {
        let restored = decompressor.decompress(zstd, 1 << 20);
        assert_eq!(
            restored.ok().as_ref(),
            Some(plain),
            "event {i}: zstd frame damaged"
        );
    }
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// A damaged length in an old chunk's records makes that chunk end where the next chunk's
/// header does not start: recovery used to keep both, so a reader walking from the old chunk
/// across the seam was handed misframed bytes. Fails without the tiling check in
/// `EventIndex::open`.
#[test]
fn chunks_that_do_not_tile_the_log_are_dropped() {
    let dir = common::temp_dir("recovery-chunk-seam");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 600, |_| None);
    drop((hub, writer));
    // Record 5 (chunk 0, outside the two newest chunks that recovery verifies): zstd_len + 1.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("events.idx"))
        .unwrap();
    let mut len = [0u8; 4];
    f.read_exact_at(&mut len, 5 * 32 + 4).unwrap();
    let len = u32::from_le_bytes(len) + 1;
    f.write_all_at(&len.to_le_bytes(), 5 * 32 + 4).unwrap();
    drop(f);

    let (hub, _writer) = open(&dir);
    let events = served(&hub);
    assert_eq!(
        hub.index().first_seq(),
        256,
        "the chunk before the seam is dropped"
    );
    assert_eq!(events.len(), 600 - 256);
    let mut decompressor = EventDecompressor::new().unwrap();
    for (plain, zstd) in &events {
        assert!(parse_event(plain).is_ok());
        assert_eq!(&decompressor.decompress(zstd, 1 << 20).unwrap(), plain);
    }
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// A crash while a new collection's name was being appended leaves an unfinished last line in
/// `collections.txt`: recovery used to load it as a name, and the next name was appended to
/// it, so after another restart a record's collection id named a garbled collection (and the
/// next id none, which lets every filter pass it). Fails without the torn-line handling in
/// `EventIndex::open`.
#[test]
fn torn_collection_name_is_forgotten() {
    let dir = common::temp_dir("recovery-torn-name");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 10, |_| Some("com.example.first".into()));
    drop((hub, writer));
    let path = dir.join("collections.txt");
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(b"com.exampl");
    std::fs::write(&path, &text).unwrap();

    let (hub, mut writer) = open(&dir);
    append(&mut writer, 10, |_| Some("com.example.second".into()));
    drop((hub, writer));
    let (hub, _writer) = open(&dir);
    let index = hub.index();
    let mut names = Vec::new();
    index.walk(index.start_pos(), usize::MAX, |_, e| {
        names.push(index.collections.name(e.collection).map(str::to_owned));
        true
    });
    let first = Some("com.example.first".to_owned());
    let second = Some("com.example.second".to_owned());
    assert_eq!(names[..10], vec![first; 10][..]);
    assert_eq!(names[10..], vec![second; 10][..]);
    drop(index);
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// A torn tail whose first damaged event opens a chunk: recovery used to leave the full
/// chunk before it as the newest, so later appends grew it past 256 events (no chunk record
/// was ever written for them) and position lookups beyond it indexed past the chunk list.
#[test]
fn torn_tail_at_a_chunk_boundary_keeps_appending() {
    let dir = common::temp_dir("recovery-chunk-boundary");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 300, |_| None);
    let cut = hub.index().pos_of(256);
    drop((hub, writer));
    // Event 256's frame is zeroed in place (a crash zero-fills the log's tail); recovery's
    // frame check stops there.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("plain.log"))
        .unwrap();
    f.write_all_at(&[0u8; 8], cut.offset(Encoding::V1Json))
        .unwrap();
    drop(f);

    let (hub, mut writer) = open(&dir);
    assert_eq!(hub.index().next_seq(), 256);
    append(&mut writer, 300, |_| None);
    assert_eq!(served(&hub).len(), 556);
    drop((hub, writer));
    let (hub, _writer) = open(&dir);
    assert_eq!(served(&hub).len(), 556, "a clean restart keeps every event");
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// A crash extends `events.idx` with zeros (the size was updated, the records never
/// written): recovery used to load the zero records as events of empty frames, and enough of
/// them made phantom chunks that pushed real records out of the two chunks it verifies.
/// Fails without the unwritten-record check in `EventIndex::open`.
#[test]
fn zero_extended_index_records_are_not_events() {
    let dir = common::temp_dir("recovery-zero-records");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 300, |_| None);
    drop((hub, writer));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("events.idx"))
        .unwrap();
    f.set_len((300 + 600) * 32 + 5).unwrap();
    drop(f);

    let (hub, mut writer) = open(&dir);
    assert_eq!(hub.index().next_seq(), 300, "zero records are not events");
    append(&mut writer, 10, |_| None);
    let events = served(&hub);
    assert_eq!(events.len(), 310);
    assert!(events.iter().all(|(plain, _)| parse_event(plain).is_ok()));
    drop((hub, writer));
    std::fs::remove_dir_all(&dir).ok();
}

/// A crash leaves the two newest chunk records zeroed (the file kept its size, not the
/// records) and the newest event records too: recovery used to take a zeroed record's (0, 0)
/// offsets for real, saw its predecessor end elsewhere, dropped every synced event before it
/// and truncated both logs to nothing; and the lost records' running max of `time_us` made
/// cursors skip the kept events. Fails without the zero-record check in `read_header` and the
/// rescan of chunks whose record was lost (`time_scan_from`).
#[test]
fn zeroed_chunk_records_keep_synced_events() {
    let dir = common::temp_dir("recovery-zero-chunk-records");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 523, |_| None);
    drop((hub, writer));
    let zero = |name: &str, from: u64, len: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(name))
            .unwrap();
        f.write_all_at(&vec![0u8; len as usize], from).unwrap();
    };
    zero("chunks.idx", 0, 2 * 64);
    zero("events.idx", 302 * 32, (523 - 302) * 32);

    let (hub, _writer) = open(&dir);
    let events = served(&hub);
    assert_eq!(
        events.len(),
        302,
        "the events whose records survived are kept"
    );
    let mut decompressor = EventDecompressor::new().unwrap();
    for (plain, zstd) in &events {
        assert!(parse_event(plain).is_ok());
        assert_eq!(&decompressor.decompress(zstd, 1 << 20).unwrap(), plain);
    }
    // Their chunks' running max of time_us was in the lost records: rescanned, cursors into
    // them resolve at or before the first event at the cursor, not past them.
    let times: Vec<i64> = events
        .iter()
        .map(|(p, _)| parse_event(p).unwrap().time_us)
        .collect();
    for i in [0, 10, 200, 280] {
        let exact = times.iter().position(|t| *t >= times[i]).unwrap() as u64;
        let got = hub.resolve_cursor(Some(times[i])).seq;
        assert!(
            got <= exact,
            "cursor of event {i}: seq {got}, first at or after it {exact}"
        );
    }
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// Drops the `n` oldest chunks and punches the logs below them, as retention does.
fn drop_chunks(hub: &Hub, n: usize) {
    for _ in 0..n {
        let ends = hub
            .index()
            .oldest_chunk()
            .map(|c| c.end_offsets())
            .expect("a complete chunk to drop");
        hub.index_mut().drop_oldest_chunk().expect("drop");
        for (stream, end) in hub.bases().iter().zip(ends) {
            stream.punch_below(end).expect("punch");
        }
    }
}

/// Chunks dropped by retention, then a crash zeroes the log's tail inside the oldest retained
/// chunk: the first recovery located that chunk by its header and cut it to a partial one,
/// but cut its header from `chunks.idx` too (a partial chunk has none), so a clean second
/// restart could not locate it and served nothing
/// (fuzz/regressions/recovery/restart-drops-tail-after-chunk-drop{,-2}). Fails without
/// `EventIndex::persist_front_header`.
#[test]
fn restart_after_chunk_drop_and_zeroed_tail_keeps_the_tail() {
    let dir = common::temp_dir("recovery-drop-zeroed-tail");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 512, |_| None);
    drop_chunks(&hub, 1);
    let cut = hub.index().pos_of(500);
    let plain_len = hub.base(Encoding::V1Json).end();
    drop((hub, writer));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("plain.log"))
        .unwrap();
    let zeros = vec![0u8; (plain_len - cut.offset(Encoding::V1Json)) as usize];
    f.write_all_at(&zeros, cut.offset(Encoding::V1Json))
        .unwrap();
    drop(f);

    let (hub, _writer) = open(&dir);
    let first = served(&hub);
    assert_eq!(
        first.len(),
        500 - 256,
        "the zeroed tail is cut, the rest kept"
    );
    drop((hub, _writer));
    let (hub, mut writer) = open(&dir);
    let again = served(&hub);
    assert!(
        again == first,
        "a clean restart serves what the first one did: {} events, then {}",
        first.len(),
        again.len()
    );
    assert_eq!(
        hub.index().next_seq(),
        500,
        "numbering continues after the cut"
    );
    append(&mut writer, 10, |_| None);
    drop((hub, writer));
    let (hub, _writer) = open(&dir);
    assert_eq!(served(&hub).len(), 500 - 256 + 10);
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}

/// Retention drops every complete chunk, leaving only the partial newest one: nothing on disk
/// said where its frames start (the records before it punched, its header not written until
/// it completes), so a clean restart discarded it. Fails without
/// `EventIndex::persist_front_header`.
#[test]
fn restart_after_retention_keeps_the_partial_chunk() {
    let dir = common::temp_dir("recovery-partial-front");
    let (hub, mut writer) = open(&dir);
    append(&mut writer, 300, |_| None);
    drop_chunks(&hub, 1);
    let kept = served(&hub);
    assert_eq!(kept.len(), 300 - 256);
    drop((hub, writer));
    let (hub, _writer) = open(&dir);
    let again = served(&hub);
    assert!(
        again == kept,
        "a clean restart keeps the retained events: {} before, {} after",
        kept.len(),
        again.len()
    );
    drop(hub);
    std::fs::remove_dir_all(&dir).ok();
}
