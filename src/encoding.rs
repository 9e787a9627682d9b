//! The four ways an event goes out, each produced once per event at ingest and kept in its own
//! base log, so that every client is served pre-framed bytes from a shared log.

use crate::frame::Opcode;

/// How a client receives events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Encoding {
    /// `/subscribe`: the event's JSON (with the relay's `cursor`) in a text frame.
    V1Json = 0,
    /// `/subscribe` with `compress=true`: that JSON compressed on its own with the v1
    /// dictionary, in a binary frame.
    V1Zstd = 1,
    /// `subscribeEvents`: the `xrpc.v1.json` message in a text frame.
    V2Json = 2,
    /// `subscribeEvents` with `zstdDictionary`: that message compressed on its own with the
    /// v2 dictionary, in a binary frame.
    V2Zstd = 3,
}

/// Number of encodings (and so of base logs and of frame lengths per index record).
pub const ENCODINGS: usize = 4;

impl Encoding {
    /// Every encoding, in index order.
    pub const ALL: [Encoding; ENCODINGS] = [
        Encoding::V1Json,
        Encoding::V1Zstd,
        Encoding::V2Json,
        Encoding::V2Zstd,
    ];

    /// Slot in per-encoding arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether frames are compressed (binary frames, one zstd frame each).
    pub fn compressed(self) -> bool {
        matches!(self, Encoding::V1Zstd | Encoding::V2Zstd)
    }

    /// Whether this is the v2 (`subscribeEvents`) wire.
    pub fn v2(self) -> bool {
        matches!(self, Encoding::V2Json | Encoding::V2Zstd)
    }

    /// The uncompressed encoding of the same wire.
    pub fn plain(self) -> Encoding {
        match self {
            Encoding::V1Json | Encoding::V1Zstd => Encoding::V1Json,
            Encoding::V2Json | Encoding::V2Zstd => Encoding::V2Json,
        }
    }

    /// The encoding of `wire` (v2 or not), compressed or not.
    pub fn of(v2: bool, compressed: bool) -> Encoding {
        match (v2, compressed) {
            (false, false) => Encoding::V1Json,
            (false, true) => Encoding::V1Zstd,
            (true, false) => Encoding::V2Json,
            (true, true) => Encoding::V2Zstd,
        }
    }

    /// The frame opcode.
    pub fn opcode(self) -> Opcode {
        if self.compressed() {
            Opcode::Binary
        } else {
            Opcode::Text
        }
    }

    /// Base log file name in the data directory.
    pub fn log_name(self) -> &'static str {
        match self {
            Encoding::V1Json => "plain.log",
            Encoding::V1Zstd => "zstd.log",
            Encoding::V2Json => "v2.log",
            Encoding::V2Zstd => "v2zstd.log",
        }
    }

    /// Short stable name (logs, labels).
    pub fn label(self) -> &'static str {
        match self {
            Encoding::V1Json => "plain",
            Encoding::V1Zstd => "zstd",
            Encoding::V2Json => "v2",
            Encoding::V2Zstd => "v2zstd",
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}
