//! Liveness: "the process is up" must mean "every part of it is working".
//!
//! Every thread that matters (the upstream follower and writer, each fan-out worker, the
//! listener and its cursor-scan helper, retention, the metrics server) is a named *part*. It
//! is started with [`spawn_critical`] and calls [`beat`] once per loop iteration: one relaxed
//! store through a thread-local, nothing else.
//! A part that waits legitimately for longer than its loop normally takes says why with
//! [`idle`] (a guard; the part counts as working again when it is dropped).
//!
//! The process checks its parts ([`Liveness::check`]): a part that neither beat nor declared
//! itself idle within [`Liveness::stuck_after`] is *stuck*. The binary then stops sending
//! `WATCHDOG=1` (systemd restarts the relay) and names the part in `STATUS=`; `/readyz` answers
//! 503 naming it. A part that ends — returns, fails or panics — while the relay is not
//! shutting down ends the process with [`EXIT_PART_DIED`] and a log line naming it: a restart
//! recovers fast and exactly (see `relay::recover`), a limping process does not. Ending the
//! process also releases everything a dead thread held: a fan-out worker's tail-ring pin and
//! the per-IP counts of its clients die with it.
//!
//! Test hook (debug builds only): `TEST_JETRELAY_FAIL_PART=NAME:MODE:MS[,…]` makes the part
//! `NAME` panic (`MODE` = `panic`) or hang forever (`hang`) in its first [`beat`] at least `MS`
//! milliseconds after it started, so integration tests can kill or wedge any part of the real
//! binary.

use std::cell::RefCell;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Exit status of a relay whose critical thread ended unexpectedly (`EX_SOFTWARE`): non-zero,
/// so `Restart=on-failure` restarts it, and distinct from a configuration error (1).
pub const EXIT_PART_DIED: i32 = 70;

/// Longest a part may go without progress before it counts as stuck, when there is no systemd
/// watchdog to fit. Why 10 s: every part loops at least once a second (worker and retention
/// ticks, listener and follower poll timeouts), so 10 s is far outside normal jitter.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(10);
/// Smallest stuck threshold, however short the watchdog: a loop may take a second plus
/// scheduling delays on a loaded machine.
pub const MIN_STUCK_AFTER: Duration = Duration::from_secs(3);

/// Environment variable of the test hook (debug builds only; see the module documentation).
pub const TEST_FAIL_ENV: &str = "TEST_JETRELAY_FAIL_PART";

/// What a part is doing, as far as liveness is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartState {
    /// Looping: it must beat within the stuck threshold.
    Running,
    /// Waiting for a stated reason (not counted as stuck however long it lasts).
    Idle {
        /// Why, for `STATUS=` and `/readyz`.
        reason: &'static str,
        /// Since when.
        since: Instant,
    },
    /// The thread has ended (only expected during shutdown).
    Exited,
}

/// A fault the test hook injects into a part.
#[cfg(debug_assertions)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InjectedFault {
    /// Panic in `beat` (a thread that dies).
    Panic,
    /// Never return from `beat` (a wedged thread).
    Hang,
}

/// One watched thread.
pub struct Part {
    /// Its name (also the thread's name).
    name: String,
    /// Loop iterations so far; written only by the part's own thread.
    beats: AtomicU64,
    /// Running / idle / exited. Changed rarely (not per loop), so a mutex is cheap enough.
    state: Mutex<PartState>,
    /// Test hook: the fault to inject, and from when.
    #[cfg(debug_assertions)]
    fault: Option<(InjectedFault, Instant)>,
}

impl Part {
    fn state(&self) -> MutexGuard<'_, PartState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    #[cfg(debug_assertions)]
    fn inject(&self) {
        if let Some((fault, at)) = self.fault
            && Instant::now() >= at
        {
            match fault {
                InjectedFault::Panic => panic!("{TEST_FAIL_ENV}: part {} made to fail", self.name),
                InjectedFault::Hang => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
            }
        }
    }
}

thread_local! {
    /// The part running on this thread, if it was started by [`spawn_critical`].
    static CURRENT: RefCell<Option<Arc<Part>>> = const { RefCell::new(None) };
}

