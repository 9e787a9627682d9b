//! Fan-out: worker threads, each with its own io_uring and its own clients, keep every
//! client's position moving to the end of its log.
//!
//! One loop iteration = one `io_uring_enter` that submits the operations of up to
//! [`SWEEP_CHUNK`] clients that have something to send and reaps completions: the syscalls per
//! loop do not grow with the number of clients. Per client, per batch, exactly one of:
//! - **live path**: `SEND` (`MSG_DONTWAIT`) straight from the stream's tail ring — the bytes
//!   the writer copied once for everyone; the kernel copies them into the socket;
//! - **catch-up path**: a linked pair of `SPLICE`s, file → pooled pipe → socket, zero-copy from
//!   the page cache, for clients whose position is older than the ring;
//! - a control frame (pong, ping, close) from the client's own small buffer, only at a frame
//!   boundary of the log stream.
//!
//! A client that cannot keep up just lags (the log is its buffer): its socket reports full,
//! the worker arms a one-shot `POLLOUT` and forgets it until the kernel says it can take more.
//! Wake-up: the writer writes to each worker's eventfd, whose read is always armed in the ring
//! (no polling timer in the data path). A 1-second housekeeping timeout does pings, dead-peer
//! detection and retention kicks.
//!
//! File descriptors: one per client (its socket) plus a fixed pipe pool per worker.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::frame::{InboundDecoder, InboundMessage, Opcode};
use crate::hub::{Counters, Hub, ShapeClass, stored_payload_len};
use crate::index::{COLLECTION_NONE, COLLECTION_UNKNOWN, EventPos};
use crate::log::{NONE, Stream};
use crate::routes::Routes;
use crate::shapes::Shape;
use crate::subscription::{MAX_OPTIONS_UPDATE_BYTES, SubscriberOptions};

/// Why 4096: enough SQEs to serve thousands of clients in one `io_uring_enter`; beyond that a
/// loop simply submits more than once.
const RING_ENTRIES: u32 = 4096;
/// Completion queue size: at most two CQEs per SQE in flight plus multishot polls.
const CQ_ENTRIES: u32 = 16384;
/// Why 256 KiB: a far-behind client gets large batches (few SQEs per MB) while one send never
/// monopolizes a socket buffer's worth of the ring.
const MAX_SEND: usize = 256 * 1024;
/// Pipes per worker for the splice path (2 fds each). Why 32: catch-up clients take turns on
/// them; enough to keep the page cache → socket path busy without costing fds per client.
const PIPES_PER_WORKER: usize = 32;
/// Pipe capacity (F_SETPIPE_SZ): one splice moves at most this much.
const PIPE_BYTES: usize = 256 * 1024;
/// Housekeeping period: pings, dead peers, retention kicks, `worker_low` refresh.
const TICK: Duration = Duration::from_secs(1);
/// Longest a busy worker holds back a round of live sends to batch more events into each
/// send. Why 10 ms: a few events' worth at the full firehose rate, small next to the network
/// latency every Jetstream consumer already has, and it bounds what pacing adds to p99.
const MAX_PACE_DELAY: Duration = Duration::from_millis(10);
/// A kicked or shutting-down client gets this long to drain its current range and read its
/// close frame before the socket is simply closed.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// After our FIN, how long the peer gets to close its side before the socket is closed.
const FIN_GRACE: Duration = Duration::from_secs(2);
/// Inbound bytes read per readable event (the per-worker scratch buffer).
const RECV_CHUNK: usize = 16 * 1024;
/// Events a filtered client may examine per loop before yielding to others.
const WALK_BUDGET: usize = 8192;
/// Most client operations submitted per loop. Why 64: the kernel runs a submission's sends one
/// after another (~4 µs each here), and each client's range is fixed when its SQE is built; in
/// chunks of 64, data appended while a round sweeps through the clients reaches the clients
/// later in the sweep at once, instead of waiting a whole round (which halves the latency of
/// the last clients of a busy round). One `io_uring_enter` per 64 sends keeps the syscall
/// cost per send negligible.
const SWEEP_CHUNK: usize = 64;
/// What a lingering thin stream's send waits to carry: about what a full-stream send carries
/// when a busy worker paces its rounds (1,000 clients × 500 ev/s here: 4–5.5 KB). A send costs
/// nearly the same whatever its size, so this is what makes a filtered or compressed byte cost
/// about what a full-stream byte costs.
const THIN_SEND_BYTES: u64 = 4096;

// user_data layout: [slot: 32 | generation: 24 | op: 8]
const OP_SEND: u64 = 1;
const OP_SPLICE_IN: u64 = 2;
const OP_SPLICE_OUT: u64 = 3;
const OP_POLLOUT: u64 = 4;
const OP_POLLIN: u64 = 5;
const OP_CANCEL: u64 = 6;
const OP_CTRL: u64 = 7;
const WORKER_EVENTFD: u64 = 0xF0;
const WORKER_TICK: u64 = 0xF1;
const WORKER_PACE: u64 = 0xF2;
const WORKER_LINGER: u64 = 0xF3;
/// `Client::caught_up_round` of a client that has not caught up in any round yet.
const NEVER: u64 = u64::MAX;

fn user_data(slot: u32, generation: u32, op: u64) -> u64 {
    ((slot as u64) << 32) | (((generation & 0xFF_FFFF) as u64) << 8) | op
}

/// Per-client limits every worker applies.
#[derive(Clone, Debug)]
pub struct ClientPolicy {
    /// Idle clients are pinged this often; no answer for two periods = dead.
    pub ping_interval: Duration,
    /// Inbound bytes per second before the client is closed (1008).
    pub max_inbound_rate: u64,
    /// Clients further behind live than this are closed (1008), if set.
    pub max_lag: Option<Duration>,
    /// Share of a worker's time that rounds of live sends may take (0 < duty <= 1); see
    /// [`Worker::round_may_start`].
    pub duty: f64,
    /// Longest a thin stream's send may wait under load to carry more bytes (zero = never);
    /// see [`Worker::linger`].
    pub thin_linger: Duration,
    /// Busy share of the worker at which thin streams start lingering.
    pub thin_linger_load: f64,
}

/// A client handed over by the listener after a successful upgrade.
pub struct NewClient {
    /// The connected socket (non-blocking).
    pub fd: OwnedFd,
    /// Real client address (from PROXY v2 when behind the sidecar).
    pub peer: SocketAddr,
    /// zstd binary frames instead of text frames.
    pub compressed: bool,
    /// Filters from the query string.
    pub options: SubscriberOptions,
    /// Where its stream starts (from `cursor`, or live).
    pub start: EventPos,
    /// Hold everything until the first `options_update`.
    pub require_hello: bool,
    /// The address this client is counted under in the per-IP limits (released on leave).
    pub counted_ip: Option<std::net::IpAddr>,
}

enum Command {
    Attach(Box<NewClient>),
}

/// The listener's handle on one worker.
pub struct WorkerHandle {
    /// Channel for new clients.
    tx: Sender<Command>,
    /// Eventfd the writer and the listener write to, and the worker's client count.
    wake: Arc<Waker>,
    /// Thread handle, joined at shutdown.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// All workers.
pub struct Fanout {
    /// One per thread.
    workers: Vec<WorkerHandle>,
}

impl Fanout {
    /// Starts `n` workers.
    pub fn start(hub: Arc<Hub>, n: usize, policy: ClientPolicy) -> std::io::Result<Fanout> {
        let mut workers = Vec::with_capacity(n);
        for id in 0..n {
            let (tx, rx) = channel();
            let wake = Arc::new(Waker::new()?);
            let mut worker = Worker::new(id, hub.clone(), rx, wake.clone(), policy.clone())?;
            // A worker that ends ends the process (its ring pin and its clients' per-IP counts
            // die with it): see `liveness`.
            let liveness = hub.liveness.clone();
            let thread =
                crate::liveness::spawn_critical(&liveness, format!("fanout-{id}"), move || {
                    worker.run()
                })?;
            workers.push(WorkerHandle {
                tx,
                wake,
                thread: Some(thread),
            });
        }
        Ok(Fanout { workers })
    }

    /// Hands a client to the least-loaded worker.
    pub fn attach(&self, client: NewClient) {
        let Some(w) = self
            .workers
            .iter()
            .min_by_key(|w| w.wake.clients.load(Ordering::Relaxed))
        else {
            return;
        };
        // SeqCst: pairs with the fence in `Waker::wake`, so data published before a writer
        // saw no clients is visible to the round this attach starts.
        w.wake.clients.fetch_add(1, Ordering::SeqCst);
        if w.tx.send(Command::Attach(Box::new(client))).is_ok() {
            // Not coalesced: a new client must be picked up even while data wake-ups pend.
            let _ = rustix::io::write(&w.wake.fd, &1u64.to_ne_bytes());
        }
    }

    /// Eventfds to write after publishing new data.
    pub fn wakers(&self) -> Vec<Arc<Waker>> {
        self.workers.iter().map(|w| w.wake.clone()).collect()
    }

