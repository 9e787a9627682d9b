#!/usr/bin/env python3
"""Runs the package's check phase the way the Nix builder runs it, without Nix.

`nix build` (and `nix run`, `nix flake check`) builds nix/package.nix, whose check phase is
nixpkgs' cargo check hook:

    cargo test -j $NIX_BUILD_CORES --profile release --target <triple> --frozen -- \\
        --test-threads=<1 with dontUseCargoParallelTests, else $NIX_BUILD_CORES> ${checkFlags}

inside the build sandbox. This script evaluates the package with the real lib
(nix/eval) to get its source set (lib.fileset, copied as Nix copies it), checkFlags,
dontUseCargoParallelTests and nativeCheckInputs, and runs that command under bubblewrap
as the sandbox would:
- a user namespace, uid 1000 / gid 100 (not root), a PID, IPC, UTS and network namespace
  with only loopback, host name `localhost`;
- the source at /build/source, TMPDIR=/build, HOME=/homeless-shelter (absent), no /tmp;
- /etc holding only passwd, group and hosts as Nix writes them;
- a PATH of only what the derivation provides: stdenv's tools, the Rust toolchain and
  the C compiler, and nativeCheckInputs (Debian's programs in place of nixpkgs' ones,
  each made visible on its own: the other programs in /usr/bin are hidden, so a test
  that calls one the derivation does not list fails here as it would in Nix);
- the crates from the host's cargo registry (read-only) instead of the vendored
  directory, `--frozen`.
It also checks that every --skip pattern matches a test that exists.

Usage: check_phase.py [--target-dir DIR] [--cores N] [--list-only]
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "nix/eval"))
import realise  # noqa: E402

TRIPLE = "x86_64-unknown-linux-gnu"
# stdenv's programs (pkgs/stdenv/generic/common-path.nix), as Debian packages; the C
# compiler cargo links with is added by name (`cc`, `gcc`: what the host resolves them to).
STDENV = [
    "coreutils",
    "findutils",
    "diffutils",
    "sed",
    "grep",
    "gawk",
    "tar",
    "gzip",
    "bzip2",
    "xz-utils",
    "make",
    "bash",
    "patch",
    "file",
]
COMPILER = ["cc", "gcc", "c++", "g++", "ld", "as", "ar"]
# The Rust release nixos-26.05 ships; the default toolchain when it is not installed.
NIXPKGS_RUST = "1.95.0"


def log(*args):
    print("nix-sandbox:", *args, flush=True)


def nix_eval(store, expr):
    out = subprocess.run(
        ["nix-instantiate", "--read-write-mode", "--store", str(store), "--option", "build-users-group", "",
         "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"nix-instantiate failed:\n{out.stderr}")
    return json.loads(out.stdout)


def package(store):
    return nix_eval(
        store,
        f"""
        let
          p = (import {REPO}/nix/eval {{ }}).outputs.packages.x86_64-linux.jetrelay;
        in {{
          src = "${{p.src}}";
          checkFlags = p.checkFlags or [ ];
          parallel = !(p.dontUseCargoParallelTests or false);
          nativeCheckInputs = map toString (p.nativeCheckInputs or [ ]);
          checkType = p.checkType or (p.buildType or "release");
          cargoTestFlags = p.cargoTestFlags or [ ];
          doCheck = p.doCheck or true;
        }}
        """,
    )


def toolchain():
    """The Rust toolchain's bin directory (real binaries, not rustup's proxies)."""
    for name in (NIXPKGS_RUST, None):
        args = ["rustup", "which", "cargo"] + (["--toolchain", name] if name else [])
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode == 0:
            path = Path(out.stdout.strip()).resolve().parent
            version = subprocess.run([str(path / "rustc"), "-V"], capture_output=True, text=True).stdout.strip()
            log(f"{version} from {path.parent}" + ("" if name else f" (no {NIXPKGS_RUST} installed)"))
            return path
    cargo = shutil.which("cargo")
    if not cargo:
        raise FileNotFoundError("no cargo")
    return Path(cargo).resolve().parent


def program_files(paths):
    """The files under /usr/bin and /usr/sbin that the programs of `paths` are, or link to:
    each is made visible on its own in the sandbox's otherwise empty /usr/bin."""
    files = set()

    def usr(path):
        path = str(path)
        for merged in ("/bin/", "/sbin/"):
            if path.startswith(merged):
                return "/usr" + path
        return path

    for d in paths:
        for entry in Path(d).iterdir():
            if entry.is_symlink():
                target = os.readlink(entry)
                if os.path.isabs(target):
                    files.add(usr(target))
            files.add(usr(os.path.realpath(entry)))
    return sorted(f for f in files if f.startswith(("/usr/bin/", "/usr/sbin/")) and os.path.exists(f))


