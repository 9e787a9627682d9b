//! One client connection, start to finish: admission by address (at accept, before any TLS
//! work), TLS handshake (bounded in time and in how many run at once), backend connection,
//! PROXY v2 header, then the [`pump`](super::pump).
//!
//! The handshake holds one of the `max_handshakes` permits only while the sidecar computes:
//! the ClientHello is collected without one, the server's flight is computed under one, and
//! from then on [`HandshakeIo`] gives the permit back whenever the handshake waits for the
//! peer and takes one again when the peer's next flight is there to process. A silent, slow
//! or stalled peer costs its socket and its address's share, never a permit.
//!
//! Every failure closes this connection only. Failures a client can cause (garbage, plain
//! HTTP, a truncated ClientHello, a stall) are logged at debug and counted; failures of our
//! own side (backend unreachable) are logged at warn, throttled.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tracing::{debug, warn};

use super::config::Backend;
use super::limits::{AddressCounts, AddressSlot, GaugeGuard, Stats, Throttle};
use super::pump::{self, Outcome, Timeouts};
use crate::limits::{Counted, Limit, Limits, address_key};
use crate::proxy_protocol;

/// Cap on rustls' buffer of encrypted bytes not yet written to a slow client. Why 16 KiB:
/// about one full TLS record; together with the pump's pending chunk it bounds what a slow
/// client can make us hold to ~32 KiB, and leaves the rest of the backpressure to the
/// kernel's socket buffers. (rustls' default is 64 KiB.)
pub const TLS_SEND_BUFFER_LIMIT: usize = 16 * 1024;

/// Deadline for connecting to the backend. Why: it is on the same host, so a connect that
/// takes longer means it is wedged (backlog full); the client should get a clean close
/// rather than wait for its own timeout.
pub const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline for the goodbye (close_notify) after a timeout or a backend failure. Why: it is
/// one small record; a client that doesn't take it promptly doesn't deserve more.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the connection tasks share.
pub struct Shared {
    /// rustls configuration with the reloadable certificate resolver.
    pub acceptor: TlsAcceptor,
    /// Where decrypted connections go.
    pub backend: Backend,
    /// Deadline for the whole handshake, including the wait for a handshake slot.
    pub handshake_timeout: Duration,
    /// Idle and half-close deadlines of established connections.
    pub timeouts: Timeouts,
    /// Handshake computations in progress (`max_handshakes`), see [`HandshakeIo`].
    pub handshakes: Arc<Semaphore>,
    /// Connections (`max_connections`); each task owns one permit.
    pub connections: Arc<Semaphore>,
    /// The configured `max_connections` (= the semaphore's size), for draining.
    pub max_connections: usize,
    /// Counters for STATUS= and logs.
    pub stats: Arc<Stats>,
    /// Set on SIGTERM: finished handshakes are closed instead of being connected.
    pub draining: AtomicBool,
    /// Keeps "backend unreachable" warnings to one per interval.
    pub backend_warnings: Throttle,
    /// Per-address connection cap and connection (= full handshake) rate.
    pub limits: Arc<Limits>,
    /// Handshakes in progress per address key.
    pub handshakes_per_address: Arc<AddressCounts>,
    /// The cap on those (`max_handshakes_per_ip`).
    pub max_handshakes_per_ip: usize,
    /// Keeps the summary of connections refused at accept to one line per interval.
    pub refusal_warnings: Throttle,
}

/// What a connection holds under the per-address limits; released when dropped.
pub struct Admitted {
    /// Its count in the per-address connection limits, for the connection's whole life.
    _counted: Counted,
    /// Its address's handshake count, until the handshake ends (None when exempt).
    handshake: Option<AddressSlot>,
}

/// Checks a new connection's address (at accept, before any TLS work) and counts it. On
/// refusal the caller closes the connection; the refusal is counted here.
pub fn admit(shared: &Shared, peer: SocketAddr) -> Option<Admitted> {
    let ip = peer.ip();
    let handshake = if shared.limits.exempt(ip) {
        None
    } else {
        match shared
            .handshakes_per_address
            .try_enter(address_key(ip), shared.max_handshakes_per_ip)
        {
            Some(slot) => Some(slot),
            None => {
                refused(shared, peer, &shared.stats.rejected_handshakes_per_ip);
                return None;
            }
        }
    };
    match shared.limits.admit_counted(ip) {
        Ok(counted) => Some(Admitted {
            _counted: counted,
            handshake,
        }),
        Err(limit) => {
            let counter = match limit {
                Limit::RatePerAddress => &shared.stats.rejected_rate_per_ip,
                Limit::ConnsPerAddress => &shared.stats.rejected_conns_per_ip,
                Limit::MaxClients => &shared.stats.rejected_over_capacity,
            };
            refused(shared, peer, counter);
            None
        }
    }
}

fn refused(shared: &Shared, peer: SocketAddr, counter: &std::sync::atomic::AtomicU64) {
    Stats::bump(counter);
    if shared.refusal_warnings.allow() {
        warn!(%peer, summary = %shared.stats.summary(), "closing connections at accept: per-address limits (one line per interval)");
    }
}

