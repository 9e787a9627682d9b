//! Relay settings: one struct, layered with figment as defaults < TOML file < `JETRELAY_*`
//! environment < command-line flags, then validated so that a bad setting fails at start with
//! the key and the reason instead of surfacing later as an odd runtime error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The public Jetstream instances in order of preference: the two 2026 (v2) hosts through
/// `subscribeEvents` (sequence numbers: exact resume; dictionary compression), then the four
/// frozen legacy hosts through `/subscribe` (resume by time). The next one is tried when a
/// connection attempt fails.
pub const DEFAULT_UPSTREAMS: [&str; 6] = [
    "wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents",
    "wss://jetstream.us-west.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents",
    "wss://jetstream1.us-east.bsky.network/subscribe",
    "wss://jetstream2.us-east.bsky.network/subscribe",
    "wss://jetstream1.us-west.bsky.network/subscribe",
    "wss://jetstream2.us-west.bsky.network/subscribe",
];

/// Why: io_uring rings and per-worker pipe pools are per thread; more workers than this buys
/// nothing on any machine this relay targets and would only multiply fixed costs.
pub const MAX_WORKERS: usize = 64;

/// Upper bound for `max_handshakes`. Why: each handshake in progress may hold an 8 KiB
/// request head; beyond a million that is gigabytes for connections that have sent nothing
/// useful, and the fd limit is reached long before.
pub const MAX_HANDSHAKES_LIMIT: usize = 1_000_000;

