//! The scheduler: one worker's clients and every decision about them, without I/O.
//!
//! Inputs (`handle_*`, time passed in): a client attached, data appended, bytes handed to a
//! socket, a socket full or writable again, inbound bytes, a peer gone, the driver done with a
//! client, a timeout, shutdown. Outputs (`poll_*`): the next operation for the driver
//! ([`Op`]) and the next deadline. It reads the shared logs, index and shapes (the writer's
//! state), never a socket or the ring: the driver does that, so the scheduler runs unchanged
//! against a simulated kernel (see `sim.rs`).
//!
//! How a client moves (its [`Place`]): attached → `Ready` → served: an [`Op`] (`InFlight`)
//! → the driver reports bytes sent (`Ready` again) or a full socket (`Blocked` until
//! writable). A caught-up client waits for the next round (`Idle`), for its log to grow
//! (`Waiting`), with its thin stream's hold (`Held`), or on its DIDs (`Routed`). Its
//! [`Life`]: `Open` → `Closing` (the range drains, the close frame goes) → `FinSent` →
//! `Shut` (the driver cancels what is in flight and reports the slot free).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::ClientPolicy;
use super::attach::{
    Switch, apply_options, attach_point, published_frames, switch_point, switch_to_shape,
};
use super::client::{
    Client, CloseWhy, Control, Inbound, Life, Linger, NEVER, Place, RangeAccount, Source,
};
use super::groups::{Groups, THIN_SEND_BYTES, linger_gate, linger_holds, next_round_at};
use super::walker::Step;
use crate::encoding::Encoding;
use crate::frame::{InboundDecoder, InboundMessage, MAX_CONTROL_PAYLOAD};
use crate::hub::{Counters, Hub, ShapeClass};
use crate::index::{EventEntry, EventPos};
use crate::log::{NONE, Stream};
use crate::routes::Routes;
use crate::subscription::{MAX_OPTIONS_UPDATE_BYTES, SubscriberOptions};
use crate::wire::KindSet;

/// A client's slot in its worker.
pub type ClientId = u32;

/// Housekeeping period: pings, dead peers, retention kicks, rate limits, low marks.
pub const TICK: Duration = Duration::from_secs(1);
/// A kicked or shutting-down client gets this long to drain its current range and read its
/// close frame before the socket is simply closed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// After our FIN, how long the peer gets to close its side before the socket is closed.
pub const FIN_GRACE: Duration = Duration::from_secs(2);
/// The longest control frame: a header and the largest control payload.
pub const MAX_CONTROL_FRAME: usize = 2 + MAX_CONTROL_PAYLOAD;
/// The official slow-consumer rule (v2): a client more than this many events behind the tip…
pub const SLOW_CONSUMER_LAG: u64 = 100_000;
/// …that advanced less than [`SLOW_CONSUMER_MIN_RATE`] events per second over this long is
/// dropped with `ConsumerTooSlow`. A slow but progressing reader never is.
pub const SLOW_CONSUMER_WINDOW: Duration = Duration::from_secs(60);
/// Events per second a far-behind v2 client must advance to stay.
pub const SLOW_CONSUMER_MIN_RATE: u64 = 5;

/// The inputs of a new client (its socket stays with the driver).
pub struct Attach {
    /// Real client address (from PROXY v2 when behind the sidecar).
    pub peer: std::net::SocketAddr,
    /// The frames it receives (wire and compression).
    pub encoding: Encoding,
    /// The kinds it wants (`kinds` on v2; [`KindSet::V1`] on v1).
    pub kinds: KindSet,
    /// Filters from the query string.
    pub options: SubscriberOptions,
    /// A v2 `#info` frame to send before anything else (a clamped or future cursor).
    pub preamble: Option<Vec<u8>>,
    /// Where its stream starts (from `cursor`, or live).
    pub start: EventPos,
    /// Hold everything until the first `options_update`.
    pub require_hello: bool,
    /// The address this client is counted under in the per-IP limits (released on leave).
    pub counted_ip: Option<std::net::IpAddr>,
    /// Its filters' charge against the filter memory budget (released on leave).
    pub filter_reservation: crate::filter_budget::Reservation,
}

/// Up to one control frame's bytes, copied into the operation (the driver owns them while
/// they are in flight). A longer frame the relay composes (a v2 `#info` or error frame) goes
/// out in several operations, each the next part.
#[derive(Clone, Copy)]
pub struct ControlBytes {
    /// The bytes (only `len` of them are meaningful).
    buf: [u8; MAX_CONTROL_FRAME],
    /// How many.
    len: u8,
}