/// Maps IPv4-mapped IPv6 addresses (from a dual-stack `[::]` listener) back to IPv4, so the
/// per-IP limits (ours and the relay's) see one address per client.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Serves one accepted client connection (`peer` already [`canonical`]). `_permit` is this
/// connection's slot under `max_connections` and `admitted` its per-address counts, both
/// released when the task ends (the handshake count when the handshake does).
pub async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    mut admitted: Admitted,
) {
    // WebSocket frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => {
            debug!(%peer, error = %e, "connection gone before the handshake");
            return;
        }
    };

    let handshaking = GaugeGuard::new(&shared.stats.handshaking);
    let handshake = async {
        // The ClientHello first, without a permit: waiting for bytes costs no CPU.
        let mut start = LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            HandshakeIo::new(stream),
        )
        .await?;
        // The semaphore is never closed; an error cannot happen, but fail closed if it does.
        let permit = shared
            .handshakes
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        start.io.gate(shared.handshakes.clone(), permit);
        // Computes the server's flight (key exchange, signature) under the permit, here;
        // the rest of the handshake takes and returns permits as the peer's flights come.
        start
            .into_stream_with(shared.acceptor.config().clone(), |conn| {
                conn.set_buffer_limit(Some(TLS_SEND_BUFFER_LIMIT));
            })
            .await
    };
    let mut tls = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Stats::bump(&shared.stats.handshake_failures);
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            Stats::bump(&shared.stats.handshake_timeouts);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    tls.get_mut().0.ungate();
    drop(handshaking);
    admitted.handshake = None;
    let _established = GaugeGuard::new(&shared.stats.established);

    if shared.draining.load(Ordering::Relaxed) {
        close_quietly(&mut tls).await;
        return;
    }

    let header = {
        let mut out = Vec::with_capacity(proxy_protocol::V2_FIXED_LEN + 36);
        proxy_protocol::encode_v2(peer, local, &mut out);
        out
    };
    let outcome = match &shared.backend {
        Backend::Unix(path) => match connect(UnixStream::connect(path), &header).await {
            Ok(mut backend) => pump::pump(&mut tls, &mut backend, shared.timeouts).await,
            Err(e) => return backend_down(&shared, &mut tls, peer, e).await,
        },
        Backend::Tcp(addr) => {
            let connecting = async {
                let s = TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                Ok(s)
            };
            match connect(connecting, &header).await {
                Ok(mut backend) => pump::pump(&mut tls, &mut backend, shared.timeouts).await,
                Err(e) => return backend_down(&shared, &mut tls, peer, e).await,
            }
        }
    };

    let (outcome, traffic) = outcome;
    match outcome {
        Outcome::Closed => {
            debug!(%peer, up = traffic.up, down = traffic.down, "connection closed");
        }
        Outcome::IdleTimeout => {
            Stats::bump(&shared.stats.idle_timeouts);
            debug!(%peer, "idle timeout");
            close_quietly(&mut tls).await;
        }
        Outcome::HalfCloseTimeout => {
            Stats::bump(&shared.stats.half_close_timeouts);
            debug!(%peer, "half-close timeout");
            close_quietly(&mut tls).await;
        }
        Outcome::ClientError(e) => {
            debug!(%peer, error = %e, up = traffic.up, down = traffic.down, "client error");
        }
        Outcome::BackendError(e) => {
            debug!(%peer, error = %e, "backend connection error");
            close_quietly(&mut tls).await;
        }
    }
    // Dropping closes both sockets; the backend sees FIN, the client TCP close.
}

/// Connects (bounded by [`BACKEND_CONNECT_TIMEOUT`]) and writes the PROXY header first.
async fn connect<S, F>(connecting: F, header: &[u8]) -> std::io::Result<S>
where
    S: AsyncWrite + Unpin,
    F: Future<Output = std::io::Result<S>>,
{
    let mut backend = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    // A fresh socket's send buffer takes these few dozen bytes at once.
    backend.write_all(header).await?;
    Ok(backend)
}

async fn backend_down<S: AsyncWrite + Unpin>(
    shared: &Shared,
    tls: &mut S,
    peer: SocketAddr,
    error: std::io::Error,
) {
    Stats::bump(&shared.stats.backend_failures);
    if shared.backend_warnings.allow() {
        warn!(
            backend = %shared.backend,
            %peer,
            error = %error,
            total_failures = Stats::get(&shared.stats.backend_failures),
            "cannot reach the backend; closing client connections cleanly"
        );
    } else {
        debug!(backend = %shared.backend, %peer, error = %error, "cannot reach the backend");
    }
    close_quietly(tls).await;
}

/// Sends close_notify and shuts the TCP write side, within [`CLOSE_TIMEOUT`].
async fn close_quietly<S: AsyncWrite + Unpin>(tls: &mut S) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
}

