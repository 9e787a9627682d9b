//! The byte pump between a decrypted client stream and its backend connection.
//!
//! Why not `tokio::io::copy_bidirectional`: it holds two copy buffers for the whole life of
//! a connection (2 × 8 KiB by default), knows nothing of idle or half-close deadlines, and
//! most of jetrelay's connections are long-lived and mostly idle. This pump holds no buffer
//! while idle:
//!
//! * client → backend: the TLS stream is an `AsyncBufRead`, so bytes go straight from rustls'
//!   own plaintext buffer to the backend socket (no copy buffer at all);
//! * backend → client: bytes are read into a buffer on the *stack* of `poll` and handed to
//!   rustls at once, which encrypts them into its own (bounded) send buffer. Only what rustls
//!   refuses (the client is slow) is moved to a heap `pending` buffer, and reading from the
//!   backend stops until it drains: that is the backpressure. `pending` is freed when the
//!   connection goes quiet.
//!
//! EOF on one side is passed on as a clean close of the other (TLS close_notify towards the
//! client, `shutdown(Write)` towards the backend); the pump ends when both directions have
//! closed, on error, on the idle deadline, or once one direction has been closed for the
//! half-close grace period.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes read from the backend per read call. Why 16 KiB: one full TLS record (the largest
/// plaintext rustls encrypts at once), so a busy stream fills whole records.
pub const DOWNSTREAM_CHUNK: usize = 16 * 1024;

/// Read/write rounds per direction per poll before yielding. Why: one busy connection must
/// not starve the other direction or other connections on the same worker thread.
pub const MAX_ROUNDS_PER_POLL: usize = 16;

/// Deadlines applied to an established connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// No bytes in either direction for this long: close.
    pub idle: Duration,
    /// One direction closed for this long: close the other too.
    pub half_close: Duration,
}

/// How a pumped connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached EOF and were closed on the other side.
    Closed,
    /// Nothing moved for [`Timeouts::idle`].
    IdleTimeout,
    /// One direction stayed closed for [`Timeouts::half_close`] while the other stayed open.
    HalfCloseTimeout,
    /// Reading from or writing to the client failed (reset, TLS error, …).
    ClientError(io::Error),
    /// Reading from or writing to the backend failed.
    BackendError(io::Error),
}

/// Progress of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// Copying.
    Open,
    /// Source hit EOF; closing the destination's write side.
    Closing,
    /// Destination closed.
    Done,
}

/// Counters a finished pump reports for logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes client → backend.
    pub up: u64,
    /// Bytes backend → client.
    pub down: u64,
    /// Whether the client ended its stream with TLS close_notify (vs. a bare TCP close).
    pub client_close_notify: bool,
}

/// The pump's state, separate from the I/O objects so it can be driven by any streams.
#[derive(Debug)]
struct Pump {
    /// Client → backend progress.
    up: Leg,
    /// Backend → client progress.
    down: Leg,
    /// Backend bytes rustls has not accepted yet (only non-empty under backpressure).
    pending: Vec<u8>,
    /// How much of `pending` has been written.
    pending_pos: usize,
    /// Last time a byte moved either way; the idle deadline counts from here.
    last_activity: Instant,
    /// When the first direction finished; the half-close deadline counts from here.
    half_closed_at: Option<Instant>,
    /// Totals for logs.
    traffic: Traffic,
}

/// Which side an I/O error came from.
enum Failure {
    /// The client stream failed.
    Client(io::Error),
    /// The backend stream failed.
    Backend(io::Error),
}

impl Pump {
    fn new(now: Instant) -> Self {
        Pump {
            up: Leg::Open,
            down: Leg::Open,
            pending: Vec::new(),
            pending_pos: 0,
            last_activity: now,
            half_closed_at: None,
            traffic: Traffic::default(),
        }
    }

    fn leg_done(&mut self) {
        if self.half_closed_at.is_none() {
            self.half_closed_at = Some(Instant::now());
        }
    }

    /// The next instant at which a timeout may fire.
    fn deadline(&self, t: &Timeouts) -> Instant {
        let idle = self.last_activity + t.idle;
        match self.half_closed_at {
            Some(at) => idle.min(at + t.half_close),
            None => idle,
        }
    }

    fn timeout_outcome(&self, t: &Timeouts, now: Instant) -> Outcome {
        match self.half_closed_at {
            Some(at) if now >= at + t.half_close => Outcome::HalfCloseTimeout,
            _ => Outcome::IdleTimeout,
        }
    }