impl ControlBytes {
    fn new(bytes: &[u8]) -> ControlBytes {
        let mut buf = [0; MAX_CONTROL_FRAME];
        let len = bytes.len().min(MAX_CONTROL_FRAME);
        buf[..len].copy_from_slice(&bytes[..len]);
        ControlBytes {
            buf,
            len: len as u8,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// What the scheduler asks the driver to do.
pub enum Op {
    /// Hand `[from, to)` of `stream` to the client's socket; report how much went with
    /// [`Scheduler::handle_sent`] (a part is fine), or a full socket / a failure.
    Data {
        client: ClientId,
        stream: Arc<Stream>,
        from: u64,
        to: u64,
    },
    /// Hand these control bytes to the client's socket; report with
    /// [`Scheduler::handle_control_sent`].
    Control {
        client: ClientId,
        bytes: ControlBytes,
    },
    /// Our close frame is out: half-close the socket (FIN). Nothing to report.
    Fin { client: ClientId },
    /// Shut the socket down and cancel its operations; report [`Scheduler::handle_released`]
    /// once nothing of it is in flight.
    Shut { client: ClientId },
    /// Stop reading the client's input (it violated a limit). Nothing to report.
    StopReading { client: ClientId },
}

/// Live rounds and their pacing.
struct Round {
    /// Rounds started so far (a client's `caught_up_round` refers to one).
    number: u64,
    /// When the current round started.
    started: Instant,
    /// Work time since the current round started (pacing).
    busy: Duration,
    /// Data was announced since the current round started: a new round is wanted.
    wanted: bool,
    /// The wanted round was held back by pacing (counted once when it starts).
    held: bool,
    /// When the held round may start (a deadline for the driver's wait).
    due: Option<Instant>,
    /// Append time of the oldest data announced since the current round started (0 = none).
    pending_since_us: u64,
    /// The same for the current round: the latency origin of its ranges.
    since_us: u64,
}

/// One worker's scheduler.
pub struct Scheduler {
    /// Worker index (the slot of its pins and low marks in each stream).
    worker: usize,
    /// Shared logs, index, shapes, counters and limits.
    hub: Arc<Hub>,
    /// Per-client limits and pacing settings.
    policy: ClientPolicy,
    /// Clients by slot.
    clients: Vec<Option<Client>>,
    /// Free slots.
    free: Vec<ClientId>,
    /// Clients to serve, in order (entries of clients no longer `Ready` are skipped).
    ready: VecDeque<ClientId>,
    /// Clients to serve in the next loop.
    deferred: Vec<ClientId>,
    /// Clients caught up in the current round, offered work by the next one.
    idle: Vec<ClientId>,
    /// Operations decided outside a serve (shut, stop reading), handed out first.
    urgent: VecDeque<Op>,
    /// Rounds and pacing.
    round: Round,
    /// Thin-stream clients holding back their sends, grouped by stream.
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
    /// Thin streams linger now (the worker is loaded; see [`linger_gate`]).
    lingering: bool,
    /// Work time since the last tick: the worker's load.
    tick_busy: Duration,
    /// When the last tick ran.
    last_tick: Instant,
    /// When the earliest hold falls due (the driver must wake by then).
    linger_due: Option<Instant>,
    /// Streams this worker published a low mark for at the last tick.
    known_streams: Vec<Arc<Stream>>,
    /// Reused buffer of a walk's index records.
    walk_scratch: Vec<(EventPos, EventEntry, u8)>,
    /// When shutdown began.
    shutdown_at: Option<Instant>,
    /// Clients in `clients`.
    live: usize,
}

impl Scheduler {
    /// A scheduler for worker `worker`, starting at `now`.
    pub fn new(worker: usize, hub: Arc<Hub>, policy: ClientPolicy, now: Instant) -> Scheduler {
        let lingering = linger_gate(false, 0.0, policy.thin_linger, policy.thin_linger_load);
        let route_cursor = hub.index().end_pos();
        Scheduler {
            worker,
            hub,
            policy,
            clients: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            deferred: Vec::new(),
            idle: Vec::new(),
            urgent: VecDeque::new(),
            round: Round {
                number: 0,
                started: now,
                busy: Duration::ZERO,
                wanted: false,
                held: false,
                due: None,
                pending_since_us: 0,
                since_us: 0,
            },
            holds: Groups::default(),
            waits: Groups::default(),
            routes: Routes::default(),
            route_cursor,
            lingering,
            tick_busy: Duration::ZERO,
            last_tick: now,
            linger_due: None,
            known_streams: Vec::new(),
            walk_scratch: Vec::new(),
            shutdown_at: None,
            live: 0,
        }
    }

    // ---- inputs ------------------------------------------------------------------------

    /// A new client. Returns its slot (the driver keeps its socket there).
    pub fn handle_attach(&mut self, a: Attach, now: Instant) -> ClientId {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.clients.push(None);
                (self.clients.len() - 1) as ClientId
            }
        };
        let class = ShapeClass::of(&a.options);
        let point = attach_point(
            &self.hub,
            a.peer.ip(),
            a.encoding,
            a.kinds,
            a.options,
            a.start,
        );
        let admitted = point.stream.register_reader(self.worker, point.pos);
        tracing::debug!(worker = self.worker, peer = %a.peer, encoding = %a.encoding, "client attached");
        let mut control = Control::default();
        if let Some(frame) = a.preamble {
            control.preamble(frame);
        }
        self.clients[id as usize] = Some(Client {
            peer: a.peer,
            counted_ip: a.counted_ip,
            filter_reservation: a.filter_reservation,
            encoding: a.encoding,
            kinds: a.kinds,
            class,
            stream: point.stream,
            shape: point.shape,
            source: point.source,
            pos: point.pos,
            boundary: point.pos,
            place: Place::Ready,
            life: Life::Open,
            control,
            inbound: Inbound {
                decoder: InboundDecoder::new(MAX_OPTIONS_UPDATE_BYTES),
                last_rx: now,
                last_tx: now,
                ping_outstanding: false,
                rx_bytes: 0,
                update_tokens: self.policy.options_update_burst(),
                stopped: false,
            },
            awaiting_hello: a.require_hello,
            pending_options: None,
            range: RangeAccount {
                ordinal: point.ordinal,
                pending_events: 0,
                origin_us: 0,
            },
            caught_up_round: NEVER,
            linger: Linger::Off,
            route: 0,
            filter_bytes: 0,
            far_behind_since: None,
        });
        self.live += 1;
        let c = &self.hub.counters;
        Counters::add(&c.clients, 1);
        Counters::add(&c.clients_by_shape[class.index(a.encoding)], 1);
        self.ready.push_back(id);
        if !admitted {
            self.begin_close(id, CloseWhy::Retention, now);
        }
        id
    }

    /// The writer appended data (a consumed wake-up); `since_us` is the append time of the
    /// oldest of it (0: a wake-up without data, e.g. for a new client).
    pub fn handle_data_appended(&mut self, since_us: u64) {
        if since_us != 0
            && (self.round.pending_since_us == 0 || since_us < self.round.pending_since_us)
        {
            self.round.pending_since_us = since_us;
        }
        self.round.wanted = true;
    }

    /// `n` bytes of the client's current [`Op::Data`] were handed to its socket.
    pub fn handle_sent(&mut self, id: ClientId, n: u64, now: Instant, wall_us: u64) {
        let Some(c) = open_mut(&mut self.clients, id) else {
            return;
        };
        c.inbound.last_tx = now;
        debug_assert_eq!(
            c.place,
            Place::InFlight,
            "a completion without an operation"
        );
        debug_assert!(c.pos + n <= c.boundary, "sent beyond the range");
        c.pos += n;
        let counters = &self.hub.counters;
        Counters::add(&counters.bytes_sent, n);
        Counters::add(&counters.data_sends, 1);
        if c.pos == c.boundary && c.range.pending_events > 0 {
            Counters::add(&counters.events_delivered, c.range.pending_events);
            c.range.pending_events = 0;
            // 0 = nothing appended since start (a replay of an older log): no latency.
            if c.range.origin_us != 0 {
                counters
                    .delivery_latency
                    .record(wall_us.saturating_sub(c.range.origin_us));
            }
        }
        self.op_done(id);
    }

    /// `n` bytes of the client's current [`Op::Control`] were handed to its socket.
    pub fn handle_control_sent(&mut self, id: ClientId, n: usize, now: Instant) {
        let Some(c) = self.open_client(id) else {
            return;
        };
        c.inbound.last_tx = now;
        c.control.sent(n);
        self.op_done(id);
    }

    /// The client's socket is full: nothing of its operation went. The driver waits for it
    /// to become writable.
    pub fn handle_blocked(&mut self, id: ClientId) {
        if let Some(c) = self.open_client(id) {
            debug_assert_eq!(c.place, Place::InFlight);
            c.place = Place::Blocked;
        }
    }

    /// The client's socket can take more.
    pub fn handle_writable(&mut self, id: ClientId) {
        if let Some(c) = self.open_client(id)
            && c.place == Place::Blocked
        {
            c.place = Place::Ready;
            self.ready.push_back(id);
        }
    }

    /// The client's operation failed (`errno`): the connection is gone.
    pub fn handle_failed(&mut self, id: ClientId, errno: i32, now: Instant) {
        if let Some(c) = self.client(id) {
            tracing::debug!(peer = %c.peer, errno, "client socket error");
        }
        self.shut(id, CloseWhy::Peer, now);
    }

    /// The peer closed its side (EOF) or reset the connection.
    pub fn handle_peer_gone(&mut self, id: ClientId, now: Instant) {
        self.shut(id, CloseWhy::Peer, now);
    }

    /// Bytes the client sent. Returns false once its input must no longer be read (it
    /// violated a limit, or sent Close): the driver stops reading.
    pub fn handle_inbound(&mut self, id: ClientId, bytes: &[u8], now: Instant) -> bool {
        let rate_cap = self.policy.max_inbound_rate;
        let Some(c) = self.open_client(id) else {
            return false;
        };
        let inbound = &mut c.inbound;
        inbound.last_rx = now;
        inbound.ping_outstanding = false;
        inbound.rx_bytes += bytes.len() as u64;
        if inbound.stopped {
            return false;
        }
        // A flood is cut off at once; a steady excess at the next tick.
        if inbound.rx_bytes > rate_cap.saturating_mul(4) {
            self.violation(id, 1008, "inbound rate exceeded", now);
            return false;
        }
        let mut input = bytes;
        loop {
            let Some(c) = self.open_client(id) else {
                return false;
            };
            if c.inbound.stopped {
                return false;
            }
            match c.inbound.decoder.next_message(&mut input) {
                Ok(Some(m)) => self.on_message(id, m, now),
                Ok(None) => return true,
                Err(v) => {
                    self.violation(id, v.code, v.reason, now);
                    return false;
                }
            }
        }
    }

    /// The driver is done with the client's socket (nothing of it is in flight any more):
    /// its slot is freed.
    pub fn handle_released(&mut self, id: ClientId) {
        let Some(mut c) = self.clients.get_mut(id as usize).and_then(|c| c.take()) else {
            return;
        };
        debug_assert!(
            matches!(c.life, Life::Shut { .. }),
            "released while not shut"
        );
        self.unroute(&mut c);
        if let Some(ip) = c.counted_ip {
            self.hub.limits.release(ip);
        }
        if let Some(shape) = &c.shape {
            shape.remove_client();
        }
        let counters = &self.hub.counters;
        counters.clients_by_shape[c.class.index(c.encoding)].fetch_sub(1, Ordering::Relaxed);
        counters.clients.fetch_sub(1, Ordering::Relaxed);
        self.free.push(id);
        self.live -= 1;
        // Logged once the gauges say so: a reader of the log then sees them agree.
        tracing::info!(peer = %c.peer, worker = self.worker, shape = %c.class, encoding = %c.encoding,
            why = ?c.life.why().unwrap_or(CloseWhy::Peer), log_pos = c.pos, "client disconnected");
    }

    /// Time passed: runs what is due at `now` (housekeeping, a lingering hold's deadline).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now.duration_since(self.last_tick) >= TICK {
            let elapsed = now.duration_since(self.last_tick);
            let load = self.tick_busy.as_secs_f64() / elapsed.as_secs_f64();
            self.lingering = linger_gate(
                self.lingering,
                load,
                self.policy.thin_linger,
                self.policy.thin_linger_load,
            );
            self.tick_busy = Duration::ZERO;
            self.last_tick = now;
            self.housekeeping(now);
        }
        if self.linger_due.is_some_and(|d| d <= now) {
            // A new round re-offers every held client; the due holds are released.
            self.linger_due = None;
            self.round.wanted = true;
        }
    }

    /// The relay is shutting down: every client gets a close frame.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(now);
        for id in 0..self.clients.len() as ClientId {
            self.begin_close(id, CloseWhy::Shutdown, now);
        }
    }

    /// Time the driver spent working (not waiting): pacing and the worker's load.
    pub fn record_busy(&mut self, d: Duration) {
        self.round.busy += d;
        self.tick_busy += d;
    }

    // ---- outputs -----------------------------------------------------------------------

    /// Starts a loop's batch: deferred clients become ready, and a round starts if one is
    /// wanted and pacing allows it.
    pub fn begin_batch(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.deferred) {
            if let Some(c) = self.client_mut(id)
                && c.place == Place::Deferred
            {
                c.place = Place::Ready;
                self.ready.push_back(id);
            }
        }
        if self.round.wanted && self.round_may_start(now) {
            self.start_round(now);
        }
    }

    /// The next operation, or None when no client has anything to do in this batch.
    pub fn poll_op(&mut self, now: Instant) -> Option<Op> {
        if let Some(op) = self.urgent.pop_front() {
            return Some(op);
        }
        while let Some(id) = self.ready.pop_front() {
            if !self.client(id).is_some_and(|c| c.place == Place::Ready) {
                continue; // stale entry
            }
            if let Some(op) = self.serve(id, now) {
                return Some(op);
            }
            if let Some(op) = self.urgent.pop_front() {
                return Some(op);
            }
        }
        None
    }

    /// Whether a client is ready to be served right now (the driver must not block).
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.deferred.is_empty() || !self.urgent.is_empty()
    }

    /// When the driver must call [`Scheduler::handle_timeout`] next at the latest.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.last_tick + TICK;
        if let Some(d) = self.linger_due {
            t = t.min(d);
        }
        if self.round.wanted
            && let Some(d) = self.round.due
        {
            t = t.min(d);
        }
        t
    }

    /// Whether the worker may exit: shutdown began and every client is gone (or the grace
    /// period is over).
    pub fn finished(&self, now: Instant) -> bool {
        self.shutdown_at
            .is_some_and(|t| self.live == 0 || now.duration_since(t) > CLOSE_GRACE)
    }

    /// Clients attached.
    pub fn client_count(&self) -> usize {
        self.live
    }

    // ---- serving -----------------------------------------------------------------------

    /// Decides the next operation for a ready client (or parks it).
    fn serve(&mut self, id: ClientId, now: Instant) -> Option<Op> {
        let hub = self.hub.clone();
        let worker = self.worker;
        let round = self.round.number;
        let c = self.clients[id as usize].as_mut()?;
        sim_trace!(
            "serve {id} {:?} {:?} control {} range {}..{}",
            c.place,
            c.life,
            c.control.queued_bytes(),
            c.pos,
            c.boundary
        );
        if c.at_boundary() {
            // Options change only between frames.
            if let Some(opts) = c.pending_options.take() {
                let next = match switch_point(&hub, c) {
                    Switch::At(next) => next,
                    Switch::Later => {
                        // The writer is mid-append: retry in the next loop.
                        c.pending_options = Some(opts);
                        c.place = Place::Deferred;
                        self.deferred.push(id);
                        return None;
                    }
                    Switch::BehindRetention => {
                        self.begin_close(id, CloseWhy::Retention, now);
                        return self.serve_again(id);
                    }
                };
                if c.route != 0 {
                    if let Source::Filtered(w) = &c.source {
                        self.routes.forget(w.did_hashes.len());
                    }
                    c.route = 0;
                }
                c.caught_up_round = NEVER;
                if !apply_options(&hub, worker, c, opts, next) {
                    self.begin_close(id, CloseWhy::Retention, now);
                    return self.serve_again(id);
                }
            }
            if let Some(bytes) = c.control.next_bytes() {
                let bytes = ControlBytes::new(bytes);
                c.place = Place::InFlight;
                return Some(Op::Control { client: id, bytes });
            }
            match c.life {
                Life::Open => {}
                Life::Closing { why, since } => {
                    // Close frame delivered: FIN, then (briefly) wait for the peer's EOF, so
                    // that our close frame is not destroyed by a reset.
                    c.life = Life::FinSent {
                        why,
                        since,
                        fin_at: now,
                    };
                    c.place = Place::Closed;
                    return Some(Op::Fin { client: id });
                }
                Life::FinSent { .. } | Life::Shut { .. } => {
                    c.place = Place::Closed;
                    return None;
                }
            }
            if c.awaiting_hello {
                c.place = Place::Hello;
                return None;
            }
            if c.caught_up_round == round {
                // Already handed everything this round had; the next round brings the rest.
                self.park_caught_up(id);
                return None;
            }
            // A walker that reached its shape's start switches to the shape's log.
            if !switch_to_shape(worker, c) {
                self.begin_close(id, CloseWhy::Retention, now);
                return self.serve_again(id);
            }
            // Extend the range to what is now available. The frame count is read before the
            // end so the delivered count never runs ahead of the bytes.
            let published = published_frames(&hub, c);
            let appended_us = hub.counters.last_append_us.load(Ordering::Relaxed);
            // Latency counts from the oldest data this round brought (so a round held back by
            // pacing shows in it), or from the newest append when the round brought none.
            let origin_us = match self.round.since_us {
                0 => appended_us,
                since => since.min(appended_us),
            };
            let end = c.stream.end();
            match &mut c.source {
                Source::Contiguous => {
                    if let Some(due) = self.linger_due_for(id, end, origin_us, now) {
                        self.linger_due = Some(self.linger_due.map_or(due, |d| d.min(due)));
                        return None;
                    }
                    let c = self.clients[id as usize].as_mut()?;
                    c.boundary = end;
                    c.caught_up_round = round;
                    c.range.pending_events += published.saturating_sub(c.range.ordinal);
                    c.range.ordinal = c.range.ordinal.max(published);
                }
                Source::Filtered(w) => {
                    let stop_at = c.shape.as_ref().map(|s| s.start_seq());
                    let walked_from = w.next.seq;
                    match w.step(&hub, stop_at, &mut self.walk_scratch) {
                        Step::BehindRetention => {
                            self.begin_close(id, CloseWhy::Retention, now);
                            return self.serve_again(id);
                        }
                        Step::Run { from, to, events } => {
                            c.pos = from;
                            c.boundary = to;
                            c.range.pending_events += events;
                        }
                        Step::Nothing => {}
                    }
                    let indexed = hub.appended_seq();
                    if w.next.seq >= indexed {
                        c.caught_up_round = round;
                    } else if c.pos == c.boundary && w.next.seq > walked_from {
                        // Budget used up (or the shape's start reached) without a match:
                        // continue in the next loop.
                        c.place = Place::Deferred;
                        self.deferred.push(id);
                        return None;
                    }
                    // (No progress — retention overtook the walk — waits for the kick.)
                }
            }
            let c = self.clients[id as usize].as_mut()?;
            if c.at_boundary() {
                self.park_caught_up(id);
                return None;
            }
            c.range.origin_us = origin_us;
            // A lingering range counts from when its oldest bytes were first held back.
            if let Some(origin) = std::mem::replace(&mut c.linger, Linger::Off).origin_us() {
                c.range.origin_us = c.range.origin_us.min(origin);
                Counters::add(&hub.counters.lingered_sends, 1);
            }
        }
        let c = self.clients[id as usize].as_mut()?;
        c.place = Place::InFlight;
        Some(Op::Data {
            client: id,
            stream: c.stream.clone(),
            from: c.pos,
            to: c.boundary,
        })
    }

    /// After a close was decided in the middle of a serve: the client goes back to the ready
    /// queue so that its close frame is served.
    fn serve_again(&mut self, id: ClientId) -> Option<Op> {
        if let Some(c) = self.client_mut(id)
            && c.place == Place::Ready
        {
            self.ready.push_back(id);
        }
        None
    }

    /// Whether a thin stream's send should wait for more bytes, and until when: if so the
    /// client joins (or stays in) its stream's hold. Only a caught-up client of a thin stream
    /// lingers: the plain full stream is paced by rounds alone, and a client that is behind
    /// has plenty to send; a client whose hold was just released goes at once.
    fn linger_due_for(
        &mut self,
        id: ClientId,
        end: u64,
        origin_us: u64,
        now: Instant,
    ) -> Option<Instant> {
        let wait = self.linger()?;
        let c = self.clients[id as usize].as_mut()?;
        // The full streams (v1 JSON, v2 JSON) are paced by rounds alone; only thin ones linger.
        let full = [Encoding::V1Json, Encoding::V2Json]
            .iter()
            .any(|&e| Arc::ptr_eq(&c.stream, self.hub.base(e)));
        if full || matches!(c.linger, Linger::Released { .. }) {
            return None;
        }
        let pending = end.saturating_sub(c.pos);
        if pending == 0 || pending >= THIN_SEND_BYTES {
            return None;
        }
        let hold = self.holds.join(&c.stream, c.pos, now);
        let due = hold.since + wait;
        if !linger_holds(end.saturating_sub(hold.low), due, now) {
            // Due: this client goes now; the round the deadline starts releases the others.
            return None;
        }
        hold.members.push(id);
        c.place = Place::Held(hold.id);
        c.linger = Linger::Holding {
            origin_us: c.linger.origin_us().unwrap_or(origin_us),
        };
        Some(due)
    }

    /// Parks a client with nothing to send: a DID-filtered walker on its DIDs (registering
    /// them the first time), so that only an event with one of them wakes it; anyone else
    /// until the next round. A walker parks on its DIDs only if every event from its position
    /// on is still to be routed (`route_cursor` is not past it), else an event could slip by.
    fn park_caught_up(&mut self, id: ClientId) {
        let route_cursor = self.route_cursor;
        let Some(c) = self.clients[id as usize].as_mut() else {
            return;
        };
        if let Source::Filtered(w) = &c.source
            && c.shape.is_none()
            && !w.did_hashes.is_empty()
            && c.at_boundary()
            && w.next.seq >= route_cursor.seq
        {
            if c.route == 0 {
                c.route = self.routes.register(id, &w.did_hashes);
            }
            c.place = Place::Routed;
            return;
        }
        c.place = Place::Idle;
        self.idle.push(id);
    }

    /// Takes a client out of the DID routes (it leaves or changes its filter): its entries go
    /// stale.
    fn unroute(&mut self, c: &mut Client) {
        if c.route != 0 {
            if let Source::Filtered(w) = &c.source {
                self.routes.forget(w.did_hashes.len());
            }
            c.route = 0;
        }
    }

    // ---- rounds ------------------------------------------------------------------------

    /// Pacing under load. A round of live sends costs the worker `busy`; the next round may
    /// start once that is at most `duty` of the time since the last one started. A lightly
    /// loaded worker starts each round as soon as data lands; a busy one waits a little, so
    /// each send carries several events and the CPU per byte falls. Clients that are behind
    /// are not paced: they are ready and are served every loop.
    fn round_may_start(&mut self, now: Instant) -> bool {
        let at = next_round_at(self.round.started, self.round.busy, self.policy.duty);
        if now >= at {
            self.round.due = None;
            return true;
        }
        self.round.held = true;
        self.round.due = Some(at);
        false
    }

    /// Starts a round: every client it brings something gets served.
    fn start_round(&mut self, now: Instant) {
        let r = &mut self.round;
        r.wanted = false;
        r.number += 1;
        Counters::add(&self.hub.counters.rounds, 1);
        if std::mem::take(&mut r.held) {
            Counters::add(&self.hub.counters.rounds_held, 1);
        }
        r.started = now;
        r.busy = Duration::ZERO;
        r.since_us = std::mem::take(&mut r.pending_since_us);
        // Only clients the round brings something are served: a filtered client whose shape
        // got nothing new stays parked, and a lingering one stays in its hold until the hold
        // is due (serving every parked client each round was a tenth of a worker's CPU with
        // 1,000 filtered clients at 500 ev/s).
        let mut offer = std::mem::take(&mut self.idle);
        self.route_new_events(&mut offer);
        // The members of due holds are offered work with the idle clients. The earliest hold
        // that keeps waiting sets the deadline, as nothing else may start a round once the
        // feed pauses.
        let (released, next_due) = self.holds.take_due(self.linger(), now);
        Counters::add(&self.hub.counters.linger_releases, released.len() as u64);
        for hold in released {
            for slot in hold.members {
                if let Some(c) = self.client_mut(slot)
                    && c.place == Place::Held(hold.id)
                {
                    c.place = Place::Idle;
                    c.linger = Linger::Released {
                        origin_us: c.linger.origin_us().unwrap_or(0),
                    };
                    offer.push(slot);
                }
            }
        }
        for wait in self.waits.take_grown() {
            for slot in wait.members {
                if let Some(c) = self.client_mut(slot)
                    && c.place == Place::Waiting(wait.id)
                {
                    c.place = Place::Idle;
                    offer.push(slot);
                }
            }
        }
        for id in offer {
            let Some(c) = self.clients.get_mut(id as usize).and_then(|c| c.as_mut()) else {
                continue;
            };
            if c.place != Place::Idle {
                continue; // listed twice, or it moved since
            }
            let caught_up = matches!(c.source, Source::Contiguous)
                && c.at_boundary()
                && c.stream.end() <= c.pos;
            if !caught_up {
                c.place = Place::Ready;
                self.ready.push_back(id);
            } else {
                // Caught up with its log: rounds skip it until the log grows.
                let wait = self.waits.join(&c.stream, c.pos, now);
                wait.members.push(id);
                c.place = Place::Waiting(wait.id);
            }
        }
        self.linger_due = next_due;
    }

    /// Looks up every event appended since the last round in the DID routes and offers the
    /// parked clients that want one of them, each moved straight to its first such event:
    /// every event it skips was routed while it was parked, so none of them is for it.
    fn route_new_events(&mut self, offer: &mut Vec<ClientId>) {
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
            for (slot, c) in self.clients.iter_mut().enumerate() {
                if let Some(c) = c.as_mut().filter(|c| c.place == Place::Routed) {
                    c.place = Place::Idle;
                    offer.push(slot as ClientId);
                }
            }
            from = start;
        }
        let (routes, clients) = (&self.routes, &mut self.clients);
        let mut wakes = 0;
        index.walk(from, usize::MAX, |pos, e| {
            for r in routes.hits(e.did_hash) {
                let Some(c) = clients.get_mut(r.slot as usize).and_then(|c| c.as_mut()) else {
                    continue;
                };
                if c.route != r.token || c.place != Place::Routed {
                    continue;
                }
                c.place = Place::Idle;
                wakes += 1;
                if let Source::Filtered(w) = &mut c.source
                    && w.next.seq < pos.seq
                {
                    w.next = pos;
                }
                offer.push(r.slot);
            }
            true
        });
        self.route_cursor = end;
        Counters::add(&self.hub.counters.did_wakes, wakes);
    }

    /// Thin streams (filtered or compressed) carry a fraction of the feed's bytes, so at a
    /// send per round their sends are small, and a send costs nearly the same whatever its
    /// size. Under load, a thin stream's send therefore waits until it carries
    /// [`THIN_SEND_BYTES`] or its oldest byte has waited `thin_linger`: a filtered or
    /// compressed byte then costs about what a full-stream byte costs. Without load nothing
    /// lingers, so a lightly loaded relay keeps every client's latency at the minimum.
    fn linger(&self) -> Option<Duration> {
        self.lingering.then_some(self.policy.thin_linger)
    }

    // ---- closing -----------------------------------------------------------------------

    /// Closes the client with the code and reason that go with `why`.
    fn begin_close(&mut self, id: ClientId, why: CloseWhy, now: Instant) {
        let (code, reason) = match why {
            CloseWhy::Retention => (1008, "fell behind retention: reconnect with a newer cursor"),
            CloseWhy::Dead => (1001, "no pong"),
            CloseWhy::Shutdown => (1001, "relay shutting down"),
            CloseWhy::Protocol => (1002, "protocol error"),
            CloseWhy::Peer => (1000, ""),
        };
        self.close_with(id, code, reason, why, now);
    }

    /// Queues a close frame (sent at the next frame boundary) and marks the client closing.
    fn close_with(&mut self, id: ClientId, code: u16, reason: &str, why: CloseWhy, now: Instant) {
        let counters = &self.hub.counters;
        let Some(c) = open_mut(&mut self.clients, id) else {
            return;
        };
        if c.life != Life::Open {
            return;
        }
        c.life = Life::Closing { why, since: now };
        match why {
            CloseWhy::Retention => Counters::add(&counters.kicked_retention, 1),
            CloseWhy::Dead => Counters::add(&counters.kicked_dead, 1),
            CloseWhy::Protocol => Counters::add(&counters.kicked_protocol, 1),
            _ => {}
        }
        tracing::info!(peer = %c.peer, ?why, code, reason, "closing client");
        sim_trace!("close {id} {why:?} {code} {reason}");
        c.control.close(code, reason);
        self.make_ready(id);
    }

    /// A limit or the protocol was violated: close with `code` and stop reading its input.
    fn violation(&mut self, id: ClientId, code: u16, reason: &str, now: Instant) {
        self.close_with(id, code, reason, CloseWhy::Protocol, now);
        if let Some(c) = self.client_mut(id)
            && !c.inbound.stopped
        {
            c.inbound.stopped = true;
            self.urgent.push_back(Op::StopReading { client: id });
        }
    }

    /// Shuts the client's socket: everything in flight is cancelled; the slot is freed when
    /// the driver reports it released.
    fn shut(&mut self, id: ClientId, why: CloseWhy, now: Instant) {
        let Some(c) = self.client_mut(id) else {
            return;
        };
        if matches!(c.life, Life::Shut { .. }) {
            return;
        }
        if c.life == Life::Open {
            // Counted like any close, without a close frame (the peer is gone).
            self.close_with(id, 1000, "", why, now);
        }
        let Some(c) = self.client_mut(id) else {
            return;
        };
        let why = c.life.why().unwrap_or(why);
        c.life = Life::Shut { why };
        c.place = Place::Closed;
        self.urgent.push_back(Op::Shut { client: id });
    }

    // ---- input -------------------------------------------------------------------------

    /// One complete message from the client.
    fn on_message(&mut self, id: ClientId, m: InboundMessage, now: Instant) {
        let budget = self.hub.filter_budget.clone();
        let Some(c) = self.open_client(id) else {
            return;
        };
        let open = c.life == Life::Open;
        match m {
            InboundMessage::Ping(_) if !open => {}
            InboundMessage::Ping(payload) => {
                if c.control.pong(&payload) {
                    self.make_ready(id);
                } else {
                    self.violation(id, 1008, "ping flood: pongs owed beyond 4 KiB", now);
                }
            }
            // The v2 wire is server-push only: any data frame ends the connection.
            InboundMessage::Text(_) | InboundMessage::Binary(_) if c.encoding.v2() => {
                if open {
                    self.violation(
                        id,
                        crate::wire::CLIENT_DATA_CLOSE_CODE,
                        crate::wire::CLIENT_DATA_CLOSE_REASON,
                        now,
                    );
                }
            }
            InboundMessage::Pong(_) | InboundMessage::Binary(_) => {}
            InboundMessage::Close { .. } => {
                if open {
                    c.life = Life::Closing {
                        why: CloseWhy::Peer,
                        since: now,
                    };
                    c.control.close(1000, "");
                    self.make_ready(id);
                }
            }
            InboundMessage::Text(_) if !open => {}
            InboundMessage::Text(text) => {
                // Each update re-parses up to 1 MiB and re-registers filters: a client that
                // changes its mind faster than the rate is a load generator.
                if c.inbound.update_tokens < 1.0 {
                    self.violation(id, 1008, "options_update rate exceeded", now);
                    return;
                }
                c.inbound.update_tokens -= 1.0;
                match crate::subscription::parse_options_update(&text) {
                    // The new filters are charged before they are kept (the old charge goes).
                    Ok(opts) => match budget.reserve(&opts, c.peer.ip()) {
                        Ok(reservation) => {
                            c.filter_reservation = reservation;
                            c.pending_options = Some(opts);
                            self.make_ready(id);
                        }
                        Err(full) => {
                            let reason = match full {
                                crate::filter_budget::BudgetFull::Total { .. } => {
                                    "server busy: filter memory budget full"
                                }
                                crate::filter_budget::BudgetFull::Address { .. } => {
                                    "too much filter state from your address"
                                }
                            };
                            // A limit: its further input is not decoded.
                            self.violation(id, 1008, reason, now);
                        }
                    },
                    Err(e) => {
                        let reason = e.to_string();
                        self.close_with(id, 1000, &reason, CloseWhy::Protocol, now);
                    }
                }
            }
        }
    }

    // ---- housekeeping ------------------------------------------------------------------

    /// Once a tick: pings, dead peers, retention kicks, rate limits, close deadlines, low
    /// marks.
    fn housekeeping(&mut self, now: Instant) {
        let mut lows: Vec<(Arc<Stream>, u64)> = Vec::new();
        let (max_inbound_rate, max_lag, ping_interval) = (
            self.policy.max_inbound_rate,
            self.policy.max_lag,
            self.policy.ping_interval,
        );
        let update_burst = self.policy.options_update_burst();
        let update_refill = self.policy.options_update_rate * TICK.as_secs_f64();
        for id in 0..self.clients.len() as ClientId {
            let route_cursor = self.route_cursor;
            let Some(c) = self.clients[id as usize].as_mut() else {
                continue;
            };
            // A client parked on its DIDs was not woken by any event routed since it parked:
            // none of them is for it, so its walk is at the routing cursor (its retention and
            // lag checks, and the low mark, must not see a stale position).
            if c.place == Place::Routed
                && let Source::Filtered(w) = &mut c.source
                && w.next.seq < route_cursor.seq
            {
                w.next = route_cursor;
            }
            c.inbound.update_tokens = (c.inbound.update_tokens + update_refill).min(update_burst);
            let rx = std::mem::take(&mut c.inbound.rx_bytes);
            match c.life {
                Life::Shut { .. } => continue,
                Life::Closing { since, .. } => {
                    if now.duration_since(since) > CLOSE_GRACE {
                        self.shut(id, CloseWhy::Peer, now);
                        continue;
                    }
                }
                Life::FinSent { since, fin_at, .. } => {
                    if now.duration_since(fin_at) > FIN_GRACE
                        || now.duration_since(since) > CLOSE_GRACE
                    {
                        self.shut(id, CloseWhy::Peer, now);
                        continue;
                    }
                }
                Life::Open => {
                    if c.low_mark() < c.stream.kick_below() {
                        self.begin_close(id, CloseWhy::Retention, now);
                    } else if rx > max_inbound_rate {
                        self.violation(id, 1008, "inbound rate exceeded", now);
                    } else if let Some(max) = max_lag
                        && lag_of(&self.hub, c, now_wall_us()).is_some_and(|lag| lag > max)
                    {
                        self.close_with(id, 1008, "too far behind live", CloseWhy::Retention, now);
                    } else if now.duration_since(c.inbound.last_rx) > ping_interval {
                        // Dead: no answer for two periods, and its socket took nothing
                        // for one (a slow reader whose window moves is alive).
                        if c.inbound.ping_outstanding
                            && now.duration_since(c.inbound.last_rx) > ping_interval * 2
                            && now.duration_since(c.inbound.last_tx) > ping_interval
                        {
                            self.begin_close(id, CloseWhy::Dead, now);
                            self.shut(id, CloseWhy::Dead, now);
                            continue;
                        }
                        if !c.inbound.ping_outstanding {
                            c.inbound.ping_outstanding = true;
                            c.control.ping();
                            self.make_ready(id);
                        }
                    }
                }
            }
            if let Some(c) = self.client(id) {
                let m = c.low_mark();
                match lows.iter_mut().find(|(st, _)| Arc::ptr_eq(st, &c.stream)) {
                    Some((_, low)) => *low = (*low).min(m),
                    None => lows.push((c.stream.clone(), m)),
                }
            }
        }
        // The v2 slow-consumer rule, for the open v2 clients.
        for id in 0..self.clients.len() as ClientId {
            if self
                .client(id)
                .is_some_and(|c| c.encoding.v2() && c.life == Life::Open)
            {
                self.too_slow(id, now);
            }
        }
        // Streams with no reader here any more get NONE, so retention is not held back. That
        // includes every stream a client registered on and left between two ticks without
        // being seen here (a walker that switched onto its shape, an options_update): the base
        // logs and the live shapes are always checked, not only last tick's streams.
        let mut candidates = std::mem::take(&mut self.known_streams);
        candidates.extend(self.hub.bases().iter().cloned());
        candidates.extend(
            self.hub
                .shapes
                .active()
                .into_iter()
                .map(|s| s.stream.clone()),
        );
        for st in &candidates {
            if !lows.iter().any(|(s2, _)| Arc::ptr_eq(s2, st)) {
                st.set_worker_low(self.worker, NONE);
            }
        }
        for (st, low) in &lows {
            st.set_worker_low(self.worker, *low);
        }
        self.known_streams = lows.into_iter().map(|(st, _)| st).collect();
        let clients = &self.clients;
        let client = |slot: u32| clients.get(slot as usize).and_then(|c| c.as_ref());
        self.routes
            .compact(|r| client(r.slot).is_some_and(|c| c.route == r.token));
        self.waits
            .prune(|slot, id| client(slot).is_some_and(|c| c.place == Place::Waiting(id)));
        self.holds
            .prune(|slot, id| client(slot).is_some_and(|c| c.place == Place::Held(id)));
    }

    /// The v2 slow-consumer rule: a client more than [`SLOW_CONSUMER_LAG`] events behind the
    /// tip that advanced less than [`SLOW_CONSUMER_MIN_RATE`] events a second over
    /// [`SLOW_CONSUMER_WINDOW`] gets the official `ConsumerTooSlow` error frame and is closed.
    /// Returns whether it was. Checked once a tick, only for clients that are behind at all.
    fn too_slow(&mut self, id: ClientId, now: Instant) -> bool {
        let hub = self.hub.clone();
        let Some(c) = self.clients[id as usize].as_mut() else {
            return false;
        };
        if c.pos >= c.stream.end() {
            c.far_behind_since = None;
            return false;
        }
        let Some(at) = position_of(&hub, c) else {
            return false;
        };
        let lag = hub.appended_seq().saturating_sub(at);
        if !slow_consumer(lag, at, now, &mut c.far_behind_since) {
            return false;
        }
        let mut json = Vec::new();
        crate::wire::consumer_too_slow_frame(lag, hub.seq_of(at), &mut json);
        let frame = match own_frame(c.encoding, &json) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "could not build ConsumerTooSlow");
                Vec::new()
            }
        };
        tracing::info!(peer = %c.peer, lag, "closing a v2 consumer that does not keep up");
        c.life = Life::Closing {
            why: CloseWhy::Retention,
            since: now,
        };
        Counters::add(&hub.counters.kicked_retention, 1);
        c.control.error_then_close(frame, 1008, "consumer too slow");
        self.make_ready(id);
        true
    }

    // ---- helpers -----------------------------------------------------------------------

    fn client(&self, id: ClientId) -> Option<&Client> {
        self.clients.get(id as usize).and_then(|c| c.as_ref())
    }

    fn client_mut(&mut self, id: ClientId) -> Option<&mut Client> {
        self.clients.get_mut(id as usize).and_then(|c| c.as_mut())
    }

    /// The client, unless it is shut (a shut client's completions are only cancellations).
    fn open_client(&mut self, id: ClientId) -> Option<&mut Client> {
        open_mut(&mut self.clients, id)
    }

    /// Moves a client that is waiting somewhere to the ready queue. A client already ready, in
    /// flight or blocked is served when that ends.
    fn make_ready(&mut self, id: ClientId) {
        let Some(c) = self.client_mut(id) else {
            return;
        };
        match c.place {
            Place::Idle | Place::Waiting(_) | Place::Held(_) | Place::Routed | Place::Hello => {
                c.place = Place::Ready;
                self.ready.push_back(id);
            }
            Place::Ready | Place::InFlight | Place::Deferred | Place::Blocked | Place::Closed => {}
        }
    }

    /// The client's operation completed: it is served again.
    fn op_done(&mut self, id: ClientId) {
        if let Some(c) = self.client_mut(id) {
            debug_assert_eq!(
                c.place,
                Place::InFlight,
                "a completion without an operation"
            );
            c.place = Place::Ready;
            self.ready.push_back(id);
        }
    }
}

