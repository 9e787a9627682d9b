//! The one global lock order for the relay's shared data, and locks that check it.
//!
//! Three kinds of lock guard what the writer, retention, the listener and the fan-out workers
//! share. Acquire them only in this order, and never take a lock while holding one of the same
//! or a later level:
//!
//! 1. [`Level::ShapesAdmin`]: the shapes registry's creation/retirement mutex;
//! 2. [`Level::Shapes`]: the shapes registry's list of live shapes (`Shapes::lock`);
//! 3. [`Level::Index`]: the event index (`Hub::index`, `Hub::index_mut`);
//! 4. [`Level::ShapeTable`]: one shape's frame table (`Shape::table`).
//!
//! Why it matters: std's `RwLock` is writer-preferring (a queued writer blocks new readers),
//! so two threads taking the same pair of locks in opposite orders can deadlock even when
//! both only read, as soon as a third thread queues a write. The writer holds the shapes list
//! (read) across the index append (write) so that a shape created concurrently starts exactly
//! at an event boundary; retention used to read shape sizes (the shapes list) while holding
//! the index, and a worker creating a shape queues on the shapes list's write lock: with all
//! three, ingestion, fan-out and handshakes froze together.
//!
//! Same-level re-acquisition is a violation too: a recursive read of a writer-preferring lock
//! deadlocks once a writer queues between the two reads.
//!
//! Checked in debug builds (every test): each thread records the levels it holds, and taking
//! a lock at or below a held level panics naming both. Release builds pay nothing.

use std::ops::{Deref, DerefMut};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A lock's place in the order; lower levels are taken first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The shapes registry's creation/retirement mutex.
    ShapesAdmin = 0,
    /// The shapes registry's live list.
    Shapes = 1,
    /// The event index.
    Index = 2,
    /// A shape's frame table.
    ShapeTable = 3,
}

#[cfg(debug_assertions)]
mod held {
    use super::Level;
    use std::cell::Cell;

    /// Why 4: one slot per [`Level`].
    const LEVELS: usize = 4;

    thread_local! {
        /// How many locks of each level this thread holds.
        static HELD: Cell<[u8; LEVELS]> = const { Cell::new([0; LEVELS]) };
    }

    /// Records that this thread takes a `level` lock; panics if that breaks the order.
    pub fn enter(level: Level) {
        HELD.with(|h| {
            let mut held = h.get();
            if let Some(worst) = (level as usize..LEVELS).rev().find(|&l| held[l] > 0) {
                panic!(
                    "lock order violated: taking {level:?} while holding {:?} (order: \
                     ShapesAdmin < Shapes < Index < ShapeTable; see lock_order.rs)",
                    [
                        Level::ShapesAdmin,
                        Level::Shapes,
                        Level::Index,
                        Level::ShapeTable
                    ][worst]
                );
            }
            held[level as usize] += 1;
            h.set(held);
        });
    }

    /// Records that this thread released a `level` lock.
    pub fn leave(level: Level) {
        HELD.with(|h| {
            let mut held = h.get();
            held[level as usize] = held[level as usize].saturating_sub(1);
            h.set(held);
        });
    }
}

/// Proof that this thread holds a lock of `level` (debug builds track it; release builds
/// carry nothing).
#[derive(Debug)]
pub struct Held {
    /// The level held.
    #[cfg(debug_assertions)]
    level: Level,
}

impl Held {
    /// Checks the order and records the level (debug builds). Call before blocking on the
    /// lock, so a violation panics instead of deadlocking.
    pub fn enter(level: Level) -> Held {
        #[cfg(debug_assertions)]
        {
            held::enter(level);
            Held { level }
        }
        #[cfg(not(debug_assertions))]
        {
            let _ = level;
            Held {}
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        held::leave(self.level);
    }
}

/// An `RwLock` with a place in the lock order. Poisoning is ignored: every value guarded
/// here stays consistent at the granularity its users read it (see `Hub::index`).
#[derive(Debug)]
pub struct OrderedRwLock<T> {
    /// Where it is in the order.
    level: Level,
    /// The lock.
    inner: RwLock<T>,
}

/// Read access to an [`OrderedRwLock`].
pub struct ReadGuard<'a, T> {
    /// The lock's guard (dropped before `_held`: fields drop in order).
    guard: RwLockReadGuard<'a, T>,
    /// The order bookkeeping.
    _held: Held,
}

/// Write access to an [`OrderedRwLock`].
pub struct WriteGuard<'a, T> {
    /// The lock's guard (dropped before `_held`).
    guard: RwLockWriteGuard<'a, T>,
    /// The order bookkeeping.
    _held: Held,
}

impl<T> OrderedRwLock<T> {
    /// A lock at `level`.
    pub const fn new(level: Level, value: T) -> Self {
        OrderedRwLock {
            level,
            inner: RwLock::new(value),
        }
    }

