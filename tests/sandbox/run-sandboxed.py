#!/usr/bin/python3
"""Runs a command under the relay unit's process sandbox, without systemd.

The twin of vm-tests/hardening.nix needs the same restrictions systemd applies from
nixos/module.nix, on a machine whose PID 1 is not systemd. This applies the ones that act on
the process itself, in the order systemd does:

- SystemCallFilter=@system-service ~@privileged ~@resources, SystemCallErrorNumber=EPERM,
  SystemCallArchitectures=native: a seccomp filter built from systemd's own group lists
  (`systemd-analyze syscall-filter`), so io_uring is allowed exactly when systemd allows it;
- CapabilityBoundingSet="" and no ambient capabilities: every capability dropped;
- an unprivileged user (DynamicUser's effect on the process), NoNewPrivileges=yes.

File-system and namespace settings (ProtectSystem, PrivateDevices, ...) are not reproduced;
the VM test covers them. Usage: run-sandboxed.py UID GID COMMAND [ARG...]
"""

import ctypes
import os
import subprocess
import sys

import seccomp  # Debian: python3-seccomp

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST_CAP = int(open("/proc/sys/kernel/cap_last_cap").read())


def expand(group, seen=None):
    """The syscalls in a systemd group, nested groups included."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", group],
                         capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= expand(word, seen) if word.startswith("@") else {word}
    return names


def main():
    uid, gid, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    allowed = expand("@system-service") - expand("@privileged") - expand("@resources")
    assert {"io_uring_setup", "io_uring_enter"} <= allowed, "systemd's @system-service lost io_uring"
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_LAST_CAP + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # from root to a plain user: effective and permitted sets are cleared
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(1))  # EPERM, as SystemCallErrorNumber
    for name in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a syscall on this architecture (systemd skips those too)
    f.load()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