/// Upper bound for durations compared with or subtracted from wall-clock microseconds
/// (`retention`, `max_lag`). Why 3650 days: the relay does `now − d` in i64 microseconds and
/// `Instant + d`; a typo such as `99999999999d` would overflow (a panic, or a wrapped cutoff
/// that drops everything). Nobody keeps ten years of the firehose.
pub const MAX_LONG_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Upper bound for timers of the connection machinery (`handshake_timeout`,
/// `ping_interval`, `rewind`). Why an hour: each is added to `Instant::now()` (which panics
/// on overflow), and beyond an hour a handshake deadline is a gift to slowloris, a ping
/// interval no longer detects dead peers, and a rewind replays more than a reconnect needs.
pub const MAX_TIMER: Duration = Duration::from_secs(3600);

/// Fan-out workers when `workers` is 0: one per CPU, at most [`MAX_WORKERS`] (a host with
/// more CPUs gets the maximum rather than a configuration error).
pub fn default_workers(cpus: usize) -> usize {
    cpus.clamp(1, MAX_WORKERS)
}

/// Where a listener binds: a TCP address or a Unix socket path (`unix:/run/jetrelay/x.sock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP socket address.
    Tcp(SocketAddr),
    /// A filesystem path for a Unix stream socket.
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("`{s}` is neither HOST:PORT nor unix:PATH ({e})"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The raw, layered settings as they appear in TOML (`snake_case` keys = flag names).
/// Durations and sizes stay strings here so that the file can say `24h` and `20GiB`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Public WebSocket listener.
    pub listen: String,
    /// Listener that requires a PROXY v2 header (for the TLS sidecar).
    pub trusted_listen: Option<String>,
    /// Upstream Jetstream URLs in order of preference (the next after a failed connection).
    pub upstream: Vec<String>,
    /// Directory holding the logs and their indexes.
    pub data_dir: Option<PathBuf>,
    /// Age retention.
    pub retention: String,
    /// Disk cap for the base logs and the index.
    pub max_disk: String,
    /// Budget for all shape logs together ("" = a quarter of `max_disk`).
    pub max_shape_disk: String,
    /// New shapes one IP (or IPv6 /64) may cause per minute.
    pub shape_rate_per_ip: f64,
    /// Live shapes one IP (or IPv6 /64) may have created.
    pub max_shapes_per_ip: usize,
    /// Fan-out worker threads (0 = one per CPU).
    pub workers: usize,
    /// Upstream reconnect rewind window.
    pub rewind: String,
    /// Largest clock difference between upstream instances that failover absorbs.
    pub upstream_skew: String,
    /// Run an embedded simulated upstream instead of following `upstream`.
    pub demo: bool,
    /// Events per second of the demo upstream.
    pub demo_rate: u64,
    /// Metrics / dashboard / health listener ("" disables it).
    pub metrics_listen: String,
    /// OTLP/HTTP collector to push metrics to (none = Prometheus scraping only).
    pub otlp_endpoint: Option<String>,
    /// Cap on connected clients.
    pub max_clients: usize,
    /// Cap on concurrent connections from one IP (or one IPv6 /64).
    pub max_conns_per_ip: usize,
    /// New connections per second from one IP (token bucket rate; burst = 2× rate).
    pub conn_rate_per_ip: f64,
    /// Addresses exempt from per-IP limits (CIDR or plain address).
    pub allow_ip: Vec<String>,
    /// Sources a TCP trusted listener accepts connections from (CIDR or plain address).
    pub trusted_allow_ip: Vec<String>,
    /// Cap on handshakes in progress, in total.
    pub max_handshakes: usize,
    /// Cap on handshakes in progress from one IP (or one IPv6 /64).
    pub max_handshakes_per_ip: usize,
    /// Deadline for a client to complete its HTTP upgrade.
    pub handshake_timeout: String,
    /// How often idle clients are pinged.
    pub ping_interval: String,
    /// Inbound bytes per second a client may send before it is closed.
    pub max_inbound_rate: String,
    /// Drop clients further behind live than this ("" = never; retention still applies).
    pub max_lag: String,
    /// Memory budget for all clients' filter state (wantedDids, wantedCollections).
    pub max_filter_memory: String,
    /// The share of it one IP (or IPv6 /64) may hold ("" = an eighth of the budget).
    pub max_filter_memory_per_ip: String,
    /// Share of a fan-out worker's time that live sends may take before it batches (0–1].
    pub fanout_duty: f64,
    /// Longest a send to a thin stream (filtered or compressed) waits, under load, to carry
    /// more bytes ("0s" = never).
    pub thin_linger: String,
    /// Worker busy share at which thin streams start to linger (0 = always).
    pub thin_linger_load: f64,
    /// `options_update` messages per second per client (token bucket).
    pub options_update_rate: f64,
    /// `/subscribe` frames carry the relay's seq as a top-level `cursor` field.
    pub v1_cursor_field: bool,
}

impl Default for RawSettings {
    fn default() -> Self {
        RawSettings {
            listen: "127.0.0.1:6008".into(),
            trusted_listen: None,
            upstream: DEFAULT_UPSTREAMS.iter().map(|s| s.to_string()).collect(),
            data_dir: None,
            retention: "24h".into(),
            max_disk: "20GiB".into(),
            max_shape_disk: String::new(),
            shape_rate_per_ip: 6.0,
            max_shapes_per_ip: crate::shapes::MAX_SHAPES_PER_IP,
            workers: 0,
            rewind: "5s".into(),
            upstream_skew: "60s".into(),
            demo: false,
            demo_rate: 50,
            metrics_listen: "127.0.0.1:6009".into(),
            otlp_endpoint: None,
            max_clients: 100_000,
            max_conns_per_ip: 64,
            conn_rate_per_ip: 10.0,
            allow_ip: Vec::new(),
            trusted_allow_ip: vec!["127.0.0.0/8".into(), "::1".into()],
            max_handshakes: 4096,
            max_handshakes_per_ip: 16,
            handshake_timeout: "10s".into(),
            ping_interval: "30s".into(),
            max_inbound_rate: "2MiB".into(),
            max_lag: String::new(),
            max_filter_memory: "512MiB".into(),
            max_filter_memory_per_ip: String::new(),
            fanout_duty: 0.5,
            thin_linger: "80ms".into(),
            thin_linger_load: 0.1,
            options_update_rate: 1.0,
            v1_cursor_field: true,
        }
    }
}

/// Validated settings the relay runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Public WebSocket listener.
    pub listen: ListenAddr,
    /// PROXY-v2 listener for the TLS sidecar.
    pub trusted_listen: Option<ListenAddr>,
    /// Upstream URLs (ignored with `demo`).
    pub upstreams: Vec<String>,
    /// Log directory.
    pub data_dir: PathBuf,
    /// Events older than this are punched out of the logs.
    pub retention: Duration,
    /// The base logs' and index's allocated size is kept under this many bytes.
    pub max_disk: u64,
    /// The shape logs' retained bytes are kept under this many, separately.
    pub max_shape_disk: u64,
    /// New shapes per minute per address key.
    pub shape_rate_per_ip: f64,
    /// Live shapes one address key may have created.
    pub max_shapes_per_ip: usize,
    /// Fan-out worker threads.
    pub workers: usize,
    /// How far before the last appended event a reconnect resumes.
    pub rewind: Duration,
    /// Largest clock difference between upstream instances that failover absorbs: a
    /// reconnect to another instance resumes this much earlier still.
    pub upstream_skew: Duration,
    /// Embedded simulated upstream.
    pub demo: bool,
    /// Demo upstream rate.
    pub demo_rate: u64,
    /// Metrics listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Full OTLP/HTTP metrics URL (`http://host:port/v1/metrics`), if pushing is enabled.
    pub otlp_endpoint: Option<String>,
    /// Cap on connected clients.
    pub max_clients: usize,
    /// Per-IP concurrent connection cap.
    pub max_conns_per_ip: usize,
    /// Per-IP connection rate (per second).
    pub conn_rate_per_ip: f64,
    /// Exempt networks as (address, prefix length).
    pub allow_ip: Vec<(std::net::IpAddr, u8)>,
    /// Networks a TCP trusted listener accepts connections from; others are closed at
    /// accept (anyone else could claim any client address in a PROXY header).
    pub trusted_allow_ip: Vec<(std::net::IpAddr, u8)>,
    /// Handshakes in progress, in total (each holds up to 8 KiB and a deadline).
    pub max_handshakes: usize,
    /// Handshakes in progress per address key (IPv4 address or IPv6 /64).
    pub max_handshakes_per_ip: usize,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Idle ping period.
    pub ping_interval: Duration,
    /// Inbound byte-rate cap per client (bytes per second).
    pub max_inbound_rate: u64,
    /// Optional cap on how far behind live a client may fall.
    pub max_lag: Option<Duration>,
    /// Bytes of filter state all clients together may hold.
    pub max_filter_memory: u64,
    /// Bytes of filter state the clients of one address key may hold.
    pub max_filter_memory_per_ip: u64,
    /// Pacing of live sends under load (1 = never hold a round back).
    pub fanout_duty: f64,
    /// Longest a thin stream's send waits under load to carry more bytes (zero = never).
    pub thin_linger: Duration,
    /// Worker busy share at which thin streams start to linger.
    pub thin_linger_load: f64,
    /// `options_update` messages per second per client (token bucket; burst 10 or 2× the
    /// rate).
    pub options_update_rate: f64,
    /// `/subscribe` frames carry the relay's seq as a top-level `cursor` field (as the
    /// official server's do; off for v1 clients that refuse unknown fields).
    pub v1_cursor_field: bool,
}