/// Reports one loop iteration of the part running on this thread (no-op on other threads).
/// Cheap enough for every loop: a thread-local read and a relaxed store.
pub fn beat() {
    CURRENT.with_borrow(|part| {
        if let Some(p) = part {
            // Single writer: a load and a store, no read-modify-write needed.
            p.beats.store(
                p.beats.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
            #[cfg(debug_assertions)]
            p.inject();
        }
    });
}

/// Declares the part on this thread idle for `reason` until the guard is dropped (then it
/// must beat again within the threshold). For waits that may legitimately outlast the stuck
/// threshold: a blocking DNS lookup, an `fdatasync`, a retry wait on a full disk.
pub fn idle(reason: &'static str) -> IdleGuard {
    let part = CURRENT.with_borrow(|p| p.clone());
    if let Some(p) = &part {
        *p.state() = PartState::Idle {
            reason,
            since: Instant::now(),
        };
    }
    IdleGuard { part }
}

/// Returned by [`idle`]; the part is running again when this is dropped.
pub struct IdleGuard {
    /// The part that declared itself idle (None on an unwatched thread).
    part: Option<Arc<Part>>,
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.part {
            let mut state = p.state();
            if matches!(*state, PartState::Idle { .. }) {
                *state = PartState::Running;
            }
            // Waking from a long wait is progress: the threshold counts from here.
            p.beats.store(
                p.beats.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        }
    }
}

/// The registry of parts and the checker's memory.
pub struct Liveness {
    /// Every part started so far (parts are never removed: at most a few dozen threads).
    parts: Mutex<Vec<Arc<Part>>>,
    /// Set when shutdown starts: parts may end from then on.
    stopping: AtomicBool,
    /// How long a running part may go without a beat (ms; set once the watchdog is known).
    stuck_after_ms: AtomicU64,
    /// Per part (same order as `parts`): the beats seen at the last check and when they last
    /// changed.
    seen: Mutex<Vec<(u64, Instant)>>,
    /// Test hook faults by part name (debug builds; empty otherwise).
    #[cfg(debug_assertions)]
    faults: Vec<(String, InjectedFault, Duration)>,
}

/// A part that is not making progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StuckPart {
    /// Its name.
    pub name: String,
    /// How long since its last beat (at least the threshold).
    pub silent_for: Duration,
}

/// A part waiting for a stated reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdlePart {
    /// Its name.
    pub name: String,
    /// Why.
    pub reason: &'static str,
    /// For how long.
    pub idle_for: Duration,
}

/// The result of one check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Parts that made no progress within the threshold (empty = healthy).
    pub stuck: Vec<StuckPart>,
    /// Parts waiting for a stated reason.
    pub idle: Vec<IdlePart>,
    /// Parts whose thread ended (only during shutdown; otherwise the process is gone).
    pub exited: Vec<String>,
}

impl Report {
    /// Whether every part progressed or is idle for a reason.
    pub fn healthy(&self) -> bool {
        self.stuck.is_empty()
    }

    /// One line naming what is stuck, or `None` when healthy (for `/readyz` and `STATUS=`).
    pub fn problem(&self) -> Option<String> {
        if self.stuck.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .stuck
            .iter()
            .map(|s| format!("{} ({}s without progress)", s.name, s.silent_for.as_secs()))
            .collect();
        Some(format!("stuck: {}", parts.join(", ")))
    }

    /// Idle parts in one line (`None` if none), for `STATUS=`.
    pub fn idle_summary(&self) -> Option<String> {
        if self.idle.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .idle
            .iter()
            .map(|i| format!("{} {} ({}s)", i.name, i.reason, i.idle_for.as_secs()))
            .collect();
        Some(format!("waiting: {}", parts.join(", ")))
    }
}

impl Liveness {
    /// A registry whose parts count as stuck after `stuck_after` without progress.
    pub fn new(stuck_after: Duration) -> Liveness {
        Liveness {
            parts: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            stuck_after_ms: AtomicU64::new(stuck_after.as_millis() as u64),
            seen: Mutex::new(Vec::new()),
            #[cfg(debug_assertions)]
            faults: test_faults_from_env(),
        }
    }

    /// The stuck threshold that fits a systemd watchdog timeout (`WatchdogSec`): half of it, so
    /// that keep-alives stop well before systemd's deadline, within
    /// [`MIN_STUCK_AFTER`]..=[`DEFAULT_STUCK_AFTER`].
    pub fn stuck_after_for_watchdog(watchdog: Option<Duration>) -> Duration {
        match watchdog {
            Some(w) => (w / 2).clamp(MIN_STUCK_AFTER, DEFAULT_STUCK_AFTER),
            None => DEFAULT_STUCK_AFTER,
        }
    }

    /// The threshold in use.
    pub fn stuck_after(&self) -> Duration {
        Duration::from_millis(self.stuck_after_ms.load(Ordering::Relaxed))
    }

