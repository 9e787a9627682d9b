#!/usr/bin/env python3
"""Runs the NixOS VM tests' own scripts against what the Nix files deploy, in a Debian
guest booted with systemd as PID 1 -- where no NixOS test driver is available.

For a VM test (vm-tests/<test>.nix) this
1. evaluates the test's nodes with the real module system (nix/eval) and renders their
   unit files, users, groups, sysctls, tmpfiles rules and trusted CA files as NixOS
   writes them;
2. installs them into a Debian root (debootstrap, cached): every /nix/store path they
   name is made from the evaluation's recipes (nix/eval/realise.py: the relay binaries
   cargo built, the test certificates from the test's own openssl commands, Debian's
   programs for nixpkgs' tools), users and groups are created as NixOS creates them,
   unit files go to /etc/systemd/system with the .wants links NixOS makes;
3. boots it with qemu (KVM when /dev/kvm works, TCG otherwise); the test network is a
   dummy interface carrying every node's address (192.168.1.N, as the driver numbers
   them), so one guest plays all nodes;
4. runs the test's Python testScript verbatim with a stand-in of the NixOS test driver's
   machine API (succeed, fail, wait_for_unit, ...), every node mapped to the guest,
   through a shell on a virtio port (the driver's "backdoor" does the same), then the
   guest checks of this file (`EXTRA`) that the VM tests leave to a real deployment.

Usage: nixos_guest.py prepare CACHE | run CACHE TEST [--bin-dir DIR] [--keep]
"""

import argparse
import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "nix/eval"))
import realise  # noqa: E402

SUITE = "trixie"
# What the guest needs besides a minimal Debian: systemd as init (with udev and D-Bus for
# systemctl/systemd-analyze), a kernel to boot, and the programs the VM test scripts call.
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "iproute2",
    "procps",
    "openssl",
    "curl",
    "jq",
    "ca-certificates",
]
# Upper bounds, so that a hung guest ends the run by itself.
BOOT_TIMEOUT = 300
TEST_TIMEOUT = 1200
GUEST_MEMORY_MIB = 1536
GUEST_CPUS = 2
# Boots tried before the run fails (see run: a TCG boot can die in the guest kernel).
BOOT_ATTEMPTS = 3
IMAGE_SIZE = "3G"


def log(*args):
    print("nixos-guest:", *args, flush=True)


def mirror():
    """The Debian mirror apt uses here."""
    for f in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", f.read_text(), re.M)
        if m and "debian-security" not in m.group(1):
            return m.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", listing.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def prepare(cache):
    """A Debian root with PACKAGES, made once per cache directory."""
    root = cache / "root"
    done = cache / "root.complete"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {SUITE} from {mirror()} into {root}")
    t0 = time.monotonic()
    with open(cache / "debootstrap.log", "w") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror()],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    done.write_text(f"{time.monotonic() - t0:.0f} s\n")
    log(f"debootstrap took {time.monotonic() - t0:.0f} s")
    return root