/// A setting that failed validation, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{key}`: {reason}")]
pub struct SettingError {
    /// The TOML key / flag name (with `_`).
    pub key: &'static str,
    /// Why the value was refused.
    pub reason: String,
}

fn bad(key: &'static str, reason: impl Into<String>) -> SettingError {
    SettingError {
        key,
        reason: reason.into(),
    }
}

/// Parses `500ms`, `30s`, `10m`, `24h`, `7d` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 10m, 24h"))?;
    let secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n.checked_mul(60).ok_or("duration overflows")?,
        "h" => n.checked_mul(3600).ok_or("duration overflows")?,
        "d" => n.checked_mul(86_400).ok_or("duration overflows")?,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h, d)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Parses `4096`, `512KiB`, `20GiB`, `1TiB` (also KB/MB/GB/TB as powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512MiB or 20GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| "size overflows".into())
}

/// Parses `10.0.0.0/8`, `2001:db8::/64` or a plain address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        None => max,
    };
    Ok((ip, len))
}

/// Validates an OTLP/HTTP endpoint and returns the metrics URL. A bare `http://host:port`
/// (the usual `OTEL_EXPORTER_OTLP_ENDPOINT` form) gets the standard `/v1/metrics` path; a URL
/// with a path is used as given. Only `http://`: the push client is a small blocking one
/// without TLS, meant for a collector on the same host or network (it does TLS upstream).
pub fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!(
            "`{s}` must start with http:// (point it at a local OpenTelemetry collector)"
        ));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err(format!(
            "`{s}` needs a host[:port] and nothing else before the path"
        ));
    }
    if path.contains(['?', '#', ' ']) {
        return Err(format!("`{s}`: no query or fragment allowed"));
    }
    let path = if path.is_empty() || path == "/" {
        "/v1/metrics"
    } else {
        path
    };
    Ok(format!("http://{authority}{path}"))
}

