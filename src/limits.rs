//! Abuse controls applied at the door, before a connection costs anything but a socket:
//! a cap on clients in total, a cap on concurrent connections per IP (per /64 for IPv6, since
//! one host usually owns a whole /64), and a per-IP connection rate (token bucket).
//! Refusals are HTTP errors with a reason (429 with `Retry-After`, 503 when full).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::handshake::HttpError;

/// Why: an idle address's bucket refills to full within seconds; entries with no connection
/// and a full bucket are garbage-collected once the table grows past this many entries (and
/// after that, past twice what the previous collection left, so that a table full of live
/// entries is not scanned again on every admission: amortized O(1) per admission).
const GC_THRESHOLD: usize = 65_536;

/// Limit settings.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Connected clients + handshakes in progress, in total.
    pub max_clients: usize,
    /// Concurrent connections per address key.
    pub max_conns_per_ip: usize,
    /// New connections per second per address key (bucket burst = 2 × rate, at least 1).
    pub conn_rate_per_ip: f64,
    /// Networks exempt from per-IP limits: (address, prefix length).
    pub allow: Vec<(IpAddr, u8)>,
}

/// Per-address state.
struct Entry {
    /// Connections currently counted.
    conns: usize,
    /// Tokens in the rate bucket.
    tokens: f64,
    /// Last refill.
    refilled: Instant,
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_clients`: the process is full.
    MaxClients,
    /// `max_conns_per_ip`: the address has too many connections.
    ConnsPerAddress,
    /// `conn_rate_per_ip`: the address connects too fast.
    RatePerAddress,
}

/// Outcome of [`Limits::admit`].
pub enum Admission {
    /// Counted; call [`Limits::release`] when the connection ends.
    Ok,
    /// Refused by this limit, with this HTTP error.
    Refused(HttpError, Limit),
}

/// A connection counted in the limits for as long as this lives (for callers without an
/// explicit release path, like the TLS sidecar's connection tasks).
pub struct Counted {
    /// The limiter it is counted in.
    limits: std::sync::Arc<Limits>,
    /// The address it is counted under.
    ip: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

/// Counters of refusals by reason, for metrics.
#[derive(Default)]
pub struct Refusals {
    /// Server full.
    pub full: AtomicU64,
    /// Too many concurrent connections from one address.
    pub per_ip: AtomicU64,
    /// Connection rate from one address exceeded.
    pub rate: AtomicU64,
}

/// The table behind the limiter's lock.
struct State {
    /// Address key → state.
    table: HashMap<IpAddr, Entry>,
    /// Connections counted, in total.
    total: usize,
    /// Collect garbage when the table reaches this many entries.
    gc_at: usize,
    /// Garbage collections so far (each an O(table) pass), for tests.
    gc_runs: u64,
}

/// The shared limiter.
pub struct Limits {
    /// Settings.
    config: LimitsConfig,
    /// Per-address table and the total.
    state: Mutex<State>,
    /// Refusal counters.
    pub refusals: Refusals,
}

/// The key an address is counted under: itself for IPv4, its /64 for IPv6.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Whether `ip` is in the network `net`/`len`.
pub fn in_network(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Limits {
    /// A limiter with these settings.
    pub fn new(config: LimitsConfig) -> Limits {
        Limits {
            config,
            state: Mutex::new(State {
                table: HashMap::new(),
                total: 0,
                gc_at: GC_THRESHOLD,
                gc_runs: 0,
            }),
            refusals: Refusals::default(),
        }
    }

    /// Whether `ip` is exempt from the per-address limits (`--allow-ip`).
    pub fn exempt(&self, ip: IpAddr) -> bool {
        // A dual-stack listener (`[::]:PORT`, the NixOS module's default) sees IPv4 clients
        // as IPv4-mapped IPv6 addresses; an IPv4 allow entry must still match them.
        let ip = ip.to_canonical();
        self.config.allow.iter().any(|n| in_network(ip, *n))
    }

    /// Counts a new connection from `ip`, or refuses it.
    pub fn admit(&self, ip: IpAddr) -> Admission {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Admission {
        let key = address_key(ip);
        let exempt = self.exempt(ip);
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        if state.total >= self.config.max_clients {
            self.refusals.full.fetch_add(1, Ordering::Relaxed);
            return Admission::Refused(
                HttpError::new(503, "server full: too many clients")
                    .with_header("Retry-After", "10".into()),
                Limit::MaxClients,
            );
        }
        if !exempt {
            let rate = self.config.conn_rate_per_ip;
            let burst = (rate * 2.0).max(1.0);
            if state.table.len() >= state.gc_at {
                state.table.retain(|_, e| {
                    e.conns > 0
                        || e.tokens + now.duration_since(e.refilled).as_secs_f64() * rate < burst
                });
                state.gc_at = GC_THRESHOLD.max(2 * state.table.len());
                state.gc_runs += 1;
            }
            let e = state.table.entry(key).or_insert(Entry {
                conns: 0,
                tokens: burst,
                refilled: now,
            });
            e.tokens = (e.tokens + now.duration_since(e.refilled).as_secs_f64() * rate).min(burst);
            e.refilled = now;
            if e.conns >= self.config.max_conns_per_ip {
                self.refusals.per_ip.fetch_add(1, Ordering::Relaxed);
                return Admission::Refused(
                    HttpError::new(429, "too many concurrent connections from your address")
                        .with_header("Retry-After", "10".into()),
                    Limit::ConnsPerAddress,
                );
            }
            if e.tokens < 1.0 {
                self.refusals.rate.fetch_add(1, Ordering::Relaxed);
                let wait = ((1.0 - e.tokens) / rate).ceil().max(1.0) as u64;
                return Admission::Refused(
                    HttpError::new(429, "connecting too fast from your address")
                        .with_header("Retry-After", wait.to_string()),
                    Limit::RatePerAddress,
                );
            }
            e.tokens -= 1.0;
            e.conns += 1;
        }
        state.total += 1;
        Admission::Ok
    }

    /// Like [`Limits::admit`], but the count is released when the returned guard drops.
    pub fn admit_counted(self: &std::sync::Arc<Self>, ip: IpAddr) -> Result<Counted, Limit> {
        match self.admit(ip) {
            Admission::Ok => Ok(Counted {
                limits: self.clone(),
                ip,
            }),
            Admission::Refused(_, limit) => Err(limit),
        }
    }

    /// Releases a connection counted by a successful [`Limits::admit`].
    pub fn release(&self, ip: IpAddr) {
        let key = address_key(ip);
        let exempt = self.exempt(ip);
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        state.total = state.total.saturating_sub(1);
        if !exempt && let Some(e) = state.table.get_mut(&key) {
            e.conns = e.conns.saturating_sub(1);
        }
    }

    /// Connections counted right now.
    pub fn total(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// Per-address token buckets for one kind of costly request (shape creations): `rate` per
/// second, bursts of `burst`. Keyed like the connection limits (per /64 for IPv6); entries
/// whose bucket is full again are collected when the table doubles (amortized O(1)).
pub struct RateTable {
    /// Tokens per second.
    rate: f64,
    /// Bucket size.
    burst: f64,
    /// Networks exempt (`--allow-ip`).
    allow: Vec<(IpAddr, u8)>,
    /// Address key → (tokens, last refill), and the size at which to collect garbage.
    state: Mutex<(HashMap<IpAddr, Bucket>, usize)>,
}

/// A token bucket: (tokens, last refill).
type Bucket = (f64, Instant);

impl RateTable {
    /// A table allowing `rate` per second per address, in bursts of `burst` (at least 1).
    pub fn new(rate: f64, burst: f64, allow: Vec<(IpAddr, u8)>) -> RateTable {
        RateTable {
            rate,
            burst: burst.max(1.0),
            allow,
            state: Mutex::new((HashMap::new(), GC_THRESHOLD)),
        }
    }

    /// Takes a token for `ip` if it has one (exempt addresses always do).
    pub fn try_take(&self, ip: IpAddr) -> bool {
        self.try_take_at(ip, Instant::now())
    }

    fn try_take_at(&self, ip: IpAddr, now: Instant) -> bool {
        // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses; an IPv4
        // allow entry must still exempt them.
        let ip = ip.to_canonical();
        if self.allow.iter().any(|n| in_network(ip, *n)) {
            return true;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (table, gc_at) = &mut *guard;
        let (rate, burst) = (self.rate, self.burst);
        let refill = |(tokens, at): Bucket| {
            (tokens + now.duration_since(at).as_secs_f64() * rate).min(burst)
        };
        if table.len() >= *gc_at {
            table.retain(|_, e| refill(*e) < burst);
            *gc_at = GC_THRESHOLD.max(2 * table.len());
        }
        let e = table.entry(address_key(ip)).or_insert((burst, now));
        let tokens = refill(*e);
        if tokens < 1.0 {
            *e = (tokens, now);
            return false;
        }
        *e = (tokens - 1.0, now);
        true
    }
}

/// Lets a warning through at most once per interval. Why: under a flood, or when the backend
/// is down or the process is out of file descriptors, every connection hits the same
/// condition, and one line per connection would flood the journal; counters keep the exact
/// numbers.
#[derive(Debug)]
pub struct Throttle {
    /// Reference point for `last_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` of the last allowed line, plus one (0 = never).
    last_ms: AtomicU64,
    /// Minimum spacing between allowed lines.
    interval: std::time::Duration,
}

impl Throttle {
    /// A throttle allowing one event per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        Throttle {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            interval,
        }
    }

    /// True if the caller may log now.
    pub fn allow(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < interval {
            return false;
        }
        // Only one of several racing callers wins.
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_clients: usize, per_ip: usize, rate: f64) -> Limits {
        Limits::new(LimitsConfig {
            max_clients,
            max_conns_per_ip: per_ip,
            conn_rate_per_ip: rate,
            allow: vec![("10.9.0.0".parse().unwrap(), 16)],
        })
    }

    fn status(a: Admission) -> u16 {
        match a {
            Admission::Ok => 200,
            Admission::Refused(e, _) => e.status,
        }
    }

    #[test]
    fn per_ip_cap_and_release() {
        let l = limits(100, 2, 1000.0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(status(l.admit(ip)), 200);
        assert_eq!(status(l.admit(ip)), 200);
        assert_eq!(status(l.admit(ip)), 429);
        assert_eq!(
            status(l.admit("192.0.2.2".parse().unwrap())),
            200,
            "other IPs unaffected"
        );
        l.release(ip);
        assert_eq!(status(l.admit(ip)), 200);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = limits(100, 1, 1000.0);
        assert_eq!(status(l.admit("2001:db8:1:2::1".parse().unwrap())), 200);
        assert_eq!(status(l.admit("2001:db8:1:2::ffff".parse().unwrap())), 429);
        assert_eq!(status(l.admit("2001:db8:1:3::1".parse().unwrap())), 200);
    }

    #[test]
    fn rate_bucket_refills() {
        let l = limits(100, 100, 2.0);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(status(l.admit_at(ip, t0)), 200);
        }
        match l.admit_at(ip, t0) {
            Admission::Refused(e, limit) => {
                assert_eq!(limit, Limit::RatePerAddress);
                assert_eq!(e.status, 429);
                assert!(e.to_response().windows(11).any(|w| w == b"Retry-After"));
            }
            Admission::Ok => panic!("bucket should be empty"),
        }
        assert_eq!(status(l.admit_at(ip, t0 + Duration::from_millis(600))), 200);
    }

    /// The table full of live entries (each with a connection, so none can be collected):
    /// admissions beyond the threshold must not each rescan it (they did: O(n) per admit
    /// under the global mutex).
    #[test]
    fn garbage_collection_is_amortized() {
        let l = limits(1_000_000, 4, 1000.0);
        let n = GC_THRESHOLD + 5_000;
        for i in 0..n as u32 {
            let ip = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            assert_eq!(status(l.admit(ip)), 200);
        }
        for i in 0..20_000u32 {
            let ip = IpAddr::from((0x0b00_0000u32 + i).to_be_bytes());
            assert_eq!(status(l.admit(ip)), 200);
        }
        let runs = l.state.lock().unwrap().gc_runs;
        assert!(runs <= 2, "{runs} full-table passes for 25,000 admissions");
        // And garbage still goes: release everything, and once the buckets are full again
        // the next collection empties the table.
        let later = Instant::now() + Duration::from_secs(10);
        {
            let mut st = l.state.lock().unwrap();
            for e in st.table.values_mut() {
                e.conns = 0;
            }
            st.gc_at = 0;
        }
        assert_eq!(
            status(l.admit_at("192.0.2.77".parse().unwrap(), later)),
            200
        );
        assert_eq!(l.state.lock().unwrap().table.len(), 1);
    }

    #[test]
    fn rate_table_buckets_per_address() {
        let t = RateTable::new(0.5, 2.0, vec![("10.0.0.0".parse().unwrap(), 8)]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(t.try_take_at(a, t0));
        assert!(t.try_take_at(a, t0));
        assert!(!t.try_take_at(a, t0), "burst of 2 spent");
        // An allow-listed IPv4 client seen through a dual-stack listener stays exempt.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        for _ in 0..5 {
            assert!(t.try_take_at(mapped, t0), "exempt through its mapped form");
        }
        assert!(
            t.try_take_at("192.0.2.2".parse().unwrap(), t0),
            "others unaffected"
        );
        assert!(!t.try_take_at(a, t0 + Duration::from_millis(1900)));
        assert!(
            t.try_take_at(a, t0 + Duration::from_millis(2100)),
            "refilled"
        );
        // /64 for IPv6.
        assert!(t.try_take_at("2001:db8::1".parse().unwrap(), t0));
        assert!(t.try_take_at("2001:db8::2".parse().unwrap(), t0));
        assert!(!t.try_take_at("2001:db8::3".parse().unwrap(), t0));
        for _ in 0..10 {
            assert!(t.try_take_at("10.1.2.3".parse().unwrap(), t0), "exempt");
        }
    }

    #[test]
    fn throttle_allows_one_per_interval() {
        let t = Throttle::new(Duration::from_millis(200));
        assert!(t.allow());
        assert!(!t.allow());
        std::thread::sleep(Duration::from_millis(220));
        assert!(t.allow());
    }

    #[test]
    fn total_cap_and_allow_list() {
        let l = limits(3, 1, 1000.0);
        let exempt: IpAddr = "10.9.3.4".parse().unwrap();
        assert_eq!(status(l.admit(exempt)), 200);
        assert_eq!(status(l.admit(exempt)), 200, "allow-listed: no per-IP cap");
        assert_eq!(status(l.admit("192.0.2.9".parse().unwrap())), 200);
        assert_eq!(status(l.admit("192.0.2.10".parse().unwrap())), 503);
        assert_eq!(l.total(), 3);
    }

    #[test]
    fn allow_list_matches_ipv4_clients_of_a_dual_stack_listener() {
        let l = limits(100, 1, 1000.0);
        let mapped: IpAddr = "::ffff:10.9.3.4".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(status(l.admit(mapped)), 200, "allow-listed through [::]");
        }
        let other: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(status(l.admit(other)), 200);
        assert_eq!(status(l.admit(other)), 429, "others still capped");
    }
}
