//! The listener: one thread, one epoll, every listening socket and every handshake in progress.
//!
//! It accepts connections, reads HTTP request heads under a deadline and a size cap, answers
//! plain routes and refusals itself (with a one-line reason), and hands each successful
//! WebSocket upgrade to a fan-out worker with its resolved start position. No thread per
//! connection, so a flood of slow or half-open connections costs memory, not threads.
//!
//! On the trusted listener (for the TLS sidecar) every connection must start with a PROXY v2
//! header carrying the real client address; on the public listener such a header is refused.
//!
//! Admission happens at accept, before the first byte is read: on the public listener the
//! peer's address (per /64 for IPv6) is checked against the per-address limits
//! ([`crate::limits`]) and must find a handshake slot ([`crate::admission`]: a cap per address,
//! fair eviction when all slots are taken), so a flood of silent or slow connections from one
//! address is answered 429 at once and cannot take the slots other addresses need. A TCP
//! trusted listener only accepts connections from `--trusted-allow-ip` (default loopback);
//! its clients' addresses, from their PROXY headers, go through the same checks.
//!
//! The listener never reads the logs: a cursor is resolved from the index in memory, and the
//! rare cursor that lands in a chunk recovered from disk (whose per-event times are not in
//! memory) is finished by a helper thread that scans that chunk's frames and completes the
//! upgrade, so a slow disk cannot stall everyone's handshakes. Its queue is shared fairly: one
//! address (per /64 for IPv6) may hold an eighth of it (beyond: 429), and a queued handshake
//! that waits longer than the handshake deadline is answered 503 instead of being served late.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::epoll;

use crate::admission::{HandshakeSlots, Holder, SlotRefusal};
use crate::config::{ListenAddr, Settings};
use crate::encoding::Encoding;
use crate::fanout::{Fanout, NewClient};
use crate::handshake::{self, HttpError, ParseStatus};
use crate::hub::{Counters, CursorLookup, CursorScan, Hub, SeqStart, ShapeClass};
use crate::index::EventPos;
use crate::limits::{Admission, Throttle, address_key, in_network};
use crate::proxy_protocol::{self, ProxyParse};
use crate::subscription;
use crate::wire::{self, Cursor, KindSet};

/// listen(2) backlog. Why: std's default of 128 overflows under a connection flood (or a
/// reconnect storm after a restart), and a dropped SYN costs a well-behaved client a 1 s
/// retransmit; the listener drains the queue quickly, answering refusals at accept. The
/// kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Cursor lookups that need a disk scan, queued for the helper thread. Why 64: each holds a
/// socket and a chunk's entries (4 KiB); a scan reads at most one chunk (typically a few
/// hundred KiB, from the page cache), so 64 queued is well under a second of work; beyond,
/// such handshakes get 503 at once rather than waiting unboundedly.
const MAX_QUEUED_CURSOR_SCANS: usize = 64;

/// Queued cursor scans one address key may hold. Why an eighth of the queue: a few addresses
/// asking for scans must not take all of it and get every other address's cursor handshakes
/// a 503; beyond its share an address gets 429. More than eight addresses that fill the queue
/// meet fair eviction instead (see [`ScanQueue`]).
const MAX_QUEUED_CURSOR_SCANS_PER_ADDRESS: usize = MAX_QUEUED_CURSOR_SCANS / 8;

/// The 503 reason when the cursor-scan queue has no fair room (a newcomer refused, or the
/// queued scan whose place a newcomer took).
const SCAN_QUEUE_FULL: &str = "server busy: too many cursor lookups in progress";

/// Longest the cursor-scan thread waits for work before it reports progress to
/// [`crate::liveness`] (every part loops at least once a second).
const CURSOR_SCAN_POLL: Duration = Duration::from_millis(500);

/// Test hook (debug builds only): milliseconds the cursor-scan thread sleeps before each scan,
/// so that a test can fill its queue deterministically.
pub const TEST_SCAN_DELAY_ENV: &str = "TEST_JETRELAY_CURSOR_SCAN_DELAY_MS";

/// Spacing of the log line that summarizes connections refused at accept (the flood path
/// is counted in metrics, not logged per connection).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Unsent bytes the kernel may hold for one client (`TCP_NOTSENT_LOWAT`). Why: without it a
/// client that stops reading soaks up to `tcp_wmem`'s maximum (4 MiB by default; BBR grows the
/// buffer to it) before the relay sees backpressure: kernel memory per stalled client, and
/// seconds of feed hidden from `--max-lag` and retention. The log is the buffer; 256 KiB is
/// about a second of the full network feed, and at loopback speeds still several
/// milliseconds of sending per wake-up.
pub const CLIENT_NOTSENT_LOWAT: u32 = 256 * 1024;

/// What `GET /` answers.
const ROOT_TEXT: &str = "jetrelay: a Jetstream relay. Connect a WebSocket to /subscribe \
(Jetstream v1 parameters: wantedCollections, wantedDids, cursor, compress, \
maxMessageSizeBytes, requireHello).\n";

/// A bound listening socket.
pub enum Bound {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket (its path is removed on drop by the owner).
    Unix(UnixListener),
}

