//! Shapes: shared, pre-filtered logs, one per distinct subscription *shape* in use
//! (encoding × `kinds` × `wantedCollections` × `maxMessageSizeBytes`).
//!
//! A client whose filter passes 10% of the feed must not cost a syscall per event: if it read
//! the base log, its matching frames would be scattered and each would need its own send. So
//! the writer also appends every matching frame to the shape's own log, once, for all clients of
//! that shape; they then read it contiguously exactly like full-stream clients (ring sends when
//! live, splice when behind).
//!
//! A shape is created when first asked for and fed from then on (`start_seq`); history from
//! before it is served by walking the base log's index with the same filter until the walk
//! reaches `start_seq`, where the client switches to the shape's log. That keeps creation O(1)
//! (no back-fill copy of gigabytes) while replay and live see exactly the same frames.
//! Shapes are retained and hole-punched like the base logs, bounded in number
//! ([`MAX_SHAPES`]; beyond it clients fall back to the index walk), and dropped after
//! [`SHAPE_IDLE`] without clients. `wantedDids` is not part of a shape: DID-filtered clients
//! walk the index (their matches are rare, so their sends are too).
//!
//! Shape keys are clients' to choose, so shapes are guarded against exhaustion: only
//! canonical keys get one ([`crate::subscription::SubscriberOptions::serving`]), each address
//! may create only so many per minute ([`ShapeLimits::creations_per_minute`]; beyond, its
//! clients walk) and hold only its share of them ([`ShapeLimits::max_per_ip`]), and shapes
//! have their own disk budget ([`ShapeLimits::max_disk`]), trimmed on their own (oldest
//! events first, the same window for every shape) so that they never shrink the base logs'
//! retention.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::encoding::ENCODINGS;
use crate::event::EventMeta;
use crate::hub::Counters;
use crate::index::now_us;
use crate::limits::{RateTable, address_key, in_network};
use crate::lock_order::{Level, OrderedRwLock, ReadGuard};
use crate::log::Stream;
use crate::subscription::ShapeKey;

/// Why 32: each shape costs a file, a ring and one predicate check per event in the writer;
/// real traffic concentrates on a handful of popular shapes.
pub const MAX_SHAPES: usize = 32;
/// An unused shape is dropped after this long (clients that come back soon reuse it).
pub const SHAPE_IDLE: Duration = Duration::from_secs(60);
/// Ring per shape: smaller than the base rings since there can be many shapes.
pub const SHAPE_RING_BYTES: usize = 8 << 20;
/// Default of [`ShapeLimits::max_per_ip`]: an eighth of the table, so that at least eight
/// addresses can hold shapes however fast one of them creates them.
pub const MAX_SHAPES_PER_IP: usize = MAX_SHAPES / 8;
/// The bit of a shape's client count that marks it retired.
const RETIRED: u64 = 1 << 63;

/// What limits shape creation and shape disk.
#[derive(Clone, Debug)]
pub struct ShapeLimits {
    /// New shapes an address (per /64 for IPv6) may cause per minute (bucket of the same
    /// size); beyond that its clients are served by the walk. Why: keys are clients' to
    /// choose, and each shape costs a log written for every matching event.
    pub creations_per_minute: f64,
    /// Live shapes one address (per /64 for IPv6) may have created; beyond, its new filters
    /// are served by the walk (other addresses still get shapes). Why: the rate alone only
    /// slows an address down, and at 6 a minute one address would own all [`MAX_SHAPES`]
    /// after ~5 minutes and keep them alive with one client each. A shape counts against the
    /// address that created it until it is retired, however many other addresses use it
    /// (shapes are created on first use, so a popular one is rarely an attacker's).
    /// Default [`MAX_SHAPES_PER_IP`].
    pub max_per_ip: usize,
    /// Networks exempt from the creation rate and the share (`--allow-ip`).
    pub allow: Vec<(IpAddr, u8)>,
    /// Retained bytes of all shape logs together; beyond it the oldest events are trimmed
    /// from every shape (their readers kicked like retention's). Separate from the base logs'
    /// `--max-disk`, so shapes never shrink the base retention.
    pub max_disk: u64,
}

