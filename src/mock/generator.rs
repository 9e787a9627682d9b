//! Deterministic Jetstream event generator.
//!
//! Every event the mock emits, and every event the swarm expects, comes from here. Event number
//! `seq` is the real sample event `seq % 152` (assets/jetstream-v1-sample.jsonl) with four kinds of
//! substitution, and byte-for-byte identical to the sample otherwise (key order, escaping):
//!
//! * the top-level `did` → a pseudo-random DID from a population of `dids`, chosen by `(seed, seq)`;
//! * `time_us` → the caller's emission time;
//! * commits: `commit.rev` and `commit.rkey` → atproto TIDs whose timestamp part is
//!   `TID_BASE_US + seq`, so every event is distinct and `seq` can be read back from the bytes;
//! * identity/account events: their `seq` field → `IDENTITY_SEQ_BASE + seq`.
//!
//! Other occurrences of the sample's DIDs (inside records, or the `did` inside an identity/account
//! object) are kept as they are. Because an event is a pure function of `(seed, dids, seq,
//! time_us)`, a verifier that learns `seq` and `time_us` from a received event can regenerate the
//! exact bytes it must have received. Each template is pre-split at its substitution points, so
//! producing an event is a handful of slice copies.

use std::sync::OnceLock;

/// The real events the generator cycles through (one JSON object per line).
const SAMPLE: &str = include_str!("../../assets/jetstream-v1-sample.jsonl");

/// Number of templates in [`SAMPLE`]; event `seq` uses template `seq % TEMPLATE_COUNT`.
pub const TEMPLATE_COUNT: usize = 152;

/// Timestamp (µs) that seq 0's TIDs encode: the sample's era, so TIDs look like real ones.
const TID_BASE_US: u64 = 1_783_175_888_000_000;

/// TIDs carry a 53-bit microsecond timestamp.
const TID_TIMESTAMP_MASK: u64 = (1 << 53) - 1;

/// Largest seq whose TIDs round-trip (larger seqs wrap around the 53-bit timestamp).
pub const MAX_SEQ: u64 = TID_TIMESTAMP_MASK - TID_BASE_US;

/// TID clock identifier used for `commit.rev` (distinct from the rkey's so the two strings differ).
const REV_CLOCK_ID: u64 = 0x1d;

/// TID clock identifier used for `commit.rkey`.
const RKEY_CLOCK_ID: u64 = 0x2a;

/// Identity/account `seq` values start here: above any seq in the sample, and always 12 digits
/// for realistic mock runs.
const IDENTITY_SEQ_BASE: u64 = 100_000_000_000;

/// The atproto "base32-sortable" alphabet used by TIDs.
const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// RFC 4648 lower-case base32, the alphabet of did:plc identifiers.
const PLC_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Length of a TID string.
pub const TID_LEN: usize = 13;

/// Length of a generated DID (`did:plc:` + 24 base32 characters), as real did:plc DIDs.
pub const DID_LEN: usize = 32;

/// Longest prefix `seq_of` scans before giving up, so corrupted input costs bounded time.
const SEQ_SCAN_LIMIT: usize = 4096;

/// Default DID population (the mock's `--dids` default).
pub const DEFAULT_DIDS: u64 = 100_000;

/// What goes between two literal pieces of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The top-level `did` string value (without quotes).
    Did,
    /// The `time_us` number.
    TimeUs,
    /// `commit.rev` TID (without quotes).
    Rev,
    /// `commit.rkey` (without quotes).
    Rkey,
    /// `identity.seq` / `account.seq` number.
    IdentitySeq,
}

/// A sample event pre-split at its substitution points.
#[derive(Debug)]
struct Template {
    /// `commit`, `identity` or `account` (filters need it without parsing).
    kind: &'static str,
    /// `commit.collection` for commits (the wantedCollections filter needs it).
    collection: Option<&'static str>,
    /// Literal pieces; `pieces[i]` is followed by `slots[i]`, and the last piece by nothing.
    pieces: Vec<&'static str>,
    /// Substitution points between the pieces (`pieces.len() == slots.len() + 1`).
    slots: Vec<Slot>,
    /// Sum of the pieces' lengths, for `event_len` without generating.
    literal_len: usize,
}

/// Parses the bundled sample once.
fn templates() -> &'static [Template] {
    static TEMPLATES: OnceLock<Vec<Template>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let list: Vec<Template> = SAMPLE
            .lines()
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, line)| {
                split_template(line)
                    .unwrap_or_else(|why| panic!("bundled sample line {i} unusable: {why}"))
            })
            .collect();
        assert_eq!(list.len(), TEMPLATE_COUNT, "bundled sample size changed");
        list
    })
}

