//! Upstream event metadata: the one parse every upstream message gets.
//!
//! The relay stores and forwards upstream Jetstream events byte-for-byte; it never re-serializes
//! them. What it needs from each event is a handful of fields to index and filter on (`did`,
//! `time_us`, `kind`, the commit's `collection`) and a key that recognises the same event when
//! two upstream connections overlap. [`parse_event`] extracts exactly that in one pass over the
//! bytes, borrowing from the input where it can and skipping the record body without
//! materialising it, while still validating the whole message as JSON: nothing that fails here
//! is ever stored or sent to a client.
//!
//! [`scan_time_us`] is the cheap counterpart for events that were already validated and stored:
//! it walks only the top-level keys until it finds `time_us`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Why bounded: a relay must not index a frame it cannot store cheaply; larger upstream messages
/// are skipped.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// The event kinds: the three of Jetstream v1, and `#sync`, which only the v2 wire carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A record create, update or delete; the only kind that has a collection.
    Commit,
    /// A handle or DID document change.
    Identity,
    /// An account status change (activation, takedown, deletion).
    Account,
    /// A broken commit chain (consumers should resync the repo). v2 only: it has no v1 form,
    /// so [`parse_event`] never returns it; the follower builds its metadata with
    /// [`sync_event_meta`].
    Sync,
}

impl EventKind {
    /// The `kind` value as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Commit => "commit",
            EventKind::Identity => "identity",
            EventKind::Account => "account",
            EventKind::Sync => "sync",
        }
    }

    /// A v1 `kind` value; `sync` is not one (the v1 wire never carries it).
    fn from_wire(kind: &str) -> Option<Self> {
        match kind {
            "commit" => Some(EventKind::Commit),
            "identity" => Some(EventKind::Identity),
            "account" => Some(EventKind::Account),
            _ => None,
        }
    }

    /// A distinct byte per kind, mixed into the dedup key so kinds never collide.
    fn tag(self) -> u8 {
        match self {
            EventKind::Commit => b'c',
            EventKind::Identity => b'i',
            EventKind::Account => b'a',
            EventKind::Sync => b's',
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the relay indexes about one upstream event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMeta<'a> {
    /// The repository the event is about; filtered on by `wantedDids` and hashed into the index.
    pub did: Cow<'a, str>,
    /// Upstream timestamp in µs; the cursor clients resume from. Not monotonic in real traffic.
    pub time_us: i64,
    /// Decides which filters apply (`wantedCollections` only constrains commits).
    pub kind: EventKind,
    /// The commit's collection NSID; `None` for identity and account events.
    pub collection: Option<Cow<'a, str>>,
    /// Identifies the event across upstream instances (whose `time_us` differ), for dedup.
    pub dedup_key: u64,
}

impl EventMeta<'_> {
    /// Detaches the metadata from the input buffer.
    pub fn into_owned(self) -> EventMeta<'static> {
        EventMeta {
            did: Cow::Owned(self.did.into_owned()),
            time_us: self.time_us,
            kind: self.kind,
            collection: self.collection.map(|c| Cow::Owned(c.into_owned())),
            dedup_key: self.dedup_key,
        }
    }
}

/// Why an upstream message cannot be indexed (it is then skipped, never stored).
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Longer than [`MAX_EVENT_BYTES`]; carries the actual length.
    #[error("event too large: {0} bytes (max {MAX_EVENT_BYTES})")]
    TooLarge(usize),
    /// Not valid UTF-8, not JSON, not an object, or a duplicated indexed field.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A field the relay needs is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field the relay needs has the wrong type or shape.
    #[error("invalid field `{0}`")]
    InvalidField(&'static str),
    /// `kind` is a string other than commit/identity/account.
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
}

/// Parses and validates one upstream message, returning what the relay indexes.
///
/// The whole message is validated as UTF-8 JSON (it will be sent as a WebSocket text frame);
/// the record body is skipped without being materialised.
pub fn parse_event(json: &[u8]) -> Result<EventMeta<'_>, EventError> {
    if json.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(json.len()));
    }
    // Text frames must be UTF-8 (RFC 6455 §5.6) and serde_json skips strings it ignores without
    // checking them, so the whole message is checked here, once.
    let text = std::str::from_utf8(json)
        .map_err(|e| EventError::InvalidJson(format!("invalid UTF-8: {e}")))?;
    let raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| EventError::InvalidJson(e.to_string()))?;
    // A `cursor` field is not the relay's business here (see `parse_v1_event`).
    raw.validate()
}