    /// Shared access.
    pub fn read(&self) -> ReadGuard<'_, T> {
        let held = Held::enter(self.level);
        ReadGuard {
            guard: self.inner.read().unwrap_or_else(|p| p.into_inner()),
            _held: held,
        }
    }

    /// Exclusive access.
    pub fn write(&self) -> WriteGuard<'_, T> {
        let held = Held::enter(self.level);
        WriteGuard {
            guard: self.inner.write().unwrap_or_else(|p| p.into_inner()),
            _held: held,
        }
    }
}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use crate::hub::Hub;
    use crate::index::EventIndex;
    use crate::limits::{Limits, LimitsConfig};
    use crate::log::Stream;
    use crate::shapes::Shapes;
    use crate::subscription::ShapeKey;
    use crate::writer::{LogWriter, RetentionPolicy, enforce_retention};

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order violated: taking Shapes while holding Index")]
    fn taking_a_lower_level_while_holding_a_higher_one_panics() {
        let index = super::OrderedRwLock::new(super::Level::Index, 0u32);
        let shapes = super::OrderedRwLock::new(super::Level::Shapes, 0u32);
        let _i = index.read();
        let _s = shapes.read();
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "lock order violated: taking Index while holding Index")]
    fn a_recursive_read_panics() {
        let index = super::OrderedRwLock::new(super::Level::Index, 0u32);
        let _a = index.read();
        let _b = index.read();
    }

    #[test]
    fn the_order_and_releases_are_tracked() {
        let shapes = super::OrderedRwLock::new(super::Level::Shapes, 1u32);
        let index = super::OrderedRwLock::new(super::Level::Index, 2u32);
        let table = super::OrderedRwLock::new(super::Level::ShapeTable, 3u32);
        {
            let s = shapes.read();
            let i = index.read();
            let mut t = table.write();
            *t += *s + *i;
        }
        // All released: any order works again, one at a time.
        assert_eq!(*table.read(), 6);
        drop(index.write());
        drop(shapes.write());
    }

    /// The writer (shapes → index), retention (index and shapes) and a client creating ever
    /// new shapes (options_update with a new maxMessageSizeBytes each time: the shapes
    /// registry's write lock, then the index) run flat out against each other for a few
    /// seconds; every one of them must keep making progress. With std's writer-preferring
    /// RwLock, retention reading shape sizes under the index lock froze all three.
    #[test]
    fn writer_retention_and_shape_churn_never_deadlock() {
        let dir = std::env::temp_dir().join(format!(
            "jetrelay-lock-order-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let streams = crate::encoding::Encoding::ALL
            .map(|enc| Stream::create(enc.label(), &dir.join(enc.log_name()), 1 << 20).unwrap());
        let limits = Limits::new(LimitsConfig {
            max_clients: 10,
            max_conns_per_ip: 10,
            conn_rate_per_ip: 10.0,
            allow: Vec::new(),
        });
        let shapes = Shapes::new(
            dir.join("shapes"),
            crate::shapes::ShapeLimits {
                creations_per_minute: 1e9,
                max_per_ip: crate::shapes::MAX_SHAPES,
                allow: Vec::new(),
                max_disk: 2 << 20,
            },
        )
        .unwrap();
        let hub = Arc::new(Hub::new(
            streams,
            EventIndex::in_memory(),
            limits,
            shapes,
            crate::filter_budget::FilterBudget::new(1 << 20, 1 << 20, Vec::new()),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let sample = include_str!("../assets/jetstream-v1-sample.jsonl");
        let events: Vec<String> = sample.lines().take(200).map(str::to_owned).collect();
        let mut threads = Vec::new();
        {
            let (hub, stop, progress) = (hub.clone(), stop.clone(), progress.clone());
            threads.push(std::thread::spawn(move || {
                let mut writer =
                    LogWriter::new(hub, Vec::new(), crate::writer::WriterOptions::default())
                        .unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let json = events[i % events.len()].as_bytes();
                    let meta = crate::event::parse_event(json).unwrap();
                    writer
                        .append_event(&crate::upstream::Incoming::v1(json, meta))
                        .unwrap();
                    progress[0].fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
        {
            let (hub, stop, progress) = (hub.clone(), stop.clone(), progress.clone());
            threads.push(std::thread::spawn(move || {
                let policy = RetentionPolicy {
                    max_age: Duration::from_secs(3600),
                    max_disk: 8 << 20,
                };
                while !stop.load(Ordering::Relaxed) {
                    enforce_retention(&hub, policy).unwrap();
                    progress[1].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (hub, stop, progress) = (hub.clone(), stop.clone(), progress.clone());
            threads.push(std::thread::spawn(move || {
                let mut size = 1u32 << 20;
                while !stop.load(Ordering::Relaxed) {
                    size = if size > 1 { size - 1 } else { 1 << 20 };
                    let key = ShapeKey {
                        encoding: crate::encoding::Encoding::V1Json,
                        kinds: crate::wire::KindSet::V1,
                        collections: Vec::new(),
                        max_message_size: Some(size),
                    };
                    let creator = std::net::IpAddr::from([192, 0, 2, 1]);
                    let _ = hub
                        .shapes
                        .get_or_create(&key, creator, || hub.index().next_seq());
                    // The registry's write lock on every pass, whether or not a shape was
                    // created (the cap of 32 is reached at once).
                    hub.shapes.retire_idle();
                    progress[2].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let names = ["writer", "retention", "shape churn"];
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut last = [0u64; 3];
        let mut stalled_since = [Instant::now(); 3];
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            for i in 0..3 {
                let now = progress[i].load(Ordering::Relaxed);
                if now != last[i] {
                    last[i] = now;
                    stalled_since[i] = Instant::now();
                }
                assert!(
                    stalled_since[i].elapsed() < Duration::from_secs(1),
                    "{} made no progress for a second (deadlock); progress {last:?}",
                    names[i]
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        eprintln!("progress in 4 s (writer, retention, shape churn): {last:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