def freshen(source, target_dir):
    """Source mtimes for cargo's freshness check. Store paths carry mtime 1, so with a target
    directory kept between runs cargo would take every source for unchanged. Files whose
    content differs from the previous run's (a hash manifest in the target directory) get
    the current time, the others an old one, so only what changed is rebuilt. (Nix builds
    from scratch; this only saves local reruns the crate's rebuild.)"""
    manifest = target_dir / ".nix-sandbox-sources.json"
    try:
        previous = json.loads(manifest.read_text())
    except (OSError, ValueError):
        previous = {}
    old, now = 946684800, time.time()  # 2000-01-01
    current = {}
    for f in sorted(source.rglob("*")):
        if f.is_file() and not f.is_symlink():
            rel = str(f.relative_to(source))
            current[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
            stamp = old if previous.get(rel) == current[rel] else now
            os.utime(f, (stamp, stamp))
    manifest.write_text(json.dumps(current))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-dir", type=Path, default=REPO / "target/nix-sandbox",
                        help="cargo's target directory, mounted at /build/source/target (kept between runs)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="NIX_BUILD_CORES")
    parser.add_argument("--list-only", action="store_true", help="build and check the skip patterns, run nothing")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nix-sandbox-"))
    try:
        store = work / "eval-store"
        p = package(store)
        if not p["doCheck"]:
            log("doCheck is false: nothing to rehearse")
            return 0
        threads = args.cores if p["parallel"] else 1
        log(f"checkFlags {' '.join(p['checkFlags'])}; --test-threads={threads}; NIX_BUILD_CORES={args.cores}")

        # /nix/store of the sandbox: the nativeCheckInputs, plus stdenv as one tool.
        sandbox_store = work / "sandbox"
        realiser = realise.Realiser(store, sandbox_store, debian_root="/", log=log)
        path_dirs = []
        config_files = []
        for drv in p["nativeCheckInputs"]:
            realiser.realise(drv)
            path_dirs.append(drv + "/bin")
            recipe = json.loads((store / (drv.lstrip("/") + ".recipe")).read_text())
            if recipe["kind"] == "tool":
                config_files += realise.tool_config_files("/", recipe["name"])
        stdenv = sandbox_store / "nix/store/stdenv-stand-in/bin"
        stdenv.mkdir(parents=True)
        missing = []
        for package_name in STDENV:
            realise.TOOLS.setdefault(f"debian:{package_name}", [package_name])
            try:
                programs = realise.tool_programs("/", f"debian:{package_name}")
            except FileNotFoundError:
                # Not installed here: the tests then cannot use it, which can only make
                # this stricter than Nix.
                missing.append(package_name)
                continue
            for prog, target in programs.items():
                if not (stdenv / prog).exists():
                    (stdenv / prog).symlink_to(target)
        for prog in COMPILER:
            host = shutil.which(prog, path="/usr/bin:/bin")
            if host:
                (stdenv / prog).symlink_to(os.path.realpath(host))
        if missing:
            log(f"stdenv tools not installed here, left out: {' '.join(missing)}")
        rust = toolchain()
        path_dirs += ["/nix/store/stdenv-stand-in/bin", str(rust)]

        # /build: the source as lib.fileset selected it, writable, and the target directory.
        build = work / "build"
        source = build / "source"
        shutil.copytree(store / p["src"].lstrip("/"), source, symlinks=True)
        subprocess.run(["chmod", "-R", "u+w", str(source)], check=True)
        args.target_dir.mkdir(parents=True, exist_ok=True)
        freshen(source, args.target_dir)
        cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        (build / ".cargo").mkdir()

        etc = work / "etc"
        etc.mkdir()
        (etc / "passwd").write_text(
            "root:x:0:0:Nix build user:/build:/noshell\n"
            "nixbld:x:1000:100:Nix build user:/build:/noshell\n"
            "nobody:x:65534:65534:Nobody:/:/noshell\n"
        )
        (etc / "group").write_text("root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")

        host_paths = [str(sandbox_store / d.lstrip("/")) if d.startswith("/nix/store") else d for d in path_dirs]
        visible = program_files(host_paths)
        bwrap = [
            "bwrap",
            "--unshare-user", "--uid", "1000", "--gid", "100",
            "--unshare-net", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "localhost",
            "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr",
            "--tmpfs", "/usr/bin", "--tmpfs", "/usr/sbin",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--dev", "/dev", "--proc", "/proc",
            "--dir", "/etc",
            "--ro-bind", str(etc / "passwd"), "/etc/passwd",
            "--ro-bind", str(etc / "group"), "/etc/group",
            "--ro-bind", str(etc / "hosts"), "/etc/hosts",
            "--ro-bind", str(sandbox_store / "nix/store"), "/nix/store",
            "--bind", str(build), "/build",
            "--bind", str(args.target_dir), "/build/source/target",
            "--ro-bind", str(rust.parent), str(rust.parent),
            "--ro-bind", str(cargo_home / "registry"), "/build/.cargo/registry",
            # /bin/sh is bash in the Nix sandbox.
            "--ro-bind", "/usr/bin/bash", "/usr/bin/sh",
            "--chdir", "/build/source",
            "--clearenv",
            "--setenv", "PATH", ":".join(path_dirs),
            "--setenv", "HOME", "/homeless-shelter",
            "--setenv", "NIX_BUILD_TOP", "/build",
            "--setenv", "TMPDIR", "/build", "--setenv", "TMP", "/build",
            "--setenv", "TEMP", "/build", "--setenv", "TEMPDIR", "/build",
            "--setenv", "NIX_BUILD_CORES", str(args.cores),
            "--setenv", "NIX_STORE", "/nix/store",
            "--setenv", "SSL_CERT_FILE", "/no-cert-file.crt",
            "--setenv", "CARGO_HOME", "/build/.cargo",
            "--setenv", "TERM", "dumb",
        ]
        for f in visible:
            if str(f) != "/usr/bin/sh":
                bwrap += ["--ro-bind", str(f), str(f)]
        for f in config_files:
            bwrap += ["--ro-bind", f, f]

        # The hook: `--profile <checkType>` unless it is "debug" (cargo's default).
        profile = [] if p["checkType"] == "debug" else ["--profile", p["checkType"]]
        cargo = ["cargo", "test", "-j", str(args.cores), *profile, "--target", TRIPLE, "--frozen",
                 *p["cargoTestFlags"]]
        log("building the tests in the sandbox")
        t0 = time.monotonic()
        subprocess.run([*bwrap, *cargo, "--no-run"], check=True)
        log(f"built in {time.monotonic() - t0:.0f} s")

        listing = subprocess.run([*bwrap, *cargo, "--", "--list", "--format=terse"],
                                 capture_output=True, text=True, check=True).stdout
        tests = [line.split(": ")[0] for line in listing.splitlines() if line.endswith(": test")]
        dead = [f for f in p["checkFlags"] if f.startswith("--skip=") and not any(f[7:] in t for t in tests)]
        skipped = [t for t in tests if any(t.__contains__(f[7:]) for f in p["checkFlags"] if f.startswith("--skip="))]
        log(f"{len(tests)} tests, {len(skipped)} skipped by checkFlags: {', '.join(sorted(skipped))}")
        if dead:
            log(f"FAIL: checkFlags that match no test: {' '.join(dead)}")
            return 1
        if args.list_only:
            return 0

        log(f"running: {' '.join(cargo)} -- --test-threads={threads} {' '.join(p['checkFlags'])}")
        t0 = time.monotonic()
        rc = subprocess.run([*bwrap, *cargo, "--", f"--test-threads={threads}", *p["checkFlags"]]).returncode
        log(f"check phase {'passed' if rc == 0 else 'FAILED'} in {time.monotonic() - t0:.0f} s")
        return rc
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
