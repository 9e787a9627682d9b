//! Subscription semantics end to end with the real binaries: mock upstream → relay → clients.
//!
//! The mock replays the real sample events (assets/jetstream-v1-sample.jsonl) as templates with
//! fresh DIDs and rkeys, a finite number of them (`--count`), and the relay follows it from
//! cursor 0, so each test knows the complete stream: events `seq` = 0..count, in order. Each test
//! reads that stream unfiltered (cursor=0, checked byte-exact against `jetrelay::mock::Generator`,
//! and its compressed twin decoded with the `zstd` crate and the dictionary file), filters it
//! with the few lines of [`Filter::keeps`] — deliberately not `src/subscription.rs` — and
//! compares byte-exact with what the relay's filtered clients received.
//!
//! A client whose start or filter changes at a moment the test cannot pin to one event (a live
//! connect, an `options_update`, a hello) is checked with [`check_phases`]: what it received must
//! be exactly what a sequence of filters passes, each taking over at one event boundary within
//! causal bounds, and the test also asserts evidence that each new filter really took over.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use jetrelay::mock::Generator;
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;

type Ws = tungstenite::WebSocket<MaybeTlsStream<TcpStream>>;

/// The harness starts the mock with `--seed 7`.
const SEED: u64 = 7;
/// DID population of the mock here: small, so that each DID has dozens of events.
const DIDS: u64 = 40;
/// The official dictionary, for decoding with a standard zstd decoder.
const DICTIONARY: &[u8] = include_bytes!("../assets/zstd_dictionary");
/// A client stops reading once it has been quiet this long after the test said "stop".
const QUIET: Duration = Duration::from_millis(2000);
/// Read timeout of one `read()`: how often a client looks at its clock and its script.
const POLL: Duration = Duration::from_millis(100);
/// Hard bound on any one client's reading.
const CLIENT_DEADLINE: Duration = Duration::from_secs(90);
/// Median zstd payload size of the sample events (plain median: 502 bytes).
const ZSTD_MEDIAN: usize = 222;
/// Median plain size of the sample events.
const PLAIN_MEDIAN: usize = 502;

// ---------------------------------------------------------------------------------------------
// The stream as the test knows it.

/// One event of the complete stream.
#[derive(Debug, Clone)]
struct Ev {
    /// Generator sequence number (= position in the stream).
    seq: u64,
    /// Its `time_us`.
    time_us: i64,
    /// Exact JSON bytes as the relay sends them (with its `cursor` field when it adds one).
    json: Vec<u8>,
    /// The relay's seq of the event (its `cursor` field), when it sends one.
    cursor: Option<u64>,
    /// Exact zstd payload the relay sends compressed clients.
    zstd: Vec<u8>,
    /// Top-level `did`.
    did: String,
    /// `commit`, `identity` or `account`.
    kind: String,
    /// `commit.collection` for commits.
    collection: Option<String>,
}

/// The complete stream, `evs[seq]`.
struct Reference {
    evs: Vec<Ev>,
}

/// A WebSocket data frame as received.
#[derive(Debug, Clone)]
struct Frame {
    binary: bool,
    data: Vec<u8>,
}

fn unzstd(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::with_dictionary(frame, DICTIONARY)
        .and_then(|mut d| d.read_to_end(&mut out))
        .unwrap_or_else(|e| panic!("standard zstd decoder refused a frame: {e}"));
    out
}

impl Reference {
    /// Builds the reference from the unfiltered plain and compressed replays of `n` events,
    /// checking both: every plain event is byte-exact what the generator produces for its seq
    /// (once the relay's `cursor` field is taken out; its values must increase), seqs are
    /// exactly 0..n in order, and every compressed frame decodes to the plain JSON.
    fn build(plain: Vec<Frame>, zstd: Vec<Frame>, n: usize) -> Reference {
        assert_eq!(plain.len(), n, "unfiltered plain replay length");
        assert_eq!(zstd.len(), n, "unfiltered compressed replay length");
        let generator = Generator::new(SEED, DIDS);
        let mut evs: Vec<Ev> = Vec::with_capacity(n);
        for (i, (p, z)) in plain.into_iter().zip(zstd).enumerate() {
            assert!(!p.binary, "plain event {i} came as a binary frame");
            assert!(z.binary, "compressed event {i} came as a text frame");
            let (event, cursor) = strip_cursor(&p.data);
            let seq = Generator::seq_of(&event).unwrap_or_else(|| panic!("event {i} has no seq"));
            assert_eq!(
                seq, i as u64,
                "the relay's full replay is the mock's stream in order"
            );
            if let (Some(prev), Some(this)) = (evs.last().and_then(|e| e.cursor), cursor) {
                assert!(this > prev, "event {seq}: relay seq {this} after {prev}");
            }
            let time_us = Generator::time_us_of(&event).expect("time_us");
            let mut want = Vec::new();
            generator.event(seq, time_us, &mut want);
            assert!(
                event == want,
                "event {seq} differs from the generator's:\n{}\n{}",
                String::from_utf8_lossy(&p.data),
                String::from_utf8_lossy(&want)
            );
            assert_eq!(
                unzstd(&z.data),
                p.data,
                "compressed event {seq} decodes to the JSON"
            );
            let v: serde_json::Value = serde_json::from_slice(&p.data).expect("event JSON");
            let kind = v["kind"].as_str().expect("kind").to_string();
            let collection = v["commit"]["collection"].as_str().map(str::to_string);
            evs.push(Ev {
                seq,
                time_us,
                did: v["did"].as_str().expect("did").to_string(),
                kind,
                collection,
                cursor,
                json: p.data,
                zstd: z.data,
            });
        }
        Reference { evs }
    }

    fn n(&self) -> u64 {
        self.evs.len() as u64
    }