/// Counts for metrics.
#[derive(Default)]
pub struct ShapeCounters {
    /// Shapes created.
    pub created: AtomicU64,
    /// Creations refused: the address exceeded `creations_per_minute`.
    pub refused_rate: AtomicU64,
    /// Creations refused: the address already holds [`ShapeLimits::max_per_ip`] shapes.
    pub refused_per_ip: AtomicU64,
    /// Creations refused: [`MAX_SHAPES`] shapes exist.
    pub refused_full: AtomicU64,
    /// Shape bytes punched because shapes exceeded their disk budget (not base retention).
    pub trimmed_bytes: AtomicU64,
}

/// Where each of a shape's frames is: (event seq, offset in the shape's log).
#[derive(Default)]
pub struct ShapeTable {
    /// Retained frames, oldest first.
    frames: VecDeque<(u64, u64)>,
    /// Frames dropped by retention so far: with the position in `frames`, a frame's ordinal
    /// in the shape's log (for counting delivered events, see [`Shape::frames_appended`]).
    popped: u64,
}

impl ShapeTable {
    /// Offset of the first frame with seq ≥ `seq`, or the end (`end`) if none.
    pub fn offset_from_seq(&self, seq: u64, end: u64) -> u64 {
        let i = self.frames.partition_point(|(s, _)| *s < seq);
        self.frames.get(i).map_or(end, |(_, o)| *o)
    }

    /// Seq of the frame at `offset`, or `next_seq` if `offset` is the end.
    pub fn seq_at_offset(&self, offset: u64, next_seq: u64) -> u64 {
        let i = self.frames.partition_point(|(_, o)| *o < offset);
        self.frames.get(i).map_or(next_seq, |(s, _)| *s)
    }

    /// Frames before `offset` in the shape's log since it was created.
    pub fn ordinal_at_offset(&self, offset: u64) -> u64 {
        self.popped + self.frames.partition_point(|(_, o)| *o < offset) as u64
    }

    /// Seq of the last frame that starts before `offset` (the last one a reader at `offset`
    /// has been sent), if any.
    pub fn last_seq_before(&self, offset: u64) -> Option<u64> {
        let i = self.frames.partition_point(|(_, o)| *o < offset);
        i.checked_sub(1)
            .and_then(|i| self.frames.get(i))
            .map(|(s, _)| *s)
    }

    /// Drops frames with seq < `seq`; returns the new first offset (or None if unchanged).
    fn drop_before(&mut self, seq: u64, end: u64) -> u64 {
        while self.frames.front().is_some_and(|(s, _)| *s < seq) {
            self.frames.pop_front();
            self.popped += 1;
        }
        self.frames.front().map_or(end, |(_, o)| *o)
    }
}

/// One shape.
pub struct Shape {
    /// What it carries.
    pub key: ShapeKey,
    /// Label for logs and metrics.
    pub label: String,
    /// Its log.
    pub stream: Arc<Stream>,
    /// The first event this shape was fed (see [`Shape::start_seq`]).
    created_seq: u64,
    /// The address key ([`address_key`]) that created it, charged for it until it is
    /// retired; None if that address is exempt (`--allow-ip`).
    creator: Option<IpAddr>,
    /// Events before this were (or are being) trimmed away by retention or the shapes' disk
    /// budget; only grows.
    trimmed_seq: AtomicU64,
    /// Frame positions. Last in the global lock order ([`crate::lock_order`]): take it after
    /// the registry and the index, never before them.
    pub table: OrderedRwLock<ShapeTable>,
    /// Clients attached (reading it or walking towards it), plus [`RETIRED`] once the shape is
    /// retired: one atomic, so that a client is never counted into a retired shape.
    clients: AtomicU64,
    /// When the last client left (µs), for idle expiry.
    idle_since: AtomicI64,
    /// Frames appended (after their publish and table entry), so that workers can count the
    /// events in a range without the table lock.
    appended: AtomicU64,
}

impl Shape {
    /// Whether this shape carries the event whose payloads are `payload_lens` bytes (by
    /// [`crate::encoding::Encoding::index`]).
    pub fn wants(&self, meta: &EventMeta<'_>, payload_lens: &[usize; ENCODINGS]) -> bool {
        self.key
            .wants(meta.kind, meta.collection.as_deref(), payload_lens)
    }

    /// Events with seq ≥ this that match are in the log; older ones are not (never fed, or
    /// trimmed): a reader starting before it walks the base log up to it.
    pub fn start_seq(&self) -> u64 {
        self.created_seq
            .max(self.trimmed_seq.load(Ordering::Acquire))
    }

