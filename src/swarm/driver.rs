//! The epoll loop: one thread drives every client of this process.
//!
//! Level-triggered epoll, one `read` per ready client per wake-up (fair under load), into one
//! process-wide buffer; a client keeps only the tail of a partial frame (`carry`) between reads.
//! Connection attempts (first connects and reconnects alike) are paced by a token bucket at
//! `connect_rate`; timers (retry back-off, connect/handshake timeouts, close linger, pause
//! resume) live in one binary heap with lazy invalidation.

use super::conn::{self, ClientState, Next, Session, Totals, Upgrade};
use super::filter::Filter;
use super::verify::Verifier;
use super::{SwarmConfig, SwarmError, Target};
use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shared read buffer: large enough that one read drains a client's socket buffer in the
/// common case, small enough to stay in cache.
const READ_BUF: usize = 256 * 1024;

/// A client's carry-over above this capacity is shrunk back once it empties (a rare huge frame
/// must not pin megabytes per client).
const CARRY_KEEP: usize = 16 * 1024;

/// When a carried partial frame leaves less room than this in the shared buffer, the frame is
/// assembled in the client's own carry instead (reads smaller than this would waste syscalls).
const MIN_READ_ROOM: usize = 4096;

/// Epoll events fetched per wait: enough to drain a busy wake-up in one call.
const EVENTS_PER_WAIT: usize = 1024;

/// Longest sleep of the loop, so the deadline and connect pacing are honoured promptly.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// First reconnect back-off; doubles per consecutive failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Upper bound of the reconnect back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How long we wait for the server to close TCP after we answered its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Bursts allowed by the connect token bucket (at most this many attempts at once).
const CONNECT_BURST: f64 = 64.0;

/// Where a client's connection stands.
#[derive(Debug)]
enum Phase {
    /// Not connected; queued for a connection attempt (or for its back-off to expire).
    Idle,
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent; collecting the response head.
    Handshaking {
        /// Bytes of the response so far.
        buf: Vec<u8>,
        /// Our Sec-WebSocket-Key.
        key: String,
    },
    /// Upgraded; frames flow.
    Open,
    /// We answered a close frame; waiting for the server to close TCP.
    Closing,
    /// Finished for good (no reconnect).
    Done,
}

/// The transport under the WebSocket: plain TCP or TLS over it.
enum Transport {
    /// Plain TCP.
    Plain,
    /// TLS client (rustls over the nonblocking socket).
    Tls(Box<rustls::ClientConnection>),
}

/// Adapts a borrowed fd to `Read`/`Write` for rustls.
struct FdIo<'a>(BorrowedFd<'a>);

impl Read for FdIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        rustix::io::read(self.0, buf).map_err(std::io::Error::from)
    }
}

