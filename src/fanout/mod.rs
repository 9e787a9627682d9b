//! Fan-out: worker threads, each with its own io_uring and its own clients, keep every
//! client's position moving to the end of its log.
//!
//! # Map
//!
//! ```text
//!  listener ──NewClient──▶ worker thread: Driver<Uring>
//!  writer ──Waker (eventfd)──▶   ├─ Scheduler (no I/O): clients, rounds, holds/waits,
//!                                │    DID routes, walks, control frames, limits, kicks
//!                                │      inputs:  handle_attach / handle_data_appended /
//!                                │               handle_sent / handle_control_sent /
//!                                │               handle_blocked / handle_writable /
//!                                │               handle_inbound / handle_peer_gone /
//!                                │               handle_failed / handle_released /
//!                                │               handle_timeout(now) / handle_shutdown
//!                                │      outputs: poll_op → Op (Data, Control, Fin, Shut,
//!                                │               StopReading), poll_timeout → deadline
//!                                └─ Driver: Op → kernel entries; completions → inputs.
//!                                     owns sockets, the one transfer per client, ring pins,
//!                                     the pipe pool; Kernel = io_uring (uring.rs) or a
//!                                     simulation (sim.rs)
//! ```
//!
//! Modules, each named after what it owns:
//! - [`scheduler`]: the decisions (see its documentation for a client's life);
//! - [`client`]: one client's state — its place between operations, its life, the control
//!   frames it is owed, its input;
//! - [`groups`]: holds (thin streams lingering together) and waits (clients whose log has
//!   nothing new), pacing of rounds, the linger gate;
//! - [`walker`]: a filtered client's walk over the index;
//! - [`attach`]: where a client reads from (attach, switch onto a shape, `options_update`);
//! - [`waker`]: the writer's wake-up of a worker;
//! - [`driver`]: carrying out operations on a [`driver::Kernel`];
//! - [`uring`]: the io_uring kernel, the one `unsafe` boundary.
//!
//! One event's path: the writer appends it to the logs and calls [`Waker::wake`]; the driver
//! reaps the eventfd read and tells the scheduler (`handle_data_appended`); the next batch
//! starts a round (when pacing allows); every client the round brings something is served:
//! its range is extended to the log's end and an `Op::Data` goes to the driver, which sends
//! it from the tail ring (`SEND`, `MSG_DONTWAIT`) or splices it from the file (`SPLICE` file
//! → pooled pipe → socket) and reports the bytes handed over (`handle_sent`).
//!
//! One client's life: the listener hands it over ([`Fanout::attach`]); it is served until it
//! is caught up, waits for rounds, is blocked while its socket is full; a close (its own, a
//! kick, a limit, shutdown) queues a close frame sent at the next frame boundary, then FIN,
//! then the socket is shut and, once the driver has nothing of it in flight, released.
//!
//! File descriptors: one per client (its socket) plus a fixed pipe pool per worker.

/// Prints a line of the simulation's trace when `TEST_JETRELAY_SIM_TRACE` is set (test builds only;
/// nothing at all otherwise).
#[cfg(test)]
macro_rules! sim_trace {
    ($($arg:tt)*) => {
        if crate::fanout::sim::tracing_on() {
            eprintln!($($arg)*);
        }
    };
}
#[cfg(not(test))]
macro_rules! sim_trace {
    ($($arg:tt)*) => {};
}

pub mod attach;
pub mod client;
pub mod driver;
pub mod groups;
pub mod scheduler;
pub mod uring;
pub mod waker;
pub mod walker;

#[cfg(test)]
mod sim;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

pub use waker::Waker;

use crate::hub::Hub;
use crate::index::EventPos;
use crate::subscription::SubscriberOptions;
use driver::Driver;
use scheduler::Attach;
use uring::Uring;

/// Per-client limits and pacing settings every worker applies.
#[derive(Clone, Debug)]
pub struct ClientPolicy {
    /// Idle clients are pinged this often; no answer for two periods = dead.
    pub ping_interval: Duration,
    /// Inbound bytes per second before the client is closed (1008).
    pub max_inbound_rate: u64,
    /// Clients further behind live than this are closed (1008), if set.
    pub max_lag: Option<Duration>,
    /// Share of a worker's time that rounds of live sends may take (0 < duty <= 1).
    pub duty: f64,
    /// Longest a thin stream's send may wait under load to carry more bytes (zero = never).
    pub thin_linger: Duration,
    /// Busy share of the worker at which thin streams start lingering.
    pub thin_linger_load: f64,
    /// `options_update` messages per second a client may send (token bucket, burst
    /// `max(10, 2 × rate)`); beyond it the client is closed (1008).
    pub options_update_rate: f64,
}

impl ClientPolicy {
    /// Burst of the `options_update` token bucket. Why 10 at least: a client that sets up
    /// several subscriptions at start sends a few updates at once.
    pub fn options_update_burst(&self) -> f64 {
        (2.0 * self.options_update_rate).max(10.0)
    }
}

/// A client handed over by the listener after a successful upgrade.
pub struct NewClient {
    /// The connected socket (non-blocking).
    pub fd: OwnedFd,
    /// Real client address (from PROXY v2 when behind the sidecar).
    pub peer: SocketAddr,
    /// The frames it receives (wire and compression).
    pub encoding: crate::encoding::Encoding,
    /// The kinds it wants (`kinds` on v2; [`crate::wire::KindSet::V1`] on v1).
    pub kinds: crate::wire::KindSet,
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

impl NewClient {
    /// The socket, and the rest for the scheduler.
    fn split(self) -> (OwnedFd, Attach) {
        (
            self.fd,
            Attach {
                peer: self.peer,
                encoding: self.encoding,
                kinds: self.kinds,
                options: self.options,
                preamble: self.preamble,
                start: self.start,
                require_hello: self.require_hello,
                counted_ip: self.counted_ip,
                filter_reservation: self.filter_reservation,
            },
        )
    }
}

/// The listener's handle on one worker.
struct WorkerHandle {
    /// Channel for new clients.
    tx: Sender<NewClient>,
    /// The eventfd the writer and the listener write to, and the worker's client count.
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
            let kernel = Uring::new(wake.clone())?;
            let driver = Driver::new(kernel, id, hub.clone(), wake.clone(), policy.clone())?;
            // A worker that ends ends the process (its ring pins and its clients' per-IP counts
            // die with it): see `liveness`.
            let thread = crate::liveness::spawn_critical(
                &hub.liveness,
                format!("fanout-{id}"),
                move || run_worker(driver, rx),
            )?;
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
        if w.tx.send(client).is_ok() {
            w.wake.kick();
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
            w.wake.kick();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A worker thread: takes new clients and turns the driver until shutdown is done, reporting
/// progress once per loop (a loop comes round at least once per tick). An error (its ring
/// failed) ends the thread, and `spawn_critical` then ends the process with a log line naming
/// the worker: a limping relay whose clients on one worker silently stopped is worse than a
/// restart, which recovery makes fast and exact.
fn run_worker(mut driver: Driver<Uring>, rx: Receiver<NewClient>) -> std::io::Result<()> {
    loop {
        crate::liveness::beat();
        while let Ok(client) = rx.try_recv() {
            let (fd, attach) = client.split();
            driver.attach(fd, attach)?;
        }
        if !driver.turn()? {
            return Ok(());
        }
    }
}
