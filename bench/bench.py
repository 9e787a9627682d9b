#!/usr/bin/env python3
"""jetrelay benchmark: mock upstream -> relay (pinned to core 0) -> swarm (core 1).

Prints, per scenario: relay CPU %, relay CPU-seconds per GB delivered (in all, and for serving
alone: minus the CPU of an `idle-…` row at the same rate earlier in the run), delivered Gbps, latency
p50/p99/max (receive time - time_us, measured by the swarm), clients behind, relay RSS and open
fds per client; plus `iperf3 -Z` (one stream, same pinning) as the physical reference for one
core's throughput, and `floor-…` rows (examples/latency_floor.rs: a bare sender and receiver
doing only the kernel's part of live fan-out) as the latency reference at the same loads. Every
scenario runs the swarm with byte-exact, in-order verification: a figure from a run whose
clients did not receive every event in order is marked FAILED.

The `v2-…` rows read the same stream from `/xrpc/network.bsky.jetstream.subscribeEvents` (Jetstream
v2 framing) next to their v1 twins and print CPU per GB against them; they are skipped, saying
so, while the relay answers 404 there.

Usage:  cargo build --release --bins --examples && python3 bench/bench.py [--only NAME ...] [--json FILE]
It is a benchmark, not a test: absolute numbers depend on the machine; compare ratios from one
run (e.g. before/after a data-path change).
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release")
SEED = "7"
RELAY_CORE = "0"
LOAD_CORE = "1"
V1_PATH = "/subscribe"
V2_PATH = "/xrpc/network.bsky.jetstream.subscribeEvents"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, within=20.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def relay_latency(port):
    """The relay's own delivery-latency histogram (append -> handed to the socket)."""
    if not port:
        return None
    try:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=5) as r:
            st = json.loads(r.read())
        return (st["latency_bounds_us"], st["latency_counts"], st["bytes_delivered"],
                st.get("data_sends", 0))
    except Exception:  # noqa: BLE001 — metrics off or unreachable: no relay-side figure
        return None


def quantile_us(bounds, counts, q):
    """Upper bound of the bucket holding quantile q (power-of-two buckets: a ceiling)."""
    total = sum(counts)
    if total == 0:
        return None
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= q * total:
            return bounds[i] if i < len(bounds) else float("inf")
    return None


