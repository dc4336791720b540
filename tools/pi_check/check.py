"""Proof that edge runs on a Raspberry Pi, without a Pi: aarch64 Raspberry Pi OS roots under qemu.

For each Pi OS generation (Bookworm: Debian 12, Python 3.11; Trixie: Debian 13, Python 3.13):

1. root   `debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv`,
          then completed on the host: the first stage only unpacks the essential packages and
          leaves the rest as .deb files, so we unpack python3 and the others with dpkg-deb. The
          second stage (maintainer scripts) would have to run arm64 programs in a chroot, which
          needs binfmt_misc; nothing in Python needs those scripts, so it is not run.
2. wheels `pip download` on the host for the root's Python and glibc (manylinux_2_17 up to the
          root's glibc, aarch64, --only-binary=:all:) of pyproject.toml's runtime dependencies,
          with their markers evaluated for an aarch64 Linux box.
3. site   `pip install --target` of those wheels on the host (no arm64 code runs): the folder the
          emulated Python puts on sys.path.
4. venv   the Pi install step, emulated: `python3 -m venv --system-site-packages` in the root's
          Python, then the root's own pip (Debian's python3-pip-whl) installs the same wheels
          from a local folder, choosing them by the Pi's own platform tags.
5. smoke  tools/pi_check/smoke.py runs as `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.X`
          (no binfmt, no chroot, nothing changed in the host kernel), with LiteRT's reference
          kernels; the same program runs on the host, and the embeddings and head results of
          the two runs are compared.

Roots, wheels, site folders and venvs are cached (EDGE_PI_CACHE, default ~/.cache/edge-pi-check),
so a warm run only repeats step 5. Needs root (debootstrap), debootstrap, qemu-user-static and
network access to the Debian mirror and the Python package index on a cold run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
SMOKE = Path(__file__).resolve().with_name("smoke.py")

# Bumped when the way a cached item is made changes, so old caches are rebuilt, not trusted.
FORMAT = 1
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("python3", "python3-venv")
# Cached wheels and roots are refreshed after this many days (new releases, Debian point updates).
WHEEL_MAX_AGE_DAYS = 7
ROOT_MAX_AGE_DAYS = 30

# Emulated embeddings must match the host's within these (see docs/pi.md for what was measured):
# at most one quantization step of the model's int8 output, and a cosine of at least 0.9999.
MAX_ABS_STEPS = 1.0
MIN_COSINE = 0.9999
# The head's similarities and threshold (float32 numpy, rounded to 6 places in the results).
MAX_HEAD_DIFF = 1e-4


@dataclass(frozen=True)
class Target:
    """One Raspberry Pi OS generation, as the Debian release it is built on, and the Pi whose
    processor qemu emulates for it."""

    name: str          # Pi OS name
    suite: str         # Debian suite
    python: str        # its python3
    cpu: str           # qemu -cpu model
    board: str         # the Pi with that processor


# qemu's default CPU ("max") has SVE, which no Pi has: numpy then takes SVE code paths a Pi never
# runs (and under qemu 7.2 numpy 2.5's float32 matrix product gave wrong numbers there). So each
# root runs on the processor of a real Pi: Cortex-A72 (Pi 4) and Cortex-A76 (Pi 5).
TARGETS = {
    "bookworm": Target("bookworm", "bookworm", "3.11", "cortex-a72", "Raspberry Pi 4"),
    "trixie": Target("trixie", "trixie", "3.13", "cortex-a76", "Raspberry Pi 5"),
}


class CheckError(RuntimeError):
    """A step of the check failed; the message says which and why."""


Log = Callable[[str], None]


def _stderr_log(message: str) -> None:
    print(f"pi-check {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --- the host's tools --------------------------------------------------------------------------


def find_tool(name: str) -> Optional[str]:
    """A program on PATH, or in the sbin folders (debootstrap lives there; PATH may lack them)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def qemu_binary() -> Optional[str]:
    """qemu-user for aarch64, statically linked (it must not need the root's libraries)."""
    override = os.environ.get("EDGE_PI_QEMU")
    if override:
        return override if os.access(override, os.X_OK) else None
    return find_tool("qemu-aarch64-static")


