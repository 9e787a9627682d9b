//! The upstream follower: keeps one WebSocket subscription to an upstream Jetstream alive and
//! hands every new event to the relay's writer, exactly once and in upstream order.
//!
//! It runs on its own thread with blocking sockets (no async runtime). Each connection is a
//! *session*. An upstream URL speaks one of two wires, told by its path ([`UpstreamWire`]):
//! `/subscribe` (the v1 JSON; with the upstream's seq as a `cursor` field on 2026 hosts and
//! other jetrelays, detected per event) or `/xrpc/network.bsky.jetstream.subscribeEvents`
//! (v2 frames, asked for with the v2 zstd dictionary and decompressed once; text if the
//! upstream refuses the dictionary). [`decode`] turns either into the same events: the v1 JSON
//! (converted once from v2), the upstream seq, `#sync` as its parts.
//!
//! When a session ends (close frame, error frame, error, stall, oversized frame) the follower
//! waits an exponentially growing, jittered delay and reconnects — to the same URL after a
//! session that appended events, to the next configured URL after a failed attempt or an empty
//! session — resuming as [`resume`] decides: exactly by seq on the URL that numbered the last
//! appended event (`?cursor=<seq>`, the re-delivered event dropped by seq), else by time with
//! a rewind and content de-duplication (legacy hosts; failover, since seqs are
//! instance-local), never appending events replayed from before the relay's first one.
//!
//! The decisions (resume plan, de-duplication, backoff, message decoding) are plain state,
//! unit-tested without sockets; the I/O around them is thin.
//!
//! Limitations worth knowing:
//! - DNS resolution is blocking and not bounded by `connect_timeout` (the system resolver's own
//!   timeouts apply); TCP connect, TLS and the WebSocket handshake are bounded and interruptible.
//! - A frame larger than [`MAX_UPSTREAM_MESSAGE_BYTES`] makes tungstenite fail the connection
//!   (it cannot skip a frame it refused to buffer). The follower counts it as skipped
//!   ([`SkipReason::TooLarge`]) and reconnects; an upstream that replays the same giant frame
//!   after every reconnect would keep the follower in backoff. Messages between
//!   [`MAX_EVENT_BYTES`] and that limit are read and skipped without dropping the connection.
//! - Once on a later URL the follower stays there while it works; it does not move back to an
//!   earlier (preferred) one by itself.

pub mod checkpoint;
mod connect;
pub mod decode;
mod dedup;
mod resume;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use tungstenite::Message;

pub use checkpoint::UrlFile;
pub use connect::{ZSTD_DICTIONARY_PARAM, subscribe_url};
pub use decode::{TrafficStats, UpstreamWire};

use crate::compress::Dictionary;
use crate::event::{EventError, EventMeta, MAX_EVENT_BYTES};
use connect::{ConnectError, ConnectOptions, Socket};
use decode::{Decoded, Decoder, FrameEncoding};
use resume::{Plan, SeqPosition, Tracker, Verdict};

/// Why: messages up to this size are read whole and skipped as too large without dropping the
/// connection; anything larger cannot be a Jetstream event and is refused by the WebSocket
/// reader before it is buffered.
pub const MAX_UPSTREAM_MESSAGE_BYTES: usize = 16 * MAX_EVENT_BYTES;

/// Why: tungstenite zero-fills this much of its read buffer before every socket read (128 KiB
/// by default). At a few hundred events a second each read brings one ~0.5 KiB event, so the
/// default put ~4.5 % of the follower's CPU into memset (profiled at 500 ev/s). 16 KiB still
/// takes dozens of events per read while catching up; a larger message takes several reads.
pub const UPSTREAM_READ_BUFFER_BYTES: usize = 16 * 1024;

/// Why: the longest the follower goes without checking the stop flag (socket read timeout and
/// sleep slice).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why: bounds memory of the dedup window even if upstream time_us jump around (16 bytes in
/// the FIFO + ~16 in the set per key: ≤ ~32 MB).
pub const MAX_DEDUP_KEYS: usize = 1_000_000;

/// Why: keys are kept this long beyond what a resume can replay (rewind plus twice the skew),
/// for reordering and for events stamped just before the reference.
pub const DEDUP_MARGIN: Duration = Duration::from_secs(30);

/// Default largest clock difference between upstream instances that failover absorbs (the
/// relay's `--upstream-skew`). Why 60 s: instances are NTP-synced to milliseconds; a minute
/// covers a badly drifting one, and costs only a minute of replay (deduplicated) per failover.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(60);

/// Why: an upstream stamping events far in the future is worth a warning, not one per event.
const OUTLIER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why: a session that appended events for this long proves the upstream healthy, so the next
/// reconnect starts again from the minimum backoff.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Why: a blocked write (ping, pong, close) must not hang the follower; the peer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why: at most one warning per skip reason in this interval, so a broken upstream cannot
/// flood the logs; suppressed occurrences are counted in the next warning.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Default rewind on reconnect (the relay's `--rewind` default).
pub const DEFAULT_REWIND: Duration = Duration::from_secs(5);
/// Default bound on TCP connect + TLS + WebSocket handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default silence before reconnecting; a ping is sent after half of it.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default first reconnect delay.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Default ceiling of the reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How to follow the upstream(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Upstream URLs (`ws://` or `wss://`; `…/subscribe` or
    /// `…/xrpc/network.bsky.jetstream.subscribeEvents`), in order of preference: the next one
    /// is tried when a connection attempt fails.
    pub urls: Vec<String>,
    /// How far before the last appended `time_us` a reconnect by time resumes, so that events
    /// delivered out of `time_us` order around the disconnect are not lost.
    pub rewind: Duration,
    /// Largest clock difference between two upstream instances that failover tolerates without
    /// loss or duplicates: a reconnect to another instance resumes this much earlier still, and
    /// duplicates are remembered long enough for a clock this far ahead.
    pub max_skew: Duration,
    /// Bound on TCP connect + TLS + WebSocket handshake.
    pub connect_timeout: Duration,
    /// No frame at all for this long → reconnect (a ping is sent after half of it).
    pub stall_timeout: Duration,
    /// Smallest reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Ask `subscribeEvents` upstreams for frames compressed with the v2 dictionary (~3× less
    /// ingest; decompressed once). Off: text frames.
    pub compress_v2: bool,
}

impl UpstreamConfig {
    /// A configuration with the default timings.
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            rewind: DEFAULT_REWIND,
            max_skew: DEFAULT_MAX_SKEW,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            compress_v2: true,
        }
    }
}

/// One event as the follower hands it to the sink, in upstream order, exactly once.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// What the relay indexes (did, indexed time, kind, collection, dedup key). `time_us` is
    /// the event's *indexed* time: its upstream time, bounded as [`crate::clock`] explains
    /// (the JSON keeps the upstream's value). A `#sync` event has `kind: EventKind::Sync`.
    pub meta: EventMeta<'a>,
    /// The event in the legacy v1 wire's JSON, without any `cursor` field (empty for `#sync`).
    pub v1_json: &'a [u8],
    /// `#sync` only: its parts, which the writer renders as v2 with the relay's own seq.
    pub sync: Option<&'a crate::wire::EventParts<'a>>,
    /// The upstream's sequence number for this event, when its wire carries one (v2, or
    /// /subscribe with `cursor` fields — including another jetrelay).
    pub upstream_seq: Option<u64>,
    /// When the upstream instance witnessed it (v2 `witnessedAt`, µs), when its wire says.
    pub witnessed_us: Option<i64>,
}

impl<'a> Incoming<'a> {
    /// A legacy v1 event (no seq, no witness time).
    pub fn v1(json: &'a [u8], meta: EventMeta<'a>) -> Incoming<'a> {
        Incoming {
            meta,
            v1_json: json,
            sync: None,
            upstream_seq: None,
            witnessed_us: None,
        }
    }
}

