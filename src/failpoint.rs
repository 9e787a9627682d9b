//! Crash points for recovery tests: every write the append path makes to the logs and the
//! index goes through [`write_all_at`], named after what it writes (`plain`, `zstd`,
//! `collections`, `events.idx`, `chunks.idx`, `durable.idx`, a shape's label).
//!
//! In debug builds, `TEST_JETRELAY_CRASH=POINT:N` kills the process (`SIGKILL`, as a crash
//! would) just before the `N`-th write (1-based) to `POINT`, and `POINT:N:torn` after writing
//! only part of it (a torn write: what a crash or a full disk mid-`write` leaves), so that a
//! test can stop the real append path between any two of its writes; [`crash_point`] marks a
//! step that is not a write (retention between its punches). Release builds compile this to a
//! plain positional write.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Environment variable of the crash hook (debug builds only).
pub const CRASH_ENV: &str = "TEST_JETRELAY_CRASH";

/// Writes all of `buf` at `offset` of `f`; `point` names the write for the crash hook.
#[inline]
pub fn write_all_at(f: &File, buf: &[u8], offset: u64, point: &str) -> io::Result<()> {
    #[cfg(debug_assertions)]
    hook::reached(point, Some((f, buf, offset)));
    #[cfg(not(debug_assertions))]
    let _ = point;
    f.write_all_at(buf, offset)
}

/// A crash point between two steps that are not writes (see the module documentation).
#[inline]
pub fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    hook::reached(point, None);
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[cfg(debug_assertions)]
mod hook {
    use super::*;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The configured crash: at the `nth` write to `point`, torn or not.
    struct Crash {
        /// Which write.
        point: String,
        /// Its 1-based occurrence.
        nth: u64,
        /// Write part of the buffer first.
        torn: bool,
        /// Writes to `point` so far.
        seen: AtomicU64,
    }

    fn crash() -> Option<&'static Crash> {
        static CRASH: OnceLock<Option<Crash>> = OnceLock::new();
        CRASH
            .get_or_init(|| {
                let spec = std::env::var(CRASH_ENV).ok()?;
                let mut parts = spec.split(':');
                let point = parts.next()?.to_owned();
                let nth = parts.next()?.parse().ok()?;
                let torn = parts.next() == Some("torn");
                Some(Crash {
                    point,
                    nth,
                    torn,
                    seen: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub(super) fn reached(point: &str, write: Option<(&File, &[u8], u64)>) {
        let Some(c) = crash() else {
            return;
        };
        if c.point != point || c.seen.fetch_add(1, Ordering::SeqCst) + 1 != c.nth {
            return;
        }
        if let Some((f, buf, offset)) = write
            && c.torn
            && buf.len() > 1
        {
            // A prefix of the write reached the file: from one byte to all but the last.
            let len = 1 + (offset as usize ^ buf.len()) % (buf.len() - 1);
            let _ = f.write_all_at(&buf[..len], offset);
        }
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        loop {
            std::thread::park();
        }
    }
}