/// The client socket. During the handshake it is gated: it holds a `max_handshakes` permit
/// while the peer's bytes are read and processed (the TLS code computes right after a read
/// returns data) and gives it back as soon as a read or write would wait for the peer; when
/// the socket is readable again it takes a permit before handing the bytes over. Ungated
/// (while the ClientHello is collected, and once the handshake is done) it is the bare
/// socket.
#[derive(Debug)]
pub struct HandshakeIo {
    /// The client connection.
    stream: TcpStream,
    /// The permit bookkeeping while gated.
    gate: Option<PermitGate>,
}

/// Where a gated [`HandshakeIo`] takes its permits from, and the one it holds.
struct PermitGate {
    /// The `max_handshakes` semaphore.
    permits: Arc<Semaphore>,
    /// Held while the handshake is computing.
    held: Option<OwnedSemaphorePermit>,
    /// A pending acquisition (kept across polls so the place in the queue is kept).
    acquiring: Option<Pin<Box<AcquireFuture>>>,
}

type AcquireFuture = dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send;

impl std::fmt::Debug for PermitGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermitGate")
            .field("held", &self.held.is_some())
            .field("acquiring", &self.acquiring.is_some())
            .finish()
    }
}

impl PermitGate {
    /// Ready once a permit is held.
    fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.held.is_some() {
            return Poll::Ready(Ok(()));
        }
        let permits = &self.permits;
        let acquiring = self
            .acquiring
            .get_or_insert_with(|| Box::pin(permits.clone().acquire_owned()));
        let acquired = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        // The semaphore is never closed; fail closed if it is.
        self.held = Some(acquired.map_err(std::io::Error::other)?);
        Poll::Ready(Ok(()))
    }

    /// The handshake is about to wait for the peer: give the permit back.
    fn release_if_pending<T>(&mut self, polled: &Poll<T>) {
        if polled.is_pending() {
            self.held = None;
        }
    }
}

impl HandshakeIo {
    /// An ungated socket.
    pub fn new(stream: TcpStream) -> Self {
        HandshakeIo { stream, gate: None }
    }

    /// Gates the socket from now on, starting with `held` (taken from `permits`).
    pub fn gate(&mut self, permits: Arc<Semaphore>, held: OwnedSemaphorePermit) {
        self.gate = Some(PermitGate {
            permits,
            held: Some(held),
            acquiring: None,
        });
    }

    /// Ends the gating (the handshake is done) and gives back any permit.
    pub fn ungate(&mut self) {
        self.gate = None;
    }

    /// Whether a permit is held now.
    pub fn holds_permit(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.held.is_some())
    }
}

impl AsyncRead for HandshakeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(gate) = &mut this.gate else {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        };
        if gate.held.is_none() {
            // Wait for the peer without a permit; take one only when there is work.
            ready!(this.stream.poll_read_ready(cx))?;
            ready!(gate.poll_acquire(cx))?;
        }
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        gate.release_if_pending(&polled);
        polled
    }
}

impl AsyncWrite for HandshakeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Some(gate) = &mut this.gate {
            gate.release_if_pending(&polled);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Some(gate) = &mut this.gate {
            gate.release_if_pending(&polled);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        if let Some(gate) = &mut this.gate {
            gate.release_if_pending(&polled);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        if let Some(gate) = &mut this.gate {
            gate.release_if_pending(&polled);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected loopback pair: (our side wrapped, the peer's side).
    async fn pair() -> (HandshakeIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (peer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (HandshakeIo::new(accepted.unwrap().0), peer.unwrap())
    }

    #[tokio::test]
    async fn gated_socket_holds_a_permit_only_while_the_peers_bytes_are_processed() {
        let permits = Arc::new(Semaphore::new(1));
        let (mut io, mut peer) = pair().await;
        let first = permits.clone().acquire_owned().await.unwrap();
        io.gate(permits.clone(), first);
        assert_eq!(
            permits.available_permits(),
            0,
            "starts with the given permit"
        );

        // Waiting for the peer gives the permit back.
        let mut buf = [0u8; 16];
        let waited = tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing to read yet");
        assert!(!io.holds_permit());
        assert_eq!(permits.available_permits(), 1);

        // The peer's bytes are handed over under a permit...
        peer.write_all(b"flight").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("read")
            .unwrap();
        assert_eq!(&buf[..n], b"flight");
        assert!(io.holds_permit());
        assert_eq!(permits.available_permits(), 0);

        // ...and only once one is free: another holder delays the read, not loses it.
        let waited = tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await;
        assert!(waited.is_err());
        let other = permits.clone().acquire_owned().await.unwrap();
        peer.write_all(b"next").await.unwrap();
        let mut reading = Box::pin(io.read(&mut buf));
        let blocked = tokio::time::timeout(Duration::from_millis(50), &mut reading).await;
        assert!(blocked.is_err(), "no permit, no read");
        drop(other);
        let n = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("read after the permit is free")
            .unwrap();
        assert_eq!(&buf[..n], b"next");
        assert!(io.holds_permit());

        // Ungated: the permit is back and the socket is a plain socket.
        io.ungate();
        assert_eq!(permits.available_permits(), 1);
        io.write_all(b"done").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"done");
    }
}
