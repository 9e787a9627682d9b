//! The upstream follower against the real mock upstream, in-process: every wire (legacy
//! `/subscribe`, `/subscribe` with seq cursors, `subscribeEvents` as text and with the v2
//! dictionary), the mock dropping the connection every second from the first one, failover
//! between instances that number events differently, and restarts from a checkpoint.
//!
//! Every check is against the mock's generator: the events appended are exactly the ones the
//! mock emitted from the first one the follower saw live, once each, in upstream order, with
//! the legacy v1 bytes the generator renders, and the upstream seq the mock gave them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use jetrelay::event::{EventKind, parse_event};
use jetrelay::mock::{self, Generator, MockConfig, MockHandle, Wire};
use jetrelay::upstream::{
    ConnectionState, EventSink, Follower, Incoming, SkipReason, UpstreamCheckpoint, UpstreamConfig,
};
use jetrelay::wire::{SEQ_CURSOR_LIMIT, SUBSCRIBE_EVENTS_PATH};

/// The mock's seed (its DIDs); the checks render events with the same.
const SEED: u64 = 11;
/// DID population of the mock.
const DIDS: u64 = 1_000;
/// Events per second: a few thousand events over the test, a drop every ~1,000.
const RATE: u64 = 1_000;
/// How long any wait may take before the test fails (a 2-core machine under load).
const DEADLINE: Duration = Duration::from_secs(40);

/// One appended event as the sink saw it.
#[derive(Clone, Debug)]
struct Got {
    /// `Incoming::v1_json`.
    v1_json: Vec<u8>,
    /// `Incoming::meta.kind`.
    kind: EventKind,
    /// `Incoming::meta.dedup_key`.
    key: u64,
    /// `Incoming::meta.time_us` (indexed).
    indexed_us: i64,
    /// The upstream's `time_us` (v1 JSON) or `time` (`#sync`).
    time_us: i64,
    /// `Incoming::upstream_seq`.
    upstream_seq: Option<u64>,
    /// `Incoming::witnessed_us`.
    witnessed_us: Option<i64>,
    /// `#sync`: the DID token of its parts.
    sync_did: Option<Vec<u8>>,
}

/// What the follower reported.
#[derive(Default)]
struct Record {
    appended: Vec<Got>,
    skipped: Vec<SkipReason>,
    states: Vec<ConnectionState>,
}

impl Record {
    fn skipped(&self, reason: SkipReason) -> usize {
        self.skipped.iter().filter(|&&r| r == reason).count()
    }

    /// The URLs connected to, in order.
    fn connected(&self) -> Vec<String> {
        self.states
            .iter()
            .filter_map(|s| match s {
                ConnectionState::Connected { url, .. } => Some(url.clone()),
                _ => None,
            })
            .collect()
    }
}

struct Sink(Arc<Mutex<Record>>);

impl EventSink for Sink {
    fn append(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()> {
        let time_us = match ev.sync {
            Some(parts) => {
                assert!(ev.v1_json.is_empty(), "#sync has no v1 form");
                parts.time_us
            }
            None => parse_event(ev.v1_json)?.time_us,
        };
        let got = Got {
            v1_json: ev.v1_json.to_vec(),
            kind: ev.meta.kind,
            key: ev.meta.dedup_key,
            indexed_us: ev.meta.time_us,
            time_us,
            upstream_seq: ev.upstream_seq,
            witnessed_us: ev.witnessed_us,
            sync_did: ev.sync.map(|p| p.did.to_vec()),
        };
        self.0.lock().unwrap().appended.push(got);
        Ok(())
    }
    fn skipped(&mut self, reason: SkipReason, _: &str) {
        self.0.lock().unwrap().skipped.push(reason);
    }
    fn connection(&mut self, state: ConnectionState) {
        self.0.lock().unwrap().states.push(state);
    }
}

/// A follower running on its own thread, its log lines captured.
struct Running {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    fn start(follower: Follower) -> Running {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (record, stop, log) = (record.clone(), stop.clone(), log.clone());
            thread::spawn(move || {
                let subscriber = tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_max_level(tracing::Level::INFO)
                    .with_writer(move || LogWriter(log.clone()))
                    .finish();
                let mut follower = follower;
                tracing::subscriber::with_default(subscriber, || {
                    follower.run(&mut Sink(record), &stop)
                })
            })
        };
        Running {
            record,
            stop,
            thread: Some(thread),
            log,
        }
    }