    /// Changes the threshold (the binary fits it to the systemd watchdog).
    pub fn set_stuck_after(&self, d: Duration) {
        self.stuck_after_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Shutdown has started: parts may end without ending the process.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has started.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn register(&self, name: &str) -> Arc<Part> {
        let part = Arc::new(Part {
            name: name.to_owned(),
            beats: AtomicU64::new(0),
            state: Mutex::new(PartState::Running),
            #[cfg(debug_assertions)]
            fault: self
                .faults
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, f, after)| (*f, Instant::now() + *after)),
        });
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(part.clone());
        part
    }

    /// Names of the parts started so far.
    pub fn part_names(&self) -> Vec<String> {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Checks every part now. Cheap (a lock and a load per part); safe to call from any thread
    /// and at any rate: a part is stuck only if its beat count did not change for the whole
    /// threshold, as seen across calls.
    pub fn check(&self) -> Report {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let observed: Vec<(u64, PartState)> = parts
            .iter()
            .map(|p| (p.beats.load(Ordering::Relaxed), *p.state()))
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let stopping = self.stopping();
        judge(
            &mut seen,
            &parts.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            &observed,
            Instant::now(),
            self.stuck_after(),
            stopping,
        )
    }
}

/// The checker's rule, without clocks or threads: updates `seen` (beats, last change) with this
/// observation and reports stuck and idle parts.
fn judge(
    seen: &mut Vec<(u64, Instant)>,
    names: &[&str],
    observed: &[(u64, PartState)],
    now: Instant,
    stuck_after: Duration,
    stopping: bool,
) -> Report {
    let mut report = Report::default();
    for (i, ((beats, state), name)) in observed.iter().zip(names).enumerate() {
        if seen.len() <= i {
            // First sighting: it progressed "now" (it was just started).
            seen.push((*beats, now));
        }
        let (last_beats, last_change) = &mut seen[i];
        if *beats != *last_beats {
            *last_beats = *beats;
            *last_change = now;
        }
        match state {
            PartState::Exited => report.exited.push((*name).to_owned()),
            PartState::Idle { reason, since } => report.idle.push(IdlePart {
                name: (*name).to_owned(),
                reason,
                idle_for: now.saturating_duration_since(*since),
            }),
            PartState::Running => {
                let silent_for = now.saturating_duration_since(*last_change);
                if silent_for > stuck_after && !stopping {
                    report.stuck.push(StuckPart {
                        name: (*name).to_owned(),
                        silent_for,
                    });
                }
            }
        }
    }
    report
}

