//! Deterministic simulation of one fan-out worker: the real scheduler and the real driver run
//! against a simulated kernel ([`SimKernel`]), with a real hub (logs, index and shapes in a
//! temporary directory) fed by the real writer, and seeded peers reading, stalling, pinging,
//! flooding, changing filters, closing and resetting.
//!
//! The simulated kernel does what io_uring may do and the tests on real sockets rarely show:
//! sends that complete partially or with `EAGAIN`, a submission queue that fills at any point
//! (pushing into a full one is a violation: the driver makes room first) or stops taking
//! entries (`EBUSY`), entries that run at submission or only later, completions in any order,
//! linked pairs (a linked entry split across two submissions is a violation), cancellation. Retention punches real holes under lagging
//! readers, shapes are retired while clients attach. A third of the seeds run with a filter
//! budget the peers overrun, so handshakes and `options_update`s are refused.
//!
//! Checked after every step: the scheduler's and the driver's invariants (places match the
//! lists, no pipe with two owners, pins only for sends in flight, control bytes within the
//! cap, no round held past its bound); and for every peer, what it received: well-formed
//! frames only (a control frame inside a data frame, foreign bytes or zeros from a punched
//! region break that), each event byte-identical to what was appended, in order, no
//! duplicate, nothing after a close frame; the filter budget's charge equals what the worker's
//! clients hold; no DID-parked client has an event with one of its DIDs between its position
//! and the routing cursor. Every 50 steps and at the end: no gap (exactly the events its
//! filter passes from its start point, allowing the one switch an `options_update` makes; a
//! gap never closes, so the next check sees it). At the end, with the feed stopped and every
//! peer reading, every open peer has received everything; a refused update was closed with
//! 1008 and none of its filters' events; then everyone resets, and once the worker has let
//! them all go the budget is whole again.
//!
//! `cargo test --lib fanout::sim` runs [`SEEDS`] seeds; `TEST_JETRELAY_SIM_SEEDS=N` runs N (soak),
//! `TEST_JETRELAY_SIM_SEED=S` runs seed S alone (the reproduction a failure prints).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ClientPolicy;
use super::driver::{Completion, Driver, Entry, Kernel, PIPE_BYTES};
use super::scheduler::Attach;
use super::waker::Waker;
use crate::encoding::{ENCODINGS, Encoding};
use crate::event::EventKind;
use crate::frame::{Opcode, parse_header};
use crate::hub::{Hub, stored_payload_len};
use crate::index::EventIndex;
use crate::limits::{Limits, LimitsConfig};
use crate::log::Stream;
use crate::mock::Generator;
use crate::subscription::{CollectionPattern, SubscriberOptions};
use crate::wire::KindSet;
use crate::writer::{LogWriter, RetentionPolicy, WriterOptions, enforce_retention};

/// Seeds run by the normal test suite.
const SEEDS: u64 = 2000;
/// Simulation steps per seed (each: the world acts, then the driver turns once).
const STEPS: usize = 300;
/// Most steps of the final drain (feed stopped, every peer reading everything it has), which
/// ends as soon as every open peer has everything.
const DRAIN_STEPS: usize = 20_000;

/// A simulated socket (an index into the kernel's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSock(usize);

/// A simulated pipe (an index into the kernel's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimPipe(usize);

/// One simulated connection, seen from the kernel.
#[derive(Default)]
struct SockState {
    /// Bytes the relay handed over that the peer has not read yet.
    unread: VecDeque<u8>,
    /// Send buffer capacity (bytes the relay may have unread at once).
    capacity: usize,
    /// Bytes the peer sent that the relay has not read.
    inbound: VecDeque<u8>,
    /// The peer closed its side (the relay reads EOF after `inbound`).
    peer_eof: bool,
    /// The peer reset the connection.
    reset: bool,
    /// The relay sent FIN.
    fin: bool,
    /// The relay shut the socket down.
    shut: bool,
    /// The armed multishot POLLIN.
    pollin: Option<u64>,
    /// Armed POLLOUTs.
    pollout: Vec<u64>,
}

impl SockState {
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.unread.len())
    }
}

/// An entry the kernel has accepted but not run.
enum Queued {
    Send {
        sock: usize,
        ptr: usize,
        len: usize,
    },
    SpliceIn {
        file: std::fs::File,
        off: u64,
        pipe: usize,
        len: u32,
        /// Set when the linked `SpliceOut` arrived in the same submission.
        linked: bool,
    },
    SpliceOut {
        sock: usize,
        pipe: usize,
        len: u32,
    },
    PollOut {
        sock: usize,
    },
    PollIn {
        sock: usize,
    },
    Cancel {
        sock: usize,
    },
    ReadWake,
}

impl Queued {
    fn sock(&self) -> Option<usize> {
        match self {
            Queued::Send { sock, .. }
            | Queued::SpliceOut { sock, .. }
            | Queued::PollOut { sock }
            | Queued::PollIn { sock }
            | Queued::Cancel { sock } => Some(*sock),
            _ => None,
        }
    }
}

/// The simulated kernel.
pub struct SimKernel {
    /// Seeded choices.
    rng: fastrand::Rng,
    /// Simulated monotonic time: `base + elapsed`.
    base: Instant,
    elapsed: Duration,
    /// Submission queue capacity and content.
    sq_cap: usize,
    sq: Vec<(Queued, u64)>,
    /// Accepted entries not run yet (each a chain: a splice pair stays together).
    deferred: Vec<Vec<(Queued, u64)>>,
    /// Probability that a submitted chain runs later instead of at submission.
    defer_p: f64,
    /// Completions not reaped yet.
    cq: Vec<Completion>,
    /// Sockets and pipes.
    socks: Vec<SockState>,
    pipes: Vec<VecDeque<u8>>,
    /// The armed wake-up read, and whether a wake-up is pending.
    wake: Option<u64>,
    wake_pending: bool,
    /// Simulated cost of each pushed entry (so pacing sees work).
    cost: Duration,
    /// `io_uring_enter` accepts nothing (`EBUSY`: the completion queue overflowed), which the
    /// real wrapper reports as success; the queue stays as full as it was.
    stuck: bool,
}

