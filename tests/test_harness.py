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


def test_benchmarks_load_edge_before_numpy():
    """edge/__init__.py gives numpy one BLAS thread, as the box runs; a benchmark that imports
    numpy first measures two spinning OpenBLAS threads against the inference threads instead
    (box_bench read 1.45-1.68 x invoke for 1.22-1.28, benchmarks/README.md)."""
    import ast
    late = []
    for path in sorted((HERE.parent / "benchmarks").glob("*.py")):
        first = {}
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                first.setdefault(top, node.lineno)
        if "numpy" in first and first["numpy"] < first.get("edge", 10 ** 9):
            late.append(path.name)
    assert not late, f"import edge before numpy in {late}"