/// The error [`EventSink::append`] returns for an event it can never store, however often it
/// tries (its encoding failed; nothing was written): the follower skips the event
/// ([`SkipReason::Unconvertible`]) and goes on with the next one.
#[derive(Debug, thiserror::Error)]
#[error("the event cannot be encoded: {0}")]
pub struct UnconvertibleEvent(pub String);

/// Receives what the follower reads.
pub trait EventSink {
    /// Called once per accepted (valid, not duplicate) event, in upstream order. The sink
    /// retries what it can (a full disk); returning Err stops the follower, except an
    /// [`UnconvertibleEvent`], which skips the event.
    fn append(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()>;
    /// A message that was not appended. Logged by the follower (rate-limited), counted by the
    /// sink.
    fn skipped(&mut self, reason: SkipReason, detail: &str);
    /// Connection lifecycle, for metrics and health.
    fn connection(&mut self, state: ConnectionState);
}

/// Where a restarted relay resumes: the URL it was following and the last upstream seq it
/// appended from it (the relay restores it from the index and a small state file).
///
/// The pair must belong together: `seq` numbered by `url`, i.e. the `upstream_seq` of the last
/// appended event and the [`ConnectionState::Connected`] `upstream` of the session that
/// delivered it (a URL recorded at connect time, before that session appended anything, does
/// not go with the previous session's seq). A mismatch is caught by the first event of the
/// resumed session (it must be the last appended event, by seq and content) and costs a
/// reconnect by time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamCheckpoint {
    /// The upstream URL exactly as configured (`--upstream`).
    pub url: String,
    /// The upstream's seq of the last appended event.
    pub seq: u64,
}

/// Why an upstream message was not appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Not UTF-8, not JSON, not an object, or a duplicated indexed field.
    InvalidJson,
    /// A required field is absent or has the wrong type.
    MissingField,
    /// Longer than [`MAX_EVENT_BYTES`].
    TooLarge,
    /// A binary WebSocket message where the session expects text (a `/subscribe` upstream, or
    /// `subscribeEvents` without compression).
    Binary,
    /// Already appended (overlap after a reconnect or failover).
    Duplicate,
    /// `kind` (v1) or the message `$type` (v2) is not one the relay knows.
    UnknownKind,
    /// A new event a resume by time replayed from before the relay's first appended event:
    /// appending it would put it after newer events.
    BeforeHistory,
    /// A compressed `subscribeEvents` frame that does not decompress with the v2 dictionary.
    Undecodable,
    /// A valid event the relay cannot re-encode for its clients (with its `cursor`, or as v2):
    /// a time outside years 0000–9999, a non-object `record`, a non-string `cid`, an escaped
    /// top-level key. Skipped so that one such event cannot stop ingestion.
    Unconvertible,
}

impl SkipReason {
    /// Stable lower-case name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::InvalidJson => "invalid_json",
            SkipReason::MissingField => "missing_field",
            SkipReason::TooLarge => "too_large",
            SkipReason::Binary => "binary",
            SkipReason::Duplicate => "duplicate",
            SkipReason::UnknownKind => "unknown_kind",
            SkipReason::BeforeHistory => "before_history",
            SkipReason::Undecodable => "undecodable",
            SkipReason::Unconvertible => "unconvertible",
        }
    }

    /// All reasons, for pre-registering metrics.
    pub const ALL: [SkipReason; 9] = [
        SkipReason::InvalidJson,
        SkipReason::MissingField,
        SkipReason::TooLarge,
        SkipReason::Binary,
        SkipReason::Duplicate,
        SkipReason::UnknownKind,
        SkipReason::BeforeHistory,
        SkipReason::Undecodable,
        SkipReason::Unconvertible,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

impl From<&EventError> for SkipReason {
    fn from(e: &EventError) -> Self {
        match e {
            EventError::TooLarge(_) => SkipReason::TooLarge,
            EventError::InvalidJson(_) => SkipReason::InvalidJson,
            EventError::MissingField(_) | EventError::InvalidField(_) => SkipReason::MissingField,
            EventError::UnknownKind(_) => SkipReason::UnknownKind,
        }
    }
}

/// Connection lifecycle reported to the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// The WebSocket handshake with `url` (including any cursor) succeeded.
    Connected {
        /// The exact URL connected to.
        url: String,
        /// The configured upstream URL it was made from: what numbers this session's
        /// `upstream_seq`s ([`UpstreamCheckpoint::url`]).
        upstream: String,
    },
    /// A session ended, or a connection attempt failed.
    Disconnected {
        /// The URL of the session or attempt.
        url: String,
        /// Human-readable cause.
        reason: String,
    },
    /// About to wait `delay` before reconnect attempt number `attempt` (1-based, consecutive).
    Reconnecting {
        /// Consecutive reconnects without a healthy session in between.
        attempt: u32,
        /// The jittered delay about to be waited.
        delay: Duration,
    },
}

/// How far back appended events must be remembered: what a resume can replay (the rewind plus
/// the skew, and the skew again when the new instance's clock is ahead), plus a margin.
fn dedup_window(config: &UpstreamConfig) -> Duration {
    config
        .rewind
        .saturating_add(config.max_skew.saturating_mul(2))
        .saturating_add(DEDUP_MARGIN)
}

fn duration_us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Exponential backoff with full jitter: attempt `n` (0-based) waits a uniform delay in
/// `[min, min(max, min·2ⁿ)]`.
#[derive(Debug)]
struct Backoff {
    /// Smallest delay.
    min: Duration,
    /// Largest delay.
    max: Duration,
    /// Consecutive failures so far.
    attempt: u32,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.min);
        let span_ns = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        self.min + Duration::from_nanos(rng.u64(0..=span_ns))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Rate-limits skip warnings per reason.
#[derive(Debug, Default)]
struct SkipLog {
    /// Per reason: when the last warning was logged, and how many were suppressed since.
    last: [Option<(Instant, u64)>; SkipReason::ALL.len()],
}

impl SkipLog {
    fn record(&mut self, reason: SkipReason, detail: &str) {
        if matches!(reason, SkipReason::Duplicate | SkipReason::BeforeHistory) {
            // Expected after reconnects (and summarised by the resume's own log line).
            debug!(
                reason = reason.as_str(),
                detail, "skipped replayed upstream event"
            );
            return;
        }
        let now = Instant::now();
        let slot = &mut self.last[reason.index()];
        match slot {
            Some((at, suppressed)) if now.duration_since(*at) < SKIP_LOG_INTERVAL => {
                *suppressed += 1;
            }
            _ => {
                let suppressed = slot.map_or(0, |(_, s)| s);
                warn!(
                    reason = reason.as_str(),
                    detail,
                    suppressed_since_last_warning = suppressed,
                    "skipped upstream message"
                );
                *slot = Some((now, 0));
            }
        }
    }
}

/// Why a session ended.
enum SessionEnd {
    /// The stop flag was raised.
    Stopped,
    /// The sink failed; the follower stops with this error.
    SinkFailed(anyhow::Error),
    /// The connection is gone (or the upstream ended it with an error frame): reconnect after
    /// the backoff.
    Lost(String),
    /// The upstream contradicted the exact resume position (see [`resume`]): reconnect to the
    /// same URL at once, by time.
    Resync(String),
}

/// What one message did to the session.
enum Flow {
    /// Keep reading.
    Continue,
    /// An event was appended.
    Appended,
    /// End the session (see [`SessionEnd`]).
    End(SessionEnd),
}

/// Logs far-future upstream times, at most once per [`OUTLIER_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct OutlierLog {
    /// When one was last logged.
    last: Option<Instant>,
}

impl OutlierLog {
    fn record(&mut self, meta: &EventMeta<'_>, indexed: i64, reference: Option<i64>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < OUTLIER_LOG_INTERVAL)
        {
            return;
        }
        self.last = Some(Instant::now());
        warn!(
            did = %meta.did,
            time_us = meta.time_us,
            indexed_time_us = indexed,
            reference_time_us = reference,
            "upstream event stamped far ahead of the upstream's recent events: appended, but \
             indexed (cursors, resume point) at the tolerance"
        );
    }
}

