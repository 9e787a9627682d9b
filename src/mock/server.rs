//! The mock's threads: an accept loop, a generator on an absolute schedule, and one thread per
//! HTTP connection / WebSocket subscriber, all sharing a history ring under one mutex.

use super::{
    Generator, MalformedKind, MockConfig, MockError, Wire, is_sync_event, jitter_back_us,
    jittered_time,
};
use crate::compress::{Dictionary, EventCompressor};
use crate::wire::{self, Cursor, MessageKind, SubscribeEventsParams, XrpcError};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// Longest HTTP request head accepted: Jetstream URLs with many filters are a few KiB.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Polling granularity of every blocking wait, which bounds how long `stop()` takes.
const TICK: Duration = Duration::from_millis(50);

/// Items a subscriber copies out of the ring per lock, so the generator is never starved.
const SUBSCRIBER_BATCH: usize = 1024;

/// Events the generator appends per lock when catching up (rate 0, or after a stall).
const GENERATOR_BATCH: u64 = 4096;

/// Locks a mutex, ignoring poisoning (a panicked subscriber thread must not take the mock down).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock time in µs since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// One entry of the history ring.
#[derive(Debug, Clone, Copy)]
enum Item {
    /// Generated event `seq` with its `time_us` (bytes are re-rendered from these).
    Event {
        /// Event number.
        seq: u64,
        /// Its `time_us`.
        time_us: i64,
    },
    /// An injected malformed message.
    Malformed {
        /// Which one.
        kind: MalformedKind,
        /// Emission time (the oversized message embeds it).
        time_us: i64,
    },
}

/// The history ring: positions are absolute (never reused), so subscribers can hold one.
#[derive(Debug)]
struct Ring {
    /// Retained items, oldest first.
    items: VecDeque<Item>,
    /// Absolute position of `items[0]`.
    first_pos: u64,
    /// Events generated so far (= seq of the next event).
    next_seq: u64,
    /// Malformed messages injected so far (selects the next kind).
    malformed: u64,
    /// Events since the last malformed injection.
    since_malformed: u64,
}

impl Ring {
    /// Absolute position one past the newest item.
    fn end_pos(&self) -> u64 {
        self.first_pos + self.items.len() as u64
    }
}

/// A registered subscriber, reachable from `drop_connections` and the generator.
#[derive(Debug)]
struct Subscriber {
    /// A clone of its socket, to shut it down from outside its thread.
    stream: TcpStream,
    /// Next ring position it will send (rate 0 must not evict what it has not sent).
    pos: Arc<AtomicU64>,
}

/// State shared by all mock threads.
#[derive(Debug)]
struct Shared {
    /// The configuration.
    config: MockConfig,
    /// Renders events.
    generator: Generator,
    /// History ring.
    ring: Mutex<Ring>,
    /// Signalled when the ring grows or a subscriber advances.
    changed: Condvar,
    /// Set by `stop()`.
    stop: AtomicBool,
    /// Live subscribers by id.
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    /// Next subscriber id.
    next_id: AtomicU64,
    /// Number of forced drops performed (for /stats).
    drops: AtomicU64,
    /// Connection threads to join on stop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Closes every subscriber's TCP connection without a close frame; returns how many.
    fn drop_all(&self) -> usize {
        let subs = lock(&self.subscribers);
        for s in subs.values() {
            // Errors mean the socket is already gone, which is the goal anyway.
            let _ = s.stream.shutdown(Shutdown::Both);
        }
        self.drops.fetch_add(1, Ordering::Relaxed);
        subs.len()
    }

    /// The `/stats` body.
    fn stats_json(&self) -> String {
        let (seq, first, malformed) = {
            let r = lock(&self.ring);
            (r.next_seq, r.first_pos, r.malformed)
        };
        serde_json::json!({
            "seq": seq,
            "subscribers": lock(&self.subscribers).len(),
            "malformed": malformed,
            "drops": self.drops.load(Ordering::Relaxed),
            "history_first_pos": first,
            "rate": self.config.rate,
        })
        .to_string()
    }
}

/// A running mock; dropping it stops it.
#[derive(Debug)]
pub struct MockHandle {
    /// Shared state.
    shared: Arc<Shared>,
    /// Bound addresses and their wires; the first is `MockConfig::listen`.
    addrs: Vec<(SocketAddr, Wire)>,
    /// Accept loop and generator.
    threads: Vec<JoinHandle<()>>,
}

impl MockHandle {
    /// The address the mock listens on (`MockConfig::listen`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0].0
    }

    /// Every listener's address and wire, `MockConfig::listen` first.
    pub fn local_addrs(&self) -> &[(SocketAddr, Wire)] {
        &self.addrs
    }

    /// Abruptly closes every subscriber connection (no close frame); returns how many.
    pub fn drop_connections(&self) -> usize {
        self.shared.drop_all()
    }

    /// Events generated so far (= the seq the next event will have).
    pub fn seq(&self) -> u64 {
        lock(&self.shared.ring).next_seq
    }

    /// Connected WebSocket subscribers.
    pub fn subscribers(&self) -> usize {
        lock(&self.shared.subscribers).len()
    }

    /// `(seq, time_us)` of every event in history, oldest first (tests use it to predict replay).
    pub fn history_events(&self) -> Vec<(u64, i64)> {
        lock(&self.shared.ring)
            .items
            .iter()
            .filter_map(|i| match *i {
                Item::Event { seq, time_us } => Some((seq, time_us)),
                Item::Malformed { .. } => None,
            })
            .collect()
    }

    /// Stops all threads and closes all connections; idempotent.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        self.shared.drop_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a mock upstream.
