"""Running under systemd: the notify client, the daemon's notifications, the watchdog, the unit, the installer.

Nothing here needs systemd running: a real AF_UNIX datagram socket stands in for systemd's notify
socket (systemd passes its address in NOTIFY_SOCKET and the watchdog period in WATCHDOG_USEC), the
daemon runs as a real subprocess, and the unit file is checked with `systemd-analyze verify`.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import pytest

import edge.systemd
from edge.cli import build_parser
from edge.config import load_config
from edge.image import list_images
from edge.systemd import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge.service"
INSTALL = REPO / "systemd" / "install.sh"
SYSUSERS = REPO / "systemd" / "edge.sysusers"

WATCHDOG_USEC = 400_000          # the daemon tests' WatchdogSec: 0.4 s, so pings are due every 0.2 s
PING = WATCHDOG_USEC / 2e6


def need_tool(name: str) -> str:
    """The path of a command-line tool, or skip (fail in CI, where .ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (apt-get install systemd)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- a stand-in for systemd's notify socket ------------------------------------------------------

class NotifyListener:
    """A real unix datagram socket that records every notification with its arrival time."""

    def __init__(self, address: str):
        self.address = address                    # what goes into NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages = []                         # (time.monotonic(), text), oldest first

    def receive(self, seconds: float) -> list:
        """Everything that arrives within `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            if select.select([self.sock], [], [], left)[0]:
                item = (time.monotonic(), self.sock.recv(4096).decode())
                self.messages.append(item)
                got.append(item)

    def wait_for(self, line: str, timeout: float, why: str = "") -> float:
        """The arrival time of the next message holding `line`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in self.receive(min(0.1, max(0.0, deadline - time.monotonic()))):
                if line in text.split("\n"):
                    return at
        pytest.fail(f"no {line} within {timeout}s {why}; got {[t for _, t in self.messages]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir():
    """A temp folder with a short path: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="edge-sd-") as folder:
        yield Path(folder)


@pytest.fixture(params=["path", "abstract"])
def listener(request, short_dir, monkeypatch):
    """A notify socket (a file, or an abstract `@name`) with NOTIFY_SOCKET pointing at it."""
    if request.param == "path":
        address = str(short_dir / "notify")
    else:
        address = f"@edge-test-{uuid.uuid4().hex}"
    sock = NotifyListener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield sock
    sock.close()


# --- (a) the Notifier against a real socket ------------------------------------------------------

def test_ready_status_and_stopping_arrive_as_sent(listener):
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready("classes: A, B, C")
    notifier.status("camera: folder")
    notifier.stopping()
    texts = [text for _, text in listener.receive(0.5)]
    assert texts == ["READY=1\nSTATUS=classes: A, B, C", "STATUS=camera: folder", "STOPPING=1"]
    notifier.close()


def test_ready_without_status_is_just_ready(listener):
    notifier = Notifier()
    notifier.ready()
    assert [text for _, text in listener.receive(0.3)] == ["READY=1"]
    notifier.close()


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_at_most_every_half_period(listener, monkeypatch):
    clock = FakeClock()
    # Only edge.systemd sees the fake clock (the listener keeps real time for its timeouts).
    monkeypatch.setattr(edge.systemd, "time", types.SimpleNamespace(monotonic=clock))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")           # WatchdogSec=2s: ping every 1 s
    notifier = Notifier()
    assert notifier.watchdog_interval == 1.0
    pinged = []
    for t in (0.0, 0.1, 0.5, 0.99, 1.0, 1.2, 1.99, 2.0, 5.0, 5.5):
        clock.now = 1000.0 + t
        notifier.watchdog()
        if listener.receive(0.05):
            pinged.append(t)
    assert pinged == [0.0, 1.0, 2.0, 5.0]
    assert {text for _, text in listener.messages} == {"WATCHDOG=1"}
    notifier.close()


@pytest.mark.parametrize("usec", [None, "0", "", "soon", "-5"])
def test_no_watchdog_pings_without_a_watchdog(listener, monkeypatch, usec):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    notifier = Notifier()
    assert notifier.watchdog_interval is None
    for _ in range(3):
        notifier.watchdog()
    notifier.ready()
    assert [text for _, text in listener.receive(0.3)] == ["READY=1"]    # the socket works; no pings
    notifier.close()


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_sending_never_raises_when_the_socket_is_gone(short_dir, monkeypatch):
    path = short_dir / "notify"
    gone = NotifyListener(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier()
    gone.close()
    path.unlink()                                   # systemd went away: ENOENT
    notifier.ready("x")
    notifier.watchdog()
    NotifyListener(str(path)).close()               # a socket file nobody listens on: ECONNREFUSED
    notifier.stopping()
    notifier.close()
    notifier.stopping()                             # after close: still harmless
    abstract = Notifier(address=f"@edge-test-{uuid.uuid4().hex}")   # no such abstract socket
    abstract.ready()
    abstract.close()


def test_sending_never_blocks_on_a_full_socket(short_dir):
    path = short_dir / "notify"
    deaf = NotifyListener(str(path))                # bound, never read: its queue fills up
    code = ("from edge.systemd import Notifier\n"
            f"n = Notifier(address={str(path)!r}, watchdog_usec='')\n"
            "for _ in range(1000):\n    n.send('WATCHDOG=1')\n")
    try:
        result = subprocess.run([sys.executable, "-c", code], timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("Notifier.send blocked on a full notify socket")
    finally:
        deaf.close()
    assert result.returncode == 0


# --- (b) and (c): the daemon as a subprocess -----------------------------------------------------

@pytest.fixture
def photos(clothing, tmp_path) -> Path:
    """A camera folder with a few real photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in list_images(clothing / "test" / "hat")[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def write_config(tmp_path: Path, photos: Path) -> Path:
    """A config for a simulated box: the folder camera, the store in tmp_path, no MQTT."""
    path = tmp_path / "config.yaml"
    # JSON strings are YAML strings: safe quoting for any temp path.
    path.write_text("camera:\n"
                    "  source: folder\n"
                    f"  folder: {json.dumps(str(photos))}\n"
                    "  fps: 10\n"
                    "store:\n"
                    f"  path: {json.dumps(str(tmp_path / 'store'))}\n")
    return path


class Daemon:
    """`edge run` in a subprocess, as systemd would start it (NOTIFY_SOCKET, WATCHDOG_USEC)."""

    def __init__(self, argv, listener: NotifyListener, tmp_path: Path, env=None):
        environ = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "LISTEN_FDS")}
        environ.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC=str(WATCHDOG_USEC),
                       PYTHONUNBUFFERED="1", **(env or {}))
        self.log_path = tmp_path / "daemon.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=environ, cwd=tmp_path, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def started():
    """Daemons of this module (driven through the notify socket), closed at teardown."""
    daemons = []
    yield daemons
    for daemon in daemons:
        daemon.close()


