//! Per-event zstd compression with the official Jetstream dictionaries: the v1 one for
//! `/subscribe?compress=true`, the v2 one for `subscribeEvents?zstdDictionary=<id>`.
//!
//! A client that asks for `compress=true` (or sends `Socket-Encoding: zstd`) receives every event
//! as its own zstd frame in a binary WebSocket message, compressed with a dictionary that real
//! clients ship. Each frame is standalone: no state carries over between events, so the relay
//! compresses an event once and sends the same bytes to every compressed client.
//!
//! Frame layout, and how it compares with the official server (Go, klauspost/compress
//! `EncodeAll` with `WithEncoderDict`, default level, 128 KiB window):
//! - dictionary ID: written, like the official frames. It is not optional: klauspost's decoder
//!   (used by Go clients) picks the dictionary by the frame's ID, so a frame without one would
//!   be decoded without the dictionary and fail.
//! - content size: written, like the official frames. Some decoders (python-zstandard's
//!   one-shot `decompress`, for one) refuse frames that do not declare it.
//! - checksum: omitted, whereas klauspost writes one by default. It is optional in RFC 8878 and
//!   every decoder accepts frames without it; the transport (TCP, TLS) already protects the
//!   bytes, and the 4 bytes are ~1.6% of a mean compressed event.
//! - level 3 (libzstd's default), the level klauspost's default approximates, with smaller
//!   match-finder tables ([`MATCH_TABLE_LOG`]) that stay in cache between events. Bytes differ
//!   from the official server's (different encoder), which no client can observe: the
//!   decoder needs only the dictionary, and the window stays within level 3's.

use std::sync::OnceLock;

use zstd::dict::DecoderDictionary;

/// The dictionary Jetstream v1 uses for `compress=true` (112,640 bytes, dictionary ID
/// 1612007021); clients decode with the same file.
pub static DICTIONARY: &[u8] = include_bytes!("../assets/zstd_dictionary");

/// The dictionary of the v2 stream (`subscribeEvents?zstdDictionary=20260811`, served by
/// `getZstdDictionary`; 65,536 bytes, trained on v2 message frames).
pub static DICTIONARY_V2: &[u8] = include_bytes!("../assets/zstd_dictionary_v2");

/// Which wire's dictionary a compressor uses. The two are not interchangeable: each frame names
/// its dictionary by ID and a client holds only the one its wire defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dictionary {
    /// `/subscribe` (`compress=true` / `Socket-Encoding: zstd`), ID 1612007021.
    V1,
    /// `subscribeEvents` (`zstdDictionary=20260811`), ID 20260811.
    V2,
}

impl Dictionary {
    /// The raw dictionary file (what clients load; what `getZstdDictionary` serves for V2).
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Dictionary::V1 => DICTIONARY,
            Dictionary::V2 => DICTIONARY_V2,
        }
    }

    /// The zstd dictionary ID in the file's header (and in every frame made with it).
    pub fn id(self) -> u32 {
        match self {
            Dictionary::V1 => 1_612_007_021,
            Dictionary::V2 => 20_260_811,
        }
    }
}

/// Compression level of the official server (klauspost's default ≈ zstd level 3).
pub const LEVEL: i32 = 3;

/// log2 of the match-finder tables the encoder builds over the dictionary (hash and chain).
/// Why 12 and not level 3's own 17/16: the writer compresses one ~0.5 KiB event at a time
/// between sleeps, while the fan-out on the same core evicts its caches, so level 3's ~768 KiB
/// of tables are mostly cache misses (measured on the sample events with 1–2 MiB of other
/// memory touched between events: 15 µs per event at 17/16, 9–11 µs at 12/12). On events this
/// small the ratio does not suffer: 44.1 % of the plain bytes at 12/12, 44.4 % at 17/16.
pub const MATCH_TABLE_LOG: u32 = 12;

/// Largest frame [`EventCompressor::compress`] can produce for `plain_len` input bytes (zstd's
/// worst-case bound, for incompressible input).
pub fn compressed_len_bound(plain_len: usize) -> usize {
    zstd::zstd_safe::compress_bound(plain_len)
}