pub fn spawn(config: MockConfig) -> Result<MockHandle, MockError> {
    let mut listeners = Vec::with_capacity(1 + config.also_listen.len());
    let mut addrs = Vec::with_capacity(listeners.capacity());
    for &(at, wire) in std::iter::once(&(config.listen, config.wire)).chain(&config.also_listen) {
        let listener = TcpListener::bind(at)?;
        listener.set_nonblocking(true)?;
        addrs.push((listener.local_addr()?, wire));
        listeners.push((listener, wire));
    }
    let addr = addrs[0].0;
    let shared = Arc::new(Shared {
        generator: Generator::new(config.seed, config.dids),
        ring: Mutex::new(Ring {
            items: VecDeque::new(),
            first_pos: 0,
            next_seq: 0,
            malformed: 0,
            since_malformed: 0,
        }),
        config,
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
        subscribers: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        drops: AtomicU64::new(0),
        threads: Mutex::new(Vec::new()),
    });
    let s1 = shared.clone();
    let acceptor = std::thread::Builder::new()
        .name("mock-accept".into())
        .spawn(move || accept_loop(&s1, listeners))?;
    let s2 = shared.clone();
    let generator = std::thread::Builder::new()
        .name("mock-generator".into())
        .spawn(move || generate_loop(&s2))?;
    tracing::info!(%addr, wire = shared.config.wire.as_str(), rate = shared.config.rate, seed = shared.config.seed, "mock upstream listening");
    for (extra, wire) in &addrs[1..] {
        tracing::info!(addr = %extra, wire = wire.as_str(), "mock upstream also listening");
    }
    Ok(MockHandle {
        shared,
        addrs,
        threads: vec![acceptor, generator],
    })
}

/// Accepts connections on every listener until stopped, one thread each.
fn accept_loop(shared: &Arc<Shared>, listeners: Vec<(TcpListener, Wire)>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for (listener, wire) in &listeners {
            let wire = *wire;
            match listener.accept() {
                Ok((stream, peer)) => {
                    idle = false;
                    let s = shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("mock-conn".into())
                        .spawn(move || handle_connection(&s, stream, peer, wire));
                    match spawned {
                        Ok(h) => {
                            let mut threads = lock(&shared.threads);
                            threads.retain(|t| !t.is_finished());
                            threads.push(h);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot spawn connection thread"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(TICK);
                }
            }
        }
        if idle {
            std::thread::sleep(TICK / 5);
        }
    }
}

/// Appends one event (and possibly a malformed message) to the ring, evicting the oldest items.
fn push_event(shared: &Shared, ring: &mut Ring, now: i64) {
    let cfg = &shared.config;
    let seq = ring.next_seq;
    let time_us = cfg
        .clock
        .apply(seq, jittered_time(cfg.seed, seq, now, cfg.time_jitter_ms));
    let push = |ring: &mut Ring, item| {
        if ring.items.len() >= cfg.history.max(1) {
            ring.items.pop_front();
            ring.first_pos += 1;
        }
        ring.items.push_back(item);
    };
    push(ring, Item::Event { seq, time_us });
    ring.next_seq += 1;
    if let Some(every) = cfg.malformed_every.filter(|&n| n > 0) {
        ring.since_malformed += 1;
        if ring.since_malformed >= every {
            ring.since_malformed = 0;
            let kind = MalformedKind::nth(ring.malformed);
            ring.malformed += 1;
            push(ring, Item::Malformed { kind, time_us: now });
        }
    }
}

/// Generates events on an absolute schedule (rate > 0) or as fast as the slowest subscriber
/// consumes (rate 0), and performs periodic drops.
fn generate_loop(shared: &Shared) {
    let cfg = &shared.config;
    if !cfg.start_immediately {
        while lock(&shared.subscribers).is_empty() {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let ring = lock(&shared.ring);
            drop(shared.changed.wait_timeout(ring, TICK));
        }
        tracing::info!("first subscriber: starting the event schedule");
    }
    let start = Instant::now();
    let mut next_drop = cfg.drop_every.map(|d| start + d);
    let limit = cfg.count.unwrap_or(u64::MAX);
    while !shared.stop.load(Ordering::SeqCst) {
        if let (Some(at), Some(every)) = (next_drop, cfg.drop_every)
            && Instant::now() >= at
        {
            let n = shared.drop_all();
            tracing::info!(subscribers = n, "periodic drop");
            next_drop = Some(at + every);
        }
        let mut ring = lock(&shared.ring);
        if ring.next_seq >= limit {
            drop(shared.changed.wait_timeout(ring, TICK));
            continue;
        }
        let budget = if cfg.rate == 0 {
            let subs = lock(&shared.subscribers);
            let min_pos = subs.values().map(|s| s.pos.load(Ordering::SeqCst)).min();
            drop(subs);
            match min_pos {
                // Nobody to send to: don't spin generating into the void.
                None => 0,
                Some(min_pos) => {
                    let used = ring.end_pos().saturating_sub(min_pos);
                    (cfg.history.max(1) as u64).saturating_sub(used + 1)
                }
            }
        } else {
            let due = (start.elapsed().as_secs_f64() * cfg.rate as f64) as u64;
            due.saturating_sub(ring.next_seq)
        };
        let n = budget.min(GENERATOR_BATCH).min(limit - ring.next_seq);
        if n == 0 {
            let wait = if cfg.rate == 0 {
                TICK
            } else {
                let next_at = (ring.next_seq + 1) as f64 / cfg.rate as f64;
                Duration::from_secs_f64(next_at)
                    .saturating_sub(start.elapsed())
                    .min(TICK)
            };
            drop(shared.changed.wait_timeout(ring, wait));
            continue;
        }
        let now = now_us();
        for _ in 0..n {
            push_event(shared, &mut ring, now);
        }
        drop(ring);
        shared.changed.notify_all();
    }
}

/// A parsed HTTP request head.
#[derive(Debug)]
struct Request {
    /// Request method.
    method: String,
    /// Request path without the query.
    path: String,
    /// Raw query string (without `?`).
    query: String,
    /// `Sec-WebSocket-Key`, when this is a WebSocket upgrade.
    ws_key: Option<Vec<u8>>,
    /// Every `Socket-Encoding` value (the v1 zstd opt-in, refused on v2).
    socket_encoding: Vec<String>,
    /// `If-None-Match`, for the dictionary download.
    if_none_match: Option<String>,
    /// Whether `Sec-WebSocket-Protocol` offers `xrpc.v1.json` (echoed back on v2).
    offers_subprotocol: bool,
}

/// Reads and parses the request head; returns it and any bytes read past it.
fn read_request(shared: &Shared, stream: &mut TcpStream) -> Option<(Request, Vec<u8>)> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    stream.set_read_timeout(Some(TICK)).ok()?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if shared.stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return None,
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let values = |name: &str| -> Vec<String> {
                    req.headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                        .collect()
                };
                let upgrade = values("upgrade")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("websocket"));
                let ws_key = values("sec-websocket-key")
                    .into_iter()
                    .next()
                    .filter(|_| upgrade)
                    .map(String::into_bytes);
                let offers_subprotocol = values("sec-websocket-protocol")
                    .iter()
                    .flat_map(|v| v.split(','))
                    .any(|t| t.trim() == wire::SUBPROTOCOL);
                let request = Request {
                    method: req.method.unwrap_or("GET").to_owned(),
                    path: path.to_string(),
                    query: query.to_string(),
                    ws_key,
                    socket_encoding: values("socket-encoding"),
                    if_none_match: values("if-none-match").into_iter().next(),
                    offers_subprotocol,
                };
                return Some((request, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => {}
            _ => return None,
        }
    }
}