impl SimKernel {
    fn new(rng: &mut fastrand::Rng) -> SimKernel {
        SimKernel {
            rng: fastrand::Rng::with_seed(rng.u64(..)),
            base: Instant::now(),
            elapsed: Duration::ZERO,
            sq_cap: rng.usize(2..=16),
            sq: Vec::new(),
            deferred: Vec::new(),
            defer_p: [0.0, 0.1, 0.5][rng.usize(0..3)],
            cq: Vec::new(),
            socks: Vec::new(),
            pipes: Vec::new(),
            wake: None,
            wake_pending: false,
            cost: Duration::from_micros(rng.u64(0..6)),
            stuck: false,
        }
    }

    fn new_socket(&mut self, capacity: usize) -> SimSock {
        self.socks.push(SockState {
            capacity,
            ..SockState::default()
        });
        SimSock(self.socks.len() - 1)
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
    }

    /// The writer appended data: the wake-up read completes.
    fn signal_wake(&mut self) {
        self.wake_pending = true;
        self.deliver_wake();
    }

    fn deliver_wake(&mut self) {
        if self.wake_pending
            && let Some(ud) = self.wake.take()
        {
            self.wake_pending = false;
            self.cq.push(done(ud, 8));
        }
    }

    /// Moves the accepted submission queue into execution: each chain runs now or later.
    fn submit_queue(&mut self) {
        let sq = std::mem::take(&mut self.sq);
        let mut chains: Vec<Vec<(Queued, u64)>> = Vec::new();
        let mut open_link = false;
        for (q, ud) in sq {
            if open_link {
                let linked = matches!(q, Queued::SpliceOut { .. });
                assert!(
                    linked,
                    "a linked splice was followed by another entry in its submission"
                );
                if let Some(chain) = chains.last_mut() {
                    if let Some((Queued::SpliceIn { linked, .. }, _)) = chain.first_mut() {
                        *linked = true;
                    }
                    chain.push((q, ud));
                }
                open_link = false;
                continue;
            }
            open_link = matches!(q, Queued::SpliceIn { .. });
            chains.push(vec![(q, ud)]);
        }
        assert!(
            !open_link,
            "a linked splice pair was split across two submissions"
        );
        for chain in chains {
            if self.rng.f64() < self.defer_p && !matches!(chain[0].0, Queued::ReadWake) {
                self.deferred.push(chain);
            } else {
                self.run_chain(chain);
            }
        }
    }

    /// Runs some of the deferred chains (in random order).
    fn run_some_deferred(&mut self) {
        let mut i = 0;
        while i < self.deferred.len() {
            if self.rng.bool() {
                let chain = self.deferred.swap_remove(i);
                self.run_chain(chain);
            } else {
                i += 1;
            }
        }
    }

    fn run_chain(&mut self, chain: Vec<(Queued, u64)>) {
        let mut first_result: Option<(i32, u32)> = None;
        for (q, ud) in chain {
            if let Some((res, want)) = first_result
                && res != want as i32
            {
                // A short or failed first half cancels the linked second.
                self.cq.push(done(ud, -libc::ECANCELED));
                continue;
            }
            let want = match &q {
                Queued::SpliceIn { len, .. } => Some(*len),
                _ => None,
            };
            let res = self.run(q, ud);
            if let (Some(res), Some(want)) = (res, want) {
                first_result = Some((res, want));
            }
        }
    }

    /// Runs one entry; returns its result when it completed now.
    fn run(&mut self, q: Queued, ud: u64) -> Option<i32> {
        let res = match q {
            Queued::Send { sock, ptr, len } => {
                let s = &mut self.socks[sock];
                if s.shut || s.reset {
                    -libc::EPIPE
                } else if s.room() == 0 {
                    -libc::EAGAIN
                } else {
                    // Sometimes less than there is room for (a partial send).
                    let mut n = len.min(s.room());
                    if n > 1 && self.rng.u8(..) < 40 {
                        n = self.rng.usize(1..n);
                    }
                    // SAFETY: the driver keeps the bytes of a send it pushed valid until the
                    // send's completion is reaped (ring bytes pinned, control bytes owned by
                    // its transfer record): that is the property under test, and a breach
                    // shows as wrong bytes, never as freed memory (the ring and the boxed
                    // control bytes outlive the entry).
                    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, n) };
                    s.unread.extend(bytes);
                    n as i32
                }
            }
            Queued::SpliceIn {
                file,
                off,
                pipe,
                len,
                ..
            } => {
                let room = PIPE_BYTES - self.pipes[pipe].len();
                let n = (len as usize).min(room);
                let mut buf = vec![0u8; n];
                match std::os::unix::fs::FileExt::read_at(&file, &mut buf, off) {
                    Ok(got) => {
                        self.pipes[pipe].extend(&buf[..got]);
                        got as i32
                    }
                    Err(_) => -libc::EIO,
                }
            }
            Queued::SpliceOut { sock, pipe, len } => {
                let s = &mut self.socks[sock];
                let p = &mut self.pipes[pipe];
                if s.shut || s.reset {
                    -libc::EPIPE
                } else if s.room() == 0 || p.is_empty() {
                    -libc::EAGAIN
                } else {
                    let n = (len as usize).min(s.room()).min(p.len());
                    s.unread.extend(p.drain(..n));
                    n as i32
                }
            }
            Queued::PollOut { sock } => {
                let s = &mut self.socks[sock];
                if s.room() > 0 || s.shut || s.reset {
                    libc::POLLOUT as i32
                } else {
                    s.pollout.push(ud);
                    return None;
                }
            }
            Queued::PollIn { sock } => {
                let s = &mut self.socks[sock];
                s.pollin = Some(ud);
                if !s.inbound.is_empty() || s.peer_eof || s.reset {
                    self.cq.push(Completion {
                        user_data: ud,
                        result: libc::POLLIN as i32,
                        more: true,
                    });
                }
                return None;
            }
            Queued::Cancel { sock } => {
                let mut n = 0;
                // Everything of this socket not run yet is cancelled.
                let mut i = 0;
                while i < self.deferred.len() {
                    if self.deferred[i].iter().any(|(q, _)| q.sock() == Some(sock)) {
                        for (_, ud) in self.deferred.swap_remove(i) {
                            self.cq.push(done(ud, -libc::ECANCELED));
                            n += 1;
                        }
                    } else {
                        i += 1;
                    }
                }
                let s = &mut self.socks[sock];
                for ud in s.pollout.drain(..) {
                    self.cq.push(done(ud, -libc::ECANCELED));
                    n += 1;
                }
                if let Some(ud) = s.pollin.take() {
                    self.cq.push(done(ud, -libc::ECANCELED));
                    n += 1;
                }
                n
            }
            Queued::ReadWake => {
                self.wake = Some(ud);
                self.deliver_wake();
                return None;
            }
        };
        self.cq.push(done(ud, res));
        Some(res)
    }

    /// The peer read up to `n` bytes: returns them (and wakes POLLOUT waiters).
    fn peer_read(&mut self, sock: SimSock, n: usize) -> Vec<u8> {
        let s = &mut self.socks[sock.0];
        let n = n.min(s.unread.len());
        let out: Vec<u8> = s.unread.drain(..n).collect();
        if s.room() > 0 {
            for ud in s.pollout.drain(..) {
                self.cq.push(done(ud, libc::POLLOUT as i32));
            }
        }
        out
    }

    /// The peer sent bytes (or closed, or reset): POLLIN fires.
    fn peer_input(&mut self, sock: SimSock, bytes: &[u8], eof: bool, reset: bool) {
        let s = &mut self.socks[sock.0];
        if s.shut {
            return;
        }
        s.inbound.extend(bytes);
        s.peer_eof |= eof;
        s.reset |= reset;
        if reset {
            for ud in s.pollout.drain(..) {
                self.cq.push(done(ud, libc::POLLOUT as i32));
            }
        }
        if let Some(ud) = s.pollin {
            self.cq.push(Completion {
                user_data: ud,
                result: libc::POLLIN as i32,
                more: true,
            });
        }
    }
}

