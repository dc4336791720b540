"""The test harness itself: in CI a skip for something installable fails (tests/conftest.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_needs_a_package():
    pytest.skip("frobnicate not installed (apt-get install frobnicate)")

def test_needs_root():
    pytest.skip("needs euid 0")
'''


def _run(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_in_ci_a_skip_for_an_installable_package_fails(tmp_path):
    done = _run(tmp_path, "true")
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 skipped" in done.stdout
    assert "FAILED test_sample.py::test_needs_a_package" in done.stdout
    assert "requirement is installable" in done.stdout


def test_outside_ci_the_same_skip_stays_a_skip_with_its_reason(tmp_path):
    done = _run(tmp_path, "")
    assert done.returncode == 0, done.stdout
    assert "2 skipped" in done.stdout
    assert "apt-get install frobnicate" in done.stdout
