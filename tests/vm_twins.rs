//! Twins of the NixOS VM tests (vm-tests/*.nix): the same binaries and the same swarm
//! `--expect…` assertions, hosted on this machine instead of in VMs. Each twin is where its
//! scenario is debugged; the VM test only re-hosts it.
//!
//! Configuration-exact: a twin runs each relay as its unit does (`--config` with the TOML
//! file nixos/module.nix generates for that VM test's node, `STATE_DIRECTORY` for the data)
//! and HAProxy with the configuration text vm-tests/fleet.nix gives it, evaluated with the
//! real module system (nix/eval, `nix-instantiate` from Debian's nix-bin). The one change
//! is addressing, as a VM's /etc/hosts and its own address would do it: node names and
//! wildcard listen addresses become loopback addresses of this host (127.X.Y.N, X.Y
//! picked per run so that concurrent runs do not collide), ports stay as configured.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// What the Nix files deploy: `nix-instantiate` on nix/eval, with a throwaway store that
/// the generated files (the relay's TOML) are read back from.
struct NixEval {
    /// The `--store` of the evaluations.
    store: TempDir,
}

impl NixEval {
    fn new(tag: &str) -> NixEval {
        NixEval {
            store: temp_dir(&format!("nix-eval-{tag}")),
        }
    }

    /// JSON of `expr`, in which `e` is nix/eval and `common` vm-tests/common.nix.
    fn eval(&self, expr: &str) -> serde_json::Value {
        let repo = env!("CARGO_MANIFEST_DIR");
        let full = format!(
            "let e = import {repo}/nix/eval {{ }}; \
             common = import {repo}/vm-tests/common.nix {{ inherit (e) pkgs; jetrelay = e.pkgs.jetrelay; }}; \
             in {expr}"
        );
        let out = Command::new("nix-instantiate")
            .args(["--read-write-mode", "--store"])
            .arg(&self.store)
            .args(["--option", "build-users-group", ""])
            .args(["--eval", "--strict", "--json", "-E", &full])
            .output()
            .expect("nix-instantiate (Debian: apt-get install nix-bin; .ci/run installs it)");
        assert!(
            out.status.success(),
            "evaluating {expr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON from nix-instantiate")
    }

    /// The relay TOML a VM test node's jetrelay.service runs with (the `--config` file of
    /// its ExecStart), as text.
    fn relay_toml(&self, test: &str, node: &str) -> String {
        let exec = self.eval(&format!(
            "e.vmTests.{test}.nodes.{node}.config.systemd.services.jetrelay.serviceConfig.ExecStart"
        ));
        let exec = exec.as_str().expect("ExecStart");
        let (_, file) = exec
            .rsplit_once(" --config ")
            .expect("--config in ExecStart");
        std::fs::read_to_string(self.store.join(file.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    }
}

/// Node name → loopback address on this host, and the rewriting a VM's /etc/hosts and its
/// own address would do.
struct Hosts {
    /// (node name, address), longest names first so that `relay1` is not taken for `relay`.
    nodes: Vec<(String, Ipv4Addr)>,
}

impl Hosts {
    fn new(names: &[&str]) -> Hosts {
        // 127.X.Y.N with X.Y from the process id: concurrent runs use different addresses.
        let pid = std::process::id();
        let (x, y) = ((pid >> 8) % 200 + 20, pid % 250 + 1);
        let mut nodes: Vec<(String, Ipv4Addr)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.to_string(),
                    Ipv4Addr::new(127, x as u8, y as u8, i as u8 + 1),
                )
            })
            .collect();
        nodes.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        Hosts { nodes }
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.nodes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ip)| *ip)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `text` as node `on` sees it: `name:` → `address:` for every node, and the wildcard
    /// addresses `[::]`, `:::` (HAProxy's), `0.0.0.0` and the node's loopback `127.0.0.1`
    /// → the node's own address.
    fn map(&self, text: &str, on: &str) -> String {
        let own = self.ip(on).to_string();
        let mut out = text
            .replace("[::]:", &format!("{own}:"))
            .replace(":::", &format!("{own}:"))
            .replace("0.0.0.0:", &format!("{own}:"))
            // Each VM has a loopback of its own.
            .replace("127.0.0.1:", &format!("{own}:"))
            // HAProxy's `v4v6` makes sense only on an IPv6 wildcard.
            .replace(" v4v6", "");
        for (name, ip) in &self.nodes {
            for sep in ["//", " ", "\""] {
                out = out.replace(&format!("{sep}{name}:"), &format!("{sep}{ip}:"));
            }
        }
        out
    }
}

