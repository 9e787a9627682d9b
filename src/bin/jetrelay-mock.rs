//! jetrelay-mock: a simulated Jetstream upstream for tests, demos and benchmarks.

use anyhow::Context;
use clap::Parser;
use jetrelay::mock::{self, MockConfig, Wire};
use std::net::SocketAddr;
use std::time::Duration;

/// A Jetstream-compatible upstream that emits a deterministic event stream.
#[derive(Debug, Parser)]
#[command(name = "jetrelay-mock", version)]
struct Args {
    /// Address to listen on (GET /subscribe, /stats, /drop, /; with --wire v2 also
    /// /xrpc/network.bsky.jetstream.subscribeEvents and .getZstdDictionary).
    #[arg(long, default_value = mock::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Wire of --listen: legacy (v1, no cursor fields), cursor (v1 with seq cursors), v2 (a
    /// 2026 host: cursor /subscribe plus subscribeEvents and getZstdDictionary).
    #[arg(long, default_value = "legacy")]
    wire: Wire,
    /// Another listener over the same event stream, as ADDR=WIRE (repeatable).
    #[arg(long, value_parser = parse_listener)]
    also_listen: Vec<(SocketAddr, Wire)>,
    /// Wire seq of event number N is N + this (seq 0 is never assigned by default); give two
    /// mocks different offsets to model instance-local sequences.
    #[arg(long, default_value_t = mock::DEFAULT_SEQ_OFFSET)]
    seq_offset: u64,
    /// Every Nth event is a #sync instead: sent on subscribeEvents, a seq gap on /subscribe.
    #[arg(long)]
    sync_every: Option<u64>,
    /// Events per second (0 = as fast as subscribers consume).
    #[arg(long, default_value_t = mock::DEFAULT_RATE)]
    rate: u64,
    /// Seed of the generated DIDs; the swarm must use the same.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of distinct DIDs events are spread over.
    #[arg(long, default_value_t = mock::DEFAULT_DIDS)]
    dids: u64,
    /// Stop generating after N events (keep serving).
    #[arg(long)]
    count: Option<u64>,
    /// Events kept for cursor replay.
    #[arg(long, default_value_t = mock::DEFAULT_HISTORY)]
    history: usize,
    /// Abruptly drop all subscriber connections every DUR (e.g. 30s).
    #[arg(long, value_parser = parse_dur)]
    drop_every: Option<Duration>,
    /// Inject one malformed message after every N events.
    #[arg(long)]
    malformed_every: Option<u64>,
    /// Move time_us of ~30% of events back by up to J ms (non-monotonic, like real traffic).
    #[arg(long, default_value_t = 0)]
    time_jitter_ms: u64,
    /// Interval of WebSocket pings to subscribers.
    #[arg(long, value_parser = parse_dur, default_value = "30s")]
    ping_interval: Duration,
    /// Start emitting at once instead of when the first subscriber connects.
    #[arg(long)]
    start_immediately: bool,
    /// Shift every time_us by this many ms (negative: behind), like an instance whose clock
    /// is off.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clock_offset_ms: i64,
    /// Stamp one event far off: SEQ:MS adds MS ms (negative: into the past) to event SEQ.
    #[arg(long, value_parser = parse_outlier)]
    time_outlier: Option<(u64, i64)>,
    /// Print N DIDs of the generator's population (one per line, spread over it) and exit:
    /// the benchmark builds `wantedDids` filters from them.
    #[arg(long)]
    print_dids: Option<u64>,
}

fn parse_listener(s: &str) -> Result<(SocketAddr, Wire), String> {
    let (addr, wire) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("expected ADDR=WIRE, got {s:?}"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?;
    Ok((addr, wire.parse()?))
}

fn parse_outlier(s: &str) -> Result<(u64, i64), String> {
    let (seq, ms) = s
        .split_once(':')
        .ok_or_else(|| format!("expected SEQ:MS, got {s:?}"))?;
    let seq = seq.parse().map_err(|e| format!("SEQ in {s:?}: {e}"))?;
    let ms: i64 = ms.parse().map_err(|e| format!("MS in {s:?}: {e}"))?;
    Ok((seq, ms.saturating_mul(1000)))
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    mock::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if let Some(n) = a.print_dids {
        let generator = mock::Generator::new(a.seed, a.dids);
        let step = (a.dids / n.max(1)).max(1);
        for i in 0..n.min(a.dids) {
            println!("{}", generator.did_by_index(i * step));
        }
        return Ok(());
    }
    let config = MockConfig {
        listen: a.listen,
        rate: a.rate,
        seed: a.seed,
        dids: a.dids,
        count: a.count,
        history: a.history,
        drop_every: a.drop_every,
        malformed_every: a.malformed_every,
        time_jitter_ms: a.time_jitter_ms,
        ping_interval: a.ping_interval,
        start_immediately: a.start_immediately,
        wire: a.wire,
        also_listen: a.also_listen,
        seq_offset: a.seq_offset,
        sync_every: a.sync_every,
        clock: mock::ClockFaults {
            offset_us: a.clock_offset_ms.saturating_mul(1000),
            outlier: a.time_outlier,
        },
    };
    let handle = mock::spawn(config).with_context(|| format!("starting mock on {}", a.listen))?;
    for (addr, wire) in handle.local_addrs() {
        tracing::info!(%addr, wire = wire.as_str(), "ready");
    }
    wait_for_signal();
    tracing::info!(events = handle.seq(), "stopping");
    drop(handle);
    Ok(())
}

/// Blocks until SIGTERM or SIGINT, using tokio's signal support on a tiny runtime (the only
/// portable, unsafe-free way available in the dependency set).
fn wait_for_signal() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => loop {
            std::thread::park();
        },
    };
    rt.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