    /// Decodes received frames to seqs, checking each byte-exact against the reference (and
    /// the frame type against the encoding the client asked for).
    fn seqs(&self, frames: &[Frame], compressed: bool, what: &str) -> Vec<u64> {
        frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                assert_eq!(
                    f.binary, compressed,
                    "{what}: frame {i} binary={}",
                    f.binary
                );
                let json = if compressed {
                    unzstd(&f.data)
                } else {
                    f.data.clone()
                };
                let seq = mock_seq(&json).unwrap_or_else(|| {
                    panic!(
                        "{what}: frame {i} is not a mock event: {}",
                        String::from_utf8_lossy(&json)
                    )
                });
                let ev = self
                    .evs
                    .get(seq as usize)
                    .unwrap_or_else(|| panic!("{what}: seq {seq} is beyond the stream"));
                assert!(json == ev.json, "{what}: event {seq} not byte-exact");
                if compressed {
                    assert!(
                        f.data == ev.zstd,
                        "{what}: compressed event {seq} not byte-exact"
                    );
                }
                seq
            })
            .collect()
    }

    /// Seqs `filter` passes among events `from..`.
    fn expect(&self, filter: &Filter, from: u64) -> Vec<u64> {
        self.evs[from as usize..]
            .iter()
            .filter(|e| filter.keeps(e))
            .map(|e| e.seq)
            .collect()
    }

    /// Index of the first event with `time_us >= cursor` (inclusive cursor, log order).
    fn cursor_start(&self, cursor: i64) -> u64 {
        self.evs
            .iter()
            .position(|e| e.time_us >= cursor)
            .map_or(self.n(), |i| i as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// The test's own filter: a few lines from the Jetstream documentation.

/// A subscription's filters and encoding.
#[derive(Debug, Clone, Default)]
struct Filter {
    /// `wantedCollections`: an NSID, or a prefix ending in `.*`.
    collections: Vec<String>,
    /// `wantedDids`.
    dids: Vec<String>,
    /// `maxMessageSizeBytes`.
    max: Option<usize>,
    /// zstd binary frames (then `max` counts the compressed size).
    compressed: bool,
}

impl Filter {
    fn all() -> Filter {
        Filter::default()
    }

    fn collections(list: &[&str]) -> Filter {
        Filter {
            collections: list.iter().map(|s| s.to_string()).collect(),
            ..Filter::default()
        }
    }

    fn dids(list: &[String]) -> Filter {
        Filter {
            dids: list.to_vec(),
            ..Filter::default()
        }
    }

    fn max(mut self, max: usize) -> Filter {
        self.max = Some(max);
        self
    }

    fn zstd(mut self) -> Filter {
        self.compressed = true;
        self
    }

    fn with_dids(mut self, list: &[String]) -> Filter {
        self.dids = list.to_vec();
        self
    }

    /// Whether a client with these options receives `e`.
    fn keeps(&self, e: &Ev) -> bool {
        let collection_ok = self.collections.is_empty()
            || e.kind != "commit"
            || e.collection.as_deref().is_some_and(|c| {
                self.collections.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => c.starts_with(prefix),
                    None => c == p,
                })
            });
        let did_ok = self.dids.is_empty() || self.dids.contains(&e.did);
        let sent = if self.compressed {
            e.zstd.len()
        } else {
            e.json.len()
        };
        collection_ok && did_ok && self.max.is_none_or(|m| sent <= m)
    }

    /// Query parameters (without `compress`).
    fn query(&self) -> Vec<String> {
        let mut q: Vec<String> = self
            .collections
            .iter()
            .map(|c| format!("wantedCollections={c}"))
            .collect();
        q.extend(self.dids.iter().map(|d| format!("wantedDids={d}")));
        q.extend(self.max.map(|m| format!("maxMessageSizeBytes={m}")));
        q
    }

    /// The `options_update` message replacing a client's filters with these.
    fn update(&self) -> String {
        serde_json::json!({
            "type": "options_update",
            "payload": {
                "wantedCollections": self.collections,
                "wantedDids": self.dids,
                "maxMessageSizeBytes": self.max.unwrap_or(0),
            }
        })
        .to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// How a client connects.
#[derive(Debug, Clone, Default)]
struct Connect {
    /// `cursor=`.
    cursor: Option<i64>,
    /// Ask for zstd with the `Socket-Encoding: zstd` header instead of `compress=true`.
    zstd_header: bool,
    /// `requireHello=true`.
    require_hello: bool,
}

/// The URL and headers for a client with `filter` connecting as `how`.
fn request(relay: &Relay, filter: &Filter, how: &Connect) -> (String, Vec<(String, String)>) {
    let mut q = filter.query();
    if let Some(c) = how.cursor {
        q.push(format!("cursor={c}"));
    }
    if how.require_hello {
        q.push("requireHello=true".into());
    }
    let mut headers = Vec::new();
    if filter.compressed {
        if how.zstd_header {
            headers.push(("Socket-Encoding".to_string(), "zstd".to_string()));
        } else {
            q.push("compress=true".into());
        }
    }
    (relay.url(&q.join("&")), headers)
}

/// Opens a WebSocket (the handshake completes before this returns).
fn open(url: &str, headers: &[(String, String)]) -> Ws {
    let mut req = url.into_client_request().expect("client request");
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            tungstenite::http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    let (ws, resp) = tungstenite::connect(req).unwrap_or_else(|e| panic!("connecting {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 101, "{url}");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(POLL)).expect("read timeout");
    }
    ws
}

/// One read: a data frame, a close frame, nothing yet, or the end of the connection.
enum Got {
    Frame(Frame),
    Close(u16, String),
    Nothing,
    Gone,
}

fn read_one(ws: &mut Ws) -> Got {
    loop {
        return match ws.read() {
            Ok(Message::Text(t)) => Got::Frame(Frame {
                binary: false,
                data: t.as_bytes().to_vec(),
            }),
            Ok(Message::Binary(b)) => Got::Frame(Frame {
                binary: true,
                data: b.to_vec(),
            }),
            Ok(Message::Close(f)) => Got::Close(
                f.as_ref().map_or(1005, |f| u16::from(f.code)),
                f.map_or(String::new(), |f| f.reason.to_string()),
            ),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Got::Nothing
            }
            Err(_) => Got::Gone,
        };
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Outcome {
    /// Data frames in order.
    frames: Vec<Frame>,
    /// The relay's close frame, if any.
    close: Option<(u16, String)>,
    /// For each scripted message: how many frames had arrived when it was sent.
    sent_after: Vec<usize>,
    /// Frames received before the first scripted message went out.
    before_first_send: usize,
}

/// A message a client sends `at` after connecting — or, with `after_frames`, once it has
/// received that many frames (whichever comes later).
#[derive(Debug, Clone)]
struct Step {
    at: Duration,
    after_frames: usize,
    text: String,
}

fn step(at_ms: u64, after_frames: usize, text: String) -> Step {
    Step {
        at: Duration::from_millis(at_ms),
        after_frames,
        text,
    }
}

/// Tells client threads when to stop: [`RUN`], [`DRAIN`] or [`HALT`].
type Stop = Arc<AtomicU8>;
/// Keep reading.
const RUN: u8 = 0;
/// The stream is complete: stop once quiet for [`QUIET`].
const DRAIN: u8 = 1;
/// Stop now (endless streams).
const HALT: u8 = 2;

fn drain(stop: &Stop) {
    stop.store(DRAIN, Ordering::SeqCst);
}

fn halt(stop: &Stop) {
    stop.store(HALT, Ordering::SeqCst);
}

/// Reads (and runs its script) until `stop` is set and the connection was quiet for [`QUIET`],
/// or the relay closes it.
fn run_client(mut ws: Ws, steps: Vec<Step>, stop: Stop) -> Outcome {
    let start = Instant::now();
    let mut last = start;
    let mut out = Outcome::default();
    let mut steps = steps.into_iter().peekable();
    while start.elapsed() < CLIENT_DEADLINE {
        if let Some(s) = steps.peek()
            && start.elapsed() >= s.at
            && out.frames.len() >= s.after_frames
        {
            if out.sent_after.is_empty() {
                out.before_first_send = out.frames.len();
            }
            out.sent_after.push(out.frames.len());
            let text = steps.next().map(|s| s.text).unwrap_or_default();
            if ws.send(Message::text(text)).is_err() {
                break;
            }
            last = Instant::now();
        }
        let stopping = stop.load(Ordering::SeqCst);
        if steps.peek().is_none()
            && (stopping == HALT || (stopping == DRAIN && last.elapsed() >= QUIET))
        {
            break;
        }
        match read_one(&mut ws) {
            Got::Frame(f) => {
                out.frames.push(f);
                last = Instant::now();
            }
            Got::Close(code, reason) => out.close = Some((code, reason)),
            Got::Nothing => {}
            Got::Gone => break,
        }
    }
    out
}

/// Connects now (so handshakes happen in program order), reads on a thread.
fn spawn_client(
    relay: &Relay,
    filter: &Filter,
    how: &Connect,
    steps: Vec<Step>,
    stop: &Stop,
) -> JoinHandle<Outcome> {
    let (url, headers) = request(relay, filter, how);
    let ws = open(&url, &headers);
    let stop = stop.clone();
    std::thread::spawn(move || run_client(ws, steps, stop))
}

/// Reads `n` frames (or fails after `within`), counting progress in `progress`.
fn spawn_reader(url: String, n: usize, progress: Arc<AtomicUsize>) -> JoinHandle<Vec<Frame>> {
    let mut ws = open(&url, &[]);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut frames = Vec::with_capacity(n);
        while frames.len() < n && start.elapsed() < CLIENT_DEADLINE {
            match read_one(&mut ws) {
                Got::Frame(f) => {
                    frames.push(f);
                    progress.store(frames.len(), Ordering::SeqCst);
                }
                Got::Nothing => {}
                Got::Close(..) | Got::Gone => break,
            }
        }
        frames
    })
}

fn join<T>(h: JoinHandle<T>) -> T {
    h.join().expect("client thread panicked")
}

/// The upstream URL: from cursor 0, so the relay holds the mock's whole stream.
fn upstream(mock: &Mock) -> String {
    mock.url()
}

/// Starts a finite mock and a relay following it (the cleanup comes first so that it runs
/// after both are stopped).
fn setup(name: &str, rate: u64, count: usize) -> (TempDir, Mock, Relay) {
    setup_with(name, rate, count, &[])
}

/// [`setup`] with extra relay flags.
fn setup_with(name: &str, rate: u64, count: usize, relay_args: &[&str]) -> (TempDir, Mock, Relay) {
    let count = count.to_string();
    let mock = Mock::start(rate, &["--count", &count, "--dids", "40"]);
    let dir = temp_dir(name);
    let relay = Relay::start(&upstream(&mock), &dir, relay_args);
    (dir, mock, relay)
}

/// Reference readers (plain and compressed, cursor=0) started now; `progress` counts plain.
struct RefReaders {
    plain: JoinHandle<Vec<Frame>>,
    zstd: JoinHandle<Vec<Frame>>,
    progress: Arc<AtomicUsize>,
    n: usize,
}

impl RefReaders {
    fn start(relay: &Relay, n: usize) -> RefReaders {
        let progress = Arc::new(AtomicUsize::new(0));
        RefReaders {
            plain: spawn_reader(relay.url("cursor=0"), n, progress.clone()),
            zstd: spawn_reader(
                relay.url("cursor=0&compress=true"),
                n,
                Arc::new(AtomicUsize::new(0)),
            ),
            progress,
            n,
        }
    }

    fn wait_for(&self, events: usize, within: Duration) {
        wait_until(
            &format!("{events} events through the relay"),
            within,
            || self.progress.load(Ordering::SeqCst) >= events,
        );
    }

    fn finish(self) -> Reference {
        Reference::build(join(self.plain), join(self.zstd), self.n)
    }
}

// ---------------------------------------------------------------------------------------------
// Checking.

/// One filter regime of a client: from some event `b` with `lo <= b <= hi` on, `filter`
/// decides what the client receives (`None`: nothing).
#[derive(Debug, Clone)]
struct Phase {
    filter: Option<Filter>,
    lo: u64,
    hi: u64,
}

fn phase(filter: Option<Filter>, lo: u64) -> Phase {
    Phase {
        filter,
        lo,
        hi: u64::MAX,
    }
}

/// Checks that `got` (seqs, in arrival order) is exactly what the phases pass when each takes
/// over at one event boundary within its `[lo, hi]`. Returns the phases the client may be in
/// after the last event.
fn check_phases(r: &Reference, got: &[u64], phases: &[Phase], what: &str) -> Vec<usize> {
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "{what}: events out of order or duplicated: {:?}",
        got.windows(2).find(|w| w[0] >= w[1])
    );
    let mut states = vec![false; phases.len()];
    states[0] = true;
    let mut next = 0;
    for e in &r.evs {
        let s = e.seq;
        for p in 0..phases.len() - 1 {
            if states[p] && phases[p + 1].lo <= s {
                states[p + 1] = true;
            }
        }
        for p in 0..phases.len() - 1 {
            if s >= phases[p + 1].hi {
                states[p] = false;
            }
        }
        let delivered = got.get(next) == Some(&s);
        let verdicts: Vec<bool> = phases
            .iter()
            .map(|ph| ph.filter.as_ref().is_some_and(|f| f.keeps(e)))
            .collect();
        for (p, ok) in states.iter_mut().enumerate() {
            *ok &= verdicts[p] == delivered;
        }
        assert!(
            states.iter().any(|&x| x),
            "{what}: event {s} ({} {:?} {} bytes, did {}) was {} but no filter regime allows \
             that; verdicts per phase {verdicts:?}; phases {phases:?}; received {} events, \
             around here: {:?}",
            e.kind,
            e.collection,
            e.json.len(),
            e.did,
            if delivered {
                "delivered"
            } else {
                "not delivered"
            },
            got.len(),
            &got[next.saturating_sub(3)..(next + 3).min(got.len())]
        );
        if delivered {
            next += 1;
        }
    }
    assert_eq!(next, got.len(), "{what}: received events beyond the stream");
    (0..phases.len()).filter(|&p| states[p]).collect()
}

/// Asserts `got` is exactly `filter` applied to events `from..`.
fn check_exact(r: &Reference, got: &[u64], filter: &Filter, from: u64, what: &str) {
    let want = r.expect(filter, from);
    if got != want {
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} events, want {} ({filter:?} from {from}); first difference at {first_diff:?}: got {:?} want {:?}",
            got.len(),
            want.len(),
            first_diff.map(|i| &got[i..(i + 5).min(got.len())]),
            first_diff.map(|i| &want[i..(i + 5).min(want.len())]),
        );
    }
}

