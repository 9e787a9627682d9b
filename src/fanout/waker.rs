//! The writer → worker wake-up: an eventfd plus a flag that coalesces wake-ups the worker has
//! not consumed yet, so a busy writer does not pay a syscall per event per worker.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One worker's wake-up.
pub struct Waker {
    /// The eventfd whose read is always armed in the worker's ring.
    fd: OwnedFd,
    /// Set by `wake`, cleared by the worker when the read completes.
    pending: AtomicBool,
    /// Append time (unix µs) of the first append since the worker last consumed a wake-up:
    /// the oldest data the worker has not handed out yet, so delivery latency counts from it.
    since_us: AtomicU64,
    /// Clients the worker owns (least-loaded placement, metrics). Kept here because a worker
    /// without clients has nothing to do with new data: an idle worker costs no wake-up per
    /// event (its next client comes with its own).
    pub(super) clients: AtomicU64,
}

impl Waker {
    /// A fresh eventfd with nothing pending.
    pub fn new() -> std::io::Result<Waker> {
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
            self.kick();
        }
    }

    /// Wakes the worker unconditionally (a new client, shutdown): not coalesced, so it is
    /// picked up even while data wake-ups are pending.
    pub fn kick(&self) {
        // A full eventfd counter (2^64 − 2 unread wake-ups) cannot happen: the worker reads it.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears the pending flag; returns the append time of the oldest data announced since
    /// the previous call (0 if none: a wake-up for a new client).
    pub(super) fn consumed(&self) -> u64 {
        let since = self.since_us.swap(0, Ordering::SeqCst);
        self.pending.store(false, Ordering::SeqCst);
        since
    }

    /// The eventfd, for the ring's read.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the eventfd without blocking: the number of wake-ups written since the last read.
    fn wakes_written(w: &Waker) -> u64 {
        let mut buf = [0u8; 8];
        let fl = rustix::fs::fcntl_getfl(&w.fd).expect("getfl");
        rustix::fs::fcntl_setfl(&w.fd, fl | rustix::fs::OFlags::NONBLOCK).expect("setfl");
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
}
