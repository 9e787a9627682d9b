//! jetrelay-mock: a Jetstream-compatible upstream simulator.
//!
//! It serves `GET /subscribe` like the official Jetstream server (plain text frames, `cursor`
//! replay with inclusive `time_us >= cursor` semantics) and emits the deterministic event stream
//! of [`Generator`] at a fixed rate on an absolute schedule. Because every event is a pure function
//! of `(seed, dids, seq, time_us)`, the history ring stores only `(seq, time_us)` pairs and
//! re-renders bytes on demand: the bytes are identical to what was sent live, and two million
//! history entries cost 32 MB instead of a gigabyte.
//!
//! The schedule starts when the first subscriber connects (unless `start_immediately`), and then
//! runs regardless of who is connected, like a real upstream.
//!
//! Each listener speaks one [`Wire`], so one mock can be a legacy v1 host, a host whose
//! `/subscribe` carries sequence cursors, or a 2026 v2 host (both endpoints plus
//! `getZstdDictionary`), or several of these at once over the same event stream (`also_listen`).
//! The wire seq of event number `n` is `n + seq_offset` (default 1: like the official server,
//! seq 0 is never assigned); a second mock with another offset models another instance's
//! instance-local numbering. Every v2 detail (query errors, frames, compression) comes from
//! [`crate::wire`], the module the relay uses.
//!
//! Fault injection: `drop_connections()` / `GET /drop` / `drop_every` close subscriber TCP
//! connections abruptly (no close frame); `malformed_every` interleaves messages a relay must
//! survive (invalid JSON, JSON without `time_us`, a binary frame, a 2 MiB text frame). Those carry
//! no seq, do not count as events and are live-only history entries like the rest.
//!
//! A thread per subscriber and blocking tungstenite I/O: this is a test tool with a handful of
//! subscribers (usually one relay), so simplicity wins over scale.

mod generator;
mod server;

pub use generator::{
    DEFAULT_DIDS, DID_LEN, EventHead, Generator, MAX_SEQ, TEMPLATE_COUNT, TID_LEN,
};
pub(crate) use generator::{mix64, push_i64};
pub(crate) use server::url_query_pairs;
pub use server::{MockHandle, spawn};

use std::net::SocketAddr;
use std::time::Duration;

/// Default `--listen` of jetrelay-mock.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6010";

/// Default `--rate` (events/s).
pub const DEFAULT_RATE: u64 = 500;

/// Default `--seq-offset`: seq 0 is never assigned, as on the official server.
pub const DEFAULT_SEQ_OFFSET: u64 = 1;

/// What one listener of the mock serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// A frozen legacy host (`jetstream1.…`): `/subscribe` without `cursor` fields, `?cursor=`
    /// is unix µs against `time_us`; no `/xrpc/…` endpoints.
    Legacy,
    /// `/subscribe` with each event's seq as `"cursor"`; `?cursor=` below 10^15 resumes by seq
    /// (inclusive, silently clamped to the oldest retained), above by witness time.
    Cursor,
    /// A 2026 host: [`Wire::Cursor`]'s `/subscribe` plus `subscribeEvents` and
    /// `getZstdDictionary`.
    V2,
}

impl Wire {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Wire::Legacy => "legacy",
            Wire::Cursor => "cursor",
            Wire::V2 => "v2",
        }
    }

    /// Whether `/subscribe` frames carry `cursor` and `?cursor=` below 10^15 is a seq.
    pub fn has_seq(self) -> bool {
        self != Wire::Legacy
    }
}

impl std::str::FromStr for Wire {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "legacy" => Ok(Wire::Legacy),
            "cursor" => Ok(Wire::Cursor),
            "v2" => Ok(Wire::V2),
            _ => Err(format!(
                "unknown wire {s:?} (expected legacy, cursor or v2)"
            )),
        }
    }
}

/// Default `--history` (events kept for cursor replay).
pub const DEFAULT_HISTORY: usize = 2_000_000;

/// The official server pings every 30 s; so does the mock.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Size of the oversized malformed text frame: above any sane per-event limit (real events are
/// < 100 KiB) yet small enough to send quickly.
pub const OVERSIZED_FRAME_LEN: usize = 2 * 1024 * 1024;