/// Delivered events in `got` (from `from` on) that `new` passes and `old` does not: evidence
/// that `new` took over.
fn evidence(r: &Reference, got: &[u64], old: &Filter, new: &Filter, from: u64) -> usize {
    got.iter()
        .filter(|&&s| s >= from)
        .filter(|&&s| {
            let e = &r.evs[s as usize];
            new.keeps(e) && !old.keeps(e)
        })
        .count()
}

fn first_seq(r: &Reference, o: &Outcome, compressed: bool, what: &str) -> u64 {
    let f = o
        .frames
        .first()
        .unwrap_or_else(|| panic!("{what}: received nothing"));
    r.seqs(std::slice::from_ref(f), compressed, what)[0]
}

/// DIDs of some events, identity (template 150) and account (template 151) events included.
fn some_dids() -> Vec<String> {
    let g = Generator::new(SEED, DIDS);
    vec![g.did_for(150), g.did_for(151), g.did_for(7)]
}

/// The relay's "shape created" log lines: (label, start_seq).
fn shapes_created(relay: &Relay) -> Vec<(String, u64)> {
    let mut plain = String::new();
    let mut in_escape = false;
    for ch in relay.log_text().chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("shape created shape=")?.1;
            let (label, seq) = rest.split_once(" start_seq=")?;
            Some((label.to_string(), seq.trim().parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Every option alone and combined, live and replayed, plain and compressed, each compared
/// byte-exact with the test's own filtering of the complete stream. Shapes are exercised on
/// every path: live clients create them; replay clients (cursor 0, older than the shape) walk the
/// index and switch onto the shape's log mid-stream; later clients join existing shapes, from
/// cursor 0 or from a cursor newer than the shape's creation; one filter is first asked for by a
/// replay client, which then walks up to its own shape's start.
#[test]
fn filters_alone_and_combined_live_and_replay() {
    let n = 3000;
    let (_clean, _mock, relay) = setup("subs-filters", 600, n);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(150, Duration::from_secs(30));
    let dids = some_dids();
    let g = Generator::new(SEED, DIDS);
    let ten_dids: Vec<String> = (0..10).map(|s| g.did_for(s)).collect();
    let specs: Vec<(&str, Filter, bool)> = vec![
        ("unfiltered", Filter::all(), false),
        ("exact", Filter::collections(&["app.bsky.feed.post"]), false),
        ("prefix", Filter::collections(&["app.bsky.graph.*"]), false),
        (
            "several",
            Filter::collections(&["app.bsky.feed.repost", "app.bsky.graph.follow", "fm.teal.*"]),
            false,
        ),
        ("dids", Filter::dids(&dids), false),
        ("dids-zstd", Filter::dids(&dids).zstd(), false),
        ("size", Filter::all().max(PLAIN_MEDIAN), false),
        ("size-zstd", Filter::all().max(ZSTD_MEDIAN).zstd(), false),
        (
            "combined",
            Filter::collections(&["app.bsky.feed.*"])
                .with_dids(&ten_dids)
                .max(600),
            false,
        ),
        // Collections with a power-of-two size limit: a shape (other limits walk).
        (
            "combined-zstd",
            Filter::collections(&["app.bsky.feed.like", "app.bsky.graph.*"])
                .max(256)
                .zstd(),
            false,
        ),
        // Collections with a limit that is not a power of two: served by the walk.
        (
            "combined-odd-limit",
            Filter::collections(&["app.bsky.feed.like", "app.bsky.graph.*"])
                .max(ZSTD_MEDIAN)
                .zstd(),
            false,
        ),
        // A walker comparing compressed sizes.
        (
            "dids-size-zstd",
            Filter::dids(&dids).max(ZSTD_MEDIAN).zstd(),
            false,
        ),
        // Overlapping and repeated patterns: the same events as `app.bsky.feed.*` alone.
        (
            "overlapping",
            Filter::collections(&[
                "app.bsky.feed.post",
                "app.bsky.feed.*",
                "app.bsky.feed.post",
            ]),
            false,
        ),
        ("header-zstd", Filter::all().zstd(), true),
        (
            "header-zstd-filter",
            Filter::collections(&["app.bsky.feed.repost"]).zstd(),
            true,
        ),
    ];
    // First asked for by a replay client mid-stream.
    let replay_only =
        Filter::collections(&["app.bsky.actor.status", "app.bsky.feed.post"]).max(1024);

    let stop = Arc::new(AtomicU8::new(RUN));
    let live = Connect::default();
    let from0 = Connect {
        cursor: Some(0),
        ..Connect::default()
    };
    let with_header = |c: &Connect, h: bool| Connect {
        zstd_header: h,
        ..c.clone()
    };
    // Live clients between two unfiltered probes: each one's start lies between theirs.
    let probe_before = spawn_client(&relay, &Filter::all(), &live, vec![], &stop);
    std::thread::sleep(Duration::from_millis(50));
    let mut lives = Vec::new();
    for (name, f, h) in &specs {
        lives.push((
            *name,
            f.clone(),
            spawn_client(&relay, f, &with_header(&live, *h), vec![], &stop),
        ));
    }
    // A second live client of an existing shape.
    lives.push((
        "exact#2",
        specs[1].1.clone(),
        spawn_client(&relay, &specs[1].1, &live, vec![], &stop),
    ));
    let probe_after = spawn_client(&relay, &Filter::all(), &live, vec![], &stop);
    // Mid-stream replays from cursor 0: older than every shape.
    refs.wait_for(1200, Duration::from_secs(30));
    let mut replays = Vec::new();
    for (name, f, h) in &specs {
        replays.push((
            format!("{name} replay mid-stream"),
            f.clone(),
            0,
            spawn_client(&relay, f, &with_header(&from0, *h), vec![], &stop),
        ));
    }
    replays.push((
        "replay-only (creates its shape)".into(),
        replay_only.clone(),
        0,
        spawn_client(&relay, &replay_only, &from0, vec![], &stop),
    ));
    let r = refs.finish();
    // After the stream: replays again (existing shapes), and cursors newer than the shapes.
    let mid_cursor = r.evs[2500].time_us;
    let mid_start = r.cursor_start(mid_cursor);
    let at_mid = Connect {
        cursor: Some(mid_cursor),
        ..Connect::default()
    };
    for (name, f, h) in &specs {
        replays.push((
            format!("{name} replay after"),
            f.clone(),
            0,
            spawn_client(&relay, f, &with_header(&from0, *h), vec![], &stop),
        ));
        replays.push((
            format!("{name} cursor {mid_cursor}"),
            f.clone(),
            mid_start,
            spawn_client(&relay, f, &with_header(&at_mid, *h), vec![], &stop),
        ));
    }
    replays.push((
        "replay-only again".into(),
        replay_only.clone(),
        0,
        spawn_client(&relay, &replay_only, &from0, vec![], &stop),
    ));
    replays.push((
        format!("replay-only cursor {mid_cursor}"),
        replay_only.clone(),
        mid_start,
        spawn_client(&relay, &replay_only, &at_mid, vec![], &stop),
    ));
    drain(&stop);

    // The filters are meaningful on this stream.
    let e_of = |s: &u64| &r.evs[*s as usize];
    let identity_other_did = r
        .evs
        .iter()
        .any(|e| e.kind != "commit" && !dids.contains(&e.did));
    assert!(
        identity_other_did,
        "the stream has identity/account events of other DIDs"
    );
    let by_dids = r.expect(&specs[4].1, 0);
    assert!(
        by_dids.iter().any(|s| e_of(s).kind == "identity"),
        "wantedDids keeps identity events of wanted DIDs"
    );
    assert!(
        by_dids.iter().any(|s| e_of(s).kind == "account"),
        "wantedDids keeps account events of wanted DIDs"
    );
    let by_prefix = r.expect(&specs[2].1, 0);
    assert!(
        by_prefix
            .iter()
            .any(|s| e_of(s).collection.as_deref() == Some("app.bsky.graph.block"))
    );
    assert!(
        by_prefix.iter().any(|s| e_of(s).kind == "identity"),
        "collections never filter identity events"
    );
    let zstd_size = r.expect(&specs[7].1, 0);
    assert!(
        zstd_size.iter().any(|s| e_of(s).json.len() > ZSTD_MEDIAN),
        "the compressed size (not the JSON's) is compared"
    );
    for (name, f, _) in &specs {
        if f.collections.is_empty() && f.dids.is_empty() && f.max.is_none() {
            continue;
        }
        let k = r.expect(f, 0).len() as u64;
        assert!(
            k > 10 && k < r.n() - 100,
            "{name}: filter passes {k} of {}",
            r.n()
        );
    }

    // The replays above really crossed switch points: every shape began mid-stream, the
    // replay-only one when that replay asked for it.
    let created = shapes_created(&relay);
    let start_of = |label: &str| {
        created
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("no shape {label} in {created:?}"))
    };
    for label in [
        "c:app.bsky.feed.post",
        "c:app.bsky.graph.*",
        "c:app.bsky.feed.like,app.bsky.graph.*+max:256+zstd",
    ] {
        assert!(
            start_of(label) > 100,
            "{label} created at {}",
            start_of(label)
        );
    }
    assert!(start_of("c:app.bsky.actor.status,app.bsky.feed.post+max:1024") >= 1200);
    // Six of the specs have a shape (DID filters, size-only filters and limits that are not
    // a power of two walk the base log), plus the replay-only one.
    assert_eq!(
        created.len(),
        7,
        "one shape per distinct canonical shape key: {created:?}"
    );
    start_of("c:app.bsky.feed.*");

    // Probes bracket the live clients' starts.
    let before = join(probe_before);
    let after = join(probe_after);
    let b0 = first_seq(&r, &before, false, "probe before");
    let a0 = first_seq(&r, &after, false, "probe after");
    assert!(
        b0 < 1000 && a0 < r.n() - 1000,
        "live clients joined mid-stream ({b0}, {a0})"
    );
    check_exact(
        &r,
        &r.seqs(&before.frames, false, "probe before"),
        &Filter::all(),
        b0,
        "probe before",
    );
    for (name, f, h) in lives {
        let o = join(h);
        let got = r.seqs(&o.frames, f.compressed, name);
        let phases = [
            phase(None, 0),
            Phase {
                filter: Some(f.clone()),
                lo: b0,
                hi: a0,
            },
        ];
        let end = check_phases(&r, &got, &phases, &format!("{name} live"));
        assert_eq!(end, vec![1], "{name} live");
        assert!(o.close.is_none(), "{name}: closed {:?}", o.close);
    }
    for (name, f, from, h) in replays {
        let o = join(h);
        let got = r.seqs(&o.frames, f.compressed, &name);
        check_exact(&r, &got, &f, from, &name);
    }
}

/// A standard zstd decoder (the `zstd` crate with the dictionary file) decodes every compressed
/// frame — live and replayed, `compress=true` and `Socket-Encoding: zstd` — to the exact JSON of
/// the plain stream; both ways of asking give identical bytes.
#[test]
fn compressed_frames_decode_to_the_plain_json() {
    let n = 1500;
    let (_clean, _mock, relay) = setup("subs-zstd", 1000, n);
    let stop = Arc::new(AtomicU8::new(RUN));
    let all = Filter::all().zstd();
    let live_q = spawn_client(&relay, &all, &Connect::default(), vec![], &stop);
    let live_h = spawn_client(
        &relay,
        &all,
        &Connect {
            zstd_header: true,
            ..Connect::default()
        },
        vec![],
        &stop,
    );
    let refs = RefReaders::start(&relay, n);
    // Reference::build decodes every replayed frame with the zstd crate and compares it with
    // the plain event, which it checks against the generator.
    let r = refs.finish();
    let replay_h = spawn_client(
        &relay,
        &all,
        &Connect {
            cursor: Some(0),
            zstd_header: true,
            ..Connect::default()
        },
        vec![],
        &stop,
    );
    drain(&stop);
    for (name, h) in [
        ("live compress=true", live_q),
        ("live Socket-Encoding", live_h),
    ] {
        let o = join(h);
        let got = r.seqs(&o.frames, true, name);
        let from = got
            .first()
            .copied()
            .unwrap_or_else(|| panic!("{name}: nothing"));
        assert!(from < 500, "{name} started at {from}");
        check_exact(&r, &got, &all, from, name);
    }
    let o = join(replay_h);
    let got = r.seqs(&o.frames, true, "replay Socket-Encoding");
    check_exact(&r, &got, &all, 0, "replay Socket-Encoding");
    // Frames carry the dictionary's ID and their content size, as the official ones do.
    let dict_id = u32::from_le_bytes(DICTIONARY[4..8].try_into().unwrap());
    for e in &r.evs {
        let f = &e.zstd;
        assert_eq!(&f[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_frame(f),
            std::num::NonZeroU32::new(dict_id)
        );
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(f).ok().flatten(),
            Some(e.json.len() as u64)
        );
    }
}

/// `options_update` mid-stream: each new filter takes over at a frame boundary after the
/// message, never before; an empty list disables a filter; cursor and compression stay as
/// connected (the payload cannot change them); a DID-filtered client moves onto a shape and
/// back.
#[test]
fn options_update_mid_stream() {
    let n = 4000;
    let (_clean, _mock, relay) = setup("subs-update", 800, n);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(100, Duration::from_secs(30));
    let stop = Arc::new(AtomicU8::new(RUN));
    let dids = some_dids();
    let post = Filter::collections(&["app.bsky.feed.post"]);
    let graph_small = Filter::collections(&["app.bsky.feed.repost", "app.bsky.graph.*"]).max(700);
    let everything = Filter::all();
    let probe_before = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    std::thread::sleep(Duration::from_millis(50));
    // a) live, plain: post → repost+graph with a size limit → empty lists (everything).
    let a_steps = vec![
        step(800, 5, graph_small.update()),
        step(
            1600,
            5,
            r#"{"type":"options_update","payload":{"wantedCollections":[],"wantedDids":[]}}"#
                .to_string(),
        ),
    ];
    let a = spawn_client(&relay, &post, &Connect::default(), a_steps, &stop);
    // b) replay from 0, compressed: DIDs → likes (the DID filter cleared by omission) → posts,
    //    with a payload that tries to change cursor and compression.
    let like = Filter::collections(&["app.bsky.feed.like"]).zstd();
    let post_z = post.clone().zstd();
    let b_steps = vec![
        step(600, 5, r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.like"]}}"#.to_string()),
        step(1400, 5, r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"],"cursor":0,"compress":false}}"#.to_string()),
    ];
    let b = spawn_client(
        &relay,
        &Filter::dids(&dids).zstd(),
        &Connect {
            cursor: Some(0),
            ..Connect::default()
        },
        b_steps,
        &stop,
    );
    // c) live DID walker → the existing post shape → DIDs again.
    let c_steps = vec![
        step(700, 0, post.update()),
        step(1500, 5, Filter::dids(&dids).update()),
    ];
    let c = spawn_client(
        &relay,
        &Filter::dids(&dids),
        &Connect::default(),
        c_steps,
        &stop,
    );
    let probe_after = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    let r = refs.finish();
    drain(&stop);
    let b0 = first_seq(&r, &join(probe_before), false, "probe before");
    let a0 = first_seq(&r, &join(probe_after), false, "probe after");
    let live_start = Phase {
        filter: None,
        lo: 0,
        hi: u64::MAX,
    };
    // The seq after the last event received before message `i` was sent: the switch is not
    // earlier than that.
    let lower = |got: &[u64], o: &Outcome, i: usize, floor: u64| -> u64 {
        o.sent_after[i].checked_sub(1).map_or(floor, |k| got[k] + 1)
    };

    let o = join(a);
    assert_eq!(o.sent_after.len(), 2, "a: both updates sent");
    let got = r.seqs(&o.frames, false, "a");
    let (l1, l2) = (lower(&got, &o, 0, b0), lower(&got, &o, 1, b0));
    let phases = [
        live_start.clone(),
        Phase {
            filter: Some(post.clone()),
            lo: b0,
            hi: a0,
        },
        phase(Some(graph_small.clone()), l1),
        phase(Some(everything.clone()), l2),
    ];
    let end = check_phases(&r, &got, &phases, "a");
    assert_eq!(end, vec![3], "a ends unfiltered");
    assert!(
        evidence(&r, &got, &post, &graph_small, l1) > 0,
        "a: the first update took effect"
    );
    assert!(
        evidence(&r, &got, &graph_small, &everything, l2) > 100,
        "a: empty lists disable the filters"
    );
    assert!(o.close.is_none());

    let o = join(b);
    assert_eq!(o.sent_after.len(), 2, "b: both updates sent");
    let got = r.seqs(&o.frames, true, "b (stays compressed)");
    let (l1, l2) = (lower(&got, &o, 0, 0), lower(&got, &o, 1, 0));
    let phases = [
        phase(Some(Filter::dids(&dids).zstd()), 0),
        phase(Some(like.clone()), l1),
        phase(Some(post_z.clone()), l2),
    ];
    let end = check_phases(&r, &got, &phases, "b");
    assert_eq!(end, vec![2], "b ends on posts");
    assert!(
        evidence(&r, &got, &Filter::dids(&dids).zstd(), &like, l1) > 0,
        "b: likes of any DID"
    );
    // check_phases also proved that the payload's cursor did not restart the replay (no
    // event came twice or out of order), and `seqs` that every frame stayed compressed.
    assert!(evidence(&r, &got, &like, &post_z, l2) > 0, "b: posts");

    let o = join(c);
    assert_eq!(o.sent_after.len(), 2, "c: both updates sent");
    let got = r.seqs(&o.frames, false, "c");
    let (l1, l2) = (lower(&got, &o, 0, b0), lower(&got, &o, 1, b0));
    let phases = [
        live_start,
        Phase {
            filter: Some(Filter::dids(&dids)),
            lo: b0,
            hi: a0,
        },
        phase(Some(post.clone()), l1),
        phase(Some(Filter::dids(&dids)), l2),
    ];
    let end = check_phases(&r, &got, &phases, "c");
    assert!(end.contains(&3), "c can end on DIDs: {end:?}");
    assert!(
        evidence(&r, &got, &Filter::dids(&dids), &post, l1) > 0,
        "c: posts of any DID"
    );
    assert!(
        evidence(&r, &got, &post, &Filter::dids(&dids), l2) > 0,
        "c: back to the DIDs"
    );
}

/// `requireHello=true`: nothing arrives before the first `options_update`, whose filters (not
/// the query string's) then apply — exactly, for a replay from cursor 0.
#[test]
fn require_hello_holds_everything_until_the_first_update() {
    let n = 3000;
    let (_clean, _mock, relay) = setup("subs-hello", 600, n);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(100, Duration::from_secs(30));
    let stop = Arc::new(AtomicU8::new(RUN));
    let graph = Filter::collections(&["app.bsky.graph.*"]);
    let dids = some_dids();
    let hello = |f: &Filter, at: u64| vec![step(at, 0, f.update())];
    let replay = Connect {
        cursor: Some(0),
        require_hello: true,
        ..Connect::default()
    };
    let live = Connect {
        require_hello: true,
        ..Connect::default()
    };
    // Query filter `post`, hello `graph.*`: the hello wins.
    let a = spawn_client(
        &relay,
        &Filter::collections(&["app.bsky.feed.post"]),
        &replay,
        hello(&graph, 1500),
        &stop,
    );
    // Compressed live, hello with DIDs.
    let b = spawn_client(
        &relay,
        &Filter::all().zstd(),
        &live,
        hello(&Filter::dids(&dids), 1500),
        &stop,
    );
    // Hello with no filters at all: everything from cursor 0.
    let c = spawn_client(
        &relay,
        &Filter::all(),
        &replay,
        hello(&Filter::all(), 1200),
        &stop,
    );
    // Never says hello: never gets anything.
    let d = spawn_client(&relay, &Filter::all(), &live, vec![], &stop);
    let r = refs.finish();
    drain(&stop);

    let o = join(a);
    assert_eq!(o.before_first_send, 0, "a: nothing before the hello");
    check_exact(
        &r,
        &r.seqs(&o.frames, false, "a"),
        &graph,
        0,
        "a: the hello's filters from cursor 0",
    );
    let o = join(b);
    assert_eq!(o.before_first_send, 0, "b: nothing before the hello");
    let got = r.seqs(&o.frames, true, "b");
    let want = Filter::dids(&dids).zstd();
    check_phases(
        &r,
        &got,
        &[phase(None, 0), phase(Some(want.clone()), 0)],
        "b",
    );
    // check_phases proved that only the hello's DIDs came through; and they did come.
    assert!(
        got.len() > 10,
        "b: events of the hello's DIDs: {}",
        got.len()
    );
    let o = join(c);
    assert_eq!(o.before_first_send, 0, "c: nothing before the hello");
    check_exact(&r, &r.seqs(&o.frames, false, "c"), &Filter::all(), 0, "c");
    let o = join(d);
    assert_eq!(o.frames.len(), 0, "d: no hello, no events");
    assert!(o.close.is_none());
}

/// Replays with the same filters give the same events after the relay restarts on its data
/// directory (shapes are rebuilt on demand), including events the mock produced while the
/// relay was down; clients connected at the stop get a 1001 close frame.
#[test]
fn relay_restart_replays_the_same_filtered_history() {
    // 15 s of feed: the stop below (its 0.5 s and 0.7 s waits, and the graceful stop's 2 s
    // grace for clients that never close their side) must fall inside it. At 5 s it did not
    // always (the mock had finished before the relay was down: margin 1.05); the ~5 s it
    // takes on a quiet machine gets a 3x margin for a loaded one.
    let n = 9000;
    let count = n.to_string();
    let mock = Mock::start(600, &["--count", &count, "--dids", "40"]);
    let dir = temp_dir("subs-restart");
    let mut relay = Relay::start(&upstream(&mock), &dir, &[]);
    let dids = some_dids();
    let filters = [
        Filter::collections(&["app.bsky.feed.post", "app.bsky.graph.*"]),
        Filter::collections(&["app.bsky.feed.repost"])
            .max(PLAIN_MEDIAN)
            .zstd(),
        Filter::dids(&dids),
        Filter::all().zstd(),
    ];
    let stop = Arc::new(AtomicU8::new(RUN));
    let from0 = Connect {
        cursor: Some(0),
        ..Connect::default()
    };
    wait_until("the relay has 600 events", Duration::from_secs(30), || {
        let mut ws = open(&relay.url("cursor=0"), &[]);
        let mut k = 0;
        while k < 600 && matches!(read_one(&mut ws), Got::Frame(_)) {
            k += 1;
        }
        k >= 600
    });
    let before: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &from0, vec![], &stop))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        relay.proc.terminate(Duration::from_secs(15)),
        "graceful stop:\n{}",
        relay.log_text()
    );
    let before: Vec<Outcome> = before.into_iter().map(join).collect();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        mock.seq() < n as u64,
        "the mock is still producing while the relay is down"
    );
    let relay = Relay::start(&upstream(&mock), &dir, &[]);
    let refs = RefReaders::start(&relay, n);
    let r = refs.finish();
    let after: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &from0, vec![], &stop))
        .collect();
    drain(&stop);
    for (f, o) in filters.iter().zip(before) {
        assert_eq!(
            o.close.as_ref().map(|c| c.0),
            Some(1001),
            "{f:?}: close at shutdown"
        );
        let got = r.seqs(&o.frames, f.compressed, &format!("{f:?}"));
        assert!(!got.is_empty(), "{f:?}: events before the stop");
        let want = r.expect(f, 0);
        assert_eq!(got, want[..got.len()], "before the restart {f:?}");
    }
    for (f, h) in filters.iter().zip(after) {
        let o = join(h);
        let got = r.seqs(&o.frames, f.compressed, &format!("{f:?}"));
        check_exact(&r, &got, f, 0, &format!("after restart {f:?}"));
    }
}