@pytest.mark.slow
def test_daemon_is_ready_feeds_the_watchdog_and_stops_cleanly(tmp_path, photos, short_dir, started):
    listener = NotifyListener(str(short_dir / "notify"))
    config = write_config(tmp_path, photos)
    daemon = Daemon([sys.executable, "-m", "edge", "run", "--config", str(config), "--simulate", "--no-keys"],
                    listener, tmp_path)
    started.append(daemon)
    try:
        ready = listener.wait_for("READY=1", 90, "after start")
        first = listener.messages[0][1].split("\n")
        assert first[0] == "READY=1" and first[1].startswith("STATUS="), "READY=1 (with STATUS) comes first"

        window = 3.0
        got = listener.receive(window)
        pings = [at for at, text in got if text == "WATCHDOG=1"]
        assert len(pings) >= 5, f"the frame loop should keep pinging; got {len(pings)} in {window}s"
        # Paced at half of WATCHDOG_USEC: never more often than every 0.2 s (+2 for the window edges).
        assert len(pings) <= window / PING + 2, f"{len(pings)} pings in {window}s is faster than every {PING}s"
        assert daemon.proc.poll() is None
        assert ready < pings[0]

        daemon.proc.send_signal(signal.SIGHUP)          # `systemctl reload` or a closed terminal
        after_hup = listener.receive(1.5)
        assert daemon.proc.poll() is None, "SIGHUP must not kill the box"
        assert any(text == "WATCHDOG=1" for _, text in after_hup), "the loop goes on after SIGHUP"

        daemon.proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1", 20, "after SIGTERM")
        assert daemon.proc.wait(20) == 0
    except BaseException:
        print(daemon.log())
        raise
    finally:
        listener.close()
    assert "stopped cleanly" in daemon.log()
    assert "SIGHUP: the box does not reload its config" in daemon.log()