def missing_requirements() -> List[str]:
    """What this machine lacks to run the check (empty when it can run)."""
    missing = []
    if find_tool("debootstrap") is None:
        missing.append("debootstrap not installed (apt-get install debootstrap)")
    if qemu_binary() is None:
        missing.append("qemu-aarch64-static not installed (apt-get install qemu-user-static)"
                       if not os.environ.get("EDGE_PI_QEMU") else
                       f"EDGE_PI_QEMU={os.environ['EDGE_PI_QEMU']} is not an executable")
    for tool in ("dpkg-deb", "tar"):
        if find_tool(tool) is None:
            missing.append(f"{tool} not found")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        missing.append("debootstrap needs root (run as root, as CI does)")
    return missing


def qemu_command(target: Target, root: Path) -> List[str]:
    """qemu-user running the root's programs on the target's processor, the root as prefix (-L):
    the root's dynamic loader and libraries are used, and an absolute path that exists in the
    root means the root's file; any other path is the host's (the repository, the photos)."""
    return [qemu_binary() or "qemu-aarch64-static", "-cpu", target.cpu, "-L", str(root)]


def cache_root() -> Path:
    configured = os.environ.get("EDGE_PI_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-pi-check"


# --- small helpers -----------------------------------------------------------------------------


def _run(cmd: List[str], log: Log, what: str, logfile: Optional[Path] = None,
         env: Optional[dict] = None, timeout: float = 1800) -> str:
    """Run a command; its output goes to logfile (or is returned). Raises CheckError on failure."""
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckError(f"{what}: no result after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
    output = proc.stdout.decode("utf-8", "replace")
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        logfile.write_text(f"$ {' '.join(cmd)}\n{output}\n[exit {proc.returncode}]\n")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-25:])
        where = f" (full log: {logfile})" if logfile else ""
        raise CheckError(f"{what} failed with exit {proc.returncode}{where}:\n{tail}")
    log(f"{what}: {time.monotonic() - start:.1f} s")
    return output


@contextlib.contextmanager
def _locked(path: Path):
    """One process at a time builds a given cache item (two test runs may share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_stamp(folder: Path) -> Optional[dict]:
    try:
        stamp = json.loads((folder / ".edge-pi-check.json").read_text())
    except (OSError, ValueError):
        return None
    return stamp if stamp.get("format") == FORMAT else None


def _write_stamp(folder: Path, stamp: dict) -> None:
    stamp = dict(stamp, format=FORMAT, created=time.time())
    (folder / ".edge-pi-check.json").write_text(json.dumps(stamp, indent=1, sort_keys=True))


def _fresh(stamp: Optional[dict], max_days: float, refresh: bool) -> bool:
    return (stamp is not None and not refresh
            and time.time() - stamp.get("created", 0) < max_days * 86400)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _prune(parent: Path, prefix: str, keep: Path) -> None:
    """Remove older cache items of the same kind (a new wheel set makes the old site stale)."""
    if not parent.is_dir():
        return
    for item in parent.iterdir():
        if item.name.startswith(prefix) and item != keep and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def emulated_env(pycache: Path) -> dict:
    """The environment for emulated Python: the host's, minus what points at host Pythons.

    Byte-code is written to a cache folder of its own (PYTHONPYCACHEPREFIX): compiling the
    standard library and numpy under emulation costs about a minute per run otherwise.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "CONDA", "QEMU_", "LD_"))}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull      # the host's pip settings are not the Pi's
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["LC_ALL"] = "C.UTF-8"
    return env


# --- 1. the root -------------------------------------------------------------------------------


def build_root(target: Target, cache: Path, log: Log, mirror: str = MIRROR,
               refresh: bool = False) -> Path:
    """The arm64 Debian root of a Pi OS generation, built once and cached; returns its folder."""
    root = cache / "roots" / f"{target.suite}-arm64"
    key = {"suite": target.suite, "include": list(INCLUDE), "variant": "minbase"}
    with _locked(cache / "locks" / f"root-{target.suite}.lock"):
        stamp = _read_stamp(root)
        if _fresh(stamp, ROOT_MAX_AGE_DAYS, refresh) and stamp.get("key") == key:
            return root
        log(f"{target.name}: building the arm64 {target.suite} root (debootstrap --foreign)")
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _run([find_tool("debootstrap") or "debootstrap", "--foreign", "--arch=arm64",
              "--variant=minbase", "--include=" + ",".join(INCLUDE), target.suite, str(tmp), mirror],
             log, f"{target.name}: debootstrap first stage",
             logfile=cache / "logs" / f"debootstrap-{target.suite}.log", timeout=1800)
        unpacked = _complete_root(tmp, log, target)
        python = tmp / "usr" / "bin" / f"python{target.python}"
        if not python.is_file():
            raise CheckError(f"{target.name}: {python.name} missing from the root; Debian "
                             f"{target.suite}'s python3 is no longer {target.python}?")
        facts = _probe_root(target, tmp, python, log)
        if facts["python"] != target.python:
            raise CheckError(f"{target.name}: the root's Python is {facts['python']}, "
                             f"expected {target.python}")
        _write_stamp(tmp, {"key": key, "unpacked": unpacked, **facts})
        _replace_dir(tmp, root)
        return root


