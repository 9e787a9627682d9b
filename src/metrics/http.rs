//! The metrics listener's HTTP server: one thread polling the listener and every open
//! connection, a bounded table of connections, and a deadline per connection.
//!
//! Why not a thread per request with a few slots (as before): sixteen peers that connected
//! and sent nothing held every slot for the whole timeout, and meanwhile `/readyz` answered
//! 503 to the load balancer, taking a healthy relay out of rotation. Here an open connection
//! costs a buffer, not a thread, and when the table is full (overall, or for one address)
//! the new connection takes the place of the one that has had the longest time to say what
//! it wants. A prober that sends its request right after connecting — every health checker
//! does — is answered within one poll round however many idle or trickling sockets are
//! open, and no peer can keep a connection past [`CONNECTION_DEADLINE`].
//!
//! Each connection is [`Phase::Reading`] its request head, then [`Phase::Writing`] the
//! response, then closed (`Connection: close`, no keep-alive).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use crate::handshake::{self, HttpError, ParseStatus};
use crate::limits::address_key;

/// Connections held at once. Why 64: a scraper, a few dashboards and the health probes of a
/// load-balancer fleet need far fewer; the cap bounds the fds and response buffers (the
/// largest response, `/metrics`, is tens of KiB) an attacker can make us hold.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections held at once per client address (IPv6: per /64). Why 8: one address has no
/// reason for more (a scraper plus a few tabs of the dashboard); a flood from one address
/// then only ever replaces its own connections, never another address's.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 8;
/// From accept to the last byte of the response. Why 3 s: a request head is one packet and
/// the largest response a few tens of KiB, so a real client needs milliseconds even across
/// a WAN; a peer that is slower is holding a connection, not using it.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(3);
/// How often the loop checks the stop flag when nothing happens.
const STOP_POLL: Duration = Duration::from_millis(250);
/// How long accepting pauses after an accept error such as EMFILE (instead of spinning on a
/// listener that stays readable); open connections keep being served meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);
/// Connections accepted per poll round, so a burst cannot starve the ones already open.
const ACCEPTS_PER_ROUND: usize = 32;
/// Read size per `read` call; a request head is capped at [`handshake::MAX_REQUEST_BYTES`].
const READ_CHUNK: usize = 2048;

/// Where a connection is in its one request.
enum Phase {
    /// Reading the request head; `buf` holds what arrived so far.
    Reading {
        /// Bytes of the head so far.
        buf: Vec<u8>,
    },
    /// Writing the response; `written` bytes of it are gone.
    Writing {
        /// The whole response.
        response: Vec<u8>,
        /// How much of it the socket took.
        written: usize,
    },
}

/// One open connection.
struct Conn {
    /// The socket, non-blocking.
    stream: TcpStream,
    /// Its address key (IPv6: the /64), for the per-address cap.
    address: IpAddr,
    /// When it was accepted: the deadline and the eviction order count from here.
    accepted: Instant,
    /// Reading or writing.
    phase: Phase,
}

/// What happened to a connection in one step.
enum Step {
    /// Still open.
    Open,
    /// Done or failed: close it.
    Close,
}

/// Which open connection a new one from `address` replaces, if the table has no room:
/// among the connections of `address` when that address is at its cap, else among all,
/// the oldest still reading its request (it has had the most time to send one), or the
/// oldest writing when none is reading. `None`: there is room.
fn eviction_victim(
    open: &[(IpAddr, Instant, bool)],
    address: IpAddr,
    per_address: usize,
) -> Option<usize> {
    let same_address = open.iter().filter(|(a, _, _)| *a == address).count();
    let candidates: Vec<usize> = if same_address >= per_address {
        (0..open.len()).filter(|&i| open[i].0 == address).collect()
    } else if open.len() >= MAX_CONNECTIONS {
        (0..open.len()).collect()
    } else {
        return None;
    };
    // Readers first (false < true on "is writing"), then the oldest.
    candidates
        .into_iter()
        .min_by_key(|&i| (open[i].2, open[i].1))
}

/// Serves requests on `listener` until `stop` is set: `respond(method, path)` gives the
/// response bytes for a parsed request.
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    respond: impl Fn(&str, &str) -> Vec<u8>,
) {
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNECTIONS);
    let mut accept_paused_until: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // Progress for `liveness` (every loop waits at most `STOP_POLL`).
        crate::liveness::beat();
        let now = Instant::now();
        if accept_paused_until.is_some_and(|t| now >= t) {
            accept_paused_until = None;
        }
        let accepting = accept_paused_until.is_none();
        let (listener_ready, ready) = {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(
                &listener,
                if accepting {
                    PollFlags::IN
                } else {
                    PollFlags::empty()
                },
            ));
            for c in &conns {
                let flags = match c.phase {
                    Phase::Reading { .. } => PollFlags::IN,
                    Phase::Writing { .. } => PollFlags::OUT,
                };
                fds.push(PollFd::from_borrowed_fd(c.stream.as_fd(), flags));
            }
            let next_deadline = conns
                .iter()
                .map(|c| c.accepted + CONNECTION_DEADLINE)
                .chain(accept_paused_until)
                .min();
            let wait = next_deadline
                .map_or(STOP_POLL, |d| d.saturating_duration_since(now))
                .min(STOP_POLL);
            let timeout = rustix::time::Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            // EINTR or a transient error: the steps below find nothing ready and we loop.
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
            let ready: Vec<bool> = fds[1..].iter().map(|f| !f.revents().is_empty()).collect();
            (!fds[0].revents().is_empty(), ready)
        };

        // Existing connections first: a burst of new ones must not delay their answers.
        let mut keep = Vec::with_capacity(conns.len());
        for (i, mut conn) in conns.drain(..).enumerate() {
            let was_ready = ready.get(i).copied().unwrap_or(false);
            let step = if was_ready {
                advance(&mut conn, &respond)
            } else {
                Step::Open
            };
            if matches!(step, Step::Close) {
                continue;
            }
            if Instant::now() >= conn.accepted + CONNECTION_DEADLINE {
                expire(conn);
                continue;
            }
            keep.push(conn);
        }
        conns = keep;

        if accepting && listener_ready {
            for _ in 0..ACCEPTS_PER_ROUND {
                match listener.accept() {
                    Ok((stream, peer)) => admit(&mut conns, stream, peer.ip(), &respond),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        // EMFILE and friends: pause accepting rather than spin.
                        tracing::warn!(error = %e, "metrics accept failed");
                        accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                        break;
                    }
                }
            }
        }
    }
}

