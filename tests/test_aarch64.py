"""edge on a Raspberry Pi, without a Pi: aarch64 Raspberry Pi OS roots under qemu (docs/pi.md).

The emulated runs build (or reuse, from ~/.cache/edge-pi-check) an arm64 Debian root per Pi OS
generation, install the runtime dependencies from aarch64 wheels, run tools/pi_check/smoke.py in
the root's own Python under qemu-aarch64-static on a Pi's processor, and compare everything with
the same program run here. They need root, debootstrap and qemu-user-static (and the network on
a cold cache): without them these tests skip and say why, and in CI (CI=true) they fail.
A warm run takes about a minute; a cold one about 8 (both generations, 2 cores).
"""

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))        # tools/ is not an installed package

from tools.pi_check import check as pi_check  # noqa: E402

DEPENDENCIES = {"numpy", "ai-edge-litert", "pillow", "pyyaml", "gpiozero", "paho-mqtt", "aiohttp"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _log(message: str) -> None:
    print(f"pi-check {message}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def pi_report(clothing, tmp_path_factory):
    """Both generations checked once for the module (in parallel: one emulated run per core)."""
    missing = pi_check.missing_requirements()
    if missing:
        message = "aarch64 check cannot run: " + "; ".join(missing)
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("pi-check")
    report = pi_check.run_check(list(pi_check.TARGETS.values()), clothing, work, jobs=2, log=_log)
    _log(f"finished in {report['seconds']} s (cache {report['cache']})")
    return report


def _target(report: dict, name: str) -> dict:
    found = [t for t in report["targets"] if t["target"] == name]
    assert found, f"no report for {name}"
    return found[0]


# --- no emulation needed -------------------------------------------------------------------------


def test_platform_tags_reach_the_roots_glibc():
    """pip gets every manylinux tag up to the root's glibc: LiteRT 2.x ships manylinux_2_27 only."""
    tags = pi_check.platform_tags("2.36")
    assert tags[0] == "manylinux_2_36_aarch64"
    assert "manylinux_2_27_aarch64" in tags and "manylinux_2_17_aarch64" in tags
    assert tags[-2:] == ["manylinux2014_aarch64", "linux_aarch64"]
    assert not any("x86_64" in t for t in tags)


def test_requirements_are_judged_for_an_arm_pi():
    """pyproject's markers are evaluated for aarch64 (not for this x86-64 host) and dropped."""
    for python in ("3.11", "3.13"):
        reqs = pi_check.runtime_requirements(python)
        names = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in reqs}
        # A new runtime dependency belongs in tools/pi_check/smoke.py's DEPENDENCIES too.
        assert names == DEPENDENCIES
        assert not any(";" in r for r in reqs)


# --- the emulated Pis ----------------------------------------------------------------------------


@pytest.mark.aarch64
@pytest.mark.slow
@pytest.mark.parametrize("name", list(pi_check.TARGETS))
def test_runs_on_raspberry_pi_os(pi_report, name):
    """Import, model, embeddings, head and store in the emulated root, equal to this machine's."""
    target = pi_check.TARGETS[name]
    t = _target(pi_report, name)
    assert t["ok"], f"{name}: " + "\n".join(t["problems"])

    assert t["platform"]["machine"] == "aarch64"
    assert t["platform"]["python"].startswith(target.python + ".")
    assert t["cpu"] == target.cpu
    assert set(t["versions"]) == DEPENDENCIES
    assert all(w.endswith(("aarch64.whl", "-none-any.whl")) for w in t["wheels"]), t["wheels"]

    c = t["comparison"]
    assert c["images"] == 20
    assert c["max_abs_diff"] <= pi_check.MAX_ABS_STEPS * pi_report["model"]["output_scale"] + 1e-7
    assert c["min_cosine"] >= pi_check.MIN_COSINE
    assert c["accuracy"]["centroid"] >= 0.5          # 4 classes, 3 shots each: chance is 0.25

    assert t["store"]["reopened_equal"] and t["store"]["wal_replay_equal"]
    assert t["gpio"]["lit"] and t["gpio"]["pressed"]


@pytest.mark.aarch64
@pytest.mark.slow
@pytest.mark.parametrize("name", list(pi_check.TARGETS))
def test_pi_install_step_in_a_venv(pi_report, name):
    """`python3 -m venv --system-site-packages` in the root, filled by the Pi's own pip."""
    t = _target(pi_report, name)
    assert t["ok"], f"{name}: " + "\n".join(t["problems"])
    venv = t["venv"]
    assert venv["system_site_packages"]
    assert venv["versions"] == t["versions"]
