//! `jetrelay`: the relay. See README.md for what it is and how to run it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use jetrelay::liveness::Liveness;
use serde::Serialize;

/// A Jetstream relay that serves the Bluesky event feed to tens of thousands of WebSocket
/// clients by letting the kernel do the fan-out. Every flag can also be set in the TOML file
/// (`--config`, key = flag name with `_`) or as `JETRELAY_<KEY>`; flags win.
#[derive(Parser, Serialize, Debug)]
#[command(name = "jetrelay", version)]
struct Flags {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Public WebSocket listener, HOST:PORT [default: 127.0.0.1:6008].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Listener for the TLS sidecar (requires PROXY v2): unix:PATH or HOST:PORT.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trusted_listen: Option<String>,
    /// Upstream Jetstream URL, `…/subscribe` or `…/xrpc/network.bsky.jetstream.subscribeEvents`
    /// (repeatable, in order of preference) [default: the two v2 public instances, then the
    /// four legacy ones].
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upstream: Vec<String>,
    /// Directory for the logs [default: $STATE_DIRECTORY or ./jetrelay-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Age retention, e.g. 24h [default: 24h].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<String>,
    /// Disk cap for logs and indexes, e.g. 20GiB [default: 20GiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_disk: Option<String>,
    /// Budget for all shape logs (shared pre-filtered logs) together, separate from
    /// --max-disk; the oldest events are trimmed from every shape beyond it
    /// [default: a quarter of --max-disk].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_shape_disk: Option<String>,
    /// New shapes one IP (per /64 for IPv6) may cause per minute; beyond, its filtered
    /// clients are served by walking the base log [default: 6].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shape_rate_per_ip: Option<f64>,
    /// Live shapes one IP (per /64 for IPv6) may have created (1 to 32); beyond, its new
    /// filters are served by walking the base log [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_shapes_per_ip: Option<usize>,
    /// Fan-out worker threads [default: one per CPU].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    /// Upstream reconnect rewind window, for resumes by time (legacy hosts, failover)
    /// [default: 5s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rewind: Option<String>,
    /// Largest clock difference between upstream instances that failover absorbs without loss
    /// or duplicates: a reconnect to another instance resumes this much earlier [default: 60s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_skew: Option<String>,
    /// Run fully offline with an embedded simulated upstream.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    demo: bool,
    /// Events per second of the demo upstream [default: 50].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    demo_rate: Option<u64>,
    /// Metrics, dashboard and health listener ("" disables) [default: 127.0.0.1:6009].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    /// Push metrics over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318 [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    /// Cap on clients in total [default: 100000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_clients: Option<usize>,
    /// Cap on concurrent connections per IP (per /64 for IPv6) [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_conns_per_ip: Option<usize>,
    /// New connections per second per IP [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    conn_rate_per_ip: Option<f64>,
    /// Address or CIDR exempt from per-IP limits (repeatable).
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow_ip: Vec<String>,
    /// Source address or CIDR a TCP --trusted-listen accepts (repeatable)
    /// [default: 127.0.0.0/8 and ::1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trusted_allow_ip: Vec<String>,
    /// Cap on handshakes in progress, in total [default: 4096].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_handshakes: Option<usize>,
    /// Cap on handshakes in progress per IP (per /64 for IPv6) [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_handshakes_per_ip: Option<usize>,
    /// Deadline for the HTTP upgrade [default: 10s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_timeout: Option<String>,
    /// Inbound bytes per second a client may send before it is closed [default: 2MiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_inbound_rate: Option<String>,
    /// Drop clients further behind live than this, e.g. 10m [default: never].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_lag: Option<String>,
    /// Memory budget for all clients' filter state (wantedDids, wantedCollections); beyond
    /// it handshakes get 503 and options_updates a close frame, with the reason
    /// [default: 512MiB].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_filter_memory: Option<String>,
    /// The share of --max-filter-memory the clients of one IP (per /64 for IPv6) may hold
    /// [default: an eighth of it].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_filter_memory_per_ip: Option<String>,
    /// Idle client ping period [default: 30s].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_interval: Option<String>,
    /// Share of a fan-out worker's time live sends may take; a busier worker holds the next
    /// round back (at most 10 ms) so that each send carries more events. 1 = never [default: 0.5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    fanout_duty: Option<f64>,
    /// Longest a send to a filtered or compressed client waits, under load, to carry at least
    /// 4 KiB: fewer, larger sends for thin streams. 0s = never [default: 80ms].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    thin_linger: Option<String>,
    /// Worker busy share (0–1) from which thin streams linger; they stop again below a third
    /// of it. 0 = always [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    thin_linger_load: Option<f64>,
    /// `options_update` messages per second a client may send (burst: 10 or twice the
    /// rate); beyond it the client is closed (1008).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    options_update_rate: Option<f64>,
    /// Whether `/subscribe` frames carry the relay's seq as a top-level `cursor` field, as the
    /// official server's do (`--v1-cursor-field false` for v1 clients that refuse unknown
    /// fields, e.g. PyPI atproto-jetstream 0.3.0) [default: true].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    v1_cursor_field: Option<bool>,
}