/// Adds a freshly accepted connection, making room first if the table (or its address's
/// share) is full, and reads at once: a health probe's request is usually already there.
fn admit(
    conns: &mut Vec<Conn>,
    stream: TcpStream,
    peer: IpAddr,
    respond: &impl Fn(&str, &str) -> Vec<u8>,
) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let address = address_key(peer);
    let open: Vec<(IpAddr, Instant, bool)> = conns
        .iter()
        .map(|c| {
            (
                c.address,
                c.accepted,
                matches!(c.phase, Phase::Writing { .. }),
            )
        })
        .collect();
    if let Some(victim) = eviction_victim(&open, address, MAX_CONNECTIONS_PER_ADDRESS) {
        let old = conns.swap_remove(victim);
        tracing::debug!(
            address = %old.address,
            age_ms = old.accepted.elapsed().as_millis() as u64,
            "metrics listener full: closing its longest-waiting connection"
        );
        // Dropped without a response: it never finished asking.
        drop(old);
    }
    let mut conn = Conn {
        stream,
        address,
        accepted: Instant::now(),
        phase: Phase::Reading {
            buf: Vec::with_capacity(512),
        },
    };
    if let Step::Open = advance(&mut conn, respond) {
        conns.push(conn);
    }
}

/// Moves a connection as far as its socket allows without blocking.
fn advance(conn: &mut Conn, respond: &impl Fn(&str, &str) -> Vec<u8>) -> Step {
    loop {
        match &mut conn.phase {
            Phase::Reading { buf } => {
                let mut chunk = [0u8; READ_CHUNK];
                match (&conn.stream).read(&mut chunk) {
                    Ok(0) => return Step::Close,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Open,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return Step::Close,
                }
                let response = match handshake::parse_plain_request(buf) {
                    Ok(ParseStatus::Complete { request, .. }) => {
                        respond(request.method, request.path)
                    }
                    Ok(ParseStatus::Incomplete) => continue,
                    Err(e) => e.to_response(),
                };
                conn.phase = Phase::Writing {
                    response,
                    written: 0,
                };
            }
            Phase::Writing { response, written } => {
                match (&conn.stream).write(&response[*written..]) {
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Open,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return Step::Close,
                }
                if *written == response.len() {
                    // Closing with unread request bytes would reset the connection and could
                    // destroy the response in flight; a half-close lets the peer read it.
                    let _ = conn.stream.shutdown(Shutdown::Write);
                    return Step::Close;
                }
            }
        }
    }
}

/// A connection past its deadline: one still reading is told why (best effort, without
/// waiting), one still writing is simply closed.
fn expire(conn: Conn) {
    if let Phase::Reading { .. } = conn.phase {
        let timeout = HttpError::new(408, "request timed out").to_response();
        let _ = (&conn.stream).write(&timeout);
        let _ = conn.stream.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn eviction_makes_room_within_the_address_then_overall() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Room: nothing to evict.
        assert_eq!(eviction_victim(&[(ip(1), at(0), false)], ip(2), 8), None);

        // An address at its cap replaces its own oldest reader, never another address's
        // (even an older one).
        let mut open = vec![(ip(9), at(0), false)];
        open.extend((0..8).map(|k| (ip(1), at(10 + k), false)));
        assert_eq!(eviction_victim(&open, ip(1), 8), Some(1));
        assert_eq!(eviction_victim(&open, ip(2), 8), None);
        // Its readers go before its writers, even younger ones.
        open[1].2 = true;
        assert_eq!(eviction_victim(&open, ip(1), 8), Some(2));

        // A full table replaces the oldest reader of any address.
        let mut full: Vec<(IpAddr, Instant, bool)> = (0..MAX_CONNECTIONS)
            .map(|k| (ip((k % 32) as u8), at(k as u64), false))
            .collect();
        assert_eq!(eviction_victim(&full, ip(200), 8), Some(0));
        full[0].2 = true;
        full[1].2 = true;
        assert_eq!(eviction_victim(&full, ip(200), 8), Some(2));
        // All writing: the oldest writer.
        for c in &mut full {
            c.2 = true;
        }
        assert_eq!(eviction_victim(&full, ip(200), 8), Some(0));
    }
}