# The camera's read() never returns once the trigger file exists, like a camera driver that stops
# delivering frames. Everything else is the real daemon: the CLI, the loop, the notifier.
HANGING_CAMERA = """
import sys, threading
from pathlib import Path
import edge.camera
trigger = Path(sys.argv[1])
real_read = edge.camera.FolderCamera.read
def read(self):
    if trigger.exists():
        threading.Event().wait()
    return real_read(self)
edge.camera.FolderCamera.read = read
from edge.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_hung_camera_read_stops_the_watchdog_pings(tmp_path, photos, short_dir, started):
    """What makes systemd (WatchdogSec=) kill and restart a box whose camera hangs.

    A FIFO named x.jpg does not do it: the folder camera lists regular files only, so it is
    skipped, and a fake camera read is the honest way to hang the loop in a subprocess.
    """
    listener = NotifyListener(str(short_dir / "notify"))
    config = write_config(tmp_path, photos)
    trigger = tmp_path / "hang"
    daemon = Daemon([sys.executable, "-c", HANGING_CAMERA, str(trigger),
                     "run", "--config", str(config), "--simulate", "--no-keys"],
                    listener, tmp_path, env={"PYTHONFAULTHANDLER": "1"})
    started.append(daemon)
    try:
        listener.wait_for("READY=1", 90, "after start")
        for _ in range(3):
            listener.wait_for("WATCHDOG=1", 5, "while the camera works")

        trigger.touch()
        hung_at = time.monotonic()
        silence = 5 * WATCHDOG_USEC / 1e6       # several whole WatchdogSec periods without a ping
        last_ping = hung_at
        deadline = hung_at + 20
        while time.monotonic() - last_ping < silence:
            assert time.monotonic() < deadline, "the pings never stopped after the camera hung"
            for at, text in listener.receive(0.1):
                if text == "WATCHDOG=1":
                    last_ping = at
        assert daemon.proc.poll() is None, "the box hangs rather than exits: only the watchdog notices"

        # What systemd does when WatchdogSec= passes: SIGABRT. With PYTHONFAULTHANDLER=1 (as in
        # the unit) the journal then shows where the box was stuck.
        daemon.proc.send_signal(signal.SIGABRT)
        assert daemon.proc.wait(20) == -signal.SIGABRT
        log = daemon.log()
        assert "Fatal Python error: Aborted" in log
        assert "in _next_frame" in log
    except BaseException:
        print(daemon.log())
        raise
    finally:
        listener.close()


def test_a_fifo_in_the_camera_folder_does_not_hang_the_folder_camera(tmp_path):
    """Why the test above fakes the read instead of using a FIFO: FIFOs are not listed."""
    (tmp_path / "x.jpg").touch()
    os.mkfifo(tmp_path / "y.jpg")
    assert [p.name for p in list_images(tmp_path)] == ["x.jpg"]


# --- (d) the unit file ---------------------------------------------------------------------------

def unit_settings(text: str) -> list:
    """(section, key, value) for every setting line, in order (keys may repeat)."""
    section, items = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        items.append((section, key.strip(), value.strip()))
    return items


def test_unit_declares_notify_watchdog_restart_and_user():
    settings = unit_settings(UNIT.read_text())
    one = {(s, k): v for s, k, v in settings}
    assert one[("Service", "Type")] == "notify"
    assert one[("Service", "NotifyAccess")] == "main"
    assert one[("Service", "WatchdogSec")] == "30s"
    assert one[("Service", "Restart")] == "on-failure"
    assert one[("Service", "User")] == "edge" and one[("Service", "Group")] == "edge"
    assert set(one[("Service", "SupplementaryGroups")].split()) == {"gpio", "video"}
    assert one[("Service", "StateDirectory")] == "edge"
    assert one[("Service", "ConfigurationDirectory")] == "edge"
    assert one[("Service", "LoadCredential")] == "mqtt-password:/etc/edge/mqtt-password"
    assert one[("Service", "DevicePolicy")] == "closed"
    assert ("Service", "PrivateDevices") not in one, "PrivateDevices hides GPIO and the camera"
    allowed = {v.split()[0] for s, k, v in settings if k == "DeviceAllow"}
    assert {"char-gpiochip", "char-video4linux", "char-media", "char-dma_heap"} <= allowed
    assert set(one[("Service", "RestrictAddressFamilies")].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "PYTHONUNBUFFERED=1" in [v for s, k, v in settings if k == "Environment"]
    assert one[("Service", "UMask")] == "0027" and one[("Service", "StateDirectoryMode")] == "0750"


def test_under_the_units_umask_the_store_and_exports_are_not_world_readable(tmp_path):
    """What the box learned (and its exports) must not be readable by other users of the Pi."""
    code = """