impl RawSettings {
    /// Validates every field, naming the first bad key.
    pub fn validate(self) -> Result<Settings, SettingError> {
        let listen = self.listen.parse().map_err(|e| bad("listen", e))?;
        let trusted_listen = match self.trusted_listen.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse().map_err(|e| bad("trusted_listen", e))?),
        };
        if !self.demo && self.upstream.is_empty() {
            return Err(bad(
                "upstream",
                "at least one upstream URL is needed (or --demo)",
            ));
        }
        for u in &self.upstream {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return Err(bad(
                    "upstream",
                    format!("`{u}` must start with ws:// or wss://"),
                ));
            }
        }
        let data_dir = self
            .data_dir
            .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("jetrelay-data"));
        let retention = parse_duration(&self.retention).map_err(|e| bad("retention", e))?;
        if retention < Duration::from_secs(1) || retention > MAX_LONG_DURATION {
            return Err(bad("retention", "must be between 1s and 3650d"));
        }
        let max_disk = parse_size(&self.max_disk).map_err(|e| bad("max_disk", e))?;
        // Why: below a few MiB the retention loop would punch continuously and clients could
        // never replay anything; such a value is a typo, not a configuration.
        if max_disk < 4 << 20 {
            return Err(bad("max_disk", "must be at least 4MiB"));
        }
        let max_shape_disk = match self.max_shape_disk.trim() {
            "" => max_disk / 4,
            s => parse_size(s).map_err(|e| bad("max_shape_disk", e))?,
        };
        if !(self.shape_rate_per_ip > 0.0 && self.shape_rate_per_ip <= 1e6) {
            return Err(bad(
                "shape_rate_per_ip",
                "must be a positive number of shapes per minute, up to 1000000",
            ));
        }
        if !(1..=crate::shapes::MAX_SHAPES).contains(&self.max_shapes_per_ip) {
            return Err(bad(
                "max_shapes_per_ip",
                format!("must be 1 to {} shapes", crate::shapes::MAX_SHAPES),
            ));
        }
        let workers = match self.workers {
            0 => default_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        if workers > MAX_WORKERS {
            return Err(bad("workers", format!("at most {MAX_WORKERS}")));
        }
        let rewind = parse_duration(&self.rewind).map_err(|e| bad("rewind", e))?;
        if rewind > MAX_TIMER {
            return Err(bad("rewind", "must be at most 1h"));
        }
        let upstream_skew =
            parse_duration(&self.upstream_skew).map_err(|e| bad("upstream_skew", e))?;
        // Why an hour: the dedup memory spans twice the skew (at most a million events).
        if upstream_skew > Duration::from_secs(3600) {
            return Err(bad("upstream_skew", "at most 1h"));
        }
        if self.demo_rate == 0 || self.demo_rate > 1_000_000 {
            return Err(bad("demo_rate", "must be 1..=1000000 events/s"));
        }
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            s => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| bad("metrics_listen", format!("`{s}`: {e}")))?,
            ),
        };
        let otlp_endpoint = match self.otlp_endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(parse_otlp_endpoint(s).map_err(|e| bad("otlp_endpoint", e))?),
        };
        if self.max_clients == 0 {
            return Err(bad("max_clients", "must be at least 1"));
        }
        if self.max_conns_per_ip == 0 {
            return Err(bad("max_conns_per_ip", "must be at least 1"));
        }
        // Why at most a million per second: the token bucket's arithmetic stays finite, and
        // no address needs more.
        if !(self.conn_rate_per_ip > 0.0 && self.conn_rate_per_ip <= 1e6) {
            return Err(bad(
                "conn_rate_per_ip",
                "must be a positive number up to 1000000",
            ));
        }
        let allow_ip = self
            .allow_ip
            .iter()
            .map(|s| parse_cidr(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("allow_ip", e))?;
        let trusted_allow_ip = self
            .trusted_allow_ip
            .iter()
            .map(|s| parse_cidr(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("trusted_allow_ip", e))?;
        if !(1..=MAX_HANDSHAKES_LIMIT).contains(&self.max_handshakes) {
            return Err(bad(
                "max_handshakes",
                format!("must be 1..={MAX_HANDSHAKES_LIMIT}"),
            ));
        }
        if !(1..=self.max_handshakes).contains(&self.max_handshakes_per_ip) {
            return Err(bad(
                "max_handshakes_per_ip",
                "must be at least 1 and at most max_handshakes",
            ));
        }
        let handshake_timeout =
            parse_duration(&self.handshake_timeout).map_err(|e| bad("handshake_timeout", e))?;
        if handshake_timeout.is_zero() || handshake_timeout > MAX_TIMER {
            return Err(bad("handshake_timeout", "must be positive and at most 1h"));
        }
        let max_inbound_rate =
            parse_size(&self.max_inbound_rate).map_err(|e| bad("max_inbound_rate", e))?;
        // Why 1 KiB/s at least: pongs, a close and an options_update must always fit.
        if max_inbound_rate < 1024 {
            return Err(bad("max_inbound_rate", "must be at least 1KiB"));
        }
        let max_lag = match self.max_lag.trim() {
            "" => None,
            s => Some(parse_duration(s).map_err(|e| bad("max_lag", e))?),
        };
        if max_lag.is_some_and(|d| d > MAX_LONG_DURATION) {
            return Err(bad("max_lag", "must be at most 3650d"));
        }
        let max_filter_memory =
            parse_size(&self.max_filter_memory).map_err(|e| bad("max_filter_memory", e))?;
        // Why 4 MiB at least: the largest single client's filters (a 1 MiB options_update of
        // DIDs, plus what the relay keeps per DID) must fit.
        if max_filter_memory < 4 << 20 {
            return Err(bad("max_filter_memory", "must be at least 4MiB"));
        }
        let max_filter_memory_per_ip = match self.max_filter_memory_per_ip.trim() {
            "" => max_filter_memory / 8,
            s => parse_size(s).map_err(|e| bad("max_filter_memory_per_ip", e))?,
        };
        // Same reason: one client's largest filters must fit an address's share.
        if !((2 << 20)..=max_filter_memory).contains(&max_filter_memory_per_ip) {
            return Err(bad(
                "max_filter_memory_per_ip",
                "must be at least 2MiB and at most max_filter_memory",
            ));
        }
        let ping_interval =
            parse_duration(&self.ping_interval).map_err(|e| bad("ping_interval", e))?;
        if ping_interval < Duration::from_secs(1) || ping_interval > MAX_TIMER {
            return Err(bad("ping_interval", "must be between 1s and 1h"));
        }
        // Why at least 0.05: below that a busy worker would hold every round for the full
        // MAX_PACE_DELAY while using almost nothing of its core.
        if !(self.fanout_duty >= 0.05 && self.fanout_duty <= 1.0) {
            return Err(bad("fanout_duty", "must be between 0.05 and 1"));
        }
        let thin_linger = parse_duration(&self.thin_linger).map_err(|e| bad("thin_linger", e))?;
        // Why at most 1 s: it is added to a thin client's latency under load; beyond a second
        // the feed stops looking live, and a send costs no less for carrying more.
        if thin_linger > Duration::from_secs(1) {
            return Err(bad("thin_linger", "must be at most 1s"));
        }
        if !(0.0..=1.0).contains(&self.thin_linger_load) {
            return Err(bad("thin_linger_load", "must be between 0 and 1"));
        }
        // Why at most 1000: each update re-parses up to 1 MiB and re-registers filters.
        if !(self.options_update_rate > 0.0 && self.options_update_rate <= 1000.0) {
            return Err(bad(
                "options_update_rate",
                "must be in (0, 1000] per second",
            ));
        }
        Ok(Settings {
            listen,
            trusted_listen,
            upstreams: self.upstream,
            data_dir,
            retention,
            max_disk,
            max_shape_disk,
            shape_rate_per_ip: self.shape_rate_per_ip,
            max_shapes_per_ip: self.max_shapes_per_ip,
            workers,
            rewind,
            upstream_skew,
            demo: self.demo,
            demo_rate: self.demo_rate,
            metrics_listen,
            otlp_endpoint,
            max_clients: self.max_clients,
            max_conns_per_ip: self.max_conns_per_ip,
            conn_rate_per_ip: self.conn_rate_per_ip,
            allow_ip,
            trusted_allow_ip,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            handshake_timeout,
            ping_interval,
            max_inbound_rate,
            max_lag,
            max_filter_memory,
            max_filter_memory_per_ip,
            fanout_duty: self.fanout_duty,
            thin_linger,
            thin_linger_load: self.thin_linger_load,
            options_update_rate: self.options_update_rate,
            v1_cursor_field: self.v1_cursor_field,
        })
    }
}