/// The client in slot `id` unless it is shut (borrowing only the client table).
fn open_mut(clients: &mut [Option<Client>], id: ClientId) -> Option<&mut Client> {
    clients
        .get_mut(id as usize)
        .and_then(|c| c.as_mut())
        .filter(|c| !matches!(c.life, Life::Shut { .. }))
}

/// The slow-consumer rule on one client's figures: `lag` events behind the tip at event
/// position `at`; `state` remembers since when it has been far behind and where it was then.
/// True when it must go: far behind for a whole window without advancing at the minimum rate.
fn slow_consumer(lag: u64, at: u64, now: Instant, state: &mut Option<(Instant, u64)>) -> bool {
    if lag <= SLOW_CONSUMER_LAG {
        *state = None;
        return false;
    }
    let Some((since, from)) = *state else {
        *state = Some((now, at));
        return false;
    };
    let elapsed = now.duration_since(since);
    if elapsed < SLOW_CONSUMER_WINDOW {
        return false;
    }
    if at.saturating_sub(from) >= SLOW_CONSUMER_MIN_RATE * elapsed.as_secs() {
        // Progressing: measure the next window from here.
        *state = Some((now, at));
        return false;
    }
    true
}

/// The event position a client is at (chunk granularity on a base log), if known. Takes the
/// index and a shape's table one after the other, never together.
fn position_of(hub: &Hub, c: &Client) -> Option<u64> {
    Some(match (&c.source, &c.shape) {
        (Source::Filtered(w), _) => w.next.seq,
        (Source::Contiguous, Some(shape)) => {
            let next_seq = hub.index().next_seq();
            shape.table.read().seq_at_offset(c.pos, next_seq)
        }
        (Source::Contiguous, None) => hub.index().seq_at_or_before_offset(c.pos, c.encoding)?,
    })
}