impl Bound {
    /// Binds `addr` non-blocking; a stale Unix socket file is replaced.
    pub fn bind(addr: &ListenAddr) -> std::io::Result<Bound> {
        let b = match addr {
            ListenAddr::Tcp(a) => {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(*a),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.set_reuse_address(true)?;
                s.bind(&(*a).into())?;
                s.listen(LISTEN_BACKLOG)?;
                Bound::Tcp(s.into())
            }
            ListenAddr::Unix(p) => {
                if p.exists() {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                // The sidecar runs as another user in the same group.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660));
                Bound::Unix(l)
            }
        };
        match &b {
            Bound::Tcp(l) => l.set_nonblocking(true)?,
            Bound::Unix(l) => l.set_nonblocking(true)?,
        }
        Ok(b)
    }

    /// The bound TCP address, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }

    fn accept(&self) -> std::io::Result<(OwnedFd, Option<SocketAddr>)> {
        match self {
            Bound::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                // Best effort: without it a slow client only costs more kernel memory.
                let _ = socket2::SockRef::from(&s).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT);
                Ok((OwnedFd::from(s), Some(peer)))
            }
            Bound::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok((OwnedFd::from(s), None))
            }
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Bound::Tcp(l) => l.as_fd(),
            Bound::Unix(l) => l.as_fd(),
        }
    }
}

/// Where a pending connection is in its handshake.
#[derive(Debug)]
enum Stage {
    /// On the public listener: an HTTP request comes first (a PROXY header is refused).
    Public,
    /// On the trusted listener, before its PROXY v2 header.
    TrustedProxyHeader,
    /// On the trusted listener, after the PROXY header: the HTTP request.
    TrustedRequest,
    /// Answered with more than the socket took at once (a `getZstdDictionary` download to a
    /// slow reader): the rest is written as the socket drains, never waited for, within the
    /// same slot and deadline as a handshake.
    Replying(Reply),
}

/// An answer being written to a socket that cannot take it at once.
#[derive(Debug)]
struct Reply {
    /// Status line and headers.
    head: Vec<u8>,
    /// The body (shared: thousands of replies in progress hold no copy of it).
    body: &'static [u8],
    /// Bytes of head + body written so far.
    written: usize,
}

