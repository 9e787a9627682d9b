//! Counters, gauges, per-address handshake counts and a log throttle shared by all
//! connections.
//!
//! The global caps are tokio semaphores owned by the server (`max_connections`: an owned
//! permit per connection task; `max_handshakes`: a permit held during the handshake's crypto
//! only). Per address (per /64 for IPv6), checked at accept before any TLS work: the relay's
//! limiter ([`crate::limits::Limits`]: concurrent connections and a connection rate, which is
//! the rate of full handshakes one address can make us compute) and [`AddressCounts`]
//! (handshakes in progress). This module also keeps what an operator needs to see them work:
//! how many connections are in each phase, and how many were refused or failed, and why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Connections closed at accept: their address had `max_conns_per_ip` connections.
    pub rejected_conns_per_ip: AtomicU64,
    /// Connections closed at accept: their address exceeded `conn_rate_per_ip`.
    pub rejected_rate_per_ip: AtomicU64,
    /// Connections closed at accept: their address had `max_handshakes_per_ip` handshakes
    /// in progress.
    pub rejected_handshakes_per_ip: AtomicU64,
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
             {} over max_conns_per_ip, {} over conn_rate_per_ip, \
             {} over max_handshakes_per_ip, \
             {} handshake failures, {} handshake timeouts, {} backend failures, \
             {} idle timeouts, {} half-close timeouts, {} accept errors",
            self.established.load(Ordering::Relaxed),
            self.handshaking.load(Ordering::Relaxed),
            Self::get(&self.accepted),
            Self::get(&self.rejected_over_capacity),
            Self::get(&self.rejected_conns_per_ip),
            Self::get(&self.rejected_rate_per_ip),
            Self::get(&self.rejected_handshakes_per_ip),
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

/// How many handshakes each address key has in progress. Entries exist only while nonzero,
/// so the map is bounded by the handshakes in progress.
#[derive(Debug, Default)]
pub struct AddressCounts {
    /// Address key → handshakes in progress.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted handshake; uncounted on drop.
#[derive(Debug)]
pub struct AddressSlot {
    /// Where it is counted.
    counts: Arc<AddressCounts>,
    /// Under which key.
    key: IpAddr,
}

impl AddressCounts {
    /// Counts one more for `key` unless it already has `max`.
    pub fn try_enter(self: &Arc<Self>, key: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: self.clone(),
            key,
        })
    }

    /// Handshakes in progress for `key`.
    pub fn get(&self, key: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}
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

    #[test]
    fn address_counts_cap_and_forget() {
        let counts = Arc::new(AddressCounts::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = counts.try_enter(a, 2).unwrap();
        let _s2 = counts.try_enter(a, 2).unwrap();
        assert!(counts.try_enter(a, 2).is_none());
        assert!(counts.try_enter(b, 2).is_some());
        drop(s1);
        assert_eq!(counts.get(a), 1);
        assert!(counts.try_enter(a, 2).is_some());
        drop(_s2);
        assert_eq!(counts.get(a), 0);
        assert!(
            counts.counts.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }
}