    /// Clients per worker.
    pub fn clients_per_worker(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.wake.clients.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits for every worker to finish closing its clients (after `hub.shutdown` is set).
    pub fn join(&mut self) {
        for w in &self.workers {
            let _ = rustix::io::write(&w.wake.fd, &1u64.to_ne_bytes());
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A worker's wake-up: an eventfd plus a flag that coalesces wake-ups the worker has not
/// consumed yet, so a busy writer does not pay a syscall per event per worker.
pub struct Waker {
    /// The eventfd whose read is armed in the worker's ring.
    fd: OwnedFd,
    /// Set by `wake`, cleared by the worker when the read completes.
    pending: AtomicBool,
    /// Append time (unix µs) of the first append since the worker last consumed a wake-up:
    /// the oldest data the worker has not handed out yet, so delivery latency counts from it.
    since_us: AtomicU64,
    /// Clients the worker owns (least-loaded placement, metrics). Kept here because a worker
    /// without clients has nothing to do with new data: an idle worker costs no wake-up per
    /// event (its next client comes with its own).
    clients: AtomicU64,
}

impl Waker {
    fn new() -> std::io::Result<Waker> {
        Ok(Waker {
            fd: rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?,
            pending: AtomicBool::new(false),
            since_us: AtomicU64::new(0),
            clients: AtomicU64::new(0),
        })
    }

    /// Wakes the worker unless a wake-up is already pending; `appended_us` is when the data
    /// was appended. SeqCst pairs with the worker's clear-then-read-ends, so a publish is never
    /// missed.
    pub fn wake(&self, appended_us: u64) {
        // The publish (a plain release store) must not pass the client-count load: with the
        // fence, either this load sees an attach's increment, or the round that attach starts
        // sees the published data.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.clients.load(Ordering::SeqCst) == 0 {
            return;
        }
        if !self.pending.swap(true, Ordering::SeqCst) {
            // Stored before the eventfd write, so the worker reads it with the completion.
            self.since_us.store(appended_us, Ordering::SeqCst);
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// Clears the pending flag; returns the append time of the oldest data announced since
    /// the previous call (0 if none: a wake-up for a new client).
    fn consumed(&self) -> u64 {
        let since = self.since_us.swap(0, Ordering::SeqCst);
        self.pending.store(false, Ordering::SeqCst);
        since
    }
}

/// Where a client's bytes come from.
enum Source {
    /// Every frame of a stream, contiguously (no filter).
    Contiguous,
    /// Frames of the base stream that pass a filter, found by walking the index.
    Filtered(Box<Walker>),
}

/// A filtered client's walk over the event index.
struct Walker {
    /// The next event to examine.
    next: EventPos,
    /// Filters.
    options: SubscriberOptions,
    /// `did_hash` of each wanted DID, sorted and unique (a hash match is confirmed on the JSON).
    did_hashes: Vec<u32>,
    /// Per collection id: 0 = not yet evaluated, 1 = allowed, 2 = refused.
    collection_verdicts: Vec<u8>,
}

/// Why a client is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseWhy {
    /// It asked (close frame) or went away.
    Peer,
    /// It fell behind retention.
    Retention,
    /// It stopped answering pings.
    Dead,
    /// It broke the protocol or sent invalid options.
    Protocol,
    /// The relay is shutting down.
    Shutdown,
}

/// Pending control bytes (a pong, ping or close frame), sent only at a frame boundary.
struct Ctrl {
    /// Complete frame(s).
    bytes: Vec<u8>,
    /// Sent so far.
    sent: usize,
}

struct Client {
    /// The socket.
    fd: OwnedFd,
    /// Peer address for logs.
    peer: SocketAddr,
    /// Per-IP limit slot to release when the client leaves.
    counted_ip: Option<std::net::IpAddr>,
    /// Generation of this slot, so late CQEs for a previous occupant are ignored.
    generation: u32,
    /// zstd client?
    compressed: bool,
    /// The log it reads: a base log, or its shape's log.
    stream: Arc<Stream>,
    /// The shape it belongs to (reading it, or walking the base log towards it).
    shape: Option<Arc<Shape>>,
    /// Where the bytes come from.
    source: Source,
    /// Next log byte to hand to the socket.
    pos: u64,
    /// End of the current range; always a frame boundary. `pos == boundary` ⇒ between frames.
    boundary: u64,
    /// SQEs in flight for this client (it may only be freed at 0).
    inflight: u32,
    /// A send or splice is in flight (one data/ctrl op at a time).
    busy: bool,
    /// Waiting for POLLOUT.
    blocked: bool,
    /// Pipe index while bytes sit in a pooled pipe.
    pipe: Option<usize>,
    /// Bytes currently in that pipe.
    pipe_fill: u32,
    /// Pending control frame.
    ctrl: Option<Box<Ctrl>>,
    /// Queue for control frames that arrive while one is being sent.
    ctrl_queue: Vec<Vec<u8>>,
    /// Inbound frame decoder.
    inbound: InboundDecoder,
    /// Last time anything arrived from the client.
    last_rx: Instant,
    /// A ping was sent and not answered yet.
    ping_outstanding: bool,
    /// Inbound bytes since the last housekeeping tick (the inbound rate cap).
    rx_bytes: u64,
    /// Nothing is sent until the first options_update.
    hello_pending: bool,
    /// New options to apply at the next frame boundary.
    pending_options: Option<SubscriberOptions>,
    /// Set once the client is being closed.
    closing: Option<(CloseWhy, Instant)>,
    /// The close frame was queued.
    close_sent: bool,
    /// The socket was shut down; waiting for in-flight ops before close(2).
    shut: bool,
    /// When our FIN went out after the close frame.
    fin_at: Option<Instant>,
    /// In the ready queue already.
    queued: bool,
    /// Filter kind at connect, for the per-kind client gauge and logs.
    class: ShapeClass,
    /// Contiguous source: frames published in `stream` when the range was last extended, in
    /// the stream's own numbering (see [`published_frames`]), so the events in a range are a
    /// subtraction, not an index walk.
    range_seq: u64,
    /// Events in the scheduled range not yet handed over; counted when the range completes.
    pending_events: u64,
    /// `last_append_us` when the range was scheduled: delivery latency is measured from it.
    range_appended_us: u64,
    /// The round in which this client's range last reached the end of its log. Such a
    /// client waits for the next round instead of chasing every append on its own: that is
    /// what lets a busy worker batch several events into one send.
    caught_up_round: u64,
    /// Whether its next send lingers with its stream's hold (see [`Group`]).
    linger: Linger,
    /// The wait ([`Group`]) it is in while it has nothing to send (0 = none).
    waiting: u64,
    /// In the worker's idle list (waiting for a round) already.
    parked: bool,
    /// Its registration in the worker's DID routes (0 = none; see [`crate::routes`]).
    route: u32,
    /// Parked on its DIDs: only an event with one of them wakes it (not in the idle list).
    route_parked: bool,
}

impl Client {
    /// Lowest log offset this client may still read.
    fn low_mark(&self) -> u64 {
        if self.shut || (self.closing.is_some() && self.pos == self.boundary) {
            return NONE;
        }
        match &self.source {
            Source::Filtered(w) if self.pos == self.boundary => w.next.offset(self.compressed),
            _ => self.pos,
        }
    }
}

/// Where a caught-up client of a thin stream stands with lingering (see [`Worker::linger`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linger {
    /// Its next send goes out as soon as a round brings it bytes.
    Off,
    /// Waiting in hold `id` of its stream; `origin_us` is the latency origin of its oldest held
    /// bytes.
    Held { id: u64, origin_us: u64 },
    /// Its hold was released: its next send goes out at once.
    Released { origin_us: u64 },
}

impl Linger {
    /// The latency origin of the held bytes, if the client lingered.
    fn origin_us(self) -> Option<u64> {
        match self {
            Linger::Off => None,
            Linger::Held { origin_us, .. } | Linger::Released { origin_us } => Some(origin_us),
        }
    }
}

/// Caught-up clients of one stream that rounds handle as one, so that a round costs nothing
/// per client that it has nothing for. A worker keeps two kinds (see `holds` and `waits` in
/// [`Worker`]):
/// - a *hold*: the clients of a thin stream holding back their sends. They share one deadline
///   and one size threshold, so they are all released by the same round (a few
///   `io_uring_enter`s for all of them) instead of drifting into many small rounds;
/// - a *wait*: the clients with nothing to send, skipped until their stream grows. With
///   filters most rounds bring a given shape nothing (the post filter passes about one event
///   in six), and walking every such client in every round was most of the worker's own CPU.
struct Group {
    /// Names the group in its members' state ([`Linger::Held`], `Client::waiting`): a member
    /// may leave, and its slot get a new client, while the group still lists the slot.
    id: u64,
    /// The log its members read.
    stream: Arc<Stream>,
    /// When its first member joined (a hold is due `thin_linger` later).
    since: Instant,
    /// Lowest position among its members: a hold is also due once its stream has
    /// [`THIN_SEND_BYTES`] past it, a wait ends once its stream's end passes it.
    low: u64,
    /// Slots of its members (possibly stale: checked against `id` when taken out).
    members: Vec<u32>,
}

/// The groups of one kind in a worker: at most one per stream in use, so a handful.
#[derive(Default)]
struct Groups {
    list: Vec<Group>,
    next_id: u64,
}

impl Groups {
    /// The group of `stream` (started at `now` if it has none), lowered to `pos`: the group a
    /// client at `pos` joins.
    fn join(&mut self, stream: &Arc<Stream>, pos: u64, now: Instant) -> &mut Group {
        let i = match self
            .list
            .iter()
            .position(|g| Arc::ptr_eq(&g.stream, stream))
        {
            Some(i) => i,
            None => {
                self.next_id += 1;
                self.list.push(Group {
                    id: self.next_id,
                    stream: stream.clone(),
                    since: now,
                    low: pos,
                    members: Vec::new(),
                });
                self.list.len() - 1
            }
        };
        let g = &mut self.list[i];
        g.low = g.low.min(pos);
        g
    }

    /// Takes out every group `done` says is done.
    fn take(&mut self, mut done: impl FnMut(&Group) -> bool) -> Vec<Group> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if done(&self.list[i]) {
                out.push(self.list.swap_remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Holds: takes out every hold that is due at `now` (all of them when lingering is off:
    /// `linger` is None). Returns them, and the deadline of the earliest hold that keeps
    /// waiting.
    fn take_due(
        &mut self,
        linger: Option<Duration>,
        now: Instant,
    ) -> (Vec<Group>, Option<Instant>) {
        let waiting_until = |h: &Group| {
            let pending = h.stream.end().saturating_sub(h.low);
            linger
                .map(|wait| h.since + wait)
                .filter(|&due| linger_holds(pending, due, now))
        };
        let next_due = self.list.iter().filter_map(waiting_until).min();
        (self.take(|h| waiting_until(h).is_none()), next_due)
    }

    /// Waits: takes out every wait whose stream grew past it.
    fn take_grown(&mut self) -> Vec<Group> {
        self.take(|w| w.stream.end() > w.low)
    }

    /// Drops members that left (and groups left empty, with their stream): a stream that
    /// never grows must not collect the slots of every client that ever waited on it.
    /// `member_of` gives the group id of the client in a slot (None for an empty slot).
    fn prune(&mut self, member_of: impl Fn(u32) -> Option<u64>) {
        for g in &mut self.list {
            g.members.retain(|&slot| member_of(slot) == Some(g.id));
        }
        self.list.retain(|g| !g.members.is_empty());
    }
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

struct Worker {
    id: usize,
    hub: Arc<Hub>,
    ring: IoUring,
    rx: Receiver<Command>,
    wake_fd: Arc<Waker>,
    wake_buf: Box<[u8; 8]>,
    tick_ts: Box<types::Timespec>,
    policy: ClientPolicy,
    slots: Vec<Option<Client>>,
    free: Vec<u32>,
    generations: Vec<u32>,
    ready: VecDeque<u32>,
    idle: Vec<u32>,
    pipes: Vec<Pipe>,
    free_pipes: Vec<usize>,
    pipe_waiters: VecDeque<u32>,
    scratch: Vec<u8>,
    /// Rings pinned for this batch, with the lowest offset each may be sent from.
    pinned: Vec<(Arc<Stream>, u64)>,
    /// Streams this worker published a `worker_low` for at the last tick.
    known_streams: Vec<Arc<Stream>>,
    new_data: bool,
    /// Live rounds started so far: a round hands newly appended data to every idle client.
    round: u64,
    /// When the current round started.
    round_started: Instant,
    /// Time spent working (not waiting) since the current round started.
    round_busy: Duration,
    /// Buffer of the pacing timeout while one is armed.
    pace_ts: Box<types::Timespec>,
    /// A pacing timeout is in the ring.
    pace_armed: bool,
    /// The pending round was held back by pacing (counted once when it starts).
    round_held: bool,
    /// Append time of the oldest data announced since the current round started (0 = none).
    pending_since_us: u64,
    /// The same for the current round: its oldest new data, the latency origin of its ranges.
    round_since_us: u64,
    /// Time spent working since the last housekeeping tick: the worker's load.
    tick_busy: Duration,
    /// Thin streams linger now (the worker is loaded; see [`linger_gate`]).
    lingering: bool,
    /// Buffer of the linger timeout while one is armed.
    linger_ts: Box<types::Timespec>,
    /// When the armed linger timeout fires (None = none armed).
    linger_armed: Option<Instant>,
    /// Thin-stream clients waiting to send, grouped by stream.
    holds: Groups,
    /// Caught-up clients with nothing to send, grouped by stream.
    waits: Groups,
    /// Caught-up DID-filtered clients, by the DIDs they want: each new event is looked up
    /// once instead of every such client walking it.
    routes: Routes,
    /// The next event to route: every event before it was looked up in `routes`. A client
    /// parks on its DIDs only from here on, so no event between its walk and its wake-up
    /// goes unseen.
    route_cursor: EventPos,
}

impl Worker {
    fn new(
        id: usize,
        hub: Arc<Hub>,
        rx: Receiver<Command>,
        wake_fd: Arc<Waker>,
        policy: ClientPolicy,
    ) -> std::io::Result<Worker> {
        let ring = build_ring()?;
        let mut pipes = Vec::with_capacity(PIPES_PER_WORKER);
        for _ in 0..PIPES_PER_WORKER {
            let (r, w) = rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )?;
            // Best effort: a smaller pipe only means smaller splice batches.
            let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_BYTES);
            pipes.push(Pipe { r, w });
        }
        let lingering = linger_gate(false, 0.0, &policy);
        let route_cursor = hub.index().end_pos();
        Ok(Worker {
            id,
            hub,
            ring,
            rx,
            wake_fd,
            wake_buf: Box::new([0; 8]),
            tick_ts: Box::new(types::Timespec::new().sec(TICK.as_secs())),
            policy,
            slots: Vec::new(),
            free: Vec::new(),
            generations: Vec::new(),
            ready: VecDeque::new(),
            idle: Vec::new(),
            free_pipes: (0..PIPES_PER_WORKER).rev().collect(),
            pipes,
            pipe_waiters: VecDeque::new(),
            scratch: vec![0; RECV_CHUNK],
            pinned: Vec::new(),
            known_streams: Vec::new(),
            new_data: false,
            round: 0,
            round_started: Instant::now(),
            round_busy: Duration::ZERO,
            pace_ts: Box::new(types::Timespec::new()),
            pace_armed: false,
            round_held: false,
            pending_since_us: 0,
            round_since_us: 0,
            tick_busy: Duration::ZERO,
            lingering,
            linger_ts: Box::new(types::Timespec::new()),
            linger_armed: None,
            holds: Groups::default(),
            waits: Groups::default(),
            routes: Routes::default(),
            route_cursor,
        })
    }

    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every pointer in the SQEs built by this worker stays valid until the
        // completion: ring bytes are pinned until submit returns (MSG_DONTWAIT sends complete
        // inline), control buffers and the eventfd/timeout buffers are boxed and owned by the
        // worker or the client, which is only freed once `inflight` drops to zero.
        unsafe {
            while self.ring.submission().push(&sqe).is_err() {
                let _ = self.ring.submit();
            }
        }
    }

    fn unpin_all(&mut self) {
        for (st, _) in self.pinned.drain(..) {
            st.unpin_ring(self.id);
        }
    }

    fn arm_wake(&mut self) {
        let fd = self.wake_fd.fd.as_raw_fd();
        let sqe = opcode::Read::new(types::Fd(fd), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WORKER_EVENTFD);
        self.push(sqe);
    }

    fn arm_tick(&mut self) {
        let ts: *const types::Timespec = &*self.tick_ts;
        self.push(opcode::Timeout::new(ts).build().user_data(WORKER_TICK));
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.arm_wake();
        self.arm_tick();
        let mut last_tick = Instant::now();
        let mut shutdown_started: Option<Instant> = None;
        loop {
            crate::liveness::beat();
            let started = Instant::now();
            self.take_commands();
            if self.hub.shutting_down() && shutdown_started.is_none() {
                shutdown_started = Some(Instant::now());
                for slot in 0..self.slots.len() as u32 {
                    self.begin_close(slot, CloseWhy::Shutdown);
                }
            }
            if let Some(t) = shutdown_started
                && (self.live_clients() == 0 || t.elapsed() > CLOSE_GRACE)
            {
                return Ok(());
            }
            if self.new_data && self.round_may_start(started) {
                self.new_data = false;
                self.round += 1;
                Counters::add(&self.hub.counters.rounds, 1);
                if std::mem::take(&mut self.round_held) {
                    Counters::add(&self.hub.counters.rounds_held, 1);
                }
                self.round_started = started;
                self.round_busy = Duration::ZERO;
                self.round_since_us = std::mem::take(&mut self.pending_since_us);
                // Only clients the round brings something are served: a filtered client
                // whose shape got nothing new stays parked, and a lingering one stays in its
                // hold until the hold is due (this walk is cheap; serving every parked client
                // each round was a tenth of a worker's CPU with 1,000 filtered clients at
                // 500 ev/s).
                let mut idle = std::mem::take(&mut self.idle);
                self.route_new_events(&mut idle);
                // The members of due holds are offered work with the idle clients. The
                // earliest hold that keeps waiting: the timer must cover it, as nothing else
                // may start a round once the feed pauses.
                let (released, next_due) = self.holds.take_due(self.linger(), started);
                Counters::add(&self.hub.counters.linger_releases, released.len() as u64);
                offer_members(&mut self.slots, released, &mut idle, |c, hold| {
                    match c.linger {
                        Linger::Held { id, origin_us } if id == hold => {
                            c.linger = Linger::Released { origin_us };
                            true
                        }
                        _ => false,
                    }
                });
                let grown = self.waits.take_grown();
                offer_members(&mut self.slots, grown, &mut idle, |c, wait| {
                    let member = c.waiting == wait;
                    if member {
                        c.waiting = 0;
                    }
                    member
                });
                // Unpark everyone first, so that a slot listed twice (its previous occupant
                // was parked too) is parked again only once.
                for &slot in &idle {
                    if let Some(c) = self.slots[slot as usize].as_mut() {
                        c.parked = false;
                    }
                }
                for slot in idle {
                    let Some(c) = self.slots[slot as usize].as_mut() else {
                        continue;
                    };
                    if has_round_work(c) {
                        self.enqueue(slot);
                    } else if !matches!(c.linger, Linger::Held { .. }) {
                        // Caught up with its log (all `has_round_work` leaves): rounds skip
                        // it until the log grows.
                        let wait = self.waits.join(&c.stream, c.pos, started);
                        if c.waiting != wait.id {
                            c.waiting = wait.id;
                            wait.members.push(slot);
                        }
                    }
                }
                if let Some(due) = next_due {
                    self.arm_linger(due);
                }
            }
            if last_tick.elapsed() >= TICK {
                let load = self.tick_busy.as_secs_f64() / last_tick.elapsed().as_secs_f64();
                self.lingering = linger_gate(self.lingering, load, &self.policy);
                self.tick_busy = Duration::ZERO;
                last_tick = Instant::now();
                self.housekeeping();
            }
            let ring_sends = self.build_batch();
            Counters::add(&self.hub.counters.ring_loops, 1);
            // Clients still in the ready queue (a walk that used up its budget) have work now:
            // blocking for a completion would stall them until an unrelated wake-up.
            let more = !self.ready.is_empty();
            let mut worked = started.elapsed();
            if ring_sends {
                self.ring.submit()?;
                self.unpin_all();
                worked = started.elapsed();
                if !more && self.ring.completion().is_empty() {
                    self.submit_and_wait()?;
                }
            } else if more {
                self.submit_now()?;
            } else {
                self.submit_and_wait()?;
            }
            let reaping = Instant::now();
            self.reap();
            let busy = worked + reaping.elapsed();
            self.round_busy += busy;
            self.tick_busy += busy;
        }
    }

    /// Looks up every event appended since the last round in the DID routes and puts the
    /// parked clients that want one of them on `walk`, each moved straight to its first such
    /// event: every event it skips was routed while it was parked, so none of them is for it.
    fn route_new_events(&mut self, walk: &mut Vec<u32>) {
        let index = self.hub.index();
        let end = index.end_pos();
        let mut from = self.route_cursor;
        if self.routes.is_empty() || from.seq >= end.seq {
            self.route_cursor = end;
            return;
        }
        let start = index.start_pos();
        if from.seq < start.seq {
            // Retention overtook the cursor (a stalled worker): events went unrouted, so every
            // parked walker walks again, and one that was behind them is kicked as it would
            // be without routing.
            for (slot, c) in self.slots.iter_mut().enumerate() {
                if let Some(c) = c.as_mut().filter(|c| c.route_parked) {
                    c.route_parked = false;
                    walk.push(slot as u32);
                }
            }
            from = start;
        }
        let (routes, slots) = (&self.routes, &mut self.slots);
        let mut wakes = 0;
        index.walk(from, usize::MAX, |pos, e| {
            for r in routes.hits(e.did_hash) {
                let Some(c) = slots.get_mut(r.slot as usize).and_then(|c| c.as_mut()) else {
                    continue;
                };
                if c.route != r.token || !c.route_parked {
                    continue;
                }
                c.route_parked = false;
                wakes += 1;
                if let Source::Filtered(w) = &mut c.source
                    && w.next.seq < pos.seq
                {
                    w.next = pos;
                }
                walk.push(r.slot);
            }
            true
        });
        self.route_cursor = end;
        Counters::add(&self.hub.counters.did_wakes, wakes);
    }

    /// Pacing under load. A round of live sends costs the worker `round_busy`; the next round
    /// may start once that is at most `duty` of the time since the last one started. A lightly
    /// loaded worker (short rounds) starts each round as soon as data lands; a busy one waits a
    /// little, so each send carries several events and the CPU per byte falls. The wait never
    /// exceeds [`MAX_PACE_DELAY`], which bounds the latency it adds. Clients that are behind
    /// are not paced: they are in the ready queue and are served every loop.
    fn round_may_start(&mut self, now: Instant) -> bool {
        let at = next_round_at(self.round_started, self.round_busy, self.policy.duty);
        if now >= at {
            return true;
        }
        self.round_held = true;
        if !self.pace_armed {
            let wait = at - now;
            *self.pace_ts = types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos());
            let ts: *const types::Timespec = &*self.pace_ts;
            self.pace_armed = true;
            self.push(opcode::Timeout::new(ts).build().user_data(WORKER_PACE));
        }
        false
    }

    /// Thin streams (filtered or compressed) carry a fraction of the feed's bytes, so at a
    /// send per round their sends are small, and a send costs nearly the same whatever its
    /// size. Under load, a thin stream's send therefore waits until it carries
    /// [`THIN_SEND_BYTES`] or its oldest byte has waited `thin_linger`: a filtered or compressed
    /// byte then costs about what a full-stream byte costs. Without load nothing lingers, so a
    /// lightly loaded relay keeps every client's latency at the minimum.
    fn linger(&self) -> Option<Duration> {
        self.lingering.then_some(self.policy.thin_linger)
    }

    /// Makes sure a round starts by `due`, when a lingering send falls due.
    fn arm_linger(&mut self, due: Instant) {
        if self.linger_armed.is_some_and(|at| at <= due) {
            return;
        }
        let wait = due.saturating_duration_since(Instant::now());
        *self.linger_ts = types::Timespec::new()
            .sec(wait.as_secs())
            .nsec(wait.subsec_nanos());
        let ts: *const types::Timespec = &*self.linger_ts;
        self.linger_armed = Some(due);
        self.push(opcode::Timeout::new(ts).build().user_data(WORKER_LINGER));
    }

    /// Submits without waiting.
    fn submit_now(&mut self) -> std::io::Result<()> {
        retry_next_loop(self.ring.submit())
    }

    /// Submits and waits for at least one completion.
    fn submit_and_wait(&mut self) -> std::io::Result<()> {
        retry_next_loop(self.ring.submit_and_wait(1))
    }

    fn live_clients(&self) -> usize {
        self.slots.iter().filter(|c| c.is_some()).count()
    }

    fn take_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Attach(c)) => self.attach(*c),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    fn attach(&mut self, nc: NewClient) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.generations[slot as usize];
        let class = ShapeClass::of(&nc.options);
        let point = attach_point(&self.hub, nc.compressed, nc.options, nc.start);
        let admitted = point.stream.register_reader(self.id, point.pos);
        let client = Client {
            fd: nc.fd,
            peer: nc.peer,
            counted_ip: nc.counted_ip,
            generation,
            compressed: nc.compressed,
            stream: point.stream,
            shape: point.shape,
            source: point.source,
            pos: point.pos,
            boundary: point.pos,
            inflight: 0,
            busy: false,
            blocked: false,
            pipe: None,
            pipe_fill: 0,
            ctrl: None,
            ctrl_queue: Vec::new(),
            inbound: InboundDecoder::new(MAX_OPTIONS_UPDATE_BYTES),
            last_rx: Instant::now(),
            ping_outstanding: false,
            rx_bytes: 0,
            hello_pending: nc.require_hello,
            pending_options: None,
            closing: None,
            close_sent: false,
            shut: false,
            fin_at: None,
            queued: false,
            class,
            range_seq: point.ordinal,
            pending_events: 0,
            range_appended_us: 0,
            caught_up_round: NEVER,
            linger: Linger::Off,
            waiting: 0,
            parked: false,
            route: 0,
            route_parked: false,
        };
        tracing::debug!(worker = self.id, peer = %client.peer, compressed = client.compressed, "client attached");
        let fd = client.fd.as_raw_fd();
        self.slots[slot as usize] = Some(client);
        Counters::add(&self.hub.counters.clients, 1);
        Counters::add(
            &self.hub.counters.clients_by_shape[class.index(nc.compressed)],
            1,
        );
        self.arm_pollin(slot, fd);
        if !admitted {
            self.begin_close(slot, CloseWhy::Retention);
        }
        self.enqueue(slot);
    }

    fn arm_pollin(&mut self, slot: u32, fd: RawFd) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        c.inflight += 1;
        let ud = user_data(slot, c.generation, OP_POLLIN);
        let sqe = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
            .multi(true)
            .build()
            .user_data(ud);
        self.push(sqe);
    }