/// Reads until the relay's close frame (data frames before it are allowed), within `within`.
fn read_close(ws: &mut Ws, within: Duration) -> Option<(u16, String)> {
    let start = Instant::now();
    while start.elapsed() < within {
        match read_one(ws) {
            Got::Close(code, reason) => return Some((code, reason)),
            Got::Gone => return None,
            Got::Frame(_) | Got::Nothing => {}
        }
    }
    None
}

fn status_and_body(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        resp.split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .trim_end()
            .to_string(),
    )
}

/// An upgrade request with `query`: (status, body). Tolerates the relay closing while the
/// request is still being written (an oversized head is refused after its first 8 KiB).
fn handshake(relay: &Relay, query: &str) -> (u16, String) {
    use std::io::Write;
    let req = format!(
        "GET /subscribe?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut s = TcpStream::connect(("127.0.0.1", relay.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(req.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    status_and_body(&String::from_utf8_lossy(&out))
}

/// Every invalid input: refused handshakes get HTTP 400 with the reason, invalid
/// `options_update` messages get a close frame whose code and reason say what was wrong — and
/// the relay keeps serving a bystander, in order, throughout.
#[test]
fn invalid_inputs_are_refused_with_reasons_and_others_are_served() {
    let mock = Mock::start(400, &["--dids", "40"]);
    let dir = temp_dir("subs-invalid");
    let relay = Relay::start(&upstream(&mock), &dir, &[]);
    let stop = Arc::new(AtomicU8::new(RUN));
    let bystander = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    let watcher = spawn_client(
        &relay,
        &Filter::collections(&["app.bsky.feed.like"]),
        &Connect::default(),
        vec![],
        &stop,
    );

    let many_collections: Vec<String> = (0..101)
        .map(|i| format!("wantedCollections=com.example.c{i}"))
        .collect();
    // DIDs no mock event has.
    let fake_did = |i: usize| format!("did:web:n{i}.example.com");
    let many_dids_query: Vec<String> = (0..10_001)
        .map(|i| format!("wantedDids={}", fake_did(i)))
        .collect();
    let cases: Vec<(String, u16, String)> = vec![
        (
            "cursor=yesterday".into(),
            400,
            "invalid cursor: yesterday".into(),
        ),
        ("cursor=1.5".into(), 400, "invalid cursor: 1.5".into()),
        (
            "wantedCollections=app.bsky.graph.fo*".into(),
            400,
            "invalid subscriber options: invalid collection: app.bsky.graph.fo*".into(),
        ),
        (
            "wantedCollections=*".into(),
            400,
            "invalid subscriber options: invalid collection: *".into(),
        ),
        (
            "wantedCollections=app.bsky".into(),
            400,
            "invalid subscriber options: invalid collection: app.bsky".into(),
        ),
        (
            many_collections.join("&"),
            400,
            "invalid subscriber options: too many wanted collections".into(),
        ),
        (
            "wantedDids=bob".into(),
            400,
            "invalid subscriber options".into(),
        ),
        (
            "wantedDids=did:plc:".into(),
            400,
            "invalid subscriber options".into(),
        ),
        // 10,001 DIDs do not fit in a request head at all.
        (
            many_dids_query.join("&"),
            431,
            "request head larger than 8192 bytes".into(),
        ),
    ];
    for (query, status, reason) in &cases {
        let (got_status, body) = handshake(&relay, query);
        let shown = &query[..query.len().min(60)];
        assert_eq!(
            (got_status, body.as_str()),
            (*status, reason.as_str()),
            "{shown}"
        );
    }
    // 100 collections are fine; so are 10,000 DIDs (through options_update: they do not fit
    // in a request head), and they apply.
    let hundred: Vec<String> = (0..100)
        .map(|i| format!("wantedCollections=com.example.c{i}"))
        .collect();
    drop(open(&relay.url(&hundred.join("&")), &[]));
    let real_did = Generator::new(SEED, DIDS).did_for(5);
    let mut ten_thousand: Vec<String> = (1..10_000).map(fake_did).collect();
    ten_thousand.push(real_did.clone());
    let msg = serde_json::json!({"type":"options_update","payload":{"wantedDids": ten_thousand}})
        .to_string();
    let big_hello = spawn_client(
        &relay,
        &Filter::all(),
        &Connect {
            require_hello: true,
            ..Connect::default()
        },
        vec![step(0, 0, msg)],
        &stop,
    );
    let ten_thousand_one: Vec<String> = (0..10_001).map(fake_did).collect();
    let dids_msg =
        serde_json::json!({"type":"options_update","payload":{"wantedDids": ten_thousand_one}})
            .to_string();
    let many_coll_list: Vec<String> = (0..101).map(|i| format!("com.example.c{i}")).collect();
    let over_cap = format!(
        r#"{{"type":"options_update","payload":{{"wantedCollections":["{}"]}}}}"#,
        "a".repeat(1 << 20)
    );
    let updates: Vec<(String, u16, String)> = vec![
        (
            "{not json".into(),
            1000,
            "failed to unmarshal subscriber sourced message: key must be a string at line 1 column 2".into(),
        ),
        (
            "[1,2]".into(),
            1000,
            "failed to unmarshal subscriber sourced message: expected a JSON object".into(),
        ),
        (
            r#"{"type":"subscribe","payload":{}}"#.into(),
            1000,
            r#"unsupported subscriber sourced message type: "subscribe""#.into(),
        ),
        (
            r#"{"type":"options_update","payload":{"wantedCollections":"app.bsky.feed.post"}}"#.into(),
            1000,
            "failed to unmarshal subscriber options update: wantedCollections: expected an array of strings".into(),
        ),
        (
            r#"{"type":"options_update","payload":{"maxMessageSizeBytes":"big"}}"#.into(),
            1000,
            "failed to unmarshal subscriber options update: maxMessageSizeBytes: expected an integer".into(),
        ),
        (
            r#"{"type":"options_update"}"#.into(),
            1000,
            "failed to unmarshal subscriber options update: missing payload".into(),
        ),
        (
            r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.graph.fo*"]}}"#.into(),
            1000,
            "failed to parse subscriber options: invalid subscriber options: invalid collection: app.bsky.graph.fo*".into(),
        ),
        (
            serde_json::json!({"type":"options_update","payload":{"wantedCollections": many_coll_list}}).to_string(),
            1000,
            "failed to parse subscriber options: invalid subscriber options: too many wanted collections".into(),
        ),
        (
            r#"{"type":"options_update","payload":{"wantedDids":["did:plc:ok","bob"]}}"#.into(),
            1000,
            "failed to parse subscriber options: invalid subscriber options".into(),
        ),
        (
            dids_msg,
            1000,
            "failed to parse subscriber options: invalid subscriber options: too many wanted DIDs".into(),
        ),
        (over_cap, 1009, "message too big".into()),
    ];
    for (i, (text, code, reason)) in updates.iter().enumerate() {
        // Alternate plain, compressed and hello-pending clients.
        let (f, how) = match i % 3 {
            0 => (Filter::all(), Connect::default()),
            1 => (
                Filter::collections(&["app.bsky.feed.post"]).zstd(),
                Connect::default(),
            ),
            _ => (
                Filter::all(),
                Connect {
                    require_hello: true,
                    ..Connect::default()
                },
            ),
        };
        let (url, headers) = request(&relay, &f, &how);
        let mut ws = open(&url, &headers);
        std::thread::sleep(Duration::from_millis(100));
        ws.send(Message::text(text.clone())).expect("send");
        let shown = &text[..text.len().min(60)];
        let close = read_close(&mut ws, Duration::from_secs(10));
        assert_eq!(
            close,
            Some((*code, reason.clone())),
            "options_update {shown}"
        );
        assert!(reason.len() <= 123, "a close reason fits a control frame");
    }
    // Still serving: a new client gets events, and the bystanders were never interrupted.
    let late = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    std::thread::sleep(Duration::from_millis(1500));
    halt(&stop);
    let o = join(late);
    assert!(
        o.frames.len() > 200,
        "a new client after the refusals got {} events",
        o.frames.len()
    );
    let o = join(big_hello);
    assert!(o.close.is_none(), "10,000 DIDs refused: {:?}", o.close);
    assert!(
        o.frames.len() > 2,
        "events of the one real DID among 10,000: {}",
        o.frames.len()
    );
    for f in &o.frames {
        let v: serde_json::Value = serde_json::from_slice(&f.data).expect("json");
        assert_eq!(v["did"], real_did.as_str());
    }
    for (name, h, compressed) in [("bystander", bystander, false), ("watcher", watcher, false)] {
        let o = join(h);
        assert!(o.close.is_none(), "{name} was closed: {:?}", o.close);
        let seqs: Vec<u64> = o
            .frames
            .iter()
            .map(|f| {
                assert_eq!(f.binary, compressed);
                mock_seq(&f.data).expect("seq")
            })
            .collect();
        assert!(seqs.len() > 300, "{name} got {} events", seqs.len());
        if name == "bystander" {
            assert!(
                seqs.windows(2).all(|w| w[1] == w[0] + 1),
                "{name}: contiguous"
            );
        } else {
            assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{name}: in order");
            for f in &o.frames {
                let v: serde_json::Value = serde_json::from_slice(&f.data).expect("json");
                assert!(
                    v["kind"] != "commit" || v["commit"]["collection"] == "app.bsky.feed.like",
                    "{name}: {v}"
                );
            }
        }
    }
}

/// Control frames are answered promptly on a connection with nothing else to send: pongs to
/// client pings, the close reply to a client close, and the close frame for an invalid
/// `options_update` (none may wait for the worker's next unrelated wake-up).
#[test]
fn control_frames_are_answered_promptly_on_idle_connections() {
    let (_clean, _mock, relay) = setup("subs-ctrl", 1000, 300);
    let refs = RefReaders::start(&relay, 300);
    refs.finish();
    // The stream is finished: a live client has nothing to receive.
    let future = jetrelay::index::now_us() + 3_600_000_000;
    let mut ws = open(&relay.url(&format!("cursor={future}")), &[]);
    let mut rtts = Vec::new();
    for i in 0..5u8 {
        let t0 = Instant::now();
        ws.send(Message::Ping(vec![b'p', i].into())).expect("ping");
        let rtt = loop {
            match ws.read() {
                Ok(Message::Pong(p)) => {
                    assert_eq!(p.as_ref(), &[b'p', i], "pong echoes the ping's payload");
                    break t0.elapsed();
                }
                Ok(m) => panic!("unexpected {m:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && t0.elapsed() < Duration::from_secs(5) => {}
                Err(e) => panic!("ping {i}: {e}"),
            }
        };
        rtts.push(rtt);
    }
    rtts.sort();
    assert!(
        rtts[2] < Duration::from_millis(300),
        "pong round trips {rtts:?}"
    );

    let t0 = Instant::now();
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    }))
    .expect("close");
    let reply = read_close(&mut ws, Duration::from_secs(5));
    let close_rtt = t0.elapsed();
    assert_eq!(reply.map(|r| r.0), Some(1000), "close reply");
    // The defect answered at the worker's next 1 s housekeeping tick; a single sample on a
    // shared 2-core machine gets room for a preemption below that.
    assert!(
        close_rtt < Duration::from_millis(800),
        "close reply after {close_rtt:?}"
    );

    let mut ws = open(&relay.url(&format!("cursor={future}")), &[]);
    let t0 = Instant::now();
    ws.send(Message::text("{not json")).expect("send");
    let close = read_close(&mut ws, Duration::from_secs(5));
    let rtt = t0.elapsed();
    assert_eq!(close.map(|c| c.0), Some(1000));
    assert!(
        rtt < Duration::from_millis(800),
        "close for an invalid update after {rtt:?}"
    );
}