    /// Waits (bounded) until `done` holds for what was recorded.
    fn wait_for(&self, what: &str, done: impl Fn(&Record) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(&self.record.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the follower; returns what it recorded.
    fn stop(mut self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("follower thread").expect("follower ran");
        }
        std::mem::take(&mut *self.record.lock().unwrap())
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `tracing` output into a shared buffer.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn mock_config(wire: Wire, count: u64) -> MockConfig {
    MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rate: RATE,
        seed: SEED,
        dids: DIDS,
        count: Some(count),
        // Real traffic reorders: ~30 % of events stamped up to 30 ms early.
        time_jitter_ms: 30,
        // The stream runs before the follower connects, as a real upstream's does.
        start_immediately: true,
        wire,
        ..Default::default()
    }
}

fn url_of(addr: SocketAddr, wire: Wire) -> String {
    match wire {
        Wire::V2 => format!("ws://{addr}{SUBSCRIBE_EVENTS_PATH}"),
        Wire::Legacy | Wire::Cursor => format!("ws://{addr}/subscribe"),
    }
}

fn follower_config(urls: Vec<String>) -> UpstreamConfig {
    let mut config = UpstreamConfig::new(urls);
    config.rewind = Duration::from_secs(1);
    config.max_skew = Duration::from_secs(2);
    config.backoff_min = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(100);
    config
}

/// The mock's event number of `got` (`seq_offset` of the instance that sent a `#sync`).
fn event_number(got: &Got, seq_offset: u64) -> u64 {
    match (&got.sync_did, got.upstream_seq) {
        (Some(_), Some(seq)) => seq - seq_offset,
        _ => Generator::seq_of(&got.v1_json).expect("a generated event"),
    }
}

/// Checks `got` (appended in this order) against the mock's generator: the events from the
/// first one appended to `last`, each exactly once, in order (those the wire carries: `#sync`
/// only on v2), byte-exact, with the seq `offset_of` says the sending instance numbered it with
/// (`None`: the wire has none). Returns the first event number.
fn assert_exact(
    got: &[Got],
    history: &HashMap<u64, i64>,
    sync_every: Option<u64>,
    v2: bool,
    last: u64,
    offset_of: impl Fn(&Got) -> Option<u64>,
) -> u64 {
    let generator = Generator::new(SEED, DIDS);
    let numbers: Vec<u64> = got
        .iter()
        .map(|g| event_number(g, offset_of(g).unwrap_or(0)))
        .collect();
    let first = numbers[0];
    let want: Vec<u64> = (first..=last)
        .filter(|&n| v2 || !mock::is_sync_event(sync_every, n))
        .collect();
    if numbers != want {
        let at = numbers
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(numbers.len().min(want.len()));
        panic!(
            "events differ at position {at}: got {:?}, want {:?} ({} vs {} events)",
            &numbers[at.saturating_sub(3)..(at + 5).min(numbers.len())],
            &want[at.saturating_sub(3)..(at + 5).min(want.len())],
            numbers.len(),
            want.len()
        );
    }
    let mut bytes = Vec::new();
    for (g, &n) in got.iter().zip(&numbers) {
        let time_us = history[&n];
        assert_eq!(g.time_us, time_us, "event {n}: its upstream time");
        assert_eq!(g.indexed_us, time_us, "event {n}: indexed as stamped");
        assert_eq!(
            g.upstream_seq,
            offset_of(g).map(|o| n + o),
            "event {n}: the upstream seq"
        );
        if mock::is_sync_event(sync_every, n) {
            assert!(v2, "#sync only from subscribeEvents");
            assert_eq!(g.kind, EventKind::Sync, "event {n}");
            let did = generator.did_for(n);
            assert_eq!(g.sync_did.as_deref(), Some(format!("\"{did}\"").as_bytes()));
            continue;
        }
        assert_ne!(g.kind, EventKind::Sync);
        assert!(g.sync_did.is_none());
        bytes.clear();
        generator.event(n, time_us, &mut bytes);
        assert!(
            g.v1_json == bytes,
            "event {n} is not byte-exact:\n got {}\nwant {}",
            String::from_utf8_lossy(&g.v1_json),
            String::from_utf8_lossy(&bytes)
        );
        let want_key = parse_event(&bytes).unwrap().dedup_key;
        assert_eq!(g.key, want_key, "event {n}: dedup key");
    }
    first
}

fn history_of(m: &MockHandle) -> HashMap<u64, i64> {
    m.history_events().into_iter().collect()
}

/// The `cursor` each connection asked for (`None`: live).
fn cursors(urls: &[String]) -> Vec<Option<i64>> {
    urls.iter()
        .map(|u| {
            u.split(['?', '&'])
                .find_map(|p| p.strip_prefix("cursor="))
                .map(|c| c.parse().expect("numeric cursor"))
        })
        .collect()
}

/// Follows one mock wire while the mock drops the connection every second from the first;
/// returns the record, the mock's history and the follower's log.
fn follow_with_drops(
    wire: Wire,
    compress_v2: bool,
    sync_every: Option<u64>,
) -> (Record, HashMap<u64, i64>, String) {
    // The last event is not a #sync (a v1 wire would never send it).
    let count = 3_510;
    let mut config = mock_config(wire, count);
    config.drop_every = Some(Duration::from_secs(1));
    config.sync_every = sync_every;
    let m = mock::spawn(config).unwrap();
    // Connect once the stream runs: the relay's first event is not the upstream's first.
    thread::sleep(Duration::from_millis(300));
    let mut fc = follower_config(vec![url_of(m.local_addr(), wire)]);
    fc.compress_v2 = compress_v2;
    let running = Running::start(Follower::new(fc));
    let last = count - 1;
    running.wait_for("the mock's last event", |r| {
        r.appended
            .last()
            .is_some_and(|g| event_number(g, 1) == last)
    });
    let log = running.log_text();
    let record = running.stop();
    assert!(
        record.connected().len() >= 3,
        "dropped at least twice: {:?}",
        record.connected()
    );
    (record, history_of(&m), log)
}

/// The legacy wire (no seq): resumes by time with rewind and content de-duplication. The
/// first drop comes within the rewind of the first connection, so the upstream replays events
/// from before the follower's first one: none is appended (before the fix, events 0…N were
/// appended after newer ones).
#[test]
fn legacy_wire_with_drops_from_the_first_second() {
    let sync_every = Some(40);
    let (r, history, log) = follow_with_drops(Wire::Legacy, true, sync_every);
    let first = assert_exact(&r.appended, &history, sync_every, false, 3_509, |_| None);
    assert!(first > 0, "the follower connected after the stream began");
    assert!(
        r.skipped(SkipReason::BeforeHistory) > 0,
        "the first resume reached before the first event"
    );
    assert!(
        r.skipped(SkipReason::Duplicate) > 0,
        "the overlap was dropped"
    );
    let cursors = cursors(&r.connected());
    assert_eq!(cursors[0], None, "first connection live");
    assert!(
        cursors[1..]
            .iter()
            .all(|c| c.is_some_and(|c| c >= SEQ_CURSOR_LIMIT)),
        "resumes by time: {cursors:?}"
    );
    assert!(log.contains("from before the relay's first event"), "{log}");
}

/// `/subscribe` with the upstream's seq as `cursor` (and seq gaps where the mock's `#sync`
/// events are): every resume is by seq, exact, and drops only the one re-delivered event.
#[test]
fn cursor_wire_with_drops_resumes_exactly_by_seq() {
    let sync_every = Some(40);
    let (r, history, log) = follow_with_drops(Wire::Cursor, true, sync_every);
    assert_exact(&r.appended, &history, sync_every, false, 3_509, |_| Some(1));
    assert_exact_resumes(&r, &log);
}

/// `subscribeEvents` as text: v2 frames converted once to the legacy v1 bytes, `#sync`
/// passed through as parts, exact resume by seq.
#[test]
fn v2_text_wire_with_drops_resumes_exactly_by_seq() {
    let sync_every = Some(40);
    let (r, history, log) = follow_with_drops(Wire::V2, false, sync_every);
    assert_exact(&r.appended, &history, sync_every, true, 3_509, |_| Some(1));
    assert_v2_details(&r, &history, false);
    assert_exact_resumes(&r, &log);
}

/// `subscribeEvents` with the v2 dictionary: the same events, decompressed once.
#[test]
fn v2_zstd_wire_with_drops_resumes_exactly_by_seq() {
    let sync_every = Some(40);
    let (r, history, log) = follow_with_drops(Wire::V2, true, sync_every);
    assert_exact(&r.appended, &history, sync_every, true, 3_509, |_| Some(1));
    assert_v2_details(&r, &history, true);
    assert_exact_resumes(&r, &log);
    // The sessions' traffic: compressed bytes in, the frames' bytes out.
    let (mut wire_bytes, mut frame_bytes) = (0u64, 0u64);
    for line in log.lines().filter(|l| l.contains("upstream session ended")) {
        let field = |name: &str| -> u64 {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {line}"))
        };
        wire_bytes += field("wire_bytes");
        frame_bytes += field("frame_bytes");
    }
    let ratio = frame_bytes as f64 / wire_bytes as f64;
    println!(
        "subscribeEvents with the v2 dictionary: {wire_bytes} bytes in for {frame_bytes} bytes of frames: {ratio:.2}x"
    );
    assert!(ratio > 2.0, "{ratio:.2}");
}

/// Every `witnessedAt` is the mock's witness time; the URL asked for the dictionary or not.
fn assert_v2_details(r: &Record, history: &HashMap<u64, i64>, compressed: bool) {
    for g in &r.appended {
        let n = event_number(g, 1);
        let witnessed = history[&n] + mock::jitter_back_us(SEED, n, 30);
        assert_eq!(g.witnessed_us, Some(witnessed), "event {n}");
    }
    for url in r.connected() {
        assert_eq!(url.contains("zstdDictionary=20260811"), compressed, "{url}");
    }
}

/// After the first (live) connection every resume asked for the last appended seq, and its
/// first event was that one again (dropped as the only duplicate of each resume).
fn assert_exact_resumes(r: &Record, log: &str) {
    let cursors = cursors(&r.connected());
    assert_eq!(cursors[0], None, "first connection live");
    let resumes = &cursors[1..];
    assert!(
        resumes
            .iter()
            .all(|c| c.is_some_and(|c| c < SEQ_CURSOR_LIMIT)),
        "every resume by seq: {cursors:?}"
    );
    assert_eq!(
        r.skipped(SkipReason::Duplicate),
        resumes.len(),
        "one re-delivered event per resume"
    );
    assert_eq!(r.skipped(SkipReason::BeforeHistory), 0);
    assert_eq!(
        log.matches("resumed exactly at the upstream seq appended last")
            .count(),
        resumes.len(),
        "{log}"
    );
}

/// Failover between two instances that number the same events differently (seq offsets 1 and
/// 1,000,000): seqs are instance-local, so the follower resumes on the other one by time with
/// content de-duplication (and says so), then exactly by seq on it.
#[test]
fn failover_between_instances_falls_back_to_time_then_seq() {
    let count = 3_500;
    let mut a = mock_config(Wire::V2, count);
    a.drop_every = Some(Duration::from_secs(1));
    let mut b = mock_config(Wire::V2, count);
    b.seq_offset = 1_000_000;
    b.drop_every = Some(Duration::from_millis(700));
    let mut mock_a = mock::spawn(a).unwrap();
    let mock_b = mock::spawn(b).unwrap();
    thread::sleep(Duration::from_millis(300));
    let urls = vec![
        url_of(mock_a.local_addr(), Wire::V2),
        url_of(mock_b.local_addr(), Wire::V2),
    ];
    let running = Running::start(Follower::new(follower_config(urls.clone())));
    running.wait_for("events from A", |r| r.appended.len() > 1_200);
    // A goes away for good: the next attempt fails, the one after goes to B.
    mock_a.stop();
    let history_a = history_of(&mock_a);
    let last = count - 1;
    running.wait_for("the last event, from B", |r| {
        r.appended
            .last()
            .is_some_and(|g| g.upstream_seq == Some(last + 1_000_000))
    });
    let log = running.log_text();
    let r = running.stop();
    // Each event's time is its instance's: A's until the failover, then B's.
    let history_b = history_of(&mock_b);
    let from_b = r
        .appended
        .iter()
        .position(|g| g.upstream_seq.is_some_and(|s| s >= 1_000_000))
        .expect("events from B");
    assert!(from_b > 0, "events from A first");
    let offset_of = |g: &Got| {
        g.upstream_seq
            .map(|s| if s >= 1_000_000 { 1_000_000 } else { 1 })
    };
    let first = assert_exact(
        &r.appended[..from_b],
        &history_a,
        None,
        true,
        event_number(&r.appended[from_b - 1], 1),
        offset_of,
    );
    let resumed_at = event_number(&r.appended[from_b], 1_000_000);
    assert_eq!(
        resumed_at,
        event_number(&r.appended[from_b - 1], 1) + 1,
        "B continues right after A's last event"
    );
    assert_exact(
        &r.appended[from_b..],
        &history_b,
        None,
        true,
        last,
        offset_of,
    );
    assert!(first > 0);
    // How each connection resumed: B first by time (A's seq is no use there), later by seq.
    let connected = r.connected();
    let on_b: Vec<Option<i64>> = cursors(&connected)
        .into_iter()
        .zip(&connected)
        .filter(|(_, url)| url.starts_with(&urls[1]))
        .map(|(c, _)| c)
        .collect();
    assert!(
        on_b[0].is_some_and(|c| c >= SEQ_CURSOR_LIMIT),
        "failover by time: {on_b:?}"
    );
    assert!(
        on_b[1..]
            .iter()
            .all(|c| c.is_some_and(|c| (1_000_000..SEQ_CURSOR_LIMIT).contains(&c))),
        "then by B's seqs: {on_b:?}"
    );
    assert!(on_b.len() >= 2, "B dropped the follower too: {on_b:?}");
    assert!(
        log.contains("failing over: the last appended seq is another upstream's"),
        "{log}"
    );
    assert!(log.contains("resumed with overlap"), "{log}");
}

/// A restart with a checkpoint: on the URL that numbered it, the first connection resumes
/// exactly from its seq; with a checkpoint from another URL (another instance), by time with
/// de-duplication. Either way the two runs together append every event once, in order.
#[test]
fn restart_from_a_checkpoint_is_exact_on_its_url_and_by_time_elsewhere() {
    for same_url in [true, false] {
        let count = 2_500;
        let mut config = mock_config(Wire::V2, count);
        // The same stream on /subscribe with cursors: another URL, here with the same
        // numbering, so only the URL tells the follower it cannot trust the seq.
        config.also_listen = vec![("127.0.0.1:0".parse().unwrap(), Wire::Cursor)];
        let m = mock::spawn(config).unwrap();
        let v2_url = url_of(m.local_addrs()[0].0, Wire::V2);
        let cursor_url = url_of(m.local_addrs()[1].0, Wire::Cursor);
        thread::sleep(Duration::from_millis(200));

        let first_run = Running::start(Follower::new(follower_config(vec![v2_url.clone()])));
        first_run.wait_for("a second of events", |r| r.appended.len() > 900);
        let before = first_run.stop();
        let last = before.appended.last().unwrap();
        let checkpoint = UpstreamCheckpoint {
            url: if same_url {
                v2_url.clone()
            } else {
                cursor_url.clone()
            },
            seq: last.upstream_seq.unwrap(),
        };
        // What the relay's log would give back: the recent events' times and keys.
        let times: Vec<i64> = before.appended.iter().map(|g| g.time_us).collect();
        let keys: Vec<(i64, u64)> = before
            .appended
            .iter()
            .map(|g| (g.indexed_us, g.key))
            .collect();
        thread::sleep(Duration::from_millis(300));

        let mut follower = Follower::new(follower_config(vec![v2_url.clone()]));
        follower.resume_from(times, keys, Some(checkpoint));
        let second_run = Running::start(follower);
        second_run.wait_for("the last event", |r| {
            r.appended
                .last()
                .is_some_and(|g| g.upstream_seq == Some(count))
        });
        let log = second_run.log_text();
        let after = second_run.stop();
        let mut all = before.appended.clone();
        all.extend(after.appended.iter().cloned());
        assert_exact(&all, &history_of(&m), None, true, count - 1, |_| Some(1));
        let cursor = cursors(&after.connected())[0].expect("a resume");
        if same_url {
            assert_eq!(cursor, last.upstream_seq.unwrap() as i64, "exact");
            assert_eq!(
                after.skipped(SkipReason::Duplicate),
                1,
                "the re-delivered one"
            );
            assert!(log.contains("resumed exactly at the upstream seq"), "{log}");
        } else {
            assert!(cursor >= SEQ_CURSOR_LIMIT, "by time: {cursor}");
            assert!(
                after.skipped(SkipReason::Duplicate) > 1,
                "the rewound overlap"
            );
            assert!(log.contains("resumed with overlap"), "{log}");
        }
    }
}

/// A seq checkpoint older than the upstream keeps: `subscribeEvents` refuses it
/// (`CursorTooOld`), and the follower resumes by time at once, saying events were lost.
#[test]
fn a_seq_below_the_upstreams_retention_falls_back_to_time() {
    let mut config = mock_config(Wire::V2, 1_500);
    config.history = 300;
    let m = mock::spawn(config).unwrap();
    let url = url_of(m.local_addr(), Wire::V2);
    // Wait until seq 5 is long gone from the mock's history.
    let deadline = Instant::now() + DEADLINE;
    while m.seq() < 800 {
        assert!(Instant::now() < deadline, "mock too slow");
        thread::sleep(Duration::from_millis(20));
    }
    let mut follower = Follower::new(follower_config(vec![url.clone()]));
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    follower.resume_from(
        [now_us - 2_000_000],
        [],
        Some(UpstreamCheckpoint { url, seq: 5 }),
    );
    let running = Running::start(follower);
    running.wait_for("events", |r| r.appended.len() > 100);
    let log = running.log_text();
    let r = running.stop();
    let states = &r.states;
    assert!(
        matches!(&states[0], ConnectionState::Disconnected { reason, .. } if reason.contains("CursorTooOld")),
        "{states:?}"
    );
    let cursors = cursors(&r.connected());
    assert!(
        cursors[0].is_some_and(|c| c >= SEQ_CURSOR_LIMIT),
        "{cursors:?}"
    );
    assert!(log.contains("no longer has the seq appended last"), "{log}");
}

/// An upstream URL that no longer numbers events as the checkpoint says (its data was wiped,
/// another instance answers behind the name): on `subscribeEvents` it says `#info
/// FutureCursor`, on `/subscribe` the first event is not the one appended last. Either way the
/// follower reconnects at once by time instead of dropping everything "already seen".
#[test]
fn a_renumbered_upstream_is_resumed_by_time() {
    for wire in [Wire::V2, Wire::Cursor] {
        let m = mock::spawn(mock_config(wire, 1_500)).unwrap();
        let url = url_of(m.local_addr(), wire);
        thread::sleep(Duration::from_millis(300));
        let first_run = Running::start(Follower::new(follower_config(vec![url.clone()])));
        first_run.wait_for("some events", |r| r.appended.len() > 200);
        let before = first_run.stop();
        let times: Vec<i64> = before.appended.iter().map(|g| g.time_us).collect();
        let keys: Vec<(i64, u64)> = before
            .appended
            .iter()
            .map(|g| (g.indexed_us, g.key))
            .collect();
        // A seq far beyond anything this instance assigned.
        let checkpoint = UpstreamCheckpoint {
            url: url.clone(),
            seq: 1_000_000_000,
        };
        let mut follower = Follower::new(follower_config(vec![url.clone()]));
        follower.resume_from(times, keys, Some(checkpoint));
        let second_run = Running::start(follower);
        second_run.wait_for("the last event", |r| {
            r.appended
                .last()
                .is_some_and(|g| g.upstream_seq == Some(1_500))
        });
        let log = second_run.log_text();
        let after = second_run.stop();
        let mut all = before.appended.clone();
        all.extend(after.appended.iter().cloned());
        assert_exact(&all, &history_of(&m), None, true, 1_499, |_| Some(1));
        let cursors = cursors(&after.connected());
        assert_eq!(cursors[0], Some(1_000_000_000), "{wire:?}");
        assert!(
            cursors[1].is_some_and(|c| c >= SEQ_CURSOR_LIMIT),
            "{wire:?}: then by time: {cursors:?}"
        );
        assert!(
            log.contains("contradicts the exact resume position"),
            "{log}"
        );
        assert!(log.contains("resumed with overlap"), "{log}");
    }
}

/// An upstream flooding `#info` frames gets one log line for them, not one each, and the
/// events after them still arrive.
#[test]
fn an_info_flood_is_logged_once() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url_of(listener.local_addr().unwrap(), Wire::V2);
    let line = include_str!("../assets/jetstream-v1-sample.jsonl")
        .lines()
        .next()
        .unwrap();
    let mut event = Vec::new();
    jetrelay::wire::v1_to_v2(line.as_bytes(), 7, 1_783_175_889_000_000, &mut event).unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut ws = tungstenite::accept(stream).unwrap();
        let mut info = Vec::new();
        jetrelay::wire::info_frame(jetrelay::wire::InfoName::FutureCursor, "flood", &mut info);
        let info = String::from_utf8(info).unwrap();
        for _ in 0..5_000 {
            ws.write(tungstenite::Message::text(info.clone())).unwrap();
        }
        ws.send(tungstenite::Message::text(
            String::from_utf8(event).unwrap(),
        ))
        .unwrap();
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        while ws.read().is_ok() {}
    });
    let mut config = follower_config(vec![url]);
    config.compress_v2 = false;
    let running = Running::start(Follower::new(config));
    running.wait_for("the event after the flood", |r| r.appended.len() == 1);
    let log = running.log_text();
    let r = running.stop();
    server.join().unwrap();
    assert_eq!(r.appended[0].v1_json, line.as_bytes());
    assert_eq!(log.matches("upstream #info").count(), 1, "{log}");
}