/// Longest interval between two `STATUS=` lines.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// systemd's watchdog timeout (`WatchdogSec`), if it is enabled for this process: as
/// `sd_watchdog_enabled(3)` reads it, `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another
/// process (the sd-notify crate also insists on `WATCHDOG_PID` being set).
fn watchdog_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|pid| pid.parse() == Ok(std::process::id()));
    (for_us && usec > 0).then(|| Duration::from_micros(usec))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let flags = Flags::parse();
    let settings = jetrelay::config::load(flags.config.as_deref(), &flags)?;
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())?;
    }
    let relay = jetrelay::relay::Relay::start(&settings)?;
    let watchdog = watchdog_timeout();
    let liveness = relay.hub.liveness.clone();
    liveness.set_stuck_after(Liveness::stuck_after_for_watchdog(watchdog));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    // Keep-alives at half the watchdog timeout; the status line at least every 5 s.
    let report_every = watchdog.map_or(STATUS_EVERY, |w| w / 2).min(STATUS_EVERY);
    let mut last_report = Instant::now();
    let mut last_bytes = 0u64;
    let mut was_stuck = false;
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        // Keep-alives only while every part progressed (or waits for a stated reason): a
        // wedged thread makes systemd restart the relay instead of leaving it limping.
        let parts = liveness.check();
        let stuck = !parts.healthy();
        if stuck && !was_stuck {
            tracing::error!(
                problem = parts.problem().unwrap_or_default(),
                "a critical part of the relay made no progress: withholding watchdog keep-alives"
            );
        } else if !stuck && was_stuck {
            tracing::info!("every part of the relay is making progress again");
        }
        let since = last_report.elapsed();
        if since < report_every && stuck == was_stuck {
            continue;
        }
        was_stuck = stuck;
        let c = &relay.hub.counters;
        let bytes = c.bytes_sent.load(Ordering::Relaxed);
        let gbps = (bytes - last_bytes) as f64 * 8.0 / since.as_secs_f64() / 1e9;
        last_bytes = bytes;
        last_report = Instant::now();
        let lag_ms = (jetrelay::index::now_us() as u64)
            .saturating_sub(c.newest_time_us.load(Ordering::Relaxed))
            / 1000;
        let mut status = format!(
            "{} clients, {:.3} Gbps, upstream lag {} ms",
            c.clients.load(Ordering::Relaxed),
            gbps,
            lag_ms
        );
        for problem in [
            parts.problem(),
            relay.hub.storage.problem(),
            parts.idle_summary(),
        ]
        .into_iter()
        .flatten()
        {
            status.push_str("; ");
            status.push_str(&problem);
        }
        let mut states = vec![sd_notify::NotifyState::Status(&status)];
        if watchdog.is_some() && !stuck {
            states.push(sd_notify::NotifyState::Watchdog);
        }
        let _ = sd_notify::notify(false, &states);
    }
    tracing::info!("signal received, shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    relay.shutdown();
    Ok(())
}