/// A replay whose filter matches rarely is not slowed down by the index walk's budget: it
/// must not wait for an unrelated wake-up between two budget-sized steps.
#[test]
fn sparse_did_replay_is_not_throttled() {
    let n: u64 = 40_000;
    let count = n.to_string();
    // The default DID population: a DID has a handful of events in the whole stream.
    let mock = Mock::start(0, &["--count", &count]);
    let dir = temp_dir("subs-sparse");
    let relay = Relay::start(&upstream(&mock), &dir, &[]);
    let g = Generator::new(SEED, jetrelay::mock::DEFAULT_DIDS);
    let did = g.did_for(n - 10);
    let want: Vec<u64> = (0..n).filter(|&s| g.did_for(s) == did).collect();
    assert!(want.len() < 5 && want[0] > 30_000, "a sparse DID: {want:?}");
    wait_until(
        "the whole stream in the relay",
        Duration::from_secs(60),
        || {
            let mut ws = open(
                &relay.url(&format!("wantedDids={}&cursor=0", g.did_for(n - 1))),
                &[],
            );
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Got::Frame(f) = read_one(&mut ws) {
                    return mock_seq(&f.data) == Some(n - 1);
                }
            }
            false
        },
    );
    let t0 = Instant::now();
    let mut ws = open(&relay.url(&format!("wantedDids={did}&cursor=0")), &[]);
    let mut got = Vec::new();
    while got.len() < want.len() && t0.elapsed() < Duration::from_secs(20) {
        if let Got::Frame(f) = read_one(&mut ws) {
            got.push(mock_seq(&f.data).expect("seq"));
        }
    }
    let took = t0.elapsed();
    eprintln!("replaying {n} events for one DID took {took:?}");
    assert_eq!(got, want);
    assert!(
        took < Duration::from_millis(1500),
        "replaying {n} events for one DID took {took:?}"
    );
}

