//! `jetrelay-tls`: the TLS-terminating proxy that faces the internet in front of the relay.
//!
//! The relay streams its log to clients with splice(2), which only works on plaintext
//! sockets, so TLS lives in this separate process: it accepts TLS (1.2/1.3, rustls with
//! ring), opens one backend connection per client to the relay's trusted listener (Unix
//! socket preferred), writes a PROXY v2 header carrying the client's real address, and then
//! copies bytes both ways until either side closes.
//!
//! Modules, in the order a connection meets them:
//! * [`config`]: settings (defaults < TOML < env < flags);
//! * [`certs`]: PEM loading, SNI selection, reload on change;
//! * [`limits`]: counters and gauges behind the connection and handshake caps;
//! * [`conn`]: one connection's life: handshake (permits held only while computing), backend,
//!   PROXY header;
//! * [`pump`]: the bounded, buffer-frugal bidirectional copy with idle/half-close deadlines.
//!
//! This module ties them together: listeners, the accept loop, the certificate watcher and
//! graceful draining. Signals and sd_notify live in the binary (`src/bin/jetrelay-tls.rs`).

pub mod certs;
pub mod config;
pub mod conn;
pub mod limits;
pub mod pump;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, atomic::AtomicBool};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use certs::{CertReloader, CertResolver, CertStore, Reload};
use config::Config;
use conn::Shared;
use limits::{Stats, Throttle};

/// How often certificate files are checked for changes. Why 2 s: stat(2) of a few files is
/// free, and a renewed certificate is in use within seconds without an inotify dependency.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// listen(2) backlog. Why: absorbs a reconnect storm (every client of a restarted relay at
/// once) while handshakes are rate-limited by `max_handshakes`; the kernel caps it at
/// net.core.somaxconn anyway.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Pause after an accept error such as EMFILE. Why: the pending connection stays in the
/// backlog, so retrying at once would spin a core at 100% without making progress.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Spacing of repeated warnings (backend down, accept errors).
pub const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// The ALPN protocol we speak: WebSocket upgrades are HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The initial certificates could not be loaded.
    #[error("loading certificates")]
    Certs(#[from] certs::CertError),
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// Asks the certificate watcher to reload now (SIGHUP).
#[derive(Debug, Clone)]
pub struct ReloadHandle(mpsc::Sender<()>);

impl ReloadHandle {
    /// Requests a reload, even if no file changed. Ignored once the server has stopped.
    pub fn reload_now(&self) {
        let _ = self.0.send(());
    }
}

/// A bound, ready-to-run sidecar.
pub struct Server {
    /// Bound listeners, in configuration order.
    listeners: Vec<TcpListener>,
    /// State shared with every connection task.
    shared: Arc<Shared>,
    /// How long `run` waits for established connections after shutdown is requested.
    drain_timeout: Duration,
    /// Keeps the watcher thread alive until [`Server::run`] ends.
    reload: ReloadHandle,
}

/// Builds the rustls configuration around a certificate resolver.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
) -> Result<ServerConfig, rustls::Error> {
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Stateless resumption: a reconnecting client skips the key exchange and certificate,
    // and the server keeps no per-session memory. Keys rotate inside the ticketer.
    tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(tls)
}

impl Server {
    /// Loads the certificates and binds every listener; nothing is accepted until `run`.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = CertStore::load(&config.certs, &provider)?;
        info!(certificates = %store.describe(), "certificates loaded");
        let resolver = Arc::new(CertResolver::new(store));
        let tls = server_config(provider.clone(), resolver.clone())?;

        let mut listeners = Vec::with_capacity(config.listen.len());
        for &addr in &config.listen {
            // `[::]:443` next to `0.0.0.0:443` must not claim IPv4 too (Linux dual-stack
            // default), or the second bind fails with EADDRINUSE.
            let v6_only = addr.is_ipv6()
                && config
                    .listen
                    .iter()
                    .any(|other| other.is_ipv4() && other.port() == addr.port());
            let listener =
                listen(addr, v6_only).map_err(|source| StartError::Listen { addr, source })?;
            info!(addr = %listener.local_addr().unwrap_or(addr), "listening");
            listeners.push(listener);
        }

