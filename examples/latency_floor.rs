//! The latency floor of live fan-out on this machine: the benchmark's physical reference for
//! latency, as `iperf3 -Z` is its reference for throughput.
//!
//! A sender thread (pinned to core 0) does the least any relay must do: at each event time it
//! sends every pending event to each of N loopback TCP sockets, one plain non-blocking `send`
//! per socket per round, and starts the next round at once if events piled up meanwhile. A
//! receiver thread (pinned to core 1) epolls the sockets, reads, and records receive time −
//! event time. No relay, no io_uring, no WebSocket framing, no verification: what is left is
//! the kernel's cost per send and per wake-up, which bounds every design on this machine.
//!
//! With `sweep`, each client instead gets what is due when its turn comes, as the relay's
//! fan-out does (the snapshot moves with the sweep).
//!
//! Usage: `cargo run --release --example latency_floor -- CLIENTS RATE SECS [rounds|sweep]`
//! (the benchmark runs it in rounds as `floor-…` scenarios). Prints one JSON line.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::thread::{CpuSet, sched_setaffinity};

/// Bytes per event: the mean size of a real Jetstream event (../shared/data README: 552).
const EVENT_BYTES: usize = 552;
/// Latency histogram resolution and range: 50 µs buckets up to 1 s.
const BUCKET_US: u64 = 50;
const BUCKETS: usize = 20_000;
/// The receiver keeps reading this long after the sender stops, so in-flight events count.
const DRAIN: Duration = Duration::from_secs(2);
const USAGE: &str = "usage: latency_floor CLIENTS RATE SECS [rounds|sweep]";

fn pin(core: usize) {
    let mut set = CpuSet::new();
    set.set(core);
    // Unpinned still measures something; the benchmark notes the pinning it asked for.
    let _ = sched_setaffinity(None, &set);
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct SenderReport {
    /// Events handed to sockets, summed over clients (what the receiver must count).
    deliveries: u64,
    /// Passes over all clients.
    rounds: u64,
    sends: u64,
    cpu: Duration,
}

/// How the sender walks its clients.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Each round snapshots the events due when it starts and sends them to every client.
    Rounds,
    /// Each client gets what is due when its turn comes (the snapshot moves with the sweep).
    Sweep,
}

/// Clients handled between two reads of the clock in sweep mode.
const SWEEP_CHUNK: usize = 32;

/// Sends `rate` events per second for `secs` to every socket.
fn sender(
    mut socks: Vec<TcpStream>,
    epoch: Instant,
    rate: u64,
    secs: u64,
    mode: Mode,
) -> SenderReport {
    pin(0);
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let stop = Duration::from_secs(secs);
    // The whole run's events, each stamped with its due time: a log, as the relay has.
    let total = (rate * secs) as usize + 1;
    let mut log = vec![b'x'; total * EVENT_BYTES];
    for (j, event) in log.chunks_mut(EVENT_BYTES).enumerate() {
        let stamp = (period * j as u32).as_nanos() as u64;
        event[..8].copy_from_slice(&stamp.to_le_bytes());
    }
    let due = |now: Duration| ((now.as_nanos() / period.as_nanos()) as usize + 1).min(total);
    let mut next = vec![0usize; socks.len()];
    let (mut rounds, mut sends) = (0u64, 0u64);
    let cpu0 = thread_cpu();
    loop {
        let now = epoch.elapsed();
        if now > stop {
            break;
        }
        let mut upto = due(now);
        let mut sent_any = false;
        for (i, s) in socks.iter_mut().enumerate() {
            if mode == Mode::Sweep && i % SWEEP_CHUNK == 0 {
                upto = due(epoch.elapsed());
            }
            if next[i] < upto {
                // A full socket buffer would be a lagging client; at these loads none is (the
                // receiver counts events, so a short write shows up as missing events).
                let _ = s.write(&log[next[i] * EVENT_BYTES..upto * EVENT_BYTES]);
                next[i] = upto;
                sends += 1;
                sent_any = true;
            }
        }
        if sent_any {
            rounds += 1;
        } else {
            let wait = (period * upto as u32).saturating_sub(epoch.elapsed());
            std::thread::sleep(wait);
        }
    }
    let deliveries = next.iter().map(|&n| n as u64).sum();
    SenderReport {
        deliveries,
        rounds,
        sends,
        cpu: thread_cpu() - cpu0,
    }
}