/// [`parse_event`], also returning the top-level `cursor` an upstream's `/subscribe` wire may
/// carry (its seq for the event: official Jetstream since 2026, another jetrelay), in the same
/// pass. A `cursor` that is not a non-negative integer is [`EventError::InvalidField`], a
/// repeated one [`EventError::InvalidJson`] (the follower reads it as the resume position).
pub fn parse_v1_event(json: &[u8]) -> Result<(EventMeta<'_>, Option<u64>), EventError> {
    if json.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(json.len()));
    }
    // Text frames must be UTF-8 (RFC 6455 §5.6) and serde_json skips strings it ignores without
    // checking them, so the whole message is checked here, once.
    let text = std::str::from_utf8(json)
        .map_err(|e| EventError::InvalidJson(format!("invalid UTF-8: {e}")))?;
    let mut raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| EventError::InvalidJson(e.to_string()))?;
    let cursor = match std::mem::replace(&mut raw.cursor, CursorField::Absent) {
        CursorField::Absent => None,
        CursorField::One(Scalar::Int(seq)) => {
            Some(u64::try_from(seq).map_err(|_| EventError::InvalidField("cursor"))?)
        }
        CursorField::One(_) => return Err(EventError::InvalidField("cursor")),
        CursorField::Repeated => {
            return Err(EventError::InvalidJson(
                "duplicate field `cursor`".to_owned(),
            ));
        }
    };
    Ok((raw.validate()?, cursor))
}

/// The metadata of a v2 `#sync` event (it has no v1 JSON to parse): `did` decoded, `time_us`
/// from its `time`, and a dedup key from the DID and the repo revision `rev` (both global, so
/// two instances' copies of the event get the same key whatever their seqs and times).
pub fn sync_event_meta<'a>(
    did: Cow<'a, str>,
    time_us: i64,
    rev: &str,
) -> Result<EventMeta<'a>, EventError> {
    if !did.starts_with("did:") {
        return Err(EventError::InvalidField("did"));
    }
    let mut hasher = KeyHasher::new(EventKind::Sync);
    hasher.field(&did);
    hasher.field(rev);
    Ok(EventMeta {
        did,
        time_us,
        kind: EventKind::Sync,
        collection: None,
        dedup_key: hasher.finish(),
    })
}

/// Stable 32-bit hash of a DID (FNV-1a), fixed forever: it is persisted on disk.
pub fn did_hash(did: &str) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    did.bytes()
        .fold(OFFSET, |h, b| (h ^ u32::from(b)).wrapping_mul(PRIME))
}

/// Fast extraction of the top-level `time_us` from a stored event without a full parse (for
/// cursor lookups). `None` if absent or not an integer.
///
/// Only top-level keys are considered, so a `"time_us"` inside a record cannot be mistaken for
/// it. Keys written with escape sequences are not recognised (upstream never writes them).
pub fn scan_time_us(json: &[u8]) -> Option<i64> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        // A key must follow `{` or `,`; anything else (including `}`) means no time_us.
        let key_end = skip_string(json, i)?;
        let key = json.get(i + 1..key_end - 1)?;
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        if key == b"time_us" {
            return scan_integer(json, i);
        }
        i = skip_ws(json, skip_value(json, i)?);
        if json.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = json.get(i) {
        i += 1;
    }
    i
}