    fn enqueue(&mut self, slot: u32) {
        if let Some(c) = self.slots[slot as usize].as_mut()
            && !c.queued
        {
            c.queued = true;
            self.ready.push_back(slot);
        }
    }

    /// Builds this loop's SQEs: serves ready clients until [`SWEEP_CHUNK`] operations are
    /// queued; the rest stay ready for the next loop. Returns whether any send reads the tail
    /// rings (then the caller must unpin after submitting).
    fn build_batch(&mut self) -> bool {
        let mut ring_sends = false;
        let n = self.ready.len();
        // Counted on the submission queue itself (a full queue is submitted and restarts
        // the count, which only lengthens this chunk).
        let chunk_end = self.ring.submission().len() + SWEEP_CHUNK;
        for _ in 0..n {
            if self.ring.submission().len() >= chunk_end {
                break;
            }
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
            if let Some(c) = self.slots[slot as usize].as_mut() {
                c.queued = false;
            }
            ring_sends |= self.serve(slot);
        }
        if !ring_sends {
            self.unpin_all();
        }
        ring_sends
    }

    /// Decides and queues the next operation for one client. Returns true for a ring send.
    fn serve(&mut self, slot: u32) -> bool {
        let hub = self.hub.clone();
        let round = self.round;
        let linger = self.linger();
        let round_since_us = self.round_since_us;
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return false;
        };
        // Served for another reason (a control frame, options, a close): it re-parks when done.
        c.route_parked = false;
        if c.busy || c.blocked || c.shut {
            return false;
        }
        // Residual bytes in a pipe go first (they are mid-range).
        if let Some(p) = c.pipe {
            let (ud, fd, pr, len) = (
                user_data(slot, c.generation, OP_SPLICE_OUT),
                c.fd.as_raw_fd(),
                self.pipes[p].r.as_raw_fd(),
                c.pipe_fill,
            );
            c.busy = true;
            c.inflight += 1;
            self.push(splice_out(pr, fd, len, ud));
            return false;
        }
        let at_boundary = c.pos == c.boundary;
        if at_boundary {
            // Options change only between frames.
            if let Some(opts) = c.pending_options.take() {
                match switch_point(&hub, c) {
                    Some(next) => {
                        unroute(&mut self.routes, c);
                        apply_options(&hub, self.id, c, opts, next);
                        c.caught_up_round = NEVER;
                    }
                    None => {
                        // The writer is mid-append: retry on the next loop.
                        c.pending_options = Some(opts);
                        c.queued = true;
                        self.ready.push_back(slot);
                        return false;
                    }
                }
            }
            // The next queued control frame goes out in this same batch: re-queueing the
            // client would leave an idle connection's pong or close waiting for an unrelated
            // wake-up (up to a whole housekeeping tick).
            if c.ctrl.is_none()
                && let Some(next) = c.ctrl_queue.pop()
            {
                c.ctrl = Some(Box::new(Ctrl {
                    bytes: next,
                    sent: 0,
                }));
            }
            if let Some(ctrl) = c.ctrl.as_ref().filter(|x| x.sent < x.bytes.len()) {
                let ptr = ctrl.bytes[ctrl.sent..].as_ptr();
                let len = (ctrl.bytes.len() - ctrl.sent) as u32;
                let ud = user_data(slot, c.generation, OP_CTRL);
                let fd = c.fd.as_raw_fd();
                c.busy = true;
                c.inflight += 1;
                self.push(send(fd, ptr, len, ud));
                return false;
            }
            if c.closing.is_some() {
                if !c.close_sent {
                    return false;
                }
                // Close frame delivered: send FIN and wait (briefly) for the peer's EOF, so that
                // our close frame is not destroyed by a reset.
                if c.fin_at.is_none() {
                    let _ = rustix::net::shutdown(&c.fd, rustix::net::Shutdown::Write);
                    c.fin_at = Some(Instant::now());
                }
                return false;
            }
            if c.hello_pending {
                return false;
            }
            if c.caught_up_round == round {
                // Already handed everything this round had; the next round brings the rest.
                park_caught_up(&mut self.idle, &mut self.routes, self.route_cursor, c, slot);
                return false;
            }
            // A walker that reached its shape's start switches to the shape's log.
            switch_to_shape(self.id, c);
            // Extend the range to what is now available. The frame count is read before the
            // end so the delivered count never runs ahead of the bytes.
            let published = published_frames(&hub, c);
            let appended_us = hub.counters.last_append_us.load(Ordering::Relaxed);
            // Latency counts from the oldest data this round brought (so a round held back by
            // pacing shows in it), or from the newest append when the round brought none.
            let origin_us = match round_since_us {
                0 => appended_us,
                since => since.min(appended_us),
            };
            let end = c.stream.end();
            match &mut c.source {
                Source::Contiguous => {
                    if let Some(due) =
                        linger_due(linger, &hub, &mut self.holds, c, slot, end, origin_us)
                    {
                        self.arm_linger(due);
                        return false;
                    }
                    c.boundary = end;
                    c.caught_up_round = round;
                    c.pending_events += published.saturating_sub(c.range_seq);
                    c.range_seq = c.range_seq.max(published);
                }
                Source::Filtered(w) => {
                    let index = hub.index();
                    if w.next.seq < index.start_pos().seq {
                        // Retention passed this walker while it was idle.
                        drop(index);
                        self.begin_close(slot, CloseWhy::Retention);
                        return false;
                    }
                    let walked_from = w.next.seq;
                    if let Some((from, to, n)) = w.next_run(
                        &index,
                        hub.plain.file(),
                        c.compressed,
                        c.shape.as_ref().map(|s| s.start_seq),
                    ) {
                        c.pos = from;
                        c.boundary = to;
                        c.pending_events += n;
                    }
                    if w.next.seq >= index.next_seq() {
                        c.caught_up_round = round;
                    }
                    // (No progress — retention overtook the walk — waits for the kick instead.)
                    if w.next.seq < index.next_seq()
                        && c.pos == c.boundary
                        && w.next.seq > walked_from
                    {
                        // Budget exhausted without a match: continue next loop.
                        drop(index);
                        c.queued = true;
                        self.ready.push_back(slot);
                        return false;
                    }
                }
            }
            if c.pos == c.boundary {
                park_caught_up(&mut self.idle, &mut self.routes, self.route_cursor, c, slot);
                return false;
            }
            c.range_appended_us = origin_us;
            // A lingering range counts from when its oldest bytes were first held back.
            if let Some(origin) = std::mem::replace(&mut c.linger, Linger::Off).origin_us() {
                c.range_appended_us = c.range_appended_us.min(origin);
                Counters::add(&hub.counters.lingered_sends, 1);
            }
        }
        // Data: ring if the bytes are still there, else splice through a pooled pipe.
        let stream = c.stream.clone();
        let ring_low = pin(&mut self.pinned, &stream, self.id);
        let fd = c.fd.as_raw_fd();
        if c.pos >= ring_low {
            let (ptr, len) = stream.ring_span(c.pos, c.boundary, MAX_SEND);
            let ud = user_data(slot, c.generation, OP_SEND);
            c.busy = true;
            c.inflight += 1;
            self.push(send(fd, ptr, len as u32, ud));
            return true;
        }
        let Some(p) = self.free_pipes.pop() else {
            self.pipe_waiters.push_back(slot);
            return false;
        };
        let len = (c.boundary - c.pos).min(PIPE_BYTES as u64) as u32;
        c.pipe = Some(p);
        c.busy = true;
        c.inflight += 2;
        let gen_ = c.generation;
        let off = c.pos as i64;
        let pw = self.pipes[p].w.as_raw_fd();
        let pr = self.pipes[p].r.as_raw_fd();
        let file_fd = stream.raw_fd();
        let sin = opcode::Splice::new(types::Fd(file_fd), off, types::Fd(pw), -1, len)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(slot, gen_, OP_SPLICE_IN));
        self.push(sin);
        self.push(splice_out(
            pr,
            fd,
            len,
            user_data(slot, gen_, OP_SPLICE_OUT),
        ));
        false
    }

    fn reap(&mut self) {
        let mut cqes: Vec<(u64, i32, u32)> = Vec::new();
        for cqe in self.ring.completion() {
            cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        Counters::add(&self.hub.counters.sqes, cqes.len() as u64);
        for (ud, res, flags) in cqes {
            match ud {
                WORKER_EVENTFD => {
                    let since = self.wake_fd.consumed();
                    if since != 0 && (self.pending_since_us == 0 || since < self.pending_since_us) {
                        self.pending_since_us = since;
                    }
                    self.new_data = true;
                    self.arm_wake();
                    continue;
                }
                WORKER_TICK => {
                    self.arm_tick();
                    continue;
                }
                WORKER_PACE => {
                    self.pace_armed = false;
                    continue;
                }
                WORKER_LINGER => {
                    // A new round re-offers every idle client, the lingering ones included.
                    self.linger_armed = None;
                    self.new_data = true;
                    continue;
                }
                _ => {}
            }
            let slot = (ud >> 32) as u32;
            let generation = ((ud >> 8) & 0xFF_FFFF) as u32;
            let op = ud & 0xFF;
            let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) else {
                continue;
            };
            if c.generation & 0xFF_FFFF != generation {
                continue;
            }
            let final_cqe = !(op == OP_POLLIN && cqueue::more(flags));
            if final_cqe {
                c.inflight = c.inflight.saturating_sub(1);
            }
            match op {
                OP_SEND => self.on_send(slot, res),
                OP_CTRL => self.on_ctrl(slot, res),
                OP_SPLICE_IN => self.on_splice_in(slot, res),
                OP_SPLICE_OUT => self.on_splice_out(slot, res),
                OP_POLLOUT => {
                    if let Some(c) = self.slots[slot as usize].as_mut() {
                        c.blocked = false;
                    }
                    self.enqueue(slot);
                }
                OP_POLLIN => {
                    if res >= 0 {
                        self.on_readable(slot);
                    }
                    if final_cqe {
                        let fd = self.slots[slot as usize]
                            .as_ref()
                            .filter(|c| !c.shut)
                            .map(|c| c.fd.as_raw_fd());
                        if let Some(fd) = fd {
                            self.arm_pollin(slot, fd);
                        }
                    }
                }
                _ => {}
            }
            self.maybe_free(slot);
        }
    }

    fn on_send(&mut self, slot: u32, res: i32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        c.busy = false;
        if res > 0 {
            c.pos += res as u64;
            Counters::add(&self.hub.counters.bytes_sent, res as u64);
            Counters::add(&self.hub.counters.data_sends, 1);
            range_progress(&self.hub, c);
            self.enqueue(slot);
        } else {
            self.send_failed(slot, res);
        }
    }

    /// A send that moved nothing: a full socket waits for POLLOUT, anything else closes.
    fn send_failed(&mut self, slot: u32, res: i32) {
        if res == -libc::EAGAIN {
            self.block(slot);
        } else {
            self.fail(slot, res);
        }
    }

    fn on_ctrl(&mut self, slot: u32, res: i32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        c.busy = false;
        if res > 0 {
            if let Some(ctrl) = c.ctrl.as_mut() {
                ctrl.sent += res as usize;
                if ctrl.sent >= ctrl.bytes.len() {
                    c.ctrl = None;
                }
            }
            self.enqueue(slot);
        } else {
            self.send_failed(slot, res);
        }
    }

    fn on_splice_in(&mut self, slot: u32, res: i32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if res > 0 {
            c.pipe_fill += res as u32;
        } else if res < 0 {
            Counters::add(&self.hub.counters.splice_errors, 1);
            tracing::warn!(peer = %c.peer, error = res, "splice from log failed");
            self.fail(slot, res);
        }
    }

    fn on_splice_out(&mut self, slot: u32, res: i32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        c.busy = false;
        if res > 0 {
            c.pos += res as u64;
            c.pipe_fill = c.pipe_fill.saturating_sub(res as u32);
            Counters::add(&self.hub.counters.bytes_sent, res as u64);
            Counters::add(&self.hub.counters.data_sends, 1);
            range_progress(&self.hub, c);
        }
        if c.pipe_fill == 0 {
            self.release_pipe(slot);
        }
        match res {
            r if r >= 0 => self.enqueue(slot),
            r if r == -libc::EAGAIN || r == -libc::ECANCELED => self.block(slot),
            r => {
                Counters::add(&self.hub.counters.splice_errors, 1);
                self.fail(slot, r)
            }
        }
    }

    fn release_pipe(&mut self, slot: u32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if let Some(p) = c.pipe.take() {
            if c.pipe_fill != 0 {
                // Drop residue a closing client never took: recreate the pipe empty.
                c.pipe_fill = 0;
                if let Ok((r, w)) = rustix::pipe::pipe_with(
                    rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
                ) {
                    let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_BYTES);
                    self.pipes[p] = Pipe { r, w };
                }
            }
            self.free_pipes.push(p);
            if let Some(waiter) = self.pipe_waiters.pop_front() {
                self.enqueue(waiter);
            }
        }
    }

    fn block(&mut self, slot: u32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if c.shut {
            return;
        }
        c.blocked = true;
        c.inflight += 1;
        let ud = user_data(slot, c.generation, OP_POLLOUT);
        let sqe = opcode::PollAdd::new(types::Fd(c.fd.as_raw_fd()), libc::POLLOUT as u32)
            .build()
            .user_data(ud);
        self.push(sqe);
    }

    fn fail(&mut self, slot: u32, res: i32) {
        if let Some(c) = self.slots[slot as usize].as_ref() {
            tracing::debug!(peer = %c.peer, error = res, "client socket error");
        }
        self.begin_close(slot, CloseWhy::Peer);
        self.shutdown_client(slot);
    }

    fn on_readable(&mut self, slot: u32) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut messages = Vec::new();
        let mut violation = None;
        let mut eof = false;
        if let Some(c) = self.slots[slot as usize].as_mut() {
            loop {
                match rustix::net::recv(&c.fd, &mut scratch, rustix::net::RecvFlags::DONTWAIT) {
                    Ok((0, _)) => {
                        eof = true;
                        break;
                    }
                    Ok((n, _)) => {
                        c.last_rx = Instant::now();
                        c.ping_outstanding = false;
                        c.rx_bytes += n as u64;
                        // A flood is cut off at once; a steady excess at the next tick.
                        if c.rx_bytes > self.policy.max_inbound_rate.saturating_mul(4) {
                            violation = Some(crate::frame::ProtocolViolation {
                                code: 1008,
                                reason: "inbound rate exceeded",
                            });
                            break;
                        }
                        let mut input = &scratch[..n];
                        loop {
                            match c.inbound.next_message(&mut input) {
                                Ok(Some(m)) => messages.push(m),
                                Ok(None) => break,
                                Err(v) => {
                                    violation = Some(v);
                                    break;
                                }
                            }
                        }
                        if violation.is_some() || n < scratch.len() {
                            break;
                        }
                    }
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(_) => {
                        eof = true;
                        break;
                    }
                }
            }
        }
        self.scratch = scratch;
        for m in messages {
            self.on_message(slot, m);
        }
        if let Some(v) = violation {
            self.close_with(slot, v.code, v.reason, CloseWhy::Protocol);
        }
        if eof {
            self.begin_close(slot, CloseWhy::Peer);
            self.shutdown_client(slot);
        }
    }

    fn on_message(&mut self, slot: u32, m: InboundMessage) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        match m {
            InboundMessage::Ping(_) if c.closing.is_some() => {}
            InboundMessage::Ping(payload) => {
                let mut f = Vec::with_capacity(payload.len() + 2);
                crate::frame::encode_server_frame(Opcode::Pong, &payload, &mut f);
                c.ctrl_queue.insert(0, f);
                self.enqueue(slot);
            }
            InboundMessage::Pong(_) => {}
            InboundMessage::Close { .. } => {
                if c.closing.is_none() {
                    c.closing = Some((CloseWhy::Peer, Instant::now()));
                    queue_close(c, 1000, "");
                }
                self.enqueue(slot);
            }
            InboundMessage::Text(text) => match crate::subscription::parse_options_update(&text) {
                Ok(opts) => {
                    c.pending_options = Some(opts);
                    self.enqueue(slot);
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.close_with(slot, 1000, &reason, CloseWhy::Protocol);
                }
            },
            InboundMessage::Binary(_) => {}
        }
    }

    /// Queues a close frame (sent at the next frame boundary) and marks the client closing.
    fn close_with(&mut self, slot: u32, code: u16, reason: &str, why: CloseWhy) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.closing = Some((why, Instant::now()));
        match why {
            CloseWhy::Retention => Counters::add(&self.hub.counters.kicked_retention, 1),
            CloseWhy::Dead => Counters::add(&self.hub.counters.kicked_dead, 1),
            CloseWhy::Protocol => Counters::add(&self.hub.counters.kicked_protocol, 1),
            _ => {}
        }
        tracing::info!(peer = %c.peer, ?why, code, reason, "closing client");
        queue_close(c, code, reason);
        self.enqueue(slot);
    }

    fn begin_close(&mut self, slot: u32, why: CloseWhy) {
        let (code, reason) = match why {
            CloseWhy::Retention => (1008, "fell behind retention: reconnect with a newer cursor"),
            CloseWhy::Dead => (1001, "no pong"),
            CloseWhy::Shutdown => (1001, "relay shutting down"),
            CloseWhy::Protocol => (1002, "protocol error"),
            CloseWhy::Peer => (1000, ""),
        };
        self.close_with(slot, code, reason, why);
    }

    /// Shuts the socket down so every in-flight op completes; the slot is freed at 0 in flight.
    fn shutdown_client(&mut self, slot: u32) {
        let Some(c) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if c.shut {
            return;
        }
        c.shut = true;
        let _ = rustix::net::shutdown(&c.fd, rustix::net::Shutdown::Both);
        c.inflight += 1;
        let ud = user_data(slot, c.generation, OP_CANCEL);
        let sqe =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(c.fd.as_raw_fd())).all())
                .build()
                .user_data(ud);
        self.push(sqe);
    }

    fn maybe_free(&mut self, slot: u32) {
        let done =
            matches!(self.slots[slot as usize].as_ref(), Some(c) if c.shut && c.inflight == 0);
        if !done {
            return;
        }
        self.release_pipe(slot);
        if let Some(mut c) = self.slots[slot as usize].take() {
            unroute(&mut self.routes, &mut c);
            if let Some(ip) = c.counted_ip {
                self.hub.limits.release(ip);
            }
            if let Some(shape) = &c.shape {
                shape.remove_client();
            }
            tracing::info!(peer = %c.peer, worker = self.id, shape = %c.class, compress = c.compressed,
                why = ?c.closing.map_or(CloseWhy::Peer, |x| x.0), log_pos = c.pos, "client disconnected");
            self.hub.counters.clients_by_shape[c.class.index(c.compressed)]
                .fetch_sub(1, Ordering::Relaxed);
            drop(c);
            self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
            self.free.push(slot);
            self.wake_fd.clients.fetch_sub(1, Ordering::Relaxed);
            self.hub.counters.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Once a second: pings, dead peers, retention kicks, close deadlines, `worker_low`.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let mut lows: Vec<(Arc<Stream>, u64)> = Vec::new();
        for slot in 0..self.slots.len() as u32 {
            let Some(c) = self.slots[slot as usize].as_mut() else {
                continue;
            };
            // A client parked on its DIDs was not woken by any event routed since it parked:
            // none of them is for it, so its walk is at the routing cursor (its retention and
            // lag checks, and `worker_low`, must not see a stale position).
            if c.route_parked
                && let Source::Filtered(w) = &mut c.source
                && w.next.seq < self.route_cursor.seq
            {
                w.next = self.route_cursor;
            }
            if let Some((_, since)) = c.closing {
                let fin_expired = c.fin_at.is_some_and(|t| now.duration_since(t) > FIN_GRACE);
                if (fin_expired || now.duration_since(since) > CLOSE_GRACE) && !c.shut {
                    self.shutdown_client(slot);
                    continue;
                }
            } else if c.low_mark() < c.stream.kick_below() {
                self.begin_close(slot, CloseWhy::Retention);
            } else if std::mem::take(&mut c.rx_bytes) > self.policy.max_inbound_rate {
                self.close_with(slot, 1008, "inbound rate exceeded", CloseWhy::Protocol);
            } else if let Some(max) = self.policy.max_lag
                && lag_of(&self.hub, c).is_some_and(|lag| lag > max)
            {
                self.close_with(slot, 1008, "too far behind live", CloseWhy::Retention);
            } else if now.duration_since(c.last_rx) > self.policy.ping_interval {
                if c.ping_outstanding
                    && now.duration_since(c.last_rx) > self.policy.ping_interval * 2
                {
                    self.begin_close(slot, CloseWhy::Dead);
                    self.shutdown_client(slot);
                    continue;
                }
                if !c.ping_outstanding {
                    c.ping_outstanding = true;
                    let mut f = Vec::with_capacity(2);
                    crate::frame::encode_server_frame(Opcode::Ping, b"", &mut f);
                    c.ctrl_queue.insert(0, f);
                    self.enqueue(slot);
                }
            }
            if let Some(c) = self.slots[slot as usize].as_ref() {
                let m = c.low_mark();
                match lows.iter_mut().find(|(st, _)| Arc::ptr_eq(st, &c.stream)) {
                    Some((_, low)) => *low = (*low).min(m),
                    None => lows.push((c.stream.clone(), m)),
                }
            }
        }
        // Streams with no reader here any more get NONE, so retention is not held back. That
        // includes every stream a client registered on and left between two ticks without
        // being seen here (a walker that switched onto its shape, an options_update): the base
        // logs and the live shapes are always checked, not only last tick's streams.
        let mut candidates = std::mem::take(&mut self.known_streams);
        candidates.push(self.hub.plain.clone());
        candidates.push(self.hub.zstd.clone());
        candidates.extend(
            self.hub
                .shapes
                .active()
                .into_iter()
                .map(|s| s.stream.clone()),
        );
        for st in &candidates {
            if !lows.iter().any(|(s2, _)| Arc::ptr_eq(s2, st)) {
                st.set_worker_low(self.id, NONE);
            }
        }
        for (st, low) in &lows {
            st.set_worker_low(self.id, *low);
        }
        self.known_streams = lows.into_iter().map(|(st, _)| st).collect();
        let slots = &self.slots;
        self.routes.compact(|r| {
            slots
                .get(r.slot as usize)
                .and_then(|c| c.as_ref())
                .is_some_and(|c| c.route == r.token)
        });
        self.waits.prune(|slot| {
            slots
                .get(slot as usize)
                .and_then(|c| c.as_ref())
                .map(|c| c.waiting)
        });
    }
}