import os, sys
import numpy as np
from pathlib import Path
from edge import transfer
from edge.store import Store
os.umask(0o027)
folder = Path(sys.argv[1])
with Store(folder / "store", "a" * 64, 8) as s:
    with s.command():
        s.add_class("A")
        s.add_samples("A", np.ones((2, 8), np.float32), "button", s.new_burst())
    transfer.export(s, folder / "out.edge")
"""
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    made = [p for p in tmp_path.rglob("*")]
    assert any(p.name == "out.edge" for p in made) and any(p.name == "knowledge.db" for p in made)
    loose = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in made if p.stat().st_mode & 0o007}
    assert loose == {}, loose


def test_unit_execstart_is_a_valid_edge_command_line():
    one = {(s, k): v for s, k, v in unit_settings(UNIT.read_text())}
    argv = one[("Service", "ExecStart")].split()
    assert argv[0] == "/opt/edge/.venv/bin/edge"
    script = INSTALL.read_text()
    assert "PREFIX=/opt/edge" in script and "CONFIG=$ETC_DIR/config.yaml" in script    # what it installs
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.no_keys, args.simulate) == ("run", "/etc/edge/config.yaml", True, False)


def test_every_unit_setting_is_commented():
    previous = ""
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        if line and not line.startswith(("#", "[")):
            assert previous.startswith("#"), f"edge.service line {number} has no comment above it: {line}"
        previous = line


def test_systemd_analyze_verify_passes(tmp_path):
    """`systemd-analyze verify` on a copy whose ExecStart binary exists here (the venv is in /opt
    only on a Pi); every other line is the shipped file's. Warnings count as failures."""
    analyze = need_tool("systemd-analyze")
    stub = tmp_path / "bin" / "edge"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    original = UNIT.read_text().splitlines()
    copy = [line.replace("ExecStart=/opt/edge/.venv/bin/edge ", f"ExecStart={stub} ", 1) for line in original]
    changed = [i for i, (a, b) in enumerate(zip(original, copy)) if a != b]
    assert len(changed) == 1 and original[changed[0]].startswith("ExecStart=")
    unit = tmp_path / "edge.service"
    unit.write_text("\n".join(copy) + "\n")
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 even for an unknown key or an unparsable value; it only warns.
    assert not [line for line in output.splitlines() if "edge.service" in line], output