/// Logs the upstream's `#info` frames, at most one line per [`OUTLIER_LOG_INTERVAL`]: an
/// upstream decides how many it sends, and must not be able to flood the relay's log.
#[derive(Debug, Default)]
struct InfoLog {
    /// When one was last logged, and how many were not logged since.
    last: Option<(Instant, u64)>,
}

impl InfoLog {
    fn record(&mut self, name: &str, message: &str) {
        if let Some((at, suppressed)) = &mut self.last
            && at.elapsed() < OUTLIER_LOG_INTERVAL
        {
            *suppressed += 1;
            return;
        }
        let suppressed = self.last.map_or(0, |(_, s)| s);
        self.last = Some((Instant::now(), 0));
        if name == "OutdatedCursor" {
            warn!(
                message,
                suppressed_since_last = suppressed,
                "the upstream clamped the resume cursor to its oldest event: events before it \
                 are missing"
            );
        } else {
            info!(
                name,
                message,
                suppressed_since_last = suppressed,
                "upstream #info"
            );
        }
    }
}

/// Follows the upstream(s) and feeds a sink. See the module documentation.
pub struct Follower {
    /// Where and how to connect.
    config: UpstreamConfig,
    /// Resume position, clock, de-duplication memory.
    tracker: Tracker,
    /// Turns messages into events.
    decoder: Decoder,
    /// Per configured URL: how its v2 frames are asked for (text after a refused dictionary).
    encodings: Vec<FrameEncoding>,
    /// When the last event was appended (for the clock's monotonic timeline).
    last_append: Option<Instant>,
    /// Reconnect delay state.
    backoff: Backoff,
    /// Jitter source.
    rng: fastrand::Rng,
    /// Index into `config.urls` of the URL the next connection goes to.
    current_url: usize,
    /// TLS client configuration, built on the first `wss://` connect.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Largest WebSocket message read whole (overridable in tests).
    max_message_bytes: usize,
    /// Rate limiter for skip warnings.
    skip_log: SkipLog,
    /// Rate limiter for far-future warnings.
    outlier_log: OutlierLog,
    /// Rate limiter for `#info` lines.
    info_log: InfoLog,
}

impl Follower {
    /// A follower with no resume point: the first connection is live (no cursor).
    pub fn new(config: UpstreamConfig) -> Self {
        let window = dedup_window(&config);
        let backoff = Backoff::new(config.backoff_min, config.backoff_max);
        let encodings = config
            .urls
            .iter()
            .map(|url| match UpstreamWire::of_url(url) {
                UpstreamWire::V2 if config.compress_v2 => FrameEncoding::Zstd,
                _ => FrameEncoding::Text,
            })
            .collect();
        Self {
            tracker: Tracker::new(config.rewind, config.max_skew, window),
            config,
            decoder: Decoder::default(),
            encodings,
            last_append: None,
            backoff,
            rng: fastrand::Rng::new(),
            current_url: 0,
            tls: None,
            max_message_bytes: MAX_UPSTREAM_MESSAGE_BYTES,
            skip_log: SkipLog::default(),
            outlier_log: OutlierLog::default(),
            info_log: InfoLog::default(),
        }
    }

    /// How far back (in `time_us`) the relay must remember appended events for a restart to
    /// resume without duplicates: what [`Follower`] keeps in its dedup window.
    pub fn dedup_window(&self) -> Duration {
        dedup_window(&self.config)
    }

    /// Seeds the resume point and dedup memory after a relay restart with the events appended
    /// within [`Follower::dedup_window`] of the newest: `(indexed time_us, dedup key)` in log
    /// order. The clock learns the raw `time_us` of the last of them (`recent_raw_times`).
    ///
    /// With a `checkpoint` whose URL is one of the configured ones, the first connection goes
    /// to that URL and resumes exactly from its seq. Otherwise (no checkpoint, or a URL no
    /// longer configured: seqs are instance-local) it resumes by time with the rewind and the
    /// skew, de-duplicating by content, and says so in the log.
    pub fn resume_from(
        &mut self,
        recent_raw_times: impl IntoIterator<Item = i64>,
        recent_keys: impl IntoIterator<Item = (i64, u64)>,
        checkpoint: Option<UpstreamCheckpoint>,
    ) {
        let position = checkpoint.and_then(|c| {
            match self.config.urls.iter().position(|u| *u == c.url) {
                Some(url) => {
                    info!(
                        url = c.url,
                        seq = c.seq,
                        "restart: resuming exactly from the upstream seq appended last"
                    );
                    self.current_url = url;
                    Some(SeqPosition { url, seq: c.seq })
                }
                None => {
                    warn!(
                        url = c.url,
                        seq = c.seq,
                        "restart: the last appended seq was numbered by an upstream that is not \
                         configured any more (seqs are instance-local): resuming by time with \
                         rewind, skew and content de-duplication"
                    );
                    None
                }
            }
        });
        self.tracker
            .resume_from(recent_raw_times, recent_keys, position);
    }

    /// The upstream clock's reference (the robust newest `time_us` appended), if any.
    pub fn reference_time_us(&self) -> Option<i64> {
        self.tracker.reference_time_us()
    }

    /// Runs until `stop` becomes true (checked at least every [`POLL_INTERVAL`]) or the sink
    /// errors.
    pub fn run(&mut self, sink: &mut dyn EventSink, stop: &AtomicBool) -> anyhow::Result<()> {
        anyhow::ensure!(!self.config.urls.is_empty(), "no upstream URL configured");
        while !stop.load(Ordering::Relaxed) {
            crate::liveness::beat();
            let url_index = self.current_url % self.config.urls.len();
            let base = self.config.urls[url_index].clone();
            let wire = UpstreamWire::of_url(&base);
            let encoding = match wire {
                UpstreamWire::V2 => self.encodings[url_index],
                UpstreamWire::V1 => FrameEncoding::Text,
            };
            let plan = self.tracker.plan(url_index);
            if let Plan::Time {
                cursor,
                instead_of: Some(p),
                ..
            } = plan
            {
                info!(
                    url = base,
                    cursor,
                    last_seq = p.seq,
                    numbered_by = self.config.urls[p.url],
                    "failing over: the last appended seq is another upstream's (seqs are \
                     instance-local), so this one resumes by time with rewind, skew and \
                     content de-duplication"
                );
            }
            let dictionary = (encoding == FrameEncoding::Zstd).then(|| Dictionary::V2.id());
            let url = connect::session_url(&base, plan.cursor(), dictionary);
            let connected = {
                // DNS resolution is not bounded by the connect timeout (see the module
                // documentation): a stated wait, not a wedge.
                let _idle = crate::liveness::idle("connecting to the upstream");
                let options = ConnectOptions {
                    timeout: self.config.connect_timeout,
                    max_message_bytes: self.max_message_bytes,
                    tls: &mut self.tls,
                };
                connect::connect(&url, options, stop)
            };
            let reason = match connected {
                Ok(mut socket) => {
                    info!(url, "connected to upstream");
                    sink.connection(ConnectionState::Connected {
                        url: url.clone(),
                        upstream: base.clone(),
                    });
                    self.tracker.start_session(url_index, plan);
                    self.decoder.take_stats();
                    let started = Instant::now();
                    let (end, appended) = self.session(&mut socket, sink, stop, wire, encoding);
                    let traffic = self.decoder.take_stats();
                    info!(
                        url,
                        appended,
                        messages = traffic.messages,
                        wire_bytes = traffic.wire_bytes,
                        frame_bytes = traffic.frame_bytes,
                        seconds = started.elapsed().as_secs(),
                        "upstream session ended"
                    );
                    if appended > 0 && started.elapsed() >= HEALTHY_SESSION {
                        self.backoff.reset();
                    }
                    if appended == 0 && !matches!(end, SessionEnd::Resync(_)) {
                        // Nothing came through: try the next upstream.
                        self.current_url = url_index + 1;
                    }
                    match end {
                        SessionEnd::Stopped => {
                            let _ = socket.close(None);
                            return Ok(());
                        }
                        SessionEnd::SinkFailed(e) => {
                            let _ = socket.close(None);
                            return Err(e.context("event sink failed"));
                        }
                        SessionEnd::Resync(reason) => {
                            let _ = socket.close(None);
                            warn!(
                                url,
                                reason,
                                "upstream contradicts the exact resume position (renumbered, \
                                 or another instance behind this URL): reconnecting by time"
                            );
                            sink.connection(ConnectionState::Disconnected { url, reason });
                            continue;
                        }
                        SessionEnd::Lost(reason) => reason,
                    }
                }
                Err(e) if stop.load(Ordering::Relaxed) => {
                    debug!(error = %e, "connection attempt abandoned: stopping");
                    return Ok(());
                }
                Err(e) => {
                    let reason = e.to_string();
                    if self.adjust_after_refusal(&e, url_index, &plan) {
                        // Retry at once with what the refusal asked for.
                        sink.connection(ConnectionState::Disconnected { url, reason });
                        continue;
                    }
                    self.current_url = url_index + 1;
                    reason
                }
            };
            warn!(url, reason, "upstream connection lost");
            sink.connection(ConnectionState::Disconnected { url, reason });
            let delay = self.backoff.next_delay(&mut self.rng);
            sink.connection(ConnectionState::Reconnecting {
                attempt: self.backoff.attempt,
                delay,
            });
            sleep_unless_stopped(delay, stop);
        }
        Ok(())
    }