/// Reads every socket until the sender has stopped and `DRAIN` has passed; returns the
/// latency histogram.
fn receiver(mut socks: Vec<TcpStream>, epoch: Instant, secs: u64) -> std::io::Result<Vec<u64>> {
    pin(1);
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        epoll::add(
            &ep,
            s.as_fd(),
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )?;
    }
    let mut hist = vec![0u64; BUCKETS];
    // Partial event per socket: bytes of the current event received so far.
    let mut partial = vec![[0u8; 8]; socks.len()];
    let mut have = vec![0usize; socks.len()];
    let mut buf = vec![0u8; 256 * 1024];
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    let end = Duration::from_secs(secs) + DRAIN;
    let timeout = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    while epoch.elapsed() < end {
        events.clear();
        epoll::wait(
            &ep,
            rustix::buffer::spare_capacity(&mut events),
            Some(&timeout),
        )?;
        for ev in &events {
            let i = ev.data.u64() as usize;
            loop {
                let n = match socks[i].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                let now = epoch.elapsed().as_nanos() as u64;
                let mut pos = 0;
                while pos < n {
                    // Only an event's first 8 bytes (its stamp) are looked at.
                    while have[i] < 8 && pos < n {
                        partial[i][have[i]] = buf[pos];
                        have[i] += 1;
                        pos += 1;
                    }
                    let skip = (EVENT_BYTES - have[i]).min(n - pos);
                    have[i] += skip;
                    pos += skip;
                    if have[i] == EVENT_BYTES {
                        let sent = u64::from_le_bytes(partial[i]);
                        let us = now.saturating_sub(sent) / 1000;
                        hist[((us / BUCKET_US) as usize).min(BUCKETS - 1)] += 1;
                        have[i] = 0;
                    }
                }
            }
        }
    }
    Ok(hist)
}

fn quantile_ms(hist: &[u64], q: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    let mut seen = 0;
    for (b, n) in hist.iter().enumerate() {
        seen += n;
        if total > 0 && seen as f64 >= q * total as f64 {
            return ((b + 1) as u64 * BUCKET_US) as f64 / 1000.0;
        }
    }
    f64::NAN
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.last().map(String::as_str) {
        Some("sweep") => Mode::Sweep,
        _ => Mode::Rounds,
    };
    args.retain(|a| a != "sweep" && a != "rounds");
    let args: Vec<u64> = args
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{USAGE} ({e})"))?;
    let [clients, rate, secs] = args[..] else {
        anyhow::bail!(USAGE);
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut rx = Vec::new();
    let mut tx = Vec::new();
    for _ in 0..clients {
        let c = TcpStream::connect(addr)?;
        let (s, _) = listener.accept()?;
        for sock in [&c, &s] {
            sock.set_nodelay(true)?;
            sock.set_nonblocking(true)?;
        }
        rx.push(c);
        tx.push(s);
    }
    let epoch = Instant::now() + Duration::from_millis(300);
    let receiver = std::thread::spawn(move || receiver(rx, epoch, secs));
    std::thread::sleep(Duration::from_millis(300));
    let sent = sender(tx, epoch, rate, secs, mode);
    let hist = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let received: u64 = hist.iter().sum();
    println!(
        "{}",
        serde_json::json!({
            "clients": clients,
            "rate": rate,
            "complete": received == sent.deliveries,
            "rounds": sent.rounds,
            "sends": sent.sends,
            "sender_cpu_pct": sent.cpu.as_secs_f64() * 100.0 / secs as f64,
            "us_per_send": sent.cpu.as_secs_f64() * 1e6 / sent.sends.max(1) as f64,
            "p50_ms": quantile_ms(&hist, 0.50),
            "p99_ms": quantile_ms(&hist, 0.99),
            "max_ms": quantile_ms(&hist, 1.0),
        })
    );
    Ok(())
}