/// Sends `updates` round-robin every `every` while reading, until the stream is complete
/// (`stop` drained and quiet).
fn run_storm(mut ws: Ws, updates: Vec<String>, every: Duration, stop: Stop) -> (Outcome, usize) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(2)))
            .expect("read timeout");
    }
    let start = Instant::now();
    let mut last = start;
    let mut next_send = start;
    let mut sent = 0;
    let mut out = Outcome::default();
    while start.elapsed() < CLIENT_DEADLINE {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping == RUN && Instant::now() >= next_send {
            if ws
                .send(Message::text(updates[sent % updates.len()].clone()))
                .is_err()
            {
                break;
            }
            sent += 1;
            next_send += every;
        }
        if stopping != RUN && last.elapsed() >= QUIET {
            break;
        }
        match read_one(&mut ws) {
            Got::Frame(f) => {
                out.frames.push(f);
                last = Instant::now();
            }
            Got::Close(code, reason) => out.close = Some((code, reason)),
            Got::Nothing => {}
            Got::Gone => break,
        }
    }
    (out, sent)
}

/// A storm of `options_update`s between filters that all pass every event — no filter, a
/// `wantedDids` list of every DID (index walk), a size limit no event reaches (a shape) —
/// while the writer is busy feeding many shapes: each switch happens at a frame boundary, so
/// the client receives every event exactly once, in order.
#[test]
fn options_update_storm_loses_and_duplicates_nothing() {
    let n = 16_000;
    // An update every 3 ms is far beyond the default per-client rate (a storm like this is
    // closed with 1008 by default, see `options_update_rate_is_limited`); raised here to test
    // the switches themselves.
    let (_clean, _mock, relay) =
        setup_with("subs-storm", 4000, n, &["--options-update-rate", "1000"]);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(200, Duration::from_secs(30));
    let stop = Arc::new(AtomicU8::new(RUN));
    // Many shapes make the writer's per-event work (and any window in it) longer: 28
    // distinct canonical keys (4 collections × power-of-two limits).
    let idle: Vec<_> = (0..28)
        .map(|i| {
            let c = [
                "app.bsky.feed.like",
                "app.bsky.feed.post",
                "app.bsky.graph.*",
                "app.bsky.feed.repost",
            ][i % 4];
            let f = Filter::collections(&[c]).max(1 << (8 + i / 4));
            spawn_client(&relay, &f, &Connect::default(), vec![], &stop)
        })
        .collect();
    let g = Generator::new(SEED, DIDS);
    let every_did: Vec<String> = (0..DIDS).map(|i| g.did_by_index(i)).collect();
    let mut storms = Vec::new();
    for compressed in [false, true] {
        let cap = if compressed { 3000 } else { 5000 };
        let updates = vec![
            r#"{"type":"options_update","payload":{}}"#.to_string(),
            Filter::dids(&every_did).update(),
            Filter::all().max(cap).update(),
            Filter::collections(&["app.bsky.*", "fm.teal.*"]).update(),
        ];
        let f = if compressed {
            Filter::all().zstd()
        } else {
            Filter::all()
        };
        let (url, headers) = request(&relay, &f, &Connect::default());
        let ws = open(&url, &headers);
        let stop = stop.clone();
        storms.push((
            compressed,
            std::thread::spawn(move || run_storm(ws, updates, Duration::from_millis(3), stop)),
        ));
    }
    let r = refs.finish();
    drain(&stop);
    assert!(
        r.evs.iter().all(|e| e.kind != "commit"
            || e.collection
                .as_deref()
                .is_some_and(|c| c.starts_with("app.bsky.") || c.starts_with("fm.teal."))),
        "the storm's collection filter passes every event"
    );
    for (compressed, h) in storms {
        let (o, sent) = join(h);
        let what = format!("storm compressed={compressed} ({sent} updates)");
        assert!(sent > 300, "{what}");
        let got = r.seqs(&o.frames, compressed, &what);
        let from = *got.first().expect("events");
        // Live from its connection, which a loaded machine can delay (1,637 was seen): the
        // storm must still span most of the feed (≥ 12,000 events).
        assert!(from < n as u64 / 4, "{what} started at {from}");
        check_exact(&r, &got, &Filter::all(), from, &what);
        assert!(o.close.is_none(), "{what}: closed {:?}", o.close);
    }
    for h in idle {
        join(h);
    }
}