    /// Frames appended so far; never ahead of the published end or the table.
    pub fn frames_appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }

    /// Counts a client in; false if the shape was retired (the writer no longer feeds it, so
    /// the client must find or create another).
    pub fn try_add_client(&self) -> bool {
        self.clients
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c & RETIRED == 0).then_some(c + 1)
            })
            .is_ok()
    }

    /// Counts a client out.
    pub fn remove_client(&self) {
        if self.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_since.store(now_us(), Ordering::Relaxed);
        }
    }

    /// Clients attached right now.
    pub fn client_count(&self) -> u64 {
        self.clients.load(Ordering::Relaxed) & !RETIRED
    }

    /// Retires the shape if it has no client: from then on no client can be counted in.
    fn retire_if_unused(&self) -> bool {
        self.clients
            .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// The registry.
pub struct Shapes {
    /// Live shapes; the writer takes a read lock per event. Second in the global lock order
    /// ([`crate::lock_order`]): before the index and any shape's table.
    active: OrderedRwLock<Vec<Arc<Shape>>>,
    /// Serializes creation and retirement (holds the count of logs created, for file names).
    /// First in the lock order.
    admin: OrderedRwLock<u64>,
    /// Directory for shape logs.
    dir: PathBuf,
    /// Tail ring bytes of each new shape ([`SHAPE_RING_BYTES`]; tests use less).
    ring_bytes: usize,
    /// Per-address creation rate.
    creations: RateTable,
    /// Settings.
    limits: ShapeLimits,
    /// For metrics.
    pub counters: ShapeCounters,
}

impl Shapes {
    /// An empty registry storing logs in `dir` (stale logs from a previous run are removed:
    /// shapes are rebuilt on demand).
    pub fn new(dir: PathBuf, limits: ShapeLimits) -> std::io::Result<Shapes> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Shapes {
            active: OrderedRwLock::new(Level::Shapes, Vec::new()),
            admin: OrderedRwLock::new(Level::ShapesAdmin, 0),
            dir,
            ring_bytes: SHAPE_RING_BYTES,
            creations: RateTable::new(
                limits.creations_per_minute / 60.0,
                limits.creations_per_minute,
                limits.allow.clone(),
            ),
            limits,
            counters: ShapeCounters::default(),
        })
    }

    /// The same registry with `bytes` of tail ring per shape (a power of two, at least 4 KiB):
    /// simulations create thousands of shapes and need small rings that wrap.
    pub fn with_ring_bytes(mut self, bytes: usize) -> Shapes {
        self.ring_bytes = bytes;
        self
    }

    /// Snapshot of the live shapes.
    pub fn active(&self) -> Vec<Arc<Shape>> {
        self.active.read().clone()
    }

    /// The live shapes, read-locked: the writer holds this across appending an event to the
    /// shapes *and* to the index, so a shape created concurrently starts exactly at an event
    /// boundary (see [`Shapes::get_or_create`]).
    pub fn lock(&self) -> ReadGuard<'_, Vec<Arc<Shape>>> {
        self.active.read()
    }

    /// The address key `ip` is charged under for the shapes it creates, None if it is exempt.
    fn charged_key(&self, ip: IpAddr) -> Option<IpAddr> {
        // A dual-stack listener sees IPv4 clients as IPv4-mapped addresses.
        let ip = ip.to_canonical();
        if self.limits.allow.iter().any(|n| in_network(ip, *n)) {
            None
        } else {
            Some(address_key(ip))
        }
    }

    /// Whether `creator` already holds its share of `active` (never for exempt addresses).
    fn holds_share(&self, active: &[Arc<Shape>], creator: Option<IpAddr>) -> bool {
        creator.is_some_and(|c| {
            active.iter().filter(|s| s.creator == Some(c)).count() >= self.limits.max_per_ip
        })
    }

    /// The shape for `key`, creating it (fed from `next_seq` on) if there is room, `creator`
    /// (the client's address) holds less than its share of shapes and may create one now;
    /// None = serve the client by the walk. `next_seq` must be read under the index lock so no event is missed or doubled:
    /// the writer appends shapes' frames before the index entry, under the same registry
    /// lock. Lock order: call it holding none of the registry, the index or a shape table.
    pub fn get_or_create(
        &self,
        key: &ShapeKey,
        creator: IpAddr,
        next_seq: impl FnOnce() -> u64,
    ) -> Option<Arc<Shape>> {
        let charged = self.charged_key(creator);
        {
            let active = self.active.read();
            if let Some(s) = active.iter().find(|s| &s.key == key) {
                return Some(s.clone());
            }
            if active.len() >= MAX_SHAPES {
                Counters::add(&self.counters.refused_full, 1);
                return None;
            }
            // Before the rate: a creation refused for the share costs the address no token.
            if self.holds_share(&active, charged) {
                Counters::add(&self.counters.refused_per_ip, 1);
                return None;
            }
        }
        if !self.creations.try_take(creator) {
            Counters::add(&self.counters.refused_rate, 1);
            return None;
        }
        let mut counter = self.admin.write();
        let mut active = self.active.write();
        if let Some(s) = active.iter().find(|s| &s.key == key) {
            return Some(s.clone());
        }
        if active.len() >= MAX_SHAPES {
            Counters::add(&self.counters.refused_full, 1);
            return None;
        }
        // Again under the write lock: the same address may be creating another one right now.
        if self.holds_share(&active, charged) {
            Counters::add(&self.counters.refused_per_ip, 1);
            return None;
        }
        *counter += 1;
        let label = key.label();
        let path = self.dir.join(format!("shape-{}.log", *counter));
        let stream = match Stream::create(label.clone(), &path, self.ring_bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, shape = %label, "cannot create shape log; falling back to filtering");
                return None;
            }
        };
        // Holding the write lock: the writer cannot be between "shapes appended" and "index
        // appended" for an event, so next_seq is exactly the first event this shape will see.
        let start_seq = next_seq();
        let shape = Arc::new(Shape {
            key: key.clone(),
            label: label.clone(),
            stream: Arc::new(stream),
            created_seq: start_seq,
            creator: charged,
            trimmed_seq: AtomicU64::new(0),
            table: OrderedRwLock::new(Level::ShapeTable, ShapeTable::default()),
            clients: AtomicU64::new(0),
            idle_since: AtomicI64::new(now_us()),
            appended: AtomicU64::new(0),
        });
        active.push(shape.clone());
        Counters::add(&self.counters.created, 1);
        tracing::info!(shape = %label, start_seq, "shape created");
        Some(shape)
    }

    /// Removes shapes idle for longer than [`SHAPE_IDLE`]; their files are unlinked (open
    /// descriptors keep in-flight reads valid).
    pub fn retire_idle(&self) {
        let _g = self.admin.write();
        let mut active = self.active.write();
        let now = now_us();
        active.retain(|s| {
            let idle = s.client_count() == 0
                && now - s.idle_since.load(Ordering::Relaxed) > SHAPE_IDLE.as_micros() as i64
                && s.retire_if_unused();
            if idle {
                s.stream.retire();
                let _ = std::fs::remove_file(s.stream.path());
                tracing::info!(shape = %s.label, "shape dropped (unused)");
            }
            !idle
        });
    }

    /// Retires every shape without clients at once, however briefly idle (the simulation's
    /// way to retire shapes while clients attach).
    #[cfg(test)]
    pub fn retire_unused_now(&self) {
        let _g = self.admin.write();
        let mut active = self.active.write();
        active.retain(|s| {
            let retire = s.retire_if_unused();
            if retire {
                s.stream.retire();
            }
            !retire
        });
    }

    /// Bytes allocated on disk by all shape logs.
    pub fn allocated_bytes(&self) -> u64 {
        self.active()
            .iter()
            .map(|s| s.stream.allocated_bytes())
            .sum()
    }

    /// Retained bytes of all shape logs.
    pub fn retained_bytes(&self) -> u64 {
        self.active()
            .iter()
            .map(|s| s.stream.end() - s.stream.start())
            .sum()
    }

    /// The first event the shapes may keep so that their retained bytes fit the shapes' disk
    /// budget: at least `first_seq` (the base logs' first retained event), at most
    /// `next_seq`. Every shape keeps the same window of events. A binary search over event
    /// numbers, a table lookup per shape per step.
    pub fn budget_cutoff(&self, first_seq: u64, next_seq: u64) -> u64 {
        let shapes = self.active();
        let retained_from = |seq: u64| -> u64 {
            shapes
                .iter()
                .map(|s| {
                    let end = s.stream.end();
                    end - s
                        .table
                        .read()
                        .offset_from_seq(seq, end)
                        .max(s.stream.start())
                })
                .sum()
        };
        if retained_from(first_seq) <= self.limits.max_disk {
            return first_seq;
        }
        let (mut lo, mut hi) = (first_seq, next_seq.max(first_seq));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if retained_from(mid) <= self.limits.max_disk {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// Retention: drops every shape frame of an event with seq < `first_seq`, once no reader
    /// is below it (readers below are asked to leave, like the base logs'). New readers
    /// start at or after it from now on ([`Shape::start_seq`]). Returns bytes punched.
    pub fn drop_before(&self, first_seq: u64) -> std::io::Result<u64> {
        let mut freed = 0;
        for s in self.active() {
            s.trimmed_seq.fetch_max(first_seq, Ordering::AcqRel);
            let end = s.stream.end();
            let target = s.table.read().offset_from_seq(first_seq, end);
            s.stream.request_kick(target);
            if s.stream.lowest_reader() < target {
                continue;
            }
            s.table.write().drop_before(first_seq, end);
            freed += s.stream.punch_below(target)?;
        }
        Ok(freed)
    }
}

/// A frame written to a shape's log but not yet visible to its readers.
#[derive(Clone, Copy, Debug)]
pub struct UnpublishedFrame {
    /// Where the frame starts in the shape's log.
    at: u64,
    /// The log's end after it.
    end: u64,
}

/// Writes one event's frame to a shape's log without publishing it (writer thread): a failed
/// write (a full disk) leaves nothing visible, and the next attempt writes at the same offset.
pub fn write_frame(shape: &Shape, frame: &[u8]) -> std::io::Result<UnpublishedFrame> {
    let mut end = shape.stream.end();
    let at = shape.stream.append(frame, &mut end)?;
    Ok(UnpublishedFrame { at, end })
}

/// Publishes a frame [`write_frame`] wrote for event `seq` (writer thread).
pub fn publish_frame(shape: &Shape, seq: u64, frame: UnpublishedFrame) {
    // The table entry before the bytes are published: a reader that has sent a frame can
    // always find which event it was (see `fanout::switch_point`).
    shape.table.write().frames.push_back((seq, frame.at));
    shape.stream.publish(frame.end);
    shape.appended.fetch_add(1, Ordering::Release);
}

/// Appends one event's frame to a shape (writer thread): [`write_frame`] then
/// [`publish_frame`].
pub fn append_to_shape(shape: &Shape, seq: u64, frame: &[u8]) -> std::io::Result<()> {
    let written = write_frame(shape, frame)?;
    publish_frame(shape, seq, written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Encoding;
    use crate::subscription::SubscriberOptions;
    use crate::wire::KindSet;

    /// A registry in a scratch directory of its own, allowing `max_per_ip` shapes per address
    /// (10.9.0.0/16 exempt) and creations at any rate.
    fn registry(name: &str, max_per_ip: usize) -> (Shapes, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("jetrelay-shapes-{}-{name}", std::process::id()));
        let shapes = Shapes::new(
            dir.clone(),
            ShapeLimits {
                creations_per_minute: 1e9,
                max_per_ip,
                allow: vec![("10.9.0.0".parse().expect("net"), 16)],
                max_disk: u64::MAX,
            },
        )
        .expect("shapes dir")
        .with_ring_bytes(4096);
        (shapes, dir)
    }

    /// The shape key of a v1 client wanting only `collection`.
    fn key(collection: &str) -> ShapeKey {
        SubscriberOptions::new(&[collection], &[] as &[&str], None)
            .expect("valid collection")
            .shape_key(Encoding::V1Json, KindSet::V1)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn an_address_holds_at_most_its_share_of_shapes() {
        let (shapes, dir) = registry("share", 2);
        let attacker = ip("192.0.2.1");
        let a = shapes.get_or_create(&key("com.example.a"), attacker, || 0);
        let b = shapes.get_or_create(&key("com.example.b"), attacker, || 0);
        let (Some(a), Some(b)) = (a, b) else {
            panic!("the first two are its share")
        };
        assert!(
            shapes
                .get_or_create(&key("com.example.c"), attacker, || 0)
                .is_none(),
            "an address at its share gets no new shape"
        );
        // IPv4-mapped (a dual-stack listener) is the same address.
        let mapped = ip("::ffff:192.0.2.1");
        assert!(
            shapes
                .get_or_create(&key("com.example.c"), mapped, || 0)
                .is_none()
        );
        assert_eq!(shapes.counters.refused_per_ip.load(Ordering::Relaxed), 2);
        // Its existing shapes are still found (finding is not creating).
        let again = shapes.get_or_create(&key("com.example.a"), attacker, || 0);
        assert!(again.is_some_and(|s| Arc::ptr_eq(&s, &a)));
        // Another address, and one shape created by it that the attacker then uses: it
        // counts against its creator only.
        let bystander = ip("192.0.2.2");
        let c = shapes.get_or_create(&key("com.example.c"), bystander, || 0);
        assert!(c.is_some(), "another address still gets a shape");
        let d = shapes.get_or_create(&key("com.example.d"), bystander, || 0);
        assert!(d.is_some(), "the bystander has a share of its own");
        // Exempt addresses have no share.
        for i in 0..4 {
            let k = key(&format!("com.example.exempt{i}"));
            assert!(shapes.get_or_create(&k, ip("10.9.1.1"), || 0).is_some());
        }
        // Retiring one of the attacker's shapes frees one place of its share.
        assert!(b.try_add_client(), "b in use");
        shapes.retire_unused_now();
        assert!(
            !shapes
                .active()
                .iter()
                .any(|s| s.key == key("com.example.a")),
            "a retired"
        );
        assert!(
            shapes
                .get_or_create(&key("com.example.e"), attacker, || 0)
                .is_some(),
            "a retired shape no longer counts against its creator"
        );
        assert!(
            shapes
                .get_or_create(&key("com.example.f"), attacker, || 0)
                .is_none(),
            "b (in use) and e are its share again"
        );
        b.remove_client();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The race `fanout::attach::counted_shape` handles: a client finds a shape that is retired
    /// a moment later, before it is counted in. It must not be counted into the retired shape
    /// (the writer no longer feeds it), and asking again must give a fresh shape fed from the
    /// index's end at that moment.
    #[test]
    fn a_shape_retired_before_its_client_is_counted_is_replaced_by_a_fresh_one() {
        let (shapes, dir) = registry("retired", 1);
        let peer = ip("192.0.2.1");
        let k = key("app.bsky.feed.post");
        let found = shapes.get_or_create(&k, peer, || 10).expect("created");
        shapes.retire_unused_now();
        assert!(
            !found.try_add_client(),
            "no client counted into a retired shape"
        );
        assert_eq!(found.client_count(), 0);
        // What `counted_shape` does next: find or create again. The retired shape neither
        // answers nor counts against the address's share of one.
        let fresh = shapes
            .get_or_create(&k, peer, || 25)
            .expect("a fresh shape");
        assert!(!Arc::ptr_eq(&found, &fresh));
        assert!(fresh.try_add_client());
        assert_eq!(
            fresh.start_seq(),
            25,
            "fed from the index's end when created"
        );
        assert_eq!(shapes.active().len(), 1);
        shapes.retire_unused_now();
        assert_eq!(
            shapes.active().len(),
            1,
            "a shape with a client is not retired"
        );
        fresh.remove_client();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn table_lookups() {
        let mut t = ShapeTable::default();
        for (i, seq) in [3u64, 7, 8, 20].iter().enumerate() {
            t.frames.push_back((*seq, i as u64 * 100));
        }
        assert_eq!(t.offset_from_seq(0, 400), 0);
        assert_eq!(t.offset_from_seq(4, 400), 100);
        assert_eq!(t.offset_from_seq(8, 400), 200);
        assert_eq!(t.offset_from_seq(21, 400), 400);
        assert_eq!(t.seq_at_offset(200, 99), 8);
        assert_eq!(t.seq_at_offset(400, 99), 99);
        assert_eq!(t.ordinal_at_offset(200), 2);
        assert_eq!(t.last_seq_before(0), None);
        assert_eq!(t.last_seq_before(1), Some(3));
        assert_eq!(t.last_seq_before(200), Some(7));
        assert_eq!(t.last_seq_before(1000), Some(20));
        assert_eq!(t.drop_before(8, 400), 200);
        assert_eq!(t.frames.len(), 2);
        assert_eq!(t.ordinal_at_offset(200), 2, "ordinals survive retention");
        assert_eq!(t.ordinal_at_offset(400), 4);
    }
}
