//! Counters, gauges and a log throttle shared by all connections.
//!
//! The caps themselves are tokio semaphores owned by the server (`max_connections`: an owned
//! permit per connection task; `max_handshakes`: a permit held during the handshake only).
//! This module keeps what an operator needs to see them work: how many connections are in
//! each phase, and how many were refused or failed, and why.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Live counts and running totals. Relaxed atomics: these are statistics, never used to
/// make a decision that needs ordering with other memory.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections between accept and the end of the TLS handshake.
    pub handshaking: AtomicUsize,
    /// Connections past the handshake (talking to, or trying to reach, the backend).
    pub established: AtomicUsize,
    /// Total connections accepted and given a task.
    pub accepted: AtomicU64,
    /// Connections closed at once because `max_connections` was reached.
    pub rejected_over_capacity: AtomicU64,
    /// Handshakes that failed: garbage, plaintext HTTP, truncated ClientHello, bad TLS.
    pub handshake_failures: AtomicU64,
    /// Handshakes not finished within `handshake_timeout`.
    pub handshake_timeouts: AtomicU64,
    /// Established connections whose backend could not be reached.
    pub backend_failures: AtomicU64,
    /// Established connections closed for inactivity.
    pub idle_timeouts: AtomicU64,
    /// Established connections closed because one side stayed half-closed too long.
    pub half_close_timeouts: AtomicU64,
    /// accept(2) errors (EMFILE and friends).
    pub accept_errors: AtomicU64,
}

impl Stats {
    /// Adds one to a total.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// One line for sd_notify STATUS= and logs.
    pub fn summary(&self) -> String {
        format!(
            "{} established, {} handshaking; totals: {} accepted, {} over capacity, \
             {} handshake failures, {} handshake timeouts, {} backend failures, \
             {} idle timeouts, {} half-close timeouts, {} accept errors",
            self.established.load(Ordering::Relaxed),
            self.handshaking.load(Ordering::Relaxed),
            Self::get(&self.accepted),
            Self::get(&self.rejected_over_capacity),
            Self::get(&self.handshake_failures),
            Self::get(&self.handshake_timeouts),
            Self::get(&self.backend_failures),
            Self::get(&self.idle_timeouts),
            Self::get(&self.half_close_timeouts),
            Self::get(&self.accept_errors),
        )
    }
}

/// Increments a gauge for as long as it lives, so every exit path decrements it.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicUsize);

impl<'a> GaugeGuard<'a> {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub use crate::limits::Throttle;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_guard_decrements_on_drop() {
        let stats = Stats::default();
        {
            let _a = GaugeGuard::new(&stats.established);
            let _b = GaugeGuard::new(&stats.established);
            assert_eq!(stats.established.load(Ordering::Relaxed), 2);
        }
        assert_eq!(stats.established.load(Ordering::Relaxed), 0);
        Stats::bump(&stats.accepted);
        assert!(
            stats
                .summary()
                .starts_with("0 established, 0 handshaking; totals: 1 accepted")
        );
    }
}
