//! jetrelay-swarm: many verifying WebSocket clients, one epoll thread per process.

use clap::Parser;
use jetrelay::mock;
use jetrelay::swarm::{self, Expectations, SwarmConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load and verification client for Jetstream-compatible servers.
#[derive(Debug, Parser)]
#[command(name = "jetrelay-swarm", version)]
struct Args {
    /// ws:// or wss:// URL, query passed through (repeatable: clients are spread round-robin).
    /// The path picks the stream: /xrpc/network.bsky.jetstream.subscribeEvents is v2
    /// (kinds, dids, collections, maxMessageSizeBytes, zstdDictionary, cursor), anything else
    /// v1 (/subscribe: wantedCollections, wantedDids, maxMessageSizeBytes, compress, cursor).
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Concurrent clients (in total).
    #[arg(long, default_value_t = 1)]
    clients: u64,
    /// Spread clients over K child processes (fd limits, or a second core).
    #[arg(long, default_value_t = 1)]
    processes: u64,
    /// Run time; then report and exit.
    #[arg(long, value_parser = parse_dur, default_value = "10s")]
    duration: Duration,
    /// The mock's seed: regenerate and byte-compare every event.
    #[arg(long)]
    seed: Option<u64>,
    /// The mock's --dids (needed for wantedDids filters).
    #[arg(long, default_value_t = mock::DEFAULT_DIDS)]
    dids: u64,
    /// Ask for compression and decode it: compress=true (v1 dictionary) on v1 URLs,
    /// zstdDictionary=20260811 (v2 dictionary) on v2 URLs. A URL may ask by itself instead.
    #[arg(long)]
    compress: bool,
    /// Every Nth event of the mock is a #sync (the mock's --sync-every): never on v1, placed
    /// in the expected sequence on v2.
    #[arg(long)]
    sync_every: Option<u64>,
    /// On close/EOF, reconnect with cursor = the last seq received when the stream carries
    /// seqs (v1 cursor field, v2 seq: exact, the replayed one is skipped), else the newest
    /// time_us seen (replayed duplicates skipped).
    #[arg(long)]
    reconnect: bool,
    /// Connection attempts per second (whole swarm).
    #[arg(long, default_value_t = swarm::DEFAULT_CONNECT_RATE)]
    connect_rate: u64,
    /// Limit for TCP connect + upgrade.
    #[arg(long, value_parser = parse_dur, default_value = "10s")]
    connect_timeout: Duration,
    /// Send this text frame right after each upgrade (repeatable), e.g. an options_update.
    #[arg(long)]
    send_on_open: Vec<String>,
    /// Stop reading after N events (a stalled client) for --pause-for, then resume.
    #[arg(long)]
    pause_after: Option<u64>,
    /// How long a stalled client stops reading.
    #[arg(long, value_parser = parse_dur, default_value = "5s")]
    pause_for: Duration,
    /// Only clients with id < M stall (default: all).
    #[arg(long)]
    pause_clients: Option<u64>,
    /// PEM CA certificates for wss:// URLs (default: webpki roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Each client must receive at least N events.
    #[arg(long)]
    expect_min_events: Option<u64>,
    /// Each client must receive at most N events.
    #[arg(long)]
    expect_max_events: Option<u64>,
    /// Each client's seqs must be exactly the expected (contiguous or filtered) sequence.
    #[arg(long)]
    expect_in_order: bool,
    /// Each client's first event must have this seq.
    #[arg(long)]
    expect_first_seq: Option<u64>,
    /// Latency p99 must be at most X ms.
    #[arg(long)]
    expect_p99_ms: Option<f64>,
    /// Each client must receive a close frame with this code.
    #[arg(long)]
    expect_close_code: Option<u16>,
    /// At least N clients must complete the upgrade.
    #[arg(long)]
    expect_connected: Option<u64>,
    /// Every upgrade must be refused with this HTTP status.
    #[arg(long)]
    expect_http_status: Option<u16>,
    /// Each client must receive a v2 #info with this name (e.g. FutureCursor).
    #[arg(long)]
    expect_info: Option<String>,
    /// Each client must receive a v2 error frame with this name (e.g. ConsumerTooSlow).
    #[arg(long)]
    expect_error_frame: Option<String>,
    /// present: every v1 event must carry the server's cursor field; absent: none may.
    #[arg(long, value_parser = parse_presence)]
    expect_cursor_field: Option<bool>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Internal: run shard I of --processes as a child and print its raw report.
    #[arg(long, hide = true)]
    shard_index: Option<u64>,
}

fn parse_presence(s: &str) -> Result<bool, String> {
    match s {
        "present" => Ok(true),
        "absent" => Ok(false),
        _ => Err(format!("expected present or absent, got {s:?}")),
    }
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    mock::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let processes = a.processes.max(1);
    let config = SwarmConfig {
        urls: a.url.clone(),
        clients: a.clients,
        duration: a.duration,
        seed: a.seed,
        dids: a.dids,
        compress: a.compress,
        sync_every: a.sync_every,
        reconnect: a.reconnect,
        connect_rate: a.connect_rate.div_ceil(processes).max(1),
        connect_timeout: a.connect_timeout,
        send_on_open: a.send_on_open.clone(),
        pause_after: a.pause_after,
        pause_for: a.pause_for,
        pause_clients: a.pause_clients,
        ca_file: a.ca_file.clone(),
        expect: Expectations {
            min_events: a.expect_min_events,
            max_events: a.expect_max_events,
            in_order: a.expect_in_order,
            first_seq: a.expect_first_seq,
            p99_ms: a.expect_p99_ms,
            close_code: a.expect_close_code,
            connected: a.expect_connected,
            http_status: a.expect_http_status,
            info: a.expect_info.clone(),
            error_frame: a.expect_error_frame.clone(),
            cursor_field: a.expect_cursor_field,
        },
        shard: (a.shard_index.unwrap_or(0), processes),
    };
    if a.shard_index.is_some() {
        // Child: raw shard report on stdout for the parent to merge.
        return match swarm::run_shard(&config) {
            Ok(r) => match serde_json::to_string(&r) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("jetrelay-swarm: {e}");
                    ExitCode::from(2)
                }
            },
            Err(e) => {
                eprintln!("jetrelay-swarm: {e}");
                ExitCode::from(2)
            }
        };
    }
    let result = if processes > 1 {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match std::env::current_exe() {
            Ok(exe) => swarm::run_processes(&exe, &args, processes, &config),
            Err(e) => {
                eprintln!("jetrelay-swarm: cannot find own executable: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        swarm::run(&config)
    };
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jetrelay-swarm: {e}");
            return ExitCode::from(2);
        }
    };
    report.histogram = None;
    report.client_max_time_us.clear();
    if a.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("jetrelay-swarm: {e}"),
        }
    } else {
        print!("{}", report.human());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        for f in &report.expectation_failures {
            eprintln!(
                "jetrelay-swarm: FAILED {}: {}",
                f.expectation,
                f.examples.join("; ")
            );
        }
        ExitCode::FAILURE
    }
}