/// Whether `TEST_JETRELAY_SIM_TRACE` is set (read once).
pub fn tracing_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TEST_JETRELAY_SIM_TRACE").is_some())
}

/// A user_data as `slot/op` for traces.
fn describe(ud: u64) -> String {
    if ud == super::driver::WAKE {
        return "wake".into();
    }
    format!("{}/{}", ud >> 32, ud & 0xFF)
}

fn done(user_data: u64, result: i32) -> Completion {
    Completion {
        user_data,
        result,
        more: false,
    }
}

impl Kernel for SimKernel {
    type Socket = SimSock;
    type Pipe = SimPipe;

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn wall_us(&self) -> u64 {
        1_700_000_000_000_000 + self.elapsed.as_micros() as u64
    }

    fn sq_room(&mut self) -> usize {
        self.sq_cap - self.sq.len()
    }

    unsafe fn push(&mut self, entry: Entry<'_, SimSock, SimPipe>, user_data: u64) {
        // As the real wrapper: a full queue here means the driver did not make room, and a
        // submit now could split a linked pair.
        assert!(
            self.sq.len() < self.sq_cap,
            "push into a full submission queue (the driver must make room first)"
        );
        self.elapsed += self.cost;
        let q = match entry {
            Entry::Send { sock, ptr, len } => Queued::Send {
                sock: sock.0,
                ptr: ptr as usize,
                len: len as usize,
            },
            Entry::SpliceIn {
                file,
                off,
                pipe,
                len,
            } => Queued::SpliceIn {
                file: file.file().try_clone().expect("dup the log file"),
                off,
                pipe: pipe.0,
                len,
                linked: false,
            },
            Entry::SpliceOut { pipe, sock, len } => Queued::SpliceOut {
                sock: sock.0,
                pipe: pipe.0,
                len,
            },
            Entry::PollOut { sock } => Queued::PollOut { sock: sock.0 },
            Entry::PollIn { sock } => Queued::PollIn { sock: sock.0 },
            Entry::Cancel { sock } => Queued::Cancel { sock: sock.0 },
            Entry::ReadWake => Queued::ReadWake,
        };
        sim_trace!("push {} {:?}", describe(user_data), q.sock());
        self.sq.push((q, user_data));
    }

    fn submit(&mut self, wait: Option<Instant>) -> io::Result<()> {
        if self.stuck {
            return Ok(());
        }
        self.submit_queue();
        self.run_some_deferred();
        if let Some(deadline) = wait {
            // Nothing else happens in the world while the worker waits: time passes up to
            // the deadline or a little (the world acts between turns).
            let left = deadline.saturating_duration_since(self.now());
            let step = Duration::from_micros(self.rng.u64(1..20_000));
            self.elapsed += left.min(step);
        }
        Ok(())
    }

    fn has_completions(&mut self) -> bool {
        !self.cq.is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Completions in any order.
        self.rng.shuffle(&mut self.cq);
        for c in &self.cq {
            sim_trace!(
                "done {} = {} more {}",
                describe(c.user_data),
                c.result,
                c.more
            );
        }
        out.append(&mut self.cq);
    }

    fn recv(&mut self, sock: &SimSock, buf: &mut [u8]) -> io::Result<usize> {
        let s = &mut self.socks[sock.0];
        if s.reset {
            return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
        }
        if s.inbound.is_empty() {
            return if s.peer_eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(s.inbound.len());
        for (b, v) in buf.iter_mut().zip(s.inbound.drain(..n)) {
            *b = v;
        }
        Ok(n)
    }

    fn shutdown(&mut self, sock: &SimSock, how: rustix::net::Shutdown) {
        let s = &mut self.socks[sock.0];
        match how {
            rustix::net::Shutdown::Write => s.fin = true,
            _ => {
                s.fin = true;
                s.shut = true;
            }
        }
    }

    fn new_pipe(&mut self) -> io::Result<SimPipe> {
        self.pipes.push(VecDeque::new());
        Ok(SimPipe(self.pipes.len() - 1))
    }
}

// ---- the world: events and peers ----------------------------------------------------------

/// One appended event as the model knows it.
struct SimEvent {
    /// The upstream JSON (the generator's).
    json: Vec<u8>,
    did: String,
    kind: EventKind,
    collection: Option<String>,
    /// Payload lengths in each encoding (by [`Encoding::index`]), from the index.
    lens: [usize; ENCODINGS],
}

/// What a peer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Reads steadily.
    Reader,
    /// Reads in bursts with long stalls.
    Staller,
    /// Floods pings without reading.
    PingFlooder,
    /// Floods data and pong frames (ignored on v1, a protocol violation on v2) while reading.
    FrameFlooder,
    /// Never reads at all.
    Silent,
}

