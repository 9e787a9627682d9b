//! A global memory budget for per-client filter state (`wantedDids`, `wantedCollections`).
//!
//! A client may hold up to 10,000 DIDs (about a megabyte with what the fan-out keeps per DID),
//! and the per-address limits alone let many addresses each hold dozens of such clients. So
//! every client's filter state is charged against one budget (`--max-filter-memory`), of which
//! one address (per /64 for IPv6) may hold only a share (`--max-filter-memory-per-ip`), so that
//! one address cannot take it all from everyone else. A [`Reservation`] is taken before the
//! state is kept — at the handshake by the listener, for an `options_update` by the worker —
//! and given back when it is dropped (the client leaves or replaces its filters). Beyond
//! either limit the handshake is refused (503 with a reason) and an `options_update` is
//! answered with a close frame saying why; clients without filters cost nothing and are never
//! refused by it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::limits::{address_key, in_network};
use crate::subscription::SubscriberOptions;

/// Bytes charged per wanted DID on top of its text. Why 112: the `String` (24) and allocator
/// rounding in the client's options, its 4-byte hash in the walker, its entry in the worker's
/// DID routes (hash, client slot, table overhead). Measured: the relay's RSS grew 141 bytes
/// per 32-byte DID with twelve 10,000-DID clients (`tests/admission.rs`), i.e. text + ~110.
pub const DID_OVERHEAD_BYTES: u64 = 112;

/// Bytes charged per wanted collection pattern on top of its text (the `String` and enum
/// in the options, a verdict byte per interned collection in the walker).
pub const COLLECTION_OVERHEAD_BYTES: u64 = 48;

/// What a client's filters cost in memory, as charged to the budget.
pub fn filter_state_bytes(options: &SubscriberOptions) -> u64 {
    let dids: u64 = options
        .wanted_dids
        .iter()
        .map(|d| d.len() as u64 + DID_OVERHEAD_BYTES)
        .sum();
    let collections: u64 = options
        .wanted_collections
        .iter()
        .map(|c| c.to_string().len() as u64 + COLLECTION_OVERHEAD_BYTES)
        .sum();
    dids + collections
}

/// The budget, shared by the listener and the workers.
#[derive(Debug)]
pub struct FilterBudget {
    /// Bytes that may be reserved in total.
    limit: u64,
    /// Bytes one address key may hold.
    per_address: u64,
    /// Networks whose clients are charged to the total only (`--allow-ip`).
    allow: Vec<(IpAddr, u8)>,
    /// Bytes reserved now, in total and per address key (entries only while nonzero, so
    /// the map is bounded by the clients with filters). One lock: reservations happen once
    /// per handshake or `options_update`, never per event.
    state: Mutex<(u64, HashMap<IpAddr, u64>)>,
    /// Bytes reserved now (a copy of the total for lock-free metrics).
    used: AtomicU64,
    /// Reservations refused, for metrics.
    refused: AtomicU64,
}

/// Filter state charged to the budget until this is dropped.
#[derive(Debug)]
pub struct Reservation {
    /// The budget charged and the address key charged (None for an empty reservation).
    charged: Option<(Arc<FilterBudget>, Option<IpAddr>)>,
    /// Bytes charged.
    bytes: u64,
}

/// A reservation the budget could not make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetFull {
    /// The whole budget is taken.
    #[error(
        "server busy: the filter memory budget is full ({needed} bytes needed for wantedDids \
         and wantedCollections); try again later or with fewer wantedDids"
    )]
    Total {
        /// Bytes the filters would have cost.
        needed: u64,
    },
    /// The address's share is taken.
    #[error(
        "too much filter state from your address ({needed} more bytes of wantedDids and \
         wantedCollections would exceed its share); close other connections or use fewer \
         wantedDids"
    )]
    Address {
        /// Bytes the filters would have cost.
        needed: u64,
    },
}

impl BudgetFull {
    /// The handshake's answer: 429 when the client's own address holds its share (it is
    /// the one to back off), 503 when the whole budget is taken.
    pub fn http_status(&self) -> u16 {
        match self {
            BudgetFull::Address { .. } => 429,
            BudgetFull::Total { .. } => 503,
        }
    }
}