def upgrade_status(port, path):
    """HTTP status the server answers a WebSocket upgrade to `path` with (101 = served)."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        head = s.recv(1024).decode("latin-1")
    try:
        return int(head.split()[1])
    except (IndexError, ValueError):
        return None


def pinned(core, args, **kw):
    return subprocess.Popen(["taskset", "-c", core] + args, **kw)


class Scenario:
    def __init__(self, name, clients, rate, queries=("",), duration=15, processes=1,
                 relay_args=(), warmup=None, prefill=0, swarm_args=(), sidecar=False,
                 exempt_loopback=True, path=V1_PATH):
        self.name, self.clients, self.rate = name, clients, rate
        # The endpoint the clients read: V1_PATH or V2_PATH (the swarm picks the wire by it).
        self.path = path
        self.queries, self.duration, self.processes = list(queries), duration, processes
        self.relay_args, self.prefill, self.swarm_args = list(relay_args), prefill, list(swarm_args)
        self.sidecar = sidecar
        # Loopback is on the allow list (no per-IP limits) unless a scenario measures them.
        self.exempt_loopback = exempt_loopback
        # Time for all clients to connect before measuring.
        self.warmup = warmup if warmup is not None else 2 + clients / 2000
        # The relay binary (another build, for A/B runs with --relay-bin).
        self.relay_bin = os.path.join(BIN, "jetrelay")


def run(sc, log):
    data = tempfile.mkdtemp(prefix="jetrelay-bench-")
    mport, rport, metrics_port = free_port(), free_port(), free_port()
    if "--metrics-listen" in sc.relay_args:
        metrics_port = None
    procs = []
    try:
        mock_args = [os.path.join(BIN, "jetrelay-mock"), "--listen", f"127.0.0.1:{mport}",
                     "--rate", str(sc.rate), "--seed", SEED]
        if sc.prefill:
            mock_args += ["--count", str(sc.prefill)]
        mock = pinned(LOAD_CORE, mock_args, stdout=log, stderr=log)
        procs.append(mock)
        wait_port(mport)
        relay = pinned(RELAY_CORE, [
            sc.relay_bin, "--listen", f"127.0.0.1:{rport}",
            "--upstream", f"ws://127.0.0.1:{mport}/subscribe?cursor=0", "--data-dir", data,
            "--workers", "1",
        ] + (["--allow-ip", "127.0.0.0/8", "--max-clients", "1000000"] if sc.exempt_loopback else []) + (["--metrics-listen", f"127.0.0.1:{metrics_port}"] if metrics_port else [])
          + sc.relay_args, stdout=log, stderr=log)
        procs.append(relay)
        wait_port(rport)
        if sc.path != V1_PATH:
            status = upgrade_status(rport, sc.path)
            if status == 404:
                return {"scenario": sc.name, "clients": sc.clients, "rate": sc.rate,
                        "passed": None,
                        "skipped": f"the relay answers 404 on {sc.path} (no Jetstream v2 yet)"}
        if sc.prefill:
            # Wait until the relay has appended the whole prefill.
            deadline = time.time() + 120
            last, stable = -1, 0
            while time.time() < deadline and stable < 3:
                size = os.path.getsize(os.path.join(data, "plain.log"))
                stable = stable + 1 if size == last else 0
                last = size
                time.sleep(0.5)
        if sc.clients == 0:
            # The fixed cost of following the upstream (parse, compress once, append; a worker
            # without clients is not woken) with nobody to serve: what `serve_cpu_s_per_gb`
            # subtracts.
            time.sleep(sc.warmup)
            c0, t0 = cpu_seconds(relay.pid), time.time()
            time.sleep(max(1.0, sc.duration - sc.warmup))
            c1, t1 = cpu_seconds(relay.pid), time.time()
            return {"scenario": sc.name, "clients": 0, "rate": sc.rate, "passed": True,
                    "relay_cpu_pct": round((c1 - c0) / (t1 - t0) * 100, 1),
                    "rss_mib": round(rss_kib(relay.pid) / 1024, 1)}
        urls = []
        for q in sc.queries:
            urls += ["--url", f"ws://127.0.0.1:{rport}{sc.path}" + (f"?{q}" if q else "")]
        swarm = pinned(LOAD_CORE, [
            os.path.join(BIN, "jetrelay-swarm"), *urls, "--clients", str(sc.clients),
            "--processes", str(sc.processes), "--duration", f"{sc.duration}s", "--seed", SEED,
            "--json", "--expect-in-order", "--connect-rate", "5000", *sc.swarm_args,
        ], stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(swarm)
        time.sleep(sc.warmup)
        h0 = relay_latency(metrics_port)
        c0, t0 = cpu_seconds(relay.pid), time.time()
        window = max(1.0, sc.duration - sc.warmup - 1.5)
        time.sleep(window)
        c1, t1 = cpu_seconds(relay.pid), time.time()
        rss, nfd = rss_kib(relay.pid), fds(relay.pid)
        h1 = relay_latency(metrics_port)
        relay_p50 = relay_p99 = window_gbps = bytes_per_send = None
        if h0 and h1:
            # Bytes the relay handed to sockets during the CPU window: the throughput figure
            # that matches the CPU figure (the swarm's own averages over its whole run).
            window_gbps = (h1[2] - h0[2]) * 8 / (t1 - t0) / 1e9
            delta = [b - a for a, b in zip(h0[1], h1[1])]
            relay_p50 = quantile_us(h1[0], delta, 0.5)
            relay_p99 = quantile_us(h1[0], delta, 0.99)
            if h1[3] > h0[3]:
                # Batching: payload bytes per data send (a send costs nearly the same at any
                # size here, so this is what sets CPU per byte).
                bytes_per_send = round((h1[2] - h0[2]) / (h1[3] - h0[3]))
        out, _ = swarm.communicate(timeout=sc.duration + 120)
        report = json.loads(out.strip().splitlines()[-1])
        cpu = (c1 - c0) / (t1 - t0)
        gbps = report["gbps"]
        gb_per_s = gbps / 8
        lat = report["latency"]
        return {
            "scenario": sc.name,
            "clients": sc.clients,
            "rate": sc.rate,
            "passed": report["passed"] and report["connected"] == sc.clients,
            "connected": report["connected"],
            "relay_cpu_pct": round(cpu * 100, 1),
            "cpu_s_per_gb": (round(cpu / (window_gbps / 8), 3) if window_gbps
                             else round(cpu / gb_per_s, 3) if gb_per_s > 0 else None),
            "gbps": round(gbps, 3),
            "window_gbps": round(window_gbps, 3) if window_gbps is not None else None,
            "p50_ms": lat["p50_us"] / 1000,
            "p99_ms": lat["p99_us"] / 1000,
            "max_ms": lat["max_us"] / 1000,
            "relay_p50_le_ms": relay_p50 / 1000 if relay_p50 is not None else None,
            "relay_p99_le_ms": relay_p99 / 1000 if relay_p99 is not None else None,
            "bytes_per_send": bytes_per_send,
            "swarm_busy_pct": report.get("busy_pct"),
            "clients_behind": report["clients_behind"],
            "rss_mib": round(rss / 1024, 1),
            "fds_per_client": round(nfd / sc.clients, 3),
            "rss_per_client_kib": round(rss / sc.clients, 2),
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rm", "-rf", data])


class Floor:
    """Not the relay: examples/latency_floor, a bare sender (core 0) → receiver (core 1) doing
    only the kernel's part of live fan-out. Its latency is the floor for any design at that
    load; its `relay_cpu_pct` is the bare sender's CPU."""

    def __init__(self, clients, rate):
        self.clients, self.rate = clients, rate