/// Whether a thin stream's send should wait for more bytes (see [`Worker::linger`]), and until
/// when: if so, client `slot` joins (or stays in) its stream's hold. Only a caught-up client of
/// a thin stream lingers: the plain full stream is paced by rounds alone, and a client that is
/// behind has plenty to send.
fn linger_due(
    linger: Option<Duration>,
    hub: &Hub,
    holds: &mut Groups,
    c: &mut Client,
    slot: u32,
    end: u64,
    origin_us: u64,
) -> Option<Instant> {
    let wait = linger?;
    if Arc::ptr_eq(&c.stream, &hub.plain) || matches!(c.linger, Linger::Released { .. }) {
        return None;
    }
    let pending = end.saturating_sub(c.pos);
    if pending == 0 || pending >= THIN_SEND_BYTES {
        return None;
    }
    let now = Instant::now();
    let hold = holds.join(&c.stream, c.pos, now);
    let due = hold.since + wait;
    if !linger_holds(end.saturating_sub(hold.low), due, now) {
        // Due: this client goes now; the round the armed timer starts releases the others.
        return None;
    }
    match c.linger {
        Linger::Held { id, .. } if id == hold.id => {}
        held => {
            c.linger = Linger::Held {
                id: hold.id,
                origin_us: held.origin_us().unwrap_or(origin_us),
            };
            hold.members.push(slot);
        }
    }
    Some(due)
}