/// Poison events between good ones, on both wires, through the follower and the real writer
/// (in a fresh data directory): every good event is appended once, in upstream order, and each
/// poison one — valid to the upstream validation, impossible for the writer to re-encode — is
/// counted as skipped (`unconvertible`). One such event used to stop ingestion for good: the
/// writer retried it forever as if the disk were full, and the upstream re-sent it after every
/// restart.
#[test]
fn poison_events_are_skipped_and_the_good_ones_around_them_appended() {
    use jetrelay::encoding::Encoding;
    use jetrelay::hub::stored_header_len;
    use jetrelay::writer::{LogWriter, WriterOptions};
    use std::os::unix::fs::FileExt;

    let lines: Vec<&str> = include_str!("../assets/jetstream-v1-sample.jsonl")
        .lines()
        .take(8)
        .collect();
    // Each poison event is made from a commit the test appends nowhere else, so that none is
    // a duplicate of a good one (the follower would skip it before the writer).
    let commits: Vec<&str> = include_str!("../assets/jetstream-v1-sample.jsonl")
        .lines()
        .skip(20)
        .filter(|l| {
            l.contains(r#""record":{"#) && l.ends_with(r#""}}"#) && l.contains(r#","cid":""#)
        })
        .take(4)
        .collect();
    let time_of = |line: &str| parse_event(line.as_bytes()).unwrap().time_us;
    let commit_cid_at = |line: &str| line.rfind(r#","cid":""#).unwrap();
    let v1_poison = vec![
        commits[0].replacen(&time_of(commits[0]).to_string(), "300000000000000000", 1),
        commits[1].replacen(r#""record":{"#, r#""record":"x","r":{"#, 1),
        format!(
            r#"{},"cid":5}}}}"#,
            &commits[2][..commit_cid_at(commits[2])]
        ),
        commits[3].replacen(r#""kind":"#, r#""\u006bind":"#, 1),
    ];
    let witnessed_us = 1_783_175_889_000_000;
    let v2_of = |line: &str, seq: u64| {
        let mut frame = Vec::new();
        jetrelay::wire::v1_to_v2(line.as_bytes(), seq, witnessed_us, &mut frame).unwrap();
        String::from_utf8(frame).unwrap()
    };
    let rfc3339 = |us: i64| jetrelay::wire::rfc3339::format_micros_string(us).unwrap();
    let v2_poison = |seq: u64| {
        vec![
            v2_of(commits[0], seq).replacen(
                &rfc3339(time_of(commits[0])),
                "9999-12-31T23:59:59.999999-01:00",
                1,
            ),
            v2_of(commits[1], seq).replacen(&rfc3339(witnessed_us), "0000-01-01T00:00:00+01:00", 1),
        ]
    };
    for wire in [Wire::Legacy, Wire::V2] {
        // good, poison, good, poison, …, good: (text, good line) in upstream order.
        let mut messages: Vec<(String, Option<&str>)> = Vec::new();
        let mut seq = 100;
        let poisons = match wire {
            Wire::V2 => v2_poison(0),
            _ => v1_poison.clone(),
        };
        for (i, line) in lines.iter().take(poisons.len() + 1).enumerate() {
            seq += 1;
            let good = match wire {
                Wire::V2 => v2_of(line, seq),
                _ => line.to_string(),
            };
            messages.push((good, Some(line)));
            if let Some(_bad) = poisons.get(i) {
                seq += 1;
                let bad = match wire {
                    Wire::V2 => v2_poison(seq).swap_remove(i),
                    _ => poisons[i].clone(),
                };
                messages.push((bad, None));
            }
        }
        let goods: Vec<&str> = messages.iter().filter_map(|(_, g)| *g).collect();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = url_of(listener.local_addr().unwrap(), wire);
        let texts: Vec<String> = messages.iter().map(|(m, _)| m.clone()).collect();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut ws = tungstenite::accept(stream).unwrap();
            for text in texts {
                ws.send(tungstenite::Message::text(text)).unwrap();
            }
            ws.get_mut()
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            while ws.read().is_ok() {}
        });

        let dir = common::temp_dir("poison-events");
        let settings = jetrelay::config::RawSettings {
            data_dir: Some(dir.to_path_buf()),
            ..jetrelay::config::RawSettings::default()
        }
        .validate()
        .unwrap();
        let (hub, _) = jetrelay::relay::open_hub(&settings).unwrap();
        let mut writer = LogWriter::new(hub.clone(), Vec::new(), WriterOptions::default()).unwrap();
        let mut config = follower_config(vec![url]);
        config.compress_v2 = false;
        let stop = Arc::new(AtomicBool::new(false));
        let follower = {
            let stop = stop.clone();
            thread::spawn(move || Follower::new(config).run(&mut writer, &stop))
        };
        let counters = &hub.counters;
        let appended = || counters.events_appended.load(Ordering::Relaxed);
        let deadline = Instant::now() + DEADLINE;
        while appended() < goods.len() as u64 {
            assert!(
                Instant::now() < deadline && !follower.is_finished(),
                "{wire:?}: {} of {} good events appended, {} failed append attempts",
                appended(),
                goods.len(),
                counters.append_errors.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        follower.join().unwrap().unwrap();
        server.join().unwrap();

        let unconvertible = SkipReason::ALL
            .iter()
            .position(|r| *r == SkipReason::Unconvertible)
            .unwrap();
        let skipped = counters.upstream_skipped_by[unconvertible].load(Ordering::Relaxed);
        assert_eq!(skipped, poisons.len() as u64, "{wire:?}");
        assert_eq!(appended(), goods.len() as u64, "{wire:?}");
        assert_eq!(
            counters.append_errors.load(Ordering::Relaxed),
            0,
            "{wire:?}"
        );
        // What clients are served: the good events' legacy bytes, in upstream order.
        let mut stored: Vec<Vec<u8>> = Vec::new();
        let index = hub.index();
        index.walk(index.start_pos(), usize::MAX, |pos, e| {
            let mut frame = vec![0u8; e.frame_len(Encoding::V1Json) as usize];
            hub.base(Encoding::V1Json)
                .file()
                .read_exact_at(&mut frame, pos.offset(Encoding::V1Json))
                .unwrap();
            stored.push(frame.split_off(stored_header_len(&frame)));
            true
        });
        drop(index);
        let stored: Vec<String> = stored
            .iter()
            .map(|frame| {
                let mut legacy = Vec::new();
                jetrelay::wire::without_cursor(frame, &mut legacy).unwrap();
                String::from_utf8(legacy).unwrap()
            })
            .collect();
        assert_eq!(stored, goods, "{wire:?}");
    }
}

mod common;

/// The relay binary, `SIGKILL`ed twice while it follows a v2 upstream that also sends
/// `#sync`s, with v1 and v2 clients reconnecting by cursor: every client ends with every
/// event of its wire exactly once, in order. The first restart finds the checkpoint
/// (`upstream.url` names the configured URL; the newest index record has its seq) and resumes
/// exactly by seq; the second is configured with another URL (the same instance without the
/// query, which the relay cannot know) and resumes by time, saying so.
#[test]
fn relay_restart_resumes_by_seq_on_its_url_and_by_time_on_another() {
    use common::{Relay, swarm_spawn, swarm_wait, temp_dir};
    let (rate, events, sync_every) = (1_000u64, 12_000u64, 50u64);
    let mock = common::Mock::start(
        rate,
        &[
            "--wire",
            "v2",
            "--count",
            &events.to_string(),
            "--sync-every",
            &sync_every.to_string(),
        ],
    );
    let base = format!("ws://127.0.0.1:{}{SUBSCRIBE_EVENTS_PATH}", mock.port);
    let configured = format!("{base}?cursor=0");
    let dir = temp_dir("restart-checkpoint");
    let flags = ["--rewind", "2s", "--upstream-skew", "2s"];
    let mut relay = Relay::start(&configured, &dir, &flags);
    let port = relay.port;
    let duration = format!("{}s", events / rate + 12);
    let swarm_args = |url: String, expect: u64| {
        vec![
            "--url".to_string(),
            url,
            "--clients".into(),
            "4".into(),
            "--reconnect".into(),
            "--sync-every".into(),
            sync_every.to_string(),
            "--duration".into(),
            duration.clone(),
            "--expect-in-order".into(),
            "--expect-first-seq".into(),
            "0".into(),
            "--expect-min-events".into(),
            expect.to_string(),
            "--expect-max-events".into(),
            expect.to_string(),
        ]
    };
    // #sync has no v1 form: v1 clients get the other events; v2 clients get them too, and the
    // #syncs (counted apart, each placed in the generator's stream by its DID).
    let (syncs, others) = (events / sync_every, events - events / sync_every);
    let v1_args = swarm_args(relay.url("cursor=0"), others);
    let v2_args = swarm_args(
        format!("ws://127.0.0.1:{port}{SUBSCRIBE_EVENTS_PATH}?cursor=0"),
        others,
    );
    let v1_swarm = swarm_spawn(&v1_args.iter().map(String::as_str).collect::<Vec<_>>());
    let v2_swarm = swarm_spawn(&v2_args.iter().map(String::as_str).collect::<Vec<_>>());

    let mut logs = Vec::new();
    for upstream in [&configured, &base] {
        std::thread::sleep(Duration::from_secs(3));
        relay.proc.kill9();
        std::thread::sleep(Duration::from_millis(200));
        relay = Relay::start_on(port, upstream, &dir, &flags);
        let restarted = Instant::now();
        while !relay.log_text().contains("connected to upstream") {
            assert!(restarted.elapsed() < DEADLINE, "{}", relay.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Both outcomes are logged when the first event after the resume is judged.
        let judged = |log: &str| {
            log.contains("resumed exactly at the upstream seq")
                || log.contains("resumed with overlap")
        };
        while !judged(&relay.log_text()) {
            assert!(restarted.elapsed() < DEADLINE, "{}", relay.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        logs.push(relay.log_text());
    }
    let v1 = swarm_wait(v1_swarm);
    let v2 = swarm_wait(v2_swarm);
    assert_eq!(v1["events"].as_u64(), Some(4 * others), "{v1}");
    assert_eq!(v1["syncs"].as_u64(), Some(0), "{v1}");
    assert_eq!(v2["events"].as_u64(), Some(4 * others), "{v2}");
    assert_eq!(v2["syncs"].as_u64(), Some(4 * syncs), "{v2}");

    let [exact, by_time] = &logs[..] else {
        unreachable!()
    };
    assert!(
        exact.contains("restart: resuming exactly from the upstream seq appended last"),
        "{exact}"
    );
    assert!(
        exact.contains("resumed exactly at the upstream seq"),
        "{exact}"
    );
    assert!(!exact.contains("resumed with overlap"), "{exact}");
    assert!(by_time.contains("not configured any more"), "{by_time}");
    assert!(by_time.contains("resumed with overlap"), "{by_time}");
    let _ = std::fs::remove_dir_all(&dir);
}
