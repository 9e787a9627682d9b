//! The relay's own sequence numbers ("seq"): what `/subscribe` frames carry as their top-level
//! `cursor`, v2 frames as `seq`, and what a `?cursor=` below 10^15 resumes from.
//!
//! Jetstream's rule: monotonic, gaps allowed, never reused — even after an unclean stop. The
//! relay numbers events by their position in the index, plus an offset: positions are dense
//! (the index's records), but recovery after a crash may cut events that were published and
//! never made durable, so their positions are used again; their seqs must not be. Hence:
//! - the writer *reserves* seqs ahead of use in `seqs.reserve` (synced before the first seq
//!   above the old reservation is handed out), so every seq ever published is below it;
//! - a clean shutdown writes `seqs.clean` (everything synced: no position can be reused);
//! - a start without it adds a *segment*: from the next position on, seqs continue at the
//!   reservation, past anything that may have been published. Segments are stored in
//!   `seqs.idx`, one 16-byte record (position, seq) each — one per unclean restart.
//!
//! Lookups are a binary search over the segments (a handful): seq of a position, position
//! of a seq (exact for an event's seq; a seq in a gap resolves to the first event after it).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The first seq ever handed out (0 is never a seq, as on the official server).
pub const FIRST_SEQ: u64 = 1;
/// Seqs reserved at a time. Why a million: a reservation costs a write and an fdatasync on
/// the writer thread, so it should be rare (half an hour of the public feed, ten seconds of a
/// fast catch-up), and an unclean restart skips at most this many seqs (gaps are allowed).
pub const RESERVE_AHEAD: u64 = 1_000_000;

/// From `pos` on, event `pos + k` has seq `seq + k` (until the next segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First index position of the segment.
    pub pos: u64,
    /// Its seq.
    pub seq: u64,
}

/// How the sequence was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// No sequence files: a new relay.
    Fresh,
    /// After a clean shutdown: seqs continue without a gap.
    Clean,
    /// After an unclean stop: seqs continue at the reservation (a gap of unknown size).
    Unclean { skipped: u64 },
}

/// The mapping between index positions and seqs, with its persistence.
pub struct Seqs {
    /// Sorted by position (and so by seq); never empty.
    segments: Vec<Segment>,
    /// Seqs below this may have been handed out (persisted before use).
    reserved: u64,
    /// Where the files live (None: in memory, for tests and simulations).
    dir: Option<PathBuf>,
}

impl Seqs {
    /// A new in-memory sequence starting at [`FIRST_SEQ`] at position 0.
    pub fn in_memory() -> Seqs {
        Seqs {
            segments: vec![Segment {
                pos: 0,
                seq: FIRST_SEQ,
            }],
            reserved: u64::MAX,
            dir: None,
        }
    }

    /// Opens the sequence in `dir` for an index whose next position is `next_pos`, adding a
    /// segment after an unclean stop (see the module documentation). The `clean` mark is
    /// consumed: a crash from now on is unclean again.
    pub fn open(dir: &Path, next_pos: u64) -> io::Result<(Seqs, Start)> {
        let idx = dir.join("seqs.idx");
        let clean = dir.join("seqs.clean");
        let mut segments = read_segments(&idx)?;
        let reserved = read_u64(&dir.join("seqs.reserve"))?.unwrap_or(0);
        let was_clean = clean.exists();
        // Segments that begin past the recovered end describe positions that no longer exist.
        segments.retain(|s| s.pos <= next_pos);
        let mut seqs = Seqs {
            segments,
            reserved,
            dir: Some(dir.to_path_buf()),
        };
        let start = if seqs.segments.is_empty() && next_pos == 0 && reserved == 0 {
            seqs.push_segment(Segment {
                pos: 0,
                seq: FIRST_SEQ,
            })?;
            Start::Fresh
        } else {
            if seqs.segments.is_empty() {
                // An index without sequence files (they were lost): its events are numbered
                // from the first seq on, as a fresh relay would have numbered them.
                seqs.segments.push(Segment {
                    pos: 0,
                    seq: FIRST_SEQ,
                });
            }
            if was_clean {
                Start::Clean
            } else {
                // Unclean: continue past everything that may have been published.
                let continued = seqs.seq_of(next_pos);
                let seq = continued.max(reserved);
                seqs.push_segment(Segment { pos: next_pos, seq })?;
                Start::Unclean {
                    skipped: seq - continued,
                }
            }
        };
        if was_clean {
            std::fs::remove_file(&clean)?;
            sync_dir(dir)?;
        }
        Ok((seqs, start))
    }

    /// Seq of the event at index position `pos`.
    pub fn seq_of(&self, pos: u64) -> u64 {
        let i = self.segments.partition_point(|s| s.pos <= pos);
        let s = self.segments[i.saturating_sub(1)];
        s.seq + pos.saturating_sub(s.pos)
    }

    /// Index position of the first event whose seq is at least `seq` (exact for an event's
    /// own seq; a seq in a gap gives the first event after the gap).
    pub fn pos_of(&self, seq: u64) -> u64 {
        let i = self.segments.partition_point(|s| s.seq <= seq);
        if i == 0 {
            return self.segments[0].pos;
        }
        let s = self.segments[i - 1];
        let pos = s.pos + (seq - s.seq);
        match self.segments.get(i) {
            Some(next) if pos >= next.pos => next.pos,
            _ => pos,
        }
    }