/// Finds `needle` in `hay` at or after `from`, returning its start.
fn find_from(hay: &str, needle: &str, from: usize) -> Option<usize> {
    hay.get(from..)?.find(needle).map(|p| p + from)
}

/// Splits one sample line at its substitution points. Only called on the bundled sample.
fn split_template(line: &'static str) -> Result<Template, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let did = v["did"].as_str().ok_or("no did")?;
    let time_us = v["time_us"].as_i64().ok_or("no time_us")?;
    let kind_owned = v["kind"].as_str().ok_or("no kind")?;

    // (start, end, slot) spans in the raw line, in order.
    let mut spans: Vec<(usize, usize, Slot)> = Vec::new();
    let did_prefix = "{\"did\":\"";
    if !line.starts_with(did_prefix) || !line[did_prefix.len()..].starts_with(did) {
        return Err("does not start with the did".into());
    }
    let did_start = did_prefix.len();
    let did_end = did_start + did.len();
    spans.push((did_start, did_end, Slot::Did));
    let time_text = format!("\",\"time_us\":{time_us},\"kind\":\"{kind_owned}\"");
    if !line[did_end..].starts_with(&time_text) {
        return Err("time_us/kind not right after did".into());
    }
    let time_start = did_end + "\",\"time_us\":".len();
    let time_end = time_start + time_us.to_string().len();
    spans.push((time_start, time_end, Slot::TimeUs));
    let after_kind = did_end + time_text.len();

    let kind_start = time_end + ",\"kind\":\"".len();
    let kind: &'static str = &line[kind_start..kind_start + kind_owned.len()];
    let mut collection = None;
    match kind {
        "commit" => {
            let commit = &v["commit"];
            let rev = commit["rev"].as_str().ok_or("no rev")?;
            let rkey = commit["rkey"].as_str().ok_or("no rkey")?;
            let col = commit["collection"].as_str().ok_or("no collection")?;
            let rev_text = format!(",\"commit\":{{\"rev\":\"{rev}\"");
            if !line[after_kind..].starts_with(&rev_text) {
                return Err("commit does not start with rev".into());
            }
            let rev_start = after_kind + ",\"commit\":{\"rev\":\"".len();
            spans.push((rev_start, rev_start + rev.len(), Slot::Rev));
            let col_text = format!("\"collection\":\"{col}\",\"rkey\":\"{rkey}\"");
            let col_pos = find_from(line, &col_text, rev_start).ok_or("collection/rkey")?;
            let col_start = col_pos + "\"collection\":\"".len();
            collection = Some(&line[col_start..col_start + col.len()]);
            let rkey_start = col_pos + col_text.len() - 1 - rkey.len();
            spans.push((rkey_start, rkey_start + rkey.len(), Slot::Rkey));
        }
        "identity" | "account" => {
            let seq = v[kind]["seq"].as_u64().ok_or("no seq")?;
            let seq_text = format!("\"seq\":{seq}");
            let pos = find_from(line, &seq_text, after_kind).ok_or("seq")?;
            if find_from(line, &seq_text, pos + 1).is_some() {
                return Err("seq appears twice".into());
            }
            let start = pos + "\"seq\":".len();
            spans.push((start, start + seq.to_string().len(), Slot::IdentitySeq));
        }
        other => return Err(format!("unknown kind {other}")),
    }

    let mut pieces = Vec::with_capacity(spans.len() + 1);
    let mut slots = Vec::with_capacity(spans.len());
    let mut at = 0;
    for (start, end, slot) in spans {
        pieces.push(&line[at..start]);
        slots.push(slot);
        at = end;
    }
    pieces.push(&line[at..]);
    let literal_len = pieces.iter().map(|p| p.len()).sum();
    Ok(Template {
        kind,
        collection,
        pieces,
        slots,
        literal_len,
    })
}

/// SplitMix64's finalizer: a bijection on u64 with good avalanche (deterministic spread).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes `v` as a 13-character TID (base32-sortable, most significant first).
fn push_tid(v: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; TID_LEN];
    for (i, b) in buf.iter_mut().enumerate() {
        let shift = 5 * (TID_LEN - 1 - i);
        *b = TID_ALPHABET[((v >> shift) & 31) as usize];
    }
    out.extend_from_slice(&buf);
}

