//! Twins of the NixOS VM tests (vm-tests/*.nix): the same binaries and the same swarm
//! `--expect…` assertions, hosted on this machine instead of in VMs. Each twin is where its
//! scenario is debugged; the VM test only re-hosts it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// vm-tests/basic.nix: ≥ 5,000 clients get every event in order; cursor replay works; the
/// relay restarts mid-stream and clients that reconnect with their cursor see no gap.
/// (`scale_`: needs ~11,000 fds across the processes; the Nix sandbox skips it.)
#[test]
fn scale_twin_basic_5000_clients_replay_and_restart() {
    let mock = Mock::start(100, &[]);
    let dir = temp_dir("twin-basic");
    let mut relay = Relay::start(&mock.url(), &dir, &[]);
    let port = relay.port;
    swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "5000",
        "--processes",
        "2",
        "--duration",
        "15s",
        "--expect-connected",
        "5000",
        "--expect-in-order",
        "--expect-min-events",
        "1000",
    ]);
    // Cursor replay from the beginning: every client starts at seq 0.
    swarm_ok(&[
        "--url",
        &relay.url("cursor=1"),
        "--clients",
        "200",
        "--duration",
        "5s",
        "--expect-in-order",
        "--expect-first-seq",
        "0",
        "--expect-min-events",
        "1500",
    ]);
    // Restart mid-stream: reconnecting clients resume with their cursor, no gap.
    let clients = swarm_spawn(&[
        "--url",
        &relay.url(""),
        "--clients",
        "2000",
        "--duration",
        "20s",
        "--reconnect",
        "--expect-in-order",
        "--expect-min-events",
        "1500",
    ]);
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        relay.proc.terminate(Duration::from_secs(15)),
        "graceful stop"
    );
    let relay = Relay::start_on(port, &mock.url(), &dir, &[]);
    let report = swarm_wait(clients);
    assert!(
        report["closes"]["1001"].as_u64().unwrap_or(0) >= 1,
        "clients saw the going-away close: {report}"
    );
    drop(relay);
}

fn haproxy_available() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// vm-tests/fleet.nix: two relays follow one upstream behind HAProxy (TCP mode, PROXY v2 to
/// the relays' trusted listeners); one relay is stopped and its clients reconnect through
/// HAProxy with their cursor to the other and see no gap. Also a relay following a relay.
#[test]
fn twin_fleet_haproxy_failover_and_chain() {
    assert!(
        haproxy_available(),
        "haproxy is required for this test: apt-get install haproxy (.ci/run installs it)"
    );
    let mock = Mock::start(200, &[]);
    let (d1, d2, d3) = (temp_dir("fleet1"), temp_dir("fleet2"), temp_dir("fleet3"));
    let (t1, t2) = (free_port(), free_port());
    let mut r1 = Relay::start(
        &mock.url(),
        &d1,
        &["--trusted-listen", &format!("127.0.0.1:{t1}")],
    );
    let r2 = Relay::start(
        &mock.url(),
        &d2,
        &["--trusted-listen", &format!("127.0.0.1:{t2}")],
    );
    let lb_port = free_port();
    let cfg = d1.with_extension("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  retries 3\n  option redispatch\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n\
frontend fe\n  bind 127.0.0.1:{lb_port}\n  default_backend relays\n\
backend relays\n  balance roundrobin\n  server r1 127.0.0.1:{t1} send-proxy-v2 check inter 500ms fall 1 rise 2\n  server r2 127.0.0.1:{t2} send-proxy-v2 check inter 500ms fall 1 rise 2\n"
        ),
    )
    .unwrap();
    let _lb = Proc {
        child: Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy"),
        name: "haproxy".into(),
    };
    wait_for_port(lb_port, Duration::from_secs(10));
    // A relay following relay 2 (a chain).
    let chain = Relay::start(
        &format!("ws://127.0.0.1:{}/subscribe?cursor=0", r2.port),
        &d3,
        &[],
    );
    std::thread::sleep(Duration::from_secs(1));
    let lb_url = format!("ws://127.0.0.1:{lb_port}/subscribe");
    let through_lb = swarm_spawn(&[
        "--url",
        &lb_url,
        "--clients",
        "200",
        "--duration",
        "16s",
        "--reconnect",
        "--expect-in-order",
        "--expect-min-events",
        "2000",
    ]);
    let on_chain = swarm_spawn(&[
        "--url",
        &chain.url(""),
        "--clients",
        "50",
        "--duration",
        "16s",
        "--expect-in-order",
        "--expect-min-events",
        "2000",
    ]);
    std::thread::sleep(Duration::from_secs(6));
    // Relay 1 goes away: its clients reconnect through HAProxy to relay 2 with their cursor.
    assert!(r1.proc.terminate(Duration::from_secs(15)));
    let lb_report = swarm_wait(through_lb);
    swarm_wait(on_chain);
    assert!(
        lb_report["closes"]["1001"].as_u64().unwrap_or(0) > 0,
        "some clients were on relay 1: {lb_report}"
    );
    // Relay 2 saw real client addresses through PROXY v2.
    assert!(
        r2.log_text().contains("peer=127.0.0.1:"),
        "real peers logged"
    );
}

/// vm-tests/hardening.nix: the relay under its unit's sandbox still serves every event in
/// order through io_uring, and the sandbox is really in force on the running process.
/// Without systemd here, tests/sandbox/run-sandboxed.py applies the unit's process-level
/// settings (seccomp from systemd's own @system-service/~@privileged/~@resources lists with
/// EPERM, no capabilities in any set, NoNewPrivileges, an unprivileged user); the unit's
/// `systemd-analyze security` score is checked offline by .ci/nix-check on the unit the
/// module renders. Needs root (to drop to another user) and Debian's python3-seccomp.
#[test]
fn twin_hardening_sandboxed_relay_serves_with_io_uring() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the hardening twin drops from root to an unprivileged user: run the suite as root"
    );
    const NOBODY: u32 = 65534;
    let mock = Mock::start(200, &[]);
    let dir = temp_dir("twin-hardening");
    let owner = Some(rustix::fs::Uid::from_raw(NOBODY));
    let group = Some(rustix::fs::Gid::from_raw(NOBODY));
    rustix::fs::chown(&dir, owner, group).expect("chown the data dir");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sandbox/run-sandboxed.py"
    );
    let wrapper: Vec<String> = vec![
        "/usr/bin/python3".into(),
        script.into(),
        NOBODY.to_string(),
        NOBODY.to_string(),
    ];
    let relay = Relay::start_via(&wrapper, free_port(), &mock.url(), &dir, &[]);

    // The sandbox is in force on the running relay (the wrapper exec'd it: same pid).
    let pid = relay.proc.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for (field, want) in [
        ("Seccomp:", "2"),
        ("NoNewPrivs:", "1"),
        ("CapEff:", "0000000000000000"),
        ("CapPrm:", "0000000000000000"),
        ("CapBnd:", "0000000000000000"),
        ("CapAmb:", "0000000000000000"),
    ] {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim);
        assert_eq!(got, Some(want), "{field} in\n{status}");
    }
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );

    // io_uring fan-out works inside it: every event, in order, byte-exact.
    let rate = 200;
    swarm_ok(&[
        "--url",
        &relay.url(""),
        "--clients",
        "50",
        "--duration",
        "6s",
        "--expect-in-order",
        "--expect-min-events",
        &(4 * rate).to_string(),
    ]);
    let log = relay.log_text();
    assert!(!log.contains("Operation not permitted"), "{log}");
}