impl Reply {
    /// Writes what the socket takes now: `Ok(true)` once all of it is written.
    fn write_to(&mut self, fd: &OwnedFd) -> std::io::Result<bool> {
        loop {
            let rest = match self.written.checked_sub(self.head.len()) {
                None => &self.head[self.written..],
                Some(in_body) => &self.body[in_body..],
            };
            if rest.is_empty() {
                return Ok(true);
            }
            match rustix::io::write(fd, rest) {
                Ok(n) => self.written += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// One connection that has not finished its handshake.
struct Pending {
    /// The socket.
    fd: OwnedFd,
    /// Real client address once known (TCP peer, or from the PROXY header).
    peer: Option<SocketAddr>,
    /// Which listener it came from and how far its handshake got.
    stage: Stage,
    /// Bytes read so far (at most `MAX_REQUEST_BYTES` + the PROXY header).
    buf: Vec<u8>,
    /// Counted against the per-IP limits (released on failure).
    admitted_ip: Option<IpAddr>,
}

/// Listener thread state.
pub struct Listener {
    /// Shared state (cursor lookups, counters, shutdown flag).
    hub: Arc<Hub>,
    /// Where upgraded clients go.
    fanout: Arc<Fanout>,
    /// Public and (optionally) trusted listeners: (socket, trusted?).
    listeners: Vec<(Bound, bool)>,
    /// Handshake deadline.
    handshake_timeout: Duration,
    /// Handshakes in progress, in total (`--max-handshakes`).
    max_handshakes: usize,
    /// Handshakes in progress per address key (`--max-handshakes-per-ip`).
    max_handshakes_per_ip: usize,
    /// Sources a TCP trusted listener accepts (`--trusted-allow-ip`).
    trusted_allow: Vec<(IpAddr, u8)>,
    /// Keeps the summary of refusals at accept to one line per interval.
    refusal_log: Throttle,
    /// Upgrades whose cursor needs a disk scan, for the helper thread (None if it could not
    /// be started: then the listener scans itself).
    scans: Option<ScanQueueOwner>,
}

/// An upgrade waiting on the cursor-scan thread.
struct QueuedScan {
    /// The upgrade to finish.
    up: Upgrade,
    /// The chunk to scan.
    scan: CursorScan,
    /// Answered 503 instead of scanned if the thread gets to it only after this.
    deadline: Instant,
}

/// Upgrades waiting on the cursor-scan thread: the listener adds, the thread takes the
/// oldest. A [`HandshakeSlots`] table, so the queue is as fair as the handshake slots: a cap
/// in total, a share per address (429 beyond it), and when full, a newcomer from an address
/// holding fewer takes the heaviest address's oldest place (that one gets 503). Without it,
/// nine addresses (or one IPv6 /61) keeping their shares full got every other cursor
/// handshake a 503.
struct ScanQueue {
    /// The queued upgrades. A leaf lock: nothing else is taken while it is held.
    table: Mutex<HandshakeSlots<QueuedScan>>,
    /// Wakes the thread when an upgrade is queued or the listener is gone.
    wake: Condvar,
    /// The listener is gone: the thread ends once the queue is empty.
    closed: AtomicBool,
}

impl ScanQueue {
    fn lock(&self) -> MutexGuard<'_, HandshakeSlots<QueuedScan>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `q` under `holder`. Ok(Some(evicted)): it took that one's place (the caller
    /// refuses it); Err: no fair room, `q` comes back.
    // The large Err is the caller's own upgrade handed back to be refused; boxing it would
    // allocate once per queued scan to save a move on the refusal path.
    #[allow(clippy::result_large_err)]
    fn push(
        &self,
        q: QueuedScan,
        holder: Holder,
    ) -> Result<Option<QueuedScan>, (SlotRefusal, QueuedScan)> {
        let deadline = q.deadline;
        let (_, evicted) = self.lock().insert(q, holder, deadline)?;
        self.wake.notify_one();
        Ok(evicted)
    }

    /// The oldest queued upgrade, waiting up to `wait` for one; None on timeout or once the
    /// listener is gone and the queue is empty.
    fn pop(&self, wait: Duration) -> Option<QueuedScan> {
        let mut table = self.lock();
        if table.is_empty() && !self.closed.load(Ordering::Acquire) {
            table = match self.wake.wait_timeout(table, wait) {
                Ok((t, _)) => t,
                Err(p) => p.into_inner().0,
            };
        }
        table.pop_oldest()
    }
}

/// The listener's handle on the queue: dropping it (the listener is gone) ends the thread.
struct ScanQueueOwner(Arc<ScanQueue>);

impl Drop for ScanQueueOwner {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake.notify_all();
    }
}

/// A WebSocket upgrade that passed every check and waits only for its start position.
struct Upgrade {
    /// The 101 response to write.
    response: Vec<u8>,
    /// A v2 µs cursor: a start clamped to the oldest retained event gets an `#info` frame
    /// (`OutdatedCursor`), known only once the cursor resolves.
    outdated_info: bool,
    /// The client; its `start` is a placeholder until the cursor resolves.
    client: NewClient,
}

/// Writes the 101 and hands the client to a worker (the listener, or the cursor-scan helper).
fn finish_upgrade(hub: &Hub, fanout: &Fanout, up: Upgrade, start: EventPos) {
    let Upgrade {
        response,
        outdated_info,
        mut client,
    } = up;
    if outdated_info {
        let first = hub.index().first_seq();
        if start.seq == first && first > 0 {
            let mut info = Vec::new();
            wire::outdated_cursor_frame(hub.seq_of(first), &mut info);
            match crate::fanout::scheduler::own_frame(client.encoding, &info) {
                Ok(frame) => client.preamble = Some(frame),
                Err(e) => tracing::warn!(error = %e, "cannot compose the #info frame"),
            }
        }
    }
    if write_all_nb(&client.fd, &response).is_err() {
        if let Some(ip) = client.counted_ip {
            hub.limits.release(ip);
        }
        return;
    }
    Counters::add(&hub.counters.clients_accepted, 1);
    client.start = start;
    fanout.attach(client);
}

/// Why a queued upgrade is answered 503 instead of scanned.
#[derive(Clone, Copy)]
enum ScanRefusal {
    /// The thread reached it only after the handshake deadline.
    Expired,
    /// A newcomer from an address holding fewer places took its place in a full queue.
    Evicted,
}

/// Answers a queued upgrade that will not be scanned: 503 with the reason, counted.
fn refuse_queued_scan(hub: &Hub, up: Upgrade, why: ScanRefusal, log: &Throttle) {
    let (reason, counter) = match why {
        ScanRefusal::Expired => (
            "server busy: the cursor lookup waited too long in the queue",
            &hub.counters.cursor_scans_expired,
        ),
        ScanRefusal::Evicted => (SCAN_QUEUE_FULL, &hub.counters.refused_cursor_scans_full),
    };
    let err = HttpError::new(503, reason).with_header("Retry-After", "1".into());
    hub.counters.refused(err.status);
    Counters::add(counter, 1);
    if log.allow() {
        tracing::info!(peer = %up.client.peer, status = err.status, reason = %err.reason,
            refused = hub.counters.handshakes_refused.load(Ordering::Relaxed),
            "handshake refused (one line per 5 s; see jetrelay_limit_refusals)");
    }
    let _ = write_all_nb(&up.client.fd, &err.to_response());
    if let Some(ip) = up.client.counted_ip {
        hub.limits.release(ip);
    }
}

/// Starts the critical part `cursor-scan`, which finishes cursor lookups needing a disk scan;
/// it ends when the listener (the queue's owner) is gone.
fn spawn_cursor_scanner(hub: Arc<Hub>, fanout: Arc<Fanout>) -> std::io::Result<ScanQueueOwner> {
    let queue = Arc::new(ScanQueue {
        table: Mutex::new(HandshakeSlots::new(
            MAX_QUEUED_CURSOR_SCANS,
            MAX_QUEUED_CURSOR_SCANS_PER_ADDRESS,
        )),
        wake: Condvar::new(),
        closed: AtomicBool::new(false),
    });
    let liveness = hub.liveness.clone();
    let delay = test_scan_delay();
    let expired_log = Throttle::new(REFUSAL_LOG_INTERVAL);
    let shared = queue.clone();
    crate::liveness::spawn_critical(&liveness, "cursor-scan", move || {
        loop {
            // Waking at least twice a second is its progress while there is no work.
            crate::liveness::beat();
            let Some(QueuedScan { up, scan, deadline }) = shared.pop(CURSOR_SCAN_POLL) else {
                if shared.closed.load(Ordering::Acquire) && shared.lock().is_empty() {
                    return Ok::<(), std::io::Error>(());
                }
                continue;
            };
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            if Instant::now() > deadline {
                refuse_queued_scan(&hub, up, ScanRefusal::Expired, &expired_log);
            } else {
                let start = hub.finish_cursor_scan(scan);
                finish_upgrade(&hub, &fanout, up, start);
            }
        }
    })?;
    Ok(ScanQueueOwner(queue))
}

/// The test hook's delay before each scan ([`TEST_SCAN_DELAY_ENV`]; zero in release builds).
fn test_scan_delay() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(TEST_SCAN_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(ms, "test hook armed: {TEST_SCAN_DELAY_ENV}");
        return Duration::from_millis(ms);
    }
    Duration::ZERO
}

/// Epoll tokens at and above this are listening sockets; below, handshake slots.
const LISTENER_TOKEN_BASE: u64 = 1 << 40;

impl Listener {
    /// Builds a listener over already-bound sockets.
    pub fn new(
        hub: Arc<Hub>,
        fanout: Arc<Fanout>,
        listeners: Vec<(Bound, bool)>,
        settings: &Settings,
    ) -> Listener {
        let scans = match spawn_cursor_scanner(hub.clone(), fanout.clone()) {
            Ok(queue) => Some(queue),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the cursor-scan thread; the listener scans itself");
                None
            }
        };
        Listener {
            scans,
            hub,
            fanout,
            listeners,
            handshake_timeout: settings.handshake_timeout,
            max_handshakes: settings.max_handshakes,
            max_handshakes_per_ip: settings.max_handshakes_per_ip,
            trusted_allow: settings.trusted_allow_ip.clone(),
            refusal_log: Throttle::new(REFUSAL_LOG_INTERVAL),
        }
    }

    /// Runs until the hub's shutdown flag is set.
    pub fn run(self) -> std::io::Result<()> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for (i, (l, _)) in self.listeners.iter().enumerate() {
            epoll::add(
                &ep,
                l.fd(),
                epoll::EventData::new_u64(LISTENER_TOKEN_BASE + i as u64),
                epoll::EventFlags::IN,
            )?;
        }
        let mut slots: HandshakeSlots<Pending> =
            HandshakeSlots::new(self.max_handshakes, self.max_handshakes_per_ip);
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        while !self.hub.shutting_down() {
            crate::liveness::beat();
            let now = Instant::now();
            // Why 500 ms at most: the shutdown flag is checked at least that often.
            let timeout = slots
                .next_deadline()
                .map_or(Duration::from_millis(500), |d| {
                    d.saturating_duration_since(now)
                })
                .min(Duration::from_millis(500));
            events.clear();
            let ts = rustix::time::Timespec {
                tv_sec: timeout.as_secs() as i64,
                tv_nsec: timeout.subsec_nanos() as i64,
            };
            match epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&ts)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter().copied() {
                let token = ev.data.u64();
                if token >= LISTENER_TOKEN_BASE {
                    let i = (token - LISTENER_TOKEN_BASE) as usize;
                    self.accept_all(i, &ep, &mut slots);
                } else {
                    self.drive(&ep, &mut slots, token);
                }
            }
            // Expire handshakes past their deadline (slowloris).
            for mut p in slots.expire(Instant::now()) {
                self.refuse_quietly(&mut p, HttpError::new(408, "handshake timed out"));
            }
            Counters::set(&self.hub.counters.handshakes_pending, slots.len() as u64);
        }
        Ok(())
    }

