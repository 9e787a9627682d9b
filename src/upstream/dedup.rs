//! The content de-duplication window: keys of recently appended events, to drop the overlap a
//! resume by time replays.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Keys of recently appended events ([`crate::event::EventMeta::dedup_key`]).
///
/// A FIFO in append order plus a map; pruned by `time_us` to the window behind the clock's
/// reference (see [`crate::clock`]; an outlier cannot wipe it), and capped at a fixed count.
/// `time_us` is nearly monotonic, so pruning from the front by time is close to exact; an event
/// with an outlying time simply lives until it reaches the front.
#[derive(Debug)]
pub(super) struct DedupWindow {
    /// Membership test for the keys in `order`, with the indexed `time_us` of their first copy
    /// (to measure the clock difference of the next instance that replays them).
    keys: HashMap<u64, i64>,
    /// `(time_us, key)` in append order, for pruning.
    order: VecDeque<(i64, u64)>,
    /// Keys whose time is older than newest − this are forgotten.
    window_us: i64,
    /// Hard cap on remembered keys.
    capacity: usize,
}

impl DedupWindow {
    pub(super) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            keys: HashMap::new(),
            order: VecDeque::new(),
            window_us: super::duration_us(window),
            capacity,
        }
    }

    /// The time of the first copy of `key`, if it is remembered.
    pub(super) fn get(&self, key: u64) -> Option<i64> {
        self.keys.get(&key).copied()
    }

    /// Records `key` unless it is already known; returns whether it was new.
    pub(super) fn insert(&mut self, key: u64, time_us: i64) -> bool {
        if self.keys.contains_key(&key) {
            return false;
        }
        self.keys.insert(key, time_us);
        self.order.push_back((time_us, key));
        while self.order.len() > self.capacity {
            self.pop_front();
        }
        true
    }

    /// Forgets keys older than the window behind `newest_time_us`.
    pub(super) fn prune(&mut self, newest_time_us: i64) {
        let cutoff = newest_time_us.saturating_sub(self.window_us);
        while self.order.front().is_some_and(|&(t, _)| t < cutoff) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.keys.remove(&key);
        }
    }

    /// Keys remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_window_forgets_by_time_and_by_count() {
        let mut w = DedupWindow::new(Duration::from_secs(1), 4);
        assert!(w.insert(1, 0));
        assert!(
            !w.insert(1, 999),
            "same key, other time_us: still a duplicate"
        );
        assert!(w.insert(2, 500_000));
        assert!(w.insert(3, 1_200_000));
        w.prune(1_200_000);
        assert_eq!(w.len(), 2, "key 1 (t=0) is older than 1.2s − 1s");
        assert!(w.insert(1, 1_300_000), "forgotten key is new again");
        assert!(w.insert(4, 1_300_000));
        assert!(w.insert(5, 1_300_000));
        assert_eq!(w.len(), 4, "capped");
        assert!(w.insert(2, 1_300_000), "oldest key evicted by the cap");
        assert!(!w.insert(5, 1_300_000));
    }
}
