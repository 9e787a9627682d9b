//! jetrelay-mock: a simulated Jetstream upstream for tests, demos and benchmarks.

use anyhow::Context;
use clap::Parser;
use jetrelay::mock::{self, MockConfig};
use std::net::SocketAddr;
use std::time::Duration;

/// A Jetstream-compatible upstream that emits a deterministic event stream.
#[derive(Debug, Parser)]
#[command(name = "jetrelay-mock", version)]
struct Args {
    /// Address to listen on (GET /subscribe, /stats, /drop, /).
    #[arg(long, default_value = mock::DEFAULT_LISTEN)]
    listen: SocketAddr,
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
    /// Print N DIDs of the generator's population (one per line, spread over it) and exit:
    /// the benchmark builds `wantedDids` filters from them.
    #[arg(long)]
    print_dids: Option<u64>,
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
    };
    let handle = mock::spawn(config).with_context(|| format!("starting mock on {}", a.listen))?;
    tracing::info!(addr = %handle.local_addr(), "ready");
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