/// A frame the relay composes for one v2 client (`#info`, an error): a text frame, or on a
/// compressed connection a binary frame compressed with the v2 dictionary, like its events.
pub fn own_frame(encoding: Encoding, json: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(json.len() + 16);
    if encoding.compressed() {
        let mut c =
            crate::compress::EventCompressor::with_dictionary(crate::compress::Dictionary::V2)?;
        let mut packed = Vec::new();
        c.compress(json, &mut packed)?;
        crate::frame::encode_server_frame(crate::frame::Opcode::Binary, &packed, &mut frame);
    } else {
        crate::frame::encode_server_frame(crate::frame::Opcode::Text, json, &mut frame);
    }
    Ok(frame)
}

/// Wall clock in µs (only for the lag estimate, which compares with append times).
fn now_wall_us() -> u64 {
    crate::index::now_us().max(0) as u64
}

/// How far behind live a client is: the age of the oldest event it has not been sent yet
/// (chunk granularity), or None when it is caught up. Takes the index and a shape's table one
/// after the other, never together.
fn lag_of(hub: &Hub, c: &Client, wall_us: u64) -> Option<Duration> {
    if c.pos >= c.stream.end() {
        return None;
    }
    let seq = position_of(hub, c)?;
    let appended = hub.index().appended_at_of(seq)?;
    let age = wall_us.saturating_sub(appended.max(0) as u64);
    Some(Duration::from_micros(age))
}