def test_systemd_analyze_rejects_the_unit_without_the_venv():
    """The check above is not vacuous: with the real path, verify notices the missing venv."""
    analyze = need_tool("systemd-analyze")
    if Path("/opt/edge/.venv/bin/edge").exists():
        pytest.skip("edge is installed in /opt/edge here")
    result = subprocess.run([analyze, "verify", "--man=no", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "/opt/edge/.venv/bin/edge" in result.stdout + result.stderr


def test_sysusers_creates_edge_in_gpio_and_video(tmp_path):
    sysusers = need_tool("systemd-sysusers")
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers --root needs root to write the shadow files")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for _ in range(2):                                   # twice: the second run changes nothing
        subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, capture_output=True, timeout=60)
    passwd = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()]
    groups = {}
    for line in (root / "etc" / "group").read_text().splitlines():
        name, _, _, members = line.split(":")
        groups[name] = members.split(",")
    edge_user = [entry for entry in passwd if entry[0] == "edge"]
    assert len(edge_user) == 1
    assert edge_user[0][5] == "/var/lib/edge" and edge_user[0][6].endswith("nologin")
    assert "edge" in groups["gpio"] and "edge" in groups["video"]


# --- (e) the installer ---------------------------------------------------------------------------

# Commands that change the system: in a dry run none of them may run. Stubs that record any call
# and fail stand in for them at the front of PATH.
MUTATING = ["apt-get", "apt", "systemctl", "systemd-sysusers", "useradd", "usermod", "groupadd", "install",
            "mkdir", "rm", "mv", "cp", "ln", "chown", "chmod", "tar", "rsync", "mktemp", "runuser"]


@pytest.fixture
def guarded_path(tmp_path):
    """A PATH whose mutating commands are recording stubs; returns (env, call log)."""
    bin_dir = tmp_path / "guard"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name in MUTATING:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    return env, bin_dir, calls


def test_install_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.access(INSTALL, os.X_OK), "install.sh must be executable (sudo systemd/install.sh)"


def test_install_dry_run_prints_every_step_and_changes_nothing(guarded_path):
    env, _, calls = guarded_path
    result = subprocess.run(["bash", str(INSTALL), "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "dry run" in out
    for step in range(1, 7):
        assert f"==> {step}/6 " in out
    for command in ("systemd-sysusers /etc/sysusers.d/edge.conf", "/opt/edge/script/bootstrap",
                    "/opt/edge/.venv/bin/edge check-config /etc/edge/config.yaml",
                    "/etc/systemd/system/edge.service", "systemctl daemon-reload",
                    "systemctl enable edge.service", "systemctl restart edge.service"):
        assert f"+ {command}" in out or command in out, f"dry run does not mention {command!r}:\n{out}"
    assert not calls.exists(), f"the dry run ran: {calls.read_text()}"


def test_install_refuses_to_run_without_root(guarded_path):
    env, bin_dir, calls = guarded_path
    fake_id = bin_dir / "id"
    fake_id.write_text('#!/bin/sh\n[ "$1" = -u ] && { echo 1000; exit 0; }\nexec /usr/bin/id "$@"\n')
    fake_id.chmod(0o755)
    result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "sudo" in result.stderr
    assert not calls.exists()


def test_install_rejects_unknown_options():
    result = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown option" in result.stderr and "Usage" in result.stderr


def test_installed_config_is_valid_and_keeps_the_store_in_var_lib(tmp_path):
    result = subprocess.run(["bash", str(INSTALL), "--print-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "config.yaml"
    path.write_text(result.stdout)
    cfg = load_config(path)
    assert cfg.store.path == Path("/var/lib/edge/store")
    shipped = load_config(REPO / "config.yaml")
    assert cfg.classes == shipped.classes and cfg.camera == shipped.camera      # only the store moved
    assert result.stdout.replace("/var/lib/edge/store", "var/store") == (REPO / "config.yaml").read_text()
