//! `jetrelay-tls`: TLS on the outside, PROXY v2 + plaintext to the relay on the inside.
//!
//! This file is the process edge: flags and config, logging, file-descriptor limit,
//! signals (SIGHUP reload, SIGTERM/SIGINT drain) and systemd notifications. The proxy itself
//! is `jetrelay::tls`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use jetrelay::tls::certs::CertStore;
use jetrelay::tls::config::{Cli, Config};
use jetrelay::tls::{ReloadHandle, Server};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// How often STATUS= is refreshed. Why: `systemctl status` readers want recent numbers,
/// and a datagram every few seconds is free.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// File descriptors needed besides the two per connection (listeners, logs, runtime).
const FD_HEADROOM: u64 = 64;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whole cause chain: "loading certificates: /etc/…/key.pem does not …".
            eprintln!("jetrelay-tls: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli)?;

    if cli.check_config {
        let provider = rustls::crypto::ring::default_provider();
        let store = CertStore::load(&config.certs, &provider).context("loading certificates")?;
        println!("configuration ok");
        println!("listen: {:?}", config.listen);
        println!("backend: {}", config.backend);
        println!("certificates: {}", store.describe());
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("jetrelay-tls")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let max_connections = config.max_connections;
    let server = Server::bind(config).await?;
    raise_fd_limit(max_connections);
    let stats = server.stats();
    tokio::spawn(reload_on_sighup(server.reload_handle()));
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    notify(&[NotifyState::Ready, NotifyState::Status("listening")]);
    let status = tokio::spawn(async move {
        let mut watchdog_usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
        // Pet the watchdog at half its period, never less often than STATUS_INTERVAL.
        let period = if watchdog {
            STATUS_INTERVAL.min(Duration::from_micros(watchdog_usec) / 2)
        } else {
            STATUS_INTERVAL
        };
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let line = stats.summary();
            notify(&[NotifyState::Status(&line)]);
            if watchdog {
                notify(&[NotifyState::Watchdog]);
            }
        }
    });

    let shutdown = async {
        let which = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal = which, "shutting down");
        notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    };
    let left = server.run(shutdown).await;
    status.abort();
    if left > 0 {
        warn!(left, "exiting with connections still open");
    }
    Ok(())
}

async fn reload_on_sighup(handle: ReloadHandle) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install SIGHUP handler; reload only on file changes");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        info!("SIGHUP: reloading certificates");
        handle.reload_now();
    }
}

/// sd_notify is a no-op without NOTIFY_SOCKET; a failure to reach systemd is not fatal.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "sd_notify failed");
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Two descriptors per connection: raise the soft limit to the hard limit (as nginx's
/// worker_rlimit_nofile would), and say so if even that is too low for max_connections.
fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(FD_HEADROOM);
    if let Some(current) = getrlimit(Resource::Nofile).current
        && current < needed
    {
        warn!(
            limit = current,
            needed,
            "open-file limit is below 2 x max_connections; accept will fail with EMFILE \
             before max_connections is reached (raise LimitNOFILE)"
        );
    }
}
