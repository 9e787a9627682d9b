//! The real kernel: io_uring for the data path, plain syscalls for `recv` and `shutdown`.
//! This is the one place where the driver's entries become SQEs, and so the one `unsafe`
//! boundary of the fan-out: a pushed SQE's pointers must stay valid until its completion is
//! reaped, which the driver guarantees (see `driver.rs`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{IoUring, opcode, squeue, types};

use super::driver::{Completion, Entry, Kernel, PIPE_BYTES};
use super::waker::Waker;

/// Why 4096: enough SQEs to serve thousands of clients in one `io_uring_enter`; beyond that a
/// loop simply submits more than once.
const RING_ENTRIES: u32 = 4096;
/// Completion queue size: at most two CQEs per SQE in flight plus multishot polls.
const CQ_ENTRIES: u32 = 16384;

/// One pooled pipe.
pub struct Pipe {
    /// Read end (spliced to sockets).
    r: OwnedFd,
    /// Write end (spliced into from the log).
    w: OwnedFd,
}

/// A worker's io_uring.
pub struct Uring {
    /// The ring.
    ring: IoUring,
    /// The worker's wake-up eventfd (read by [`Entry::ReadWake`]).
    waker: Arc<Waker>,
    /// Where the wake-up read puts the eventfd's counter (boxed: the kernel writes it while
    /// the read is in flight).
    wake_buf: Box<[u8; 8]>,
}

impl Uring {
    /// A ring for a worker woken through `waker`.
    pub fn new(waker: Arc<Waker>) -> io::Result<Uring> {
        Ok(Uring {
            ring: build_ring()?,
            waker,
            wake_buf: Box::new([0; 8]),
        })
    }
}

impl Kernel for Uring {
    type Socket = OwnedFd;
    type Pipe = Pipe;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_us(&self) -> u64 {
        crate::index::now_us().max(0) as u64
    }

    fn sq_room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    unsafe fn push(&mut self, entry: Entry<'_, OwnedFd, Pipe>, user_data: u64) {
        let fd = |f: &OwnedFd| types::Fd(f.as_raw_fd());
        let sqe = match entry {
            Entry::Send { sock, ptr, len } => opcode::Send::new(fd(sock), ptr, len)
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build(),
            Entry::SpliceIn {
                file,
                off,
                pipe,
                len,
            } => opcode::Splice::new(types::Fd(file.raw_fd()), off as i64, fd(&pipe.w), -1, len)
                .build()
                .flags(squeue::Flags::IO_LINK),
            Entry::SpliceOut { pipe, sock, len } => {
                opcode::Splice::new(fd(&pipe.r), -1, fd(sock), -1, len)
                    .flags(libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE)
                    .build()
            }
            Entry::PollOut { sock } => opcode::PollAdd::new(fd(sock), libc::POLLOUT as u32).build(),
            Entry::PollIn { sock } => {
                opcode::PollAdd::new(fd(sock), (libc::POLLIN | libc::POLLRDHUP) as u32)
                    .multi(true)
                    .build()
            }
            Entry::Cancel { sock } => {
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(fd(sock)).all()).build()
            }
            Entry::ReadWake => {
                let efd = types::Fd(self.waker.fd().as_raw_fd());
                opcode::Read::new(efd, self.wake_buf.as_mut_ptr(), 8).build()
            }
        };
        let sqe = sqe.user_data(user_data);
        // SAFETY: the caller upholds `Kernel::push`'s contract: every pointer in the entry
        // stays valid and every fd open until its completion is reaped.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        // Never submit here: that could split a linked pair; the driver made room first.
        assert!(pushed.is_ok(), "io_uring push into a full submission queue");
    }

    fn submit(&mut self, wait: Option<Instant>) -> io::Result<()> {
        let Some(deadline) = wait else {
            return retry_next_loop(self.ring.submit());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return retry_next_loop(self.ring.submit());
        }
        let ts = types::Timespec::new()
            .sec(left.as_secs())
            .nsec(left.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            other => retry_next_loop(other),
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            out.push(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                more: io_uring::cqueue::more(cqe.flags()),
            });
        }
    }

    fn recv(&mut self, sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
        rustix::net::recv(sock, buf, rustix::net::RecvFlags::DONTWAIT)
            .map(|(n, _)| n)
            .map_err(io::Error::from)
    }

    fn shutdown(&mut self, sock: &OwnedFd, how: rustix::net::Shutdown) {
        // ENOTCONN (the peer is already gone) is fine: the point is only to end the stream.
        let _ = rustix::net::shutdown(sock, how);
    }

    fn new_pipe(&mut self) -> io::Result<Pipe> {
        let (r, w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        // Best effort: a smaller pipe only means smaller splice batches.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_BYTES);
        Ok(Pipe { r, w })
    }
}

/// `io_uring_enter` interrupted (EINTR) or with a full completion queue (EBUSY) is not an error:
/// the next loop reaps and submits again.
fn retry_next_loop(r: io::Result<usize>) -> io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
        other => other.map(drop),
    }
}

/// Creates a worker's ring; on ENOMEM (the kernel could not find contiguous memory for the
/// rings) retries with smaller queues rather than refusing to start.
fn build_ring() -> io::Result<IoUring> {
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