/// Whether a lingering send with `pending` bytes keeps waiting at `now`: it is neither big
/// enough nor due.
fn linger_holds(pending: u64, due: Instant, now: Instant) -> bool {
    pending < THIN_SEND_BYTES && now < due
}

/// Puts the members of `groups` taken out of a hold or wait on `walk`, the round's list of
/// clients to offer work to. `leave(client, group id)` takes a client out of that group and
/// says whether it was still in it (a listed slot may have changed hands since it joined).
fn offer_members(
    slots: &mut [Option<Client>],
    groups: Vec<Group>,
    walk: &mut Vec<u32>,
    mut leave: impl FnMut(&mut Client, u64) -> bool,
) {
    for g in groups {
        for slot in g.members {
            if let Some(c) = slots.get_mut(slot as usize).and_then(|c| c.as_mut())
                && leave(c, g.id)
            {
                walk.push(slot);
            }
        }
    }
}

/// Parks a client until the next round (once, however often it is parked meanwhile).
fn park(idle: &mut Vec<u32>, c: &mut Client, slot: u32) {
    if !c.parked {
        c.parked = true;
        idle.push(slot);
    }
}

/// Parks a client with nothing to send: a DID-filtered walker on its DIDs (registering them
/// the first time), so that only an event with one of them wakes it; anyone else until the
/// next round. A walker parks on its DIDs only if every event from its position on is still
/// to be routed (`route_cursor` is not past it), else an event could slip by unseen.
fn park_caught_up(
    idle: &mut Vec<u32>,
    routes: &mut Routes,
    route_cursor: EventPos,
    c: &mut Client,
    slot: u32,
) {
    if let Source::Filtered(w) = &c.source
        && c.shape.is_none()
        && !w.did_hashes.is_empty()
        && c.pos == c.boundary
        && w.next.seq >= route_cursor.seq
    {
        if c.route == 0 {
            c.route = routes.register(slot, &w.did_hashes);
        }
        c.route_parked = true;
        return;
    }
    park(idle, c, slot);
}

