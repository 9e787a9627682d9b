//! The log: an append-only file of pre-framed WebSocket frames, exactly the bytes a client
//! receives, plus an in-memory copy of its newest bytes (the tail ring).
//!
//! Offsets never move: retention drops old data by punching holes
//! (`FALLOC_FL_PUNCH_HOLE`), so `ls` grows while `du` stays bounded and a client's position
//! stays valid for as long as its bytes are retained.
//!
//! Two read paths, both without any per-client userspace copy of a payload:
//! - catch-up: `splice` file → pipe → socket (fan-out's splice path), zero-copy from the page cache;
//! - live: `send` straight from the tail ring, which the writer filled once for all clients.
//!
//! Concurrency contract (one writer thread, many fan-out workers):
//! - `end` is published with Release after the bytes are in both the file and the ring;
//! - a worker *pins* the lowest ring offset it may send from before it builds a send, and
//!   unpins once the completion of every send built on the pin is reaped (a send the kernel
//!   has not run yet still reads the ring); the writer never overwrites pinned ring bytes
//!   (Dekker-style handshake on `overwrite_floor` and the pins, both SeqCst) — when it cannot
//!   wait, it gives the ring bytes up instead (`overwrite_floor` rises past them and readers
//!   take them from the file);
//! - retention raises `kick_below`, waits until every worker reports no reader below the punch
//!   point (`worker_low`), then raises `start` and punches. Readers never start below `start`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::MAX_WORKERS;

/// Why 4 KiB: punched ranges must be block-aligned to actually free blocks; a partial block
/// would be zeroed in place instead, and a reader could be looking at it.
pub const PUNCH_ALIGN: u64 = 4096;

/// "No position": used for released pins and for workers without readers on a stream.
pub const NONE: u64 = u64::MAX;

/// How long the writer waits for a pinned ring region before giving up on the ring for that
/// append (it then marks the ring stale; readers fall back to the file). Why bounded: the
/// writer must never be held hostage by a descheduled worker.
const PIN_WAIT_LIMIT: Duration = Duration::from_millis(200);

/// The newest bytes of a stream, shared by all live readers.
struct TailRing {
    /// Backing memory. Never borrowed after construction: the writer copies in through `base`
    /// while the kernel reads other parts on behalf of workers.
    _buf: Box<[u8]>,
    /// Start of `_buf`, the only way the ring's bytes are reached.
    base: *mut u8,
    /// Capacity − 1 (capacity is a power of two).
    mask: u64,
    /// Ring offsets below this may be overwritten right now (announced before each write).
    overwrite_floor: AtomicU64,
    /// Per worker: lowest ring offset its in-flight submission may read, or `NONE`.
    pins: [AtomicU64; MAX_WORKERS],
}

// SAFETY: the ring's bytes are written only by the single writer thread, into a region no
// worker has pinned (see the pin protocol above); readers never read them in userspace, they
// only hand pointers to the kernel during a pinned submission.
unsafe impl Sync for TailRing {}
// SAFETY: as above; the raw pointer is only an alias of the owned allocation.
unsafe impl Send for TailRing {}

impl TailRing {
    fn new(capacity: usize) -> TailRing {
        assert!(capacity.is_power_of_two() && capacity >= 4096);
        let mut buf = vec![0u8; capacity].into_boxed_slice();
        let base = buf.as_mut_ptr();
        TailRing {
            _buf: buf,
            base,
            mask: capacity as u64 - 1,
            overwrite_floor: AtomicU64::new(0),
            pins: std::array::from_fn(|_| AtomicU64::new(NONE)),
        }
    }

    fn capacity(&self) -> u64 {
        self.mask + 1
    }
}

/// One log file and its tail ring.
pub struct Stream {
    /// Label for logs and metrics: "plain", "zstd", or a shape label.
    pub label: String,
    /// The file on disk (deleted again when an unused shape is dropped).
    path: PathBuf,
    /// The log file. Workers splice from it; only the writer writes.
    file: File,
    /// Bytes `[0, end)` are written and visible.
    end: AtomicU64,
    /// No reader may be positioned below this; bytes below are punched or about to be.
    start: AtomicU64,
    /// Readers below this offset are disconnected (retention wants to punch up to here).
    kick_below: AtomicU64,
    /// Per worker: no reader of that worker is below this offset (conservative lower bound).
    worker_low: [AtomicU64; MAX_WORKERS],
    /// How far `start` has actually been punched (block-aligned).
    punched: AtomicU64,
    /// Copy of the newest bytes for the live path.
    ring: TailRing,
    /// An unused shape is retired: its readers are moved off or closed, then it is deleted.
    retired: AtomicBool,
    /// How long the writer waits for a pinned ring region (ns); see [`PIN_WAIT_LIMIT`].
    pin_wait_ns: AtomicU64,
}