/// Given the index of an opening quote, returns the index just past the closing quote.
fn skip_string(json: &[u8], start: usize) -> Option<usize> {
    if json.get(start) != Some(&b'"') {
        return None;
    }
    let mut i = start + 1;
    loop {
        match json.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// Given the index of a value, returns the index just past it.
fn skip_value(json: &[u8], start: usize) -> Option<usize> {
    match json.get(start)? {
        b'"' => skip_string(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match json.get(i)? {
                    b'"' => {
                        i = skip_string(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = start;
            while let Some(&b) = json.get(i) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// Parses a JSON integer at `start`; `None` for fractions, exponents or overflow.
fn scan_integer(json: &[u8], start: usize) -> Option<i64> {
    let mut i = start;
    let negative = json.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let digits_start = i;
    let mut value: i64 = 0;
    while let Some(&b) = json.get(i) {
        if !b.is_ascii_digit() {
            break;
        }
        let digit = i64::from(b - b'0');
        // Accumulate negatively so i64::MIN is representable.
        value = value.checked_mul(10)?.checked_sub(digit)?;
        i += 1;
    }
    if i == digits_start || matches!(json.get(i), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// Fixed 64-bit hash for dedup keys: FNV-1a over length-prefixed fields, then a SplitMix64
/// finaliser so that similar inputs spread over all bits.
struct KeyHasher(u64);

impl KeyHasher {
    fn new(kind: EventKind) -> Self {
        let mut h = KeyHasher(0xcbf2_9ce4_8422_2325);
        h.bytes(&[kind.tag()]);
        h
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Length prefix keeps ("ab","c") and ("a","bc") apart.
    fn field(&mut self, field: &str) {
        self.bytes(&(field.len() as u64).to_le_bytes());
        self.bytes(field.as_bytes());
    }

    fn finish(self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A JSON value reduced to what validation needs to know about it.
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    /// Any other JSON value (number out of i64 range, float, bool, null, object, array).
    Other,
}

impl<'a> Scalar<'a> {
    fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Scalar::Other, Scalar::Int))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(ScalarVisitor(std::marker::PhantomData))
    }
}

/// Stores `value` into `slot`, rejecting a second occurrence of the same key: clients use
/// parsers that disagree on which duplicate wins, so the relay must not index one and let a
/// client see another.
fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T, key: Key) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom(format_args!("duplicate field `{}`", key.name())));
    }
    *slot = Some(value);
    Ok(())
}

/// An object key the parser cares about, classified without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Did,
    TimeUs,
    Kind,
    Commit,
    Identity,
    Account,
    Rev,
    Operation,
    Collection,
    Rkey,
    Seq,
    Cursor,
    Other,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Did => "did",
            Key::TimeUs => "time_us",
            Key::Kind => "kind",
            Key::Commit => "commit",
            Key::Identity => "identity",
            Key::Account => "account",
            Key::Rev => "rev",
            Key::Operation => "operation",
            Key::Collection => "collection",
            Key::Rkey => "rkey",
            Key::Seq => "seq",
            Key::Cursor => "cursor",
            Key::Other => "other",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "did" => Key::Did,
                    "time_us" => Key::TimeUs,
                    "kind" => Key::Kind,
                    "commit" => Key::Commit,
                    "identity" => Key::Identity,
                    "account" => Key::Account,
                    "rev" => Key::Rev,
                    "operation" => Key::Operation,
                    "collection" => Key::Collection,
                    "rkey" => Key::Rkey,
                    "seq" => Key::Seq,
                    "cursor" => Key::Cursor,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The `commit`, `identity` or `account` sub-object (fields of all three, collected together).
#[derive(Default)]
struct Section<'a> {
    rev: Option<Scalar<'a>>,
    operation: Option<Scalar<'a>>,
    collection: Option<Scalar<'a>>,
    rkey: Option<Scalar<'a>>,
    seq: Option<Scalar<'a>>,
}

/// A sub-object, or evidence that the key held some other JSON value.
enum MaybeSection<'a> {
    Object(Section<'a>),
    NotObject,
}

impl<'de: 'a, 'a> Deserialize<'de> for MaybeSection<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SectionVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for SectionVisitor<'a> {
            type Value = MaybeSection<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut s = Section::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Rev => &mut s.rev,
                        Key::Operation => &mut s.operation,
                        Key::Collection => &mut s.collection,
                        Key::Rkey => &mut s.rkey,
                        Key::Seq => &mut s.seq,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value = map.next_value::<Scalar<'a>>()?;
                    set_once::<_, A::Error>(slot, value, key)?;
                }
                Ok(MaybeSection::Object(s))
            }
            fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeSection::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeSection::NotObject)
            }
        }
        d.deserialize_any(SectionVisitor(std::marker::PhantomData))
    }
}