impl Write for FdIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        rustix::net::send(self.0, buf, rustix::net::SendFlags::NOSIGNAL)
            .map_err(std::io::Error::from)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport {
    /// Reads plaintext; `Ok(0)` = end of stream, `WouldBlock` = nothing now.
    fn recv(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain => rustix::io::read(fd, buf).map_err(std::io::Error::from),
            Transport::Tls(tls) => loop {
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                match tls.read_tls(&mut FdIo(fd)) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = Self::flush_tls(tls, fd);
                        return Err(e);
                    }
                }
                tls.process_new_packets().map_err(std::io::Error::other)?;
                Self::flush_tls(tls, fd)?;
            },
        }
    }

    /// Writes as much of `data` as possible; returns how much was taken.
    fn send(&mut self, fd: BorrowedFd<'_>, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain => rustix::net::send(fd, data, rustix::net::SendFlags::NOSIGNAL)
                .map_err(std::io::Error::from),
            Transport::Tls(tls) => {
                tls.writer().write_all(data)?;
                Self::flush_tls(tls, fd)?;
                Ok(data.len())
            }
        }
    }

    /// Whether bytes are buffered below us (TLS records not yet written).
    fn wants_write(&self) -> bool {
        match self {
            Transport::Plain => false,
            Transport::Tls(tls) => tls.wants_write(),
        }
    }

    /// Pushes buffered TLS records to the socket until done or it would block.
    fn flush(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        match self {
            Transport::Plain => Ok(()),
            Transport::Tls(tls) => Self::flush_tls(tls, fd),
        }
    }

    /// See [`Transport::flush`].
    fn flush_tls(tls: &mut rustls::ClientConnection, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(&mut FdIo(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One simulated client.
struct Client {
    /// Verification and statistics state (survives reconnects).
    state: ClientState,
    /// Index into the targets.
    target: usize,
    /// Connection phase.
    phase: Phase,
    /// The socket, while connected.
    fd: Option<OwnedFd>,
    /// TLS or plain (meaningful while connected).
    transport: Transport,
    /// Frame state of the current connection.
    session: Session,
    /// Bytes queued for writing (pongs, close replies, hello messages).
    out: Vec<u8>,
    /// Tail of a partial frame.
    carry: Vec<u8>,
    /// Bumped whenever a timer for this client becomes stale.
    timer_gen: u32,
    /// Consecutive failed attempts (drives the back-off).
    failures_in_row: u32,
    /// Whether the one-off stall (`--pause-after`) already happened or is under way.
    paused: bool,
    /// Whether reading is currently suspended by the stall.
    reading_suspended: bool,
    /// Whether EPOLLOUT is currently in the interest set.
    want_out: bool,
    /// Whether the socket is in the epoll set (it leaves it while stalled).
    registered: bool,
}

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// Back-off over: queue a connection attempt.
    Retry,
    /// Connect/handshake took too long.
    Timeout,
    /// Close linger over: drop the socket.
    Linger,
    /// Stall over: resume reading.
    Resume,
}

/// Process-level counters not tied to verification.
#[derive(Debug, Default)]
pub struct ConnTotals {
    /// Failed connection attempts (TCP errors, timeouts, bad upgrade responses).
    pub connect_failures: u64,
    /// Examples of connection failure reasons.
    pub connect_failure_examples: Vec<String>,
    /// Connections that ended without a close frame (EOF, reset) after the upgrade.
    pub disconnects_without_close: u64,
    /// Successful reads from open connections (events per read shows how batched delivery is).
    pub reads: u64,
    /// Time spent waiting in epoll: the rest of the run the loop was busy, and a loop busy
    /// nearly all the time means the swarm, not the server, limits throughput and latency.
    pub idle: Duration,
}

/// Everything a finished run leaves behind for the report.
pub struct Outcome {
    /// All clients' states.
    pub clients: Vec<ClientState>,
    /// Verification totals.
    pub totals: Totals,
    /// Connection totals.
    pub conns: ConnTotals,
    /// The verifier (cache statistics).
    pub verifier: Verifier,
    /// Wall time the loop ran.
    pub elapsed: Duration,
}

/// The event loop's state.
struct Driver<'a> {
    /// Configuration.
    config: &'a SwarmConfig,
    /// Resolved targets.
    targets: &'a [Target],
    /// Filters per target (URL query plus any options_update sent on open).
    filters: Vec<Filter>,
    /// Hello frames per target, pre-rendered unmasked payloads.
    hellos: Vec<String>,
    /// The epoll instance.
    epoll: OwnedFd,
    /// Clients of this process.
    clients: Vec<Client>,
    /// Timers: (when, client, generation, kind).
    timers: BinaryHeap<Reverse<(Instant, usize, u32, TimerKind)>>,
    /// Clients waiting for a connect token.
    connect_queue: VecDeque<usize>,
    /// Connect tokens available.
    tokens: f64,
    /// Last token refill.
    refilled: Instant,
    /// Shared verification state.
    verifier: Verifier,
    /// Verification totals.
    totals: Totals,
    /// Connection totals.
    conns: ConnTotals,
    /// TLS configuration (built once, when a target is wss).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Verification options per target (compression is a property of the URL).
    checks: Vec<conn::Checks>,
}

/// Wall-clock µs.
fn wall_us() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    t.tv_sec * 1_000_000 + t.tv_nsec / 1000
}