/// Starts a critical part on its own thread named `name`: `f` must loop, calling [`beat`], until
/// the relay shuts down. If it ends before that — returning, failing or panicking — the process
/// exits with [`EXIT_PART_DIED`] after logging which part ended and why.
pub fn spawn_critical<E, F>(
    liveness: &Arc<Liveness>,
    name: impl Into<String>,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    E: Display,
    F: FnOnce() -> Result<(), E> + Send + 'static,
{
    let name = name.into();
    let part = liveness.register(&name);
    let liveness = liveness.clone();
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        CURRENT.with_borrow_mut(|c| *c = Some(part.clone()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        *part.state() = PartState::Exited;
        let why = match outcome {
            Ok(Ok(())) => "returned".to_owned(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
        };
        if liveness.stopping() {
            tracing::debug!(part = %name, %why, "part ended during shutdown");
            return;
        }
        tracing::error!(
            part = %name,
            %why,
            exit_status = EXIT_PART_DIED,
            "a critical part of the relay ended; exiting so that the service manager restarts it"
        );
        std::process::exit(EXIT_PART_DIED);
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}

/// Parses [`TEST_FAIL_ENV`]: `NAME:MODE:MS` entries separated by commas. A malformed entry is
/// reported and ignored (this is a test hook, never a production setting).
#[cfg(debug_assertions)]
fn test_faults_from_env() -> Vec<(String, InjectedFault, Duration)> {
    let Ok(spec) = std::env::var(TEST_FAIL_ENV) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in spec.split(',').filter(|e| !e.is_empty()) {
        let mut it = entry.rsplitn(3, ':');
        let (ms, mode, name) = (it.next(), it.next(), it.next());
        let fault = match mode {
            Some("panic") => Some(InjectedFault::Panic),
            Some("hang") => Some(InjectedFault::Hang),
            _ => None,
        };
        match (name, fault, ms.and_then(|m| m.parse::<u64>().ok())) {
            (Some(name), Some(fault), Some(ms)) => {
                tracing::warn!(part = name, ?fault, ms, "test hook armed");
                out.push((name.to_owned(), fault, Duration::from_millis(ms)));
            }
            _ => tracing::warn!(entry, "ignoring malformed {TEST_FAIL_ENV} entry"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_part_is_stuck_only_after_the_threshold_without_beats() {
        let t0 = Instant::now();
        let mut seen = Vec::new();
        let names = ["a", "b"];
        let run = PartState::Running;
        let r = judge(&mut seen, &names, &[(0, run), (0, run)], t0, 3 * S, false);
        assert!(r.healthy());
        // b keeps beating, a does not.
        let r = judge(
            &mut seen,
            &names,
            &[(0, run), (5, run)],
            t0 + 2 * S,
            3 * S,
            false,
        );
        assert!(r.healthy(), "{r:?}");
        let r = judge(
            &mut seen,
            &names,
            &[(0, run), (9, run)],
            t0 + 4 * S,
            3 * S,
            false,
        );
        assert_eq!(
            r.stuck,
            vec![StuckPart {
                name: "a".into(),
                silent_for: 4 * S
            }]
        );
        assert_eq!(r.problem().unwrap(), "stuck: a (4s without progress)");
        // One beat clears it.
        let r = judge(
            &mut seen,
            &names,
            &[(1, run), (9, run)],
            t0 + 5 * S,
            3 * S,
            false,
        );
        assert!(r.healthy());
        // b stopped beating at 4 s (its count last changed then): stuck after 7 s.
        let r = judge(
            &mut seen,
            &names,
            &[(1, run), (9, run)],
            t0 + 7 * S,
            3 * S,
            false,
        );
        assert!(r.healthy());
        let r = judge(
            &mut seen,
            &names,
            &[(2, run), (9, run)],
            t0 + 7 * S + S / 2,
            3 * S,
            false,
        );
        assert_eq!(r.stuck.len(), 1);
        assert_eq!(r.stuck[0].name, "b");
    }

    #[test]
    fn idle_parts_and_shutdown_are_not_stuck() {
        let t0 = Instant::now();
        let mut seen = Vec::new();
        let names = ["follower", "worker"];
        let idle = PartState::Idle {
            reason: "resolving upstream DNS",
            since: t0,
        };
        judge(
            &mut seen,
            &names,
            &[(0, idle), (0, PartState::Running)],
            t0,
            3 * S,
            false,
        );
        let r = judge(
            &mut seen,
            &names,
            &[(0, idle), (0, PartState::Exited)],
            t0 + 60 * S,
            3 * S,
            false,
        );
        assert!(r.healthy());
        assert_eq!(r.idle[0].idle_for, 60 * S);
        assert_eq!(r.exited, vec!["worker".to_owned()]);
        assert_eq!(
            r.idle_summary().unwrap(),
            "waiting: follower resolving upstream DNS (60s)"
        );
        let r = judge(
            &mut seen,
            &names,
            &[(0, PartState::Running), (0, PartState::Running)],
            t0 + 70 * S,
            3 * S,
            true,
        );
        assert!(r.healthy(), "nothing is stuck once shutdown started");
    }

    #[test]
    fn watchdog_threshold_is_half_the_timeout_within_bounds() {
        let f = Liveness::stuck_after_for_watchdog;
        assert_eq!(f(None), DEFAULT_STUCK_AFTER);
        assert_eq!(f(Some(30 * S)), DEFAULT_STUCK_AFTER);
        assert_eq!(f(Some(12 * S)), 6 * S);
        assert_eq!(f(Some(2 * S)), MIN_STUCK_AFTER);
    }

    #[test]
    fn beats_and_idle_guards_are_seen_by_the_checker() {
        let liveness = Arc::new(Liveness::new(Duration::from_millis(300)));
        // Commands in, an acknowledgement out once each has taken effect: the checks below
        // never depend on how soon the thread is scheduled.
        let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
        let h = spawn_critical(&liveness, "t-beats", move || {
            for cmd in rx.iter() {
                match cmd {
                    "beat" => beat(),
                    "idle" => {
                        let guard = idle("test wait");
                        let _ = ack_tx.send(());
                        let _ = rx.recv(); // "release"
                        drop(guard);
                    }
                    _ => break,
                }
                let _ = ack_tx.send(());
            }
            Ok::<(), String>(())
        })
        .unwrap();
        let ack = || ack_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(liveness.check().healthy());
        std::thread::sleep(Duration::from_millis(400));
        let r = liveness.check();
        assert_eq!(r.stuck.len(), 1, "{r:?}");
        tx.send("beat").unwrap();
        ack();
        assert!(liveness.check().healthy());
        tx.send("idle").unwrap();
        ack(); // the guard is held
        std::thread::sleep(Duration::from_millis(400));
        let r = liveness.check();
        assert!(r.healthy(), "idle with a reason: {r:?}");
        assert_eq!(r.idle.len(), 1);
        tx.send("release").unwrap();
        ack(); // the guard is dropped
        // The guard's drop counts as progress.
        assert!(liveness.check().healthy());
        liveness.stop();
        tx.send("end").unwrap();
        h.join().unwrap();
        assert_eq!(liveness.check().exited, vec!["t-beats".to_owned()]);
    }

    #[test]
    fn beat_outside_a_part_is_a_no_op() {
        beat();
        drop(idle("nothing"));
    }

    #[test]
    fn panic_messages_are_extracted() {
        assert_eq!(panic_message(&"x"), "x");
        assert_eq!(panic_message(&String::from("y")), "y");
        assert_eq!(panic_message(&5u8), "(non-string panic payload)");
    }
}