/// Writes a small plain-text HTTP response and closes.
fn respond(stream: TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    respond_raw(stream, &[head.as_bytes(), body.as_bytes()].concat());
}

/// Writes a complete HTTP response and closes.
fn respond_raw(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.write_all(response);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Where a subscriber asked to start, before it is resolved against the ring.
#[derive(Debug, Clone, Copy)]
enum StartAt {
    /// The live end.
    Live,
    /// The first event with `time_us >= cursor` (legacy `/subscribe`).
    TimeUs(i64),
    /// A cursor of a seq-bearing wire: seqs inclusive, µs against the witness time.
    Wire(Cursor),
}

/// How a subscriber's events are rendered.
enum Render {
    /// The generator's bytes as they are (legacy `/subscribe`).
    Legacy,
    /// With `"cursor":<wire seq>` after `time_us`.
    V1Cursor,
    /// `subscribeEvents` message frames, filtered, optionally compressed with the v2 dictionary.
    V2 {
        /// The client's query.
        params: Box<SubscribeEventsParams>,
        /// Present when `zstdDictionary` was given.
        compressor: Option<EventCompressor>,
    },
}

/// Serves one accepted connection: plain HTTP endpoints or a WebSocket subscriber.
fn handle_connection(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, wire: Wire) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let Some((req, leftover)) = read_request(shared, &mut stream) else {
        return;
    };
    let v2_paths = wire == Wire::V2;
    match (req.path.as_str(), req.ws_key.clone()) {
        ("/subscribe", Some(key)) => {
            let mut start = StartAt::Live;
            for (k, v) in url_query_pairs(&req.query) {
                match k.as_str() {
                    "cursor" if wire.has_seq() => match Cursor::parse(&v) {
                        Ok(c) => start = c.map_or(StartAt::Live, StartAt::Wire),
                        Err(e) => {
                            respond(stream, "400 Bad Request", "text/plain", &e.to_string());
                            return;
                        }
                    },
                    "cursor" => match v.parse::<i64>() {
                        Ok(c) => start = StartAt::TimeUs(c),
                        Err(_) => {
                            respond(
                                stream,
                                "400 Bad Request",
                                "text/plain",
                                &format!("invalid cursor: {v}"),
                            );
                            return;
                        }
                    },
                    "compress" if v == "true" => {
                        respond(
                            stream,
                            "400 Bad Request",
                            "text/plain",
                            "the mock serves uncompressed streams only",
                        );
                        return;
                    }
                    _ => {}
                }
            }
            let render = if wire.has_seq() {
                Render::V1Cursor
            } else {
                Render::Legacy
            };
            subscribe(shared, stream, peer, &key, None, start, render, leftover);
        }
        ("/subscribe", None) => respond(
            stream,
            "400 Bad Request",
            "text/plain",
            "expected a WebSocket upgrade\n",
        ),
        (wire::SUBSCRIBE_EVENTS_PATH, Some(key)) if v2_paths => {
            let encodings: Vec<&str> = req.socket_encoding.iter().map(String::as_str).collect();
            let params = match wire::parse_subscribe_events_query(&req.query, &encodings) {
                Ok(p) => p,
                Err(e) => return respond_raw(stream, &e.to_response()),
            };
            let compressor = if params.compress {
                match EventCompressor::with_dictionary(Dictionary::V2) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "v2 compressor");
                        return respond(stream, "500 Internal Server Error", "text/plain", "");
                    }
                }
            } else {
                None
            };
            let start = params.cursor.map_or(StartAt::Live, StartAt::Wire);
            let subprotocol = req.offers_subprotocol.then_some(wire::SUBPROTOCOL);
            let render = Render::V2 {
                params: Box::new(params),
                compressor,
            };
            subscribe(
                shared,
                stream,
                peer,
                &key,
                subprotocol,
                start,
                render,
                leftover,
            );
        }
        (wire::SUBSCRIBE_EVENTS_PATH, None) if v2_paths => respond_raw(
            stream,
            &XrpcError::invalid_request("subscribeEvents is a WebSocket subscription")
                .to_response(),
        ),
        (wire::GET_ZSTD_DICTIONARY_PATH, _) if v2_paths => respond_raw(
            stream,
            &wire::get_zstd_dictionary(&req.method, &req.query, req.if_none_match.as_deref())
                .to_bytes(),
        ),
        ("/drop", _) => {
            let n = shared.drop_all();
            tracing::info!(subscribers = n, "drop requested over HTTP");
            respond(stream, "200 OK", "text/plain", &format!("dropped {n}\n"));
        }
        ("/stats", _) => {
            let body = shared.stats_json();
            respond(stream, "200 OK", "application/json", &body);
        }
        ("/", _) => respond(
            stream,
            "200 OK",
            "text/plain",
            &format!(
                "jetrelay-mock: a simulated Jetstream upstream ({} wire). GET /subscribe (WebSocket, cursor){}, /stats, /drop\n",
                wire.as_str(),
                if v2_paths {
                    ", /xrpc/network.bsky.jetstream.subscribeEvents, /xrpc/network.bsky.jetstream.getZstdDictionary"
                } else {
                    ""
                }
            ),
        ),
        _ => respond(stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

/// Splits a query string into percent-decoded pairs.
pub(crate) fn url_query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes are kept literally.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Ring position where a subscriber with `cursor` starts: the first event with
/// `time_us >= cursor` (inclusive, in history order), or the live end.
fn start_position(ring: &Ring, cursor: Option<i64>) -> u64 {
    let Some(cursor) = cursor else {
        return ring.end_pos();
    };
    ring.items
        .iter()
        .position(|i| matches!(*i, Item::Event { time_us, .. } if time_us >= cursor))
        .map(|p| ring.first_pos + p as u64)
        .unwrap_or_else(|| ring.end_pos())
}

/// Ring position of the first event matching `pred`, or the live end.
fn first_event_where(ring: &Ring, pred: impl Fn(u64, i64) -> bool) -> u64 {
    ring.items
        .iter()
        .position(|i| matches!(*i, Item::Event { seq, time_us } if pred(seq, time_us)))
        .map(|p| ring.first_pos + p as u64)
        .unwrap_or_else(|| ring.end_pos())
}

/// Resolves a seq-bearing wire's cursor: the start position and the `#info` frame to send
/// first (v2), or the pre-upgrade refusal (`CursorTooOld`, v2 only; `/subscribe` clamps).
fn resolve_wire_cursor(
    shared: &Shared,
    ring: &Ring,
    cursor: Cursor,
    v2: bool,
) -> Result<(u64, Option<Vec<u8>>), XrpcError> {
    let cfg = &shared.config;
    let offset = cfg.seq_offset;
    let oldest = ring.items.iter().find_map(|i| match *i {
        Item::Event { seq, .. } => Some(seq),
        Item::Malformed { .. } => None,
    });
    match cursor {
        Cursor::Seq(wire_seq) => {
            let next_wire = ring.next_seq + offset;
            if wire_seq >= next_wire {
                let info = (v2 && wire_seq > next_wire).then(|| {
                    let mut f = Vec::new();
                    wire::future_cursor_frame(wire_seq, next_wire, &mut f);
                    f
                });
                return Ok((ring.end_pos(), info));
            }
            let floor = oldest.unwrap_or(ring.next_seq);
            // Below the oldest retained event, or a seq this mock never assigned (< offset).
            if wire_seq < floor + offset && (ring.first_pos > 0 || wire_seq < offset) {
                if v2 && ring.first_pos > 0 {
                    return Err(XrpcError::cursor_too_old(wire_seq, floor + offset));
                }
                return Ok((first_event_where(ring, |_, _| true), None));
            }
            let target = wire_seq - offset;
            Ok((first_event_where(ring, |seq, _| seq >= target), None))
        }
        Cursor::TimeUs(us) => {
            if us > now_us() {
                return Ok((ring.end_pos(), None));
            }
            let witnessed = |seq: u64, time_us: i64| {
                time_us + jitter_back_us(cfg.seed, seq, cfg.time_jitter_ms)
            };
            let pos = first_event_where(ring, |seq, t| witnessed(seq, t) >= us);
            let oldest_witnessed = ring.items.iter().find_map(|i| match *i {
                Item::Event { seq, time_us } => Some(witnessed(seq, time_us)),
                Item::Malformed { .. } => None,
            });
            let clamped = ring.first_pos > 0 && oldest_witnessed.is_some_and(|w| us < w);
            let info = (v2 && clamped).then(|| {
                let mut f = Vec::new();
                wire::outdated_cursor_frame(oldest.unwrap_or(0) + offset, &mut f);
                f
            });
            Ok((pos, info))
        }
    }
}

/// Registers a WebSocket subscriber, answers the upgrade, and streams to it until it goes
/// away or the mock stops. A v2 cursor refusal is answered before the upgrade.
#[allow(clippy::too_many_arguments)]
fn subscribe(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    key: &[u8],
    subprotocol: Option<&str>,
    start: StartAt,
    render: Render,
    leftover: Vec<u8>,
) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let v2 = matches!(render, Render::V2 { .. });
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let registered = {
        // Register under the ring lock so the generator cannot evict our start meanwhile.
        let ring = lock(&shared.ring);
        let resolved = match start {
            StartAt::Live => Ok((ring.end_pos(), None)),
            StartAt::TimeUs(c) => Ok((start_position(&ring, Some(c)), None)),
            StartAt::Wire(cursor) => resolve_wire_cursor(shared, &ring, cursor, v2),
        };
        resolved.map(|(start, info)| {
            let pos = Arc::new(AtomicU64::new(start));
            lock(&shared.subscribers).insert(
                id,
                Subscriber {
                    stream: clone,
                    pos: pos.clone(),
                },
            );
            (pos, info)
        })
    };
    let (pos, info) = match registered {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(%peer, error = %refusal, "subscriber refused");
            return respond_raw(stream, &refusal.to_response());
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key);
    let protocol = subprotocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    );
    let reason = if stream.write_all(head.as_bytes()).is_err() {
        "upgrade write failed"
    } else {
        tracing::info!(%peer, id, ?start, start = pos.load(Ordering::SeqCst), v2, "subscriber connected");
        stream_to(shared, stream, &pos, leftover, render, info)
    };
    lock(&shared.subscribers).remove(&id);
    shared.changed.notify_all();
    tracing::info!(%peer, id, reason, "subscriber gone");
}

