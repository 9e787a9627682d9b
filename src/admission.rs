//! Handshake slots: the listener's table of connections that have not finished their
//! handshake, with a cap in total, a cap per address and fair eviction when full.
//!
//! Why here and not in [`crate::limits`]: a slot costs the listener memory (the request head
//! so far) and a deadline for as long as the peer wants, whereas the per-address limits count
//! connections over their whole life. A silent or slow peer must not be able to hold more
//! than its share of slots: each address (per /64 for IPv6) holds at most `max_per_address`,
//! and when the table is full a newcomer from an address holding fewer slots than the
//! heaviest holder takes that holder's oldest slot. So a client from a well-behaved address
//! is refused only when every address holding slots holds no more than one more than it —
//! when the process really is at capacity, not because one address flooded it.
//!
//! Deadlines are `accept time + one fixed timeout`, so they come due in insertion order: a
//! FIFO finds the next one in O(1) (no scan of every pending handshake per wake-up).
//!
//! A pure state machine over tokens: the listener keeps the sockets in the values. The
//! listener's cursor-scan queue is one too, served oldest first ([`HandshakeSlots::pop_oldest`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

/// Why a slot was not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The address already holds `max_per_address` slots.
    PerAddress,
    /// The table is full and no holder has more than one slot more than this address.
    Full,
}

/// Who a slot is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Not known yet (trusted listener before its PROXY header): counted in the total only.
    Unknown,
    /// An address key (see [`crate::limits::address_key`]) under the per-address cap.
    Limited(IpAddr),
    /// An address exempt from per-address limits (`--allow-ip`): no per-address cap, but it
    /// can still be evicted when it is the heaviest holder of a full table.
    Exempt(IpAddr),
}

impl Holder {
    fn address(self) -> Option<IpAddr> {
        match self {
            Holder::Unknown => None,
            Holder::Limited(a) | Holder::Exempt(a) => Some(a),
        }
    }
}

/// One held slot.
struct Slot<T> {
    /// The caller's value (the listener's pending connection).
    value: T,
    /// Who it is counted under.
    holder: Holder,
}

/// The table. `T` is whatever the caller keeps per pending connection.
pub struct HandshakeSlots<T> {
    /// Token → slot.
    slots: HashMap<u64, Slot<T>>,
    /// Address key → its tokens, oldest first (at most `max_per_address` for limited ones).
    by_address: HashMap<IpAddr, VecDeque<u64>>,
    /// (slots held, address) for every address holding slots: the heaviest is the last.
    weights: BTreeSet<(usize, IpAddr)>,
    /// (deadline, token) in insertion order, which is deadline order; entries whose token
    /// is gone are skipped when they reach the front, and purged when they pile up.
    deadlines: VecDeque<(Instant, u64)>,
    /// The next token handed out.
    next_token: u64,
    /// Slots in total.
    max_total: usize,
    /// Slots per limited address.
    max_per_address: usize,
}

/// Why: stale deadline entries (handshakes that finished early) are dropped lazily; beyond
/// this many per live slot the FIFO is compacted, so its memory follows the live table.
const STALE_DEADLINES_PER_SLOT: usize = 4;