def _complete_root(root: Path, log: Log, target: Target) -> List[str]:
    """Unpack the packages the first stage downloaded but left packed (python3 among them)."""
    boot = root / "debootstrap"
    base = (boot / "base").read_text().split()
    paths = {}
    for line in (boot / "debpaths").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            paths[parts[0]] = parts[1]
    start = time.monotonic()
    for package in base:
        deb = root / paths[package].lstrip("/")
        # Unpack over the first stage's merged-/usr symlinks (/bin -> usr/bin), never replacing them.
        data = subprocess.Popen([find_tool("dpkg-deb") or "dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE)
        untar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                               stdin=data.stdout, stderr=subprocess.PIPE)
        data.stdout.close()
        if data.wait() != 0 or untar.returncode != 0:
            raise CheckError(f"{target.name}: unpacking {deb.name} failed: "
                             f"{untar.stderr.decode(errors='replace').strip()}")
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()                 # unpacked now; 40 MB per root less to keep
    log(f"{target.name}: unpacked {len(base)} packages left by the first stage "
        f"({time.monotonic() - start:.1f} s)")
    return base


def _probe_root(target: Target, root: Path, python: Path, log: Log) -> dict:
    """The root's Python version and glibc, asked of the root's own Python under qemu."""
    code = ("import os, platform, sys; print(sys.version_info[0], sys.version_info[1], "
            "os.confstr('CS_GNU_LIBC_VERSION').split()[1], platform.machine())")
    out = _run([*qemu_command(target, root), str(python), "-S", "-c", code], log,
               "probe the root's Python", env=emulated_env(root.parent / "pyc-probe"), timeout=300)
    major, minor, glibc, machine = out.split()[-4:]
    if machine != "aarch64":
        raise CheckError(f"the emulated Python reports machine {machine!r}, not aarch64")
    return {"python": f"{major}.{minor}", "glibc": glibc, "machine": machine}


def root_facts(root: Path) -> dict:
    stamp = _read_stamp(root)
    if stamp is None:
        raise CheckError(f"{root} is not a finished root")
    return stamp


# --- 2. the wheels -----------------------------------------------------------------------------


def runtime_requirements(python: str) -> List[str]:
    """pyproject.toml's runtime dependencies as a Pi would install them: markers evaluated for
    aarch64 Linux and the given Python, markers then dropped (pip would judge them by the host)."""
    try:
        import tomllib
    except ImportError:          # Python < 3.11 on the host
        from pip._vendor import tomli as tomllib
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = {"platform_machine": "aarch64", "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "python_version": python,
           "python_full_version": python + ".0", "implementation_name": "cpython",
           "platform_python_implementation": "CPython"}
    wanted = []
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            wanted.append(str(req))
    return wanted


def platform_tags(glibc: str) -> List[str]:
    """The manylinux tags an aarch64 system with this glibc accepts, newest first.

    pip does not widen an explicit --platform to older glibc versions, so each one is listed:
    given only manylinux2014, pip picks LiteRT 1.4 instead of 2.x (2.x ships manylinux_2_27).
    """
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2:
        raise CheckError(f"unexpected glibc version {glibc}")
    tags = [f"manylinux_2_{m}_aarch64" for m in range(minor, 16, -1)]
    return tags + ["manylinux2014_aarch64", "linux_aarch64"]


def _target_flags(python: str, glibc: str) -> List[str]:
    abi = "cp" + python.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
             "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(glibc):
        flags += ["--platform", tag]
    return flags


def fetch_wheels(target: Target, facts: dict, cache: Path, log: Log,
                 refresh: bool = False) -> Path:
    """Download the aarch64 wheels of the runtime dependencies (and theirs) on the host."""
    reqs = runtime_requirements(facts["python"])
    abi = "cp" + facts["python"].replace(".", "")
    folder = cache / "wheels" / f"{abi}-glibc{facts['glibc']}-{_digest(reqs)}"
    with _locked(cache / "locks" / f"wheels-{abi}.lock"):
        stamp = _read_stamp(folder)
        if _fresh(stamp, WHEEL_MAX_AGE_DAYS, refresh) and stamp.get("requirements") == reqs:
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
              "--no-input", "--dest", str(tmp), *_target_flags(facts["python"], facts["glibc"]),
              *reqs], log, f"{target.name}: pip download of aarch64 {abi} wheels",
             logfile=cache / "logs" / f"pip-download-{abi}.log", timeout=1200)
        wheels = sorted(p.name for p in tmp.glob("*.whl"))
        others = sorted(p.name for p in tmp.iterdir() if p.suffix != ".whl")
        if others or not wheels:
            raise CheckError(f"{target.name}: pip download left non-wheel files {others}")
        _write_stamp(tmp, {"requirements": reqs, "wheels": wheels})
        _replace_dir(tmp, folder)
        _prune(folder.parent, f"{abi}-", folder)
        return folder