/// Decodes a 13-character TID; `None` if any character is outside the alphabet or the top bit
/// (which a TID must leave clear) is set.
fn decode_tid(s: &[u8]) -> Option<u64> {
    if s.len() != TID_LEN {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &c) in s.iter().enumerate() {
        let d = match c {
            b'2'..=b'7' => c - b'2',
            b'a'..=b'z' => c - b'a' + 6,
            _ => return None,
        } as u64;
        if i == 0 && d >= 16 {
            return None;
        }
        v = (v << 5) | d;
    }
    Some(v)
}

/// The TID encoding `seq` with the given clock id.
fn tid_value(seq: u64, clock_id: u64) -> u64 {
    ((TID_BASE_US.wrapping_add(seq) & TID_TIMESTAMP_MASK) << 10) | clock_id
}

/// The identity/account `seq` field value for event `seq` (defined for `seq <= MAX_SEQ`).
fn identity_seq(seq: u64) -> i64 {
    IDENTITY_SEQ_BASE.saturating_add(seq.min(MAX_SEQ)) as i64
}

/// Appends the decimal form of `v`.
pub(crate) fn push_i64(v: i64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = v.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

/// Number of bytes `push_i64(v)` writes.
pub(crate) fn i64_len(v: i64) -> usize {
    let digits = v.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 1;
    digits + usize::from(v < 0)
}

/// Generates the deterministic event stream for one `(seed, dids)` pair.
#[derive(Debug, Clone)]
pub struct Generator {
    /// Seed-derived key that picks which DID each seq gets.
    pick_key: u64,
    /// Seed-derived key that turns a DID index into its identifier characters.
    name_key: u64,
    /// Seed-derived tail of every DID (the head alone already makes DIDs distinct).
    tail: u64,
    /// DID population size (≥ 1): events spread over this many distinct DIDs.
    dids: u64,
    /// The parsed sample (shared, static).
    templates: &'static [Template],
}

impl Generator {
    /// A generator for `seed` spreading events over `dids` distinct DIDs (0 is treated as 1).
    pub fn new(seed: u64, dids: u64) -> Self {
        Generator {
            pick_key: mix64(seed ^ 0x5eed_0001),
            name_key: mix64(seed ^ 0x5eed_0002),
            tail: mix64(seed ^ 0x5eed_0003),
            dids: dids.max(1),
            templates: templates(),
        }
    }

    /// Template used by event `seq`.
    pub fn template_index(seq: u64) -> usize {
        (seq % TEMPLATE_COUNT as u64) as usize
    }

    /// `(kind, collection)` of template `idx` (`collection` is `None` for identity/account).
    /// Panics if `idx >= TEMPLATE_COUNT`.
    pub fn template_kind_and_collection(idx: usize) -> (&'static str, Option<&'static str>) {
        let t = &templates()[idx];
        (t.kind, t.collection)
    }

    /// The DID index (0..dids) event `seq` is attributed to.
    pub fn did_index(&self, seq: u64) -> u64 {
        mix64(seq.wrapping_add(self.pick_key)) % self.dids
    }

    /// The DID of event `seq`.
    pub fn did_for(&self, seq: u64) -> String {
        let mut out = Vec::with_capacity(DID_LEN);
        self.push_did(self.did_index(seq), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The DID with index `idx` (0..dids), e.g. to build a wantedDids list.
    pub fn did_by_index(&self, idx: u64) -> String {
        let mut out = Vec::with_capacity(DID_LEN);
        self.push_did(idx, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the DID for index `idx`: 13 characters from a bijection of the index (so distinct
    /// indices give distinct DIDs) and 11 from the seed.
    fn push_did(&self, idx: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"did:plc:");
        let head = mix64(idx ^ self.name_key);
        for i in 0..13 {
            out.push(PLC_ALPHABET[((head >> (5 * (12 - i))) & 31) as usize]);
        }
        for i in 0..11 {
            out.push(PLC_ALPHABET[((self.tail >> (5 * (10 - i))) & 31) as usize]);
        }
    }

    /// Appends event `seq` with `time_us` to `out`.
    pub fn event(&self, seq: u64, time_us: i64, out: &mut Vec<u8>) {
        self.write(seq, Some(time_us), out);
    }

    /// Appends event `seq` with its `time_us` digits left out, returning the offset (relative to
    /// the start of what was appended) where they belong. Lets a verifier cache one rendering per
    /// seq and compare events with any `time_us` against it.
    pub fn event_without_time(&self, seq: u64, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        self.write(seq, None, out)
            .map(|at| at - start)
            .unwrap_or_default()
    }

    /// Writes the event; returns the absolute offset of the time slot.
    fn write(&self, seq: u64, time_us: Option<i64>, out: &mut Vec<u8>) -> Option<usize> {
        let t = &self.templates[Self::template_index(seq)];
        out.reserve(t.literal_len + 64);
        let mut time_at = None;
        for (piece, slot) in t.pieces.iter().zip(t.slots.iter()) {
            out.extend_from_slice(piece.as_bytes());
            match slot {
                Slot::Did => self.push_did(self.did_index(seq), out),
                Slot::TimeUs => {
                    time_at = Some(out.len());
                    if let Some(v) = time_us {
                        push_i64(v, out);
                    }
                }
                Slot::Rev => push_tid(tid_value(seq, REV_CLOCK_ID), out),
                Slot::Rkey => push_tid(tid_value(seq, RKEY_CLOCK_ID), out),
                Slot::IdentitySeq => push_i64(identity_seq(seq), out),
            }
        }
        if let Some(last) = t.pieces.last() {
            out.extend_from_slice(last.as_bytes());
        }
        time_at
    }

    /// Length in bytes of event `seq` with `time_us`, without generating it.
    pub fn event_len(&self, seq: u64, time_us: i64) -> usize {
        let t = &self.templates[Self::template_index(seq)];
        let slots: usize = t
            .slots
            .iter()
            .map(|s| match s {
                Slot::Did => DID_LEN,
                Slot::TimeUs => i64_len(time_us),
                Slot::Rev | Slot::Rkey => TID_LEN,
                Slot::IdentitySeq => i64_len(identity_seq(seq)),
            })
            .sum();
        t.literal_len + slots
    }

    /// Reads the seq back from a generated event (`None` if `json` is not shaped like one).
    /// Only looks at the first few fields; a verifier must still compare the whole event.
    pub fn seq_of(json: &[u8]) -> Option<u64> {
        let (after_time, _) = scan_prefix(json)?;
        let rest = json.get(after_time..)?;
        const COMMIT: &[u8] = b",\"kind\":\"commit\",\"commit\":{\"rev\":\"";
        if let Some(tid) = rest.strip_prefix(COMMIT) {
            let v = decode_tid(tid.get(..TID_LEN)?)?;
            if v & 0x3ff != REV_CLOCK_ID {
                return None;
            }
            return (v >> 10).checked_sub(TID_BASE_US);
        }
        let body = if let Some(b) = rest.strip_prefix(b",\"kind\":\"identity\",\"identity\":{") {
            b
        } else {
            rest.strip_prefix(b",\"kind\":\"account\",\"account\":{")?
        };
        let body = &body[..body.len().min(SEQ_SCAN_LIMIT)];
        let key = b"\"seq\":";
        let pos = body.windows(key.len()).position(|w| w == key)?;
        let digits = &body[pos + key.len()..];
        let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
        let v: u64 = std::str::from_utf8(&digits[..n]).ok()?.parse().ok()?;
        v.checked_sub(IDENTITY_SEQ_BASE)
    }

    /// Reads `time_us` from an event shaped like a generated (or real Jetstream) one:
    /// `{"did":"…","time_us":N,…`.
    pub fn time_us_of(json: &[u8]) -> Option<i64> {
        scan_prefix(json).map(|(_, t)| t)
    }
}

/// Parses `{"did":"<did>","time_us":<int>` and returns (offset just past the number, value).
fn scan_prefix(json: &[u8]) -> Option<(usize, i64)> {
    let rest = json.strip_prefix(b"{\"did\":\"")?;
    let limit = rest.len().min(SEQ_SCAN_LIMIT);
    let quote = rest[..limit].iter().position(|&c| c == b'"')?;
    let after_did = 8 + quote;
    let rest = json.get(after_did..)?.strip_prefix(b"\",\"time_us\":")?;
    let num_start = after_did + 12;
    let (value, len) = parse_canonical_i64(rest)?;
    Some((num_start + len, value))
}

/// Parses a JSON integer at the start of `s` in the exact form `push_i64` writes (no leading
/// zeros, no `+`), returning (value, length). Non-canonical forms return `None`, so comparing a
/// re-rendering succeeds exactly when the text was canonical.
pub(crate) fn parse_canonical_i64(s: &[u8]) -> Option<(i64, usize)> {
    let neg = s.first() == Some(&b'-');
    let digits = &s[usize::from(neg)..];
    let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 19 || (n > 1 && digits[0] == b'0') {
        return None;
    }
    let mut v: i64 = 0;
    for &c in &digits[..n] {
        v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
    }
    if neg {
        if v == 0 {
            return None;
        }
        v = -v;
    }
    Some((v, n + usize::from(neg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn sample_lines() -> Vec<&'static str> {
        SAMPLE.lines().filter(|l| !l.is_empty()).collect()
    }

    /// Sets the substituted fields of a parsed event to fixed markers, so two events that differ
    /// only there compare equal.
    fn blank_substitutions(v: &mut Value) {
        v["did"] = Value::from("X");
        v["time_us"] = Value::from(0);
        let kind = v["kind"].as_str().unwrap().to_string();
        if kind == "commit" {
            v["commit"]["rev"] = Value::from("X");
            v["commit"]["rkey"] = Value::from("X");
        } else {
            v[kind.as_str()]["seq"] = Value::from(0);
        }
    }

    #[test]
    fn all_templates_parse_and_differ_only_in_substituted_fields() {
        let g = Generator::new(7, 1000);
        let lines = sample_lines();
        assert_eq!(lines.len(), TEMPLATE_COUNT);
        for (i, line) in lines.iter().enumerate() {
            let seq = 152 * 31 + i as u64;
            let mut out = Vec::new();
            g.event(seq, 1_790_000_000_123_456, &mut out);
            let mut got: Value = serde_json::from_slice(&out).expect("valid JSON");
            let mut want: Value = serde_json::from_str(line).unwrap();
            assert_eq!(got["time_us"], 1_790_000_000_123_456i64);
            assert_eq!(got["did"], g.did_for(seq).as_str());
            assert_ne!(got["did"], want["did"]);
            if got["kind"] == "commit" {
                assert_ne!(got["commit"]["rev"], got["commit"]["rkey"]);
                assert_ne!(got["commit"]["rkey"], want["commit"]["rkey"]);
            }
            blank_substitutions(&mut got);
            blank_substitutions(&mut want);
            assert_eq!(got, want, "template {i}");
            // Byte-level: identical length modulo the substituted fields' length changes, and
            // the tail after the last substitution is verbatim.
            let tail = templates()[i].pieces.last().unwrap();
            assert!(out.ends_with(tail.as_bytes()));
            assert_eq!(out.len(), g.event_len(seq, 1_790_000_000_123_456));
        }
    }

    #[test]
    fn template_bytes_are_reproduced_when_substitutions_are_the_originals() {
        // Splicing the template's own values back into the pieces gives the exact line.
        for (i, line) in sample_lines().iter().enumerate() {
            let t = &templates()[i];
            let v: Value = serde_json::from_str(line).unwrap();
            let mut out = String::new();
            for (piece, slot) in t.pieces.iter().zip(&t.slots) {
                out.push_str(piece);
                let kind = v["kind"].as_str().unwrap();
                match slot {
                    Slot::Did => out.push_str(v["did"].as_str().unwrap()),
                    Slot::TimeUs => out.push_str(&v["time_us"].to_string()),
                    Slot::Rev => out.push_str(v["commit"]["rev"].as_str().unwrap()),
                    Slot::Rkey => out.push_str(v["commit"]["rkey"].as_str().unwrap()),
                    Slot::IdentitySeq => out.push_str(&v[kind]["seq"].to_string()),
                }
            }
            out.push_str(t.pieces.last().unwrap());
            assert_eq!(&out, line, "template {i}");
        }
    }

    #[test]
    fn seq_round_trips() {
        let g = Generator::new(1, DEFAULT_DIDS);
        let mut seqs: Vec<u64> = (0..5000).collect();
        seqs.extend([152 * 1000 + 150, 152 * 1000 + 151, 1 << 40, MAX_SEQ]);
        let mut out = Vec::new();
        for seq in seqs {
            out.clear();
            g.event(seq, 1_783_175_888_000_000 + seq as i64, &mut out);
            assert_eq!(Generator::seq_of(&out), Some(seq), "seq {seq}");
            assert_eq!(
                Generator::time_us_of(&out),
                Some(1_783_175_888_000_000 + seq as i64)
            );
        }
    }

    #[test]
    fn identity_and_account_seq_round_trip() {
        let g = Generator::new(3, 10);
        let idx: Vec<usize> = (0..TEMPLATE_COUNT)
            .filter(|&i| Generator::template_kind_and_collection(i).0 != "commit")
            .collect();
        assert_eq!(
            idx.len(),
            2,
            "the sample has one identity and one account event"
        );
        for i in idx {
            let seq = 152 * 9 + i as u64;
            let mut out = Vec::new();
            g.event(seq, 5, &mut out);
            let v: Value = serde_json::from_slice(&out).unwrap();
            let kind = v["kind"].as_str().unwrap();
            assert_eq!(v[kind]["seq"].as_u64(), Some(IDENTITY_SEQ_BASE + seq));
            assert_eq!(Generator::seq_of(&out), Some(seq));
        }
    }

    #[test]
    fn seq_of_rejects_foreign_and_corrupted_input() {
        let lines = sample_lines();
        // Real sample events use real TIDs whose clock ids are not ours.
        let decoded = lines
            .iter()
            .filter(|l| Generator::seq_of(l.as_bytes()).is_some())
            .count();
        assert!(
            decoded < 10,
            "{decoded} real events decoded as generated ones"
        );
        assert_eq!(Generator::seq_of(b""), None);
        assert_eq!(Generator::seq_of(b"{\"did\":\"x\",\"time_us\":01,"), None);
        assert_eq!(Generator::seq_of(b"not json at all"), None);
        let g = Generator::new(1, 5);
        let mut out = Vec::new();
        g.event(77, 1, &mut out);
        let rev_at = out.windows(7).position(|w| w == b"\"rev\":\"").unwrap() + 7;
        out[rev_at] = b'!';
        assert_eq!(Generator::seq_of(&out), None);
    }

    #[test]
    fn distinct_seqs_give_distinct_did_rkey_pairs_and_dids_spread() {
        let g = Generator::new(42, 100);
        let mut pairs = std::collections::HashSet::new();
        let mut dids = std::collections::HashSet::new();
        let mut out = Vec::new();
        for seq in 0..20_000u64 {
            out.clear();
            g.event(seq, 0, &mut out);
            let v: Value = serde_json::from_slice(&out).unwrap();
            let did = v["did"].as_str().unwrap().to_string();
            let key = match v["kind"].as_str().unwrap() {
                "commit" => v["commit"]["rkey"].as_str().unwrap().to_string(),
                k => v[k]["seq"].to_string(),
            };
            assert!(pairs.insert((did.clone(), key)), "duplicate at {seq}");
            assert_eq!(did.len(), DID_LEN);
            dids.insert(did);
        }
        assert_eq!(dids.len(), 100, "every DID of the population is used");
        // Distinct indices give distinct DIDs, even for a large population.
        let big = Generator::new(42, 1 << 40);
        let s: std::collections::HashSet<String> =
            (0..10_000).map(|i| big.did_by_index(i)).collect();
        assert_eq!(s.len(), 10_000);
    }

    #[test]
    fn seeds_change_dids_but_not_seqs() {
        let a = Generator::new(1, 1000);
        let b = Generator::new(2, 1000);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.event(10, 1, &mut x);
        b.event(10, 1, &mut y);
        assert_ne!(x, y);
        assert_eq!(Generator::seq_of(&x), Generator::seq_of(&y));
    }

    #[test]
    fn event_without_time_matches_event() {
        let g = Generator::new(9, 77);
        for seq in [0u64, 1, 150, 151, 1000] {
            let mut full = Vec::new();
            g.event(seq, -12, &mut full);
            let mut split = b"junk".to_vec();
            let at = g.event_without_time(seq, &mut split);
            let split = &split[4..];
            let mut rebuilt = split[..at].to_vec();
            rebuilt.extend_from_slice(b"-12");
            rebuilt.extend_from_slice(&split[at..]);
            assert_eq!(rebuilt, full);
        }
    }

    #[test]
    fn canonical_integers() {
        assert_eq!(parse_canonical_i64(b"0,"), Some((0, 1)));
        assert_eq!(parse_canonical_i64(b"-5}"), Some((-5, 2)));
        assert_eq!(parse_canonical_i64(b"007"), None);
        assert_eq!(parse_canonical_i64(b"-0"), None);
        assert_eq!(parse_canonical_i64(b"x"), None);
        assert_eq!(parse_canonical_i64(b"99999999999999999999"), None);
        for v in [
            0i64,
            9,
            10,
            -1,
            i64::MAX,
            i64::MIN + 1,
            1_783_175_888_085_434,
        ] {
            let mut o = Vec::new();
            push_i64(v, &mut o);
            assert_eq!(o, v.to_string().as_bytes());
            assert_eq!(i64_len(v), o.len());
        }
    }
}