/// The WebSocket message for one ring item as `render` wants it; `None` = filtered out.
fn render_item(
    shared: &Shared,
    item: Item,
    render: &mut Render,
    buf: &mut Vec<u8>,
) -> Result<Option<Message>, &'static str> {
    let cfg = &shared.config;
    let (seq, time_us) = match item {
        Item::Event { seq, time_us } => (seq, time_us),
        Item::Malformed { kind, time_us } => {
            let (payload, text) = kind.payload(time_us);
            return Ok(Some(if text {
                // Invalid UTF-8 cannot occur in our payloads; raw frames avoid the check.
                Message::Frame(tungstenite::protocol::frame::Frame::message(
                    payload,
                    tungstenite::protocol::frame::coding::OpCode::Data(
                        tungstenite::protocol::frame::coding::Data::Text,
                    ),
                    true,
                ))
            } else {
                Message::Binary(payload.into())
            }));
        }
    };
    buf.clear();
    shared.generator.event(seq, time_us, buf);
    let wire_seq = seq + cfg.seq_offset;
    if is_sync_event(cfg.sync_every, seq) {
        return match render {
            Render::Legacy | Render::V1Cursor => Ok(None),
            Render::V2 { params, compressor } => {
                let witnessed = time_us + jitter_back_us(cfg.seed, seq, cfg.time_jitter_ms);
                let Some(frame) = sync_frame(buf, wire_seq, witnessed, params)? else {
                    return Ok(None);
                };
                v2_message(frame, compressor.as_mut()).map(Some)
            }
        };
    }
    let text = match render {
        Render::Legacy => std::mem::take(buf),
        Render::V1Cursor => {
            let mut out = Vec::with_capacity(buf.len() + 32);
            wire::with_cursor(buf, wire_seq, &mut out).map_err(|_| "cursor insertion failed")?;
            out
        }
        Render::V2 { params, compressor } => {
            let (kind, collection) =
                Generator::template_kind_and_collection(Generator::template_index(seq));
            let kind = MessageKind::from_name(kind).ok_or("unknown template kind")?;
            if !params.wants(kind, &shared.generator.did_for(seq), collection) {
                return Ok(None);
            }
            let witnessed = time_us + jitter_back_us(cfg.seed, seq, cfg.time_jitter_ms);
            let mut out = Vec::with_capacity(buf.len() + 256);
            wire::v1_to_v2(buf, wire_seq, witnessed, &mut out)
                .map_err(|_| "v2 rendering failed")?;
            if !params.options.size_allowed(out.len()) {
                return Ok(None);
            }
            if let Some(c) = compressor {
                let mut packed = Vec::with_capacity(out.len());
                c.compress(&out, &mut packed)
                    .map_err(|_| "compression failed")?;
                return Ok(Some(Message::Binary(packed.into())));
            }
            out
        }
    };
    tungstenite::Utf8Bytes::try_from(text)
        .map(|t| Some(Message::Text(t)))
        .map_err(|_| "generated invalid UTF-8")
}

