//! The relay's Jetstream v2 side end to end, with the real binaries: `jetrelay` following a
//! legacy `jetrelay-mock`, and a raw v2 client (tungstenite over a plain TcpStream, or raw HTTP
//! for refusals) on `/xrpc/network.bsky.jetstream.subscribeEvents` and `getZstdDictionary`.
//! Every event a test reads is checked against the mock's generator (parsed as a v2 frame,
//! rendered back to v1, and numbered by the generator), so "nothing missing, nothing twice" is
//! about the upstream's events, while order and resume are about the relay's own seqs.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use jetrelay::compress::{Dictionary, EventDecompressor};
use jetrelay::mock::Generator;
use jetrelay::wire::{self, V2Frame};
use tungstenite::{Message, WebSocket};

const SUBSCRIBE_EVENTS: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
const GET_DICTIONARY: &str = "/xrpc/network.bsky.jetstream.getZstdDictionary";
/// The v2 dictionary's id (the official one, and the relay's).
const V2_DICTIONARY_ID: u32 = 20_260_811;
/// Bound on waiting for one frame.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A pre-upgrade `subscribeEvents` request with `query`: (status, body). Reads the response
/// head and a `Content-Length` body only: an accepted upgrade (101) streams forever.
fn upgrade_refusal(port: u16, query: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    s.write_all(
        format!(
            "GET {SUBSCRIBE_EVENTS}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = s.read(&mut chunk).expect("response head");
        assert!(n > 0, "closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        return (status, String::new());
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("response body");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    (
        status,
        String::from_utf8_lossy(&buf[head_end..]).into_owned(),
    )
}

/// A connected v2 client.
struct V2Client {
    /// The WebSocket.
    ws: WebSocket<TcpStream>,
    /// For binary (zstdDictionary) frames.
    unzstd: EventDecompressor,
}

/// One message a v2 client received.
#[derive(Debug)]
enum Got {
    /// An event: the relay's seq, the generator's number of the event, the frame's bytes.
    Event { seq: u64, number: u64, raw: Vec<u8> },
    /// `#info` by name.
    Info(String),
    /// A terminal error frame by name.
    Error(String),
    /// A close frame (code) or the end of the stream (None).
    Closed(Option<u16>),
}

impl V2Client {
    /// Connects to `subscribeEvents?query`; panics if the upgrade is refused.
    fn connect(port: u16, query: &str) -> V2Client {
        Self::try_connect(port, query)
            .unwrap_or_else(|(status, body)| panic!("upgrade refused: {status} {body}"))
    }

    /// Connects, or returns the refusal's (status, body).
    fn try_connect(port: u16, query: &str) -> Result<V2Client, (u16, String)> {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        let url = format!("ws://127.0.0.1:{port}{SUBSCRIBE_EVENTS}?{query}");
        let ws = match tungstenite::client(url.as_str(), stream) {
            Ok((ws, _)) => ws,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let body = resp.body().as_deref().unwrap_or_default();
                return Err((
                    resp.status().as_u16(),
                    String::from_utf8_lossy(body).into_owned(),
                ));
            }
            Err(e) => panic!("upgrade of {url}: {e}"),
        };
        let unzstd = EventDecompressor::with_dictionary(Dictionary::V2).expect("v2 dictionary");
        Ok(V2Client { ws, unzstd })
    }

    /// The next message (text or compressed), decoded.
    fn next(&mut self) -> Got {
        loop {
            let raw = match self.ws.read() {
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Binary(b)) => self
                    .unzstd
                    .decompress(&b, wire::MAX_V2_FRAME_BYTES)
                    .expect("one zstd frame with the v2 dictionary"),
                Ok(Message::Close(c)) => return Got::Closed(c.map(|c| u16::from(c.code))),
                Ok(_) => continue,
                Err(
                    tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                ) => return Got::Closed(None),
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    return Got::Closed(None);
                }
                Err(e) => panic!("reading a v2 frame: {e}"),
            };
            return match wire::parse_v2_frame(&raw).unwrap_or_else(|e| {
                panic!("not a v2 frame ({e}): {}", String::from_utf8_lossy(&raw))
            }) {
                V2Frame::Event { seq, event, .. } => {
                    let mut v1 = Vec::new();
                    event.render_v1(&mut v1).expect("v1 form");
                    let number = Generator::seq_of(&v1).unwrap_or_else(|| {
                        panic!("not a generator event: {}", String::from_utf8_lossy(&v1))
                    });
                    Got::Event { seq, number, raw }
                }
                V2Frame::Info { name, .. } => Got::Info(name),
                V2Frame::Error { error, .. } => Got::Error(error),
            };
        }
    }

    /// The next `n` events: (relay seq, generator number, frame); panics on anything else.
    fn events(&mut self, n: usize) -> Vec<(u64, u64, Vec<u8>)> {
        (0..n)
            .map(|i| match self.next() {
                Got::Event { seq, number, raw } => (seq, number, raw),
                other => panic!("event {i} of {n}: got {other:?}"),
            })
            .collect()
    }
}