/// Raises the soft fd limit to the hard one: each client needs one fd.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// Runs this process's share of the clients until the deadline.
pub fn run(
    config: &SwarmConfig,
    targets: &[Target],
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Outcome, SwarmError> {
    raise_fd_limit();
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(SwarmError::Epoll)?;
    let (index, count) = config.shard;
    let ids: Vec<u64> = (0..config.clients)
        .filter(|id| id % count.max(1) == index)
        .collect();
    let mut filters = Vec::new();
    for t in targets {
        let mut f = Filter::for_target(t.wire, &t.query, config.sync_every);
        for hello in &config.send_on_open {
            f.apply_options_update(hello);
        }
        filters.push(f);
    }
    let clients = ids
        .iter()
        .map(|&id| Client {
            state: ClientState {
                id,
                ..Default::default()
            },
            target: (id % targets.len() as u64) as usize,
            phase: Phase::Idle,
            fd: None,
            transport: Transport::Plain,
            session: Session::new(),
            out: Vec::new(),
            carry: Vec::new(),
            timer_gen: 0,
            failures_in_row: 0,
            paused: false,
            reading_suspended: false,
            want_out: false,
            registered: false,
        })
        .collect::<Vec<_>>();
    let generator = config
        .seed
        .map(|s| crate::mock::Generator::new(s, config.dids));
    let mut d = Driver {
        config,
        targets,
        filters,
        hellos: config.send_on_open.clone(),
        epoll,
        connect_queue: (0..clients.len()).collect(),
        clients,
        timers: BinaryHeap::new(),
        tokens: 1.0,
        refilled: Instant::now(),
        verifier: Verifier::new(generator),
        totals: Totals::default(),
        conns: ConnTotals::default(),
        tls,
        checks: targets
            .iter()
            .enumerate()
            .map(|(target, t)| conn::Checks {
                in_order: config.expect.in_order,
                first_seq: config.expect.first_seq,
                compressed: t.compressed,
                wire: t.wire,
                target,
            })
            .collect(),
    };
    let start = Instant::now();
    d.event_loop(start + config.duration)?;
    let elapsed = start.elapsed();
    Ok(Outcome {
        clients: d.clients.into_iter().map(|c| c.state).collect(),
        totals: d.totals,
        conns: d.conns,
        verifier: d.verifier,
        elapsed,
    })
}

impl Driver<'_> {
    /// The loop.
    fn event_loop(&mut self, deadline: Instant) -> Result<(), SwarmError> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS_PER_WAIT);
        let mut buf = vec![0u8; READ_BUF];
        let rate = self.config.connect_rate.max(1) as f64;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            self.fire_timers(now);
            // Refill and spend connect tokens.
            self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate)
                .min(CONNECT_BURST.max(1.0));
            self.refilled = now;
            while self.tokens >= 1.0 {
                let Some(i) = self.connect_queue.pop_front() else {
                    break;
                };
                self.tokens -= 1.0;
                self.start_connect(i, now);
            }
            let mut wait = MAX_WAIT.min(deadline - now);
            if let Some(Reverse((at, ..))) = self.timers.peek() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            if !self.connect_queue.is_empty() {
                wait = wait.min(Duration::from_secs_f64(1.0 / rate));
            }
            let ts = rustix::time::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            events.clear();
            let before = Instant::now();
            let waited = epoll::wait(&self.epoll, spare_capacity(&mut events), Some(&ts));
            self.conns.idle += before.elapsed();
            match waited {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(SwarmError::Epoll(e)),
            }
            for ev in events.iter() {
                let i = ev.data.u64() as usize;
                let flags = ev.flags;
                self.on_ready(i, flags, &mut buf);
            }
        }
    }

    /// Fires due timers.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, i, generation, kind))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.clients[i].timer_gen != generation {
                continue;
            }
            match kind {
                TimerKind::Retry => self.connect_queue.push_back(i),
                TimerKind::Timeout => {
                    if matches!(
                        self.clients[i].phase,
                        Phase::Connecting | Phase::Handshaking { .. }
                    ) {
                        self.connect_failed(i, "connect/handshake timeout".into(), now);
                    }
                }
                TimerKind::Linger => {
                    if matches!(self.clients[i].phase, Phase::Closing) {
                        self.disconnected(i, now);
                    }
                }
                TimerKind::Resume => {
                    let c = &mut self.clients[i];
                    if c.reading_suspended {
                        c.reading_suspended = false;
                        self.update_interest(i);
                    }
                }
            }
        }
    }

    /// Schedules a timer for client `i`, invalidating its previous one.
    fn set_timer(&mut self, i: usize, at: Instant, kind: TimerKind) {
        let c = &mut self.clients[i];
        c.timer_gen = c.timer_gen.wrapping_add(1);
        self.timers.push(Reverse((at, i, c.timer_gen, kind)));
    }

    /// Cancels client `i`'s pending timer.
    fn clear_timer(&mut self, i: usize) {
        let c = &mut self.clients[i];
        c.timer_gen = c.timer_gen.wrapping_add(1);
    }

    /// Opens a nonblocking TCP connection for client `i`.
    fn start_connect(&mut self, i: usize, now: Instant) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socket_with};
        let target = &self.targets[self.clients[i].target];
        let family = if target.addr.is_ipv6() {
            AddressFamily::INET6
        } else {
            AddressFamily::INET
        };
        let fd = match socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => return self.connect_failed(i, format!("socket: {e}"), now),
        };
        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        match rustix::net::connect(&fd, &target.addr) {
            Ok(()) | Err(Errno::INPROGRESS) => {}
            Err(e) => return self.connect_failed(i, format!("connect: {e}"), now),
        }
        let transport = match (&self.tls, target.tls) {
            (Some(cfg), true) => {
                match rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|name| {
                        rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())
                    }) {
                    Ok(conn) => Transport::Tls(Box::new(conn)),
                    Err(e) => return self.connect_failed(i, format!("tls: {e}"), now),
                }
            }
            _ => Transport::Plain,
        };
        let interest = epoll::EventFlags::IN | epoll::EventFlags::OUT | epoll::EventFlags::RDHUP;
        if let Err(e) = epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(i as u64),
            interest,
        ) {
            return self.connect_failed(i, format!("epoll add: {e}"), now);
        }
        let c = &mut self.clients[i];
        c.fd = Some(fd);
        c.transport = transport;
        c.phase = Phase::Connecting;
        c.want_out = true;
        c.registered = true;
        c.reading_suspended = false;
        c.out.clear();
        c.carry = Vec::new();
        self.set_timer(i, now + self.config.connect_timeout, TimerKind::Timeout);
    }

    /// Recomputes client `i`'s epoll interest.
    fn update_interest(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let Some(fd) = &c.fd else {
            return;
        };
        if c.reading_suspended {
            // Out of epoll entirely while stalled: HUP/ERR cannot be masked, and a peer that
            // closes during the stall would otherwise make every wait return at once.
            if c.registered {
                let _ = epoll::delete(&self.epoll, fd);
                c.registered = false;
            }
            return;
        }
        let want_out = !c.out.is_empty() || c.transport.wants_write();
        let mut flags = epoll::EventFlags::RDHUP | epoll::EventFlags::IN;
        if want_out {
            flags |= epoll::EventFlags::OUT;
        }
        c.want_out = want_out;
        let data = epoll::EventData::new_u64(i as u64);
        if c.registered {
            let _ = epoll::modify(&self.epoll, fd, data, flags);
        } else if epoll::add(&self.epoll, fd, data, flags).is_ok() {
            c.registered = true;
        }
    }

    /// Dispatches a readiness event.
    fn on_ready(&mut self, i: usize, flags: epoll::EventFlags, buf: &mut [u8]) {
        let now = Instant::now();
        match self.clients[i].phase {
            Phase::Connecting => {
                let Some(fd) = &self.clients[i].fd else {
                    return;
                };
                match rustix::net::sockopt::socket_error(fd) {
                    Ok(Ok(())) if flags.contains(epoll::EventFlags::OUT) => self.connected(i, now),
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.connect_failed(i, format!("connect: {e}"), now),
                    Err(e) => self.connect_failed(i, format!("connect: {e}"), now),
                }
            }
            Phase::Handshaking { .. } => {
                if flags.contains(epoll::EventFlags::OUT) {
                    self.flush_out(i, now);
                }
                if flags.intersects(
                    epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR,
                ) {
                    self.read_handshake(i, buf, now);
                }
            }
            Phase::Open | Phase::Closing => {
                if flags.contains(epoll::EventFlags::OUT) {
                    self.flush_out(i, now);
                }
                if !self.clients[i].reading_suspended
                    && flags.intersects(
                        epoll::EventFlags::IN
                            | epoll::EventFlags::HUP
                            | epoll::EventFlags::ERR
                            | epoll::EventFlags::RDHUP,
                    )
                {
                    self.read_frames(i, buf, now);
                }
            }
            Phase::Idle | Phase::Done => {}
        }
    }

    /// TCP is up: send the upgrade request.
    fn connected(&mut self, i: usize, now: Instant) {
        let target = &self.targets[self.clients[i].target];
        let mut path = target.path_and_query.clone();
        if self.config.reconnect {
            // Exact when the stream numbers its events (the server replays from that seq,
            // inclusive: the one duplicate is skipped), else by time (replayed events up to the
            // last are skipped by the generator's numbers).
            let state = &self.clients[i].state;
            if let Some(seq) = state.order.last_wire {
                path = super::with_cursor(&path, seq);
            } else if let Some(t) = state.max_time_us {
                path = super::with_cursor(&path, t);
            }
        }
        let key = tungstenite::handshake::client::generate_key();
        let request = conn::upgrade_request(&target.host_header, &path, &key);
        let c = &mut self.clients[i];
        c.out = request;
        c.phase = Phase::Handshaking {
            buf: Vec::new(),
            key,
        };
        self.flush_out(i, now);
    }

    /// Writes queued bytes.
    fn flush_out(&mut self, i: usize, now: Instant) {
        let c = &mut self.clients[i];
        let Some(fd) = &c.fd else {
            return;
        };
        let fd = fd.as_fd();
        let mut result = c.transport.flush(fd);
        while result.is_ok() && !c.out.is_empty() {
            match c.transport.send(fd, &c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => result = Err(e),
            }
        }
        let need_out = !c.out.is_empty() || c.transport.wants_write();
        if let Err(e) = result {
            let phase_open = matches!(c.phase, Phase::Open | Phase::Closing);
            if phase_open {
                self.disconnected(i, now);
            } else {
                self.connect_failed(i, format!("write: {e}"), now);
            }
            return;
        }
        if need_out != c.want_out {
            self.update_interest(i);
        }
    }

    /// Reads (part of) the upgrade response.
    fn read_handshake(&mut self, i: usize, buf: &mut [u8], now: Instant) {
        let c = &mut self.clients[i];
        let Some(fd) = &c.fd else {
            return;
        };
        let n = match c.transport.recv(fd.as_fd(), buf) {
            Ok(0) => return self.connect_failed(i, "closed during the upgrade".into(), now),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => return self.connect_failed(i, format!("read: {e}"), now),
        };
        let Phase::Handshaking { buf: head, key } = &mut c.phase else {
            return;
        };
        head.extend_from_slice(&buf[..n]);
        match conn::parse_upgrade_response(head, key) {
            Ok(None) => {}
            Ok(Some(Upgrade::Refused { status })) => {
                c.state.refused.push(status);
                self.conns.connect_failures += 1;
                self.note_failure(format!("upgrade refused with HTTP {status}"));
                self.drop_socket(i);
                self.schedule_retry(i, now);
            }
            Ok(Some(Upgrade::Accepted { head_len })) => {
                let rest = head.split_off(head_len);
                c.phase = Phase::Open;
                c.session = Session::new();
                c.state.upgrades += 1;
                c.failures_in_row = 0;
                c.state.order.replaying =
                    c.state.order.last.is_some() || c.state.order.last_wire.is_some();
                for hello in &self.hellos {
                    let mask = fastrand::u32(..).to_ne_bytes();
                    crate::frame::encode_client_frame(
                        crate::frame::Opcode::Text,
                        hello.as_bytes(),
                        mask,
                        &mut c.out,
                    );
                }
                self.clear_timer(i);
                if !rest.is_empty() {
                    self.clients[i].carry = rest;
                    self.process(i, &mut [], 0, now);
                }
                self.flush_out(i, now);
            }
            Err(e) => {
                self.conns.connect_failures += 1;
                self.note_failure(format!("bad upgrade response: {e}"));
                self.drop_socket(i);
                self.schedule_retry(i, now);
            }
        }
    }

    /// Keeps a few connection failure reasons.
    fn note_failure(&mut self, why: String) {
        if self.conns.connect_failure_examples.len() < conn::MAX_FAILURE_EXAMPLES {
            self.conns.connect_failure_examples.push(why);
        }
    }

    /// Reads once and processes complete frames.
    fn read_frames(&mut self, i: usize, buf: &mut [u8], now: Instant) {
        let c = &mut self.clients[i];
        let Some(fd) = &c.fd else {
            return;
        };
        let fd = fd.as_fd();
        let carried = c.carry.len();
        let result = if carried + MIN_READ_ROOM > buf.len() {
            // A frame larger than the shared buffer: grow the carry itself.
            c.carry.reserve(READ_BUF);
            let spare = c.carry.capacity() - c.carry.len();
            let mut tmp = vec![0u8; spare.min(READ_BUF)];
            let r = c.transport.recv(fd, &mut tmp);
            if let Ok(n) = r {
                c.carry.extend_from_slice(&tmp[..n]);
            }
            r.map(|n| (n, true))
        } else {
            buf[..carried].copy_from_slice(&c.carry);
            c.transport
                .recv(fd, &mut buf[carried..])
                .map(|n| (n, false))
        };
        match result {
            Ok((0, _)) => self.disconnected(i, now),
            Ok((n, in_carry)) => {
                self.conns.reads += 1;
                if in_carry {
                    self.process(i, &mut [], 0, now);
                } else {
                    self.clients[i].carry.clear();
                    self.process(i, buf, carried + n, now);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.disconnected(i, now),
        }
    }

    /// Feeds `buf[..len]` (or, when `len == 0`, the client's carry) to the session.
    fn process(&mut self, i: usize, buf: &mut [u8], len: usize, now: Instant) {
        let now_us = wall_us();
        let c = &mut self.clients[i];
        let filter = &self.filters[c.target];
        let (used, next) = if len == 0 {
            let data = std::mem::take(&mut c.carry);
            let (used, next) = c.session.feed(
                &data,
                &mut c.state,
                filter,
                &mut self.verifier,
                &self.checks[c.target],
                &mut self.totals,
                now_us,
                &mut c.out,
            );
            c.carry = data;
            c.carry.drain(..used);
            (used, next)
        } else {
            let (used, next) = c.session.feed(
                &buf[..len],
                &mut c.state,
                filter,
                &mut self.verifier,
                &self.checks[c.target],
                &mut self.totals,
                now_us,
                &mut c.out,
            );
            c.carry.extend_from_slice(&buf[used..len]);
            (used, next)
        };
        let _ = used;
        if c.carry.is_empty() && c.carry.capacity() > CARRY_KEEP {
            c.carry = Vec::new();
        }
        match next {
            Next::Continue => {}
            Next::Closed => {
                c.phase = Phase::Closing;
                self.set_timer(i, now + CLOSE_LINGER, TimerKind::Linger);
            }
            Next::Abort => {
                self.disconnected(i, now);
                return;
            }
        }
        // The one-off stall.
        let c = &mut self.clients[i];
        if let Some(after) = self.config.pause_after {
            let eligible = self.config.pause_clients.is_none_or(|m| c.state.id < m);
            if eligible && !c.paused && c.state.events >= after {
                c.paused = true;
                c.reading_suspended = true;
                self.set_timer(i, now + self.config.pause_for, TimerKind::Resume);
            }
        }
        if !self.clients[i].out.is_empty() {
            self.flush_out(i, now);
        }
        let c = &self.clients[i];
        if c.reading_suspended || c.out.is_empty() == c.want_out {
            self.update_interest(i);
        }
    }

    /// Closes the socket (removing it from epoll by closing the only fd).
    fn drop_socket(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(fd) = c.fd.take()
            && c.registered
        {
            let _ = epoll::delete(&self.epoll, &fd);
        }
        c.registered = false;
        c.transport = Transport::Plain;
        c.out = Vec::new();
        c.carry = Vec::new();
        c.want_out = false;
        c.reading_suspended = false;
        c.phase = Phase::Idle;
    }

    /// A connection attempt failed before the upgrade.
    fn connect_failed(&mut self, i: usize, why: String, now: Instant) {
        self.conns.connect_failures += 1;
        self.note_failure(why);
        self.drop_socket(i);
        self.schedule_retry(i, now);
    }

    /// An upgraded connection ended (EOF, reset, abort, or after our close reply).
    fn disconnected(&mut self, i: usize, now: Instant) {
        if matches!(self.clients[i].phase, Phase::Open) {
            self.conns.disconnects_without_close += 1;
        }
        self.drop_socket(i);
        self.schedule_retry(i, now);
    }

    /// Reconnects later with `--reconnect`, else retires the client.
    fn schedule_retry(&mut self, i: usize, now: Instant) {
        let c = &mut self.clients[i];
        if !self.config.reconnect {
            c.phase = Phase::Done;
            self.clear_timer(i);
            return;
        }
        c.failures_in_row = c.failures_in_row.saturating_add(1);
        let shift = c.failures_in_row.saturating_sub(1).min(8);
        let backoff = (MIN_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF);
        // Jitter so a mass drop does not come back as a thundering herd in lockstep.
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        c.phase = Phase::Idle;
        self.set_timer(i, now + backoff + jitter, TimerKind::Retry);
    }
}