/// Errors from the zstd library (bad input frame, output over the caller's limit, allocation).
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// Setting up the context or dictionary failed.
    #[error("zstd setup failed: {0}")]
    Setup(#[source] std::io::Error),
    /// Compressing one event failed.
    #[error("zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
    /// The frame is not valid zstd, needs another dictionary, or exceeds the size limit.
    #[error("zstd decompression failed: {0}")]
    Decompress(#[source] std::io::Error),
}

/// The digested decoder dictionary, built once per process: digesting costs ~1 ms and the
/// result is immutable and shareable between threads.
fn decoder_dictionary(dictionary: Dictionary) -> &'static DecoderDictionary<'static> {
    static V1: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    static V2: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    let cell = match dictionary {
        Dictionary::V1 => &V1,
        Dictionary::V2 => &V2,
    };
    cell.get_or_init(|| DecoderDictionary::new(dictionary.bytes()))
}

/// Compresses events one by one into standalone frames. One per thread: it owns a zstd
/// context with its own digest of the dictionary (the writer is the only steady user).
pub struct EventCompressor {
    /// zstd context with the dictionary loaded, reused for every event.
    inner: zstd::bulk::Compressor<'static>,
}

impl EventCompressor {
    /// Creates a compressor with the v1 dictionary and [`MATCH_TABLE_LOG`]-sized tables.
    pub fn new() -> Result<Self, CompressError> {
        Self::with_dictionary(Dictionary::V1)
    }

    /// Creates a compressor with `dictionary` and [`MATCH_TABLE_LOG`]-sized tables.
    pub fn with_dictionary(dictionary: Dictionary) -> Result<Self, CompressError> {
        let mut inner = zstd::bulk::Compressor::new(LEVEL).map_err(CompressError::Setup)?;
        for param in [
            zstd::zstd_safe::CParameter::HashLog(MATCH_TABLE_LOG),
            zstd::zstd_safe::CParameter::ChainLog(MATCH_TABLE_LOG),
            zstd::zstd_safe::CParameter::ContentSizeFlag(true),
            zstd::zstd_safe::CParameter::DictIdFlag(true),
            zstd::zstd_safe::CParameter::ChecksumFlag(false),
        ] {
            inner.set_parameter(param).map_err(CompressError::Setup)?;
        }
        // Loaded after the parameters: zstd digests the dictionary with them on first use.
        inner
            .set_dictionary(LEVEL, dictionary.bytes())
            .map_err(CompressError::Setup)?;
        Ok(Self { inner })
    }

    /// Appends one standalone zstd frame holding `json` to `out`.
    pub fn compress(&mut self, json: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
        let start = out.len();
        // zstd writes into an initialised slice; the bound guarantees it is large enough.
        out.resize(start + compressed_len_bound(json.len()), 0);
        let written = self
            .inner
            .compress_to_buffer(json, &mut out[start..])
            .map_err(CompressError::Compress);
        match written {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// Decompresses frames made with the dictionary (tests, tools, and the swarm client).
pub struct EventDecompressor {
    /// zstd context with the prepared dictionary referenced, reused for every frame.
    inner: zstd::bulk::Decompressor<'static>,
}

impl EventDecompressor {
    /// Creates a decompressor with the shared prepared v1 dictionary.
    pub fn new() -> Result<Self, CompressError> {
        Self::with_dictionary(Dictionary::V1)
    }

    /// Creates a decompressor with the shared prepared `dictionary`.
    pub fn with_dictionary(dictionary: Dictionary) -> Result<Self, CompressError> {
        zstd::bulk::Decompressor::with_prepared_dictionary(decoder_dictionary(dictionary))
            .map(|inner| Self { inner })
            .map_err(CompressError::Setup)
    }

    /// Decompresses one frame; fails if the output would exceed `max_len` bytes.
    pub fn decompress(&mut self, frame: &[u8], max_len: usize) -> Result<Vec<u8>, CompressError> {
        self.inner
            .decompress(frame, max_len)
            .map_err(CompressError::Decompress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../assets/jetstream-v1-sample.jsonl");
    const DICT_ID: u32 = 1_612_007_021;

    fn events() -> Vec<&'static [u8]> {
        SAMPLE
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::as_bytes)
            .collect()
    }

    /// Decodes with a context that shares nothing with the relay's: a fresh stream decoder
    /// loaded with the raw dictionary file, as a client would.
    fn independent_decode(frame: &[u8]) -> Vec<u8> {
        let mut decoder = zstd::stream::read::Decoder::with_dictionary(frame, DICTIONARY)
            .expect("decoder with dictionary");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut decoder, &mut out).expect("frame decodes");
        out
    }

    #[test]
    fn every_sample_event_round_trips_through_an_independent_decoder() {
        let mut c = EventCompressor::new().unwrap();
        let mut d = EventDecompressor::new().unwrap();
        let (mut plain, mut packed) = (0usize, 0usize);
        for event in events() {
            let mut frame = Vec::new();
            c.compress(event, &mut frame).unwrap();
            assert_eq!(independent_decode(&frame), event);
            assert_eq!(d.decompress(&frame, event.len()).unwrap(), event);
            plain += event.len();
            packed += frame.len();
        }
        let ratio = packed as f64 / plain as f64;
        println!(
            "zstd+dictionary: {} events, mean {} -> {} bytes, ratio {:.1}%",
            events().len(),
            plain / events().len(),
            packed / events().len(),
            ratio * 100.0
        );
        assert!(ratio <= 0.45, "ratio {ratio:.3} above 45%");
    }

    #[test]
    fn frames_declare_dictionary_and_content_size_but_no_checksum() {
        let mut c = EventCompressor::new().unwrap();
        let event = events()[0];
        let mut frame = Vec::new();
        c.compress(event, &mut frame).unwrap();
        assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_frame(&frame).map(u32::from),
            Some(DICT_ID)
        );
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).ok(),
            Some(Some(event.len() as u64))
        );
        let descriptor = frame[4];
        assert_eq!(descriptor & 0b100, 0, "content checksum flag must be clear");
    }

    #[test]
    fn compress_appends_one_frame_per_call() {
        let mut c = EventCompressor::new().unwrap();
        let evs = events();
        let mut out = b"prefix".to_vec();
        let mut first = Vec::new();
        c.compress(evs[0], &mut first).unwrap();
        c.compress(evs[0], &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(
            &out[6..],
            &first[..],
            "frames are deterministic and standalone"
        );
        c.compress(evs[1], &mut out).unwrap();
        // Two concatenated frames decode to the two events back to back.
        let both = independent_decode(&out[6..]);
        assert_eq!(both, [evs[0], evs[1]].concat());
    }

    #[test]
    fn empty_and_incompressible_inputs_respect_the_bound() {
        let mut c = EventCompressor::new().unwrap();
        let mut out = Vec::new();
        c.compress(b"", &mut out).unwrap();
        assert_eq!(independent_decode(&out), b"");
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        out.clear();
        c.compress(&noise, &mut out).unwrap();
        assert!(out.len() <= compressed_len_bound(noise.len()));
        assert_eq!(independent_decode(&out), noise);
    }

    #[test]
    fn decompress_enforces_the_limit_and_rejects_garbage() {
        let mut c = EventCompressor::new().unwrap();
        let mut d = EventDecompressor::new().unwrap();
        let event = events()[0];
        let mut frame = Vec::new();
        c.compress(event, &mut frame).unwrap();
        assert!(d.decompress(&frame, event.len() - 1).is_err());
        assert!(d.decompress(b"not zstd at all", 1 << 20).is_err());
        let truncated = &frame[..frame.len() / 2];
        assert!(d.decompress(truncated, 1 << 20).is_err());
        // The context is still usable after errors.
        assert_eq!(d.decompress(&frame, event.len()).unwrap(), event);
    }

    /// The v2 dictionary: every sample event's v2 message frame compresses to one standalone
    /// frame naming dictionary 20260811 that a fresh decoder holding only the v2 file turns back
    /// into exactly the text frame; the v1 dictionary cannot decode it.
    #[test]
    fn v2_frames_round_trip_with_the_v2_dictionary_only() {
        assert_eq!(
            &DICTIONARY_V2[..4],
            &[0x37, 0xa4, 0x30, 0xec],
            "zstd dictionary magic"
        );
        assert_eq!(
            u32::from_le_bytes([
                DICTIONARY_V2[4],
                DICTIONARY_V2[5],
                DICTIONARY_V2[6],
                DICTIONARY_V2[7]
            ]),
            Dictionary::V2.id()
        );
        assert_eq!(
            u32::from_le_bytes([DICTIONARY[4], DICTIONARY[5], DICTIONARY[6], DICTIONARY[7]]),
            Dictionary::V1.id()
        );
        let mut c = EventCompressor::with_dictionary(Dictionary::V2).unwrap();
        let mut d = EventDecompressor::with_dictionary(Dictionary::V2).unwrap();
        let mut v1_decoder = EventDecompressor::new().unwrap();
        let (mut plain, mut packed) = (0usize, 0usize);
        for (i, event) in events().into_iter().enumerate() {
            let mut text = Vec::new();
            crate::wire::v1_to_v2(event, 1_000 + i as u64, 1_783_175_889_000_000, &mut text)
                .unwrap();
            let mut frame = Vec::new();
            c.compress(&text, &mut frame).unwrap();
            assert_eq!(
                zstd::zstd_safe::get_dict_id_from_frame(&frame).map(u32::from),
                Some(Dictionary::V2.id())
            );
            let mut fresh = zstd::stream::read::Decoder::with_dictionary(&frame[..], DICTIONARY_V2)
                .expect("decoder");
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut fresh, &mut out).expect("frame decodes");
            assert_eq!(out, text);
            assert_eq!(d.decompress(&frame, text.len()).unwrap(), text);
            assert!(v1_decoder.decompress(&frame, 1 << 20).is_err());
            plain += text.len();
            packed += frame.len();
        }
        let ratio = packed as f64 / plain as f64;
        println!("v2 zstd+dictionary: ratio {:.1}%", ratio * 100.0);
        // Bluesky reports ~3x on the v2 wire; the sample must come out well under half.
        assert!(ratio <= 0.45, "ratio {ratio:.3}");
    }

    #[test]
    fn without_the_dictionary_frames_do_not_decode() {
        let mut c = EventCompressor::new().unwrap();
        let mut frame = Vec::new();
        c.compress(events()[0], &mut frame).unwrap();
        assert!(zstd::bulk::decompress(&frame, 1 << 20).is_err());
    }
}
