"""Fault-injection helpers: the real daemon (`python -m edge run`) as a subprocess, next to a real
mosquitto (tests/mqtt_broker.py), plus the counts of the reliability suite.

Used by tests/test_reliability.py and benchmarks/soak.py. Nothing here fakes the box: the daemon is
started exactly as systemd would start it (minus the notify socket), killed with SIGKILL for a
power cut, and watched only through MQTT, its log and its store folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from edge.config import MAX_PER_CLASS
from mqtt_broker import free_port, wait_until  # noqa: F401  (wait_until: re-exported for the reliability tests)

REPO = Path(__file__).resolve().parent.parent
FULL = os.environ.get("EDGE_RELIABILITY_FULL", "").lower() in ("1", "true", "yes")


def count(short: int, full: int, name: str) -> int:
    """Trials for one fault class: EDGE_RELIABILITY_<NAME> wins, else the full or short count."""
    explicit = os.environ.get(f"EDGE_RELIABILITY_{name.upper()}")
    if explicit:
        return int(explicit)
    return full if FULL else short


def daemon_config(folder: Path, port: int, prefix: str, source: str = "mqtt", camera_folder=None,
                  store: Optional[Path] = None, mqtt: Optional[dict] = None, **top) -> Path:
    """A config file for a simulated box with MQTT on; JSON is YAML, so any path is quoted safely."""
    data = {
        "device_id": "rel",
        "classes": [{"name": "shoes"}, {"name": "hat"}],
        "function_button": None, "status_led": None,
        "camera": {"source": source, "fps": 10},
        "head": {"smoothing": 1},
        "capture": {"rate": 30, "min_change": 0, "max_per_class": MAX_PER_CLASS},   # the most a class may keep
        "store": {"path": str(store or folder / "store")},
        "mqtt": dict({"enabled": True, "host": "127.0.0.1", "port": port, "prefix": prefix,
                      "client_id": "edge-rel", "keepalive": 5}, **(mqtt or {})),
        # The page on a free port of its own: daemons of a test (and other suites) never share one.
        "web": {"host": "127.0.0.1", "port": free_port()},
    }
    if camera_folder is not None:
        data["camera"]["folder"] = str(camera_folder)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = dict(data[key], **value)
        else:
            data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(json.dumps(data, indent=1))
    return path


class EdgeDaemon:
    """`python -m edge run --config X --simulate --no-keys`, its stdout+stderr in a log file."""

    def __init__(self, config: Path, log: Path, env: Optional[dict] = None, preexec_fn=None,
                 argv: Optional[list] = None):
        self.config = Path(config)
        self.log_path = Path(log)
        self.env = env or {}
        self.preexec_fn = preexec_fn
        self.argv = argv or [sys.executable, "-m", "edge", "run", "--config", str(config),
                             "--simulate", "--no-keys"]
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "EdgeDaemon":
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environ.update(PYTHONUNBUFFERED="1", **self.env)
        environ.setdefault("PYTHONPATH", str(REPO))
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        # Through a pipe, not the file itself: a file-size limit set on the daemon (a full disk)
        # must not hit its own log.
        self.proc = subprocess.Popen(self.argv, env=environ, cwd=str(self.config.parent),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._copy, args=(self.proc.stdout, self._log), daemon=True)
        self._reader.start()
        return self

    @staticmethod
    def _copy(pipe, log) -> None:
        for line in iter(pipe.readline, b""):
            log.write(line)
            log.flush()
        pipe.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A power cut: SIGKILL, no clean-up of any kind."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as systemd stops it; the exit code."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"daemon did not stop within {timeout}s after SIGTERM")
        return self.proc.returncode if self.proc is not None else 0

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "_reader", None) is not None:
            self._reader.join(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        if self.proc is not None and self.proc.poll() is not None and getattr(self, "_reader", None):
            self._reader.join(10)     # the daemon is gone: everything it wrote is in the file
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def proc_status(self) -> dict:
        """Fields of /proc/<pid>/status (VmHWM, VmRSS, Threads...) of the running daemon."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
        return out

    def kib(self, field: str) -> int:
        return int(self.proc_status()[field].split()[0])

    def threads(self) -> int:
        return int(self.proc_status()["Threads"])