# --- 3. the site folder ------------------------------------------------------------------------


def install_site(target: Target, facts: dict, wheels: Path, cache: Path, log: Log) -> Path:
    """The wheels installed into a plain folder by the host's pip (--target, no arm64 code)."""
    names = _read_stamp(wheels)["wheels"]
    folder = cache / "site" / f"{target.suite}-{_digest(names, facts['glibc'])}"
    with _locked(cache / "locks" / f"site-{target.suite}.lock"):
        if _read_stamp(folder) is not None:
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              "--no-index", "--no-deps", "--no-compile", "--target", str(tmp),
              *_target_flags(facts["python"], facts["glibc"]),
              *[str(wheels / n) for n in names]],
             log, f"{target.name}: pip install --target (host)",
             logfile=cache / "logs" / f"site-{target.suite}.log", timeout=600)
        _write_stamp(tmp, {"wheels": names})
        _replace_dir(tmp, folder)
        _prune(folder.parent, f"{target.suite}-", folder)
        return folder


# --- 4. the venv, made and filled by the root's own Python ---------------------------------------


def make_venv(target: Target, root: Path, facts: dict, wheels: Path, cache: Path,
              log: Log) -> Path:
    """`python3 -m venv --system-site-packages`, then the Pi's pip installs the wheels.

    ensurepip (and so a plain `python3 -m venv`) starts pip as a child process, and a child
    arm64 program cannot start without binfmt_misc; so the venv is made --without-pip and the
    root's own pip runs straight from Debian's wheel of it (python3-pip-whl), as `python pip.whl`.
    """
    names = _read_stamp(wheels)["wheels"]
    folder = cache / "venv" / f"{target.suite}-{_digest(names, facts)}"
    with _locked(cache / "locks" / f"venv-{target.suite}.lock"):
        if _read_stamp(folder) is not None:
            return folder
        shutil.rmtree(folder, ignore_errors=True)      # an unfinished one (no stamp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        qemu = qemu_command(target, root)
        env = emulated_env(pycache_dir(cache, target, names))
        python = root / "usr" / "bin" / f"python{target.python}"
        _run([*qemu, str(python), "-m", "venv", "--without-pip", "--system-site-packages",
              str(folder)], log, f"{target.name}: python{target.python} -m venv (emulated)", env=env,
             timeout=600)
        pip_wheels = sorted((root / "usr" / "share" / "python-wheels").glob("pip-*.whl"))
        if not pip_wheels:
            raise CheckError(f"{target.name}: no pip wheel in the root (python3-pip-whl)")
        _run([*qemu, str(folder / "bin" / "python"), str(pip_wheels[-1] / "pip"), "install",
              "--no-index", "--find-links", str(wheels), "--no-compile", "--progress-bar", "off",
              *runtime_requirements(facts["python"])],
             log, f"{target.name}: pip install in the venv (emulated, the Pi's own pip)", env=env,
             logfile=cache / "logs" / f"venv-{target.suite}.log", timeout=1800)
        # Made where it stays (a venv's scripts name its path); the stamp marks it finished.
        _write_stamp(folder, {"wheels": names, "pip": pip_wheels[-1].name})
        _prune(folder.parent, f"{target.suite}-", folder)
        return folder