/// The top-level fields of an event, before validation.
#[derive(Default)]
struct RawEvent<'a> {
    did: Option<Scalar<'a>>,
    time_us: Option<Scalar<'a>>,
    kind: Option<Scalar<'a>>,
    commit: Option<MaybeSection<'a>>,
    identity: Option<MaybeSection<'a>>,
    account: Option<MaybeSection<'a>>,
    /// The upstream's seq on a `/subscribe` wire that carries one.
    cursor: CursorField<'a>,
}

/// The top-level `cursor` member(s) of an event. Kept apart from the indexed fields, whose
/// repetition fails the parse: only [`parse_v1_event`] refuses a repeated `cursor`, so
/// [`parse_event`] accepts exactly what it accepted before the field existed.
#[derive(Default)]
enum CursorField<'a> {
    /// No `cursor` member.
    #[default]
    Absent,
    /// One, with its value.
    One(Scalar<'a>),
    /// More than one.
    Repeated,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEvent<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EventVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for EventVisitor<'a> {
            type Value = RawEvent<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut e = RawEvent::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Did => set_once::<_, A::Error>(&mut e.did, map.next_value()?, key)?,
                        Key::TimeUs => {
                            set_once::<_, A::Error>(&mut e.time_us, map.next_value()?, key)?
                        }
                        Key::Kind => set_once::<_, A::Error>(&mut e.kind, map.next_value()?, key)?,
                        Key::Commit => {
                            set_once::<_, A::Error>(&mut e.commit, map.next_value()?, key)?
                        }
                        Key::Identity => {
                            set_once::<_, A::Error>(&mut e.identity, map.next_value()?, key)?
                        }
                        Key::Account => {
                            set_once::<_, A::Error>(&mut e.account, map.next_value()?, key)?
                        }
                        Key::Cursor => {
                            let value = map.next_value::<Scalar<'a>>()?;
                            e.cursor = match e.cursor {
                                CursorField::Absent => CursorField::One(value),
                                _ => CursorField::Repeated,
                            };
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(e)
            }
        }
        d.deserialize_map(EventVisitor(std::marker::PhantomData))
    }
}

/// Returns the string value of a required field.
fn required_str<'a>(
    field: Option<Scalar<'a>>,
    name: &'static str,
) -> Result<Cow<'a, str>, EventError> {
    field
        .ok_or(EventError::MissingField(name))?
        .into_str()
        .ok_or(EventError::InvalidField(name))
}

impl<'a> RawEvent<'a> {
    fn validate(self) -> Result<EventMeta<'a>, EventError> {
        let did = required_str(self.did, "did")?;
        if !did.starts_with("did:") {
            return Err(EventError::InvalidField("did"));
        }
        let time_us = match self.time_us.ok_or(EventError::MissingField("time_us"))? {
            Scalar::Int(t) => t,
            _ => return Err(EventError::InvalidField("time_us")),
        };
        let kind_str = required_str(self.kind, "kind")?;
        let kind = EventKind::from_wire(&kind_str)
            .ok_or_else(|| EventError::UnknownKind(kind_str.into_owned()))?;