/// Configuration of a mock upstream.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port; see `MockHandle::local_addr`).
    pub listen: SocketAddr,
    /// Events per second; 0 = as fast as subscribers consume (never evicting unsent history).
    pub rate: u64,
    /// Generator seed (DIDs); the swarm must use the same.
    pub seed: u64,
    /// DID population size of the generator.
    pub dids: u64,
    /// Stop generating after this many events (keep serving).
    pub count: Option<u64>,
    /// History entries kept for cursor replay.
    pub history: usize,
    /// Periodically drop every subscriber connection.
    pub drop_every: Option<Duration>,
    /// Inject one malformed message after every N events.
    pub malformed_every: Option<u64>,
    /// When > 0, ~30% of events get `time_us` = emission time minus a deterministic 0..J ms.
    pub time_jitter_ms: u64,
    /// How often subscribers are pinged.
    pub ping_interval: Duration,
    /// Start the schedule at spawn instead of at the first subscriber's connection. By default
    /// the stream begins when someone listens, so a relay started after the mock still sees
    /// seq 0 live and `count` bounds exactly what it receives.
    pub start_immediately: bool,
    /// The wire of the `listen` address.
    pub wire: Wire,
    /// More listeners over the same event stream, each with its own wire.
    pub also_listen: Vec<(SocketAddr, Wire)>,
    /// Wire seq of event number `n` is `n + seq_offset`.
    pub seq_offset: u64,
    /// Every Nth event is a `#sync` instead: sent on `subscribeEvents` (the wrapped object's
    /// `blocks` as `{"$bytes":…}`, as the atproto JSON data model writes bytes), skipped on
    /// `/subscribe` (its seq is a gap there, as on the official v1 wire).
    pub sync_every: Option<u64>,
    /// Clock faults: this instance's clock offset, and one event stamped far off.
    pub clock: ClockFaults,
}

/// How the mock's clock misbehaves (fault injection for the relay's clock handling): every
/// `time_us` is shifted by `offset_us` (an instance whose clock is ahead or behind), and event
/// `outlier.0` is stamped a further `outlier.1` µs off (one far-future or far-past event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClockFaults {
    /// Added to every `time_us`.
    pub offset_us: i64,
    /// `(seq, extra µs)` for the one outlying event.
    pub outlier: Option<(u64, i64)>,
}

impl ClockFaults {
    /// `time_us` of event `seq` given its fault-free value.
    pub fn apply(&self, seq: u64, time_us: i64) -> i64 {
        let extra = match self.outlier {
            Some((s, extra)) if s == seq => extra,
            _ => 0,
        };
        time_us.saturating_add(self.offset_us).saturating_add(extra)
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6010)),
            rate: DEFAULT_RATE,
            seed: 1,
            dids: DEFAULT_DIDS,
            count: None,
            history: DEFAULT_HISTORY,
            drop_every: None,
            malformed_every: None,
            time_jitter_ms: 0,
            ping_interval: DEFAULT_PING_INTERVAL,
            start_immediately: false,
            wire: Wire::Legacy,
            also_listen: Vec::new(),
            seq_offset: DEFAULT_SEQ_OFFSET,
            sync_every: None,
            clock: ClockFaults::default(),
        }
    }
}

/// Errors of the mock and of the small parsers shared with the swarm.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// Binding or configuring the listener failed.
    #[error("mock listener: {0}")]
    Io(#[from] std::io::Error),
    /// A duration string was not understood.
    #[error("invalid duration {0:?} (expected e.g. 500ms, 30s, 10m, 2h)")]
    Duration(String),
}

/// Parses a humantime-like duration: `500ms`, `30s`, `1.5s`, `10m`, `2h`, `1d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, MockError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| MockError::Duration(s.into()))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(MockError::Duration(s.into())),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| MockError::Duration(s.into()))
}

/// Which malformed message to inject next (they cycle in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedKind {
    /// A text frame whose payload is truncated JSON.
    InvalidJson,
    /// A valid JSON event object without `time_us`.
    MissingTimeUs,
    /// A binary frame (Jetstream only sends binary frames to compressed clients).
    Binary,
    /// A syntactically valid event of [`OVERSIZED_FRAME_LEN`] bytes.
    Oversized,
}

impl MalformedKind {
    /// The `n`-th malformed message kind of the cycle.
    pub fn nth(n: u64) -> Self {
        match n % 4 {
            0 => MalformedKind::InvalidJson,
            1 => MalformedKind::MissingTimeUs,
            2 => MalformedKind::Binary,
            _ => MalformedKind::Oversized,
        }
    }