/// More distinct shapes than the relay keeps (32): the clients beyond the limit are served
/// by walking the index, with exactly the same results, live and replayed.
#[test]
fn more_shapes_than_the_limit_fall_back_to_walking() {
    let n = 2500;
    let (_clean, _mock, relay) = setup("subs-manyshapes", 600, n);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(100, Duration::from_secs(30));
    let stop = Arc::new(AtomicU8::new(RUN));
    // 40 distinct canonical keys (collections × power-of-two limits × encoding).
    let filters: Vec<Filter> = (0..40)
        .map(|i| {
            let f = Filter::collections(&[[
                "app.bsky.feed.post",
                "app.bsky.graph.*",
                "app.bsky.feed.repost",
            ][i % 3]])
            .max(1 << (8 + i % 11));
            if i % 4 == 3 { f.zstd() } else { f }
        })
        .collect();
    let probe_before = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    std::thread::sleep(Duration::from_millis(50));
    let live: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &Connect::default(), vec![], &stop))
        .collect();
    let probe_after = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    refs.wait_for(1000, Duration::from_secs(30));
    let from0 = Connect {
        cursor: Some(0),
        ..Connect::default()
    };
    let replay: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &from0, vec![], &stop))
        .collect();
    let r = refs.finish();
    drain(&stop);
    let b0 = first_seq(&r, &join(probe_before), false, "probe before");
    let a0 = first_seq(&r, &join(probe_after), false, "probe after");
    for (i, (f, h)) in filters.iter().zip(live).enumerate() {
        let o = join(h);
        let what = format!("live #{i} {f:?}");
        let got = r.seqs(&o.frames, f.compressed, &what);
        let end = check_phases(
            &r,
            &got,
            &[
                phase(None, 0),
                Phase {
                    filter: Some(f.clone()),
                    lo: b0,
                    hi: a0,
                },
            ],
            &what,
        );
        assert_eq!(end, vec![1], "{what}");
    }
    for (i, (f, h)) in filters.iter().zip(replay).enumerate() {
        let o = join(h);
        let what = format!("replay #{i} {f:?}");
        check_exact(&r, &r.seqs(&o.frames, f.compressed, &what), f, 0, &what);
    }
    let log = relay.log_text();
    assert!(
        log.matches("shape created").count() >= 32,
        "the shape limit was reached"
    );
}