        let shared = Arc::new(Shared {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            backend: config.backend.clone(),
            handshake_timeout: config.handshake_timeout,
            timeouts: pump::Timeouts {
                idle: config.idle_timeout,
                half_close: config.half_close_timeout,
            },
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            stats: Arc::new(Stats::default()),
            draining: AtomicBool::new(false),
            backend_warnings: Throttle::new(WARN_INTERVAL),
            limits: Arc::new(crate::limits::Limits::new(crate::limits::LimitsConfig {
                // The total is `max_connections`' semaphore; only the per-address parts apply.
                max_clients: usize::MAX,
                max_conns_per_ip: config.max_conns_per_ip,
                conn_rate_per_ip: config.conn_rate_per_ip,
                allow: config.allow_ip.clone(),
            })),
            handshakes_per_address: Arc::new(limits::AddressCounts::default()),
            max_handshakes_per_ip: config.max_handshakes_per_ip,
            refusal_warnings: Throttle::new(WARN_INTERVAL),
        });
        let reloader = CertReloader::new(config.certs.clone(), resolver, provider);
        let reload = ReloadHandle(spawn_cert_watcher(reloader));
        Ok(Server {
            listeners,
            shared,
            drain_timeout: config.drain_timeout,
            reload,
        })
    }

    /// The bound addresses (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// A handle that triggers a certificate reload.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Accepts until `shutdown` completes, then stops accepting and waits up to
    /// `drain_timeout` for established connections to finish. Returns how many were still
    /// open when it gave up (0 = fully drained).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> usize {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accepting = JoinSet::new();
        for listener in self.listeners {
            accepting.spawn(accept_loop(listener, self.shared.clone(), stop_rx.clone()));
        }
        shutdown.await;

        let shared = self.shared;
        shared.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        // Listeners close as their loops return: new connections are refused from here on.
        accepting.join_all().await;
        let open = shared.max_connections - shared.connections.available_permits();
        info!(
            open,
            drain_timeout = ?self.drain_timeout,
            "stopped accepting; draining connections"
        );
        // Every connection task holds one permit: holding them all means all are gone.
        let all = u32::try_from(shared.max_connections).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout(self.drain_timeout, shared.connections.acquire_many(all)).await;
        let left = shared.max_connections - shared.connections.available_permits();
        match drained {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!(left, "drain timeout: closing remaining connections"),
        }
        drop(self.reload);
        if drained.is_ok() { 0 } else { left }
    }
}

/// Binds a listener with SO_REUSEADDR (restarts don't wait out TIME_WAIT) and our backlog.
fn listen(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if v6_only {
        rustix::net::sockopt::set_ipv6_v6only(&socket, true)?;
    }
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let errors = Throttle::new(WARN_INTERVAL);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let peer = conn::canonical(peer);
                let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                    // Over the cap: the accept already happened; closing at once tells the
                    // client to go elsewhere and frees the fd.
                    Stats::bump(&shared.stats.rejected_over_capacity);
                    debug!(%peer, "max_connections reached; closing");
                    drop(stream);
                    continue;
                };
                // Per address, before any TLS work: a refusal is a close, at once.
                let Some(admitted) = conn::admit(&shared, peer) else {
                    drop(stream);
                    continue;
                };
                Stats::bump(&shared.stats.accepted);
                tokio::spawn(conn::serve(shared.clone(), stream, peer, permit, admitted));
            }
            Err(e) if is_per_connection_error(&e) => {
                debug!(error = %e, "accept: connection aborted before accept");
            }
            Err(e) => {
                Stats::bump(&shared.stats.accept_errors);
                if errors.allow() {
                    error!(
                        error = %e,
                        total = Stats::get(&shared.stats.accept_errors),
                        "accept failed; backing off"
                    );
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Errors about one pending connection (it died in the backlog): retry at once.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Runs the certificate watcher on its own thread (file I/O and key parsing are blocking
/// work): polls every [`CERT_POLL_INTERVAL`], reloads at once on request, and exits when
/// every [`ReloadHandle`] is gone.
fn spawn_cert_watcher(mut reloader: CertReloader) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("cert-watcher".into())
        .spawn(move || {
            loop {
                let forced = match rx.recv_timeout(CERT_POLL_INTERVAL) {
                    Ok(()) => true,
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                match reloader.reload(forced) {
                    Ok(Reload::Unchanged) => {}
                    Ok(Reload::Replaced(description)) => {
                        info!(certificates = %description, forced, "certificates reloaded");
                    }
                    Err(e) => {
                        error!("certificate reload failed, keeping the previous certificates: {e}")
                    }
                }
            }
        });
    if let Err(e) = spawned {
        error!(error = %e, "cannot start the certificate watcher; reloads are disabled");
    }
    tx
}