        let mut hasher = KeyHasher::new(kind);
        hasher.field(&did);
        let collection = match kind {
            // No v1 event is a `#sync` (`from_wire` does not know the name).
            EventKind::Sync => return Err(EventError::UnknownKind("sync".into())),
            EventKind::Commit => {
                let commit = match self.commit.ok_or(EventError::MissingField("commit"))? {
                    MaybeSection::Object(c) => c,
                    MaybeSection::NotObject => return Err(EventError::InvalidField("commit")),
                };
                let rev = required_str(commit.rev, "commit.rev")?;
                let operation = required_str(commit.operation, "commit.operation")?;
                let collection = required_str(commit.collection, "commit.collection")?;
                let rkey = required_str(commit.rkey, "commit.rkey")?;
                hasher.field(&rev);
                hasher.field(&operation);
                hasher.field(&collection);
                hasher.field(&rkey);
                Some(collection)
            }
            EventKind::Identity | EventKind::Account => {
                let (section, name, seq_name) = if kind == EventKind::Identity {
                    (self.identity, "identity", "identity.seq")
                } else {
                    (self.account, "account", "account.seq")
                };
                let section = match section.ok_or(EventError::MissingField(name))? {
                    MaybeSection::Object(s) => s,
                    MaybeSection::NotObject => return Err(EventError::InvalidField(name)),
                };
                match section.seq.ok_or(EventError::MissingField(seq_name))? {
                    Scalar::Int(seq) => hasher.bytes(&seq.to_le_bytes()),
                    _ => return Err(EventError::InvalidField(seq_name)),
                }
                None
            }
        };
        Ok(EventMeta {
            did,
            time_us,
            kind,
            collection,
            dedup_key: hasher.finish(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    const SAMPLE: &str = include_str!("../assets/jetstream-v1-sample.jsonl");

    fn sample_lines() -> Vec<&'static str> {
        SAMPLE.lines().filter(|l| !l.is_empty()).collect()
    }

    #[test]
    fn every_sample_event_parses_with_the_documented_mix() {
        let lines = sample_lines();
        assert_eq!(lines.len(), 152);
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        let mut collections: BTreeMap<String, usize> = BTreeMap::new();
        for line in &lines {
            let meta = parse_event(line.as_bytes()).expect("sample event parses");
            *kinds.entry(meta.kind.as_str()).or_default() += 1;
            assert!(meta.did.starts_with("did:plc:"));
            assert!(meta.time_us > 1_700_000_000_000_000);
            match meta.kind {
                EventKind::Commit => {
                    let c = meta.collection.expect("commits have a collection");
                    *collections.entry(c.into_owned()).or_default() += 1;
                }
                _ => assert!(meta.collection.is_none()),
            }
        }
        assert_eq!(kinds["commit"], 150);
        assert_eq!(kinds["identity"], 1);
        assert_eq!(kinds["account"], 1);
        assert_eq!(collections["app.bsky.feed.like"], 105);
        assert_eq!(collections["app.bsky.feed.post"], 18);
        assert_eq!(collections["app.bsky.feed.repost"], 15);
        assert_eq!(collections["app.bsky.graph.follow"], 9);
        assert_eq!(collections["app.bsky.graph.block"], 1);
        assert_eq!(collections["app.bsky.actor.status"], 1);
        assert_eq!(collections["fm.teal.alpha.actor.status"], 1);
        assert_eq!(collections.len(), 7);
    }

    #[test]
    fn commit_operations_match_the_data_readme() {
        let mut ops: BTreeMap<String, usize> = BTreeMap::new();
        for line in sample_lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(op) = v["commit"]["operation"].as_str() {
                *ops.entry(op.to_owned()).or_default() += 1;
            }
            // The parsed metadata agrees with a general-purpose parser.
            let meta = parse_event(line.as_bytes()).unwrap();
            assert_eq!(meta.did, v["did"].as_str().unwrap());
            assert_eq!(meta.time_us, v["time_us"].as_i64().unwrap());
            assert_eq!(meta.kind.as_str(), v["kind"].as_str().unwrap());
            assert_eq!(
                meta.collection.as_deref(),
                v["commit"]["collection"].as_str()
            );
        }
        assert_eq!(ops["create"], 144);
        assert_eq!(ops["update"], 2);
        assert_eq!(ops["delete"], 4);
    }

    #[test]
    fn sample_fields_are_borrowed_not_copied() {
        let line = sample_lines()[0];
        let meta = parse_event(line.as_bytes()).unwrap();
        assert!(matches!(meta.did, Cow::Borrowed(_)));
        assert!(matches!(meta.collection, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn dedup_keys_are_distinct_and_ignore_time_us() {
        let lines = sample_lines();
        let keys: HashSet<u64> = lines
            .iter()
            .map(|l| parse_event(l.as_bytes()).unwrap().dedup_key)
            .collect();
        assert_eq!(keys.len(), lines.len());

        // The same event relayed by another instance has another time_us but the same key.
        let line = lines[0];
        let meta = parse_event(line.as_bytes()).unwrap();
        let other = line.replace(&meta.time_us.to_string(), "1783175999999999");
        let other_meta = parse_event(other.as_bytes()).unwrap();
        assert_eq!(other_meta.time_us, 1_783_175_999_999_999);
        assert_eq!(other_meta.dedup_key, meta.dedup_key);
    }

    #[test]
    fn dedup_key_depends_on_every_identifying_field() {
        let base = r#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k"}}"#;
        let key = |s: &str| parse_event(s.as_bytes()).unwrap().dedup_key;
        let k0 = key(base);
        for (from, to) in [
            ("did:plc:a", "did:plc:b"),
            (r#""rev":"r""#, r#""rev":"s""#),
            ("create", "delete"),
            ("feed.like", "feed.post"),
            (r#""rkey":"k""#, r#""rkey":"j""#),
        ] {
            assert_ne!(key(&base.replace(from, to)), k0, "{from} -> {to}");
        }
        // Field boundaries matter: moving a byte between adjacent fields changes the key.
        let shifted = base
            .replace(r#""rev":"r""#, r#""rev":"rc""#)
            .replace(r#""operation":"create""#, r#""operation":"reate""#);
        assert_ne!(key(&shifted), k0);

        let ident = r#"{"did":"did:plc:a","time_us":1,"kind":"identity","identity":{"seq":7}}"#;
        let acct = r#"{"did":"did:plc:a","time_us":1,"kind":"account","account":{"seq":7}}"#;
        assert_ne!(key(ident), key(acct));
        assert_ne!(key(ident), key(&ident.replace("7", "8")));
    }

    #[test]
    fn dedup_key_is_a_fixed_function() {
        // Pinned so an accidental change of the hash is caught: dedup keys are compared across
        // relay restarts.
        let ident = r#"{"did":"did:plc:a","time_us":1,"kind":"identity","identity":{"seq":7}}"#;
        let k = parse_event(ident.as_bytes()).unwrap().dedup_key;
        let mut h = KeyHasher::new(EventKind::Identity);
        h.field("did:plc:a");
        h.bytes(&7i64.to_le_bytes());
        assert_eq!(k, h.finish());
        assert_eq!(k, 0x47d5_dd05_a728_78fd, "got {k:#x}");
    }

    #[test]
    fn did_hash_is_fnv1a_32() {
        assert_eq!(did_hash(""), 0x811c_9dc5);
        assert_eq!(did_hash("a"), 0xe40c_292c);
        assert_eq!(did_hash("foobar"), 0xbf9c_f968);
        assert_ne!(did_hash("did:plc:a"), did_hash("did:plc:b"));
    }

    #[test]
    fn malformed_inputs_are_rejected() {
        let valid = sample_lines()[0];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (valid.as_bytes()[..valid.len() / 2].to_vec(), "InvalidJson"),
            (b"[1,2,3]".to_vec(), "InvalidJson"),
            (b"\"did:plc:a\"".to_vec(), "InvalidJson"),
            (b"".to_vec(), "InvalidJson"),
            (vec![0xff, 0xfe, 0x00, 0x13, 0x37, 0x80, 0x81], "InvalidJson"),
            (format!("{valid} x").into_bytes(), "InvalidJson"),
            (
                br#"{"did":"did:plc:a","kind":"identity","identity":{"seq":1}}"#.to_vec(),
                "MissingField(\"time_us\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":"1","kind":"identity","identity":{"seq":1}}"#
                    .to_vec(),
                "InvalidField(\"time_us\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1.5,"kind":"identity","identity":{"seq":1}}"#
                    .to_vec(),
                "InvalidField(\"time_us\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":99999999999999999999,"kind":"identity","identity":{"seq":1}}"#
                    .to_vec(),
                "InvalidField(\"time_us\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"sync"}"#.to_vec(),
                "UnknownKind(\"sync\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":7}"#.to_vec(),
                "InvalidField(\"kind\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1}"#.to_vec(),
                "MissingField(\"kind\")",
            ),
            (
                br#"{"time_us":1,"kind":"identity","identity":{"seq":1}}"#.to_vec(),
                "MissingField(\"did\")",
            ),
            (
                br#"{"did":"plc:a","time_us":1,"kind":"identity","identity":{"seq":1}}"#.to_vec(),
                "InvalidField(\"did\")",
            ),
            (
                br#"{"did":null,"time_us":1,"kind":"identity","identity":{"seq":1}}"#.to_vec(),
                "InvalidField(\"did\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"commit"}"#.to_vec(),
                "MissingField(\"commit\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":[]}"#.to_vec(),
                "InvalidField(\"commit\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","rkey":"k"}}"#.to_vec(),
                "MissingField(\"commit.collection\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":{},"rkey":"k"}}"#.to_vec(),
                "InvalidField(\"commit.collection\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"identity"}"#.to_vec(),
                "MissingField(\"identity\")",
            ),
            (
                br#"{"did":"did:plc:a","time_us":1,"kind":"account","account":{"active":true}}"#
                    .to_vec(),
                "MissingField(\"account.seq\")",
            ),
            (
                br#"{"did":"did:plc:a","did":"did:plc:b","time_us":1,"kind":"identity","identity":{"seq":1}}"#
                    .to_vec(),
                "InvalidJson",
            ),
        ];
        for (input, expected) in cases {
            let err = parse_event(&input).expect_err(&String::from_utf8_lossy(&input));
            let got = format!("{err:?}");
            assert!(
                got.starts_with(expected),
                "input {:?}: expected {expected}, got {got}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn invalid_utf8_inside_an_ignored_record_is_rejected() {
        let mut bytes = br#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"c.d.e","rkey":"k","record":{"text":"XX"}}}"#.to_vec();
        let pos = bytes.windows(2).position(|w| w == b"XX").unwrap();
        bytes[pos] = 0xc3; // a lone UTF-8 lead byte followed by 'X'
        assert!(matches!(
            parse_event(&bytes),
            Err(EventError::InvalidJson(_))
        ));
    }

    #[test]
    fn oversized_input_is_rejected_before_parsing() {
        let big = vec![b' '; MAX_EVENT_BYTES + 1];
        assert!(
            matches!(parse_event(&big), Err(EventError::TooLarge(n)) if n == MAX_EVENT_BYTES + 1)
        );
        // Exactly at the limit is parsed (and here fails only as JSON).
        let at_limit = vec![b' '; MAX_EVENT_BYTES];
        assert!(matches!(
            parse_event(&at_limit),
            Err(EventError::InvalidJson(_))
        ));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let e = br#"{"did":"did:plc:\u0061b","time_us":5,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"app.bsky.feed.\u006cike","rkey":"k"}}"#;
        let meta = parse_event(e).unwrap();
        assert_eq!(meta.did, "did:plc:ab");
        assert_eq!(meta.collection.as_deref(), Some("app.bsky.feed.like"));
        assert!(matches!(meta.did, Cow::Owned(_)));
        let owned = meta.into_owned();
        assert_eq!(owned.time_us, 5);
    }

    #[test]
    fn scan_time_us_agrees_with_the_full_parse_on_every_sample() {
        for line in sample_lines() {
            let meta = parse_event(line.as_bytes()).unwrap();
            assert_eq!(scan_time_us(line.as_bytes()), Some(meta.time_us));
        }
    }

    #[test]
    fn scan_time_us_only_reads_the_top_level() {
        let nested = br#"{"did":"x","commit":{"time_us":1,"t":"\"time_us\":2"},"s":"\\","time_us":  -42 ,"z":1}"#;
        assert_eq!(scan_time_us(nested), Some(-42));
        assert_eq!(
            scan_time_us(br#"{"a":[{"time_us":1}],"b":"time_us"}"#),
            None
        );
        assert_eq!(scan_time_us(br#"{"time_us":1.5}"#), None);
        assert_eq!(scan_time_us(br#"{"time_us":1e3}"#), None);
        assert_eq!(scan_time_us(br#"{"time_us":"1"}"#), None);
        assert_eq!(scan_time_us(br#"{"time_us":99999999999999999999}"#), None);
        assert_eq!(
            scan_time_us(br#"{"time_us":-9223372036854775808}"#),
            Some(i64::MIN)
        );
        assert_eq!(scan_time_us(br#" { "time_us" : 7 } "#), Some(7));
        assert_eq!(scan_time_us(br#"{"time_us":}"#), None);
        assert_eq!(scan_time_us(b"{}"), None);
        assert_eq!(scan_time_us(b""), None);
        assert_eq!(scan_time_us(br#"{"a":"unterminated"#), None);
        assert_eq!(scan_time_us(br#"{"a":{"b":[}}]}"#), None);
    }

    #[test]
    fn the_upstream_cursor_is_reported_in_the_same_pass() {
        let line = sample_lines()[0];
        assert_eq!(parse_v1_event(line.as_bytes()).unwrap().1, None);
        let mut with = Vec::new();
        crate::wire::with_cursor(line.as_bytes(), 4_242, &mut with).unwrap();
        let (meta, cursor) = parse_v1_event(&with).unwrap();
        assert_eq!(cursor, Some(4_242));
        assert_eq!(meta, parse_event(line.as_bytes()).unwrap(), "same metadata");
        for (bad, want) in [
            (
                r#"{"did":"did:a","time_us":1,"cursor":-1,"kind":"identity","identity":{"seq":1}}"#,
                "InvalidField(\"cursor\")",
            ),
            (
                r#"{"did":"did:a","time_us":1,"cursor":"1","kind":"identity","identity":{"seq":1}}"#,
                "InvalidField(\"cursor\")",
            ),
            (
                r#"{"did":"did:a","time_us":1,"cursor":1.5,"kind":"identity","identity":{"seq":1}}"#,
                "InvalidField(\"cursor\")",
            ),
            (
                r#"{"did":"did:a","time_us":1,"cursor":1,"cursor":2,"kind":"identity","identity":{"seq":1}}"#,
                "InvalidJson(\"duplicate field `cursor`",
            ),
        ] {
            let got = format!("{:?}", parse_v1_event(bad.as_bytes()).unwrap_err());
            assert!(got.starts_with(want), "{bad}: {got}");
        }
        // parse_event ignores the field, whatever it holds, as it always did.
        for ignored in [
            r#"{"did":"did:a","time_us":1,"cursor":"x","kind":"identity","identity":{"seq":1}}"#,
            r#"{"did":"did:a","time_us":1,"cursor":1,"cursor":2,"kind":"identity","identity":{"seq":1}}"#,
        ] {
            assert!(parse_event(ignored.as_bytes()).is_ok(), "{ignored}");
        }
        // A `cursor` inside a record is data, not the wire field.
        let nested =
            r#"{"did":"did:a","time_us":1,"kind":"identity","identity":{"seq":1,"cursor":"x"}}"#;
        assert_eq!(parse_v1_event(nested.as_bytes()).unwrap().1, None);
    }

    #[test]
    fn sync_metadata_keys_on_did_and_rev() {
        let a = sync_event_meta(Cow::Borrowed("did:plc:a"), 5, "3mptbypluud2a").unwrap();
        assert_eq!(a.kind, EventKind::Sync);
        assert_eq!((a.time_us, a.collection.clone()), (5, None));
        let later = sync_event_meta(Cow::Borrowed("did:plc:a"), 9, "3mptbypluud2a").unwrap();
        assert_eq!(a.dedup_key, later.dedup_key, "time is not part of the key");
        let other_rev = sync_event_meta(Cow::Borrowed("did:plc:a"), 5, "3mptbypluud2b").unwrap();
        let other_did = sync_event_meta(Cow::Borrowed("did:plc:b"), 5, "3mptbypluud2a").unwrap();
        assert_ne!(a.dedup_key, other_rev.dedup_key);
        assert_ne!(a.dedup_key, other_did.dedup_key);
        assert!(matches!(
            sync_event_meta(Cow::Borrowed("plc:a"), 5, "r"),
            Err(EventError::InvalidField("did"))
        ));
    }

    #[test]
    #[ignore = "throughput report: cargo test --release --lib -- --ignored --nocapture"]
    fn parse_and_scan_throughput() {
        let lines = sample_lines();
        let bytes: usize = lines.iter().map(|l| l.len()).sum();
        let rounds = 2_000;
        let started = std::time::Instant::now();
        let mut keys = 0u64;
        for _ in 0..rounds {
            for l in &lines {
                keys = keys.wrapping_add(parse_event(l.as_bytes()).unwrap().dedup_key);
            }
        }
        let parse = started.elapsed();
        let started = std::time::Instant::now();
        let mut times = 0i64;
        for _ in 0..rounds {
            for l in &lines {
                times = times.wrapping_add(scan_time_us(l.as_bytes()).unwrap());
            }
        }
        let scan = started.elapsed();
        let n = (rounds * lines.len()) as f64;
        println!(
            "parse_event: {:.2} µs/event ({:.0} MB/s); scan_time_us: {:.3} µs/event [{keys:x}{times:x}]",
            parse.as_secs_f64() * 1e6 / n,
            (rounds * bytes) as f64 / parse.as_secs_f64() / 1e6,
            scan.as_secs_f64() * 1e6 / n,
        );
    }
}