/// Checks a run of events: relay seqs strictly increasing (gaps allowed), generator numbers
/// consecutive (the upstream's events, nothing missing, nothing twice).
fn assert_exact_run(events: &[(u64, u64, Vec<u8>)], what: &str) {
    for w in events.windows(2) {
        assert!(
            w[1].0 > w[0].0,
            "{what}: relay seq {} after {}",
            w[1].0,
            w[0].0
        );
        assert_eq!(
            w[1].1,
            w[0].1 + 1,
            "{what}: upstream event {} after {} (relay seqs {} → {})",
            w[1].1,
            w[0].1,
            w[0].0,
            w[1].0
        );
    }
}

/// Every pre-upgrade mistake gets 400 with its XRPC error name before any WebSocket byte; the
/// dictionary endpoint serves the v2 dictionary with the official headers and 404s other ids.
#[test]
fn v2_refusals_and_the_dictionary_endpoint() {
    let mock = Mock::start(200, &[]);
    let dir = temp_dir("v2-refusals");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    for (query, error, needle) in [
        ("kinds=commit,nope", "InvalidRequest", "nope"),
        (
            "wantedCollections=app.bsky.feed.post",
            "InvalidRequest",
            "collections",
        ),
        ("wantedDids=did:plc:abc", "InvalidRequest", "dids"),
        ("compress=true", "InvalidRequest", "zstdDictionary"),
        ("zstdDictionary=1", "UnknownZstdDictionary", "1"),
        (
            "kinds=identity&collections=app.bsky.feed.post",
            "InvalidRequest",
            "collections",
        ),
    ] {
        let (status, body) = upgrade_refusal(relay.port, query);
        assert_eq!(status, 400, "{query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{query}: JSON body ({e}): {body}"));
        assert_eq!(v["error"], error, "{query}: {body}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{query}: message {message:?}");
    }
    // A valid request on the same relay is accepted (the refusals were about the parameters).
    let mut ok = V2Client::connect(relay.port, "kinds=commit");
    assert!(matches!(ok.next(), Got::Event { .. }));

    // getZstdDictionary: the repository's copy of the v2 dictionary, byte for byte.
    let want = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/zstd_dictionary_v2"
    ))
    .expect("assets/zstd_dictionary_v2");
    for path in [
        GET_DICTIONARY.to_owned(),
        format!("{GET_DICTIONARY}?id={V2_DICTIONARY_ID}"),
    ] {
        let resp = raw_bytes(relay.port, &path);
        let (head, body) = split_response(&resp);
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            body == want.as_slice(),
            "{path}: body is not the v2 dictionary"
        );
        let h = head.to_ascii_lowercase();
        for header in [
            "content-type: application/octet-stream".to_owned(),
            format!("etag: \"zstd-dict-{V2_DICTIONARY_ID}\""),
            "cache-control: public, max-age=31536000, immutable".to_owned(),
            format!("x-zstd-dictionary-id: {V2_DICTIONARY_ID}"),
        ] {
            assert!(h.contains(&header), "{path}: no `{header}` in\n{head}");
        }
    }
    let (status, body) = http_get(relay.port, &format!("{GET_DICTIONARY}?id=1"));
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["error"], "DictionaryNotFound", "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET `path`, the whole response as bytes.
fn raw_bytes(port: u16, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).ok();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// (head as text, body bytes).
fn split_response(resp: &[u8]) -> (String, &[u8]) {
    let at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    (
        String::from_utf8_lossy(&resp[..at]).into_owned(),
        &resp[at + 4..],
    )
}