/// The `#sync` message for the event whose v1 bytes are `v1` (its DID, rev and time), or
/// `None` when the client's filters drop it.
fn sync_frame(
    v1: &[u8],
    wire_seq: u64,
    witnessed: i64,
    params: &SubscribeEventsParams,
) -> Result<Option<Vec<u8>>, &'static str> {
    let event = wire::EventParts::from_v1(v1).map_err(|_| "template unreadable")?;
    let did: String = serde_json::from_slice(event.did).map_err(|_| "template DID")?;
    if !params.wants(MessageKind::Sync, &did, None) {
        return Ok(None);
    }
    let rev: &[u8] = match &event.body {
        wire::Body::Commit(c) => c.rev,
        _ => b"\"2222222222222\"",
    };
    let time = wire::rfc3339::format_micros_string(event.time_us).map_err(|_| "time")?;
    let mut object = br#"{"blocks":{"$bytes":"OqJlcm9vdHOB2CpYJQABcRIg"},"did":"#.to_vec();
    object.extend_from_slice(event.did);
    object.extend_from_slice(b",\"rev\":");
    object.extend_from_slice(rev);
    // The wrapped event's seq is the upstream relay's (firehose) numbering, not ours.
    let firehose_seq = 100_000_000_000 + wire_seq;
    object.extend_from_slice(format!(",\"seq\":{firehose_seq},\"time\":\"{time}\"}}").as_bytes());
    let sync = wire::EventParts {
        did: event.did,
        time_us: event.time_us,
        body: wire::Body::Sync(&object),
    };
    let mut out = Vec::with_capacity(object.len() + 256);
    sync.render_v2(wire_seq, witnessed, &mut out)
        .map_err(|_| "v2 rendering failed")?;
    if !params.options.size_allowed(out.len()) {
        return Ok(None);
    }
    Ok(Some(out))
}

/// A v2 frame as sent: binary and compressed with the v2 dictionary, or text.
fn v2_message(
    frame: Vec<u8>,
    compressor: Option<&mut EventCompressor>,
) -> Result<Message, &'static str> {
    if let Some(c) = compressor {
        let mut packed = Vec::with_capacity(frame.len());
        c.compress(&frame, &mut packed)
            .map_err(|_| "compression failed")?;
        return Ok(Message::Binary(packed.into()));
    }
    tungstenite::Utf8Bytes::try_from(frame)
        .map(Message::Text)
        .map_err(|_| "generated invalid UTF-8")
}

