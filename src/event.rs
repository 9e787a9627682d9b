//! TEMP stub (lead) until the subscriptions branch lands.
use std::borrow::Cow;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind { Commit, Identity, Account }
pub struct EventMeta<'a> { pub did: Cow<'a, str>, pub time_us: i64, pub kind: EventKind, pub collection: Option<Cow<'a, str>>, pub dedup_key: u64 }
pub const MAX_EVENT_BYTES: usize = 1 << 20;
#[derive(Debug, thiserror::Error)]
pub enum EventError { #[error("invalid json {0}")] InvalidJson(String) }
pub fn parse_event(json: &[u8]) -> Result<EventMeta<'_>, EventError> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| EventError::InvalidJson(e.to_string()))?;
    let did = v["did"].as_str().ok_or(EventError::InvalidJson("did".into()))?.to_owned();
    let time_us = v["time_us"].as_i64().ok_or(EventError::InvalidJson("time_us".into()))?;
    let kind = match v["kind"].as_str() { Some("identity") => EventKind::Identity, Some("account") => EventKind::Account, _ => EventKind::Commit };
    let collection = v["commit"]["collection"].as_str().map(|s| Cow::Owned(s.to_owned()));
    Ok(EventMeta { did: Cow::Owned(did), time_us, kind, collection, dedup_key: 0 })
}
pub fn did_hash(did: &str) -> u32 { did.bytes().fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x01000193)) }
pub fn scan_time_us(json: &[u8]) -> Option<i64> {
    let pat = b"\"time_us\":";
    let i = json.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let rest = &json[i..];
    let end = rest.iter().position(|b| !(b.is_ascii_digit() || *b == b'-')).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}