/// Layers defaults < TOML file < `JETRELAY_*` env < `overrides` (the flags that were given).
/// The figment error names the key on type errors; validation names it on value errors.
pub fn load(
    config_file: Option<&std::path::Path>,
    overrides: &impl Serialize,
) -> anyhow::Result<Settings> {
    let mut fig = Figment::from(Serialized::defaults(RawSettings::default()));
    if let Some(path) = config_file {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        fig = fig.merge(Toml::file(path));
    }
    let fig = fig
        // `JETRELAY_TLS_*` belongs to the sidecar, which may share the environment.
        .merge(
            Env::prefixed("JETRELAY_")
                .ignore(&["config"])
                .filter(|k| !k.as_str().starts_with("tls_")),
        )
        .merge(Serialized::defaults(overrides));
    let raw: RawSettings = fig
        .extract()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    Ok(raw.validate()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1PiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn cidrs() {
        let (ip, len) = parse_cidr("10.1.0.0/16").unwrap();
        assert_eq!(ip.to_string(), "10.1.0.0");
        assert_eq!(len, 16);
        assert_eq!(parse_cidr("::1").unwrap().1, 128);
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn defaults_validate() {
        let s = RawSettings::default().validate().unwrap();
        assert_eq!(s.listen, ListenAddr::Tcp("127.0.0.1:6008".parse().unwrap()));
        assert_eq!(s.upstreams, DEFAULT_UPSTREAMS);
        assert_eq!(s.retention, Duration::from_secs(86_400));
    }

    #[test]
    fn otlp_endpoints() {
        assert_eq!(
            parse_otlp_endpoint("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/metrics"
        );
        assert_eq!(
            parse_otlp_endpoint("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(
            parse_otlp_endpoint("http://[::1]:9000/otlp/v1/metrics").unwrap(),
            "http://[::1]:9000/otlp/v1/metrics"
        );
        assert!(parse_otlp_endpoint("https://collector:4318").is_err());
        assert!(parse_otlp_endpoint("http://").is_err());
        assert!(parse_otlp_endpoint("http://user@host/").is_err());
        let raw = RawSettings {
            otlp_endpoint: Some("grpc://x".into()),
            ..RawSettings::default()
        };
        assert!(
            raw.validate()
                .unwrap_err()
                .to_string()
                .contains("`otlp_endpoint`")
        );
        let raw = RawSettings {
            otlp_endpoint: Some(" ".into()),
            ..RawSettings::default()
        };
        assert_eq!(raw.validate().unwrap().otlp_endpoint, None);
    }

    #[test]
    fn errors_name_the_key() {
        let raw = RawSettings {
            retention: "forever".into(),
            ..RawSettings::default()
        };
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("`retention`"), "{err}");
        let raw = RawSettings {
            listen: "nowhere".into(),
            ..RawSettings::default()
        };
        assert!(raw.validate().unwrap_err().to_string().contains("`listen`"));
    }

    /// Every duration the relay adds to an `Instant` or subtracts from wall-clock
    /// microseconds is bounded at validation, naming the key (before: `99999999999d` passed
    /// and panicked at runtime, or wrapped into a cutoff that dropped everything).
    #[test]
    fn huge_durations_are_refused_naming_the_key() {
        let huge = "99999999999d";
        let cases: Vec<(&str, RawSettings)> = vec![
            (
                "retention",
                RawSettings {
                    retention: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "rewind",
                RawSettings {
                    rewind: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "handshake_timeout",
                RawSettings {
                    handshake_timeout: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "ping_interval",
                RawSettings {
                    ping_interval: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "max_lag",
                RawSettings {
                    max_lag: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "thin_linger",
                RawSettings {
                    thin_linger: huge.into(),
                    ..RawSettings::default()
                },
            ),
            (
                "conn_rate_per_ip",
                RawSettings {
                    conn_rate_per_ip: f64::INFINITY,
                    ..RawSettings::default()
                },
            ),
            (
                "shape_rate_per_ip",
                RawSettings {
                    shape_rate_per_ip: 0.0,
                    ..RawSettings::default()
                },
            ),
            (
                "max_shapes_per_ip",
                RawSettings {
                    max_shapes_per_ip: 0,
                    ..RawSettings::default()
                },
            ),
        ];
        for (key, raw) in cases {
            let err = raw.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
        // The largest allowed values still validate.
        let s = RawSettings {
            retention: "3650d".into(),
            rewind: "1h".into(),
            handshake_timeout: "1h".into(),
            ping_interval: "1h".into(),
            max_lag: "3650d".into(),
            ..RawSettings::default()
        }
        .validate()
        .unwrap();
        // And the arithmetic they feed stays in range.
        let _ = std::time::Instant::now() + s.handshake_timeout + s.ping_interval * 2;
        assert!(
            crate::index::now_us()
                .checked_sub(s.retention.as_micros() as i64)
                .is_some()
        );
    }

    /// The default worker count is one per CPU, clamped to the maximum instead of failing
    /// validation on hosts with more CPUs than that (before: `workers: at most 64`).
    #[test]
    fn default_workers_clamp_to_the_maximum() {
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(8), 8);
        assert_eq!(default_workers(64), 64);
        assert_eq!(default_workers(128), MAX_WORKERS);
        assert_eq!(default_workers(0), 1);
        // An explicit value above the maximum is still an error.
        let err = RawSettings {
            workers: 65,
            ..RawSettings::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("`workers`"), "{err}");
    }

    #[test]
    fn thin_linger_is_bounded() {
        let with = |linger: &str, load: f64| {
            RawSettings {
                thin_linger: linger.into(),
                thin_linger_load: load,
                ..RawSettings::default()
            }
            .validate()
        };
        let s = with("80ms", 0.1).unwrap();
        assert_eq!(s.thin_linger, Duration::from_millis(80));
        assert_eq!(with("0s", 0.0).unwrap().thin_linger, Duration::ZERO);
        for (linger, load, key) in [
            ("2s", 0.1, "`thin_linger`"),
            ("soon", 0.1, "`thin_linger`"),
            ("40ms", 1.5, "`thin_linger_load`"),
            ("40ms", -0.1, "`thin_linger_load`"),
        ] {
            let err = with(linger, load).unwrap_err().to_string();
            assert!(err.contains(key), "{linger} {load}: {err}");
        }
    }

    #[test]
    fn layering_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("jetrelay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "workers = 3\nretention = \"2h\"\nmax_disk = \"1GiB\"\n",
        )
        .unwrap();
        #[derive(Serialize)]
        struct Flags {
            retention: &'static str,
        }
        let s = load(Some(&file), &Flags { retention: "1h" }).unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.max_disk, 1 << 30);
        assert_eq!(s.retention, Duration::from_secs(3600));
        #[derive(Serialize)]
        struct NoFlags {}
        std::fs::write(&file, "workers = \"many\"\n").unwrap();
        let err = load(Some(&file), &NoFlags {}).unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        std::fs::write(&file, "wrokers = 2\n").unwrap();
        let err = load(Some(&file), &NoFlags {}).unwrap_err().to_string();
        assert!(err.contains("wrokers"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