/// A v2 control frame (`#info`, error) as the connection sends it: compressed when its events are.
fn control_message(render: &mut Render, frame: Vec<u8>) -> Option<Message> {
    if let Render::V2 {
        compressor: Some(c),
        ..
    } = render
    {
        let mut packed = Vec::new();
        c.compress(&frame, &mut packed).ok()?;
        return Some(Message::Binary(packed.into()));
    }
    tungstenite::Utf8Bytes::try_from(frame)
        .ok()
        .map(Message::Text)
}

/// The subscriber loop; returns why it ended.
fn stream_to(
    shared: &Shared,
    stream: TcpStream,
    pos_shared: &AtomicU64,
    leftover: Vec<u8>,
    mut render: Render,
    first_frame: Option<Vec<u8>>,
) -> &'static str {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let fd = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return "clone failed",
    };
    let v2 = matches!(render, Render::V2 { .. });
    let mut config = WebSocketConfig::default();
    // The mock sends the 2 MiB malformed frame; never refuse to write it.
    config.max_frame_size = None;
    let mut ws = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(config));
    if let Some(frame) = first_frame.and_then(|f| control_message(&mut render, f))
        && ws.write(frame).is_err()
    {
        return "write failed";
    }
    let mut pos = pos_shared.load(Ordering::SeqCst);
    let mut batch: Vec<Item> = Vec::with_capacity(SUBSCRIBER_BATCH);
    let mut next_ping = Instant::now() + shared.config.ping_interval;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return "mock stopping";
        }
        batch.clear();
        let fell_behind = {
            let mut ring = lock(&shared.ring);
            if pos >= ring.end_pos() && pos >= ring.first_pos {
                ring = shared
                    .changed
                    .wait_timeout(ring, TICK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if pos < ring.first_pos {
                Some(ring.end_pos() - pos)
            } else {
                let skip = (pos - ring.first_pos) as usize;
                batch.extend(ring.items.iter().skip(skip).take(SUBSCRIBER_BATCH));
                None
            }
        };
        if let Some(lag) = fell_behind {
            if v2 {
                // The official rule drops only a reader far behind and not progressing; the
                // mock's history ring forces the drop sooner, with the same terminal frame.
                let mut frame = Vec::new();
                wire::consumer_too_slow_frame(lag, pos + shared.config.seq_offset, &mut frame);
                if let Some(m) = control_message(&mut render, frame) {
                    let _ = ws.write(m);
                    let _ = ws.close(None);
                    let _ = ws.flush();
                }
            }
            return "fell out of the history ring";
        }
        for item in &batch {
            match render_item(shared, *item, &mut render, &mut buf) {
                Ok(Some(msg)) => {
                    if ws.write(msg).is_err() {
                        return "write failed";
                    }
                }
                Ok(None) => {}
                Err(why) => return why,
            }
        }
        if !batch.is_empty() {
            pos += batch.len() as u64;
            pos_shared.store(pos, Ordering::SeqCst);
            shared.changed.notify_all();
        }
        if Instant::now() >= next_ping {
            next_ping += shared.config.ping_interval;
            if ws.write(Message::Ping(Vec::new().into())).is_err() {
                return "ping failed";
            }
        }
        if ws.flush().is_err() {
            return "flush failed";
        }
        // Read whatever the subscriber sent (pongs, pings, close, options_update) without
        // blocking the stream: tungstenite answers pings and close frames itself. The v2 wire
        // is server-push only: a data frame closes the connection (1008).
        while readable(&fd) {
            match ws.read() {
                Ok(Message::Text(_) | Message::Binary(_)) if v2 => {
                    let _ = ws.close(Some(tungstenite::protocol::CloseFrame {
                        code: wire::CLIENT_DATA_CLOSE_CODE.into(),
                        reason: wire::CLIENT_DATA_CLOSE_REASON.into(),
                    }));
                    let _ = ws.flush();
                    return "client data frame on subscribeEvents";
                }
                Ok(Message::Close(_)) => {}
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(tungstenite::Error::ConnectionClosed) => return "closed by subscriber",
                Err(_) => return "read failed",
            }
        }
    }
}

/// Whether `stream` has bytes (or EOF) to read right now.
fn readable(stream: &TcpStream) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            url_query_pairs("cursor=12&wantedCollections=app.bsky.*&x=%41%2"),
            vec![
                ("cursor".into(), "12".into()),
                ("wantedCollections".into(), "app.bsky.*".into()),
                ("x".into(), "A%2".into()),
            ]
        );
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    fn ring_with(times: &[i64]) -> Ring {
        let mut r = Ring {
            items: VecDeque::new(),
            first_pos: 100,
            next_seq: 0,
            malformed: 0,
            since_malformed: 0,
        };
        for (i, &t) in times.iter().enumerate() {
            r.items.push_back(Item::Event {
                seq: i as u64,
                time_us: t,
            });
            if i == 1 {
                r.items.push_back(Item::Malformed {
                    kind: MalformedKind::Binary,
                    time_us: 1_000,
                });
            }
        }
        r
    }

    #[test]
    fn cursor_start_is_first_event_with_time_at_or_after_cursor() {
        // Non-monotonic times: 10, 30, [malformed], 20, 40.
        let r = ring_with(&[10, 30, 20, 40]);
        assert_eq!(start_position(&r, None), 105);
        assert_eq!(start_position(&r, Some(5)), 100);
        assert_eq!(start_position(&r, Some(10)), 100);
        assert_eq!(start_position(&r, Some(11)), 101, "30 is the first >= 11");
        assert_eq!(start_position(&r, Some(25)), 101);
        assert_eq!(start_position(&r, Some(31)), 104);
        assert_eq!(start_position(&r, Some(41)), 105, "nothing newer: live");
        assert_eq!(
            start_position(&r, Some(500)),
            105,
            "malformed items never match a cursor"
        );
    }
}