/// One simulated client.
struct Peer {
    /// Its socket in the simulated kernel.
    sock: SimSock,
    /// Its slot in the worker (for failure messages).
    slot: u32,
    /// The frames it receives.
    encoding: Encoding,
    /// The kinds it asked for (every kind of its wire on v1).
    kinds: KindSet,
    /// Its filter before its one `options_update`, and after (if sent).
    before: SubscriberOptions,
    after: Option<SubscriberOptions>,
    /// `requireHello`: nothing before the update.
    hello: bool,
    /// Its first event.
    start: u64,
    behaviour: Behaviour,
    /// Bytes read but not parsed into frames yet.
    pending: Vec<u8>,
    /// Events received, by seq.
    received: Vec<u64>,
    /// Payloads of pings sent.
    pings: Vec<Vec<u8>>,
    /// The close frame received (code, reason).
    closed: Option<(u16, String)>,
    /// It reset, closed, or sent garbage: no completeness expected.
    gone: bool,
}

/// One simulation run.
struct Sim {
    /// The seed (printed by the failure message).
    seed: u64,
    rng: fastrand::Rng,
    dir: PathBuf,
    hub: Arc<Hub>,
    writer: LogWriter,
    waker: Arc<Waker>,
    driver: Driver<SimKernel>,
    generator: Generator,
    events: Vec<SimEvent>,
    peers: Vec<Peer>,
    decompressor: crate::compress::EventDecompressor,
    v2_decompressor: crate::compress::EventDecompressor,
    dids: Vec<String>,
    max_disk: u64,
    /// Handshakes the filter budget refused (the listener's 503) and `options_update`s it
    /// answered with a close.
    budget_refusals: u64,
}