    /// Advances both directions as far as possible. Ready when both are done.
    fn poll<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Poll<Result<(), Failure>>
    where
        C: AsyncBufRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        if let Err(f) = self.poll_up(cx, client, backend) {
            return Poll::Ready(Err(f));
        }
        if let Err(f) = self.poll_down(cx, client, backend) {
            return Poll::Ready(Err(f));
        }
        if self.up == Leg::Done && self.down == Leg::Done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Client → backend. Returns once it is blocked (wakers registered) or done.
    fn poll_up<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Result<(), Failure>
    where
        C: AsyncBufRead + Unpin,
        B: AsyncWrite + Unpin,
    {
        for _ in 0..MAX_ROUNDS_PER_POLL {
            match self.up {
                Leg::Open => {
                    let chunk = match Pin::new(&mut *client).poll_fill_buf(cx) {
                        Poll::Ready(Ok(chunk)) => {
                            if chunk.is_empty() {
                                self.traffic.client_close_notify = true;
                            }
                            chunk
                        }
                        // A TCP close without close_notify: common from clients that just
                        // drop the socket; our side is a plain stream, so treat it as EOF.
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => &[],
                        Poll::Ready(Err(e)) => return Err(Failure::Client(e)),
                        Poll::Pending => {
                            // Sockets don't buffer, but a generic writer might.
                            return match Pin::new(&mut *backend).poll_flush(cx) {
                                Poll::Ready(Err(e)) => Err(Failure::Backend(e)),
                                _ => Ok(()),
                            };
                        }
                    };
                    if chunk.is_empty() {
                        self.up = Leg::Closing;
                        continue;
                    }
                    match Pin::new(&mut *backend).poll_write(cx, chunk) {
                        Poll::Ready(Ok(0)) => {
                            return Err(Failure::Backend(io::ErrorKind::WriteZero.into()));
                        }
                        Poll::Ready(Ok(n)) => {
                            Pin::new(&mut *client).consume(n);
                            self.traffic.up += n as u64;
                            self.last_activity = Instant::now();
                        }
                        Poll::Ready(Err(e)) => return Err(Failure::Backend(e)),
                        Poll::Pending => return Ok(()),
                    }
                }
                Leg::Closing => match Pin::new(&mut *backend).poll_shutdown(cx) {
                    Poll::Ready(Ok(())) => {
                        self.up = Leg::Done;
                        self.leg_done();
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                        self.up = Leg::Done;
                        self.leg_done();
                    }
                    Poll::Ready(Err(e)) => return Err(Failure::Backend(e)),
                    Poll::Pending => return Ok(()),
                },
                Leg::Done => return Ok(()),
            }
        }
        // Round budget spent with work left: come back after others had a turn.
        cx.waker().wake_by_ref();
        Ok(())
    }

