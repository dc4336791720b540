"""Shared fixtures: the real model, the shared photo sets, a real mosquitto (`broker`), MQTT
watchers, daemons in child processes (`daemons`) and gpiozero mock pins (`mock_factory`).

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


@pytest.fixture()
def mock_factory():
    """gpiozero's mock pins (PWM-capable), as gpiozero's own tests do it: the global factory is
    saved, replaced and restored, and the factory is also handed to the Panel explicitly."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory, MockPWMPin
    saved = Device.pin_factory
    Device.pin_factory = factory = MockFactory(pin_class=MockPWMPin)
    try:
        yield factory
    finally:
        factory.reset()
        Device.pin_factory = saved


@pytest.fixture(scope="session")
def engine() -> Embedder:
    """The default int8 model, loaded once for the whole session."""
    return Embedder(DEFAULT_MODEL, threads=2)


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto on a free local port, for one test."""
    from mqtt_broker import Broker
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def watchers(request):
    """make(broker, topics=(PREFIX/#,)) -> a Watcher recording every message; PREFIX is the
    test module's. All are closed at teardown."""
    from mqtt_broker import Watcher
    made = []
    prefix = getattr(request.module, "PREFIX", "edge")

    def make(broker, topics=None, **kw):
        w = Watcher(broker, topics=topics or (f"{prefix}/#",), **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        try:
            w.close()
        except Exception:   # a watcher of a broker the test killed
            pass


@pytest.fixture
def daemons():
    """make(config_path, log=None, **popen options) -> an EdgeDaemon (`edge run` in a child);
    all are stopped at teardown."""
    from faults_daemon import EdgeDaemon
    made = []

    def make(config, log=None, **kw):
        d = EdgeDaemon(config, log or Path(config).parent / f"daemon{len(made)}.log", **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
