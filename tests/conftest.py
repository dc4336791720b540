"""Shared fixtures: the real model, the shared photo sets, temporary files.

The photo sets live outside the repo (../shared/datasets, or $EDGE_DATASETS). On a laptop without
them the tests that need them skip and say why; in CI (CI=true) a missing set is a failure.

In CI, any skip whose reason names something installable (an `apt-get install`, `npm install` or
`pip install` hint, or "not installed" / "not found") is turned into a failure here, so a skip can
never hide a missing package where script/test-deps should have installed it.
"""

import os
import re
from pathlib import Path

import pytest

from edge.engine import DEFAULT_MODEL, Embedder

REPO = Path(__file__).resolve().parent.parent


INSTALLABLE = re.compile(r"\b(apt(-get)? install|npm (install|ci)|pip install|not installed|not found)\b",
                         re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip for a missing installable requirement is a failure (see the module doc)."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if INSTALLABLE.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, but its requirement is installable: {reason}"


def _datasets_root() -> Path:
    return Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))


def need_dataset(*parts: str) -> Path:
    """The path of a shared dataset folder, or skip (fail in CI) when it is missing."""
    path = _datasets_root().joinpath(*parts)
    if not path.is_dir():
        message = f"dataset folder {path} not found (set EDGE_DATASETS to the shared/datasets folder)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def clothing() -> Path:
    """The CC0 few-shot set: train/ and test/ folders of 10 class folders."""
    return need_dataset("clothing-small")


@pytest.fixture(scope="session")
def calibration() -> Path:
    return need_dataset("calibration")


@pytest.fixture(scope="session")
def engine() -> Embedder:
    """The default int8 model, loaded once for the whole session."""
    return Embedder(DEFAULT_MODEL, threads=2)