const COLLECTIONS: [&str; 5] = [
    "app.bsky.feed.post",
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "app.bsky.feed.*",
    "app.bsky.*",
];

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = std::env::temp_dir().join(format!(
            "jetrelay-sim-{}-{seed}-{}",
            std::process::id(),
            rng.u32(..)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("sim dir");
        let ring = 1usize << rng.u32(12..=15);
        let streams = Encoding::ALL.map(|enc| {
            let s = Stream::create(enc.label(), &dir.join(enc.log_name()), ring).expect("log");
            s.set_pin_wait(Duration::ZERO);
            s
        });
        let limits = Limits::new(LimitsConfig {
            max_clients: 1000,
            max_conns_per_ip: 1000,
            conn_rate_per_ip: 1000.0,
            allow: Vec::new(),
        });
        let shapes = crate::shapes::Shapes::new(
            dir.join("shapes"),
            crate::shapes::ShapeLimits {
                // The simulation creates shapes at will.
                creations_per_minute: 1e6,
                max_per_ip: crate::shapes::MAX_SHAPES,
                allow: Vec::new(),
                max_disk: u64::MAX,
            },
        )
        .expect("shapes")
        .with_ring_bytes(ring);
        // A third of the seeds run with a filter budget a dozen peers overrun (a client's
        // filters cost 0–420 bytes here), so that handshakes and updates are refused and every
        // way out must give its charge back. Drawn from its own generator: the other seeds
        // replay exactly as they did before the budget was simulated.
        let mut budget_rng = fastrand::Rng::with_seed(seed ^ 0xB0D6_E7F1_17E2);
        let budget = if budget_rng.u8(0..3) == 0 {
            let limit = budget_rng.u64(150..2500);
            // Peers come from three addresses: half the time an address's share binds first.
            let per_address = if budget_rng.bool() { limit } else { limit / 2 };
            crate::filter_budget::FilterBudget::new(limit, per_address, Vec::new())
        } else {
            crate::filter_budget::FilterBudget::new(u64::MAX, u64::MAX, Vec::new())
        };
        let hub = Arc::new(Hub::new(
            streams,
            EventIndex::in_memory(),
            limits,
            shapes,
            budget,
        ));
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let writer = LogWriter::new(hub.clone(), vec![waker.clone()], WriterOptions::default())
            .expect("writer");
        let kernel = SimKernel::new(&mut rng);
        let policy = ClientPolicy {
            ping_interval: Duration::from_secs(1),
            max_inbound_rate: 64 * 1024,
            max_lag: None,
            duty: [1.0, 0.5, 0.25][rng.usize(0..3)],
            thin_linger: Duration::from_millis([0, 20, 80][rng.usize(0..3)]),
            thin_linger_load: [0.0, 0.1][rng.usize(0..2)],
            options_update_rate: 1.0,
        };
        let driver = Driver::new(kernel, 0, hub.clone(), waker.clone(), policy).expect("driver");
        let generator = Generator::new(seed, 6);
        let dids = (0..6).map(|i| generator.did_by_index(i)).collect();
        Sim {
            seed,
            rng,
            dir,
            hub,
            writer,
            waker,
            driver,
            generator,
            events: Vec::new(),
            peers: Vec::new(),
            decompressor: crate::compress::EventDecompressor::new().expect("dictionary"),
            v2_decompressor: crate::compress::EventDecompressor::with_dictionary(
                crate::compress::Dictionary::V2,
            )
            .expect("dictionary"),
            dids,
            max_disk: 1 << 30,
            budget_refusals: 0,
        }
    }

    fn kernel(&mut self) -> &mut SimKernel {
        self.driver.kernel_mut()
    }

    /// Appends `n` events through the real writer.
    fn append(&mut self, n: usize) {
        for _ in 0..n {
            let seq = self.events.len() as u64;
            let mut json = Vec::new();
            self.generator
                .event(seq, 1_000_000_000 + seq as i64, &mut json);
            let meta = crate::event::parse_event(&json).expect("generated event parses");
            let mut ev = SimEvent {
                did: meta.did.to_string(),
                kind: meta.kind,
                collection: meta.collection.as_deref().map(str::to_owned),
                lens: [0; ENCODINGS],
                json: json.clone(),
            };
            self.writer
                .append_event(&crate::upstream::Incoming::v1(&json, meta))
                .expect("append");
            let index = self.hub.index();
            index.walk(index.pos_of(seq), 1, |_, e| {
                ev.lens = std::array::from_fn(|i| {
                    stored_payload_len(e.lens[i] as u64) as usize * usize::from(e.lens[i] > 0)
                });
                false
            });
            drop(index);
            self.events.push(ev);
        }
        self.kernel().signal_wake();
    }

    fn random_options(&mut self) -> SubscriberOptions {
        let collections: Vec<String> = match self.rng.u8(0..4) {
            0 | 1 => Vec::new(),
            _ => (0..self.rng.usize(1..3))
                .map(|_| COLLECTIONS[self.rng.usize(0..COLLECTIONS.len())].to_owned())
                .collect(),
        };
        let dids: Vec<String> = if self.rng.u8(0..3) == 0 {
            (0..self.rng.usize(1..3))
                .map(|_| self.dids[self.rng.usize(0..self.dids.len())].clone())
                .collect()
        } else {
            Vec::new()
        };
        let max = (self.rng.u8(0..5) == 0).then(|| self.rng.u32(300..900));
        SubscriberOptions::new(&collections, &dids, max).expect("valid options")
    }

    /// A new peer, from a random start point.
    fn attach(&mut self) {
        let encoding = Encoding::ALL[self.rng.usize(0..ENCODINGS)];
        let kinds = if encoding.v2() && self.rng.bool() {
            let all = crate::wire::MessageKind::ALL;
            let picked: Vec<_> = all.into_iter().filter(|_| self.rng.bool()).collect();
            if picked.is_empty() {
                KindSet::ALL
            } else {
                KindSet::of(&picked)
            }
        } else {
            KindSet::all_for(encoding)
        };
        // requireHello and options_update are v1 only.
        let hello = !encoding.v2() && self.rng.u8(0..8) == 0;
        let before = if hello {
            SubscriberOptions::default()
        } else {
            self.random_options()
        };
        let index = self.hub.index();
        let (first, next) = (index.first_seq(), index.next_seq());
        let start_seq = if next > first && self.rng.bool() {
            self.rng.u64(first..=next)
        } else {
            next
        };
        let start = index.pos_of(start_seq);
        drop(index);
        let behaviour = match self.rng.u8(0..11) {
            0 => Behaviour::Staller,
            1 => Behaviour::PingFlooder,
            2 => Behaviour::Silent,
            3 => Behaviour::FrameFlooder,
            _ => Behaviour::Reader,
        };
        let capacity = self.rng.usize(64..20_000);
        // Three addresses in turn: one address's share and the total both bind.
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1 + (self.peers.len() % 3) as u8], 1));
        // The listener charges the handshake's filters before handing the client over.
        let Ok(filter_reservation) = self.hub.filter_budget.reserve(&before, peer.ip()) else {
            self.budget_refusals += 1;
            return;
        };
        let sock = self.kernel().new_socket(capacity);
        self.waker
            .clients
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let slot = self
            .driver
            .attach(
                sock,
                Attach {
                    peer,
                    encoding,
                    kinds,
                    options: before.clone(),
                    preamble: None,
                    start,
                    require_hello: hello,
                    counted_ip: None,
                    filter_reservation,
                },
            )
            .expect("attach");
        let after = hello.then(|| self.random_options());
        self.peers.push(Peer {
            sock,
            slot,
            encoding,
            kinds,
            before,
            after: None,
            hello,
            start: start.seq,
            behaviour,
            pending: Vec::new(),
            received: Vec::new(),
            pings: Vec::new(),
            closed: None,
            gone: false,
        });
        if let Some(opts) = after {
            let i = self.peers.len() - 1;
            self.send_update(i, opts);
        }
    }

    /// The peer sends an `options_update` (its only one).
    fn send_update(&mut self, i: usize, opts: SubscriberOptions) {
        let mut payload = String::from("{\"type\":\"options_update\",\"payload\":{");
        let colls: Vec<String> = opts
            .wanted_collections
            .iter()
            .map(|c| format!("\"{}\"", pattern_text(c)))
            .collect();
        let dids: Vec<String> = opts
            .wanted_dids
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect();
        payload.push_str(&format!(
            "\"wantedCollections\":[{}],\"wantedDids\":[{}]",
            colls.join(","),
            dids.join(",")
        ));
        if let Some(m) = opts.max_message_size {
            payload.push_str(&format!(",\"maxMessageSizeBytes\":{m}"));
        }
        payload.push_str("}}");
        let mut f = Vec::new();
        crate::frame::encode_client_frame(Opcode::Text, payload.as_bytes(), [1, 2, 3, 4], &mut f);
        self.peers[i].after = Some(opts);
        let sock = self.peers[i].sock;
        self.kernel().peer_input(sock, &f, false, false);
    }

    fn send_ping(&mut self, i: usize) {
        let payload = self.rng.u32(..).to_le_bytes().to_vec();
        let mut f = Vec::new();
        crate::frame::encode_client_frame(Opcode::Ping, &payload, [9, 8, 7, 6], &mut f);
        self.peers[i].pings.push(payload);
        let sock = self.peers[i].sock;
        self.kernel().peer_input(sock, &f, false, false);
    }

    /// One step of the world.
    fn world(&mut self, feeding: bool) {
        if feeding && self.rng.u8(0..3) == 0 {
            let n = self.rng.usize(1..6);
            self.append(n);
        }
        if feeding && self.peers.len() < 12 && self.rng.u8(0..20) == 0 {
            self.attach();
        }
        if self.rng.u8(0..40) == 0 {
            let policy = RetentionPolicy {
                max_age: Duration::from_secs(1 << 30),
                max_disk: self.max_disk,
            };
            enforce_retention(&self.hub, policy).expect("retention");
        }
        if self.rng.u8(0..60) == 0 {
            self.hub.shapes.retire_unused_now();
        }
        for i in 0..self.peers.len() {
            self.peer_step(i, feeding);
        }
    }

    fn peer_step(&mut self, i: usize, feeding: bool) {
        if self.peers[i].gone {
            return;
        }
        let behaviour = if feeding {
            self.peers[i].behaviour
        } else {
            Behaviour::Reader
        };
        let read = match behaviour {
            Behaviour::Reader | Behaviour::FrameFlooder if !feeding => usize::MAX,
            Behaviour::Reader | Behaviour::FrameFlooder => self.rng.usize(0..40_000),
            Behaviour::Staller => {
                if self.rng.u8(0..10) == 0 {
                    self.rng.usize(0..100_000)
                } else {
                    0
                }
            }
            Behaviour::PingFlooder | Behaviour::Silent => 0,
        };
        if read > 0 {
            let sock = self.peers[i].sock;
            let bytes = self.kernel().peer_read(sock, read);
            self.peers[i].pending.extend(bytes);
            self.parse_frames(i);
        }
        if !feeding {
            return;
        }
        let roll = self.rng.u16(0..1000);
        match behaviour {
            Behaviour::PingFlooder if roll < 200 => {
                for _ in 0..self.rng.usize(1..300) {
                    self.send_ping(i);
                }
            }
            Behaviour::FrameFlooder if roll < 200 => {
                let mut f = Vec::new();
                for _ in 0..self.rng.usize(1..300) {
                    let opcode = if self.rng.bool() {
                        Opcode::Pong
                    } else {
                        Opcode::Binary
                    };
                    let payload = vec![0x5A; self.rng.usize(0..126)];
                    crate::frame::encode_client_frame(opcode, &payload, [3, 1, 4, 1], &mut f);
                }
                let sock = self.peers[i].sock;
                self.kernel().peer_input(sock, &f, false, false);
            }
            _ if roll < 5 => self.send_ping(i),
            _ if roll < 8
                && self.peers[i].after.is_none()
                && !self.peers[i].hello
                && !self.peers[i].encoding.v2() =>
            {
                let opts = self.random_options();
                self.send_update(i, opts);
            }
            _ if roll == 9 => {
                let mut f = Vec::new();
                crate::frame::encode_client_close(
                    crate::frame::CloseCode(1000),
                    "",
                    [1, 1, 1, 1],
                    &mut f,
                );
                let sock = self.peers[i].sock;
                self.kernel().peer_input(sock, &f, false, false);
                self.peers[i].gone = true;
            }
            _ if roll == 10 => {
                let sock = self.peers[i].sock;
                self.kernel().peer_input(sock, &[], false, true);
                self.peers[i].gone = true;
            }
            _ if roll == 11 => {
                let sock = self.peers[i].sock;
                self.kernel()
                    .peer_input(sock, &[0xFF, 0xFF, 0xFF], false, false);
                self.peers[i].gone = true;
            }
            _ => {}
        }
    }

    /// Parses the frames a peer has read; panics on anything it must never receive.
    fn parse_frames(&mut self, i: usize) {
        loop {
            let p = &mut self.peers[i];
            let header = match parse_header(&p.pending) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => panic!("peer {i}: malformed frame from the relay: {e:?}"),
            };
            let len = header.frame_len() as usize;
            if p.pending.len() < len {
                return;
            }
            let frame: Vec<u8> = p.pending.drain(..len).collect();
            let payload = &frame[header.header_len..];
            assert!(
                header.fin && header.mask.is_none(),
                "peer {i}: bad frame flags"
            );
            assert!(
                p.closed.is_none(),
                "peer {i}: a frame after the close frame"
            );
            match header.opcode {
                Opcode::Text | Opcode::Binary => {
                    let enc = p.encoding;
                    assert_eq!(header.opcode, enc.opcode(), "peer {i}: frame type");
                    let message = if enc.compressed() {
                        let d = if enc.v2() {
                            &mut self.v2_decompressor
                        } else {
                            &mut self.decompressor
                        };
                        d.decompress(payload, 1 << 20)
                            .unwrap_or_else(|e| panic!("peer {i}: bad zstd frame: {e}"))
                    } else {
                        payload.to_vec()
                    };
                    let seq = event_of(enc, &message)
                        .unwrap_or_else(|| panic!("peer {i}: not an event: {message:?}"));
                    let ev = &self.events[seq as usize];
                    // The wire seq of the event at position `seq` (a fresh in-memory index
                    // numbers from 1).
                    let wire_seq = seq + crate::seqs::FIRST_SEQ;
                    let mut want = Vec::new();
                    if enc.v2() {
                        crate::wire::v1_to_v2(&ev.json, wire_seq, 0, &mut want).expect("converts");
                        assert!(
                            same_v2(&message, &want),
                            "peer {i}: event {seq} is not the v2 form of what was appended"
                        );
                    } else {
                        crate::wire::with_cursor(&ev.json, wire_seq, &mut want).expect("cursor");
                        assert!(
                            message == want,
                            "peer {i}: event {seq} is not byte-identical"
                        );
                    }
                    let p = &mut self.peers[i];
                    if let Some(&last) = p.received.last() {
                        assert!(seq > last, "peer {i}: event {seq} after {last}");
                    }
                    p.received.push(seq);
                }
                Opcode::Pong => {
                    assert!(
                        p.pings.iter().any(|x| x.as_slice() == payload),
                        "peer {i}: a pong for no ping"
                    );
                }
                Opcode::Ping => {
                    let mut f = Vec::new();
                    crate::frame::encode_client_frame(Opcode::Pong, payload, [5, 5, 5, 5], &mut f);
                    if !p.gone {
                        let sock = p.sock;
                        self.kernel().peer_input(sock, &f, false, false);
                    }
                }
                Opcode::Close => {
                    let (code, reason) = crate::frame::parse_close(payload)
                        .unwrap_or_else(|v| panic!("peer {i}: bad close frame: {v:?}"));
                    p.closed = Some((code.unwrap_or(1005), reason.to_owned()));
                }
                Opcode::Continuation => panic!("peer {i}: continuation frame"),
            }
        }
    }

    /// Whether event `seq` passes `o` for a client of this encoding.
    fn passes(&self, o: &SubscriberOptions, p: &Peer, seq: u64) -> bool {
        let e = &self.events[seq as usize];
        // v1 limits the frame as sent; v2 the uncompressed message.
        let sized = if p.encoding.v2() {
            Encoding::V2Json
        } else {
            p.encoding
        };
        p.kinds.contains_kind(e.kind)
            && e.lens[p.encoding.index()] > 0
            && o.collection_allowed(e.kind, e.collection.as_deref())
            && o.did_allowed(&e.did)
            && o.size_allowed(e.lens[sized.index()])
    }

    /// The events `o` passes in `[from, to)`.
    fn expected(&self, o: &SubscriberOptions, p: &Peer, from: u64, to: u64) -> Vec<u64> {
        (from..to).filter(|&s| self.passes(o, p, s)).collect()
    }

    /// The events a peer's filter before its update passes, from its start (none under
    /// `requireHello`).
    fn before_events(&self, p: &Peer) -> Vec<u64> {
        if p.hello {
            return Vec::new();
        }
        self.expected(&p.before, p, p.start, self.events.len() as u64)
    }

    /// Checks that a peer received exactly what its filter(s) pass from its start point (a
    /// prefix of it if it was closed), allowing the one switch of its `options_update`.
    fn check_exact(&self, i: usize, complete: bool) {
        let p = &self.peers[i];
        let total = self.events.len() as u64;
        let got = &p.received;
        let fail = |what: String| -> ! {
            let state = self
                .driver
                .scheduler()
                .client_for_test(p.slot)
                .map(|c| {
                    format!(
                        "place {:?} life {:?} pos {} boundary {} control {} stream {}",
                        c.place,
                        c.life,
                        c.pos,
                        c.boundary,
                        c.control.queued_bytes(),
                        c.stream.label
                    )
                })
                .unwrap_or_else(|| "released".into());
            panic!(
                "seed {} peer {i} ({:?}, {} {}, hello {}, start {}, closed {:?}): {what}\n  got {:?}\n  relay: {state}\n  socket: unread {} capacity {}",
                self.seed,
                p.behaviour,
                p.encoding,
                p.kinds.names(),
                p.hello,
                p.start,
                p.closed,
                got,
                self.driver_socket(p.sock).0,
                self.driver_socket(p.sock).1,
            )
        };
        let Some(after) = &p.after else {
            let want = self.expected(&p.before, p, p.start, total);
            let n = if complete { want.len() } else { got.len() };
            if got.len() > want.len() || got[..] != want[..n.min(want.len())] || got.len() != n {
                fail(format!("expected {:?}", &want[..n.min(want.len())]));
            }
            return;
        };
        // Some split: the old filter's events exactly, from the start, then the new one's
        // exactly, from a switch point S between the last old event and the next one the old
        // filter passes (the first event not sent).
        let old_all = self.before_events(p);
        for k in 0..=got.len() {
            let (old, new) = got.split_at(k);
            if old.len() > old_all.len() || old[..] != old_all[..old.len()] {
                break;
            }
            let last_old = old.last().map_or(p.start, |&x| x + 1);
            let next_old = old_all.get(old.len()).map_or(total, |&x| x);
            // S in [last_old, next_old]; the new events from S on must be exactly `new`.
            let fits = |s: u64| {
                let want = self.expected(after, p, s, total);
                let n = if complete { want.len() } else { new.len() };
                new.len() == n && want.len() >= n && new[..] == want[..n]
            };
            let lo = last_old;
            let hi = next_old.min(new.first().copied().unwrap_or(total));
            if (lo..=hi).any(fits) {
                return;
            }
        }
        fail(format!(
            "no switch point explains it: before {:?}, after {:?}",
            p.before, after
        ))
    }

    /// (unread, capacity) of a simulated socket.
    fn driver_socket(&self, sock: SimSock) -> (usize, usize) {
        let k = self.driver.kernel();
        (k.socks[sock.0].unread.len(), k.socks[sock.0].capacity)
    }

    /// Whether every open peer has received every event its filter passes (a cheap test:
    /// its last event is the last one it can expect).
    fn all_caught_up(&self) -> bool {
        let total = self.events.len() as u64;
        self.peers.iter().all(|p| {
            if p.gone || p.closed.is_some() {
                return true;
            }
            let filter = p.after.as_ref().unwrap_or(&p.before);
            let last = (0..total).rev().find(|&s| self.passes(filter, p, s));
            last.is_none_or(|l| l < p.start || p.received.last() == Some(&l))
        })
    }

    fn turn(&mut self) {
        self.driver.turn().expect("turn");
        let now = self.driver.kernel_mut().now();
        self.driver.scheduler().check_invariants(now);
        self.driver.check_invariants();
        // Every byte of the filter budget is held by a client still in the worker's table.
        let budget = &self.hub.filter_budget;
        assert!(budget.used() <= budget.limit(), "filter budget overdrawn");
        assert_eq!(
            budget.used(),
            self.driver.scheduler().filter_bytes_held_for_test(),
            "seed {}: filter budget charged to no client (a leak) or held uncharged",
            self.seed
        );
        self.check_routed();
    }

    /// DID-parked clients are woken exactly by their DIDs: between where a parked client
    /// stands and the routing cursor (every event before it has been routed) lies no event
    /// with one of its DIDs, else routing missed a wake.
    fn check_routed(&self) {
        let sched = self.driver.scheduler();
        let cursor = sched.route_cursor_for_test();
        let index = self.hub.index();
        for (i, p) in self.peers.iter().enumerate() {
            let Some(c) = sched.client_for_test(p.slot).filter(|_| !p.gone) else {
                continue;
            };
            if c.place != super::client::Place::Routed {
                continue;
            }
            let super::client::Source::Filtered(w) = &c.source else {
                panic!("seed {}: peer {i} routed without a DID walker", self.seed);
            };
            index.walk(w.next, usize::MAX, |pos, e| {
                if pos.seq >= cursor.seq {
                    return false;
                }
                assert!(
                    w.did_hashes.binary_search(&e.did_hash).is_err(),
                    "seed {}: peer {i} parked on its DIDs past event {} with one of them",
                    self.seed,
                    pos.seq
                );
                true
            });
        }
    }

    fn run(&mut self) {
        if self.rng.bool() {
            // Retention will punch under the readers.
            self.max_disk = self.rng.u64(60_000..400_000);
        }
        let n = self.rng.usize(0..50);
        self.append(n);
        for _ in 0..self.rng.usize(1..5) {
            self.attach();
        }
        for step in 0..STEPS {
            self.world(true);
            self.turn();
            if step % 50 == 0 {
                for i in 0..self.peers.len() {
                    self.check_exact(i, false);
                }
            }
        }
        // Drain: the feed stops, everyone reads; open peers must get everything.
        for step in 0..DRAIN_STEPS {
            self.world(false);
            self.turn();
            self.kernel().advance(Duration::from_millis(5));
            if step % 50 == 49 && self.all_caught_up() {
                break;
            }
        }
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            let complete = !p.gone && p.closed.is_none();
            self.check_exact(i, complete);
            if let Some((code, reason)) = &p.closed {
                assert!(
                    matches!(code, 1000 | 1001 | 1002 | 1008),
                    "peer {i}: close {code} {reason}"
                );
                if reason.contains("filter") {
                    // Refused: it asked for new filters and got none of their events.
                    assert_eq!(*code, 1008, "peer {i}: {reason}");
                    assert!(p.after.is_some(), "peer {i}: refused without an update");
                    let old = self.before_events(p);
                    assert!(
                        p.received.len() <= old.len() && p.received[..] == old[..p.received.len()],
                        "seed {} peer {i}: events of filters the budget refused",
                        self.seed
                    );
                    self.budget_refusals += 1;
                }
            }
        }
        self.everyone_leaves();
    }

    /// Every peer still connected resets; once the worker has let them all go, the filter
    /// budget must be whole again (a leaked charge would lock filters out for good).
    fn everyone_leaves(&mut self) {
        for i in 0..self.peers.len() {
            if !self.peers[i].gone {
                let sock = self.peers[i].sock;
                self.kernel().peer_input(sock, &[], false, true);
                self.peers[i].gone = true;
            }
        }
        for _ in 0..DRAIN_STEPS {
            if self.driver.scheduler().client_count() == 0 {
                break;
            }
            self.turn();
            self.kernel().advance(Duration::from_millis(5));
        }
        assert_eq!(
            self.driver.scheduler().client_count(),
            0,
            "seed {}: reset clients still attached",
            self.seed
        );
        assert_eq!(
            self.hub.filter_budget.used(),
            0,
            "seed {}: filter budget not given back",
            self.seed
        );
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The event (generator seq) a frame's message carries: a v1 JSON with its `cursor` field, or
/// a v2 message (its v1 form).
fn event_of(enc: Encoding, message: &[u8]) -> Option<u64> {
    let mut v1 = Vec::new();
    if enc.v2() {
        let crate::wire::V2Frame::Event { event, .. } =
            crate::wire::parse_v2_frame(message).ok()?
        else {
            return None;
        };
        event.render_v1(&mut v1).ok()?;
    } else {
        // Drop `,"cursor":N` (right after `time_us`) to read the generator's head.
        let at = message.windows(10).position(|w| w == b",\"cursor\":")?;
        let digits = message[at + 10..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        v1.extend_from_slice(&message[..at]);
        v1.extend_from_slice(&message[at + 10 + digits..]);
    }
    Generator::seq_of(&v1)
}

/// Whether two v2 messages are the same event with the same seq: byte-identical but for
/// `witnessedAt` (the relay's witness time is not the model's).
fn same_v2(got: &[u8], want: &[u8]) -> bool {
    let strip = |m: &[u8]| -> Vec<u8> {
        match m.windows(15).position(|w| w == b"\"witnessedAt\":\"") {
            Some(at) => {
                let end = m[at + 15..]
                    .iter()
                    .position(|&b| b == b'"')
                    .map_or(m.len(), |e| at + 15 + e + 1);
                [&m[..at], &m[end..]].concat()
            }
            None => m.to_vec(),
        }
    };
    strip(got) == strip(want)
}

fn pattern_text(p: &CollectionPattern) -> String {
    match p {
        CollectionPattern::Exact(s) => s.clone(),
        CollectionPattern::Prefix(s) => format!("{s}*"),
    }
}

/// Runs one seed, printing the reproduction if it fails; returns its filter-budget refusals.
fn run_seed(seed: u64) -> u64 {
    let result = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        sim.run();
        sim.budget_refusals
    });
    match result {
        Ok(refusals) => refusals,
        Err(e) => {
            eprintln!(
                "simulation failed: reproduce with TEST_JETRELAY_SIM_SEED={seed} cargo test --lib fanout::sim"
            );
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn simulated_kernel_seeds() {
    if let Some(seed) = std::env::var("TEST_JETRELAY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed);
        return;
    }
    let seeds = std::env::var("TEST_JETRELAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let first = std::env::var("TEST_JETRELAY_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0u64);
    let mut refusals = 0;
    for seed in first..first + seeds {
        refusals += run_seed(seed);
    }
    eprintln!("{seeds} seeds: {refusals} filter-budget refusals");
    if seeds >= 100 {
        assert!(
            refusals > 0,
            "no seed exercised the filter budget's refusals"
        );
    }
}

/// A kernel that stops accepting submissions (`EBUSY`, reported as success) must stop the
/// worker with an error before anything is pushed into the full queue: pushing then, or
/// submitting between the halves of a linked splice pair, is what split a pair before.
#[test]
fn a_submission_queue_that_stays_full_stops_the_worker_with_an_error() {
    let mut stopped = 0;
    for seed in 0..10 {
        let mut sim = Sim::new(seed);
        sim.append(30);
        // More clients than the queue holds (2-16): with nothing completing, each keeps one
        // entry queued, so the queue fills.
        for _ in 0..24 {
            sim.attach();
        }
        for _ in 0..30 {
            sim.world(false);
            sim.turn();
        }
        sim.kernel().stuck = true;
        // The feed goes on and the peers read (no new attaches: the worker is judged alone).
        let err = (0..300).find_map(|step| {
            if step % 10 == 0 {
                sim.append(3);
            }
            for i in 0..sim.peers.len() {
                sim.peer_step(i, true);
            }
            sim.kernel().advance(Duration::from_millis(1));
            sim.driver.turn().err()
        });
        if let Some(err) = err {
            assert!(err.to_string().contains("stays full"), "seed {seed}: {err}");
            stopped += 1;
        }
    }
    assert!(
        stopped >= 8,
        "only {stopped} of 10 workers filled their queue"
    );
}