/// A relay as its unit runs it: `jetrelay --config FILE`, data in `$STATE_DIRECTORY`, and
/// nothing else on the command line. Returns once `listen` accepts connections.
fn relay_as_unit(name: &str, toml: &str, dir: &Path, listen: SocketAddr) -> Proc {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let config = dir.join("jetrelay.toml");
    std::fs::write(&config, toml).expect("write the TOML");
    let log = std::fs::File::create(dir.join("relay.log")).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jetrelay"));
    cmd.arg("--config")
        .arg(&config)
        .env("STATE_DIRECTORY", &state)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // As under systemd: no JETRELAY_* settings from the environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("JETRELAY_") {
            cmd.env_remove(k);
        }
    }
    let proc = Proc {
        child: cmd.spawn().expect("spawn jetrelay"),
        name: name.into(),
    };
    wait_for_addr(listen, Duration::from_secs(20));
    proc
}

fn wait_for_addr(addr: SocketAddr, within: Duration) {
    wait_until(&format!("{addr} to accept"), within, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
}

/// vm-tests/basic.nix: ≥ 5,000 clients get every event in order; cursor replay works; the
/// relay restarts mid-stream and clients that reconnect with their cursor see no gap. The
/// relay runs with the TOML the module generates for vm-basic's relay node; the load is the
/// twin's own (100 ev/s, 5,000 clients: more than the VM test network carries).
/// (`scale_`: needs ~11,000 fds across the processes; the Nix sandbox skips it.)
#[test]
fn scale_twin_basic_5000_clients_replay_and_restart() {
    let nix = NixEval::new("basic");
    let hosts = Hosts::new(&["relay", "upstream"]);
    let mock_port = nix.eval("common.mockPort").as_u64().expect("mockPort");
    let seed = nix.eval("common.seed").to_string();
    // The swarm helpers regenerate events from seed 7.
    assert_eq!(seed, "7", "vm-tests/common.nix's seed");
    let mock = Proc {
        child: Command::new(env!("CARGO_BIN_EXE_jetrelay-mock"))
            .args(["--listen", &format!("{}:{mock_port}", hosts.ip("upstream"))])
            .args(["--rate", "100", "--seed", &seed])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock"),
        name: "mock".into(),
    };
    wait_for_addr(
        SocketAddr::from((hosts.ip("upstream"), mock_port as u16)),
        Duration::from_secs(10),
    );
    let toml = hosts.map(&nix.relay_toml("basic", "relay"), "relay");
    let dir = temp_dir("twin-basic");
    let listen = SocketAddr::from((hosts.ip("relay"), 6008));
    let mut relay = relay_as_unit("relay", &toml, &dir, listen);
    let url = |query: &str| format!("ws://{listen}/subscribe{query}");
    swarm_ok(&[
        "--url",
        &url(""),
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
    // Cursor replay from before the first event: every client gets all of the relay's log
    // (it joined the mock live, so its first event is not seq 0), then live events.
    swarm_ok(&[
        "--url",
        &url("?cursor=1"),
        "--clients",
        "200",
        "--duration",
        "5s",
        "--expect-in-order",
        "--expect-min-events",
        "1500",
    ]);
    // Restart mid-stream: reconnecting clients resume with their cursor, no gap.
    let clients = swarm_spawn(&[
        "--url",
        &url(""),
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
    assert!(relay.terminate(Duration::from_secs(15)), "graceful stop");
    let relay = relay_as_unit("relay", &toml, &dir, listen);
    let report = swarm_wait(clients);
    assert!(
        report["closes"]["1001"].as_u64().unwrap_or(0) >= 1,
        "clients saw the going-away close: {report}"
    );
    drop((relay, mock));
    let _ = std::fs::remove_dir_all(&dir);
}

fn haproxy_available() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The backends HAProxy reports UP, from `show stat` on its stats socket.
fn haproxy_up(socket: &Path) -> Vec<String> {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return Vec::new();
    };
    let _ = s.write_all(b"show stat\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .map(|row| row.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > 17 && f[0] == "relays" && f[1] != "BACKEND" && f[17] == "UP")
        .map(|f| f[1].to_string())
        .collect()
}

/// The command line of a unit's ExecStart, split as systemd splits it (words, '…' quotes).
/// The value of `name` (a metric without labels) on the metrics listener at `at`.
fn metric(at: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn exec_words(exec: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = exec.trim();
    while !rest.is_empty() {
        let (word, tail) = match rest.strip_prefix('\'') {
            Some(quoted) => quoted.split_once('\'').expect("closing quote"),
            None => rest.split_once(' ').unwrap_or((rest, "")),
        };
        words.push(word.to_string());
        rest = tail.trim_start();
    }
    words
}

/// vm-tests/fleet.nix: two relays follow one upstream behind HAProxy run with the
/// configuration fleet.nix gives the lb node — TCP mode, PROXY v2 to the relays' trusted
/// listeners, and an HTTP health check of `/readyz` on their metrics listeners that speaks
/// HTTP/1.0 (no `ver` in `http-check send`). Both backends must come up through that check;
/// then relay1 stops, HAProxy marks it down, and its clients reconnect through HAProxy with
/// their cursor to relay2 and see no gap. The edge relay follows relay1, then relay2. Every
/// relay runs with its node's TOML from the module, the mock with its unit's command line.
#[test]
fn twin_fleet_haproxy_failover_and_chain() {
    assert!(
        haproxy_available(),
        "haproxy is required for this test: apt-get install haproxy (.ci/run installs it)"
    );
    let nix = NixEval::new("fleet");
    let hosts = Hosts::new(&["upstream", "relay1", "relay2", "edge", "lb"]);
    assert_eq!(nix.eval("common.seed").to_string(), "7", "the swarm's seed");
    let rate = nix.eval("common.rate").as_u64().expect("rate");
    let dir = temp_dir("twin-fleet");

    // The upstream node's jetrelay-mock.service, as its ExecStart says.
    let exec = nix.eval(
        "e.vmTests.fleet.nodes.upstream.config.systemd.services.jetrelay-mock.serviceConfig.ExecStart",
    );
    let words = exec_words(&hosts.map(exec.as_str().expect("ExecStart"), "upstream"));
    let mock = Proc {
        child: Command::new(env!("CARGO_BIN_EXE_jetrelay-mock"))
            .args(&words[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mock"),
        name: "mock".into(),
    };
    let mock_port = nix.eval("common.mockPort").as_u64().expect("mockPort") as u16;
    wait_for_addr(
        SocketAddr::from((hosts.ip("upstream"), mock_port)),
        Duration::from_secs(10),
    );

    let start = |node: &str| {
        let toml = hosts.map(&nix.relay_toml("fleet", node), node);
        let node_dir = dir.join(node);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        relay_as_unit(
            node,
            &toml,
            &node_dir,
            SocketAddr::from((hosts.ip(node), 6008)),
        )
    };
    // As fleet.nix orders them: relay2 starts once edge has appended an event, so that
    // edge's history begins before relay2's (the other order makes edge append, at
    // failover, events it never had after its newer ones).
    let mut relay1 = start("relay1");
    let edge = start("edge");
    let edge_metrics = SocketAddr::from((hosts.ip("edge"), 6009));
    wait_until("edge appends an event", Duration::from_secs(20), || {
        metric(edge_metrics, "jetrelay_upstream_events_appended_total").unwrap_or(0.0) > 0.0
    });
    let relay2 = start("relay2");

    let lb_config = nix.eval("e.vmTests.fleet.nodes.lb.config.services.haproxy.config");
    let stats = dir.join("haproxy.sock");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4000\n  stats socket {} mode 600 level admin\n{}",
            stats.display(),
            hosts.map(lb_config.as_str().expect("haproxy config"), "lb")
        ),
    )
    .expect("haproxy.cfg");
    let _lb = Proc {
        child: Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).expect("log"))
            .spawn()
            .expect("haproxy"),
        name: "haproxy".into(),
    };
    let lb = SocketAddr::from((hosts.ip("lb"), 8080));
    wait_for_addr(lb, Duration::from_secs(10));
    // Up only if /readyz answered HAProxy's HTTP/1.0 check with 200 (twice: rise 2).
    wait_until("both relays UP in HAProxy", Duration::from_secs(20), || {
        haproxy_up(&stats).len() == 2
    });

    let min_events = (10 * rate).to_string();
    let lb_url = format!("ws://{lb}/subscribe");
    let through_lb = swarm_spawn(&[
        "--url",
        &lb_url,
        "--clients",
        "200",
        "--duration",
        "20s",
        "--reconnect",
        "--expect-in-order",
        "--expect-min-events",
        &min_events,
    ]);
    let edge_url = format!("ws://{}:6008/subscribe", hosts.ip("edge"));
    let on_edge = swarm_spawn(&[
        "--url",
        &edge_url,
        "--clients",
        "50",
        "--duration",
        "20s",
        "--expect-in-order",
        "--expect-min-events",
        &min_events,
    ]);
    std::thread::sleep(Duration::from_secs(6));
    // relay1 goes away: HAProxy's check takes it out, its clients come back through HAProxy
    // to relay2 with their cursor, and edge fails over to relay2.
    assert!(relay1.terminate(Duration::from_secs(15)));
    wait_until("relay1 DOWN in HAProxy", Duration::from_secs(10), || {
        haproxy_up(&stats) == ["relay2"]
    });
    let lb_report = swarm_wait(through_lb);
    swarm_wait(on_edge);
    assert!(
        lb_report["closes"]["1001"].as_u64().unwrap_or(0) > 0,
        "some clients were on relay1: {lb_report}"
    );
    // relay2 took connections through PROXY v2 and logged the clients' addresses.
    let log = std::fs::read_to_string(dir.join("relay2/relay.log")).unwrap_or_default();
    assert!(log.contains("peer=127.0.0.1:"), "real peers logged");
    drop((relay2, edge, mock));
    let _ = std::fs::remove_dir_all(&dir);
}

/// vm-tests/hardening.nix: the relay under its unit's sandbox still serves every event in
/// order through io_uring, and the sandbox is really in force on the running process.
/// Without systemd here, tests/sandbox/run-sandboxed.py applies the unit's process-level
/// settings (seccomp from systemd's own @system-service/~@privileged/~@resources lists with
/// EPERM, no capabilities in any set, NoNewPrivileges, an unprivileged user); the unit's
/// `systemd-analyze security` score is checked offline by .ci/nix-check on the unit the
/// module renders, and the real unit runs under systemd in .ci/nixos-guest. The relay reads
/// the module's TOML for the node. Needs root (to drop to another user) and Debian's
/// python3-seccomp.
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
    rustix::fs::chown(dir.path(), owner, group).expect("chown the data dir");
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
    // The hardening node's TOML from the module; the flags start_via adds (listen
    // addresses, data dir, upstream) take precedence over the file.
    let nix = NixEval::new("hardening");
    let hosts = Hosts::new(&["relay", "upstream"]);
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        hosts.map(&nix.relay_toml("hardening", "relay"), "relay"),
    )
    .expect("write the TOML");
    let relay = Relay::start_via(
        &wrapper,
        free_port(),
        &mock.url(),
        &dir,
        &["--config", &config.display().to_string()],
    );

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