def floor(fl, secs=8):
    clients, rate = fl.clients, fl.rate
    exe = os.path.join(BIN, "examples", "latency_floor")
    out = subprocess.run([exe, str(clients), str(rate), str(secs)], capture_output=True,
                         text=True, timeout=secs + 60)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "scenario": f"floor-{clients}x{rate}",
        "clients": clients,
        "rate": rate,
        "passed": r["complete"],
        "relay_cpu_pct": round(r["sender_cpu_pct"], 1),
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "max_ms": r["max_ms"],
        "us_per_send": round(r["us_per_send"], 2),
    }


def iperf3():
    port = free_port()
    srv = pinned(LOAD_CORE, ["iperf3", "-s", "-1", "-p", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = subprocess.run(["taskset", "-c", RELAY_CORE, "iperf3", "-c", "127.0.0.1", "-p",
                              str(port), "-Z", "-t", "5", "-J"], capture_output=True, text=True,
                             timeout=30).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    except Exception as e:  # noqa: BLE001 — a missing iperf3 must not hide the other figures
        print(f"iperf3 failed: {e}", file=sys.stderr)
        return None
    finally:
        srv.kill()


POPULAR = ["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.feed.repost",
           "app.bsky.graph.follow", "app.bsky.graph.*", "app.bsky.feed.*",
           "app.bsky.feed.post&compress=true", "app.bsky.feed.like&maxMessageSizeBytes=600",
           "app.bsky.actor.profile", "app.bsky.feed.post,app.bsky.feed.repost"]


def shape_queries():
    qs = []
    for p in POPULAR:
        base, _, extra = p.partition("&")
        cols = "&".join(f"wantedCollections={c}" for c in base.split(","))
        qs.append(cols + (f"&{extra}" if extra else ""))
    return qs


def did_queries(n_filters, per_filter):
    # DIDs the mock generates (seed 7, its default population).
    sys.path.insert(0, os.path.dirname(__file__))
    out = subprocess.run([os.path.join(BIN, "jetrelay-mock"), "--print-dids",
                          str(n_filters * per_filter), "--seed", SEED],
                         capture_output=True, text=True)
    dids = out.stdout.split()
    if len(dids) < n_filters * per_filter:
        return None
    return ["&".join(f"wantedDids={d}" for d in dids[i * per_filter:(i + 1) * per_filter])
            for i in range(n_filters)]


SCENARIOS = {
    "floor-1000x500": lambda: Floor(1000, 500),
    "floor-100x50": lambda: Floor(100, 50),
    # No clients: the relay's fixed cost at 500 ev/s, the baseline of `serve_cpu_s_per_gb` for
    # the rows after it (list it first with --only).
    "idle-500": lambda: Scenario("idle-500", 0, 500),
    "core-1000x500": lambda: Scenario("core-1000x500", 1000, 500),
    # The same load with pacing off: every round starts as soon as data lands (the latency end
    # of the trade-off `--fanout-duty` makes; the default 0.5 is the CPU end).
    "core-1000x500-unpaced": lambda: Scenario("core-1000x500-unpaced", 1000, 500,
                                              relay_args=["--fanout-duty", "1"]),
    "core-5000x500": lambda: Scenario("core-5000x500", 5000, 500, duration=20),
    "core-100x50": lambda: Scenario("core-100x50", 100, 50),
    "core-12000x50": lambda: Scenario("core-12000x50", 12000, 50, duration=25, processes=2),
    "saturation-replay": lambda: Scenario("saturation-replay", 200, 0, queries=["cursor=0"],
                                          prefill=1_000_000, duration=25, warmup=3),
    "subs-full": lambda: Scenario("subs-full", 1000, 500),
    "subs-post": lambda: Scenario("subs-post", 1000, 500,
                                  queries=["wantedCollections=app.bsky.feed.post"]),
    # The latency/CPU trade of lingering: the same post filter with thin sends held at most
    # 40 ms instead of the default 80 ms (lower p99 for those clients, smaller sends).
    "subs-post-linger-40": lambda: Scenario("subs-post-linger-40", 1000, 500,
                                            queries=["wantedCollections=app.bsky.feed.post"],
                                            relay_args=["--thin-linger", "40ms"]),
    "subs-10-shapes": lambda: Scenario("subs-10-shapes", 1000, 500, queries=shape_queries()),
    "subs-compress": lambda: Scenario("subs-compress", 1000, 500, queries=["compress=true"]),
    "subs-100-dids": lambda: Scenario("subs-100-dids", 1000, 500,
                                      queries=did_queries(200, 100) or ["wantedDids=did:plc:x"]),
    # The same three loads on Jetstream v2 (subscribeEvents): full stream, compressed with the
    # v2 dictionary, and the post filter; their CPU per GB is printed against the subs-… row of
    # the same pass (issue 21: within 1.1×).
    "v2-full": lambda: Scenario("v2-full", 1000, 500, path=V2_PATH),
    "v2-compress": lambda: Scenario("v2-compress", 1000, 500, path=V2_PATH,
                                    queries=["zstdDictionary=20260811"]),
    "v2-post": lambda: Scenario("v2-post", 1000, 500, path=V2_PATH,
                                queries=["collections=app.bsky.feed.post"]),
    # Observability and abuse controls off (no metrics listener, loopback exempt from limits)
    # vs on (metrics scraped by the bench, every limit enforced on the swarm's connections).
    "metrics-off": lambda: Scenario("metrics-off", 1000, 500, relay_args=["--metrics-listen", ""]),
    "metrics-on": lambda: Scenario("metrics-on", 1000, 500, exempt_loopback=False, relay_args=[
        "--max-clients", "5000", "--max-conns-per-ip", "2000", "--conn-rate-per-ip", "3000",
        "--max-lag", "30s"]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help=f"scenarios: {', '.join(SCENARIOS)}")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--relay-arg", action="append", default=[],
                    help="extra relay argument for every scenario (repeatable), "
                         "e.g. --relay-arg=--fanout-duty=1")
    ap.add_argument("--relay-bin", action="append", default=[], metavar="LABEL=PATH",
                    help="A/B: run every scenario once per relay binary given (repeatable; mock "
                         "and swarm stay this build's), interleaved, rows named scenario@LABEL; "
                         "prints each later binary's ratios to the first")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the scenario list this many times (passes); with subs-full in "
                         "it, also print each pass's ratios to it and their medians")
    args = ap.parse_args()
    names = args.only or list(SCENARIOS)
    log = open(os.path.join(tempfile.gettempdir(), "jetrelay-bench.log"), "w")
    ref = iperf3()
    print(f"iperf3 -Z (1 stream, client on core {RELAY_CORE}): "
          + (f"{ref:.2f} Gbps" if ref else "unavailable"))
    cols = ["scenario", "clients", "rate", "passed", "relay_cpu_pct", "cpu_s_per_gb",
            "serve_cpu_s_per_gb", "gbps",
            "window_gbps",
            "p50_ms", "p99_ms", "max_ms", "relay_p50_le_ms", "relay_p99_le_ms", "bytes_per_send",
            "swarm_busy_pct",
            "clients_behind", "rss_mib", "fds_per_client"]
    print(" | ".join(cols))
    results = []
    passes = []  # per pass: scenario name -> result
    for _ in range(max(1, args.repeat)):
        passes.append(run_pass(names, args, ref, log, cols, results))
    if "subs-full" in names:
        print_ratios(passes)
    if any(n.startswith("v2-") for n in names):
        # In an A/B run the rows are named scenario@LABEL: one set of v2 ratios per binary.
        for label in [b.split("=", 1)[0] for b in args.relay_bin] or [None]:
            print_v2_ratios(passes, label)
    if len(args.relay_bin) > 1:
        print_ab(passes, names, [b.split("=", 1)[0] for b in args.relay_bin])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iperf3_gbps": ref, "results": results}, f, indent=2)


def run_pass(names, args, ref, log, cols, results):
    """Runs each named scenario once and prints its row; returns name -> result."""
    by_name = {}
    # (binary label, rate) -> relay CPU % with no clients, from an idle-… row of this pass:
    # per binary, so that an A/B's serving figures each subtract their own fixed cost.
    idle_cpu = {}
    binaries = [b.split("=", 1) for b in args.relay_bin] or [(None, None)]
    for n, (label, path) in [(n, b) for n in names for b in binaries]:
        sc = SCENARIOS[n]()
        if label is not None and not isinstance(sc, Floor):
            sc.relay_bin, sc.name = path, f"{n}@{label}"
            n = sc.name
        if isinstance(sc, Floor):
            r = floor(sc)
        else:
            sc.relay_args += args.relay_arg
            r = run(sc, log)
        extra = ""
        if n.startswith("saturation") and ref:
            gbps = r["window_gbps"] or r["gbps"]
            r["share_of_iperf3"] = round(gbps / ref, 3)
            extra = f" | {r['share_of_iperf3']:.0%} of iperf3"
            if r["relay_cpu_pct"]:
                # What the relay's core would carry at 100 % busy, at this run's CPU per byte:
                # a projection (the verifying swarm saturates first), printed as such.
                r["projected_gbps_per_core"] = round(gbps / (r["relay_cpu_pct"] / 100), 1)
                extra += (f" (swarm-bound; relay core at {r['relay_cpu_pct']}% → projected "
                          f"{r['projected_gbps_per_core']} Gbps at 100%, "
                          f"{r['projected_gbps_per_core'] / ref:.0%} of iperf3)")
        if r.get("skipped"):
            results.append(r)
            by_name[n] = r
            print(f"{n} | SKIPPED: {r['skipped']}", flush=True)
            continue
        if r.get("clients") == 0:
            idle_cpu[(label, r["rate"])] = r["relay_cpu_pct"]
        elif (label, r.get("rate")) in idle_cpu and r.get("window_gbps"):
            # CPU per GB of serving alone: the relay's CPU minus its fixed cost at this rate
            # (same run), over the bytes delivered. A thin stream carries the whole fixed cost
            # over few bytes in cpu_s_per_gb; this column compares the serving itself.
            serve = max(0.0, r["relay_cpu_pct"] - idle_cpu[(label, r["rate"])]) / 100
            r["serve_cpu_s_per_gb"] = round(serve / (r["window_gbps"] / 8), 3)
        if "us_per_send" in r:
            extra = f" | bare sender {r['us_per_send']} µs/send"
        results.append(r)
        by_name[n] = r
        print(" | ".join(str(r.get(c)) for c in cols) + extra, flush=True)
    return by_name


def print_ab(passes, names, labels):
    """A/B: each later binary's figures over the first's, per scenario, median over passes."""
    for n in names:
        for other in labels[1:]:
            for key in ("cpu_s_per_gb", "serve_cpu_s_per_gb", "relay_cpu_pct", "p99_ms",
                        "relay_p99_le_ms"):
                vals = []
                for p in passes:
                    a, b = p.get(f"{n}@{labels[0]}", {}), p.get(f"{n}@{other}", {})
                    if a.get(key) and b.get(key) is not None:
                        vals.append(b[key] / a[key])
                if vals:
                    each = " ".join(f"{v:.3f}" for v in vals)
                    print(f"{n} {key} {other} ÷ {labels[0]}: median "
                          f"{statistics.median(vals):.3f} (passes: {each})")


V2_TWINS = {"v2-full": "subs-full", "v2-compress": "subs-compress", "v2-post": "subs-post"}


def print_v2_ratios(passes, label=None):
    """Issue 21's figures: each v2 row's CPU per GB over its v1 twin of the same pass (target
    ≤ 1.1), then the median over passes; a missing pair says why. `label`: the binary's rows
    (scenario@label) of an A/B run."""
    for v2, v1 in V2_TWINS.items():
        if label is not None:
            v2, v1 = f"{v2}@{label}", f"{v1}@{label}"
        vals, why = [], None
        for p in passes:
            a, b = p.get(v1, {}), p.get(v2, {})
            if b.get("skipped"):
                why = b["skipped"]
            elif not b:
                why = f"{v2} not run"
            elif not a:
                why = f"{v1} not run (add it to --only)"
            elif a.get("cpu_s_per_gb") and b.get("cpu_s_per_gb"):
                vals.append(b["cpu_s_per_gb"] / a["cpu_s_per_gb"])
        what = f"{v2} CPU/GB ÷ {v1} (≤ 1.1)"
        if vals:
            each = " ".join(f"{v:.3f}" for v in vals)
            print(f"{what}: median {statistics.median(vals):.3f} (passes: {each})")
        else:
            print(f"{what}: no figure ({why or 'no CPU per GB measured'})")


def print_ratios(passes):
    """Issue 3's figures against the full stream of the same pass (absolute figures move
    between passes on a shared host; a pass's ratios do not move as much), then the median
    over passes."""
    rows = {}
    for p in passes:
        full = p.get("subs-full")
        if not full or not full.get("cpu_s_per_gb"):
            continue
        for n in ("subs-post", "subs-post-linger-40", "subs-10-shapes", "subs-compress"):
            if p.get(n, {}).get("cpu_s_per_gb"):
                rows.setdefault(f"{n} CPU/GB ÷ full (≤ 1.5)", []).append(
                    p[n]["cpu_s_per_gb"] / full["cpu_s_per_gb"])
        if p.get("subs-compress", {}).get("gbps") and full.get("gbps"):
            rows.setdefault("subs-compress bytes ÷ full (≤ 0.45)", []).append(
                p["subs-compress"]["gbps"] / full["gbps"])
        if p.get("subs-100-dids", {}).get("relay_cpu_pct") is not None:
            rows.setdefault("subs-100-dids CPU ÷ full CPU (≤ 1)", []).append(
                p["subs-100-dids"]["relay_cpu_pct"] / full["relay_cpu_pct"])
    for what, vals in rows.items():
        each = " ".join(f"{v:.3f}" for v in vals)
        print(f"{what}: median {statistics.median(vals):.3f} (passes: {each})")


if __name__ == "__main__":
    main()