    /// Before the event at `pos` is published: makes sure its seq is reserved (a write and an
    /// fdatasync once every [`RESERVE_AHEAD`] seqs). Returns the seq.
    pub fn reserve(&mut self, pos: u64) -> io::Result<u64> {
        let seq = self.seq_of(pos);
        if seq >= self.reserved {
            let upto = seq + RESERVE_AHEAD;
            if let Some(dir) = &self.dir {
                write_u64_synced(&dir.join("seqs.reserve"), upto)?;
            }
            self.reserved = upto;
        }
        Ok(seq)
    }

    /// After a clean shutdown synced everything: the next start continues without a gap.
    pub fn mark_clean(&self) -> io::Result<()> {
        if let Some(dir) = &self.dir {
            File::create(dir.join("seqs.clean"))?.sync_all()?;
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// The segments (oldest first).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn push_segment(&mut self, s: Segment) -> io::Result<()> {
        if self.segments.last().is_some_and(|l| l.pos == s.pos) {
            self.segments.pop();
        }
        self.segments.push(s);
        if let Some(dir) = &self.dir {
            // Rewritten whole (a handful of records) and renamed into place: a crash leaves
            // the old or the new file, never a torn one.
            let tmp = dir.join("seqs.idx.tmp");
            let mut f = File::create(&tmp)?;
            for s in &self.segments {
                f.write_all(&s.pos.to_le_bytes())?;
                f.write_all(&s.seq.to_le_bytes())?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join("seqs.idx"))?;
            sync_dir(dir)?;
        }
        Ok(())
    }
}

fn read_segments(path: &Path) -> io::Result<Vec<Segment>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<Segment> = Vec::new();
    for r in bytes.chunks_exact(16) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&r[..8]);
        let pos = u64::from_le_bytes(a);
        a.copy_from_slice(&r[8..]);
        let seq = u64::from_le_bytes(a);
        // A record that does not continue the order (a seq at or below one its predecessor
        // already numbers) is damage: refuse rather than guess.
        if out
            .last()
            .is_some_and(|l| pos < l.pos || seq < l.seq + (pos - l.pos))
            || seq < FIRST_SEQ
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: segments out of order", path.display()),
            ));
        }
        out.push(Segment { pos, seq });
    }
    Ok(out)
}

fn read_u64(path: &Path) -> io::Result<Option<u64>> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            Ok(Some(u64::from_le_bytes(a)))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `v` to `path` durably (a temporary file renamed into place).
fn write_u64_synced(path: &Path, v: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(&v.to_le_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("jetrelay-seqs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn positions_and_seqs_map_both_ways_across_gaps() {
        let mut s = Seqs::in_memory();
        assert_eq!(s.seq_of(0), 1);
        assert_eq!(s.seq_of(9), 10);
        s.segments.push(Segment { pos: 10, seq: 100 });
        s.segments.push(Segment { pos: 20, seq: 500 });
        assert_eq!(s.seq_of(10), 100);
        assert_eq!(s.seq_of(19), 109);
        assert_eq!(s.seq_of(25), 505);
        assert_eq!(s.pos_of(1), 0);
        assert_eq!(s.pos_of(0), 0, "below the first seq: the first event");
        assert_eq!(s.pos_of(10), 9);
        assert_eq!(s.pos_of(11), 10, "in the gap: the first event after it");
        assert_eq!(s.pos_of(99), 10);
        assert_eq!(s.pos_of(105), 15);
        assert_eq!(
            s.pos_of(110),
            20,
            "past the segment's events: the next segment"
        );
        assert_eq!(s.pos_of(505), 25);
        for pos in 0..40 {
            assert_eq!(s.pos_of(s.seq_of(pos)), pos, "round trip at {pos}");
        }
    }

    #[test]
    fn an_unclean_restart_skips_every_reserved_seq_and_a_clean_one_none() {
        let d = dir("restart");
        let (mut s, start) = Seqs::open(&d, 0).unwrap();
        assert_eq!(start, Start::Fresh);
        assert_eq!(s.reserve(0).unwrap(), 1);
        assert_eq!(s.reserve(41).unwrap(), 42);
        // A crash: recovery kept 30 of 42 events; seqs 31..=42 were published and are lost.
        let (mut s, start) = Seqs::open(&d, 30).unwrap();
        assert_eq!(
            start,
            Start::Unclean {
                skipped: 1 + RESERVE_AHEAD - 31
            }
        );
        assert_eq!(s.seq_of(29), 30, "retained events keep their seqs");
        let next = s.reserve(30).unwrap();
        assert!(next > 42, "no seq is reused ({next})");
        assert_eq!(next, 1 + RESERVE_AHEAD);
        // A clean shutdown: no gap.
        s.mark_clean().unwrap();
        let (s2, start) = Seqs::open(&d, 35).unwrap();
        assert_eq!(start, Start::Clean);
        assert_eq!(s2.seq_of(35), next + 5);
        // The mark is consumed: a crash now is unclean again.
        drop(s2);
        let (_, start) = Seqs::open(&d, 35).unwrap();
        assert!(matches!(start, Start::Unclean { .. }));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn damaged_segments_are_refused() {
        let d = dir("damaged");
        let mut bytes = Vec::new();
        for (p, q) in [(0u64, 1u64), (10, 5)] {
            bytes.extend_from_slice(&p.to_le_bytes());
            bytes.extend_from_slice(&q.to_le_bytes());
        }
        std::fs::write(d.join("seqs.idx"), bytes).unwrap();
        let err = Seqs::open(&d, 20).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let _ = std::fs::remove_dir_all(&d);
    }
}