#[cfg(test)]
impl Scheduler {
    /// Checks every invariant of the scheduler's bookkeeping; panics naming the first broken
    /// one. The simulation calls it after every step.
    pub fn check_invariants(&self, now: Instant) {
        use std::collections::HashMap;
        let count = |list: &mut dyn Iterator<Item = ClientId>| {
            let mut m: HashMap<ClientId, usize> = HashMap::new();
            for id in list {
                *m.entry(id).or_default() += 1;
            }
            m
        };
        let ready = count(&mut self.ready.iter().copied());
        let deferred = count(&mut self.deferred.iter().copied());
        let idle = count(&mut self.idle.iter().copied());
        for (id, c) in self.clients.iter().enumerate() {
            let Some(c) = c else { continue };
            let id = id as ClientId;
            let n = |m: &HashMap<ClientId, usize>| m.get(&id).copied().unwrap_or(0);
            match c.place {
                Place::Ready => assert!(n(&ready) >= 1, "client {id} Ready but not queued"),
                Place::Deferred => {
                    assert!(n(&deferred) >= 1, "client {id} Deferred but not listed")
                }
                Place::Idle => assert!(n(&idle) >= 1, "client {id} Idle but not in the idle list"),
                Place::Waiting(g) => assert!(
                    self.waits
                        .iter()
                        .any(|w| w.id == g && w.members.contains(&id)),
                    "client {id} waits in a group that does not list it"
                ),
                Place::Held(g) => assert!(
                    self.holds
                        .iter()
                        .any(|h| h.id == g && h.members.contains(&id)),
                    "client {id} held in a hold that does not list it"
                ),
                Place::Routed => assert!(c.route != 0, "client {id} routed without a registration"),
                _ => {}
            }
            if c.place == Place::Ready {
                // Several entries are allowed only if the older ones are stale: one ready
                // entry per readiness.
                assert!(n(&ready) <= 2, "client {id} queued {} times", n(&ready));
            }
            if matches!(c.life, Life::Shut { .. }) {
                assert_eq!(c.place, Place::Closed, "client {id} shut but placed");
            }
            assert!(c.pos <= c.boundary, "client {id}: position past its range");
            assert!(
                c.boundary <= c.stream.end(),
                "client {id}: range beyond the published end"
            );
            assert!(
                c.control.queued_bytes() <= super::client::CONTROL_OWED_CAP + MAX_CONTROL_FRAME,
                "client {id}: {} control bytes queued",
                c.control.queued_bytes()
            );
        }
        if let Some(due) = self.round.due {
            assert!(
                due <= self.round.started + self.round.busy + super::groups::MAX_PACE_DELAY,
                "a round held past the pacing bound"
            );
        }
        if let Some(wait) = self.linger() {
            for h in self.holds.iter() {
                // A hold's deadline must be covered by the timer (or already being released).
                let deadline = h.since + wait;
                assert!(
                    self.linger_due.is_some_and(|d| d <= deadline)
                        || deadline <= now
                        || self.round.wanted,
                    "a hold whose deadline no timer covers"
                );
            }
        }
    }