/// A future seq: `#info FutureCursor` first, then the live stream (exact and in order); a data
/// frame from the client closes its connection, while another client is unaffected.
#[test]
fn v2_future_cursor_then_live_and_a_data_frame_closes() {
    let mock = Mock::start(300, &[]);
    let dir = temp_dir("v2-future");
    let relay = Relay::start(&mock.url(), &dir, &[]);
    let mut future = V2Client::connect(relay.port, "cursor=100000000000000");
    match future.next() {
        Got::Info(name) => assert_eq!(name, "FutureCursor"),
        other => panic!("first frame of a future cursor: {other:?}"),
    }
    let live = future.events(50);
    assert_exact_run(&live, "live after FutureCursor");

    let mut bystander = V2Client::connect(relay.port, "");
    let mut talker = V2Client::connect(relay.port, "");
    talker.events(3);
    talker
        .ws
        .send(Message::text(r#"{"type":"options_update"}"#))
        .expect("send");
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "the relay kept sending after a data frame"
        );
        match talker.next() {
            Got::Event { .. } => continue,
            Got::Closed(code) => {
                assert_eq!(code, Some(wire::CLIENT_DATA_CLOSE_CODE), "close code");
                break;
            }
            other => panic!("after a client data frame: {other:?}"),
        }
    }
    assert_exact_run(&bystander.events(50), "bystander");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A seq cursor below retention: `CursorTooOld` (400, before the upgrade) naming the oldest
/// retained seq, which itself is accepted and is exactly the first event served; `/subscribe`
/// with the same too-old seq clamps silently instead.
#[test]
fn v2_cursor_too_old_names_the_oldest_seq() {
    let mock = Mock::start(3000, &[]);
    let dir = temp_dir("v2-too-old");
    let relay = Relay::start(&mock.url(), &dir, &["--retention", "2s"]);
    let mut refusal = None;
    wait_until("retention to drop seq 1", Duration::from_secs(40), || {
        let (status, body) = upgrade_refusal(relay.port, "cursor=1");
        if status == 400 {
            refusal = Some(body);
            return true;
        }
        false
    });
    let body = refusal.expect("refused");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["error"], "CursorTooOld", "{body}");
    let message = v["message"].as_str().expect("message");
    let floor = floor_in(message);
    assert!(floor > 1, "{message}");
    // The floor moves on as retention runs: the named oldest seq is accepted and served first,
    // unless retention moved past it meanwhile, when it is refused naming a higher floor.
    let mut floor = floor;
    for attempt in 0.. {
        assert!(attempt < 20, "the named floor was never servable");
        match V2Client::try_connect(relay.port, &format!("cursor={floor}")) {
            Err((status, body)) => {
                assert_eq!(status, 400, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                assert_eq!(v["error"], "CursorTooOld", "{body}");
                let next = floor_in(v["message"].as_str().unwrap_or_default());
                assert!(next > floor, "refused its own floor {floor}: {body}");
                floor = next;
            }
            Ok(mut c) => {
                let got = c.events(20);
                assert_eq!(got[0].0, floor, "the first event is the cursor's");
                assert_exact_run(&got, "from the floor");
                break;
            }
        }
    }
    // /subscribe clamps a too-old seq silently: upgraded, events from the oldest retained
    // (between the floor named before and the one named after, as retention moves on).
    let (mut ws, _) = tungstenite::client(
        relay.url("cursor=1").as_str(),
        TcpStream::connect(("127.0.0.1", relay.port)).expect("connect"),
    )
    .expect("/subscribe upgrades a too-old seq");
    let first = match ws.read().expect("a first event") {
        tungstenite::Message::Text(t) => serde_json::from_str::<serde_json::Value>(t.as_str())
            .expect("JSON")["cursor"]
            .as_u64()
            .expect("the relay's seq in the v1 frame"),
        other => panic!("unexpected {other:?}"),
    };
    drop(ws);
    let after = match V2Client::try_connect(relay.port, "cursor=1") {
        Err((_, body)) => floor_in(
            serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["message"]
                .as_str()
                .unwrap_or_default(),
        ),
        Ok(_) => panic!("seq 1 became servable"),
    };
    assert!(
        floor <= first && first <= after,
        "/subscribe?cursor=1 started at seq {first}, not the oldest retained ({floor}..={after})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The oldest seq a `CursorTooOld` message names.
fn floor_in(message: &str) -> u64 {
    message
        .split("lookback floor ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no floor in {message:?}"))
}

/// `kill -9` mid-stream and a restart on the same data directory: a client resuming with its
/// last seq gets that event again (the same bytes) and then every later upstream event exactly
/// once, in order; seqs assigned after the restart are above every earlier one.
#[test]
fn v2_resume_by_seq_across_kill9_is_exact() {
    let mock = Mock::start(400, &[]);
    let dir = temp_dir("v2-kill9");
    let port = free_port();
    let mut relay = Relay::start_on(port, &mock.url(), &dir, &[]);
    let mut client = V2Client::connect(port, "cursor=1");
    let before = client.events(300);
    assert_exact_run(&before, "before the crash");
    // Let the relay append more than the client read, so the crash cuts a stream in progress.
    std::thread::sleep(Duration::from_millis(500));
    // A live reader sees every seq the relay hands out until it dies.
    let mut probe = V2Client::connect(port, "");
    let mut max_before = probe.events(1)[0].0;
    relay.proc.kill9();
    drop(client);
    while let Got::Event { seq, .. } = probe.next() {
        max_before = max_before.max(seq);
    }
    let relay = Relay::start_on(port, &mock.url(), &dir, &[]);
    let (last_seq, last_number, last_raw) = before.last().expect("events").clone();
    let mut resumed = V2Client::connect(port, &format!("cursor={last_seq}"));
    let after = resumed.events(1200);
    assert_eq!(
        after[0].0, last_seq,
        "resume is inclusive: the last seen event first"
    );
    assert!(
        after[0].2 == last_raw,
        "the same bytes for the same seq after a restart"
    );
    assert_eq!(after[0].1, last_number);
    let mut all = before.clone();
    all.extend(after.into_iter().skip(1));
    assert_exact_run(&all, "across kill -9");
    // Seqs the restarted relay assigned (to events it appended after the restart) are above
    // every seq the crashed one handed out.
    let mut live = V2Client::connect(port, "");
    let fresh = live.events(5);
    assert!(
        fresh.iter().all(|e| e.0 > max_before),
        "seqs after the restart {:?} not above {max_before}\n{}",
        fresh.iter().map(|e| e.0).collect::<Vec<_>>(),
        relay.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The v1 `cursor` field is on by default and `--v1-cursor-field false` takes it out: the
/// swarm requires it on every `/subscribe` event, or on none, and checks the rest byte-exact
/// and in order (what a strict v1 client such as PyPI `atproto-jetstream` 0.3.0 needs).
#[test]
fn v1_cursor_field_on_by_default_and_off_by_option() {
    let mock = Mock::start(300, &[]);
    for (extra, expect) in [
        (&[][..], "present"),
        (&["--v1-cursor-field", "false"][..], "absent"),
    ] {
        let dir = temp_dir("v1-cursor-field");
        let relay = Relay::start(&mock.url(), &dir, extra);
        let report = swarm_ok(&[
            "--url",
            &relay.url(""),
            "--clients",
            "2",
            "--duration",
            "2s",
            "--expect-min-events",
            "100",
            "--expect-in-order",
            "--expect-cursor-field",
            expect,
        ]);
        eprintln!("{expect}: {report}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The slow-consumer rule with the real thresholds (100,000 events behind, under 5 events a
/// second for 60 s): a v2 client that stops reading while the relay appends far more gets the
/// `ConsumerTooSlow` error frame and a close, while a slow but progressing reader (20 events
/// every second, as far behind) is never dropped. About 80 s: the rule's own window.
///
/// `--ping-interval 10m`: with the default 30 s the relay closes a client that has not answered
/// a ping within the next period (`why=Dead code=1001 reason="no pong"`), so a reader that
/// stopped is closed at ~60 s, before it has been 100k events behind for 60 s, and never gets
/// `ConsumerTooSlow` (measured: 150 s, no error frame, closed "no pong" at 61 s).
#[test]
fn v2_consumer_too_slow_only_for_a_stalled_reader() {
    // 6,000 ev/s: the stalled client is 100k events behind after ~17 s plus what the socket
    // buffers hold, then the 60 s window runs.
    let mock = Mock::start(6000, &[]);
    let dir = temp_dir("v2-too-slow");
    let relay = Relay::start(&mock.url(), &dir, &["--ping-interval", "10m"]);
    let mut stalled = V2Client::connect(relay.port, "");
    stalled.events(5);
    let slow_port = relay.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow_stop = stop.clone();
    let slow = std::thread::spawn(move || {
        let mut c = V2Client::connect(slow_port, "");
        let mut read = Vec::new();
        while !slow_stop.load(std::sync::atomic::Ordering::Relaxed) {
            read.extend(c.events(20));
            std::thread::sleep(Duration::from_secs(1));
        }
        read
    });
    let closing = "closing a v2 consumer that does not keep up";
    wait_until(
        "the relay to drop the stalled consumer",
        Duration::from_secs(150),
        || relay.log_text().contains(closing),
    );
    // The stalled client now reads what was buffered, then the error frame and the close.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = 5;
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "no error frame after {events} events"
        );
        match stalled.next() {
            Got::Event { .. } => events += 1,
            Got::Error(name) => break name,
            other => panic!("stalled client after {events} events: {other:?}"),
        }
    };
    assert_eq!(error, "ConsumerTooSlow");
    assert!(
        matches!(stalled.next(), Got::Closed(_)),
        "closed after the error frame"
    );
    // The progressing reader is still served, a few seconds after the stalled one was dropped.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let read = slow.join().expect("the slow reader was never dropped");
    assert_exact_run(&read, "slow reader");
    assert_eq!(
        relay.log_text().matches(closing).count(),
        1,
        "only the stalled client was dropped"
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}