impl Stream {
    /// Opens (creating if needed) the log at `path`; the caller has already recovered its
    /// content and says how many bytes are valid (`end`) and where retained data starts.
    pub fn open(
        label: impl Into<String>,
        path: &Path,
        ring_capacity: usize,
        start: u64,
        end: u64,
    ) -> io::Result<Stream> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len != end {
            file.set_len(end)?;
        }
        Ok(Stream {
            label: label.into(),
            path: path.to_path_buf(),
            file,
            end: AtomicU64::new(end),
            start: AtomicU64::new(start),
            kick_below: AtomicU64::new(start),
            worker_low: std::array::from_fn(|_| AtomicU64::new(NONE)),
            punched: AtomicU64::new(start / PUNCH_ALIGN * PUNCH_ALIGN),
            ring: TailRing::new(ring_capacity),
            // The ring holds nothing from before this process: readers of older bytes use the file.
            retired: AtomicBool::new(false),
            pin_wait_ns: AtomicU64::new(PIN_WAIT_LIMIT.as_nanos() as u64),
        }
        .with_ring_floor(end))
    }

    fn with_ring_floor(self, end: u64) -> Stream {
        self.ring.overwrite_floor.store(end, Ordering::SeqCst);
        self
    }

    /// Creates a fresh, empty stream file (truncating any leftover).
    pub fn create(
        label: impl Into<String>,
        path: &Path,
        ring_capacity: usize,
    ) -> io::Result<Stream> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        drop(file);
        Stream::open(label, path, ring_capacity, 0, 0)
    }

    /// Raw fd for splice SQEs.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The file, for positional reads (cursor lookups, recovery).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Published end (Acquire: the bytes before it are in the file and the ring).
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// First retained offset.
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::SeqCst)
    }

    /// Readers below this must be disconnected.
    pub fn kick_below(&self) -> u64 {
        self.kick_below.load(Ordering::SeqCst)
    }

    /// Whether this stream was retired (unused shape).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Marks the stream retired.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Sets how long the writer waits for a pinned ring region before it gives the region up
    /// (readers then take those bytes from the file). A single-threaded simulation, in which a
    /// pin can only be released after the writer returns, sets zero.
    pub fn set_pin_wait(&self, wait: Duration) {
        self.pin_wait_ns
            .store(wait.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ---- writer side -------------------------------------------------------------------

    /// Appends `bytes` (whole frames) without publishing them; returns the offset they start
    /// at. Call [`Stream::publish`] after a batch so readers see complete frames only.
    pub fn append(&self, bytes: &[u8], unpublished_end: &mut u64) -> io::Result<u64> {
        let at = *unpublished_end;
        crate::failpoint::write_all_at(&self.file, bytes, at, &self.label)?;
        self.ring_write(at, bytes);
        *unpublished_end = at + bytes.len() as u64;
        Ok(at)
    }

    /// Makes everything appended so far visible to readers.
    pub fn publish(&self, new_end: u64) {
        debug_assert!(new_end >= self.end.load(Ordering::Relaxed));
        self.end.store(new_end, Ordering::Release);
    }

    fn ring_write(&self, at: u64, bytes: &[u8]) {
        let ring = &self.ring;
        let cap = ring.capacity();
        // A single append larger than the ring cannot be served from it: skip it there (the
        // floor moves past it and readers take those bytes from the file).
        let (at, bytes) = if bytes.len() as u64 > cap / 2 {
            let skip = bytes.len() - (cap / 2) as usize;
            (at + skip as u64, &bytes[skip..])
        } else {
            (at, bytes)
        };
        let new_floor = (at + bytes.len() as u64).saturating_sub(cap);
        ring.overwrite_floor.fetch_max(new_floor, Ordering::SeqCst);
        let wait = Duration::from_nanos(self.pin_wait_ns.load(Ordering::Relaxed));
        let deadline = std::time::Instant::now() + wait;
        let mut floor_ok = true;
        for pin in &ring.pins {
            while pin.load(Ordering::SeqCst) < new_floor {
                if std::time::Instant::now() > deadline {
                    floor_ok = false;
                    break;
                }
                std::thread::yield_now();
            }
        }
        if !floor_ok {
            // A worker is stuck inside a pinned submission: poison everything written so far
            // for the ring (readers fall back to the file) rather than overwrite under it.
            ring.overwrite_floor
                .fetch_max(at + bytes.len() as u64, Ordering::SeqCst);
            tracing::warn!(stream = %self.label, "ring pin held too long; live readers fall back to the file");
            return;
        }
        let mut off = 0usize;
        while off < bytes.len() {
            let pos = (at + off as u64) & ring.mask;
            let room = (cap - pos) as usize;
            let n = room.min(bytes.len() - off);
            // SAFETY: [pos, pos+n) lies inside the ring's allocation (pos < capacity and
            // n <= capacity - pos); no pinned reader covers the offsets being overwritten
            // (checked above), and only this thread writes the ring.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes[off..].as_ptr(),
                    ring.base.add(pos as usize),
                    n,
                );
            }
            off += n;
        }
    }

    // ---- reader side (fan-out workers) -------------------------------------------------

    /// Pins this worker's view of the ring before a submission: returns the lowest offset that
    /// may be sent from the ring in this batch (bytes below it come from the file).
    pub fn pin_ring(&self, worker: usize) -> u64 {
        let ring = &self.ring;
        let end = self.end();
        // Why half the ring: the writer can append up to half a ring during one submission
        // without waiting on this pin.
        let wanted = end.saturating_sub(ring.capacity() / 2);
        ring.pins[worker].store(wanted, Ordering::SeqCst);
        let floor = ring.overwrite_floor.load(Ordering::SeqCst);
        let low = wanted.max(floor);
        if low != wanted {
            ring.pins[worker].store(low, Ordering::SeqCst);
        }
        low
    }

    /// The lowest offset the ring holds valid bytes for right now (for a pin that is already
    /// held: the writer may have given up ring bytes above the pin since it was taken).
    pub fn ring_floor(&self) -> u64 {
        self.ring.overwrite_floor.load(Ordering::SeqCst)
    }

    /// Releases the pin once no send from the ring is in flight.
    pub fn unpin_ring(&self, worker: usize) {
        self.ring.pins[worker].store(NONE, Ordering::SeqCst);
    }

    /// The contiguous ring bytes for `[pos, min(end, pos+max))`, as a pointer and a length.
    /// Only valid between [`Stream::pin_ring`] (which must have returned ≤ `pos`) and
    /// [`Stream::unpin_ring`]; the caller hands the pointer to the kernel only.
    pub fn ring_span(&self, pos: u64, end: u64, max: usize) -> (*const u8, usize) {
        let ring = &self.ring;
        let off = pos & ring.mask;
        let contiguous = (ring.capacity() - off) as usize;
        let len = ((end - pos) as usize).min(contiguous).min(max);
        // SAFETY: off < capacity, so the pointer stays inside the ring's allocation.
        (unsafe { ring.base.add(off as usize) } as *const u8, len)
    }

    /// Publishes that this worker has no reader below `low` (`NONE` = no readers).
    pub fn set_worker_low(&self, worker: usize, low: u64) {
        self.worker_low[worker].store(low, Ordering::SeqCst);
    }

    /// Lowers this worker's bound to include a new reader at `pos`, then re-checks retention:
    /// returns false if `pos` is already being punched (the caller must not read from it).
    pub fn register_reader(&self, worker: usize, pos: u64) -> bool {
        self.worker_low[worker].fetch_min(pos, Ordering::SeqCst);
        pos >= self.kick_below.load(Ordering::SeqCst)
    }

    // ---- retention ---------------------------------------------------------------------

    /// Asks readers below `offset` to leave (they get a close frame).
    pub fn request_kick(&self, offset: u64) {
        self.kick_below.fetch_max(offset, Ordering::SeqCst);
    }

    /// Lowest position any worker may still read, after kicks were requested.
    pub fn lowest_reader(&self) -> u64 {
        self.worker_low
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .min()
            .unwrap_or(NONE)
    }

    /// Drops everything below `upto` (a frame boundary ≤ every reader): raises `start`, then
    /// punches the whole blocks below it. Returns the bytes newly punched.
    pub fn punch_below(&self, upto: u64) -> io::Result<u64> {
        let upto = upto.min(self.end());
        self.start.fetch_max(upto, Ordering::SeqCst);
        let aligned = upto / PUNCH_ALIGN * PUNCH_ALIGN;
        let from = self.punched.load(Ordering::SeqCst);
        if aligned <= from {
            return Ok(0);
        }
        rustix::fs::fallocate(
            self.file.as_fd(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            from,
            aligned - from,
        )?;
        self.punched.store(aligned, Ordering::SeqCst);
        Ok(aligned - from)
    }

    /// Bytes actually allocated on disk (`du`), as opposed to the apparent size (`end`).
    pub fn allocated_bytes(&self) -> u64 {
        rustix::fs::fstat(&self.file)
            .map(|st| st.st_blocks as u64 * 512)
            .unwrap_or(0)
    }

    /// Flushes file data to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("jetrelay-log-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("log")
    }

    fn ring_bytes(s: &Stream, pos: u64, end: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut p = pos;
        while p < end {
            let (ptr, len) = s.ring_span(p, end, usize::MAX);
            // SAFETY: test-only read of a pinned, published region.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
            p += len as u64;
        }
        out
    }

    #[test]
    fn append_publish_and_ring_wraparound() {
        let path = tmp("wrap");
        let s = Stream::create("t", &path, 4096).unwrap();
        let mut end = 0;
        let mut all = Vec::new();
        for i in 0..100u8 {
            let chunk = vec![i; 97];
            s.append(&chunk, &mut end).unwrap();
            all.extend_from_slice(&chunk);
        }
        assert_eq!(s.end(), 0, "nothing visible before publish");
        s.publish(end);
        assert_eq!(s.end(), 9700);
        let low = s.pin_ring(0);
        assert_eq!(low, 9700 - 2048);
        assert_eq!(ring_bytes(&s, low, end), all[low as usize..].to_vec());
        s.unpin_ring(0);
        let mut disk = vec![0; 9700];
        s.file().read_exact_at(&mut disk, 0).unwrap();
        assert_eq!(disk, all);
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn punch_keeps_offsets_and_frees_blocks() {
        let path = tmp("punch");
        let s = Stream::create("t", &path, 4096).unwrap();
        let mut end = 0;
        let block = vec![7u8; 64 * 1024];
        for _ in 0..16 {
            s.append(&block, &mut end).unwrap();
        }
        s.publish(end);
        s.sync().unwrap();
        let before = s.allocated_bytes();
        s.request_kick(600_000);
        assert!(
            !s.register_reader(1, 10),
            "a reader below the kick point is refused"
        );
        s.set_worker_low(1, NONE);
        assert_eq!(s.lowest_reader(), NONE);
        let freed = s.punch_below(600_000).unwrap();
        assert_eq!(freed, 600_000 / 4096 * 4096);
        assert!(s.allocated_bytes() < before);
        assert_eq!(
            s.file().metadata().unwrap().len(),
            end,
            "apparent size unchanged"
        );
        let mut tail = vec![0; 4096];
        s.file().read_exact_at(&mut tail, 700_000).unwrap();
        assert!(
            tail.iter().all(|b| *b == 7),
            "data past the punch is intact"
        );
        assert_eq!(s.start(), 600_000);
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn writer_respects_pins() {
        let path = tmp("pins");
        let s = std::sync::Arc::new(Stream::create("t", &path, 4096).unwrap());
        let mut end = 0;
        s.append(&[1u8; 2000], &mut end).unwrap();
        s.publish(end);
        let low = s.pin_ring(3);
        assert_eq!(low, 0);
        let t0 = std::time::Instant::now();
        let s2 = s.clone();
        let h = std::thread::spawn(move || {
            let mut end = 2000;
            // This would overwrite offsets 0..2000+3000-4096 = 0..904: must wait for the unpin.
            s2.append(&[2u8; 3000], &mut end).unwrap();
            s2.publish(end);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.end(), 2000, "writer blocked by the pin");
        s.unpin_ring(3);
        h.join().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(s.end(), 5000);
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }
}
