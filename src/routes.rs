//! DID routes: which of a worker's caught-up DID-filtered clients want which DID.
//!
//! A DID filter passes a tiny share of the feed (100 DIDs out of millions), so walking every
//! such client over every new event — a hash compare per client per event — made the worker's
//! CPU grow with clients × events although almost nothing is sent: at 1,000 clients × 500
//! ev/s that walk was three quarters of the worker's time. Turned around, a worker routes each
//! new event once, by the `did_hash` in its index entry, to the clients that want that DID,
//! and wakes only those; a caught-up DID client costs nothing until one of its DIDs appears.
//!
//! Registration is per client, once (at its first park; again after an `options_update`), so
//! that parking and waking cost O(1): a lookup finds every registered client, and the worker
//! wakes those that are parked. Entries of clients that left or changed their filter are
//! dropped lazily ([`Routes::compact`]), recognized by a token that changes with every
//! registration. Pure bookkeeping, no I/O: the worker owns the clients and the index walk.

use std::collections::HashMap;

/// One registered client wanting a DID hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The client's slot in its worker.
    pub slot: u32,
    /// The registration this entry belongs to: stale once the client's own token differs.
    pub token: u32,
}

/// A worker's DID routes.
#[derive(Default)]
pub struct Routes {
    /// `did_hash` → the clients registered for it (32-bit hashes: a hit is a candidate, which
    /// the client's own walk confirms on the event's JSON).
    by_hash: HashMap<u32, Vec<Route>>,
    /// Entries in `by_hash`, stale ones included.
    entries: usize,
    /// Entries known to be stale (their client left or re-registered).
    stale: usize,
    /// Last token handed out (0 is never one: it means "not registered").
    last_token: u32,
}

/// Compaction only pays once this many stale entries pile up; below it, they cost nothing.
const COMPACT_MIN_STALE: usize = 4096;

impl Routes {
    /// Registers the client in `slot` for `hashes` (sorted and deduplicated by the caller, so
    /// that an entry is not listed twice). Returns its token.
    pub fn register(&mut self, slot: u32, hashes: &[u32]) -> u32 {
        debug_assert!(hashes.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        self.last_token = self.last_token.wrapping_add(1).max(1);
        let token = self.last_token;
        for &h in hashes {
            self.by_hash
                .entry(h)
                .or_default()
                .push(Route { slot, token });
        }
        self.entries += hashes.len();
        token
    }

    /// A registration of `n` hashes went stale (its client left or changed its filter).
    pub fn forget(&mut self, n: usize) {
        self.stale = (self.stale + n).min(self.entries);
    }

    /// The clients registered for `hash` (stale entries included: check the token).
    pub fn hits(&self, hash: u32) -> &[Route] {
        self.by_hash.get(&hash).map_or(&[], |v| v.as_slice())
    }

    /// Whether no live registration is left (then routing can skip the walk); stale entries
    /// may still be held until [`Routes::compact`].
    pub fn is_empty(&self) -> bool {
        self.entries == self.stale
    }

    /// Drops stale entries once they outnumber the live ones (and are many): `live(route)`
    /// says whether a route's client still holds that token. Amortized O(1) per registration.
    pub fn compact(&mut self, live: impl Fn(Route) -> bool) {
        if self.stale < COMPACT_MIN_STALE || self.stale * 2 < self.entries {
            return;
        }
        let mut entries = 0;
        self.by_hash.retain(|_, v| {
            v.retain(|&r| live(r));
            entries += v.len();
            !v.is_empty()
        });
        self.by_hash.shrink_to_fit();
        self.entries = entries;
        self.stale = 0;
    }

    /// Entries held, stale ones included (not `len`: a `Routes` with only stale entries is
    /// empty but still holds them).
    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_list_every_registration_of_a_hash() {
        let mut r = Routes::default();
        assert!(r.is_empty());
        let a = r.register(1, &[10, 20, 30]);
        let b = r.register(2, &[20]);
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(r.hits(10), &[Route { slot: 1, token: a }]);
        assert_eq!(
            r.hits(20),
            &[Route { slot: 1, token: a }, Route { slot: 2, token: b }]
        );
        assert!(r.hits(40).is_empty());
        assert_eq!(r.entries(), 4);
        assert!(!r.is_empty());
    }

    #[test]
    fn stale_entries_are_dropped_once_they_dominate() {
        let mut r = Routes::default();
        let hashes: Vec<u32> = (0..COMPACT_MIN_STALE as u32).collect();
        let old = r.register(7, &hashes);
        let kept = r.register(8, &[1, 2]);
        // Slot 7 re-registers (an options_update): its first entries go stale.
        r.forget(hashes.len());
        let new = r.register(7, &[3]);
        let live = |route: Route| match route.slot {
            7 => route.token == new,
            8 => route.token == kept,
            _ => false,
        };
        assert_eq!(r.entries(), hashes.len() + 3);
        r.compact(live);
        assert_eq!(r.entries(), 3, "only the live registrations remain");
        assert_eq!(
            r.hits(1),
            &[Route {
                slot: 8,
                token: kept
            }]
        );
        assert_eq!(
            r.hits(3),
            &[Route {
                slot: 7,
                token: new
            }]
        );
        assert!(r.hits(100).is_empty(), "token {old} is gone");
    }

    #[test]
    fn a_few_stale_entries_are_left_alone() {
        let mut r = Routes::default();
        r.register(1, &[1, 2, 3]);
        r.forget(3);
        assert!(r.is_empty());
        r.compact(|_| false);
        assert_eq!(
            r.entries(),
            3,
            "below COMPACT_MIN_STALE compaction does not pay"
        );
    }
}
