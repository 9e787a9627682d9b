//! The restart checkpoint's URL half: `upstream.url` in the data directory names the
//! configured upstream whose session appended the newest events. The seq half is the
//! `upstream_seq` of the newest index record; together they are an [`UpstreamCheckpoint`].
//!
//! The writer records the URL before it appends the first event of a session from another URL
//! than the one recorded (so a reconnect to the same URL writes nothing). The file is replaced
//! atomically (temporary file, fsync, rename, fsync of the directory): a crash leaves the old
//! URL or the new one, never a torn one. A crash between the URL's write and the session's
//! first durable event leaves the new URL with the previous session's seq; the follower's
//! check of the first resumed event catches that pair and resumes by time instead (see
//! [`UpstreamCheckpoint`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::UpstreamCheckpoint;

/// The file's name in the data directory.
pub const URL_FILE: &str = "upstream.url";

/// Longest file content read back. Why: a configured URL is far shorter; a damaged or foreign
/// file must not be read whole or logged whole.
const MAX_URL_BYTES: u64 = 8 * 1024;

/// `upstream.url`: what it holds and where it is.
#[derive(Debug)]
pub struct UrlFile {
    /// The data directory (fsynced after a rename, so the new name is durable).
    dir: PathBuf,
    /// The URL the file holds now, if any (what a write would leave unchanged).
    recorded: Option<String>,
}

impl UrlFile {
    /// Reads `dir/upstream.url`. A missing file is no URL; an unreadable, oversized or
    /// non-UTF-8 one is logged and treated as no URL (the relay then resumes by time).
    pub fn open(dir: &Path) -> UrlFile {
        let path = dir.join(URL_FILE);
        let recorded = match read_url(&path) {
            Ok(url) => url,
            Err(e) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "ignoring the restart checkpoint's URL file: resuming upstream by time"
                );
                None
            }
        };
        UrlFile {
            dir: dir.to_path_buf(),
            recorded,
        }
    }

    /// The URL the file holds.
    pub fn recorded(&self) -> Option<&str> {
        self.recorded.as_deref()
    }

    /// Makes the file hold `url`; nothing is written when it already does.
    pub fn record(&mut self, url: &str) -> io::Result<()> {
        if self.recorded.as_deref() == Some(url) {
            return Ok(());
        }
        let path = self.dir.join(URL_FILE);
        let tmp = self.dir.join(format!("{URL_FILE}.tmp"));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(url.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()?;
        self.recorded = Some(url.to_owned());
        Ok(())
    }

    /// The checkpoint a restart resumes from: the recorded URL with the newest event's
    /// upstream seq (`0`: its wire had none, so there is nothing to resume by seq).
    pub fn checkpoint(&self, newest_upstream_seq: u64) -> Option<UpstreamCheckpoint> {
        let url = self.recorded.clone()?;
        (newest_upstream_seq != 0).then_some(UpstreamCheckpoint {
            url,
            seq: newest_upstream_seq,
        })
    }
}

/// The URL in the file at `path` (`None` when there is no file or it is empty).
fn read_url(path: &Path) -> io::Result<Option<String>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_URL_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_URL_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_URL_BYTES} bytes"),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))?;
    let url = text.trim_end_matches('\n');
    Ok((!url.is_empty()).then(|| url.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "jetrelay-urlfile-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_reads_back_and_skips_unchanged_writes() {
        let dir = temp_dir("rw");
        let mut f = UrlFile::open(&dir);
        assert_eq!(f.recorded(), None);
        assert_eq!(f.checkpoint(5), None, "no URL, no checkpoint");
        f.record("ws://a/subscribe").unwrap();
        let path = dir.join(URL_FILE);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "ws://a/subscribe\n"
        );
        // Unchanged: no write (the file's removal is not noticed).
        std::fs::remove_file(&path).unwrap();
        f.record("ws://a/subscribe").unwrap();
        assert!(!path.exists());
        f.record("ws://b/subscribe").unwrap();
        let again = UrlFile::open(&dir);
        assert_eq!(again.recorded(), Some("ws://b/subscribe"));
        assert!(!dir.join(format!("{URL_FILE}.tmp")).exists());
        assert_eq!(
            again.checkpoint(42),
            Some(UpstreamCheckpoint {
                url: "ws://b/subscribe".into(),
                seq: 42
            })
        );
        assert_eq!(again.checkpoint(0), None, "the newest event had no seq");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_no_url() {
        let dir = temp_dir("bad");
        let path = dir.join(URL_FILE);
        for bad in [
            vec![0xff, 0xfe, b'\n'],
            vec![b'x'; MAX_URL_BYTES as usize + 1],
            b"\n".to_vec(),
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(UrlFile::open(&dir).recorded(), None);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