/// Takes a client out of the DID routes (it leaves or changes its filter): its entries go
/// stale.
fn unroute(routes: &mut Routes, c: &mut Client) {
    if c.route != 0 {
        if let Source::Filtered(w) = &c.source {
            routes.forget(w.did_hashes.len());
        }
        c.route = 0;
    }
    c.route_parked = false;
}

/// Whether a new round has anything for a parked client. Only a caught-up client of a shared
/// log can be judged without serving it: nothing new in its log, or a lingering send whose
/// hold is not released. Anything else (a walker, pending control frames or options) is
/// served. (A client that gets control frames or options meanwhile is enqueued directly.)
fn has_round_work(c: &Client) -> bool {
    if !matches!(c.source, Source::Contiguous)
        || c.pos != c.boundary
        || c.pending_options.is_some()
        || c.ctrl.is_some()
        || !c.ctrl_queue.is_empty()
        || c.closing.is_some()
    {
        return true;
    }
    c.stream.end() > c.pos && !matches!(c.linger, Linger::Held { .. })
}

/// Hysteresis on the worker's busy share: thin streams start lingering once it reaches
/// `thin_linger_load` and stop only below a third of it, so that the relief lingering brings
/// does not switch it straight off again (and on, and off…).
fn linger_gate(on: bool, load: f64, p: &ClientPolicy) -> bool {
    if p.thin_linger.is_zero() {
        return false;
    }
    if on {
        load >= p.thin_linger_load / 3.0
    } else {
        load >= p.thin_linger_load
    }
}