    /// After a refused upgrade: whether the refusal names something the next attempt can do
    /// without (the dictionary, a seq cursor below the upstream's retention); if so, that is
    /// dropped and the same URL is retried at once.
    fn adjust_after_refusal(&mut self, e: &ConnectError, url_index: usize, plan: &Plan) -> bool {
        let ConnectError::Refused {
            xrpc_error: Some(error),
            message,
            ..
        } = e
        else {
            return false;
        };
        match error.as_str() {
            "UnknownZstdDictionary" if self.encodings[url_index] == FrameEncoding::Zstd => {
                warn!(
                    url = self.config.urls[url_index],
                    message,
                    "the upstream does not know the v2 zstd dictionary: following it with \
                     text frames"
                );
                self.encodings[url_index] = FrameEncoding::Text;
                true
            }
            "CursorTooOld" if matches!(plan, Plan::Seq(_)) => {
                warn!(
                    url = self.config.urls[url_index],
                    message,
                    "the upstream no longer has the seq appended last (beyond its retention): \
                     events after it and before the upstream's oldest are lost; resuming by \
                     time"
                );
                self.tracker.forget_seq();
                true
            }
            _ => false,
        }
    }

    /// Reads one connection until it ends; returns why, and how many events it appended.
    fn session(
        &mut self,
        socket: &mut Socket,
        sink: &mut dyn EventSink,
        stop: &AtomicBool,
        wire: UpstreamWire,
        encoding: FrameEncoding,
    ) -> (SessionEnd, u64) {
        let mut appended = 0u64;
        let mut last_frame = Instant::now();
        let mut pinged = false;
        loop {
            crate::liveness::beat();
            if stop.load(Ordering::Relaxed) {
                return (SessionEnd::Stopped, appended);
            }
            let message = match socket.read() {
                Ok(m) => m,
                // A signal (a debugger attaching, a handler elsewhere in the process) interrupts
                // the read without harming the connection: tungstenite keeps partial frames,
                // so the read is simply retried.
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                    continue;
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let silent = last_frame.elapsed();
                    if silent >= self.config.stall_timeout {
                        let reason = format!("no frame for {silent:?} (stalled)");
                        return (SessionEnd::Lost(reason), appended);
                    }
                    if !pinged && silent >= self.config.stall_timeout / 2 {
                        pinged = true;
                        if let Err(e) = socket.send(Message::Ping(Default::default()))
                            && !is_timeout(&e)
                        {
                            return (SessionEnd::Lost(format!("ping failed: {e}")), appended);
                        }
                    }
                    continue;
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    let detail = format!("{e}; reconnecting");
                    self.skip_log.record(SkipReason::TooLarge, &detail);
                    sink.skipped(SkipReason::TooLarge, &detail);
                    return (SessionEnd::Lost(format!("oversized frame: {e}")), appended);
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return (SessionEnd::Lost("connection closed".to_owned()), appended);
                }
                Err(e) => return (SessionEnd::Lost(e.to_string()), appended),
            };
            pinged = false;
            if let Message::Close(frame) = &message {
                // Let tungstenite send the close reply; the session is over either way.
                let _ = socket.flush();
                let reason = match frame {
                    Some(f) => format!("closed by upstream: {} {}", u16::from(f.code), f.reason),
                    None => "closed by upstream".to_owned(),
                };
                return (SessionEnd::Lost(reason), appended);
            }
            match self.ingest(&message, sink, wire, encoding) {
                Flow::Continue => {}
                Flow::Appended => appended += 1,
                Flow::End(end) => return (end, appended),
            }
            // Counted from after the sink, which may have waited (a full disk): that was not
            // upstream silence.
            last_frame = Instant::now();
        }
    }

    /// Decodes one message and appends it if it is a new event.
    fn ingest(
        &mut self,
        message: &Message,
        sink: &mut dyn EventSink,
        wire: UpstreamWire,
        encoding: FrameEncoding,
    ) -> Flow {
        let event = match self.decoder.decode(wire, encoding, message) {
            Decoded::Event(event) => event,
            Decoded::Control => return Flow::Continue,
            Decoded::Skip { reason, detail } => {
                self.skip_log.record(reason, &detail);
                sink.skipped(reason, &detail);
                return Flow::Continue;
            }
            Decoded::Info { name, message } => {
                let message = message.unwrap_or_default();
                if name == "FutureCursor" && self.tracker.resumed_by_seq() {
                    self.tracker.forget_seq();
                    let reason = format!("#info FutureCursor on a resume by seq: {message}");
                    return Flow::End(SessionEnd::Resync(reason));
                }
                self.info_log.record(&name, &message);
                return Flow::Continue;
            }
            Decoded::Error { error, message } => {
                let reason = format!(
                    "upstream error frame {error}: {}",
                    message.unwrap_or_default()
                );
                return Flow::End(SessionEnd::Lost(reason));
            }
        };
        let detail = || {
            format!(
                "{} {} time_us={} seq={:?}",
                event.meta.kind, event.meta.did, event.meta.time_us, event.upstream_seq
            )
        };
        match self.tracker.judge(&event.meta, event.upstream_seq) {
            Verdict::Append => {}
            Verdict::Duplicate => {
                let detail = detail();
                self.skip_log.record(SkipReason::Duplicate, &detail);
                sink.skipped(SkipReason::Duplicate, &detail);
                return Flow::Continue;
            }
            Verdict::BeforeHistory => {
                let detail = detail();
                self.skip_log.record(SkipReason::BeforeHistory, &detail);
                sink.skipped(SkipReason::BeforeHistory, &detail);
                return Flow::Continue;
            }
            Verdict::Renumbered(why) => {
                self.tracker.forget_seq();
                return Flow::End(SessionEnd::Resync(why));
            }
        }
        let raw = event.meta.time_us;
        let since = self.last_append.map_or(Duration::ZERO, |t| t.elapsed());
        let indexed = self.tracker.indexed_time(raw, since);
        if indexed != raw {
            self.outlier_log
                .record(&event.meta, indexed, self.tracker.reference_time_us());
        }
        let mut meta = event.meta;
        meta.time_us = indexed;
        let incoming = Incoming {
            meta,
            v1_json: event.v1_json,
            sync: event.sync.as_ref(),
            upstream_seq: event.upstream_seq,
            witnessed_us: event.witnessed_us,
        };
        if let Err(e) = sink.append(&incoming) {
            if let Some(UnconvertibleEvent(why)) = e.downcast_ref::<UnconvertibleEvent>() {
                // Nothing was appended: the event leaves no trace, the next one goes on.
                let m = &incoming.meta;
                let detail = format!(
                    "{} {} time_us={} seq={:?}: {why}",
                    m.kind, m.did, m.time_us, incoming.upstream_seq
                );
                self.skip_log.record(SkipReason::Unconvertible, &detail);
                sink.skipped(SkipReason::Unconvertible, &detail);
                return Flow::Continue;
            }
            return Flow::End(SessionEnd::SinkFailed(e));
        }
        // Only what was appended is remembered: a failed append leaves no trace to skip later.
        self.tracker
            .appended(&incoming.meta, raw, since, incoming.upstream_seq);
        self.last_append = Some(Instant::now());
        Flow::Appended
    }
}

fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Sleeps `delay`, waking every [`POLL_INTERVAL`] to check `stop` (and to report progress).
fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    let until = Instant::now() + delay;
    while !stop.load(Ordering::Relaxed) {
        crate::liveness::beat();
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL_INTERVAL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;
    use std::collections::HashSet;
    use std::net::TcpListener;
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::thread;
    use tungstenite::WebSocket;
    use tungstenite::handshake::server::{Request, Response};

    const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");

    /// Feeds `events` (JSON) to the follower as if instance `url` sent them.
    fn feed(f: &mut Follower, sink: &mut dyn EventSink, url: usize, events: &[String]) {
        f.tracker.start_session(url, Plan::Live);
        for e in events {
            let message = Message::text(e.clone());
            let flow = f.ingest(&message, sink, UpstreamWire::V1, FrameEncoding::Text);
            assert!(matches!(flow, Flow::Appended | Flow::Continue));
        }
    }

    #[test]
    fn an_outlier_moves_neither_the_resume_point_nor_the_dedup_window() {
        let t0: i64 = 1_783_175_888_000_000;
        let record = Arc::new(Mutex::new(Record::default()));
        let mut sink = SharedSink(record.clone());
        let mut f = Follower::new(test_config("ws://h".into()));
        let normal: Vec<String> = (0..60).map(|i| event(i, t0 + i as i64 * 10_000)).collect();
        feed(&mut f, &mut sink, 0, &normal);
        let before = f.reference_time_us().unwrap();
        // One event an hour ahead, one from the epoch.
        let future = event(60, t0 + 3_600_000_000);
        let past = event(61, 0);
        feed(&mut f, &mut sink, 0, &[future.clone(), past.clone()]);
        assert!(f.reference_time_us().unwrap() <= t0 + 590_000);
        assert!(f.reference_time_us().unwrap() >= before);
        let Plan::Time { cursor, .. } = f.tracker.plan(0) else {
            panic!("a resume by time")
        };
        assert!(
            cursor < t0 + 600_000,
            "the resume point did not jump: {cursor}"
        );
        // Both were appended (nothing is lost), the future one indexed within the tolerance.
        let r = record.lock().unwrap();
        assert_eq!(r.appended.len(), 62);
        let indexed = *r.indexed.last().unwrap();
        assert_eq!(indexed, 0, "the far past is appended as stamped");
        let future_indexed = r.indexed[60];
        assert!(
            future_indexed <= t0 + 600_000 + crate::clock::FUTURE_TOLERANCE.as_micros() as i64
                && future_indexed > t0,
            "{future_indexed}"
        );
        drop(r);
        // The duplicate memory survived: the first events replayed again are duplicates.
        feed(&mut f, &mut sink, 0, &normal[..5]);
        let r = record.lock().unwrap();
        assert_eq!(r.appended.len(), 62);
        assert_eq!(r.skipped, vec![SkipReason::Duplicate; 5]);
    }

    /// Failover between instances whose clocks differ by 45 s (more than the rewind and than
    /// the old fixed dedup margin): every event exactly once, in order, both ways.
    #[test]
    fn failover_between_skewed_upstreams_loses_and_duplicates_nothing() {
        for skew_s in [45i64, -45] {
            let t0: i64 = 1_783_175_888_000_000;
            let times: Vec<i64> = (0..200).map(|i| t0 + i * 500_000).collect();
            let a = TcpListener::bind("127.0.0.1:0").unwrap();
            let b = TcpListener::bind("127.0.0.1:0").unwrap();
            let urls = vec![
                format!("ws://{}/subscribe", a.local_addr().unwrap()),
                format!("ws://{}/subscribe", b.local_addr().unwrap()),
            ];
            let uris = Arc::new(Mutex::new(Vec::new()));
            let server = {
                let (uris, times) = (uris.clone(), times.clone());
                thread::spawn(move || {
                    // Instance A: the first 150 events, then it goes away.
                    let mut ws = accept(&a, &uris);
                    for (i, t) in times[..150].iter().enumerate() {
                        ws.send(Message::text(
                            event(i % 40, *t).replace("\"rkey\":\"", &format!("\"rkey\":\"k{i}x")),
                        ))
                        .unwrap();
                    }
                    ws.close(None).unwrap();
                    while ws.read().is_ok() {}
                    drop(a);
                    // Instance B stamps every event `skew_s` later, and replays from the cursor.
                    let mut ws = accept(&b, &uris);
                    let uri = uris.lock().unwrap()[1].clone();
                    let cursor: i64 = uri.rsplit_once("cursor=").unwrap().1.parse().unwrap();
                    for (i, t) in times.iter().enumerate() {
                        let tb = t + skew_s * 1_000_000;
                        if tb >= cursor {
                            ws.send(Message::text(
                                event(i % 40, tb)
                                    .replace("\"rkey\":\"", &format!("\"rkey\":\"k{i}x")),
                            ))
                            .unwrap();
                        }
                    }
                    ws.get_mut()
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    while ws.read().is_ok() {}
                })
            };
            let mut config = test_config(urls[0].clone());
            config.urls = urls;
            config.max_skew = Duration::from_secs(50);
            let record = Arc::new(Mutex::new(Record::default()));
            let (stop, follower) = spawn_follower(Follower::new(config), &record);
            wait_for(&record, "the last event", |r| {
                r.appended.iter().any(|e| e.contains("\"rkey\":\"k199x"))
            });
            stop.store(true, Ordering::Relaxed);
            follower.join().unwrap().unwrap();
            server.join().unwrap();
            let r = record.lock().unwrap();
            let order: Vec<usize> = r
                .appended
                .iter()
                .map(|e| {
                    let k = e.split("\"rkey\":\"k").nth(1).unwrap();
                    k[..k.find('x').unwrap()].parse().unwrap()
                })
                .collect();
            assert_eq!(
                order,
                (0..200).collect::<Vec<_>>(),
                "skew {skew_s} s: every event once, in order"
            );
        }
    }

    #[test]
    fn duplicates_are_skipped_across_resume() {
        struct Count(usize, usize);
        impl EventSink for Count {
            fn append(&mut self, _: &Incoming<'_>) -> anyhow::Result<()> {
                self.0 += 1;
                Ok(())
            }
            fn skipped(&mut self, reason: SkipReason, _: &str) {
                assert_eq!(reason, SkipReason::Duplicate);
                self.1 += 1;
            }
            fn connection(&mut self, _: ConnectionState) {}
        }
        let lines: Vec<&str> = SAMPLE.lines().collect();
        let metas: Vec<EventMeta<'_>> = lines
            .iter()
            .map(|l| parse_event(l.as_bytes()).unwrap())
            .collect();
        let mut f = Follower::new(UpstreamConfig::new(vec!["ws://h".into()]));
        f.resume_from(
            metas[..10].iter().map(|m| m.time_us),
            metas[..10].iter().map(|m| (m.time_us, m.dedup_key)),
            None,
        );
        let mut sink = Count(0, 0);
        let events: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        feed(&mut f, &mut sink, 0, &events);
        assert_eq!((sink.0, sink.1), (lines.len() - 10, 10));
        let all = crate::clock::UpstreamClock::seeded(metas.iter().map(|m| m.time_us));
        assert_eq!(f.reference_time_us(), all.reference());
    }

    #[test]
    fn backoff_grows_with_jitter_within_bounds_and_resets() {
        let min = Duration::from_millis(250);
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(min, max);
        let mut rng = fastrand::Rng::with_seed(7);
        assert_eq!(b.next_delay(&mut rng), min, "first attempt: ceiling == min");
        let mut ceilings_hit_max = false;
        for attempt in 1..200u32 {
            let d = b.next_delay(&mut rng);
            let ceiling = min
                .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
                .min(max);
            assert!(
                d >= min && d <= ceiling,
                "attempt {attempt}: {d:?} not in [{min:?}, {ceiling:?}]"
            );
            ceilings_hit_max |= ceiling == max;
        }
        assert!(ceilings_hit_max);
        // Jitter actually spreads delays at the ceiling.
        let spread: HashSet<u128> = (0..20)
            .map(|_| b.next_delay(&mut rng).as_millis())
            .collect();
        assert!(spread.len() > 10, "{spread:?}");
        b.reset();
        assert_eq!(b.next_delay(&mut rng), min);
        // Degenerate configuration: max below min behaves as a constant delay.
        let mut c = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(c.next_delay(&mut rng), Duration::from_secs(2));
        assert_eq!(c.next_delay(&mut rng), Duration::from_secs(2));
    }

    #[test]
    fn skip_reasons_map_event_errors() {
        assert_eq!(
            SkipReason::from(&EventError::TooLarge(1)),
            SkipReason::TooLarge
        );
        assert_eq!(
            SkipReason::from(&EventError::InvalidField("x")),
            SkipReason::MissingField
        );
        assert_eq!(
            SkipReason::from(&EventError::UnknownKind("x".into())),
            SkipReason::UnknownKind
        );
        let names: HashSet<&str> = SkipReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), SkipReason::ALL.len());
        for (i, r) in SkipReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "ALL is in declaration order");
        }
    }

    /// What the follower reported, shared with the test thread.
    #[derive(Default)]
    struct Record {
        appended: Vec<String>,
        /// The indexed `time_us` of each appended event.
        indexed: Vec<i64>,
        skipped: Vec<SkipReason>,
        states: Vec<ConnectionState>,
        /// The upstream seq of each appended event.
        seqs: Vec<Option<u64>>,
    }

    struct SharedSink(Arc<Mutex<Record>>);

    impl EventSink for SharedSink {
        fn append(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()> {
            let mut parsed = parse_event(ev.v1_json).unwrap();
            parsed.time_us = ev.meta.time_us;
            assert_eq!(parsed, ev.meta, "only the time is the indexed one");
            let mut r = self.0.lock().unwrap();
            r.appended.push(String::from_utf8(ev.v1_json.to_vec())?);
            r.indexed.push(ev.meta.time_us);
            r.seqs.push(ev.upstream_seq);
            Ok(())
        }
        fn skipped(&mut self, reason: SkipReason, _: &str) {
            self.0.lock().unwrap().skipped.push(reason);
        }
        fn connection(&mut self, state: ConnectionState) {
            self.0.lock().unwrap().states.push(state);
        }
    }

    fn test_config(url: String) -> UpstreamConfig {
        UpstreamConfig {
            urls: vec![url],
            rewind: Duration::from_secs(1),
            max_skew: Duration::ZERO,
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            compress_v2: true,
        }
    }

    /// Sample event `i` re-stamped with `time_us`.
    fn event(i: usize, time_us: i64) -> String {
        let line = SAMPLE.lines().nth(i).unwrap();
        let old = parse_event(line.as_bytes()).unwrap().time_us;
        line.replacen(
            &format!("\"time_us\":{old}"),
            &format!("\"time_us\":{time_us}"),
            1,
        )
    }

    /// Accepts one WebSocket on `listener`, recording the request URI.
    // The callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    fn accept(listener: &TcpListener, uris: &Mutex<Vec<String>>) -> WebSocket<TcpStream> {
        let (stream, _) = listener.accept().unwrap();
        tungstenite::accept_hdr(stream, |req: &Request, resp: Response| {
            assert_eq!(
                req.headers()["user-agent"],
                concat!("jetrelay/", env!("CARGO_PKG_VERSION"))
            );
            uris.lock().unwrap().push(req.uri().to_string());
            Ok(resp)
        })
        .unwrap()
    }

    /// Reads an HTTP request head byte by byte (nothing past it), for servers that answer
    /// the upgrade by hand.
    fn read_request_head(stream: &mut TcpStream) -> String {
        use std::io::Read;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Waits (bounded) until `done` holds for the record.
    fn wait_for(record: &Mutex<Record>, what: &str, done: impl Fn(&Record) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&record.lock().unwrap()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_follower(
        follower: Follower,
        record: &Arc<Mutex<Record>>,
    ) -> (Arc<AtomicBool>, thread::JoinHandle<anyhow::Result<()>>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, record2) = (stop.clone(), record.clone());
        let handle = thread::spawn(move || {
            let mut follower = follower;
            follower.run(&mut SharedSink(record2), &stop2)
        });
        (stop, handle)
    }

    #[test]
    fn follows_reconnects_with_cursor_and_delivers_each_event_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "ws://{}/subscribe?wantedCollections=app.bsky.feed.like",
            listener.local_addr().unwrap()
        );
        let t0: i64 = 1_783_175_888_000_000;
        // Non-monotonic like real traffic: the max is the last one, 1.2 s after t0.
        let times_ms = [0i64, 300, 900, 600, 1200, 1500, 1400];
        let events: Vec<String> = times_ms
            .iter()
            .enumerate()
            .map(|(i, ms)| event(i, t0 + ms * 1000))
            .collect();
        let uris = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let (events, uris) = (events.clone(), uris.clone());
            thread::spawn(move || {
                let mut ws = accept(&listener, &uris);
                for (i, e) in events[..5].iter().enumerate() {
                    ws.send(Message::text(e.clone())).unwrap();
                    match i {
                        1 => ws.send(Message::text("{not json")).unwrap(),
                        2 => ws
                            .send(Message::binary(vec![0x28, 0xb5, 0x2f, 0xfd]))
                            .unwrap(),
                        3 => ws
                            .send(Message::text(
                                r#"{"did":"did:plc:a","kind":"identity","identity":{"seq":1}}"#,
                            ))
                            .unwrap(),
                        4 => ws
                            .send(Message::text(
                                r#"{"did":"did:plc:a","time_us":1,"kind":"sync"}"#,
                            ))
                            .unwrap(),
                        _ => {}
                    }
                }
                // An over-MAX_EVENT_BYTES message is skipped without losing the connection.
                let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_EVENT_BYTES));
                ws.send(Message::text(big)).unwrap();
                ws.close(None).unwrap();
                // Drain until the client's close reply arrives.
                while ws.read().is_ok() {}

                // Reconnect: replay inclusively from the cursor, as Jetstream does.
                let mut ws = accept(&listener, &uris);
                let uri = uris.lock().unwrap()[1].clone();
                let cursor: i64 = uri.rsplit_once("cursor=").unwrap().1.parse().unwrap();
                for (e, ms) in events.iter().zip(times_ms) {
                    if t0 + ms * 1000 >= cursor {
                        ws.send(Message::text(e.clone())).unwrap();
                    }
                }
                // Keep the connection open until the client goes away.
                ws.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                while ws.read().is_ok() {}
            })
        };

        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, follower) = spawn_follower(Follower::new(test_config(url.clone())), &record);
        wait_for(&record, "all seven events", |r| {
            r.appended.len() >= events.len()
        });
        stop.store(true, Ordering::Relaxed);
        follower.join().unwrap().unwrap();
        server.join().unwrap();

        let r = record.lock().unwrap();
        assert_eq!(
            r.appended, events,
            "each valid event exactly once, in upstream order"
        );
        let count = |reason| r.skipped.iter().filter(|&&s| s == reason).count();
        assert_eq!(count(SkipReason::InvalidJson), 1);
        assert_eq!(count(SkipReason::Binary), 1);
        assert_eq!(count(SkipReason::MissingField), 1);
        assert_eq!(count(SkipReason::UnknownKind), 1);
        assert_eq!(count(SkipReason::TooLarge), 1);
        // The reference is the third-highest time appended, 0.6 s: cursor = 0.6 s − 1 s rewind,
        // so the five events of the first session come again.
        assert_eq!(count(SkipReason::Duplicate), 5);

        let uris = uris.lock().unwrap();
        assert_eq!(
            uris[0], "/subscribe?wantedCollections=app.bsky.feed.like",
            "first connect is live"
        );
        assert_eq!(
            uris[1],
            format!(
                "/subscribe?wantedCollections=app.bsky.feed.like&cursor={}",
                t0 - 400_000
            )
        );
        let connected = r
            .states
            .iter()
            .filter(|s| matches!(s, ConnectionState::Connected { .. }))
            .count();
        assert_eq!(connected, 2);
        assert!(r.states.iter().any(|s| matches!(
            s,
            ConnectionState::Disconnected { reason, .. } if reason.starts_with("closed by upstream")
        )));
        assert!(
            r.states
                .iter()
                .any(|s| matches!(s, ConnectionState::Reconnecting { attempt: 1, .. }))
        );
    }

    #[test]
    fn silent_upstream_is_pinged_then_abandoned_and_stop_is_prompt() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/subscribe", listener.local_addr().unwrap());
        let uris = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let uris = uris.clone();
            thread::spawn(move || {
                // Never reads, so pings go unanswered: a black-holed upstream.
                let first = accept(&listener, &uris);
                let second = accept(&listener, &uris);
                thread::sleep(Duration::from_millis(300));
                drop((first, second));
            })
        };
        let mut config = test_config(url);
        config.stall_timeout = Duration::from_millis(600);
        let record = Arc::new(Mutex::new(Record::default()));
        let started = Instant::now();
        let (stop, follower) = spawn_follower(Follower::new(config), &record);
        wait_for(&record, "a reconnect after the stall", |r| {
            r.states
                .iter()
                .filter(|s| matches!(s, ConnectionState::Connected { .. }))
                .count()
                == 2
        });
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert!(record.lock().unwrap().states.iter().any(|s| matches!(
            s,
            ConnectionState::Disconnected { reason, .. } if reason.contains("stalled")
        )));
        let stopping = Instant::now();
        stop.store(true, Ordering::Relaxed);
        follower.join().unwrap().unwrap();
        assert!(
            stopping.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            stopping.elapsed()
        );
        server.join().unwrap();
        assert_eq!(uris.lock().unwrap().len(), 2);
    }

    #[test]
    fn frames_beyond_the_reader_limit_are_skipped_by_reconnecting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/subscribe", listener.local_addr().unwrap());
        let uris = Arc::new(Mutex::new(Vec::new()));
        let first = event(0, 1_000_000_000);
        let last = event(1, 1_000_500_000);
        let server = {
            let (uris, first, last) = (uris.clone(), first.clone(), last.clone());
            thread::spawn(move || {
                let mut ws = accept(&listener, &uris);
                ws.send(Message::text(first.clone())).unwrap();
                ws.send(Message::text("y".repeat(64 * 1024))).unwrap();
                let _ = ws.read();
                // Replays from the cursor, as Jetstream does: the first event again, then on.
                let mut ws = accept(&listener, &uris);
                ws.send(Message::text(first)).unwrap();
                ws.send(Message::text(last)).unwrap();
                ws.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                while ws.read().is_ok() {}
            })
        };
        let mut follower = Follower::new(test_config(url));
        follower.max_message_bytes = 16 * 1024;
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, handle) = spawn_follower(follower, &record);
        wait_for(&record, "the event after the oversized frame", |r| {
            r.appended.len() == 2
        });
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        server.join().unwrap();
        let r = record.lock().unwrap();
        assert_eq!(r.appended, vec![first, last]);
        assert_eq!(r.skipped, vec![SkipReason::TooLarge, SkipReason::Duplicate]);
        assert!(
            uris.lock().unwrap()[1].ends_with("cursor=999000000"),
            "{:?}",
            uris.lock().unwrap()
        );
    }

    /// An event the sink refuses as unconvertible is skipped (counted as such), not a reason
    /// to stop: the next one is appended, and the refused one is not remembered (sent again,
    /// it is not a duplicate).
    #[test]
    fn an_event_the_sink_cannot_convert_is_skipped_and_the_next_appended() {
        const T0: i64 = 1_783_175_888_000_000;
        #[derive(Default)]
        struct RefusesOne {
            refuse: Option<i64>,
            appended: Vec<i64>,
            skipped: Vec<SkipReason>,
        }
        impl EventSink for RefusesOne {
            fn append(&mut self, ev: &Incoming<'_>) -> anyhow::Result<()> {
                let time_us = parse_event(ev.v1_json)?.time_us;
                if self.refuse == Some(time_us) {
                    return Err(UnconvertibleEvent("time out of range".into()).into());
                }
                self.appended.push(time_us);
                Ok(())
            }
            fn skipped(&mut self, reason: SkipReason, _: &str) {
                self.skipped.push(reason);
            }
            fn connection(&mut self, _: ConnectionState) {}
        }
        let events: Vec<String> = (0..3).map(|i| event(i, T0 + i as i64)).collect();
        let mut sink = RefusesOne {
            refuse: Some(T0 + 1),
            ..RefusesOne::default()
        };
        let mut f = Follower::new(test_config("ws://h".into()));
        feed(&mut f, &mut sink, 0, &events);
        assert_eq!(sink.appended, vec![T0, T0 + 2]);
        assert_eq!(sink.skipped, vec![SkipReason::Unconvertible]);
        sink.refuse = None;
        feed(&mut f, &mut sink, 0, &events[1..2]);
        assert_eq!(sink.appended, vec![T0, T0 + 2, T0 + 1]);
    }

    #[test]
    fn sink_errors_stop_the_follower() {
        struct Failing;
        impl EventSink for Failing {
            fn append(&mut self, _: &Incoming<'_>) -> anyhow::Result<()> {
                anyhow::bail!("disk full")
            }
            fn skipped(&mut self, _: SkipReason, _: &str) {}
            fn connection(&mut self, _: ConnectionState) {}
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/subscribe", listener.local_addr().unwrap());
        let uris = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let uris = uris.clone();
            thread::spawn(move || {
                let mut ws = accept(&listener, &uris);
                ws.send(Message::text(event(0, 1))).unwrap();
                ws.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                while ws.read().is_ok() {}
            })
        };
        let stop = AtomicBool::new(false);
        let err = Follower::new(test_config(url))
            .run(&mut Failing, &stop)
            .unwrap_err();
        assert_eq!(format!("{err:#}"), "event sink failed: disk full");
        server.join().unwrap();
    }

    #[test]
    fn unreachable_upstreams_fail_over_in_turn() {
        // Two closed ports: every attempt fails; the follower alternates between them.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let mut config = test_config(String::new());
        config.urls = ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/subscribe"))
            .collect();
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, handle) = spawn_follower(Follower::new(config.clone()), &record);
        wait_for(&record, "four failed attempts", |r| {
            r.states
                .iter()
                .filter(|s| matches!(s, ConnectionState::Disconnected { .. }))
                .count()
                >= 4
        });
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        let r = record.lock().unwrap();
        let tried: Vec<&str> = r
            .states
            .iter()
            .filter_map(|s| match s {
                ConnectionState::Disconnected { url, .. } => Some(url.as_str()),
                _ => None,
            })
            .take(4)
            .collect();
        assert_eq!(
            tried,
            [
                &config.urls[0],
                &config.urls[1],
                &config.urls[0],
                &config.urls[1]
            ]
        );
        let attempts: Vec<u32> = r
            .states
            .iter()
            .filter_map(|s| match s {
                ConnectionState::Reconnecting { attempt, delay } => {
                    assert!(*delay >= config.backoff_min && *delay <= config.backoff_max);
                    Some(*attempt)
                }
                _ => None,
            })
            .take(3)
            .collect();
        assert_eq!(attempts, [1, 2, 3]);
    }

    #[test]
    fn wss_upstream_survives_read_timeouts_inside_tls() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let server_config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], key)
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = [event(0, 10_000_000), event(1, 10_100_000)];
        let server = {
            let events = events.clone();
            thread::spawn(move || {
                let (tcp, _) = listener.accept().unwrap();
                let tls = rustls::ServerConnection::new(server_config).unwrap();
                let mut ws = tungstenite::accept(rustls::StreamOwned::new(tls, tcp)).unwrap();
                for e in events {
                    // Longer than POLL_INTERVAL: the client's TLS reads time out in between.
                    thread::sleep(Duration::from_millis(450));
                    ws.send(Message::text(e)).unwrap();
                }
                ws.get_mut()
                    .sock
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                while ws.read().is_ok() {}
            })
        };
        let mut follower = Follower::new(test_config(format!("wss://localhost:{port}/subscribe")));
        follower.tls = Some(Arc::new(client_config));
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, handle) = spawn_follower(follower, &record);
        wait_for(&record, "both events over TLS", |r| r.appended.len() == 2);
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        server.join().unwrap();
        let r = record.lock().unwrap();
        assert_eq!(r.appended, events);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        assert!(
            r.states
                .iter()
                .all(|s| matches!(s, ConnectionState::Connected { .. })),
            "{:?}",
            r.states
        );
    }

    #[test]
    fn a_silent_handshake_times_out_and_is_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/subscribe", listener.local_addr().unwrap());
        let server = thread::spawn(move || {
            // Accept TCP but never answer the upgrade request.
            let held: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
            thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let mut config = test_config(url);
        config.connect_timeout = Duration::from_millis(400);
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, handle) = spawn_follower(Follower::new(config), &record);
        wait_for(&record, "a handshake timeout", |r| {
            r.states.iter().any(|s| {
                matches!(s, ConnectionState::Disconnected { reason, .. } if reason.contains("handshake timed out"))
            })
        });
        server.join().unwrap();
        let stopping = Instant::now();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        assert!(stopping.elapsed() < Duration::from_secs(2));
        let r = record.lock().unwrap();
        assert!(
            !r.states
                .iter()
                .any(|s| matches!(s, ConnectionState::Connected { .. }))
        );
    }

    /// An upstream that does not know the v2 dictionary refuses the upgrade
    /// (`UnknownZstdDictionary`): the follower reconnects at once without it and reads text.
    #[test]
    fn a_refused_dictionary_falls_back_to_text_frames() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "ws://{}{}",
            listener.local_addr().unwrap(),
            crate::wire::SUBSCRIBE_EVENTS_PATH
        );
        let uris = Arc::new(Mutex::new(Vec::new()));
        let line = SAMPLE.lines().next().unwrap();
        let mut frame = Vec::new();
        crate::wire::v1_to_v2(line.as_bytes(), 9, 1_783_175_889_000_000, &mut frame).unwrap();
        let server = {
            let uris = uris.clone();
            thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let head = read_request_head(&mut stream);
                uris.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap().to_owned());
                let body = r#"{"error":"UnknownZstdDictionary","message":"unknown zstdDictionary 20260811; current dictionary id is 1"}"#;
                // The head and, a moment later, the body: the error name is in a later
                // segment than the head (the WebSocket library keeps only body bytes that
                // arrive with it).
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                thread::sleep(Duration::from_millis(300));
                stream.write_all(body.as_bytes()).unwrap();
                drop(stream);
                let mut ws = accept(&listener, &uris);
                ws.send(Message::text(String::from_utf8(frame).unwrap()))
                    .unwrap();
                ws.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                while ws.read().is_ok() {}
            })
        };
        let record = Arc::new(Mutex::new(Record::default()));
        let (stop, handle) = spawn_follower(Follower::new(test_config(url)), &record);
        wait_for(&record, "the event as text", |r| r.appended.len() == 1);
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        server.join().unwrap();
        let r = record.lock().unwrap();
        assert_eq!(r.appended, [line]);
        assert_eq!(r.seqs, [Some(9)]);
        let uris = uris.lock().unwrap();
        assert!(
            uris[0].contains("zstdDictionary=20260811"),
            "asked for the dictionary first: {uris:?}"
        );
        assert!(!uris[1].contains("zstdDictionary"), "then text: {uris:?}");
        assert!(matches!(
            &r.states[0],
            ConnectionState::Disconnected { reason, .. } if reason.contains("UnknownZstdDictionary")
        ));
        assert!(
            !r.states
                .iter()
                .any(|s| matches!(s, ConnectionState::Reconnecting { .. })),
            "no backoff: {:?}",
            r.states
        );
    }

    /// A hostile (or broken) upstream refusing the upgrade with a body that never ends costs
    /// the follower one bounded read per attempt: a body announced as 1 GB and sent at once is
    /// read to 16 KiB at once; one trickled a byte every 50 ms is read until the attempt's deadline.
    /// Each attempt ends with the refusal logged (its message cut) and the next one follows;
    /// neither waits for the body to end (the server would go on for 10 s).
    #[test]
    fn a_refusal_body_that_never_ends_costs_one_bounded_read() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/subscribe", listener.local_addr().unwrap());
        let server = thread::spawn(move || {
            for trickle in [false, true] {
                let (mut stream, _) = listener.accept().unwrap();
                read_request_head(&mut stream);
                stream
                    .set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
                            Content-Length: 1000000000\r\n\r\n";
                stream.write_all(head.as_bytes()).unwrap();
                if !trickle {
                    let _ = stream.write_all(&vec![b'x'; 1 << 20]);
                }
                // Until the follower hangs up (the write then fails) or 10 s have passed.
                let until = Instant::now() + Duration::from_secs(10);
                while Instant::now() < until && stream.write_all(b"x").is_ok() {
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
        let mut config = test_config(url);
        config.connect_timeout = Duration::from_secs(1);
        let record = Arc::new(Mutex::new(Record::default()));
        let started = Instant::now();
        let (stop, handle) = spawn_follower(Follower::new(config), &record);
        let refusals = |r: &Record| {
            r.states
                .iter()
                .filter_map(|s| match s {
                    ConnectionState::Disconnected { reason, .. } if reason.contains("HTTP 503") => {
                        Some(reason.clone())
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        wait_for(&record, "the first refusal", |r| !refusals(r).is_empty());
        let first = started.elapsed();
        wait_for(&record, "two refusals", |r| refusals(r).len() >= 2);
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap().unwrap();
        server.join().unwrap();
        // The first stops at 16 KiB, long before its deadline; the second at its deadline
        // (1 s); the backoff between them is at most 50 ms.
        assert!(
            first < Duration::from_millis(700),
            "the capped read took {first:?}"
        );
        assert!(took < Duration::from_secs(4), "two refusals took {took:?}");
        for reason in refusals(&record.lock().unwrap()) {
            assert!(
                reason.contains("xxxx"),
                "the body's start is kept: {reason}"
            );
            assert!(
                reason.len() < 1000,
                "the message is cut: {} bytes",
                reason.len()
            );
        }
    }

    #[test]
    fn no_urls_is_an_error() {
        let stop = AtomicBool::new(false);
        let mut f = Follower::new(UpstreamConfig::new(Vec::new()));
        struct Nothing;
        impl EventSink for Nothing {
            fn append(&mut self, _: &Incoming<'_>) -> anyhow::Result<()> {
                Ok(())
            }
            fn skipped(&mut self, _: SkipReason, _: &str) {}
            fn connection(&mut self, _: ConnectionState) {}
        }
        assert!(f.run(&mut Nothing, &stop).is_err());
    }
}