    /// The payload and whether it goes in a text frame (`false` = binary).
    pub fn payload(self, time_us: i64) -> (Vec<u8>, bool) {
        match self {
            MalformedKind::InvalidJson => (
                br#"{"did":"did:plc:malformedmalformedmalform","time_us":"#.to_vec(),
                true,
            ),
            MalformedKind::MissingTimeUs => (
                br#"{"did":"did:plc:malformedmalformedmalform","kind":"identity","identity":{"did":"did:plc:malformedmalformedmalform","seq":1,"time":"2026-07-04T14:38:07.877Z"}}"#.to_vec(),
                true,
            ),
            MalformedKind::Binary => (b"\x28\xb5\x2f\xfd not really zstd".to_vec(), false),
            MalformedKind::Oversized => {
                let mut head = br#"{"did":"did:plc:malformedmalformedmalform","time_us":"#.to_vec();
                push_i64(time_us, &mut head);
                head.extend_from_slice(
                    br#","kind":"commit","commit":{"rev":"2222222222222","operation":"create","collection":"app.bsky.feed.post","rkey":"2222222222222","record":{"$type":"app.bsky.feed.post","text":""#,
                );
                let tail = br#""}}}"#;
                let fill = OVERSIZED_FRAME_LEN.saturating_sub(head.len() + tail.len());
                head.resize(head.len() + fill, b'a');
                head.extend_from_slice(tail);
                (head, true)
            }
        }
    }
}

/// Whether event number `seq` is a `#sync` under `sync_every` (the last of every N).
pub fn is_sync_event(sync_every: Option<u64>, seq: u64) -> bool {
    sync_every.is_some_and(|n| n > 0 && seq % n == n - 1)
}

/// `time_us` for event `seq` emitted at `now_us`: jittered backwards for ~30% of events when
/// `jitter_ms > 0`, deterministically from `(seed, seq)` so tests can predict it.
pub fn jittered_time(seed: u64, seq: u64, now_us: i64, jitter_ms: u64) -> i64 {
    now_us - jitter_back_us(seed, seq, jitter_ms)
}

/// How far `time_us` of event `seq` lies before its emission (witness) time: the inverse of
/// [`jittered_time`], so the v2 wire's `witnessedAt` is `time_us + jitter_back_us(…)`.
pub fn jitter_back_us(seed: u64, seq: u64, jitter_ms: u64) -> i64 {
    if jitter_ms == 0 {
        return 0;
    }
    let h = mix64(seq ^ mix64(seed ^ 0x1177e4));
    if h % 10 >= 3 {
        return 0;
    }
    ((h >> 8) % (jitter_ms * 1000)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn malformed_payloads() {
        let (p, text) = MalformedKind::nth(0).payload(1);
        assert!(text && serde_json::from_slice::<serde_json::Value>(&p).is_err());
        let (p, text) = MalformedKind::nth(1).payload(1);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert!(text && v.get("time_us").is_none());
        assert!(!MalformedKind::nth(2).payload(1).1);
        let (p, text) = MalformedKind::nth(3).payload(1_783_175_888_000_000);
        assert!(text);
        assert_eq!(p.len(), OVERSIZED_FRAME_LEN);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["time_us"], 1_783_175_888_000_000i64);
        assert_eq!(
            Generator::seq_of(&p),
            None,
            "malformed messages carry no seq"
        );
    }

    #[test]
    fn clock_faults_shift_every_event_and_one_outlier() {
        let c = ClockFaults {
            offset_us: -5,
            outlier: Some((3, 1_000)),
        };
        assert_eq!(c.apply(2, 100), 95);
        assert_eq!(c.apply(3, 100), 1_095);
        assert_eq!(ClockFaults::default().apply(3, 100), 100);
    }

    #[test]
    fn jitter_is_backwards_bounded_and_partial() {
        let now = 1_783_175_888_000_000;
        let mut moved = 0;
        for seq in 0..10_000 {
            let t = jittered_time(1, seq, now, 50);
            assert!(t <= now && t > now - 50_000);
            moved += usize::from(t != now);
            assert_eq!(jittered_time(1, seq, now, 0), now);
        }
        assert!((2500..3500).contains(&moved), "{moved} of 10000 jittered");
    }
}