impl FilterBudget {
    /// A budget of `limit` bytes, at most `per_address` of them for one address key; the
    /// clients of `allow` networks are charged to the total only.
    pub fn new(limit: u64, per_address: u64, allow: Vec<(IpAddr, u8)>) -> Arc<FilterBudget> {
        Arc::new(FilterBudget {
            limit,
            per_address,
            allow,
            state: Mutex::new((0, HashMap::new())),
            used: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Charges what `options` cost to the total and to `peer`'s address, or refuses
    /// (counted) if that would exceed either. Filters that cost nothing always succeed.
    pub fn reserve(
        self: &Arc<Self>,
        options: &SubscriberOptions,
        peer: IpAddr,
    ) -> Result<Reservation, BudgetFull> {
        self.reserve_bytes(filter_state_bytes(options), peer)
    }

    /// Charges `bytes` to the total and to `peer`'s address, or refuses (counted).
    pub fn reserve_bytes(
        self: &Arc<Self>,
        bytes: u64,
        peer: IpAddr,
    ) -> Result<Reservation, BudgetFull> {
        if bytes == 0 {
            return Ok(Reservation::none());
        }
        let key = (!self.allow.iter().any(|n| in_network(peer, *n))).then(|| address_key(peer));
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_address) = &mut *guard;
        let refuse = |why: BudgetFull| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(why)
        };
        if let Some(k) = key {
            let held = per_address.get(&k).copied().unwrap_or(0);
            if held.saturating_add(bytes) > self.per_address {
                return refuse(BudgetFull::Address { needed: bytes });
            }
        }
        if total.saturating_add(bytes) > self.limit {
            return refuse(BudgetFull::Total { needed: bytes });
        }
        *total += bytes;
        if let Some(k) = key {
            *per_address.entry(k).or_insert(0) += bytes;
        }
        self.used.store(*total, Ordering::Relaxed);
        Ok(Reservation {
            charged: Some((self.clone(), key)),
            bytes,
        })
    }

    fn release(&self, bytes: u64, key: Option<IpAddr>) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_address) = &mut *guard;
        *total = total.saturating_sub(bytes);
        if let Some(k) = key
            && let Some(held) = per_address.get_mut(&k)
        {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                per_address.remove(&k);
            }
        }
        self.used.store(*total, Ordering::Relaxed);
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Reservations refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Reservation {
    /// A reservation of nothing (a client without filters).
    pub fn none() -> Reservation {
        Reservation {
            charged: None,
            bytes: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((budget, key)) = &self.charged {
            budget.release(self.bytes, *key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dids: usize, collections: &[&str]) -> SubscriberOptions {
        let dids: Vec<String> = (0..dids).map(|i| format!("did:plc:{i:024}")).collect();
        SubscriberOptions::new(collections, &dids, None).unwrap()
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, i])
    }

    #[test]
    fn reservations_are_charged_refused_and_given_back() {
        let big = opts(10_000, &[]);
        let cost = filter_state_bytes(&big);
        assert_eq!(cost, 10_000 * (32 + DID_OVERHEAD_BYTES));
        let budget = FilterBudget::new(cost * 3 + 10, cost * 2, vec![]);
        // One address: its share (two) then refused, with the address's reason.
        let mut held: Vec<_> = (0..2)
            .map(|_| budget.reserve(&big, ip(1)).unwrap())
            .collect();
        let err = budget.reserve(&big, ip(1)).unwrap_err();
        assert_eq!(err, BudgetFull::Address { needed: cost });
        assert!(err.to_string().contains("from your address"), "{err}");
        // Another address still fits while there is room in total...
        held.push(budget.reserve(&big, ip(2)).unwrap());
        assert_eq!(budget.used(), cost * 3);
        // ...and then the total is full for everyone.
        let err = budget.reserve(&big, ip(3)).unwrap_err();
        assert_eq!(err, BudgetFull::Total { needed: cost });
        assert!(
            err.to_string().contains("filter memory budget is full"),
            "{err}"
        );
        assert_eq!(budget.refused(), 2);
        // Small filters still fit, and no filter always does.
        let small = budget.reserve_bytes(10, ip(3)).unwrap();
        assert!(budget.reserve(&opts(0, &[]), ip(1)).is_ok());
        drop(held);
        drop(small);
        assert_eq!(budget.used(), 0);
        assert!(
            budget.state.lock().unwrap().1.is_empty(),
            "no entry left behind"
        );
        assert!(budget.reserve(&big, ip(1)).is_ok());
        assert_eq!(budget.used(), 0, "dropped at once");
    }

    #[test]
    fn exempt_addresses_are_charged_to_the_total_only() {
        let budget = FilterBudget::new(100, 10, vec![(ip(0), 24)]);
        let held: Vec<_> = (0..5)
            .map(|_| budget.reserve_bytes(20, ip(9)).unwrap())
            .collect();
        assert!(
            budget.reserve_bytes(20, ip(9)).is_err(),
            "the total still applies"
        );
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn collections_cost_their_text() {
        let o = opts(0, &["app.bsky.feed.post", "app.bsky.graph.*"]);
        assert_eq!(
            filter_state_bytes(&o),
            ("app.bsky.feed.post".len() + "app.bsky.graph.*".len()) as u64
                + 2 * COLLECTION_OVERHEAD_BYTES
        );
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        let budget = FilterBudget::new(1000, 1000, vec![]);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(r) = b.reserve_bytes(7, ip(1)) {
                            assert!(b.used() <= 1000);
                            drop(r);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.used(), 0);
    }
}