    /// Accepts every waiting connection on listener `i`, admitting or refusing each before
    /// reading a byte from it.
    fn accept_all(&self, i: usize, ep: &OwnedFd, slots: &mut HandshakeSlots<Pending>) {
        let (listener, trusted) = &self.listeners[i];
        loop {
            let (fd, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: log and stop for this round rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let mut p = Pending {
                fd,
                peer,
                stage: if *trusted {
                    Stage::TrustedProxyHeader
                } else {
                    Stage::Public
                },
                buf: Vec::new(),
                admitted_ip: None,
            };
            let holder = match (&p.stage, peer) {
                (Stage::TrustedProxyHeader, Some(src)) => {
                    // Anyone who can reach this listener could claim any client address.
                    if !self
                        .trusted_allow
                        .iter()
                        .any(|n| in_network(src.ip().to_canonical(), *n))
                    {
                        Counters::add(&self.hub.counters.refused_trusted_source, 1);
                        if self.refusal_log.allow() {
                            tracing::warn!(source = %src, "trusted listener: connection from a source outside --trusted-allow-ip closed");
                        }
                        continue;
                    }
                    Holder::Unknown
                }
                (_, None) => Holder::Unknown,
                (_, Some(src)) => match self.admit_address(src.ip(), slots) {
                    Ok(holder) => {
                        p.admitted_ip = Some(src.ip());
                        holder
                    }
                    Err(err) => {
                        self.refuse_quietly(&mut p, err);
                        continue;
                    }
                },
            };
            let deadline = Instant::now() + self.handshake_timeout;
            let token = match slots.insert(p, holder, deadline) {
                Ok((token, evicted)) => {
                    if let Some(mut victim) = evicted {
                        Counters::add(&self.hub.counters.handshakes_evicted, 1);
                        self.refuse_quietly(
                            &mut victim,
                            HttpError::new(503, "server busy: too many handshakes in progress")
                                .with_header("Retry-After", "1".into()),
                        );
                    }
                    token
                }
                Err((why, mut p)) => {
                    self.refuse_quietly(&mut p, self.slot_refusal(why));
                    continue;
                }
            };
            let registered = slots.get_mut(token).is_some_and(|p| {
                epoll::add(
                    ep,
                    &p.fd,
                    epoll::EventData::new_u64(token),
                    epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
                )
                .is_ok()
            });
            if !registered && let Some(mut p) = slots.remove(token) {
                self.release(&mut p);
            }
        }
    }

    /// Checks a client address against the per-address handshake cap and the per-address
    /// limits. On success it is counted in the limits (the caller records that in
    /// `Pending::admitted_ip`) and the slot holder to count it under is returned.
    fn admit_address(
        &self,
        ip: IpAddr,
        slots: &HandshakeSlots<Pending>,
    ) -> Result<Holder, HttpError> {
        let holder = self.holder_of(ip);
        // The cheap, listener-local check first: it spends no rate token.
        if let Holder::Limited(key) = holder
            && slots.held_by(key) >= self.max_handshakes_per_ip
        {
            return Err(self.slot_refusal(SlotRefusal::PerAddress));
        }
        match self.hub.limits.admit(ip) {
            Admission::Ok => Ok(holder),
            Admission::Refused(err, _) => Err(err),
        }
    }

    /// Who a slot (handshake or queued cursor scan) of a client from `ip` is counted under.
    fn holder_of(&self, ip: IpAddr) -> Holder {
        if self.hub.limits.exempt(ip) {
            Holder::Exempt(address_key(ip))
        } else {
            Holder::Limited(address_key(ip))
        }
    }

    /// The HTTP answer to a refused slot, counted.
    fn slot_refusal(&self, why: SlotRefusal) -> HttpError {
        match why {
            SlotRefusal::PerAddress => {
                Counters::add(&self.hub.counters.refused_handshakes_per_ip, 1);
                HttpError::new(429, "too many handshakes in progress from your address")
                    .with_header("Retry-After", "1".into())
            }
            SlotRefusal::Full => {
                Counters::add(&self.hub.counters.refused_handshakes_full, 1);
                HttpError::new(503, "server busy: too many handshakes in progress")
                    .with_header("Retry-After", "1".into())
            }
        }
    }

    /// Reads and advances the handshake of slot `token`; frees the slot when it is done.
    fn drive(&self, ep: &OwnedFd, slots: &mut HandshakeSlots<Pending>, token: u64) {
        loop {
            let Some(p) = slots.get_mut(token) else {
                return;
            };
            match self.progress(p) {
                Progress::Again => return,
                Progress::Done => {
                    if let Some(p) = slots.remove(token) {
                        // An upgraded socket lives on in a worker through a duplicate of
                        // this fd, and epoll watches the open file, not the fd: closing ours
                        // alone would keep waking this thread (level-triggered) for every
                        // byte the client sends and at its disconnect.
                        let _ = epoll::delete(ep, &p.fd);
                    }
                    return;
                }
                Progress::Replying => {
                    // Wait for room in its send buffer, and only that: bytes it sends now
                    // are never read, and a half-closed peer (RDHUP) may still be reading.
                    let waiting = slots.get_mut(token).is_some_and(|p| {
                        epoll::modify(
                            ep,
                            &p.fd,
                            epoll::EventData::new_u64(token),
                            epoll::EventFlags::OUT,
                        )
                        .is_ok()
                    });
                    if !waiting && let Some(mut p) = slots.remove(token) {
                        self.release(&mut p);
                    }
                    return;
                }
                Progress::Proxied(ip) => {
                    // The trusted listener learned the client's address: count it like a
                    // public connection's, then go on with the request already buffered.
                    let admitted = self.admit_address(ip, slots);
                    if admitted.is_ok()
                        && let Some(p) = slots.get_mut(token)
                    {
                        p.admitted_ip = Some(ip);
                    }
                    let err = match admitted {
                        Ok(holder) => slots
                            .assign(token, holder)
                            .err()
                            .map(|why| self.slot_refusal(why)),
                        Err(err) => Some(err),
                    };
                    if let Some(err) = err {
                        if let Some(mut p) = slots.remove(token) {
                            self.refuse_ref(&mut p, err);
                        }
                        return;
                    }
                }
            }
        }
    }

    fn progress(&self, p: &mut Pending) -> Progress {
        if let Stage::Replying(reply) = &mut p.stage {
            return match reply.write_to(&p.fd) {
                Ok(false) => Progress::Again,
                Ok(true) | Err(_) => self.drop_silently(p),
            };
        }
        // Read what is there.
        let limit = handshake::MAX_REQUEST_BYTES + proxy_protocol::MAX_V2_HEADER_LEN;
        let mut tmp = [0u8; 4096];
        loop {
            let room = (limit + 1).saturating_sub(p.buf.len()).min(tmp.len());
            if room == 0 {
                break;
            }
            match rustix::io::read(&p.fd, &mut tmp[..room]) {
                Ok(0) => return self.drop_silently(p),
                Ok(n) => {
                    p.buf.extend_from_slice(&tmp[..n]);
                    if n < room {
                        break;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return self.drop_silently(p),
            }
        }
        // PROXY header first on the trusted listener; never on the public one.
        match p.stage {
            Stage::TrustedProxyHeader => match proxy_protocol::parse_v2(&p.buf) {
                Ok(ProxyParse::Incomplete) => return Progress::Again,
                Ok(ProxyParse::Complete { source, consumed }) => {
                    p.stage = Stage::TrustedRequest;
                    p.buf.drain(..consumed);
                    // LOCAL (health checks): the sidecar itself, not a client to count.
                    let Some(source) = source else {
                        p.peer = Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
                        return self.progress_request(p);
                    };
                    p.peer = Some(source);
                    return Progress::Proxied(source.ip());
                }
                Err(e) => {
                    return self.refuse_ref(
                        p,
                        HttpError::new(
                            400,
                            format!("trusted listener requires a PROXY v2 header: {e}"),
                        ),
                    );
                }
            },
            Stage::Public if proxy_protocol::looks_like_proxy(&p.buf) => {
                return self.refuse_ref(
                    p,
                    HttpError::new(400, "PROXY protocol header not accepted on this listener"),
                );
            }
            Stage::Public | Stage::TrustedRequest | Stage::Replying(_) => {}
        }
        self.progress_request(p)
    }

    /// Parses the (buffered) HTTP request and answers or upgrades it.
    fn progress_request(&self, p: &mut Pending) -> Progress {
        // The head is parsed out of a buffer taken from the connection, so that the request
        // (borrowing it) and the connection can be used together; an incomplete head gets its
        // buffer back.
        let buf = std::mem::take(&mut p.buf);
        let status = match handshake::parse_request(&buf) {
            Ok(s) => s,
            Err(e) => return self.refuse_ref(p, e),
        };
        let request = match status {
            ParseStatus::Incomplete => {
                p.buf = buf;
                return Progress::Again;
            }
            ParseStatus::Complete { request, .. } => request,
        };
        match (request.method, request.path) {
            ("GET", "/") => {
                let body = handshake::simple_response(
                    200,
                    "text/plain; charset=utf-8",
                    ROOT_TEXT.as_bytes(),
                );
                let _ = write_all_nb(&p.fd, &body);
                self.release(p);
                Progress::Done
            }
            (_, "/subscribe") => {
                let key = match handshake::validate_upgrade(&request) {
                    Ok(k) => k.to_owned(),
                    Err(e) => return self.refuse_ref(p, e),
                };
                let pairs = match handshake::query_pairs(request.query) {
                    Ok(v) => v,
                    Err(e) => return self.refuse_ref(p, e),
                };
                let encodings: Vec<&str> = request.header_values("Socket-Encoding").collect();
                let params = match subscription::parse_subscribe(&pairs, &encodings) {
                    Ok(x) => x,
                    Err(e) => return self.refuse_ref(p, HttpError::new(400, e.to_string())),
                };
                let peer_ip = p.peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
                let filter_reservation =
                    match self.hub.filter_budget.reserve(&params.options, peer_ip) {
                        Ok(r) => r,
                        Err(full) => {
                            return self.refuse_ref(
                                p,
                                HttpError::new(full.http_status(), full.to_string())
                                    .with_header("Retry-After", "10".into()),
                            );
                        }
                    };
                // A cursor below 10^15 is a seq (inclusive; below retention clamped silently, as
                // officially), at or above it unix µs.
                let lookup = match params.cursor.map(Cursor::from_value) {
                    None => self.hub.cursor_in_memory(None),
                    Some(Ok(Cursor::TimeUs(t))) => self.hub.cursor_in_memory(Some(t)),
                    Some(Ok(Cursor::Seq(seq))) => {
                        CursorLookup::Ready(match self.hub.resolve_seq(seq) {
                            SeqStart::At(pos) => pos,
                            SeqStart::TooOld { oldest, .. } => oldest,
                            SeqStart::Live { end, .. } => end,
                        })
                    }
                    Some(Err(e)) => {
                        return self.refuse_ref(p, HttpError::new(400, format!("cursor: {e}")));
                    }
                };
                let Some(fd) = p.fd.try_clone().ok() else {
                    return self.drop_silently(p);
                };
                let peer = p
                    .peer
                    .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
                tracing::info!(%peer, shape = %ShapeClass::of(&params.options), cursor = ?params.cursor, compress = params.compress,
                    collections = params.options.wanted_collections.len(),
                    dids = params.options.wanted_dids.len(), "client connected");
                let up = Upgrade {
                    response: handshake::accept_response(&key, &[]),
                    outdated_info: false,
                    client: NewClient {
                        fd,
                        peer,
                        encoding: Encoding::of(false, params.compress),
                        kinds: KindSet::V1,
                        options: params.options,
                        preamble: None,
                        start: lookup.placeholder(),
                        require_hello: params.require_hello,
                        counted_ip: p.admitted_ip.take(),
                        filter_reservation,
                    },
                };
                self.upgrade(p, up, lookup)
            }
            (_, wire::SUBSCRIBE_EVENTS_PATH) => self.subscribe_events(p, &request),
            (_, wire::GET_ZSTD_DICTIONARY_PATH) => {
                let wire::DictionaryResponse { head, body } =
                    wire::get_zstd_dictionary_response(&request);
                self.reply(
                    p,
                    Reply {
                        head,
                        body,
                        written: 0,
                    },
                )
            }
            ("GET", _) => self.refuse_ref(
                p,
                HttpError::new(404, format!("no such path: {}", request.path)),
            ),
            (_, _) => self.refuse_ref(
                p,
                HttpError::new(405, "method not allowed").with_header("Allow", "GET".into()),
            ),
        }
    }

    /// `subscribeEvents`: the v2 stream. Refusals are XRPC errors (400, with the official
    /// name and message); a seq cursor below retention is `CursorTooOld`; a clamped µs cursor
    /// or a future seq gets an `#info` frame before the first event.
    fn subscribe_events(&self, p: &mut Pending, request: &handshake::Request<'_>) -> Progress {
        let key = match handshake::validate_upgrade(request) {
            Ok(k) => k.to_owned(),
            Err(e) => return self.refuse_ref(p, e),
        };
        let encodings: Vec<&str> = request.header_values("Socket-Encoding").collect();
        let params = match wire::parse_subscribe_events_query(request.query, &encodings) {
            Ok(x) => x,
            Err(e) => return self.refuse_xrpc(p, e),
        };
        let peer_ip = p.peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let filter_reservation = match self.hub.filter_budget.reserve(&params.options, peer_ip) {
            Ok(r) => r,
            Err(full) => {
                return self.refuse_ref(
                    p,
                    HttpError::new(full.http_status(), full.to_string())
                        .with_header("Retry-After", "10".into()),
                );
            }
        };
        let encoding = Encoding::of(true, params.compress);
        let mut info = Vec::new();
        let mut outdated_info = false;
        let lookup = match params.cursor {
            None => self.hub.cursor_in_memory(None),
            Some(Cursor::Seq(seq)) => CursorLookup::Ready(match self.hub.resolve_seq(seq) {
                SeqStart::At(pos) => pos,
                SeqStart::TooOld { oldest_seq, .. } => {
                    return self.refuse_xrpc(p, wire::XrpcError::cursor_too_old(seq, oldest_seq));
                }
                SeqStart::Live {
                    end,
                    future,
                    next_seq,
                } => {
                    if future {
                        wire::future_cursor_frame(seq, next_seq, &mut info);
                    }
                    end
                }
            }),
            // Whether it was clamped is known once it resolves (see `finish_upgrade`).
            Some(Cursor::TimeUs(t)) => {
                outdated_info = true;
                self.hub.cursor_in_memory(Some(t))
            }
        };
        let preamble = if info.is_empty() {
            None
        } else {
            match crate::fanout::scheduler::own_frame(encoding, &info) {
                Ok(frame) => Some(frame),
                Err(e) => {
                    return self.refuse_ref(p, HttpError::new(500, format!("#info frame: {e}")));
                }
            }
        };
        let protocol = wire::negotiate_subprotocol(request);
        let headers: Vec<(&str, &str)> = protocol
            .map(|proto| ("Sec-WebSocket-Protocol", proto))
            .into_iter()
            .collect();
        let Some(fd) = p.fd.try_clone().ok() else {
            return self.drop_silently(p);
        };
        let peer = p
            .peer
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        tracing::info!(%peer, shape = %ShapeClass::of(&params.options), cursor = ?params.cursor,
            encoding = %encoding, kinds = %params.kinds.names(),
            collections = params.options.wanted_collections.len(),
            dids = params.options.wanted_dids.len(), "client connected");
        let up = Upgrade {
            response: handshake::accept_response(&key, &headers),
            outdated_info,
            client: NewClient {
                fd,
                peer,
                encoding,
                kinds: params.kinds,
                options: params.options,
                preamble,
                start: lookup.placeholder(),
                require_hello: false,
                counted_ip: p.admitted_ip.take(),
                filter_reservation,
            },
        };
        self.upgrade(p, up, lookup)
    }

    /// Completes an upgrade whose start is `lookup`: now, or on the cursor-scan thread when
    /// it needs a disk read (beyond its queue: 503).
    fn upgrade(&self, p: &mut Pending, up: Upgrade, lookup: CursorLookup) -> Progress {
        match (lookup, &self.scans) {
            (CursorLookup::Ready(start), _) => finish_upgrade(&self.hub, &self.fanout, up, start),
            (CursorLookup::NeedsScan(scan), Some(scans)) => {
                let holder = self.holder_of(up.client.peer.ip());
                let queued = QueuedScan {
                    up,
                    scan,
                    deadline: Instant::now() + self.handshake_timeout,
                };
                match scans.0.push(queued, holder) {
                    Ok(None) => {}
                    Ok(Some(evicted)) => refuse_queued_scan(
                        &self.hub,
                        evicted.up,
                        ScanRefusal::Evicted,
                        &self.refusal_log,
                    ),
                    Err((why, mut q)) => {
                        p.admitted_ip = q.up.client.counted_ip.take();
                        let err = match why {
                            SlotRefusal::PerAddress => {
                                Counters::add(&self.hub.counters.refused_cursor_scans_per_ip, 1);
                                HttpError::new(
                                    429,
                                    "too many cursor lookups in progress from your address",
                                )
                            }
                            SlotRefusal::Full => {
                                Counters::add(&self.hub.counters.refused_cursor_scans_full, 1);
                                HttpError::new(503, SCAN_QUEUE_FULL)
                            }
                        };
                        return self.refuse_ref(p, err.with_header("Retry-After", "1".into()));
                    }
                }
            }
            (CursorLookup::NeedsScan(scan), None) => {
                let start = self.hub.finish_cursor_scan(scan);
                finish_upgrade(&self.hub, &self.fanout, up, start);
            }
        }
        Progress::Done
    }

    /// Refuses a `subscribeEvents` request with its XRPC error.
    fn refuse_xrpc(&self, p: &mut Pending, err: wire::XrpcError) -> Progress {
        self.hub.counters.refused(err.status);
        let peer = p
            .peer
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        tracing::info!(%peer, status = err.status, error = err.error, message = %err.message,
            "handshake refused");
        let _ = write_all_nb(&p.fd, &err.to_response());
        self.release(p);
        Progress::Done
    }

    /// Writes what the socket takes of `reply` now, and the rest as it drains.
    fn reply(&self, p: &mut Pending, mut reply: Reply) -> Progress {
        match reply.write_to(&p.fd) {
            Ok(false) => {
                p.stage = Stage::Replying(reply);
                Progress::Replying
            }
            Ok(true) | Err(_) => self.drop_silently(p),
        }
    }

    fn release(&self, p: &mut Pending) {
        if let Some(ip) = p.admitted_ip.take() {
            self.hub.limits.release(ip);
        }
    }

    fn drop_silently(&self, p: &mut Pending) -> Progress {
        self.release(p);
        Progress::Done
    }

    fn refuse_ref(&self, p: &mut Pending, err: HttpError) -> Progress {
        self.hub.counters.refused(err.status);
        let peer = p
            .peer
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        tracing::info!(%peer, status = err.status, reason = %err.reason, "handshake refused");
        let _ = write_all_nb(&p.fd, &err.to_response());
        self.release(p);
        Progress::Done
    }

    /// Refuses a connection on the flood path (at accept, evicted, timed out): counted, and
    /// summarized in a throttled log line instead of one line per connection. The answer is
    /// written once, without waiting: a peer that does not read loses it.
    fn refuse_quietly(&self, p: &mut Pending, err: HttpError) {
        if let Stage::Replying(_) = p.stage {
            // Already answered: a second answer would land in the middle of the first.
            self.release(p);
            return;
        }
        self.hub.counters.refused(err.status);
        if self.refusal_log.allow() {
            let peer = p
                .peer
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
            tracing::info!(%peer, status = err.status, reason = %err.reason,
                refused = self.hub.counters.handshakes_refused.load(std::sync::atomic::Ordering::Relaxed),
                "refusing connections (one line per 5 s; see jetrelay_handshakes_refused)");
        }
        let _ = rustix::io::write(&p.fd, &err.to_response());
        self.release(p);
    }
}

enum Progress {
    /// Keep waiting for bytes (or, while replying, for room to write).
    Again,
    /// Answered, and the rest of the answer waits for room in the socket.
    Replying,
    /// The trusted listener's PROXY header named this client address: admit it, then go on.
    Proxied(IpAddr),
    /// Finished (handed over, answered or dropped).
    Done,
}

/// Best-effort write of a short response on a non-blocking socket (a fresh socket's send
/// buffer always has room for a response head; a peer that does not read gets 100 ms).
fn write_all_nb(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut off = 0;
    while off < bytes.len() {
        match rustix::io::write(fd, &bytes[off..]) {
            Ok(n) => off += n,
            Err(rustix::io::Errno::AGAIN) if Instant::now() < deadline => std::thread::yield_now(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