impl<T> HandshakeSlots<T> {
    /// An empty table.
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        HandshakeSlots {
            slots: HashMap::new(),
            by_address: HashMap::new(),
            weights: BTreeSet::new(),
            deadlines: VecDeque::new(),
            next_token: 0,
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
        }
    }

    /// Slots held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots held by `address`.
    pub fn held_by(&self, address: IpAddr) -> usize {
        self.by_address.get(&address).map_or(0, VecDeque::len)
    }

    /// Whether `holder` may take one more slot, and which slot it would take from whom:
    /// `Ok(None)` = a free slot, `Ok(Some(token))` = that slot is to be evicted first.
    fn room_for(&self, holder: Holder) -> Result<Option<u64>, SlotRefusal> {
        let held = holder.address().map_or(0, |a| self.held_by(a));
        if let Holder::Limited(_) = holder
            && held >= self.max_per_address
        {
            return Err(SlotRefusal::PerAddress);
        }
        if self.slots.len() < self.max_total {
            return Ok(None);
        }
        // Full: take the heaviest holder's oldest slot if that makes the table fairer.
        let &(heaviest, victim) = self.weights.last().ok_or(SlotRefusal::Full)?;
        if heaviest <= held + 1 || Some(victim) == holder.address() {
            return Err(SlotRefusal::Full);
        }
        let token = self
            .by_address
            .get(&victim)
            .and_then(|t| t.front().copied())
            .ok_or(SlotRefusal::Full)?;
        Ok(Some(token))
    }

    /// Takes a slot for `value` until `deadline`. Returns its token and, if the table was
    /// full, the value of the slot evicted to make room (the caller refuses that connection).
    pub fn insert(
        &mut self,
        value: T,
        holder: Holder,
        deadline: Instant,
    ) -> Result<(u64, Option<T>), (SlotRefusal, T)> {
        let evicted = match self.room_for(holder) {
            Ok(None) => None,
            Ok(Some(victim)) => self.remove(victim),
            Err(why) => return Err((why, value)),
        };
        let token = self.next_token;
        self.next_token += 1;
        self.slots.insert(token, Slot { value, holder });
        self.count_in(holder, token);
        self.deadlines.push_back((deadline, token));
        if self.deadlines.len() > STALE_DEADLINES_PER_SLOT * self.slots.len().max(64) {
            let slots = &self.slots;
            self.deadlines.retain(|(_, t)| slots.contains_key(t));
        }
        Ok((token, evicted))
    }

    /// Counts slot `token` under the address it now has (the trusted listener learns it from
    /// the PROXY header). Refused (and the slot left as it was) if that address is at its cap
    /// or the table has no fair room for it; the caller then refuses and removes the slot.
    pub fn assign(&mut self, token: u64, holder: Holder) -> Result<(), SlotRefusal> {
        let Some(slot) = self.slots.get(&token) else {
            return Ok(());
        };
        if slot.holder == holder {
            return Ok(());
        }
        let old = slot.holder;
        // The slot already exists, so only the per-address cap can refuse it; no eviction.
        if let Holder::Limited(a) = holder
            && self.held_by(a) >= self.max_per_address
        {
            return Err(SlotRefusal::PerAddress);
        }
        self.count_out(old, token);
        if let Some(slot) = self.slots.get_mut(&token) {
            slot.holder = holder;
        }
        self.count_in(holder, token);
        Ok(())
    }

    /// The value of slot `token`.
    pub fn get_mut(&mut self, token: u64) -> Option<&mut T> {
        self.slots.get_mut(&token).map(|s| &mut s.value)
    }

    /// Gives slot `token` back; returns its value.
    pub fn remove(&mut self, token: u64) -> Option<T> {
        let slot = self.slots.remove(&token)?;
        self.count_out(slot.holder, token);
        Some(slot.value)
    }

    /// Removes and returns the oldest held slot: the table as a fair first-in, first-out
    /// queue (the listener's cursor-scan queue).
    pub fn pop_oldest(&mut self) -> Option<T> {
        while let Some((_, token)) = self.deadlines.pop_front() {
            if let Some(value) = self.remove(token) {
                return Some(value);
            }
        }
        None
    }

    /// The earliest deadline of a held slot.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if self.slots.contains_key(&token) {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Removes and returns every slot whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(v) = self.remove(token) {
                out.push(v);
            }
        }
        out
    }

    fn count_in(&mut self, holder: Holder, token: u64) {
        let Some(a) = holder.address() else { return };
        let tokens = self.by_address.entry(a).or_default();
        let before = tokens.len();
        tokens.push_back(token);
        if before > 0 {
            self.weights.remove(&(before, a));
        }
        self.weights.insert((before + 1, a));
    }

    fn count_out(&mut self, holder: Holder, token: u64) {
        let Some(a) = holder.address() else { return };
        let Some(tokens) = self.by_address.get_mut(&a) else {
            return;
        };
        let before = tokens.len();
        tokens.retain(|t| *t != token);
        let after = tokens.len();
        if after == before {
            return;
        }
        self.weights.remove(&(before, a));
        if after == 0 {
            self.by_address.remove(&a);
        } else {
            self.weights.insert((after, a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, i])
    }

    #[test]
    fn per_address_cap_then_other_addresses_still_fit() {
        let t0 = Instant::now();
        let mut s = HandshakeSlots::new(100, 3);
        for n in 0..3 {
            assert!(s.insert(n, Holder::Limited(ip(1)), t0).is_ok());
        }
        assert_eq!(
            s.insert(9, Holder::Limited(ip(1)), t0).err().map(|e| e.0),
            Some(SlotRefusal::PerAddress)
        );
        // Exempt addresses have no per-address cap.
        for n in 0..10 {
            assert!(s.insert(n, Holder::Exempt(ip(9)), t0).is_ok());
        }
        assert!(s.insert(1, Holder::Limited(ip(2)), t0).is_ok());
        assert_eq!(s.len(), 14);
    }

    #[test]
    fn pop_oldest_serves_in_arrival_order_skipping_evicted_and_removed_slots() {
        let t0 = Instant::now();
        let mut s = HandshakeSlots::new(3, 2);
        s.insert("a1", Holder::Limited(ip(1)), t0).ok().unwrap();
        let (b1, _) = s.insert("b1", Holder::Exempt(ip(2)), t0).ok().unwrap();
        s.insert("a2", Holder::Limited(ip(1)), t0).ok().unwrap();
        // Full (2, 1): a newcomer evicts a1, the oldest of the heaviest.
        let (_, evicted) = s.insert("c1", Holder::Limited(ip(3)), t0).ok().unwrap();
        assert_eq!(evicted, Some("a1"));
        assert_eq!(s.remove(b1), Some("b1"));
        assert_eq!(s.pop_oldest(), Some("a2"));
        assert_eq!(s.held_by(ip(1)), 0, "a popped slot is given back");
        assert_eq!(s.pop_oldest(), Some("c1"));
        assert_eq!(s.pop_oldest(), None);
        assert!(s.is_empty());
        // And the table takes new slots after being drained.
        assert!(s.insert("a3", Holder::Limited(ip(1)), t0).is_ok());
        assert_eq!(s.pop_oldest(), Some("a3"));
    }

    #[test]
    fn full_table_evicts_the_heaviest_holders_oldest_slot() {
        let t0 = Instant::now();
        let mut s = HandshakeSlots::new(4, 3);
        let (first, _) = s.insert("a1", Holder::Limited(ip(1)), t0).ok().unwrap();
        s.insert("a2", Holder::Limited(ip(1)), t0).ok().unwrap();
        s.insert("a3", Holder::Limited(ip(1)), t0).ok().unwrap();
        s.insert("b1", Holder::Limited(ip(2)), t0).ok().unwrap();
        // Full. A newcomer with no slot takes a1 (heaviest holder, oldest slot).
        let (_, evicted) = s.insert("c1", Holder::Limited(ip(3)), t0).ok().unwrap();
        assert_eq!(evicted, Some("a1"));
        assert!(s.get_mut(first).is_none());
        assert_eq!(s.held_by(ip(1)), 2);
        // Now 2,1,1: a fourth address (0 held) may take one of ip(1)'s (2 > 0 + 1).
        let (_, evicted) = s.insert("d1", Holder::Limited(ip(4)), t0).ok().unwrap();
        assert_eq!(evicted, Some("a2"));
        // 1,1,1,1: nobody holds more than a newcomer's 0 + 1: really full.
        assert_eq!(
            s.insert("e1", Holder::Limited(ip(5)), t0)
                .err()
                .map(|e| e.0),
            Some(SlotRefusal::Full)
        );
        // And the heaviest never evicts itself.
        assert_eq!(
            s.insert("b2", Holder::Limited(ip(2)), t0)
                .err()
                .map(|e| e.0),
            Some(SlotRefusal::Full)
        );
    }

    #[test]
    fn deadlines_expire_in_order_and_skip_finished_slots() {
        let t0 = Instant::now();
        let mut s = HandshakeSlots::new(10, 10);
        let ms = Duration::from_millis;
        let (a, _) = s.insert(1, Holder::Unknown, t0 + ms(10)).ok().unwrap();
        let (_b, _) = s
            .insert(2, Holder::Limited(ip(1)), t0 + ms(20))
            .ok()
            .unwrap();
        let (_c, _) = s
            .insert(3, Holder::Limited(ip(1)), t0 + ms(30))
            .ok()
            .unwrap();
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.next_deadline(), Some(t0 + ms(20)));
        assert_eq!(s.expire(t0 + ms(25)), vec![2]);
        assert_eq!(s.held_by(ip(1)), 1);
        assert_eq!(s.expire(t0 + ms(100)), vec![3]);
        assert!(s.is_empty());
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.held_by(ip(1)), 0);
    }

    #[test]
    fn assign_moves_a_slot_under_its_address() {
        let t0 = Instant::now();
        let mut s = HandshakeSlots::new(10, 1);
        let (a, _) = s.insert(1, Holder::Unknown, t0).ok().unwrap();
        let (b, _) = s.insert(2, Holder::Unknown, t0).ok().unwrap();
        assert_eq!(s.assign(a, Holder::Limited(ip(1))), Ok(()));
        assert_eq!(
            s.assign(b, Holder::Limited(ip(1))),
            Err(SlotRefusal::PerAddress)
        );
        assert_eq!(s.held_by(ip(1)), 1);
        assert_eq!(s.remove(b), Some(2));
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.held_by(ip(1)), 0);
    }

    /// Seeded simulation: random inserts, removals, assignments and expiries against a
    /// model; the invariants hold after every step and a newcomer with no slot is refused
    /// only when no holder has two or more.
    #[test]
    fn simulation_keeps_counts_and_fairness() {
        let t0 = Instant::now();
        for seed in 0..20 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut s = HandshakeSlots::new(16, 4);
            let mut live: Vec<u64> = Vec::new();
            let mut clock = 0u64;
            for _ in 0..3000 {
                clock += rng.u64(0..3);
                let now = t0 + Duration::from_millis(clock);
                match rng.u8(0..10) {
                    0..=5 => {
                        let holder = match rng.u8(0..10) {
                            0 => Holder::Unknown,
                            1 => Holder::Exempt(ip(200)),
                            _ => Holder::Limited(ip(rng.u8(1..8))),
                        };
                        let newcomer_held = holder.address().map_or(0, |a| s.held_by(a));
                        let heaviest = s.weights.last().map_or(0, |w| w.0);
                        match s.insert(clock, holder, now + Duration::from_millis(40)) {
                            Ok((t, evicted)) => {
                                live.push(t);
                                if evicted.is_some() {
                                    assert!(heaviest > newcomer_held + 1);
                                }
                            }
                            Err((SlotRefusal::Full, _)) => {
                                assert_eq!(s.len(), 16);
                                if newcomer_held == 0 {
                                    assert!(
                                        heaviest <= 1,
                                        "refused while someone holds {heaviest}"
                                    );
                                }
                            }
                            Err((SlotRefusal::PerAddress, _)) => {
                                assert!(matches!(holder, Holder::Limited(_)));
                                assert_eq!(newcomer_held, 4);
                            }
                        }
                    }
                    6 | 7 if !live.is_empty() => {
                        let t = live.swap_remove(rng.usize(..live.len()));
                        s.remove(t);
                    }
                    8 if !live.is_empty() => {
                        let t = live[rng.usize(..live.len())];
                        let _ = s.assign(t, Holder::Limited(ip(rng.u8(1..8))));
                    }
                    _ => {
                        s.expire(now);
                    }
                }
                live.retain(|t| s.slots.contains_key(t));
                assert!(s.len() <= 16);
                let counted: usize = s.by_address.values().map(VecDeque::len).sum();
                let unknown = s
                    .slots
                    .values()
                    .filter(|x| x.holder == Holder::Unknown)
                    .count();
                assert_eq!(counted + unknown, s.len());
                assert_eq!(s.weights.len(), s.by_address.len());
                for (a, tokens) in &s.by_address {
                    assert!(s.weights.contains(&(tokens.len(), *a)));
                    if *a != ip(200) {
                        assert!(tokens.len() <= 4);
                    }
                }
            }
        }
    }
}