/// How far behind live a client is: the age of the oldest event it has not been sent yet
/// (chunk granularity), or None when it is caught up.
fn lag_of(hub: &Hub, c: &Client) -> Option<Duration> {
    if c.pos >= c.stream.end() {
        return None;
    }
    let index = hub.index();
    let seq = match (&c.source, &c.shape) {
        (Source::Filtered(w), _) => w.next.seq,
        (Source::Contiguous, Some(shape)) => shape
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .seq_at_offset(c.pos, index.next_seq()),
        (Source::Contiguous, None) => index.seq_at_or_before_offset(c.pos, c.compressed)?,
    };
    let appended = index.appended_at_of(seq)?;
    let age = crate::index::now_us().saturating_sub(appended);
    Some(Duration::from_micros(age.max(0) as u64))
}

fn queue_close(c: &mut Client, code: u16, reason: &str) {
    let mut f = Vec::with_capacity(4 + reason.len());
    crate::frame::encode_close(crate::frame::CloseCode(code), reason, &mut f);
    c.ctrl_queue.insert(0, f);
    c.close_sent = true;
}

/// Where a client with these options starts reading, from event position `start`.
struct AttachPoint {
    stream: Arc<Stream>,
    shape: Option<Arc<Shape>>,
    source: Source,
    pos: u64,
    /// Frames before `pos` in `stream`'s numbering (see [`published_frames`]).
    ordinal: u64,
}

fn attach_point(
    hub: &Hub,
    compressed: bool,
    options: SubscriberOptions,
    start: EventPos,
) -> AttachPoint {
    let base = hub.base(compressed).clone();
    let key = options.shape_key(compressed);
    let unfiltered = options.wanted_dids.is_empty()
        && key.collections.is_empty()
        && key.max_message_size.is_none();
    if unfiltered {
        return AttachPoint {
            stream: base,
            shape: None,
            source: Source::Contiguous,
            pos: start.offset(compressed),
            ordinal: start.seq,
        };
    }
    let shape = if options.wanted_dids.is_empty() {
        hub.shapes.get_or_create(&key, || hub.index().next_seq())
    } else {
        None
    };
    if let Some(shape) = &shape {
        shape.add_client();
        if start.seq >= shape.start_seq {
            let end = shape.stream.end();
            let table = shape.table.read().unwrap_or_else(|p| p.into_inner());
            let pos = table.offset_from_seq(start.seq, end);
            let ordinal = table.ordinal_at_offset(pos);
            drop(table);
            return AttachPoint {
                stream: shape.stream.clone(),
                shape: Some(shape.clone()),
                source: Source::Contiguous,
                pos,
                ordinal,
            };
        }
    }
    AttachPoint {
        stream: base,
        source: Source::Filtered(Box::new(Walker::new(start, options))),
        shape,
        pos: start.offset(compressed),
        // Unused while walking: a walker counts the events of each run it finds.
        ordinal: start.seq,
    }
}

/// Moves a walking client onto its shape's log once the walk reaches the shape's start.
fn switch_to_shape(worker: usize, c: &mut Client) {
    let Source::Filtered(w) = &c.source else {
        return;
    };
    let Some(shape) = &c.shape else { return };
    if w.next.seq < shape.start_seq {
        return;
    }
    let end = shape.stream.end();
    let table = shape.table.read().unwrap_or_else(|p| p.into_inner());
    let pos = table.offset_from_seq(w.next.seq, end);
    c.range_seq = table.ordinal_at_offset(pos);
    drop(table);
    c.stream = shape.stream.clone();
    c.source = Source::Contiguous;
    c.pos = pos;
    c.boundary = pos;
    if !c.stream.register_reader(worker, pos) && c.closing.is_none() {
        // Being punched already: the housekeeping kick closes it.
        tracing::debug!(peer = %c.peer, "switched onto a shape position under retention");
    }
}

/// Where a client switching filters continues: the first event it has not been sent. `None`
/// while that is not known yet: the writer publishes an event's frames (base logs, then shape
/// logs) before indexing it, so a live client may already have sent a frame whose event the
/// index does not have; falling back to the index's end would send that event again. The
/// window is the writer's append of one event (microseconds); the caller retries.
fn switch_point(hub: &Hub, c: &Client) -> Option<EventPos> {
    let index = hub.index();
    let seq = match (&c.source, &c.shape) {
        (Source::Filtered(w), _) => w.next.seq,
        (Source::Contiguous, Some(shape)) => {
            let table = shape.table.read().unwrap_or_else(|p| p.into_inner());
            if table
                .last_seq_before(c.pos)
                .is_some_and(|s| s >= index.next_seq())
            {
                return None;
            }
            table.seq_at_offset(c.pos, index.next_seq())
        }
        (Source::Contiguous, None) => match index.seq_at_offset(c.pos, c.compressed) {
            Some(seq) => seq,
            None if c.pos > index.end_pos().offset(c.compressed) => return None,
            None => index.next_seq(),
        },
    };
    Some(index.pos_of(seq))
}

fn apply_options(
    hub: &Hub,
    worker: usize,
    c: &mut Client,
    opts: SubscriberOptions,
    next: EventPos,
) {
    c.hello_pending = false;
    // A new stream: whatever it lingered for in the old one is moot (its old hold's entry
    // for it goes stale).
    c.linger = Linger::Off;
    c.waiting = 0;
    if let Some(old) = c.shape.take() {
        old.remove_client();
    }
    let point = attach_point(hub, c.compressed, opts, next);
    c.stream = point.stream;
    c.shape = point.shape;
    c.source = point.source;
    c.pos = point.pos;
    c.boundary = point.pos;
    c.range_seq = point.ordinal;
    c.stream.register_reader(worker, c.pos);
}

/// Pins `stream`'s ring for this batch (once) and returns the lowest ring-servable offset.
fn pin(pinned: &mut Vec<(Arc<Stream>, u64)>, stream: &Arc<Stream>, worker: usize) -> u64 {
    if let Some((_, low)) = pinned.iter().find(|(s, _)| Arc::ptr_eq(s, stream)) {
        return *low;
    }
    let low = stream.pin_ring(worker);
    pinned.push((stream.clone(), low));
    low
}

/// Frames published so far in the stream a contiguous client reads, in that stream's own
/// numbering: the event sequence for a base log, the shape's frame count for a shape log.
/// Lock-free: one atomic load.
fn published_frames(hub: &Hub, c: &Client) -> u64 {
    match (&c.source, &c.shape) {
        (Source::Contiguous, Some(shape)) => shape.frames_appended(),
        _ => hub.appended_seq(),
    }
}

/// After bytes were handed over: once the scheduled range is complete, counts its events and
/// records the delivery latency (once per range, never per event).
fn range_progress(hub: &Hub, c: &mut Client) {
    if c.pos == c.boundary && c.pending_events > 0 {
        Counters::add(&hub.counters.events_delivered, c.pending_events);
        c.pending_events = 0;
        // 0 = nothing appended since start (a replay of an older log): no meaningful latency.
        if c.range_appended_us != 0 {
            let now = crate::index::now_us() as u64;
            hub.counters
                .delivery_latency
                .record(now.saturating_sub(c.range_appended_us));
        }
    }
}

/// `io_uring_enter` interrupted (EINTR) or with a full completion queue (EBUSY) is not an error:
/// the next loop reaps and submits again.
fn retry_next_loop(r: std::io::Result<usize>) -> std::io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
        other => other.map(drop),
    }
}

/// When the next live round may start, given when the current one started, the work done
/// since, and the duty cycle: the work plus `(1/duty − 1)` times as much waiting, capped at
/// [`MAX_PACE_DELAY`]. With `duty` = 1 that is "as soon as the work is done", i.e. now.
fn next_round_at(started: Instant, busy: Duration, duty: f64) -> Instant {
    let wait = if duty >= 1.0 {
        Duration::ZERO
    } else {
        busy.mul_f64(1.0 / duty - 1.0).min(MAX_PACE_DELAY)
    };
    started + busy + wait
}

/// Creates a worker's ring; on ENOMEM (the kernel could not find contiguous memory for the
/// rings) retries with smaller queues rather than refusing to start.
fn build_ring() -> std::io::Result<IoUring> {
    let mut entries = RING_ENTRIES;
    let mut cq = CQ_ENTRIES;
    loop {
        match IoUring::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .setup_submit_all()
            .build(entries)
        {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && entries > 256 => {
                tracing::warn!(
                    entries,
                    cq,
                    "io_uring setup hit ENOMEM; retrying with smaller queues"
                );
                entries /= 2;
                cq /= 2;
            }
            other => return other,
        }
    }
}

fn send(fd: RawFd, ptr: *const u8, len: u32, ud: u64) -> squeue::Entry {
    opcode::Send::new(types::Fd(fd), ptr, len)
        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud)
}

fn splice_out(pipe_r: RawFd, sock: RawFd, len: u32, ud: u64) -> squeue::Entry {
    opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(sock), -1, len)
        .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
        .build()
        .user_data(ud)
}

impl Walker {
    fn new(next: EventPos, options: SubscriberOptions) -> Walker {
        let mut did_hashes: Vec<u32> = options
            .wanted_dids
            .iter()
            .map(|d| crate::event::did_hash(d))
            .collect();
        did_hashes.sort_unstable();
        did_hashes.dedup();
        Walker {
            next,
            options,
            did_hashes,
            collection_verdicts: Vec::new(),
        }
    }