/// With a disk cap (the smallest allowed, 4 MiB) that keeps about a third of the stream, filtered replays from cursor 0 —
/// from shapes created before retention trimmed them, and by index walk — start at the oldest
/// retained event and match the test's filtering of exactly the retained events; live clients
/// that kept up lose nothing.
#[test]
fn retention_trims_filtered_replays_consistently() {
    // ~780 bytes per event in the two base logs and the index: 16,000 events ≈ 12 MB.
    let n = 16_000;
    let count = n.to_string();
    let mock = Mock::start(4000, &["--count", &count, "--dids", "40"]);
    let dir = temp_dir("subs-retention");
    let relay = Relay::start(&upstream(&mock), &dir, &["--max-disk", "4MiB"]);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(100, Duration::from_secs(30));
    let stop = Arc::new(AtomicU8::new(RUN));
    let dids = some_dids();
    let filters = [
        Filter::collections(&["app.bsky.feed.post", "app.bsky.graph.*"]),
        Filter::collections(&["app.bsky.feed.repost"])
            .max(ZSTD_MEDIAN)
            .zstd(),
        Filter::all().max(PLAIN_MEDIAN),
        Filter::dids(&dids),
    ];
    let probe_before = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    std::thread::sleep(Duration::from_millis(50));
    let live: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &Connect::default(), vec![], &stop))
        .collect();
    let probe_after = spawn_client(&relay, &Filter::all(), &Connect::default(), vec![], &stop);
    let r = refs.finish();
    // Let retention settle (it runs once a second) on the finished stream.
    std::thread::sleep(Duration::from_millis(2500));
    let read_retained = |what: &str| -> u64 {
        let s = Arc::new(AtomicU8::new(DRAIN));
        let o = join(spawn_client(
            &relay,
            &Filter::all(),
            &Connect {
                cursor: Some(0),
                ..Connect::default()
            },
            vec![],
            &s,
        ));
        let got = r.seqs(&o.frames, false, what);
        let first = *got.first().expect("retained events");
        check_exact(&r, &got, &Filter::all(), first, what);
        first
    };
    let f1 = read_retained("retained before");
    let from0 = Connect {
        cursor: Some(0),
        ..Connect::default()
    };
    let replays: Vec<_> = filters
        .iter()
        .map(|f| spawn_client(&relay, f, &from0, vec![], &stop))
        .collect();
    drain(&stop);
    let replays: Vec<Outcome> = replays.into_iter().map(join).collect();
    let f2 = read_retained("retained after");
    assert!(
        f1 > 3000 && f1 < r.n() - 1000,
        "retention kept events {f1}.. of {}",
        r.n()
    );
    assert!(f2 >= f1);
    // A client's stream is exactly its filter's events from a point in [lo, hi) on (nothing
    // from before), with no close.
    let expect_filtered_from = |f: &Filter, o: Outcome, lo: u64, hi: u64, what: String| {
        let got = r.seqs(&o.frames, f.compressed, &what);
        let phases = [
            phase(None, 0),
            Phase {
                filter: Some(f.clone()),
                lo,
                hi,
            },
        ];
        assert_eq!(check_phases(&r, &got, &phases, &what), vec![1], "{what}");
        assert!(o.close.is_none(), "{what}: {:?}", o.close);
    };
    for (f, o) in filters.iter().zip(replays) {
        expect_filtered_from(f, o, f1, f2, format!("replay from 0 after retention {f:?}"));
    }
    let b0 = first_seq(&r, &join(probe_before), false, "probe before");
    let a0 = first_seq(&r, &join(probe_after), false, "probe after");
    for (f, h) in filters.iter().zip(live) {
        expect_filtered_from(f, join(h), b0, a0, format!("live under retention {f:?}"));
    }
}

/// An `options_update` may arrive fragmented (RFC 6455 §5.4), with a ping between its
/// fragments: the pong comes back, and the reassembled update takes effect.
#[test]
fn fragmented_options_update_with_interleaved_ping() {
    use tungstenite::protocol::frame::Frame as WsFrame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let n = 2500;
    let (_clean, _mock, relay) = setup("subs-fragments", 800, n);
    let refs = RefReaders::start(&relay, n);
    refs.wait_for(100, Duration::from_secs(30));
    let mut ws = open(&relay.url(""), &[]);
    let mut frames = Vec::new();
    let t0 = Instant::now();
    while frames.len() < 50 && t0.elapsed() < Duration::from_secs(10) {
        if let Got::Frame(f) = read_one(&mut ws) {
            frames.push(f);
        }
    }
    let before_update = frames.len();
    let parts: [(&str, OpCode, bool); 3] = [
        (
            r#"{"type":"options_update","#,
            OpCode::Data(Data::Text),
            false,
        ),
        (
            r#""payload":{"wantedCollections":"#,
            OpCode::Data(Data::Continue),
            false,
        ),
        (
            r#"["app.bsky.graph.*"]}}"#,
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for (i, (text, opcode, fin)) in parts.into_iter().enumerate() {
        ws.send(Message::Frame(WsFrame::message(
            text.as_bytes().to_vec(),
            opcode,
            fin,
        )))
        .expect("fragment");
        if i == 0 {
            ws.send(Message::Ping(b"mid".to_vec().into()))
                .expect("ping");
        }
    }
    let mut pong = false;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        match ws.read() {
            Ok(Message::Text(t)) => frames.push(Frame {
                binary: false,
                data: t.as_bytes().to_vec(),
            }),
            Ok(Message::Pong(p)) => {
                assert_eq!(p.as_ref(), b"mid");
                pong = true;
            }
            Ok(Message::Close(c)) => panic!("closed: {c:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if frames.len() > before_update && refs.progress.load(Ordering::SeqCst) >= n {
                    // The stream is complete; allow the tail to arrive.
                    if t0.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(pong, "the ping between fragments was answered");
    let r = refs.finish();
    let got = r.seqs(&frames, false, "fragmented update");
    let lo = got[before_update - 1] + 1;
    let graph = Filter::collections(&["app.bsky.graph.*"]);
    let phases = [
        phase(None, 0),
        Phase {
            filter: Some(Filter::all()),
            lo: got[0],
            hi: got[0],
        },
        phase(Some(graph.clone()), lo),
    ];
    // Only the last regime fits the end: unfiltered events after the switch were withheld.
    assert_eq!(
        check_phases(&r, &got[..], &phases, "fragmented update"),
        vec![2]
    );
    assert!(
        got.last().is_some_and(|&s| s > r.n() - 200),
        "followed to the end"
    );
}

/// Retention keeps the disk cap even when the only readers of the compressed base log are
/// clients that walked it briefly and then moved onto their shape's log: their worker must not
/// keep reporting their old position (which would block retention for good, let the logs
/// grow past the cap, and turn every older cursor into an immediate 1008 close).
#[test]
fn retention_is_not_held_back_by_clients_that_moved_to_a_shape() {
    let n: u64 = 16_000;
    let count = n.to_string();
    let mock = Mock::start(4000, &["--count", &count, "--dids", "40"]);
    let dir = temp_dir("subs-moved");
    let relay = Relay::start(
        &upstream(&mock),
        &dir,
        &["--max-disk", "4MiB", "--workers", "2"],
    );
    wait_until("500 events", Duration::from_secs(30), || mock.seq() >= 500);
    let stop = Arc::new(AtomicU8::new(RUN));
    // New shapes on a fast stream: each client's start (resolved at its handshake) is older
    // than its shape (created when a worker attaches it), so it walks the base log first.
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let f = Filter::collections(&["app.bsky.feed.like"])
                .max(1 << (8 + i))
                .zstd();
            spawn_client(&relay, &f, &Connect::default(), vec![], &stop)
        })
        .collect();
    wait_until("the whole stream", Duration::from_secs(30), || {
        mock.seq() >= n
    });
    // Retention runs once a second; give it a few passes on the finished stream.
    std::thread::sleep(Duration::from_secs(4));
    let used = du_bytes(&dir);
    let mut ws = open(&relay.url("cursor=0&compress=true"), &[]);
    let first = read_close_or_frame(&mut ws);
    drain(&stop);
    for h in clients {
        join(h);
    }
    assert!(
        used <= 5 << 20,
        "data dir holds {used} bytes with --max-disk 4MiB"
    );
    assert!(first.is_ok(), "a cursor=0 client was refused: {first:?}");
}

/// The first thing a client receives: a data frame (Ok) or a close frame (Err).
fn read_close_or_frame(ws: &mut Ws) -> Result<Frame, Option<(u16, String)>> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        match read_one(ws) {
            Got::Frame(f) => return Ok(f),
            Got::Close(code, reason) => return Err(Some((code, reason))),
            Got::Gone => return Err(None),
            Got::Nothing => {}
        }
    }
    Err(None)
}

/// A client sending `options_update`s faster than `--options-update-rate` (default 1/s, burst
/// 10) is closed with 1008 and a reason; a client updating within the rate is not.
#[test]
fn options_update_rate_is_limited() {
    let (_clean, _mock, relay) = setup("subs-update-rate", 200, 20_000);
    let stop = Arc::new(AtomicU8::new(RUN));
    let open_all = || {
        let (url, headers) = request(&relay, &Filter::all(), &Connect::default());
        open(&url, &headers)
    };
    let updates = vec![
        Filter::collections(&["app.bsky.feed.post"]).update(),
        Filter::collections(&["app.bsky.feed.like"]).update(),
    ];
    let fast = {
        let (ws, updates, stop) = (open_all(), updates.clone(), stop.clone());
        std::thread::spawn(move || run_storm(ws, updates, Duration::from_millis(20), stop))
    };
    let slow = {
        let (ws, stop) = (open_all(), stop.clone());
        std::thread::spawn(move || run_storm(ws, updates, Duration::from_millis(1500), stop))
    };
    std::thread::sleep(Duration::from_secs(4));
    drain(&stop);
    let (o, sent) = join(fast);
    let (code, reason) = o.close.expect("the fast updater is closed");
    assert_eq!(code, 1008, "{reason}");
    assert!(
        reason.contains("options_update rate"),
        "{reason} after {sent} updates"
    );
    let (o, sent) = join(slow);
    assert!(sent >= 2, "{sent}");
    assert!(o.close.is_none(), "closed within the rate: {:?}", o.close);
}
