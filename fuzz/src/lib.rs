//! Shared pieces of the fuzz targets: slow reference implementations written from the specs
//! (RFC 6455, the PROXY protocol v2 text, Go's `url.ParseQuery`, the atproto NSID/DID syntax),
//! against which the relay's fast parsers are compared, and small helpers.
//!
//! The references favour obviousness over speed: whole-buffer, no incremental state, no
//! cleverness shared with the code under test.

pub mod reference;

/// Collections to probe filters with: real ones and near misses.
pub const COLLECTION_PROBES: &[&str] = &[
    "app.bsky.feed.post",
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "app.bsky.graphx.follow",
    "app.bsky",
    "app.bskyfeed.post",
    "chat.bsky.actor.declaration",
    "com.example.record",
];

/// Every value of `key` in decoded query `pairs`, in order.
pub fn values<'a>(pairs: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Canonical options rebuild themselves: `SubscriberOptions::new` on their own collections,
/// DIDs and size limit gives the same options back.
pub fn assert_options_rebuild(options: &jetrelay::subscription::SubscriberOptions) {
    let collections: Vec<String> = options
        .wanted_collections
        .iter()
        .map(ToString::to_string)
        .collect();
    let rebuilt = jetrelay::subscription::SubscriberOptions::new(
        &collections,
        &options.wanted_dids,
        options.max_message_size,
    )
    .expect("canonical options are valid");
    assert_eq!(&rebuilt, options);
}

/// Splits `stream` into chunks whose lengths come from `sizes` (each byte a length 0..=255,
/// cycled; a zero-length chunk is a read that returned nothing, which the decoders must also
/// survive). With no sizes, one chunk.
pub fn split_by<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.is_empty() {
        return vec![stream];
    }
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = usize::from(sizes[i % sizes.len()]).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        chunks.push(chunk);
        rest = tail;
        i += 1;
        // A sizes list of only zeros would never advance: after a full cycle of empty chunks,
        // take one byte.
        if i % sizes.len() == 0 && sizes.iter().all(|&s| s == 0) && !rest.is_empty() {
            let (chunk, tail) = rest.split_at(1);
            chunks.push(chunk);
            rest = tail;
        }
    }
    chunks
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("jetrelay-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch dir");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
