//! The driver: carries out the scheduler's operations on a [`Kernel`] and feeds what the
//! kernel reports back to the scheduler.
//!
//! It owns everything that is in flight, each piece with exactly one owner:
//! - a client's socket and its one data or control transfer ([`Transfer`]): a ring send, a
//!   control frame's bytes, a linked splice pair and the pooled pipe it uses, bytes left in
//!   that pipe after a short send, or a wait for a free pipe;
//! - the tail-ring pins: a stream is pinned from the first ring send built on it until the
//!   completion of the last one is reaped (not merely until `io_uring_enter` returns: a send
//!   the kernel has not run yet still reads the ring);
//! - the pipe pool (a client costs one descriptor, its socket).
//!
//! A linked splice pair is always pushed into one submission (room for both is made first):
//! split across two, the kernel would run the halves independently.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::scheduler::{Attach, ClientId, ControlBytes, Op, Scheduler};
use super::waker::Waker;
use crate::hub::{Counters, Hub};
use crate::log::Stream;

/// Pipes per worker for the splice path (2 fds each). Why 32: catch-up clients take turns on
/// them; enough to keep the page cache → socket path busy without costing fds per client.
pub const PIPES_PER_WORKER: usize = 32;
/// Pipe capacity: one splice moves at most this much.
pub const PIPE_BYTES: usize = 256 * 1024;
/// Why 256 KiB: a far-behind client gets large batches (few operations per MB) while one
/// send never monopolizes a socket buffer's worth of the ring.
pub const MAX_SEND: usize = 256 * 1024;
/// Most client operations issued per loop. Why 64: the kernel runs a submission's sends one
/// after another (~4 µs each here), and each client's range is fixed when its operation is
/// built; in chunks of 64, data appended while a round sweeps through the clients reaches the
/// clients later in the sweep at once, instead of waiting a whole round. One
/// `io_uring_enter` per 64 sends keeps the syscall cost per send negligible.
pub const SWEEP_CHUNK: usize = 64;
/// Inbound bytes read per `recv` (the driver's scratch buffer).
pub const RECV_CHUNK: usize = 16 * 1024;

// user_data layout: [slot: 32 | generation: 24 | op: 8]; the wake-up read has its own value.
const OP_RING_SEND: u64 = 1;
const OP_CONTROL_SEND: u64 = 2;
const OP_SPLICE_IN: u64 = 3;
const OP_SPLICE_OUT: u64 = 4;
const OP_RESIDUE_OUT: u64 = 5;
const OP_POLLOUT: u64 = 6;
const OP_POLLIN: u64 = 7;
const OP_CANCEL: u64 = 8;
/// user_data of the wake-up eventfd read.
pub const WAKE: u64 = u64::MAX;

fn user_data(slot: ClientId, generation: u32, op: u64) -> u64 {
    ((slot as u64) << 32) | (((generation & 0xFF_FFFF) as u64) << 8) | op
}