    /// The client in a slot (for the simulation's checks).
    pub fn client_for_test(&self, id: ClientId) -> Option<&Client> {
        self.client(id)
    }

    /// Filter-budget bytes its clients hold (for the simulation's accounting check).
    pub fn filter_bytes_held_for_test(&self) -> u64 {
        self.clients
            .iter()
            .flatten()
            .map(|c| c.filter_reservation.bytes())
            .sum()
    }

    /// The routing cursor.
    pub fn route_cursor_for_test(&self) -> EventPos {
        self.route_cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_far_behind_reader_that_stops_progressing_is_too_slow() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let far = SLOW_CONSUMER_LAG + 1;
        // Close to the tip: never, however slow.
        let mut state = None;
        assert!(!slow_consumer(SLOW_CONSUMER_LAG, 0, s(0), &mut state));
        assert!(!slow_consumer(SLOW_CONSUMER_LAG, 0, s(600), &mut state));
        assert_eq!(state, None);
        // Far behind but advancing at the minimum rate: never dropped.
        let mut state = None;
        let rate = SLOW_CONSUMER_MIN_RATE;
        for t in 0..600 {
            assert!(!slow_consumer(far, t * rate, s(t), &mut state), "at {t}s");
        }
        // Far behind and stalled: dropped once a whole window has passed, not before.
        let mut state = None;
        assert!(!slow_consumer(far, 1000, s(0), &mut state));
        assert!(!slow_consumer(far, 1000 + 10, s(59), &mut state));
        assert!(slow_consumer(far, 1000 + 10, s(60), &mut state));
        // Catching up below the lag resets it.
        let mut state = Some((s(0), 0));
        assert!(!slow_consumer(SLOW_CONSUMER_LAG, 0, s(120), &mut state));
        assert_eq!(state, None);
    }
}