    /// Finds the next run of consecutive matching frames from `self.next`, within the walk
    /// budget. Returns its byte range in the client's base log and advances past it.
    fn next_run(
        &mut self,
        index: &crate::index::EventIndex,
        plain: &std::fs::File,
        compressed: bool,
        stop_at: Option<u64>,
    ) -> Option<(u64, u64, u64)> {
        if self.next.seq < index.start_pos().seq {
            // Retention passed us while idle; the housekeeping kick handles it.
            return None;
        }
        let mut run: Option<(u64, u64, u64)> = None;
        let mut next = self.next;
        index.walk(self.next, WALK_BUDGET, |pos, e| {
            if stop_at.is_some_and(|s| pos.seq >= s) {
                return false;
            }
            let ok = self.matches(index, plain, pos, e, compressed);
            let end = pos.offset(compressed) + e.frame_len(compressed);
            match (&mut run, ok) {
                (None, true) => run = Some((pos.offset(compressed), end, 1)),
                (Some(r), true) if (end - r.0) as usize <= MAX_SEND => {
                    r.1 = end;
                    r.2 += 1;
                }
                (Some(_), _) => {
                    return false;
                }
                (None, false) => {}
            }
            next = EventPos {
                seq: pos.seq + 1,
                plain_off: pos.plain_off + e.plain_len as u64,
                zstd_off: pos.zstd_off + e.zstd_len as u64,
            };
            true
        });
        self.next = next;
        run
    }

    fn matches(
        &mut self,
        index: &crate::index::EventIndex,
        plain: &std::fs::File,
        pos: EventPos,
        e: &crate::index::EventEntry,
        compressed: bool,
    ) -> bool {
        let o = &self.options;
        if let Some(max) = o.max_message_size
            && stored_payload_len(e.frame_len(compressed)) > max as u64
        {
            return false;
        }
        if !o.wanted_collections.is_empty() {
            let verdict = match e.collection {
                COLLECTION_NONE => true,
                COLLECTION_UNKNOWN => {
                    let json = read_payload(plain, pos.plain_off, e.plain_len);
                    let meta = json
                        .as_deref()
                        .and_then(|j| crate::event::parse_event(j).ok());
                    meta.is_some_and(|m| o.collection_allowed(m.kind, m.collection.as_deref()))
                }
                id => {
                    let i = id as usize;
                    if self.collection_verdicts.len() <= i {
                        self.collection_verdicts.resize(i + 1, 0);
                    }
                    if self.collection_verdicts[i] == 0 {
                        let allowed = o.collection_allowed(e.kind(), index.collections.name(id));
                        self.collection_verdicts[i] = if allowed { 1 } else { 2 };
                    }
                    self.collection_verdicts[i] == 1
                }
            };
            if !verdict {
                return false;
            }
        }
        if !o.wanted_dids.is_empty() {
            if self.did_hashes.binary_search(&e.did_hash).is_err() {
                return false;
            }
            // Confirm on the JSON: a 32-bit hash can collide.
            let json = read_payload(plain, pos.plain_off, e.plain_len);
            let meta = json
                .as_deref()
                .and_then(|j| crate::event::parse_event(j).ok());
            return meta.is_some_and(|m| o.did_allowed(&m.did));
        }
        true
    }
}

fn read_payload(plain: &std::fs::File, off: u64, len: u32) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(plain, &mut buf, off).ok()?;
    let h = crate::hub::stored_header_len(&buf);
    Some(buf.split_off(h.min(buf.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the eventfd without blocking: the number of wake-ups written since the last read.
    fn wakes_written(w: &Waker) -> u64 {
        let mut buf = [0u8; 8];
        let fd = rustix::fs::fcntl_getfl(&w.fd).expect("getfl");
        rustix::fs::fcntl_setfl(&w.fd, fd | rustix::fs::OFlags::NONBLOCK).expect("setfl");
        match rustix::io::read(&w.fd, &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }

    #[test]
    fn a_worker_without_clients_is_not_woken_for_data_and_one_with_clients_is_once() {
        let w = Waker::new().expect("eventfd");
        w.wake(1);
        w.wake(2);
        assert_eq!(wakes_written(&w), 0, "no clients: no syscall per event");
        assert_eq!(w.consumed(), 0, "nothing announced");
        w.clients.fetch_add(1, Ordering::SeqCst);
        w.wake(3);
        w.wake(4);
        assert_eq!(
            wakes_written(&w),
            1,
            "coalesced until the worker consumes it"
        );
        assert_eq!(
            w.consumed(),
            3,
            "latency counts from the oldest announced append"
        );
        w.wake(5);
        assert_eq!(wakes_written(&w), 1);
    }

    #[test]
    fn pacing_waits_in_proportion_to_the_work_and_never_beyond_the_cap() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Duty 1: the next round may start as soon as the current one's work is done.
        assert_eq!(next_round_at(t, ms(4), 1.0), t + ms(4));
        // Duty ½: as much waiting as working.
        assert_eq!(next_round_at(t, ms(4), 0.5), t + ms(8));
        // Duty ¼: three times as much waiting...
        assert_eq!(next_round_at(t, ms(2), 0.25), t + ms(8));
        // ...but never more than MAX_PACE_DELAY of it.
        assert_eq!(next_round_at(t, ms(4), 0.05), t + ms(4) + MAX_PACE_DELAY);
        // An idle worker (no work since the last round) starts the next one at once.
        assert_eq!(next_round_at(t, Duration::ZERO, 0.5), t);
    }

    /// Two empty logs in a fresh directory (removed by the caller).
    fn two_streams(name: &str) -> (std::path::PathBuf, Arc<Stream>, Arc<Stream>) {
        let dir = std::env::temp_dir().join(format!("jetrelay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let open = |n: &str| Arc::new(Stream::create(n, &dir.join(n), 1 << 16).expect("stream"));
        (dir.clone(), open("posts.log"), open("likes.log"))
    }

    #[test]
    fn a_thin_streams_clients_share_one_hold_released_by_its_deadline_or_its_size() {
        let (dir, posts, likes) = two_streams("holds");
        let (t, ms) = (Instant::now(), Duration::from_millis);
        let wait = Some(ms(40));
        let mut holds = Groups::default();
        // Clients of one stream join one hold whenever they come: one deadline for all.
        let first = holds.join(&posts, 0, t);
        first.members.push(1);
        let id = first.id;
        let later = holds.join(&posts, 0, t + ms(30));
        assert_eq!(
            (later.id, later.since),
            (id, t),
            "the later client joins the first's hold"
        );
        later.members.push(2);
        let other = holds.join(&likes, 0, t + ms(10)).id;
        assert_ne!(other, id, "another stream holds on its own");
        // Nothing is due before the earliest deadline, which is what the timer is armed for.
        let (due, next) = holds.take_due(wait, t + ms(39));
        assert!(due.is_empty());
        assert_eq!(next, Some(t + ms(40)));
        // At its deadline the posts hold goes out whole; the likes hold keeps waiting.
        let (due, next) = holds.take_due(wait, t + ms(40));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].id, due[0].members.as_slice()), (id, &[1, 2][..]));
        assert_eq!(next, Some(t + ms(50)));
        // A new hold of posts: due early once the stream has THIN_SEND_BYTES past its lowest
        // member, even if that member joined last.
        let mut end = 0;
        posts.append(&[b'x'; 1000], &mut end).unwrap();
        posts.publish(end);
        holds.join(&posts, 1000, t + ms(41)).members.push(1);
        holds.join(&posts, 0, t + ms(42)).members.push(2);
        assert!(
            holds.take_due(wait, t + ms(43)).0.is_empty(),
            "1,000 bytes past the lowest"
        );
        posts
            .append(&vec![b'y'; THIN_SEND_BYTES as usize - 1000], &mut end)
            .unwrap();
        posts.publish(end);
        let (due, _) = holds.take_due(wait, t + ms(43));
        assert_eq!(due.len(), 1, "THIN_SEND_BYTES past the lowest member: due");
        assert_eq!(due[0].members, vec![1, 2]);
        // Lingering switched off: every hold goes at once.
        let (due, next) = holds.take_due(None, t + ms(44));
        assert_eq!((due.len(), next), (1, None));
        assert!(holds.list.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn caught_up_clients_wait_per_stream_until_it_grows_and_leavers_are_pruned() {
        let (dir, posts, likes) = two_streams("waits");
        let t = Instant::now();
        let mut waits = Groups::default();
        let a = waits.join(&posts, 0, t).id;
        waits.join(&posts, 0, t).members.extend([1, 2]);
        assert_eq!(waits.join(&posts, 0, t).id, a, "one wait per stream");
        let b = waits.join(&likes, 0, t);
        b.members.push(3);
        let b = b.id;
        assert_ne!(a, b);
        assert!(
            waits.take_grown().is_empty(),
            "nothing appended: every client is skipped"
        );
        let mut end = 0;
        posts.append(b"{}", &mut end).unwrap();
        posts.publish(end);
        let grown = waits.take_grown();
        assert_eq!(grown.len(), 1, "only the stream that grew");
        assert_eq!((grown[0].id, grown[0].members.as_slice()), (a, &[1, 2][..]));
        // Slot 3 left (or went to another client): the likes wait is dropped.
        let c = waits.join(&posts, end, t);
        c.members.push(4);
        let c = c.id;
        waits.prune(|slot| match slot {
            3 => None,
            4 => Some(c),
            _ => Some(0),
        });
        assert_eq!(waits.list.len(), 1);
        assert_eq!(
            (waits.list[0].id, waits.list[0].members.as_slice()),
            (c, &[4][..])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn policy(linger_ms: u64, load: f64) -> ClientPolicy {
        ClientPolicy {
            ping_interval: Duration::from_secs(30),
            max_inbound_rate: 1 << 20,
            max_lag: None,
            duty: 0.5,
            thin_linger: Duration::from_millis(linger_ms),
            thin_linger_load: load,
        }
    }

    #[test]
    fn lingering_starts_at_the_load_threshold_and_stops_below_a_third_of_it() {
        let p = policy(40, 0.3);
        assert!(
            !linger_gate(false, 0.0, &p),
            "an idle worker starts without lingering"
        );
        assert!(!linger_gate(false, 0.29, &p));
        assert!(linger_gate(false, 0.3, &p), "on at the threshold");
        // Lingering lowers the load; it stays on down to a third of the threshold...
        assert!(linger_gate(true, 0.15, &p));
        assert!(linger_gate(true, 0.1, &p));
        // ...and goes off below it.
        assert!(!linger_gate(true, 0.09, &p));
        // Threshold 0: always on, from the start.
        assert!(linger_gate(false, 0.0, &policy(40, 0.0)));
        // A zero linger never lingers, whatever the load.
        assert!(!linger_gate(false, 1.0, &policy(0, 0.0)));
        assert!(!linger_gate(true, 1.0, &policy(0, 0.0)));
    }
}