def pycache_dir(cache: Path, target: Target, wheel_names: List[str]) -> Path:
    return cache / "pyc" / f"{target.suite}-{_digest(wheel_names)}"


# --- 5. the smoke runs -------------------------------------------------------------------------


def run_smoke(cmd: List[str], work: Path, datasets: Path, log: Log, what: str,
              env: Optional[dict] = None, extra: Optional[List[str]] = None,
              timeout: float = 1800) -> dict:
    """Run smoke.py with the given interpreter command; its result.json, with the embeddings."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _run([*cmd, str(SMOKE), "--repo", str(REPO), "--datasets", str(datasets), "--work", str(work),
          *(extra or [])], log, what, env=env, logfile=work / "smoke.log", timeout=timeout)
    result = json.loads((work / "result.json").read_text())
    import numpy as np
    result["_embeddings"] = np.load(work / result["embeddings"]["file"])
    return result


def host_smoke(work: Path, datasets: Path, log: Log) -> dict:
    """The same program on the host (x86-64, the project's own environment)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return run_smoke([sys.executable], work, datasets, log, "host smoke run (x86-64)", env=env)


def compare(host: dict, pi: dict) -> dict:
    """How an emulated run agrees with the host run: embeddings, inputs, head, store."""
    import numpy as np

    a, b = host["_embeddings"].astype(np.float64), pi["_embeddings"].astype(np.float64)
    if a.shape != b.shape:
        return {"ok": False, "problems": [f"embedding shapes differ: {a.shape} vs {b.shape}"]}
    diff = np.abs(a - b)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    step = float(host["model"]["output_scale"]) or 1e-6
    same_inputs = sum(h["input_sha256"] == p["input_sha256"]
                      for h, p in zip(host["images"], pi["images"]))
    report = {
        "images": int(a.shape[0]),
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_steps": float(diff.max() / step),
        "min_cosine": float(cos.min()),
        "bit_identical_embeddings": bool(np.array_equal(host["_embeddings"], pi["_embeddings"])),
        "identical_inputs": f"{same_inputs}/{len(host['images'])}",
        "tolerance": {"max_abs_diff": MAX_ABS_STEPS * step, "min_cosine": MIN_COSINE},
    }
    problems = []
    if not np.isfinite(b).all():
        problems.append("non-finite values in the emulated embeddings")
    if report["max_abs_diff"] > MAX_ABS_STEPS * step + 1e-7:
        problems.append(f"max abs diff {report['max_abs_diff']:.6g} > {MAX_ABS_STEPS * step:.6g}")
    if report["min_cosine"] < MIN_COSINE:
        problems.append(f"min cosine {report['min_cosine']:.6f} < {MIN_COSINE}")
    if "head" in host and "head" in pi:
        for kind in host["head"]:
            h, p = host["head"][kind], pi["head"][kind]
            if (h["labels"], h["predicted"], h["closed"]) != (p["labels"], p["predicted"], p["closed"]):
                problems.append(f"{kind} head predictions differ: {h['predicted']} vs {p['predicted']}")
            # The head is float32 numpy (BLAS, SVD): equal inputs give equal results up to rounding.
            gap = max([abs(x - y) for x, y in zip(h["similarity"], p["similarity"])]
                      + [abs(h["threshold"] - p["threshold"])])
            report.setdefault("head_max_diff", {})[kind] = gap
            if gap > MAX_HEAD_DIFF:
                problems.append(f"{kind} head similarities differ by {gap:.3g} (> {MAX_HEAD_DIFF})")
        report["accuracy"] = {k: v["accuracy"] for k, v in pi["head"].items()}
    if "store" in pi:
        bad = [k for k in ("reopened_equal", "vectors_bit_equal", "same_predictions_after_reopen",
                           "wal_replay_equal") if not pi["store"][k]]
        if bad:
            problems.append(f"store check failed: {', '.join(bad)}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _check_origin(result: dict, allowed: List[Path], what: str) -> List[str]:
    """Every dependency must come from the folders made for the target, never from the host."""
    problems = []
    roots = [str(p.resolve()) + os.sep for p in allowed]
    packages = dict(result["packages"])
    native = packages.pop("_native")
    files = [(name, info["file"]) for name, info in packages.items()] + list(native.items())
    for name, path in files:
        if not any(os.path.realpath(path).startswith(r) for r in roots):
            problems.append(f"{what}: {name} was loaded from {path}")
    for name, path in native.items():
        if _elf_machine(Path(path)) != 183:      # EM_AARCH64
            problems.append(f"{what}: {path} is not an aarch64 library")
    if result["platform"]["machine"] != "aarch64":
        problems.append(f"{what}: ran as {result['platform']['machine']}, not aarch64")
    return problems


def _elf_machine(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    return int.from_bytes(head[18:20], "little") if head[:4] == b"\x7fELF" else -1


def check_target(target: Target, host: Callable[[], dict], datasets: Path, cache: Path,
                 work: Path, log: Log, venv: bool = True, mirror: str = MIRROR,
                 refresh: bool = False, gate: Optional[threading.Semaphore] = None) -> dict:
    """Every step for one Pi OS generation; a report (ok, problems, facts, timings)."""
    timings: Dict[str, float] = {}
    started = time.monotonic()

    def timed(name, fn, *args, **kwargs):
        t = time.monotonic()
        value = fn(*args, **kwargs)
        timings[name] = round(time.monotonic() - t, 1)
        return value

    def say(message):
        log(f"[{target.name}] {message}")

    report: dict = {"target": target.name, "debian": target.suite, "python": target.python,
                    "cpu": target.cpu, "board": target.board, "ok": False, "problems": [],
                    "timings": timings}
    try:
        root = timed("root", build_root, target, cache, say, mirror=mirror, refresh=refresh)
        facts = root_facts(root)
        report.update(glibc=facts["glibc"], root=str(root))
        wheels = timed("wheels", fetch_wheels, target, facts, cache, say, refresh=refresh)
        names = _read_stamp(wheels)["wheels"]
        report["wheels"] = names
        site = timed("site", install_site, target, facts, wheels, cache, say)
        qemu = qemu_command(target, root)
        python = root / "usr" / "bin" / f"python{target.python}"
        pycache = pycache_dir(cache, target, names)
        _prune(pycache.parent, f"{target.suite}-", pycache)
        env = emulated_env(pycache)
        with (gate or contextlib.nullcontext()):
            pi = timed("smoke", run_smoke, [*qemu, str(python)], work / target.name / "site",
                       datasets, say, f"smoke run under qemu (python{target.python}, site folder)",
                       env=env, extra=["--site", str(site)])
        report["versions"] = {k: v["version"] for k, v in pi["packages"].items() if k != "_native"}
        report["platform"] = {k: pi["platform"][k] for k in ("machine", "python", "libc")}
        report["smoke_timings"] = pi["timings"]
        report["store"] = {k: pi["store"][k] for k in ("reopened_equal", "wal_replay_equal",
                                                      "counts", "files")}
        report["gpio"] = pi["gpio"]
        report["problems"] += _check_origin(pi, [site], "site run")
        host_result = host()
        comparison = compare(host_result, pi)
        report["comparison"] = comparison
        report["problems"] += comparison["problems"]

        if venv:
            venv_dir = timed("venv", make_venv, target, root, facts, wheels, cache, say)
            with (gate or contextlib.nullcontext()):
                quick = timed("venv_smoke", run_smoke, [*qemu, str(venv_dir / "bin" / "python")],
                              work / target.name / "venv", datasets, say,
                              "smoke run under qemu (venv, --system-site-packages)", env=env,
                              extra=["--quick"])
            v_versions = {k: v["version"] for k, v in quick["packages"].items() if k != "_native"}
            system_site = str(root / "usr" / "lib" / "python3" / "dist-packages")
            report["venv"] = {"path": str(venv_dir), "versions": v_versions,
                              "system_site_packages": system_site in quick["platform"]["path"],
                              "prefix": quick["platform"]["prefix"]}
            report["problems"] += _check_origin(quick, [venv_dir], "venv run")
            if v_versions != report["versions"]:
                report["problems"].append(f"the Pi's pip chose other versions in the venv: "
                                          f"{v_versions} vs {report['versions']}")
            if not report["venv"]["system_site_packages"]:
                report["problems"].append("the venv does not see the system site-packages")
            if not (quick["_embeddings"][0] == pi["_embeddings"][0]).all():
                report["problems"].append("the venv's embedding of the first photo differs")
    except CheckError as exc:
        report["problems"].append(str(exc))
    except Exception as exc:     # a bug here, or a result file the smoke program did not write
        import traceback
        report["problems"].append("".join(traceback.format_exception(type(exc), exc,
                                                                     exc.__traceback__)[-3:]))
    timings["total"] = round(time.monotonic() - started, 1)
    report["ok"] = not report["problems"]
    say("ok" if report["ok"] else "FAILED: " + "; ".join(report["problems"]))
    return report


def run_check(targets: List[Target], datasets: Path, work: Path, cache: Optional[Path] = None,
              venv: bool = True, jobs: int = 2, mirror: str = MIRROR, refresh: bool = False,
              log: Log = _stderr_log) -> dict:
    """Check every target (in parallel: `jobs` emulated runs at a time); the combined report."""
    cache = cache or cache_root()
    missing = missing_requirements()
    if missing:
        raise CheckError("cannot run the Pi check here: " + "; ".join(missing))
    if not (datasets / "train").is_dir():
        raise CheckError(f"{datasets}: not the clothing-small photo set (no train/ folder)")
    started = time.monotonic()
    host_lock = threading.Lock()
    host_result: dict = {}

    def host() -> dict:
        with host_lock:
            if not host_result:
                host_result.update(host_smoke(work / "host", datasets, log))
            return host_result

    gate = threading.Semaphore(max(1, jobs))
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = [pool.submit(check_target, t, host, datasets, cache, work, log, venv=venv,
                               mirror=mirror, refresh=refresh, gate=gate) for t in targets]
        reports = [f.result() for f in futures]
    host_facts = host_result.get("platform", {})
    return {
        "ok": all(r["ok"] for r in reports),
        "host": {"machine": host_facts.get("machine"), "python": host_facts.get("python"),
                 "versions": {k: v["version"] for k, v in host_result.get("packages", {}).items()
                              if k != "_native"},
                 "timings": host_result.get("timings")},
        "model": host_result.get("model"),
        "targets": reports,
        "cache": str(cache),
        "seconds": round(time.monotonic() - started, 1),
    }


def default_datasets() -> Path:
    """Like tests/conftest.py: $EDGE_DATASETS, else ../shared/datasets beside the repository."""
    return Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="script/pi-check",
        description="Run edge in emulated aarch64 Raspberry Pi OS roots (Bookworm/Python 3.11, "
                    "Trixie/Python 3.13) and compare with this machine. Prints a JSON report.")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"Pi OS generations to check: {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--datasets", type=Path, default=None,
                        help="the shared datasets folder (default: $EDGE_DATASETS or ../shared/datasets)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs write results (default: a folder in the cache)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $EDGE_PI_CACHE or ~/.cache/edge-pi-check)")
    parser.add_argument("--cpu", default=None,
                        help="qemu CPU model for every target (default: cortex-a72 for bookworm "
                             "as a Pi 4, cortex-a76 for trixie as a Pi 5; cortex-a53: Pi 3/Zero 2 W)")
    parser.add_argument("--no-venv", action="store_true", help="skip the emulated venv install")
    parser.add_argument("--jobs", type=int, default=2, help="emulated runs at once (default 2)")
    parser.add_argument("--refresh", action="store_true",
                        help="rebuild the roots and download the wheels again")
    parser.add_argument("--mirror", default=os.environ.get("EDGE_PI_MIRROR", MIRROR),
                        help=f"Debian mirror for debootstrap (default: $EDGE_PI_MIRROR or {MIRROR})")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}: choose from {', '.join(TARGETS)}")

    targets = [TARGETS[t] for t in (args.targets or TARGETS)]
    if args.cpu:
        targets = [dataclasses.replace(t, cpu=args.cpu, board=f"qemu -cpu {args.cpu}") for t in targets]
    cache = args.cache or cache_root()
    datasets = (args.datasets or default_datasets()) / "clothing-small"
    work = args.work or cache / "work"
    try:
        report = run_check(targets, datasets, work, cache=cache, venv=not args.no_venv,
                           jobs=args.jobs, mirror=args.mirror, refresh=args.refresh)
    except CheckError as exc:
        print(f"pi-check: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1