def nix_eval(store, expr):
    out = subprocess.run(
        [
            "nix-instantiate",
            "--read-write-mode",
            "--store",
            str(store),
            "--option",
            "build-users-group",
            "",
            "--eval",
            "--strict",
            "--json",
            "-E",
            expr,
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"nix-instantiate failed:\n{out.stderr}")
    return json.loads(out.stdout)


def evaluate(store, test):
    """The test's script and, per node, what NixOS would deploy."""
    return nix_eval(
        store,
        f"""
        let
          e = import {REPO}/nix/eval {{ }};
          t = e.vmTests.{test};
        in {{
          script = t.testScript;
          nodes = builtins.mapAttrs (_: n: n.rendered // {{
            pki = map toString n.config.security.pki.certificateFiles;
          }}) t.nodes;
        }}
        """,
    )


def put(path, text, mode=0o644):
    """Writes a file anew (never through a hard link shared with the cached root)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


BACKDOOR_UNIT = """\
[Unit]
Description=Shell for the test driver stand-in on virtio port "backdoor" (.ci/nixos-guest)
After=systemd-journald.service
StartLimitIntervalSec=0

[Service]
# A virtio port opens once: read-write on fd 0, then duplicated.
ExecStart=/bin/bash --norc --noprofile -c 'exec bash --norc --noprofile 0<>/dev/virtio-ports/backdoor 1>&0 2>&1'
Restart=always
RestartSec=1
"""


def build_root(base, work, evaluated, bin_dir, eval_store):
    """The guest's root: the cached Debian root (hard-linked, /etc copied) plus what the
    evaluation deploys."""
    root = work / "root"
    log("staging the guest root")
    subprocess.run(["cp", "-al", str(base), str(root)], check=True)
    # Every file changed below is under /etc or new: /etc is a real copy.
    shutil.rmtree(root / "etc")
    subprocess.run(["cp", "-a", str(base / "etc"), str(root / "etc")], check=True)

    nodes = evaluated["nodes"]
    realiser = realise.Realiser(eval_store, root, debian_root=root, bin_dir=bin_dir, log=log)
    units, wants, requires = {}, {}, {}
    users, groups = {}, {}
    sysctl, tmpfiles, modules, pki = [], [], [], []
    for name in sorted(nodes):
        n = nodes[name]
        for unit, text in n["units"].items():
            if unit in units and units[unit] != text:
                raise ValueError(f"{unit} differs between nodes; they cannot share one guest")
            units[unit] = text
        for target, us in n["wants"].items():
            wants.setdefault(target, set()).update(us)
        for target, us in n["requires"].items():
            requires.setdefault(target, set()).update(us)
        users.update(n["users"])
        groups.update(n["groups"])
        sysctl.append(n["sysctl"])
        tmpfiles.append(n["tmpfiles"])
        modules += n["kernelModules"]
        pki += n["pki"]
    for text in [*units.values(), *sysctl, *tmpfiles, evaluated["script"], *pki]:
        realiser.realise_all(text)

    def chroot(*cmd):
        subprocess.run(["chroot", str(root), *cmd], check=True)

    # Users and groups as NixOS makes them (system users: a UID below 1000, no home, no
    # login shell), before any unit starts.
    for group, g in sorted(groups.items()):
        chroot("groupadd", "--system", *(["--gid", str(g["gid"])] if g["gid"] else []), group)
    for user, u in sorted(users.items()):
        chroot(
            "useradd",
            *(["--system"] if u["isSystemUser"] else []),
            "--no-create-home",
            "--home-dir",
            u["home"],
            "--shell",
            "/usr/sbin/nologin",
            "--gid",
            u["group"],
            *(["--groups", ",".join(u["extraGroups"])] if u["extraGroups"] else []),
            *(["--uid", str(u["uid"])] if u["uid"] else []),
            "--comment",
            u["description"],
            user,
        )
    for group, g in groups.items():
        for member in g["members"]:
            chroot("usermod", "--append", "--groups", group, member)

    system = root / "etc/systemd/system"
    for unit, text in units.items():
        put(system / unit, text)
    for kind, links in (("wants", wants), ("requires", requires)):
        for target, us in links.items():
            for unit in us:
                link = system / f"{target}.{kind}" / unit
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f"../{unit}")
    # nixos/modules/config/sysctl.nix and boot.kernelModules.
    put(root / "etc/sysctl.d/60-nixos.conf", "".join(sysctl))
    put(root / "etc/modules-load.d/nixos.conf", "".join(m + "\n" for m in modules))
    put(root / "etc/tmpfiles.d/nixos.conf", "".join(tmpfiles))
    # security.pki.certificateFiles: part of the system's CA bundle.
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    text = bundle.read_text() if bundle.exists() else ""
    for f in pki:
        text += (root / f.lstrip("/")).read_text()
    put(bundle, text)

    # The test network: every node's address on one dummy interface, names in /etc/hosts,
    # numbered as the NixOS test driver numbers its nodes.
    addresses = {name: f"192.168.1.{i}" for i, name in enumerate(sorted(nodes), start=1)}
    put(
        root / "etc/hosts",
        "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addresses.items()),
    )
    put(root / "etc/hostname", "guest\n")
    put(root / "etc/systemd/network/10-testnet.netdev", "[NetDev]\nName=testnet\nKind=dummy\n")
    put(
        root / "etc/systemd/network/10-testnet.network",
        "[Match]\nName=testnet\n\n[Network]\n" + "".join(f"Address={a}/24\n" for a in addresses.values()),
    )
    put(root / "etc/fstab", "/dev/vda / ext4 rw,discard 0 1\n")
    put(system / "backdoor.service", BACKDOOR_UNIT)
    (system / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (system / "multi-user.target.wants/backdoor.service").symlink_to("../backdoor.service")
    chroot("systemctl", "enable", "systemd-networkd.service")
    chroot("systemctl", "mask", "getty@tty1.service", "serial-getty@ttyS0.service")
    return root, addresses


def make_image(root, image):
    log("making the ext4 image")
    subprocess.run(["truncate", "-s", IMAGE_SIZE, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "guest", "-d", str(root), str(image)], check=True)


def kvm_usable():
    """Whether /dev/kvm can run an ordinary kernel. Not under kvm_pvm (a "pagetable-based"
    KVM for machines without hardware virtualization, as on this project's CI machines):
    it runs only PVM-enabled guest kernels, and a stock kernel dies in its decompressor
    with "KVM internal error ... emulation failure"."""
    if Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        return True
    except OSError:
        return False


def die_with_parent():
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Guest:
    """A booted guest and the shell on its backdoor port."""

    def __init__(self, root, image, work):
        kernel = sorted(root.glob("boot/vmlinuz-*"))[-1]
        initrd = sorted(root.glob("boot/initrd.img-*"))[-1]
        self.sock_path = work / "backdoor.sock"
        self.console = work / "console.log"
        kvm = kvm_usable()
        log(f"booting {kernel.name} with {'KVM' if kvm else 'TCG (no usable /dev/kvm: slower)'}")
        self.qemu = subprocess.Popen(
            [
                "qemu-system-x86_64",
                *(["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg", "-cpu", "max"]),
                "-m",
                str(GUEST_MEMORY_MIB),
                "-smp",
                str(GUEST_CPUS),
                "-kernel",
                str(kernel),
                "-initrd",
                str(initrd),
                "-append",
                "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=0 systemd.journald.forward_to_console=1",
                "-drive",
                f"file={image},if=virtio,format=raw,cache=unsafe",
                "-device",
                "virtio-serial",
                "-chardev",
                f"socket,id=backdoor,path={self.sock_path},server=on,wait=off",
                "-device",
                "virtserialport,chardev=backdoor,name=backdoor",
                "-nic",
                "none",
                "-display",
                "none",
                "-serial",
                f"file:{self.console}",
                "-no-reboot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # qemu dies with this process, whatever ends it.
            preexec_fn=die_with_parent,
        )
        self.sock = None
        self.buf = b""
        # Numbers the commands sent (see run).
        self.serial = 0
        self.boot_timeout = BOOT_TIMEOUT if kvm else 3 * BOOT_TIMEOUT

    def connect(self):
        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        while time.monotonic() < deadline:
            if self.qemu.poll() is not None:
                raise RuntimeError(f"qemu exited: {self.qemu.stderr.read().decode()}\n{self.console_tail()}")
            if self.sock is None and self.sock_path.exists():
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(self.sock_path))
            if self.sock is not None:
                try:
                    if self.run("true", timeout=5)[0] == 0:
                        log(f"guest shell ready {time.monotonic() - t0:.0f} s after boot")
                        return
                except TimeoutError:
                    pass
            time.sleep(1)
        raise TimeoutError(f"no shell from the guest after {self.boot_timeout} s\n{self.console_tail()}")

    def console_tail(self, lines=60):
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def run(self, command, timeout=900):
        """(exit status, stdout, stderr) of `command` run by bash in the guest."""
        encoded = base64.b64encode(command.encode()).decode()
        # A fresh marker per command: answers to commands sent while the guest was still
        # booting (the shell runs them all once it starts) are not taken for this one.
        self.serial += 1
        marker = f"{os.getpid()}.{self.serial}"
        line = (
            f"echo {encoded} | base64 -d > /tmp/.cmd; "
            f"timeout {int(timeout)} bash /tmp/.cmd </dev/null >/tmp/.out 2>/tmp/.err; "
            f'echo "@@{marker} $?:$(base64 -w0 </tmp/.out):$(base64 -w0 </tmp/.err) @@"\n'
        )
        self.sock.sendall(line.encode())
        deadline = time.monotonic() + timeout + 10
        pattern = re.compile(rb"@@" + re.escape(marker.encode()) + rb" (\d+):([A-Za-z0-9+/=]*):([A-Za-z0-9+/=]*) @@\n")
        while True:
            m = pattern.search(self.buf)
            if m:
                self.buf = self.buf[m.end() :]
                rc = int(m.group(1))
                return rc, base64.b64decode(m.group(2)).decode(errors="replace"), base64.b64decode(m.group(3)).decode(errors="replace")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"guest command did not return: {command}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout as e:
                raise TimeoutError(f"guest command did not return: {command}") from e
            if not chunk:
                raise RuntimeError("guest shell closed")
            self.buf += chunk

    def stop(self):
        if self.qemu.poll() is None:
            with contextlib.suppress(Exception):
                self.sock.sendall(b"systemctl poweroff\n")
            try:
                self.qemu.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait()


class Machine:
    """The part of the NixOS test driver's Machine API the VM test scripts use."""

    def __init__(self, name, guest):
        self.name = name
        self.guest = guest

    def log(self, msg):
        print(f"{self.name}: {msg}", flush=True)

    def execute(self, command, check_return=True, timeout=900):
        rc, out, err = self.guest.run(command, timeout=timeout)
        if err.strip():
            print(err.rstrip(), flush=True)
        return rc, out

    def succeed(self, *commands, timeout=900):
        output = ""
        for command in commands:
            self.log(f"must succeed: {command}")
            rc, out = self.execute(command, timeout=timeout)
            if rc != 0:
                raise AssertionError(f"command `{command}` failed (exit code {rc})\n{out}")
            output += out
        return output

    def fail(self, *commands, timeout=900):
        output = ""
        for command in commands:
            self.log(f"must fail: {command}")
            rc, out = self.execute(command, timeout=timeout)
            if rc == 0:
                raise AssertionError(f"command `{command}` unexpectedly succeeded")
            output += out
        return output

    def wait_until_succeeds(self, command, timeout=900):
        self.log(f"wait until succeeds: {command}")
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=max(1, min(timeout, deadline - time.monotonic() + 1)))
            if rc == 0:
                return out
            if time.monotonic() >= deadline:
                raise AssertionError(f"`{command}` did not succeed within {timeout} s\n{out}")
            time.sleep(1)

    def wait_until_fails(self, command, timeout=900):
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=timeout)
            if rc != 0:
                return out
            if time.monotonic() >= deadline:
                raise AssertionError(f"`{command}` did not fail within {timeout} s")
            time.sleep(1)

    def wait_for_unit(self, unit, user=None, timeout=900):
        self.log(f"wait for unit {unit}")
        deadline = time.monotonic() + timeout
        while True:
            state = self.succeed(f"systemctl show -P ActiveState {unit}").strip()
            if state == "active":
                return
            if state == "failed":
                journal = self.execute(f"journalctl -b -u {unit} --no-pager | tail -n 40")[1]
                raise AssertionError(f"unit {unit} reached state failed\n{journal}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"unit {unit} not active after {timeout} s (state {state})")
            time.sleep(1)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        self.wait_until_succeeds(f"bash -c '</dev/tcp/{addr}/{port}'", timeout=timeout)

    def sleep(self, seconds):
        time.sleep(seconds)

    def start(self):
        pass


# Guest checks after vm-tls's own script, in its namespace (its helpers: swarm_start,
# swarm_wait, main_pid, wait_relay, ...): what a first deployment needs and no VM test
# asserts -- Type=notify readiness, the real client address through the sidecar, a relay
# restart behind the sidecar that loses nothing, the watchdog restarting a wedged relay,
# and both units' systemd-analyze score.
EXTRA = {
    "tls": r'''
import json
import re

with subtest("guest: both services reached active through Type=notify"):
    for unit in ("jetrelay.service", "jetrelay-tls.service"):
        props = dict(
            line.split("=", 1)
            for line in relay.succeed(f"systemctl show -p Type -p ActiveState -p SubState -p Result {unit}").splitlines()
        )
        assert props == {"Type": "notify", "ActiveState": "active", "SubState": "running", "Result": "success"}, props
    # The relay's own STATUS= (sent with READY=1 and each watchdog keep-alive).
    status = relay.succeed("systemctl show -P StatusText jetrelay.service").strip()
    assert status, "the relay sent no STATUS="

with subtest("guest: the relay logs the real client address through the sidecar"):
    # One wss upgrade from the client node's address; curl stops waiting after 3 s.
    code = relay.succeed(
        "curl --http1.1 -s -o /dev/null -w '%{http_code}' --max-time 3 --interface 192.168.1.1 "
        "--cacert /etc/ssl/certs/ca-certificates.crt "
        "-H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' "
        "-H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' https://relay/subscribe || true"
    ).strip()
    assert code == "101", code
    # The sidecar listens on [::]:443, so the address may come IPv4-mapped.
    relay.wait_until_succeeds(
        "journalctl -b -o cat -u jetrelay.service | grep -Eq 'peer=(\\[::ffff:)?192\\.168\\.1\\.1\\]?:'",
        timeout=10,
    )

with subtest("guest: a relay restart behind the sidecar loses nothing for clients resuming with their cursor"):
    swarm_start(
        client,
        "restart-behind-sidecar",
        "--url wss://relay/subscribe --ca-file /etc/ssl/certs/ca-certificates.crt --clients 30 --reconnect "
        "--seed 7 --duration 30s --expect-in-order --expect-min-events 200",
    )
    wait_established(relay, 443, 30)
    relay.sleep(8)
    relay.succeed("systemctl restart jetrelay.service")
    wait_relay(relay)
    swarm_wait(client, "restart-behind-sidecar")
    report = json.loads(client.succeed("cat /tmp/restart-behind-sidecar.json"))
    assert report["upgrades"] > report["clients"], f"nobody reconnected: {report}"

with subtest("guest: the watchdog restarts a wedged relay"):
    before = main_pid(relay, "jetrelay.service")
    restarts = int(relay.succeed("systemctl show -P NRestarts jetrelay.service").strip())
    # SIGSTOP stops every thread: no WATCHDOG=1 until WatchdogSec (30 s) runs out.
    relay.succeed(f"kill -STOP {before}")
    relay.wait_until_succeeds(
        f"test \"$(systemctl show -P MainPID jetrelay.service)\" != {before} "
        "&& test \"$(systemctl show -P ActiveState jetrelay.service)\" = active",
        timeout=90,
    )
    assert int(relay.succeed("systemctl show -P NRestarts jetrelay.service").strip()) == restarts + 1
    relay.succeed("journalctl -b -u jetrelay.service | grep -q 'Watchdog timeout'")
    wait_relay(relay)

with subtest("guest: systemd-analyze security rates both units at most 2.5"):
    for unit in ("jetrelay.service", "jetrelay-tls.service"):
        report = relay.succeed(f"systemd-analyze security --no-pager {unit}")
        score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report).group(1))
        print(f"{unit}: exposure {score}")
        assert score <= 2.5, report
''',
}


def run_script(guest, evaluated, test):
    machines = {name: Machine(name, guest) for name in sorted(evaluated["nodes"])}

    @contextlib.contextmanager
    def subtest(name):
        log(f"subtest: {name}")
        t0 = time.monotonic()
        yield
        log(f"subtest done in {time.monotonic() - t0:.1f} s: {name}")

    namespace = {
        "start_all": lambda: None,
        "join_all": lambda: None,
        "subtest": subtest,
        "machines": list(machines.values()),
        "log": None,
        "__name__": "__vmtest__",
        **machines,
    }
    exec(compile(evaluated["script"], f"vm-tests/{test}.nix testScript", "exec"), namespace)
    if test in EXTRA:
        exec(compile(EXTRA[test], "nixos_guest.py EXTRA", "exec"), namespace)


def run(cache, test, bin_dir, keep):
    base = prepare(cache)
    work = Path(tempfile.mkdtemp(prefix=f"nixos-guest-{test}-", dir=cache))
    guest = None
    ok = False
    try:
        t0 = time.monotonic()
        evaluated = evaluate(work / "store", test)
        root, _ = build_root(base, work, evaluated, bin_dir, work / "store")
        image = work / "disk.img"
        make_image(root, image)
        log(f"guest prepared in {time.monotonic() - t0:.0f} s")
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            guest = Guest(base, image, work)
            try:
                guest.connect()
                break
            except (RuntimeError, TimeoutError, OSError) as e:
                # Under TCG the guest kernel sometimes dies while it patches its own code
                # at boot (an int3 oops in swapper: multi-threaded TCG and text_poke); a
                # fresh boot from a fresh image is the cure, not a slower single-threaded TCG.
                print(guest.console_tail())
                guest.qemu.kill()
                guest.qemu.wait()
                if guest.sock is not None:
                    guest.sock.close()
                guest.sock_path.unlink(missing_ok=True)
                guest = None
                if attempt == BOOT_ATTEMPTS:
                    raise
                log(f"boot attempt {attempt} failed ({type(e).__name__}: {e}); booting again")
                make_image(root, image)
        shutil.rmtree(root)
        t1 = time.monotonic()
        run_script(guest, evaluated, test)
        log(f"vm-{test}: script and guest checks passed in {time.monotonic() - t1:.0f} s")
        ok = True
    finally:
        if guest is not None:
            if not ok:
                with contextlib.suppress(Exception):
                    print(guest.run("journalctl -b --no-pager | tail -n 150", timeout=30)[1])
                print(guest.console_tail())
            guest.stop()
        if keep or not ok:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("cache", type=Path)
    r = sub.add_parser("run")
    r.add_argument("cache", type=Path)
    r.add_argument("test", choices=["basic", "tls", "fleet", "hardening"])
    r.add_argument("--bin-dir", type=Path, default=REPO / "target/debug")
    r.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    # Absolute: store paths under it are handed to build commands run in other directories
    # (.ci/nixos-guest passes the relative target/nixos-guest).
    args.cache = args.cache.resolve()
    if args.command == "prepare":
        prepare(args.cache)
        return 0
    return 0 if run(args.cache, args.test, args.bin_dir, args.keep) else 1


if __name__ == "__main__":
    sys.exit(main())