/// One operation for the kernel (one io_uring SQE).
pub enum Entry<'a, S, P> {
    /// A non-blocking send of `len` bytes at `ptr` (ring bytes pinned, or control bytes the
    /// driver owns until the completion).
    Send {
        sock: &'a S,
        ptr: *const u8,
        len: u32,
    },
    /// Log file → pipe, linked to the [`Entry::SpliceOut`] pushed right after it: that one
    /// runs only if this one moved all `len` bytes.
    SpliceIn {
        file: &'a Stream,
        off: u64,
        pipe: &'a P,
        len: u32,
    },
    /// Pipe → socket (non-blocking).
    SpliceOut { pipe: &'a P, sock: &'a S, len: u32 },
    /// Completes once the socket is writable.
    PollOut { sock: &'a S },
    /// Multishot: completes each time the socket is readable (or hung up).
    PollIn { sock: &'a S },
    /// Cancels every operation on the socket.
    Cancel { sock: &'a S },
    /// Reads the worker's wake-up eventfd.
    ReadWake,
}

/// One completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The entry's user data.
    pub user_data: u64,
    /// Its result (bytes, or a negated errno).
    pub result: i32,
    /// A multishot entry that stays armed.
    pub more: bool,
}

/// What the driver needs from the kernel: io_uring for real (`uring.rs`), a simulation in
/// tests (`sim.rs`).
pub trait Kernel {
    /// A client's connected socket.
    type Socket;
    /// One pooled pipe.
    type Pipe;
    /// Monotonic time.
    fn now(&self) -> Instant;
    /// Wall clock, µs since the epoch (latency metrics compare it with append times).
    fn wall_us(&self) -> u64;
    /// Free submission queue entries.
    fn sq_room(&mut self) -> usize;
    /// Queues one entry. Panics if the submission queue is full: the driver makes room first
    /// ([`Kernel::sq_room`]), so both halves of a linked pair go into one submission.
    ///
    /// # Safety
    /// Every pointer in `entry` (a send's bytes, the wake-up buffer) must stay valid, and the
    /// socket, pipe and file it names open, until the entry's completion has been reaped.
    unsafe fn push(&mut self, entry: Entry<'_, Self::Socket, Self::Pipe>, user_data: u64);
    /// Submits what is queued; with `wait`, also waits for a completion until that deadline.
    fn submit(&mut self, wait: Option<Instant>) -> io::Result<()>;
    /// Whether completions are waiting to be reaped.
    fn has_completions(&mut self) -> bool;
    /// Moves every available completion into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Reads available bytes from a socket without blocking (`Ok(0)`: the peer closed).
    fn recv(&mut self, sock: &Self::Socket, buf: &mut [u8]) -> io::Result<usize>;
    /// `shutdown(2)`.
    fn shutdown(&mut self, sock: &Self::Socket, how: rustix::net::Shutdown);
    /// A new, empty pipe.
    fn new_pipe(&mut self) -> io::Result<Self::Pipe>;
}

/// A client's one data or control transfer.
enum Transfer {
    /// Nothing in flight and nothing parked in a pipe.
    Idle,
    /// A send from `stream`'s tail ring (the stream is pinned for it).
    Ring { stream: Arc<Stream> },
    /// A control frame; its bytes live here (never read) until the completion.
    Control { _bytes: Box<ControlBytes> },
    /// A linked splice pair through pipe `pipe`; each half's result as it arrives.
    Splice {
        pipe: usize,
        filled: Option<i32>,
        drained: Option<i32>,
    },
    /// `fill` bytes left in pipe `pipe` after a short send: they go before anything else.
    Residue { pipe: usize, fill: u32 },
    /// A send of the residue in flight.
    ResidueOut { pipe: usize, fill: u32 },
    /// Waiting for a free pipe to splice `[from, to)` of `stream`.
    PipeWait {
        stream: Arc<Stream>,
        from: u64,
        to: u64,
    },
}

/// A client's connection, as the driver holds it.
struct Conn<S> {
    /// The socket (closed when the connection is dropped).
    sock: S,
    /// Distinguishes this connection's completions from an earlier occupant's of the slot.
    generation: u32,
    /// Its data or control transfer.
    transfer: Transfer,
    /// Entries in flight for this socket (it may only be closed at 0).
    inflight: u32,
    /// Whether its input is read, and whether it is shut.
    state: ConnState,
}

/// A connection's state in the driver (one enum: a shut connection is never read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Open; its input is read.
    Reading,
    /// Open, but its input is no longer read: it violated a limit and is being closed.
    Deaf,
    /// Shut down: everything in flight is being cancelled.
    Shut,
}

/// The ring pin of one stream.
struct Pin {
    /// The pinned stream.
    stream: Arc<Stream>,
    /// Lowest offset ring sends may start at while this pin is held.
    low: u64,
    /// Ring sends in flight on it (the pin is released at 0).
    sends: u32,
}

/// One worker's driver.
pub struct Driver<K: Kernel> {
    /// The kernel.
    kernel: K,
    /// The decisions.
    sched: Scheduler,
    /// Shared state (counters; the shutdown flag).
    hub: Arc<Hub>,
    /// The worker's wake-up (its client count is kept here).
    waker: Arc<Waker>,
    /// Worker index.
    worker: usize,
    /// Connections by the scheduler's slot.
    conns: Vec<Option<Conn<K::Socket>>>,
    /// Generation of each slot's next connection.
    generations: Vec<u32>,
    /// The pipe pool.
    pipes: Vec<K::Pipe>,
    /// Free pipes.
    free_pipes: Vec<usize>,
    /// Clients waiting for a pipe, in order (stale entries skipped).
    pipe_waiters: VecDeque<ClientId>,
    /// Pinned streams.
    pins: Vec<Pin>,
    /// Receive buffer.
    scratch: Vec<u8>,
    /// Reaped completions being handled.
    completions: Vec<Completion>,
}

impl<K: Kernel> Driver<K> {
    /// A driver for worker `worker` over `kernel`.
    pub fn new(
        mut kernel: K,
        worker: usize,
        hub: Arc<Hub>,
        waker: Arc<Waker>,
        policy: super::ClientPolicy,
    ) -> io::Result<Driver<K>> {
        let mut pipes = Vec::with_capacity(PIPES_PER_WORKER);
        for _ in 0..PIPES_PER_WORKER {
            pipes.push(kernel.new_pipe()?);
        }
        let sched = Scheduler::new(worker, hub.clone(), policy, kernel.now());
        let mut d = Driver {
            kernel,
            sched,
            hub,
            waker,
            worker,
            conns: Vec::new(),
            generations: Vec::new(),
            free_pipes: (0..pipes.len()).rev().collect(),
            pipes,
            pipe_waiters: VecDeque::new(),
            pins: Vec::new(),
            scratch: vec![0; RECV_CHUNK],
            completions: Vec::new(),
        };
        d.room(1)?;
        d.push(Entry::ReadWake, WAKE);
        Ok(d)
    }

    /// Takes over a client; returns its slot.
    pub fn attach(&mut self, sock: K::Socket, a: Attach) -> io::Result<ClientId> {
        let now = self.kernel.now();
        let id = self.sched.handle_attach(a, now) as usize;
        if self.conns.len() <= id {
            self.conns.resize_with(id + 1, || None);
            self.generations.resize(id + 1, 0);
        }
        debug_assert!(self.conns[id].is_none(), "slot {id} given out twice");
        self.conns[id] = Some(Conn {
            sock,
            generation: self.generations[id],
            transfer: Transfer::Idle,
            inflight: 0,
            state: ConnState::Reading,
        });
        self.arm_pollin(id as ClientId)?;
        Ok(id as ClientId)
    }

    /// One loop: timeouts, a batch of up to [`SWEEP_CHUNK`] operations, one submission (which
    /// waits when nothing is ready), and the completions. Returns false once the worker is
    /// done (shutdown finished).
    pub fn turn(&mut self) -> io::Result<bool> {
        let started = self.kernel.now();
        if self.hub.shutting_down() {
            self.sched.handle_shutdown(started);
        }
        if self.sched.finished(started) {
            return Ok(false);
        }
        self.sched.handle_timeout(started);
        self.sched.begin_batch(started);
        let mut issued = 0;
        while issued < SWEEP_CHUNK {
            let Some(op) = self.sched.poll_op(started) else {
                break;
            };
            sim_trace!("op {}", op_name(&op));
            self.issue(op)?;
            issued += 1;
        }
        self.release_idle_pins();
        Counters::add(&self.hub.counters.ring_loops, 1);
        self.kernel.submit(None)?;
        let worked = self.kernel.now().saturating_duration_since(started);
        if !self.sched.has_ready() && !self.kernel.has_completions() {
            self.kernel.submit(Some(self.sched.poll_timeout()))?;
        }
        let reaping = self.kernel.now();
        self.reap()?;
        let busy = worked + self.kernel.now().saturating_duration_since(reaping);
        self.sched.record_busy(busy);
        Ok(true)
    }

    /// Clients attached.
    pub fn client_count(&self) -> usize {
        self.sched.client_count()
    }

    // ---- issuing -----------------------------------------------------------------------

    /// Makes room for `n` entries in the submission queue (submitting what is queued).
    ///
    /// Should the kernel keep entries queued (`EBUSY`: its completion queue overflowed),
    /// pushing anyway could split a linked splice pair across submissions; the worker stops
    /// with an error instead, and the process ends loudly (see `liveness`).
    fn room(&mut self, n: usize) -> io::Result<()> {
        if self.kernel.sq_room() < n {
            self.kernel.submit(None)?;
        }
        if self.kernel.sq_room() < n {
            return Err(io::Error::other(
                "the io_uring submission queue stays full after submitting",
            ));
        }
        Ok(())
    }

    /// Queues one entry; every caller has made room with [`Driver::room`].
    fn push(&mut self, entry: Entry<'_, K::Socket, K::Pipe>, user_data: u64) {
        // SAFETY: the driver keeps what each entry points at alive until its completion is
        // reaped: ring bytes stay pinned (`pins`, released in `ring_send_done`), control bytes
        // are owned by the connection's `Transfer::Control`, the wake-up buffer by the kernel
        // wrapper, and sockets, pipes and log files are dropped only once no operation on
        // them is in flight (`inflight`, the pipe pool's owners).
        unsafe { self.kernel.push(entry, user_data) }
    }

    /// Pushes one entry for a client's connection (counted in flight).
    fn push_for(&mut self, id: ClientId, op: u64, e: EntryOf<'_>) {
        let Some(conn) = self.conns.get_mut(id as usize).and_then(|c| c.as_mut()) else {
            return;
        };
        conn.inflight += 1;
        let ud = user_data(id, conn.generation, op);
        let entry = e.into_entry(&conn.sock, &self.pipes);
        // SAFETY: as in `push` (borrowing `conn` keeps that helper out of reach here).
        unsafe { self.kernel.push(entry, ud) }
    }

    /// Carries out one operation.
    fn issue(&mut self, op: Op) -> io::Result<()> {
        match op {
            Op::Data {
                client,
                stream,
                from,
                to,
            } => self.issue_data(client, stream, from, to),
            Op::Control { client, bytes } => {
                self.room(1)?;
                let bytes = Box::new(bytes);
                let (ptr, len) = (bytes.as_slice().as_ptr(), bytes.as_slice().len() as u32);
                let Some(conn) = self.conn(client) else {
                    return Ok(());
                };
                debug_assert!(
                    matches!(conn.transfer, Transfer::Idle),
                    "control mid-transfer"
                );
                conn.transfer = Transfer::Control { _bytes: bytes };
                self.push_for(client, OP_CONTROL_SEND, EntryOf::Send { ptr, len });
                Ok(())
            }
            Op::Fin { client } => {
                if let Some(conn) = self.conns.get(client as usize).and_then(|c| c.as_ref()) {
                    self.kernel
                        .shutdown(&conn.sock, rustix::net::Shutdown::Write);
                }
                Ok(())
            }
            Op::StopReading { client } => {
                if let Some(conn) = self.conn(client).filter(|c| c.state == ConnState::Reading) {
                    conn.state = ConnState::Deaf;
                }
                Ok(())
            }
            Op::Shut { client } => {
                let Some(conn) = self.conn(client) else {
                    return Ok(());
                };
                if conn.state == ConnState::Shut {
                    return Ok(());
                }
                conn.state = ConnState::Shut;
                self.room(1)?;
                if let Some(conn) = self.conns.get(client as usize).and_then(|c| c.as_ref()) {
                    self.kernel
                        .shutdown(&conn.sock, rustix::net::Shutdown::Both);
                }
                self.push_for(client, OP_CANCEL, EntryOf::Cancel);
                Ok(())
            }
        }
    }

    /// A data transfer: the residue of a short send first; else from the tail ring if the
    /// bytes are still there; else a splice through a pooled pipe.
    fn issue_data(
        &mut self,
        id: ClientId,
        stream: Arc<Stream>,
        from: u64,
        to: u64,
    ) -> io::Result<()> {
        let Some(conn) = self.conn(id) else {
            return Ok(());
        };
        match conn.transfer {
            Transfer::Residue { pipe, fill } => {
                debug_assert!(to - from >= fill as u64, "residue beyond the range");
                conn.transfer = Transfer::ResidueOut { pipe, fill };
                self.room(1)?;
                self.push_for(id, OP_RESIDUE_OUT, EntryOf::SpliceOut { pipe, len: fill });
                return Ok(());
            }
            Transfer::Idle => {}
            _ => {
                debug_assert!(false, "a data transfer while another is in flight");
                return Ok(());
            }
        }
        let low = self.pin(&stream);
        if from >= low {
            let (ptr, len) = stream.ring_span(from, to, MAX_SEND);
            self.room(1)?;
            if let Some(p) = self
                .pins
                .iter_mut()
                .find(|p| Arc::ptr_eq(&p.stream, &stream))
            {
                p.sends += 1;
            }
            if let Some(conn) = self.conn(id) {
                conn.transfer = Transfer::Ring { stream };
            }
            self.push_for(
                id,
                OP_RING_SEND,
                EntryOf::Send {
                    ptr,
                    len: len as u32,
                },
            );
            return Ok(());
        }
        let Some(pipe) = self.free_pipes.pop() else {
            if let Some(conn) = self.conn(id) {
                conn.transfer = Transfer::PipeWait { stream, from, to };
            }
            self.pipe_waiters.push_back(id);
            return Ok(());
        };
        self.splice(id, pipe, &stream, from, to)
    }

    /// A linked splice pair through `pipe`, pushed into one submission.
    fn splice(
        &mut self,
        id: ClientId,
        pipe: usize,
        stream: &Arc<Stream>,
        from: u64,
        to: u64,
    ) -> io::Result<()> {
        let len = (to - from).min(PIPE_BYTES as u64) as u32;
        self.room(2)?;
        if let Some(conn) = self.conn(id) {
            conn.transfer = Transfer::Splice {
                pipe,
                filled: None,
                drained: None,
            };
        }
        let file: &Stream = stream;
        self.push_for(
            id,
            OP_SPLICE_IN,
            EntryOf::SpliceIn {
                file,
                off: from,
                pipe,
                len,
            },
        );
        self.push_for(id, OP_SPLICE_OUT, EntryOf::SpliceOut { pipe, len });
        Ok(())
    }

    /// Pins `stream`'s ring (once per stream while sends are in flight) and returns the
    /// lowest offset a ring send may start at. A pin already held keeps the writer from
    /// overwriting what is above it, but the writer may have given ring bytes up since (when
    /// it could not wait): those must come from the file.
    fn pin(&mut self, stream: &Arc<Stream>) -> u64 {
        if let Some(p) = self.pins.iter().find(|p| Arc::ptr_eq(&p.stream, stream)) {
            return p.low.max(stream.ring_floor());
        }
        let low = stream.pin_ring(self.worker);
        self.pins.push(Pin {
            stream: stream.clone(),
            low,
            sends: 0,
        });
        low
    }

    /// Releases pins no send of this batch used.
    fn release_idle_pins(&mut self) {
        let worker = self.worker;
        self.pins.retain(|p| {
            if p.sends == 0 {
                p.stream.unpin_ring(worker);
            }
            p.sends > 0
        });
    }

    /// A ring send on `stream` completed.
    fn ring_send_done(&mut self, stream: &Arc<Stream>) {
        let worker = self.worker;
        if let Some(i) = self
            .pins
            .iter()
            .position(|p| Arc::ptr_eq(&p.stream, stream))
        {
            let p = &mut self.pins[i];
            p.sends -= 1;
            if p.sends == 0 {
                p.stream.unpin_ring(worker);
                self.pins.swap_remove(i);
            }
        } else {
            debug_assert!(false, "a ring send completed on an unpinned stream");
        }
    }

    fn arm_pollin(&mut self, id: ClientId) -> io::Result<()> {
        self.room(1)?;
        self.push_for(id, OP_POLLIN, EntryOf::PollIn);
        Ok(())
    }

    fn arm_pollout(&mut self, id: ClientId) -> io::Result<()> {
        self.room(1)?;
        self.push_for(id, OP_POLLOUT, EntryOf::PollOut);
        Ok(())
    }

    // ---- completions -------------------------------------------------------------------

    fn reap(&mut self) -> io::Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        self.kernel.reap(&mut completions);
        Counters::add(&self.hub.counters.sqes, completions.len() as u64);
        for c in completions.drain(..) {
            self.complete(c)?;
        }
        self.completions = completions;
        Ok(())
    }

    fn complete(&mut self, cqe: Completion) -> io::Result<()> {
        if cqe.user_data == WAKE {
            let since = self.waker.consumed();
            self.sched.handle_data_appended(since);
            self.room(1)?;
            self.push(Entry::ReadWake, WAKE);
            return Ok(());
        }
        let id = (cqe.user_data >> 32) as ClientId;
        let generation = ((cqe.user_data >> 8) & 0xFF_FFFF) as u32;
        let op = cqe.user_data & 0xFF;
        let now = self.kernel.now();
        let Some(conn) = self.conn(id) else {
            debug_assert!(false, "a completion for a free slot");
            return Ok(());
        };
        if conn.generation & 0xFF_FFFF != generation {
            debug_assert!(false, "a completion for an earlier connection");
            return Ok(());
        }
        if !cqe.more {
            conn.inflight -= 1;
        }
        let res = cqe.result;
        match op {
            OP_RING_SEND => {
                if let Transfer::Ring { stream } =
                    std::mem::replace(&mut conn.transfer, Transfer::Idle)
                {
                    self.ring_send_done(&stream);
                }
                self.sent_or_blocked(id, res, false)?;
            }
            OP_CONTROL_SEND => {
                conn.transfer = Transfer::Idle;
                self.sent_or_blocked(id, res, true)?;
            }
            OP_SPLICE_IN | OP_SPLICE_OUT => {
                if let Transfer::Splice {
                    filled, drained, ..
                } = &mut conn.transfer
                {
                    if op == OP_SPLICE_IN {
                        *filled = Some(res);
                    } else {
                        *drained = Some(res);
                    }
                }
                self.splice_progress(id)?;
            }
            OP_RESIDUE_OUT => {
                let Transfer::ResidueOut { pipe, fill } = conn.transfer else {
                    debug_assert!(false, "residue completion without a residue");
                    return Ok(());
                };
                let moved = res.max(0) as u32;
                conn.transfer = Transfer::Residue {
                    pipe,
                    fill: fill - moved.min(fill),
                };
                if fill <= moved {
                    conn.transfer = Transfer::Idle;
                    self.put_pipe(pipe, true)?;
                }
                self.sent_or_blocked(id, res, false)?;
            }
            OP_POLLOUT => self.sched.handle_writable(id),
            OP_POLLIN => {
                if res >= 0 && conn.state == ConnState::Reading {
                    self.read_input(id, now);
                }
                if !cqe.more && self.conn(id).is_some_and(|c| c.state != ConnState::Shut) {
                    self.arm_pollin(id)?;
                }
            }
            OP_CANCEL => {}
            _ => debug_assert!(false, "unknown operation {op}"),
        }
        self.maybe_release(id)
    }

    /// A send's result: bytes handed over, a full socket (wait for writability), or a failure.
    fn sent_or_blocked(&mut self, id: ClientId, res: i32, control: bool) -> io::Result<()> {
        if self.conn(id).is_none_or(|c| c.state == ConnState::Shut) {
            return Ok(());
        }
        let now = self.kernel.now();
        match res {
            n if n > 0 => {
                if control {
                    self.sched.handle_control_sent(id, n as usize, now);
                } else {
                    let wall = self.kernel.wall_us();
                    self.sched.handle_sent(id, n as u64, now, wall);
                }
            }
            0 => {
                // Nothing moved without an error: treat as a full socket.
                self.sched.handle_blocked(id);
                self.arm_pollout(id)?;
            }
            e if e == -libc::EAGAIN || e == -libc::ECANCELED => {
                self.sched.handle_blocked(id);
                self.arm_pollout(id)?;
            }
            e => self.sched.handle_failed(id, -e, now),
        }
        Ok(())
    }

    /// Settles a splice pair once both halves have reported.
    fn splice_progress(&mut self, id: ClientId) -> io::Result<()> {
        let Some(conn) = self.conn(id) else {
            return Ok(());
        };
        let Transfer::Splice {
            pipe,
            filled: Some(filled),
            drained: Some(drained),
        } = conn.transfer
        else {
            return Ok(()); // the other half has not reported yet
        };
        if filled <= 0 {
            // Nothing came from the log (an I/O error): the connection cannot continue.
            conn.transfer = Transfer::Idle;
            Counters::add(&self.hub.counters.splice_errors, 1);
            tracing::warn!(
                worker = self.worker,
                error = filled,
                "splice from log failed"
            );
            let clean = drained <= 0;
            self.put_pipe(pipe, clean)?;
            if !conn_is_shut(self.conn(id)) {
                let now = self.kernel.now();
                self.sched.handle_failed(id, -filled.min(-1), now);
            }
            return Ok(());
        }
        let moved = drained.max(0);
        let fill = (filled - moved) as u32;
        conn.transfer = if fill > 0 {
            Transfer::Residue { pipe, fill }
        } else {
            Transfer::Idle
        };
        if fill == 0 {
            self.put_pipe(pipe, true)?;
        }
        if drained < 0 && drained != -libc::EAGAIN && drained != -libc::ECANCELED {
            Counters::add(&self.hub.counters.splice_errors, 1);
        }
        self.sent_or_blocked(id, drained, false)
    }

    /// Returns a pipe to the pool (recreated if bytes were left in it) and hands it to the
    /// next waiting client.
    fn put_pipe(&mut self, pipe: usize, clean: bool) -> io::Result<()> {
        if !clean {
            // Drop residue a closing client never took: recreate the pipe empty.
            self.pipes[pipe] = self.kernel.new_pipe()?;
        }
        while let Some(id) = self.pipe_waiters.pop_front() {
            let Some(conn) = self.conn(id) else { continue };
            let Transfer::PipeWait { stream, from, to } =
                std::mem::replace(&mut conn.transfer, Transfer::Idle)
            else {
                continue; // stale entry
            };
            return self.splice(id, pipe, &stream, from, to);
        }
        self.free_pipes.push(pipe);
        Ok(())
    }

    /// Reads what the client sent and hands it to the scheduler.
    fn read_input(&mut self, id: ClientId, now: Instant) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(conn) = self.conns.get(id as usize).and_then(|c| c.as_ref()) {
            match self.kernel.recv(&conn.sock, &mut scratch) {
                Ok(0) => {
                    self.sched.handle_peer_gone(id, now);
                    break;
                }
                Ok(n) => {
                    if !self.sched.handle_inbound(id, &scratch[..n], now) {
                        break;
                    }
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.sched.handle_peer_gone(id, now);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Frees a shut connection once nothing of it is in flight.
    fn maybe_release(&mut self, id: ClientId) -> io::Result<()> {
        let Some(conn) = self.conn(id) else {
            return Ok(());
        };
        if conn.state != ConnState::Shut || conn.inflight > 0 {
            return Ok(());
        }
        let Some(conn) = self.conns[id as usize].take() else {
            return Ok(());
        };
        match conn.transfer {
            Transfer::Residue { pipe, .. } => self.put_pipe(pipe, false)?,
            Transfer::ResidueOut { .. } | Transfer::Splice { .. } | Transfer::Ring { .. } => {
                debug_assert!(false, "released with a transfer in flight");
            }
            Transfer::Idle | Transfer::Control { .. } | Transfer::PipeWait { .. } => {}
        }
        self.generations[id as usize] = self.generations[id as usize].wrapping_add(1);
        drop(conn); // closes the socket
        self.sched.handle_released(id);
        self.waker
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn conn(&mut self, id: ClientId) -> Option<&mut Conn<K::Socket>> {
        self.conns.get_mut(id as usize).and_then(|c| c.as_mut())
    }

    /// The scheduler (for the simulation's checks).
    #[cfg(test)]
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// The kernel (for the simulation).
    #[cfg(test)]
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The kernel (for the simulation).
    #[cfg(test)]
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Checks the driver's own invariants: each pipe owned by at most one party (the pool or
    /// one client), pins held only for sends in flight.
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut owner = vec![0usize; self.pipes.len()];
        for &p in &self.free_pipes {
            owner[p] += 1;
        }
        for c in self.conns.iter().flatten() {
            match c.transfer {
                Transfer::Splice { pipe, .. }
                | Transfer::Residue { pipe, .. }
                | Transfer::ResidueOut { pipe, .. } => owner[pipe] += 1,
                _ => {}
            }
        }
        for (p, n) in owner.iter().enumerate() {
            assert_eq!(*n, 1, "pipe {p} has {n} owners");
        }
        for p in &self.pins {
            let sends = self
                .conns
                .iter()
                .flatten()
                .filter(|c| matches!(&c.transfer, Transfer::Ring { stream } if Arc::ptr_eq(stream, &p.stream)))
                .count();
            assert_eq!(
                p.sends as usize, sends,
                "pin count differs from ring sends in flight"
            );
        }
    }
}

/// An operation in a trace line.
#[cfg(test)]
fn op_name(op: &Op) -> String {
    match op {
        Op::Data {
            client, from, to, ..
        } => format!("data {client} {from}..{to}"),
        Op::Control { client, bytes } => format!("control {client} {}", bytes.as_slice().len()),
        Op::Fin { client } => format!("fin {client}"),
        Op::Shut { client } => format!("shut {client}"),
        Op::StopReading { client } => format!("stop {client}"),
    }
}

fn conn_is_shut<S>(c: Option<&mut Conn<S>>) -> bool {
    c.is_none_or(|c| c.state == ConnState::Shut)
}

/// An entry before the socket and pipe references are filled in (they are borrowed from the
/// driver's own tables when the entry is pushed).
enum EntryOf<'a> {
    Send {
        ptr: *const u8,
        len: u32,
    },
    SpliceIn {
        file: &'a Stream,
        off: u64,
        pipe: usize,
        len: u32,
    },
    SpliceOut {
        pipe: usize,
        len: u32,
    },
    PollOut,
    PollIn,
    Cancel,
}

impl<'a> EntryOf<'a> {
    fn into_entry<'b, S, P>(self, sock: &'b S, pipes: &'b [P]) -> Entry<'b, S, P>
    where
        'a: 'b,
    {
        match self {
            EntryOf::Send { ptr, len } => Entry::Send { sock, ptr, len },
            EntryOf::SpliceIn {
                file,
                off,
                pipe,
                len,
            } => Entry::SpliceIn {
                file,
                off,
                pipe: &pipes[pipe],
                len,
            },
            EntryOf::SpliceOut { pipe, len } => Entry::SpliceOut {
                pipe: &pipes[pipe],
                sock,
                len,
            },
            EntryOf::PollOut => Entry::PollOut { sock },
            EntryOf::PollIn => Entry::PollIn { sock },
            EntryOf::Cancel => Entry::Cancel { sock },
        }
    }
}