/// The wires, end to end over loopback with tungstenite as the client.
#[cfg(test)]
mod wire_tests {
    use super::super::{MockConfig, Wire, spawn};
    use crate::compress::{Dictionary, EventDecompressor};
    use crate::mock::{Generator, MockHandle};
    use crate::wire::{self, MessageKind, V2Frame};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    use tungstenite::Message;

    const SEED: u64 = 5;
    const COUNT: u64 = 600;

    /// A mock with `COUNT` events already generated, a legacy listener first and a v2 and a
    /// cursor listener over the same stream.
    fn finished_mock(history: usize) -> MockHandle {
        let m = spawn(MockConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            rate: 5000,
            seed: SEED,
            dids: 50,
            count: Some(COUNT),
            history,
            start_immediately: true,
            wire: Wire::Legacy,
            also_listen: vec![
                ("127.0.0.1:0".parse().unwrap(), Wire::V2),
                ("127.0.0.1:0".parse().unwrap(), Wire::Cursor),
            ],
            ..Default::default()
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while m.seq() < COUNT {
            assert!(Instant::now() < deadline, "mock did not generate");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn url(m: &MockHandle, wire: Wire, path_query: &str) -> String {
        let addr = m.local_addrs().iter().find(|(_, w)| *w == wire).unwrap().0;
        format!("ws://{addr}{path_query}")
    }

    /// Reads `n` data messages (text or binary, as bytes, with a binary flag).
    fn read_n(url: &str, n: usize) -> Vec<(Vec<u8>, bool)> {
        let (mut ws, _) = tungstenite::connect(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < n {
            match ws
                .read()
                .unwrap_or_else(|e| panic!("{url} after {}: {e}", out.len()))
            {
                Message::Text(t) => out.push((t.as_bytes().to_vec(), false)),
                Message::Binary(b) => out.push((b.to_vec(), true)),
                _ => {}
            }
        }
        out
    }

    /// GET over raw HTTP: the whole response.
    fn http(m: &MockHandle, wire: Wire, request: &str) -> String {
        let addr = m.local_addrs().iter().find(|(_, w)| *w == wire).unwrap().0;
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn upgrade(path_query: &str, extra: &str) -> String {
        format!(
            "GET {path_query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn cursor_wire_adds_the_seq_and_resumes_by_it_inclusively() {
        let m = finished_mock(100_000);
        let g = Generator::new(SEED, 50);
        let legacy = read_n(&url(&m, Wire::Legacy, "/subscribe?cursor=0"), 3);
        let with_seq = read_n(&url(&m, Wire::Cursor, "/subscribe?cursor=11"), 3);
        for (i, (json, _)) in with_seq.iter().enumerate() {
            let n = 10 + i as u64; // wire seq 11 is event number 10
            let time_us = Generator::time_us_of(json).unwrap();
            let mut plain = Vec::new();
            g.event(n, time_us, &mut plain);
            let mut want = Vec::new();
            wire::with_cursor(&plain, n + 1, &mut want).unwrap();
            assert_eq!(json, &want, "event {n}");
        }
        // The legacy listener of the same stream: same events, no cursor field.
        let mut plain = Vec::new();
        g.event(0, Generator::time_us_of(&legacy[0].0).unwrap(), &mut plain);
        assert_eq!(legacy[0].0, plain);
        // A µs cursor still works on the cursor wire (witness time = time_us without jitter).
        let t = Generator::time_us_of(&with_seq[1].0).unwrap();
        let by_time = read_n(&url(&m, Wire::Cursor, &format!("/subscribe?cursor={t}")), 1);
        let v: serde_json::Value = serde_json::from_slice(&by_time[0].0).unwrap();
        assert!(v["cursor"].as_u64().unwrap() <= 12);
        // Negative cursors are refused on the seq wires, as officially.
        let r = http(&m, Wire::Cursor, &upgrade("/subscribe?cursor=-1", ""));
        assert!(
            r.starts_with("HTTP/1.1 400") && r.contains("negative value -1"),
            "{r}"
        );
    }

    #[test]
    fn v2_wire_frames_filters_and_compression() {
        let m = finished_mock(100_000);
        let g = Generator::new(SEED, 50);
        let text = read_n(
            &url(
                &m,
                Wire::V2,
                &format!(
                    "{}?cursor=1&kinds=commit&collections=app.bsky.feed.post",
                    wire::SUBSCRIBE_EVENTS_PATH
                ),
            ),
            5,
        );
        let packed = read_n(
            &url(
                &m,
                Wire::V2,
                &format!(
                    "{}?cursor=1&kinds=commit&collections=app.bsky.feed.post&zstdDictionary=20260811",
                    wire::SUBSCRIBE_EVENTS_PATH
                ),
            ),
            5,
        );
        let mut d = EventDecompressor::with_dictionary(Dictionary::V2).unwrap();
        let mut last = 0;
        for ((t, t_bin), (p, p_bin)) in text.iter().zip(&packed) {
            assert!(!t_bin && *p_bin);
            assert_eq!(&d.decompress(p, 1 << 20).unwrap(), t);
            let V2Frame::Event { seq, event, .. } = wire::parse_v2_frame(t).unwrap() else {
                panic!("not an event");
            };
            assert!(seq > last);
            last = seq;
            let (kind, collection) =
                Generator::template_kind_and_collection(Generator::template_index(seq - 1));
            assert_eq!((kind, collection), ("commit", Some("app.bsky.feed.post")));
            let mut v1 = Vec::new();
            g.event(seq - 1, event.time_us, &mut v1);
            let mut want = Vec::new();
            wire::v1_to_v2(&v1, seq, event.time_us, &mut want).unwrap();
            assert_eq!(t, &want);
        }
        // A client data frame closes the connection with 1008.
        let (mut ws, _) =
            tungstenite::connect(url(&m, Wire::V2, wire::SUBSCRIBE_EVENTS_PATH)).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        ws.send(Message::Text("{\"type\":\"options_update\"}".into()))
            .unwrap();
        let close = loop {
            match ws.read() {
                Ok(Message::Close(c)) => break c,
                Ok(_) => {}
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        let close = close.expect("close frame with a code");
        assert_eq!(u16::from(close.code), 1008);
        assert_eq!(close.reason.as_str(), wire::CLIENT_DATA_CLOSE_REASON);
    }

    #[test]
    fn v2_wire_pre_upgrade_errors_info_frames_and_subprotocol() {
        let m = finished_mock(100);
        let path = wire::SUBSCRIBE_EVENTS_PATH;
        for (query, name) in [
            ("wantedCollections=app.bsky.feed.post", "InvalidRequest"),
            ("kinds=label", "InvalidRequest"),
            ("compress=true", "InvalidRequest"),
            ("zstdDictionary=1", "UnknownZstdDictionary"),
            ("cursor=1", "CursorTooOld"),
        ] {
            let r = http(&m, Wire::V2, &upgrade(&format!("{path}?{query}"), ""));
            assert!(r.starts_with("HTTP/1.1 400"), "{query}: {r}");
            assert!(
                r.contains("application/json") && r.contains(&format!("{{\"error\":\"{name}\"")),
                "{query}: {r}"
            );
        }
        let r = http(&m, Wire::V2, &upgrade(path, "Socket-Encoding: zstd\r\n"));
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        // The floor is the oldest retained seq: COUNT events, 100 kept (+1 offset).
        let r = http(&m, Wire::V2, &upgrade(&format!("{path}?cursor=1"), ""));
        assert!(r.contains("below lookback floor 501"), "{r}");
        // The subprotocol is echoed when offered.
        let r = http(
            &m,
            Wire::V2,
            &upgrade(path, "Sec-WebSocket-Protocol: xrpc.v1.json\r\n"),
        );
        assert!(
            r.contains("Sec-WebSocket-Protocol: xrpc.v1.json\r\n"),
            "{r}"
        );
        // No v2 on the legacy listener.
        assert!(http(&m, Wire::Legacy, &upgrade(path, "")).starts_with("HTTP/1.1 404"));
        // A µs cursor older than the history: #info OutdatedCursor, then the oldest event.
        let frames = read_n(
            &url(&m, Wire::V2, &format!("{path}?cursor=1000000000000000")),
            2,
        );
        assert_eq!(
            wire::parse_v2_frame(&frames[0].0).unwrap(),
            V2Frame::Info {
                name: "OutdatedCursor".into(),
                message: Some(
                    "requested timestamp cursor below retention floor; starting at seq 501".into()
                ),
            }
        );
        assert!(matches!(
            wire::parse_v2_frame(&frames[1].0).unwrap(),
            V2Frame::Event { seq: 501, .. }
        ));
        // The dictionary download.
        let r = http(
            &m,
            Wire::V2,
            &format!(
                "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
                wire::GET_ZSTD_DICTIONARY_PATH
            ),
        );
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("X-Zstd-Dictionary-Id: 20260811"),
            "{}",
            &r[..200]
        );
    }

    /// A reader that stops reading falls out of the history ring: on v2 it gets the terminal
    /// `ConsumerTooSlow` frame, then the close.
    #[test]
    fn v2_reader_left_behind_gets_consumer_too_slow() {
        let m = spawn(MockConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            rate: 50_000,
            seed: SEED,
            count: Some(40_000),
            history: 200,
            wire: Wire::V2,
            ..Default::default()
        })
        .unwrap();
        let (mut ws, _) =
            tungstenite::connect(url(&m, Wire::V2, wire::SUBSCRIBE_EVENTS_PATH)).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no end of stream");
            match ws.read() {
                Ok(Message::Text(t)) => last = Some(t.as_bytes().to_vec()),
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let last = last.expect("frames");
        match wire::parse_v2_frame(&last).unwrap() {
            V2Frame::Error { error, message } => {
                assert_eq!(error, "ConsumerTooSlow");
                assert!(
                    message
                        .unwrap_or_default()
                        .contains("reconnect with cursor=")
                );
            }
            other => panic!("last frame {other:?}"),
        }
    }

    /// `--sync-every`: those events are `#sync` messages on v2 (filterable by `kinds`) and
    /// seq gaps on `/subscribe`.
    #[test]
    fn sync_events_reach_v2_only() {
        let m = spawn(MockConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            rate: 5000,
            seed: SEED,
            count: Some(100),
            start_immediately: true,
            wire: Wire::V2,
            sync_every: Some(10),
            ..Default::default()
        })
        .unwrap();
        let syncs = read_n(
            &url(
                &m,
                Wire::V2,
                &format!("{}?cursor=1&kinds=sync", wire::SUBSCRIBE_EVENTS_PATH),
            ),
            3,
        );
        for (i, (frame, _)) in syncs.iter().enumerate() {
            let V2Frame::Event { seq, event, .. } = wire::parse_v2_frame(frame).unwrap() else {
                panic!("not an event");
            };
            assert_eq!(seq, 10 * (i as u64 + 1), "event numbers 9, 19, 29 (+1)");
            assert_eq!(event.kind(), MessageKind::Sync);
            let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
            assert!(v["payload"]["sync"]["blocks"]["$bytes"].is_string());
            assert_eq!(v["payload"]["sync"]["did"], v["payload"]["did"]);
        }
        let v1 = read_n(&url(&m, Wire::V2, "/subscribe?cursor=1"), 12);
        let seqs: Vec<u64> = v1
            .iter()
            .map(|(j, _)| {
                serde_json::from_slice::<serde_json::Value>(j).unwrap()["cursor"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13],
            "seq 10 is a #sync: a gap"
        );
    }
}