    /// Backend → client. Returns once it is blocked (wakers registered) or done.
    fn poll_down<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
    ) -> Result<(), Failure>
    where
        C: AsyncWrite + Unpin,
        B: AsyncRead + Unpin,
    {
        for _ in 0..MAX_ROUNDS_PER_POLL {
            if self.pending_pos < self.pending.len() {
                match Pin::new(&mut *client).poll_write(cx, &self.pending[self.pending_pos..]) {
                    Poll::Ready(Ok(0)) => {
                        return Err(Failure::Client(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.pending_pos += n;
                        self.last_activity = Instant::now();
                        if self.pending_pos == self.pending.len() {
                            self.pending.clear();
                            self.pending_pos = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(Failure::Client(e)),
                    // Backpressure: don't read more from the backend until this drains.
                    Poll::Pending => return Ok(()),
                }
            }
            match self.down {
                Leg::Open => {
                    // On the stack, so an idle connection holds no read buffer. Uninit: no
                    // memset per poll.
                    let mut storage = [MaybeUninit::<u8>::uninit(); DOWNSTREAM_CHUNK];
                    let mut buf = ReadBuf::uninit(&mut storage);
                    match Pin::new(&mut *backend).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Err(Failure::Backend(e)),
                        Poll::Pending => {
                            // Quiet for now: push out what rustls still holds (and anything
                            // it queued itself, like a KeyUpdate reply), free spare memory.
                            if self.pending.capacity() > 0 {
                                self.pending = Vec::new();
                            }
                            return match Pin::new(&mut *client).poll_flush(cx) {
                                Poll::Ready(Err(e)) => Err(Failure::Client(e)),
                                _ => Ok(()),
                            };
                        }
                    }
                    let data = buf.filled();
                    if data.is_empty() {
                        self.down = Leg::Closing;
                        continue;
                    }
                    self.traffic.down += data.len() as u64;
                    self.last_activity = Instant::now();
                    let taken = match Pin::new(&mut *client).poll_write(cx, data) {
                        Poll::Ready(Ok(0)) => {
                            return Err(Failure::Client(io::ErrorKind::WriteZero.into()));
                        }
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Err(Failure::Client(e)),
                        Poll::Pending => 0,
                    };
                    if let Some(rest) = data.get(taken..).filter(|r| !r.is_empty()) {
                        self.pending.extend_from_slice(rest);
                    }
                }
                Leg::Closing => match Pin::new(&mut *client).poll_shutdown(cx) {
                    // Sends close_notify, flushes, then shuts the TCP write side.
                    Poll::Ready(Ok(())) => {
                        self.down = Leg::Done;
                        self.leg_done();
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                        self.down = Leg::Done;
                        self.leg_done();
                    }
                    Poll::Ready(Err(e)) => return Err(Failure::Client(e)),
                    Poll::Pending => return Ok(()),
                },
                Leg::Done => return Ok(()),
            }
        }
        cx.waker().wake_by_ref();
        Ok(())
    }
}

/// Pumps bytes both ways until both sides have closed, an error, or a deadline.
pub async fn pump<C, B>(client: &mut C, backend: &mut B, timeouts: Timeouts) -> (Outcome, Traffic)
where
    C: AsyncBufRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut state = Pump::new(Instant::now());
    // One timer. Activity only moves the deadline later, so it is re-armed lazily when it
    // fires early and the hot path never touches the timer wheel; only a half-close (which
    // can move the deadline earlier) re-arms it eagerly.
    let mut armed = state.deadline(&timeouts);
    let sleep = tokio::time::sleep_until(armed);
    tokio::pin!(sleep);
    let outcome = poll_fn(|cx| {
        match state.poll(cx, client, backend) {
            Poll::Ready(Ok(())) => return Poll::Ready(Outcome::Closed),
            Poll::Ready(Err(Failure::Client(e))) => return Poll::Ready(Outcome::ClientError(e)),
            Poll::Ready(Err(Failure::Backend(e))) => {
                return Poll::Ready(Outcome::BackendError(e));
            }
            Poll::Pending => {}
        }
        let deadline = state.deadline(&timeouts);
        if deadline < armed {
            armed = deadline;
            sleep.as_mut().reset(armed);
        }
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let deadline = state.deadline(&timeouts);
            if now >= deadline {
                return Poll::Ready(state.timeout_outcome(&timeouts, now));
            }
            armed = deadline;
            sleep.as_mut().reset(armed);
        }
        Poll::Pending
    })
    .await;
    (outcome, state.traffic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, duplex};

    const LONG: Timeouts = Timeouts {
        idle: Duration::from_secs(30),
        half_close: Duration::from_secs(30),
    };

    struct Rig {
        /// The test's end of the client stream.
        client: DuplexStream,
        /// The test's end of the backend stream.
        backend: DuplexStream,
        /// The pump between them.
        task: tokio::task::JoinHandle<(Outcome, Traffic)>,
    }

    /// `window` is the duplex capacity: small values model slow peers.
    fn rig(window: usize, timeouts: Timeouts) -> Rig {
        let (client, pump_client) = duplex(window);
        let (backend, pump_backend) = duplex(window);
        let task = tokio::spawn(async move {
            let mut c = BufReader::new(pump_client);
            let mut b = pump_backend;
            pump(&mut c, &mut b, timeouts).await
        });
        Rig {
            client,
            backend,
            task,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn copies_both_ways_exactly_and_propagates_eof() {
        let Rig {
            mut client,
            mut backend,
            task,
        } = rig(64 * 1024, LONG);
        let down = pattern(1 << 20);
        let up = pattern(300_000);
        // Both peers write everything and read to EOF, concurrently.
        let (mut br, mut bw) = tokio::io::split(&mut backend);
        let (mut cr, mut cw) = tokio::io::split(&mut client);
        let b_write = async {
            bw.write_all(&down).await.unwrap();
            bw.shutdown().await.unwrap();
        };
        let b_read = async {
            let mut got = Vec::new();
            br.read_to_end(&mut got).await.unwrap();
            got
        };
        let c_write = async {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let c_read = async {
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got_up, (), got_down) = tokio::join!(b_write, b_read, c_write, c_read);
        assert_eq!(got_up, up);
        assert_eq!(got_down, down);
        let (outcome, traffic) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert_eq!(traffic.up, up.len() as u64);
        assert_eq!(traffic.down, down.len() as u64);
    }

    #[tokio::test]
    async fn slow_client_backpressures_the_backend() {
        // 4 KiB windows: the pump may hold at most ~one chunk beyond what the pipes hold.
        let Rig {
            mut client,
            mut backend,
            task,
        } = rig(4096, LONG);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent2 = sent.clone();
        let writer = tokio::spawn(async move {
            let chunk = [7u8; 1024];
            loop {
                if backend.write_all(&chunk).await.is_err() {
                    break;
                }
                sent2.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled = sent.load(std::sync::atomic::Ordering::Relaxed);
        // Backend window + client window + one stack chunk moved to `pending`.
        assert!(
            stalled <= 4096 + 4096 + DOWNSTREAM_CHUNK + 1024,
            "backend wrote {stalled} bytes into a stalled client"
        );
        // Reading at the client lets the backend continue.
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < 100_000 {
            read += client.read(&mut buf).await.unwrap();
        }
        assert!(sent.load(std::sync::atomic::Ordering::Relaxed) >= 100_000 - 8192);
        drop(client);
        writer.abort();
        let (outcome, _) = task.await.unwrap();
        assert!(
            matches!(
                outcome,
                Outcome::ClientError(_) | Outcome::BackendError(_) | Outcome::Closed
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn pending_is_bounded_under_backpressure_and_freed_when_quiet() {
        const SENT: usize = 40_000;
        let (mut client, pump_client) = duplex(1024);
        let (mut backend, mut pump_backend) = duplex(64 * 1024);
        let mut c = BufReader::new(pump_client);
        let mut state = Pump::new(Instant::now());
        backend.write_all(&[1u8; SENT]).await.unwrap();
        // Polls the pump once without waiting; the wakers it registers are not needed here.
        macro_rules! poll_once {
            () => {
                std::future::poll_fn(|cx| {
                    let _ = state.poll(cx, &mut c, &mut pump_backend);
                    Poll::Ready(())
                })
                .await
            };
        }
        poll_once!();
        let held = state.pending.len() - state.pending_pos;
        assert!(
            held > 0 && held <= DOWNSTREAM_CHUNK,
            "pending holds {held} bytes"
        );

        let mut got = 0;
        let mut buf = [0u8; 4096];
        for _ in 0..10_000 {
            if got == SENT {
                break;
            }
            poll_once!();
            let pending = state.pending.len() - state.pending_pos;
            assert!(pending <= DOWNSTREAM_CHUNK, "pending grew to {pending}");
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(5), client.read(&mut buf)).await
            {
                got += n;
            }
        }
        assert_eq!(got, SENT);
        // Quiet now: the next poll finds the backend empty and gives the buffer back.
        poll_once!();
        assert_eq!(state.pending.capacity(), 0);
        assert_eq!(state.traffic.down, SENT as u64);
    }

    #[tokio::test]
    async fn idle_timeout_fires_and_activity_defers_it() {
        let t = Timeouts {
            idle: Duration::from_millis(300),
            half_close: Duration::from_secs(30),
        };
        let Rig {
            mut client,
            mut backend,
            task,
        } = rig(4096, t);
        let start = std::time::Instant::now();
        // Keep it busy for ~600 ms, longer than the idle timeout.
        for _ in 0..6 {
            client.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            backend.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (outcome, _) = task.await.unwrap();
        let elapsed = start.elapsed();
        assert!(matches!(outcome, Outcome::IdleTimeout), "{outcome:?}");
        // Last byte at ~500 ms, so the deadline is ~800 ms: activity deferred it.
        assert!(elapsed >= Duration::from_millis(750), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }

    #[tokio::test]
    async fn half_close_grace_closes_both() {
        let t = Timeouts {
            idle: Duration::from_secs(30),
            half_close: Duration::from_millis(300),
        };
        let Rig {
            mut client,
            mut backend,
            task,
        } = rig(4096, t);
        let start = std::time::Instant::now();
        client.shutdown().await.unwrap();
        // The backend sees EOF (our shutdown(Write)) but never closes its side.
        let mut buf = Vec::new();
        backend.read_to_end(&mut buf).await.unwrap();
        assert!(buf.is_empty());
        let (outcome, traffic) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::HalfCloseTimeout), "{outcome:?}");
        assert!(traffic.client_close_notify);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(290) && elapsed < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn backend_eof_closes_client_side_cleanly() {
        let Rig {
            mut client,
            mut backend,
            task,
        } = rig(4096, LONG);
        backend.write_all(b"bye").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        // The client answers by closing too; the pump then finishes.
        client.shutdown().await.unwrap();
        let (outcome, traffic) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed), "{outcome:?}");
        assert_eq!(traffic.down, 3);
    }
}
