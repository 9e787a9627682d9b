"""Makes the /nix/store paths a rendered configuration refers to, without Nix.

Evaluating jetrelay's Nix files with the stand-in package set (nix/eval/pkgs.nix) leaves,
in a throwaway store, a JSON *recipe* next to every stand-in derivation (the recipe's
store hash is the derivation's), and the files whose text the evaluation knows (the
TOML a module generates) as they are. This module turns a store path found in a unit
file, a script or another realised file into that file or directory under a target
root, the way `nix-store --realise` would give it, from:

- `text`: the file a `writeTextFile`/`writeShellScriptBin` would write;
- `runCommand`: the build command, run with `$out` set (e.g. the VM test's certificates,
  made with openssl exactly as the derivation says);
- `cargo-package`: the relay's binaries as cargo built them (stripped);
- `tool`: a nixpkgs program (coreutils, openssl, ...): links to the Debian package's
  executables in the target root (see TOOLS);
- `python`: a virtual environment with the listed PyPI packages.

Anything else (a VM test, a dev shell) cannot be made and is an error.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# A store path: hash (Nix's base-32 alphabet) and name, up to the first character that
# cannot be in a name (a slash, a quote, a space, ...).
STORE_PATH = re.compile(r"/nix/store/[0-9abcdfghijklmnpqrsvwxyz]{32}-[A-Za-z0-9+\-._?=]+")

# nixpkgs attribute -> the Debian packages whose executables stand in for it. An entry
# "package:program" takes that one program (NixOS's coreutils has `kill`, Debian's has it
# in procps).
TOOLS = {
    "bash": ["bash"],
    "coreutils": ["coreutils", "procps:kill"],
    "curl": ["curl"],
    "findutils": ["findutils"],
    "gnugrep": ["grep"],
    "gnused": ["sed"],
    "haproxy": ["haproxy"],
    "iproute2": ["iproute2"],
    "jq": ["jq"],
    "openssl": ["openssl"],
    "socat": ["socat"],
    "systemd": ["systemd"],
    "util-linux": ["util-linux"],
}

# The binaries the cargo package installs (every [[bin]] target).
CARGO_BINS = ["jetrelay", "jetrelay-tls", "jetrelay-mock", "jetrelay-swarm"]

BIN_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin")


def store_paths(text):
    """The distinct store paths named in `text`."""
    return sorted(set(STORE_PATH.findall(text)))


def dpkg_files(root, package):
    """Files of an installed Debian package, from the dpkg database under `root`."""
    info = Path(root, "var/lib/dpkg/info")
    for name in (f"{package}.list", f"{package}:amd64.list", f"{package}:arm64.list"):
        if (info / name).exists():
            return (info / name).read_text().split("\n")
    raise FileNotFoundError(f"Debian package {package} is not installed under {root}")


def tool_programs(root, name):
    """(program name, absolute path in `root`) for the stand-in of nixpkgs' `name`."""
    if name not in TOOLS:
        raise KeyError(f"no Debian stand-in for nixpkgs' {name}: add it to TOOLS in {__file__}")
    programs = {}
    for entry in TOOLS[name]:
        package, _, only = entry.partition(":")
        for path in dpkg_files(root, package):
            rel = path.lstrip("/")
            if os.path.dirname(rel) not in BIN_DIRS:
                continue
            program = os.path.basename(rel)
            if only and program != only:
                continue
            if os.path.lexists(Path(root, rel)):
                programs.setdefault(program, "/" + rel)
    if not programs:
        raise FileNotFoundError(f"no programs for {name} under {root}")
    return programs


def tool_config_files(root, name):
    """Regular files under /etc that the Debian packages standing in for `name` own: in
    nixpkgs a program's configuration ships inside its own store path (openssl's
    openssl.cnf, which `openssl req` reads), so a sandbox that shows the program must show
    these too."""
    files = []
    for entry in TOOLS.get(name, []):
        package, _, only = entry.partition(":")
        if only:
            continue
        for path in dpkg_files(root, package):
            if path.startswith("/etc/") and Path(root, path.lstrip("/")).is_file():
                files.append(path)
    return files


class Realiser:
    """Realises store paths from `eval_store` (the --store of the evaluation) under
    `target` (which gets a nix/store/ of its own), with the tools of the Debian root
    `debian_root` and the relay binaries of `bin_dir`."""

    def __init__(self, eval_store, target, debian_root="/", bin_dir=None, log=print):
        self.eval_store = Path(eval_store)
        self.target = Path(target)
        self.debian_root = Path(debian_root)
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.log = log
        self.done = set()

    def staged(self, path):
        return self.target / path.lstrip("/")

    def realise_all(self, text):
        for path in store_paths(text):
            self.realise(path)

    def realise(self, path):
        if path in self.done:
            return
        self.done.add(path)
        out = self.staged(path)
        source = self.eval_store / path.lstrip("/")
        recipe = Path(str(source) + ".recipe")
        if out.exists() or out.is_symlink():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        if recipe.exists():
            self.make(path, json.loads(recipe.read_text()), out)
        elif source.is_dir():
            shutil.copytree(source, out, symlinks=True)
        elif source.exists():
            shutil.copy(source, out)
        else:
            raise FileNotFoundError(f"{path}: neither a recipe nor a file in {self.eval_store}")
        # What the new file or directory refers to in turn.
        for f in [out] if out.is_file() else (p for p in out.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                self.realise_all(f.read_text())
            except UnicodeDecodeError:
                pass

    def make(self, path, recipe, out):
        kind = recipe["kind"]
        self.log(f"realise {path} ({kind})")
        if kind == "text":
            dest = out / recipe["destination"].lstrip("/") if recipe["destination"] else out
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(recipe["text"])
            if recipe["executable"]:
                dest.chmod(0o755)
        elif kind == "tool":
            (out / "bin").mkdir(parents=True)
            for program, target in tool_programs(self.debian_root, recipe["name"]).items():
                (out / "bin" / program).symlink_to(target)
        elif kind == "cargo-package":
            if self.bin_dir is None:
                raise ValueError(f"{path}: no cargo target directory given for the relay binaries")
            (out / "bin").mkdir(parents=True)
            for name in CARGO_BINS:
                dest = out / "bin" / name
                shutil.copy(self.bin_dir / name, dest)
                subprocess.run(["strip", "--strip-debug", str(dest)], check=True)
        elif kind == "runCommand":
            with tempfile.TemporaryDirectory() as build:
                env = dict(os.environ, out=str(out.resolve()), NIX_BUILD_TOP=build, TMPDIR=build)
                done = subprocess.run(
                    ["bash", "-eu", "-o", "pipefail", "-c", recipe["buildCommand"]],
                    cwd=build,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{path}: the build command failed ({done.returncode}):\n{done.stderr}")
        elif kind == "python":
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(out)], check=True)
            if recipe["packages"]:
                subprocess.run(
                    [str(out / "bin/pip"), "install", "-q", "--disable-pip-version-check", *recipe["packages"]],
                    check=True,
                )
        else:
            raise ValueError(f"{path}: a {kind} cannot be realised here")


if __name__ == "__main__":
    # realise.py EVAL_STORE TARGET DEBIAN_ROOT BIN_DIR PATH...
    store, target, debian_root, bin_dir, *paths = sys.argv[1:]
    r = Realiser(store, target, debian_root, bin_dir)
    for p in paths:
        r.realise(p)
