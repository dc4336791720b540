"""Reliability and security: faults survived, bad input refused, nothing lost — counted.

Every test drives the real thing: the daemon is `python -m edge run --config X --simulate --no-keys`
in a subprocess (tests/faults_daemon.py) talking to a real mosquitto on a free port
(tests/mqtt_broker.py); the CLI is run as a subprocess; the store is opened with `edge.store.Store`
only once the daemon is dead. The default run uses short counts; `script/reliability` (that is,
EDGE_RELIABILITY_FULL=1) runs the counts published in docs/reliability.md. Every trial count and
every failure count is printed as a `RELIABILITY <name> trials=N failures=M` line (pytest -s).

Covered elsewhere and cited, not repeated here:
* a camera whose read() hangs: tests/test_systemd.py::test_a_hung_camera_read_stops_the_watchdog_pings
* username/password and TLS against mosquitto: tests/test_mqtt.py::test_username_and_password, ::test_tls
* the unit's dedicated user and hardening: tests/test_systemd.py::test_unit_declares_notify_watchdog_restart_and_user
* store-level corrupt/torn/full-disk/other-model cases: tests/test_store.py
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge import commands as C, transfer
from edge.image import list_images
from edge.mqtt import COMMAND_MAX_BYTES, CommandInvalid
from edge.store import Store
import legacy_store_v1
from faults_daemon import REPO, count, daemon_config, wait_until
from test_box import wait_for
from mqtt_broker import MOSQUITTO, MOSQUITTO_PASSWD, Broker, Watcher, free_port, mosquitto_available

PREFIX = "edge/rel"
ACTIONS = C.ACTIONS
# The daemon's peak resident memory may not pass this while it refuses hostile frames (VmHWM).
FRAME_RSS_BOUND_MIB = 200

pytestmark = pytest.mark.skipif(
    not mosquitto_available() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="mosquitto is not installed (apt install mosquitto mosquitto-clients)")


def report(name: str, trials: int, failures: int, **extra) -> None:
    """One machine-readable line per fault class (collected by script/reliability)."""
    more = "".join(f" {k}={v}" for k, v in extra.items())
    line = f"RELIABILITY {name} trials={trials} failures={failures}{more}"
    print(line)
    out = os.environ.get("EDGE_RELIABILITY_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


# --- fixtures -------------------------------------------------------------------------------------

def online_after(w, mark, timeout=90) -> int:
    """Wait for the daemon's "online"; the mark just before it (what follows is from this daemon,
    not a retained leftover of an earlier one)."""
    m = w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online" and not m.retain, after=mark, timeout=timeout)
    with w._cond:   # by identity: paho's MQTTMessage compares equal by mid alone
        return next(i for i in range(mark, len(w.messages)) if w.messages[i] is m)


def state_after(w, mark, predicate=lambda s: True, timeout=30) -> dict:
    m = w.wait(f"{PREFIX}/state", lambda m: predicate(json.loads(m.payload)), after=mark, timeout=timeout)
    return json.loads(m.payload)


def send(w, action, payload, timeout=30) -> dict:
    mark = w.mark()
    w.publish(f"{PREFIX}/cmd/{action}", payload)
    return json.loads(w.wait(f"{PREFIX}/cmd/result", after=mark, timeout=timeout).payload)


def on_after(w, topic: str, start: int) -> list:
    """Messages on `topic` received since mark `start`."""
    with w._cond:
        return [m for m in w.messages[start:] if m.topic == topic]


def counts_of(state: dict) -> dict:
    return {c["name"]: c["samples"] for c in state["classes"]}


def photo_bytes(clothing, n=12) -> list:
    files = list_images(clothing / "train" / "shoes")[: n // 2] + list_images(clothing / "train" / "hat")[: n // 2]
    return [f.read_bytes() for f in files]


class FramePump:
    """Publishes photos to camera/frame at a steady rate on its own thread (a webcam page)."""

    def __init__(self, w: Watcher, frames: list, rate: float = 20.0):
        self.w, self.frames, self.gap = w, frames, 1.0 / rate
        self.sent = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self.stop_event.is_set():
            self.w.client.publish(f"{PREFIX}/camera/frame", self.frames[i % len(self.frames)], qos=0)
            self.sent += 1
            i += 1
            self.stop_event.wait(self.gap)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(5)


def open_store(path: Path, engine) -> Store:
    s = Store(path, engine.model_id, engine.dim, max_per_class=100000)
    s.open()
    return s


def tree(root: Path) -> dict:
    """{relative path: sha256} of every file under root (the lock file holds a pid: skipped)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != "lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def counts_on_disk(s: Store) -> dict:
    return {c.name: c.count for c in s.classes() if c.count}


def add(s: Store, name: str, vectors: np.ndarray) -> None:
    """One recorded burst of `name` (the class is made, unbound, if the store lacks it)."""
    with s.command():
        if name not in [c.name for c in s.classes()]:
            s.add_class(name)
        s.add_samples(name, np.asarray(vectors, np.float32), "button", s.new_burst())


def prefill(path: Path, engine, clothing, n=3) -> None:
    s = open_store(path, engine)
    add(s, "shoes", np.stack([engine.embed(Image.open(f)) for f in list_images(clothing / "train" / "shoes")[:n]]))
    with s.command():
        s.set_setting("threshold", 0.3)
    s.close()


# --- power loss -----------------------------------------------------------------------------------

def test_power_loss_while_recording_loses_no_acknowledged_sample(tmp_path, broker, watchers, daemons,
                                                                 engine, clothing):
    """SIGKILL the daemon at random moments while cmd/record runs on frames arriving over MQTT.

    Persist first, then announce: every `sample_added` event and every `state` the box published
    before the kill is a promise that the samples are on disk. After each kill the store is opened
    (the daemon is dead) and must hold at least the announced count of every class, and must open
    without any damage but a torn tail (nothing half-written is read); the restarted daemon's
    retained state must show the same.
    """
    trials = count(15, 200, "power_loss")
    rng = random.Random(1)
    store_path = tmp_path / "store"
    config = daemon_config(tmp_path, broker.port, PREFIX, store=store_path)
    daemon = daemons(config)
    w = watchers(broker)
    floor = {"shoes": 0, "hat": 0}
    failures, samples_acked = 0, 0
    problems = []
    with FramePump(w, photo_bytes(clothing), rate=25):
        for trial in range(trials):
            mark = w.mark()
            daemon.start()
            st = state_after(w, online_after(w, mark))
            restarted = counts_of(st)
            lost = {c: (restarted.get(c, 0), n) for c, n in floor.items() if restarted.get(c, 0) < n}
            if lost:
                failures += 1
                problems.append(f"trial {trial}: restarted daemon's state lost samples {lost}")
            if max(floor.values()) > 150:      # keep the store small: an acknowledged clear resets
                assert send(w, "clear", json.dumps({"all": True, "id": f"c{trial}"}))["ok"]
                floor = {"shoes": 0, "hat": 0}
            base = w.mark()
            name = rng.choice(["shoes", "hat"])
            body = {"class": name, "count": 500} if rng.random() < 0.5 else {"class": name, "seconds": 60}
            result = send(w, "record", json.dumps(dict(body, id=f"r{trial}")))
            assert result["ok"], result
            time.sleep(rng.uniform(0.05, 1.5))
            kill_mark = w.mark()
            daemon.kill()
            # The broker publishes the last will once it sees the connection drop; everything the
            # daemon sent before its death reached the broker (and this watcher) before that.
            w.wait(f"{PREFIX}/status", lambda m: m.payload == b"offline", after=kill_mark, timeout=20)
            for m in w.messages[base:]:
                if m.topic == f"{PREFIX}/event":
                    e = json.loads(m.payload)
                    if e["event"] == "sample_added":
                        floor[e["class"]] = max(floor[e["class"]], e["samples"])
                        samples_acked += 1
                elif m.topic == f"{PREFIX}/state":
                    for c, n in counts_of(json.loads(m.payload)).items():
                        if c in floor:
                            floor[c] = max(floor[c], n)
            s = open_store(store_path, engine)
            try:
                on_disk = counts_on_disk(s)
                bad = list(s.faults)
                lost = {c: (on_disk.get(c, 0), n) for c, n in floor.items() if on_disk.get(c, 0) < n}
                finite = all(np.isfinite(v).all() and (np.abs(v).sum(axis=1) > 0).all()
                             for v in s.all_vectors().values())
            finally:
                s.close()
            if lost or bad or not finite:
                failures += 1
                problems.append(f"trial {trial}: on disk {on_disk}, announced {floor}, events {bad}, finite {finite}")
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    report("power_loss", trials, failures, samples_acknowledged=samples_acked)
    assert samples_acked > trials, "the kills must land while samples are being recorded"
    assert failures == 0, "\n".join(problems)


# --- fuzzed commands ------------------------------------------------------------------------------

PATHS = ["../../etc/passwd", "/etc/shadow", "..\\..\\boot.ini", "~/.ssh/id_rsa", "file:///etc/passwd",
         "/tmp/edge-pwned", "../store/journal.bin", "var/store/../../x", "\0/etc/passwd", "aside/../../evil"]
KEYS = {"record": ("class", "seconds", "count"), "clear": ("class", "all"), "rename": ("from", "to"),
        "threshold": ("value",), "classes": ("add", "remove"), "record/stop": ("class",), "undo": (), "state": (),
        "nothing": ("class", "nothing"), "samples": ("class", "limit", "before"), "sample/delete": ("sample",),
        "burst/delete": ("burst",), "thumbnails": ("ids",), "hints": ()}
ODD = [None, True, False, 0, -1, 1, 2.5, -1e308, 1e308, 10 ** 40, "", " ", "shoes", "SHOES", "hat",
       "unknown", "auto", "NaN", "Infinity", "0.5", [], [1], {}, {"class": "shoes"}, "é" * 40,
       "\u202eevil", "\ud83d\ude00" * 20, "x" * 33, "x" * 65, "a\nb", "%s%n", "${jndi:x}"]


def _value(rng):
    r = rng.random()
    if r < 0.3:
        return rng.choice(PATHS)
    if r < 0.7:
        return rng.choice(ODD)
    if r < 0.8:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
    if r < 0.9:
        return "nosuch-" + str(rng.randrange(10 ** 6))
    return rng.choice(ODD) if rng.random() < 0.5 else {"nested": rng.choice(PATHS)}


def fuzz_payload(rng, action: str) -> bytes:
    """One hostile payload for `action`: random bytes, broken JSON, huge, wrong types, paths…"""
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:   # broken JSON
        good = json.dumps({k: _value(rng) for k in KEYS.get(action, ("class",))}, default=str)
        cut = rng.randrange(len(good)) if len(good) > 1 else 0
        return rng.choice([good[:cut], good + "}", "{" + good, good.replace(":", "", 1), good.replace('"', "'")]).encode()
    if kind == 2:   # huge
        n = rng.choice([COMMAND_MAX_BYTES - 20, COMMAND_MAX_BYTES + 1, 100_000, 1_000_000])
        return json.dumps({rng.choice(KEYS.get(action) or ("class",)): "A" * n}).encode()[: n + 30]
    if kind == 3:   # non-object JSON
        return json.dumps(rng.choice([[1, 2], 3, None, True, 1.5, [{"class": "shoes"}], "\0"])).encode()
    if kind == 4:   # plain text, often a path
        return str(_value(rng)).encode("utf-8", "surrogatepass")
    if kind == 5:   # unknown keys next to known ones
        body = {k: _value(rng) for k in KEYS.get(action, ())}
        body[rng.choice(["path", "file", "Class", "cmd", "__proto__", "../x", "id2"])] = rng.choice(PATHS)
        return json.dumps(body, default=str).encode()
    if kind == 6:   # JSON numbers Python accepts but JSON does not
        key = rng.choice(KEYS.get(action) or ("value",))
        return ('{"%s": %s}' % (key, rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1" * 500]))).encode()
    if kind == 7:   # a bad id alongside
        body = {k: _value(rng) for k in KEYS.get(action, ())}
        body["id"] = rng.choice([[1], {"a": 1}, "i" * 200, 1.5, True, None, "ok-id"])
        return json.dumps(body, default=str).encode()
    # wrong types / unknown classes / paths in every field
    body = {k: _value(rng) for k in KEYS.get(action, ()) if rng.random() < 0.8}
    if rng.random() < 0.5:
        body["id"] = rng.randrange(10 ** 9)
    return json.dumps(body, default=str, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


BUTTON_CLASSES = ["shoes", "hat"]
LINK_BATCH = int(os.environ.get("EDGE_RELIABILITY_LINK_BATCH", "150"))


def box_verdict(command) -> str:
    """What the box does with a command that parsed, for the two-class box of these tests (3
    samples of shoes in one burst, no recording): "refused", "harmless" (ok, no change) or
    "valid" (a change: the generator keeps those out of the bulk run; they are sent separately)."""
    known = lambda name: isinstance(name, str) and name.casefold() in BUTTON_CLASSES  # noqa: E731
    if isinstance(command, (C.State, C.Hints, C.Thumbnails)):
        return "harmless"
    if isinstance(command, C.ListSamples):
        return "harmless" if known(command.cls) else "refused"
    if isinstance(command, C.StopRecording):
        return "refused"
    if isinstance(command, (C.Undo, C.SetThreshold, C.AddClass)):
        return "valid"
    if isinstance(command, (C.Record, C.SetNothing)):
        return "valid" if known(command.cls) else "refused"
    if isinstance(command, C.Clear):
        return "valid" if command.cls is None or known(command.cls) else "refused"
    if isinstance(command, C.Rename):
        return "valid" if known(command.old) else "refused"
    if isinstance(command, (C.DeleteSample, C.DeleteBurst)):
        return "valid" if (command.id if isinstance(command, C.DeleteSample) else command.burst) < 10 ** 6 \
            else "refused"
    return "refused"   # RemoveClass: unknown classes, or a config class ("clear it instead")


def fuzz_cases(rng, n: int):
    """n (topic action, payload, expectation) triples; expectation is ("link", result dict) for a
    payload edge/mqtt.py refuses, ("box", "refused"|"harmless") for one the box answers."""
    cases, valid_skipped = [], 0
    topics = list(ACTIONS) + ["RECORD", "record/start", "jump", "x" * 100, "../../etc/passwd", "state/x", ""]
    while len(cases) < n:
        action = rng.choice(topics) if rng.random() < 0.1 else rng.choice(ACTIONS)
        payload = fuzz_payload(rng, action)
        try:
            command, _ = C.parse_payload(action, payload)
        except CommandInvalid as exc:
            result = {"action": action[:64], "ok": False, "error": str(exc)}
            ident = C.loose_id(payload)
            if ident is not None:
                result["id"] = ident
            cases.append((action, payload, ("link", result)))
            continue
        verdict = box_verdict(command)
        if verdict == "valid":
            valid_skipped += 1
            continue
        cases.append((action, payload, ("box", verdict)))
    return cases, valid_skipped


def test_fuzzed_commands_are_refused_and_change_nothing(tmp_path, broker, watchers, daemons, engine, clothing):
    total = count(1000, 10000, "fuzz_commands")
    store_path = tmp_path / "store"
    prefill(store_path, engine, clothing)
    config = daemon_config(tmp_path, broker.port, PREFIX, store=store_path)
    daemon = daemons(config)
    w = watchers(broker)
    mark = w.mark()
    daemon.start()
    online_after(w, mark)
    state_after(w, mark)
    before_files, before_tmp = tree(store_path), set(p for p in tmp_path.rglob("*") if "broker" not in p.parts)
    rng = random.Random(20240612)
    cases, valid_skipped = fuzz_cases(rng, total)
    link = [c for c in cases if c[2][0] == "link"]
    box = [c for c in cases if c[2][0] == "box"]
    failures, problems, fds_seen = 0, [], set()

    def run(batch, check):
        nonlocal failures
        start = w.mark()
        for action, payload, _ in batch:
            w.client.publish(f"{PREFIX}/cmd/{action}", payload, qos=1)
        try:
            wait_until(lambda: len(on_after(w, f"{PREFIX}/cmd/result", start)) >= len(batch), timeout=60,
                       what=f"{len(batch)} answers")
        except AssertionError:
            pass
        answers = [json.loads(m.payload) for m in on_after(w, f"{PREFIX}/cmd/result", start)]
        if len(answers) != len(batch):
            failures += abs(len(batch) - len(answers))
            problems.append(f"{len(batch)} commands sent, {len(answers)} answered")
        for (action, payload, expected), got in zip(batch, answers):
            if not check(expected[1], got):
                failures += 1
                problems.append(f"{action} {payload[:80]!r}: expected {expected[1]}, got {got}")
        for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd"):
            try:
                fds_seen.add(os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}"))
            except OSError:
                pass

    for i in range(0, len(link), LINK_BATCH):
        run(link[i:i + LINK_BATCH], lambda want, got: got == want)
    for i in range(0, len(box), 50):
        run(box[i:i + 50], lambda want, got: got["ok"] is (want == "harmless") and (got["ok"] or got.get("error")))
    assert daemon.alive
    # Only documented topics act: messages on other topics (and on cmd/result) are ignored.
    for topic in ("state", "label", "status", "event", "cmd/result", "camera/frame/x", "cmd"):
        w.publish(f"{PREFIX}/{topic}", b'{"class": "shoes", "add": "ghost"}')
    result = send(w, "state", b"{}")
    assert result["action"] == "state" and result["ok"] is True
    st = counts_of(state_after(w, 0, lambda s: True))
    after_files = tree(store_path)
    unchanged = after_files == before_files
    new_files = set(p for p in tmp_path.rglob("*") if "broker" not in p.parts) - before_tmp
    new_files = {p for p in new_files if not p.name.startswith("daemon")}
    outside = {f for f in fds_seen if f.startswith("/") and not f.startswith(("/dev/", str(tmp_path), str(REPO),
                                                                             sys.prefix, "/usr/", "/proc/"))}
    # Valid commands are accounted for: they change exactly what they say.
    assert send(w, "threshold", b'{"value": 0.5, "id": "v1"}') == {"action": "threshold", "ok": True, "id": "v1"}
    assert send(w, "classes", b'{"add": "cap"}')["ok"]
    assert send(w, "rename", b'{"from": "cap", "to": "beanie"}')["ok"]
    assert send(w, "classes", b'{"remove": "beanie"}')["ok"]
    assert daemon.stop() == 0
    s = open_store(store_path, engine)
    try:
        settings, counts = s.settings(), counts_on_disk(s)
        names = [c.name for c in s.classes()]
    finally:
        s.close()
    log = daemon.log()
    report("fuzz_commands", len(cases), failures + (not unchanged) + len(new_files) + len(outside),
           link_refused=len(link), box_answered=len(box), valid_generated_not_sent=valid_skipped)
    assert failures == 0, "\n".join(problems[:30])
    assert unchanged, "invalid commands changed the store files"
    assert not new_files, f"files created: {new_files}"
    assert not outside, f"the daemon opened files outside its tree: {outside}"
    assert st == {"shoes": 3, "hat": 0}
    assert counts == {"shoes": 3} and settings["threshold"] == 0.5 and names == ["shoes", "hat"]
    assert "Traceback" not in log, log[-3000:]


# --- the broker: absent at boot, restarted, network cut -------------------------------------------

def trained_store(path: Path, engine, clothing, n=4) -> None:
    s = open_store(path, engine)
    for name in ("shoes", "hat"):
        files = list_images(clothing / "train" / name)[:n]
        add(s, name, np.stack([engine.embed(Image.open(f)) for f in files]))
    s.close()


def show(folder: Path, clothing, name: str) -> None:
    """Put two of the photos trained_store taught into the camera folder: the scene's answer is
    then certain, so what is checked is the link (not the head's accuracy on unseen photos)."""
    for old in folder.iterdir():
        old.unlink()
    for f in list_images(clothing / "train" / name)[:2]:
        shutil.copy(f, folder / f.name)


def retained(broker, timeout=10) -> dict:
    """What a dashboard connecting now sees at once: the retained status, label and state."""
    time.sleep(0.5)     # the box re-sends them right after "online"; let that settle first
    w = Watcher(broker, topics=(f"{PREFIX}/status", f"{PREFIX}/label", f"{PREFIX}/state"))
    try:
        wait_until(lambda: len({m.topic for m in w.messages}) >= 3, timeout=timeout, what="retained topics")
        time.sleep(0.2)
        return {m.topic.rsplit("/", 1)[1]: m.payload for m in w.messages}   # the newest of each
    finally:
        w.close()


def test_broker_absent_at_boot_restarted_and_cut_off(tmp_path, watchers, daemons, engine, clothing):
    restarts = count(3, 20, "broker_restarts")
    broker = Broker(tmp_path / "broker")
    camera = tmp_path / "camera"
    camera.mkdir()
    show(camera, clothing, "hat")
    store_path = tmp_path / "store"
    trained_store(store_path, engine, clothing)
    config = daemon_config(tmp_path, broker.port, PREFIX, source="folder", camera_folder=camera,
                           store=store_path, mqtt={"max_queue": 50, "rate": 5})
    daemon = daemons(config)
    failures, problems, resume = 0, [], []
    try:
        daemon.start()                          # no broker yet
        time.sleep(4)
        assert daemon.alive
        outages = [("boot", 0.0)] + [("restart", 0.5 + (i % 4)) for i in range(restarts)] + [("cut", 8.0)]
        label = "hat"
        for i, (kind, down) in enumerate(outages):
            if kind != "boot":
                w = watchers(broker)
                before = json.loads(w.wait(f"{PREFIX}/prediction", timeout=30).payload)["frame"]
                w.close()
                broker.stop()                   # SIGKILL: a crash or the network gone
                label = "shoes" if label == "hat" else "hat"
                show(camera, clothing, label)   # the scene changes while the box is offline
                time.sleep(down)
            else:
                before = 0
            started = time.monotonic()
            broker.start()
            w = Watcher(broker, topics=(f"{PREFIX}/status",))
            try:
                w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online", timeout=40)
            finally:
                w.close()
            took = time.monotonic() - started
            bound = min(2 * max(down, 1.0) + 1.0, 30.0) + 3.0   # paho: 1 s, doubling, at most 30 s
            resume.append(round(took, 2))
            seen = retained(broker)
            w = watchers(broker)
            try:   # predictions resume and follow the scene (not a stale one from the offline queue)
                pred = json.loads(w.wait(f"{PREFIX}/prediction", lambda m: json.loads(m.payload)["label"] == label,
                                         timeout=20).payload)
            except AssertionError:
                pred = {"label": None, "frame": -1}
            w.close()
            state = json.loads(seen.get("state", b"{}"))
            ok = (took <= bound and seen.get("status") == b"online" and seen.get("label") == label.encode()
                  and counts_of(state) == {"shoes": 4, "hat": 4} and state.get("mode") == "classifying"
                  and pred["frame"] > before and pred["label"] == label and daemon.alive)
            if not ok:
                failures += 1
                problems.append(f"{kind} {i}: resumed in {took:.1f}s (bound {bound:.1f}), retained {seen}, "
                                f"prediction {pred}, frame before {before}")
    finally:
        broker.stop()
    log = daemon.log()
    flushed = [int(n) for n in re.findall(r"connected to \S+ \((\d+) queued messages sent", log)]
    dropped = [int(n) for n in re.findall(r"(\d+) dropped so far", log)]
    bounded = max(flushed) <= 50
    report("broker_outages", len(outages), failures + (not bounded), restarts=restarts,
           max_resume_s=max(resume), max_flushed=max(flushed), dropped=max(dropped))
    assert failures == 0, "\n".join(problems)
    assert bounded, f"offline queue passed its bound of 50: {flushed}"
    assert max(dropped) > 0, "an 8 s cut at 5 predictions/s must overflow a queue of 50"
    assert "Traceback" not in log, log[-3000:]


# --- the store: corrupt, truncated, another model's, a full disk ----------------------------------

def _prefilled(folder: Path, engine, clothing) -> None:
    """3 shoes, closed cleanly: the close saves the last good copy next to the database."""
    prefill(folder, engine, clothing)


def _damage_a_page(folder: Path) -> str:
    data = bytearray((folder / "knowledge.db").read_bytes())
    data[4096:8192] = os.urandom(4096)
    (folder / "knowledge.db").write_bytes(bytes(data))
    return "kept aside"


def _truncate(folder: Path) -> str:
    path = folder / "knowledge.db"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 123])
    return "kept aside"


def _random_bytes_and_no_good_copy(folder: Path) -> str:
    (folder / "knowledge.db").write_bytes(os.urandom(20000))
    (folder / "knowledge.good.db").unlink()
    return "kept aside"


def _other_model(folder: Path) -> str:
    with Store(folder, "f" * 64, 1280) as s, s.command():
        s.add_class("shoes")
        s.add_samples("shoes", np.ones((1, 1280), np.float32), "button", s.new_burst())
    return "knowledge.db was made with model"


def _sql(statement: str):
    def inject(folder: Path) -> str:
        db = sqlite3.connect(folder / "knowledge.db")
        db.executescript(statement)
        db.close()
        return "kept aside"
    return inject


def _old_format(folder: Path, engine, clothing) -> None:
    """A store as edge 0.x wrote it: a snapshot and journal records after it (no clean close)."""
    old = legacy_store_v1.Store(folder, engine.model_id, engine.dim)
    old.open()
    files = list_images(clothing / "train" / "shoes")[:3]
    old.append({"op": "add", "class": "shoes", "vectors": np.stack([engine.embed(Image.open(f)) for f in files[:2]])})
    old.compact()
    old.append({"op": "add", "class": "shoes", "vectors": engine.embed(Image.open(files[2]))[np.newaxis]})
    old._close_files()


# name: (make the store, damage it -> the log line's needle, counts the box starts from)
STORE_FAULTS = {
    "a damaged page": (_prefilled, _damage_a_page, {"shoes": 3, "hat": 0}),
    "a truncated database": (_prefilled, _truncate, {"shoes": 3, "hat": 0}),
    "random bytes, no good copy": (_prefilled, _random_bytes_and_no_good_copy, {"shoes": 0, "hat": 0}),
    "another model's store": (None, _other_model, {"shoes": 0, "hat": 0}),
    "threshold 'banana' in the settings": (_prefilled, _sql("""INSERT OR REPLACE INTO settings VALUES ('threshold', '"banana"')"""),
                                           {"shoes": 3, "hat": 0}),
    "a class name against the rules": (_prefilled, _sql("UPDATE classes SET name = 'x/../../y' WHERE name = 'shoes'"),
                                       {"shoes": 3, "hat": 0}),
    "the old snapshot + journal format": (_old_format, lambda folder: "migrated the old-format store",
                                          {"shoes": 3, "hat": 0}),
}


def test_daemon_starts_on_a_damaged_store_logs_it_keeps_it_aside_and_works(tmp_path, broker, watchers, daemons,
                                                                            engine, clothing):
    """Each bad store: the daemon starts from the last good state (or empty), says so in one log
    line and on the status (fault "storage"), keeps the bad files in aside/, and goes on learning."""
    frames = photo_bytes(clothing, 4)
    failures, problems, logged_lines = 0, [], {}
    for n, (name, (make, damage, start_counts)) in enumerate(STORE_FAULTS.items()):
        folder = tmp_path / f"case{n}"
        store_path = folder / "store"
        if make is not None:
            make(store_path, engine, clothing)
        needle = damage(store_path)
        migrated = "migrated" in needle
        daemon = daemons(daemon_config(folder, broker.port, PREFIX, store=store_path))
        w = watchers(broker)
        mark = w.mark()
        daemon.start()
        try:
            mark = online_after(w, mark)
            first = state_after(w, mark)
            before = counts_of(first)
            assert before == start_counts, f"started from {before}, expected {start_counts}"
            assert (first["fault"] == "storage") != migrated, f"fault on the status: {first['fault']}"
            assert send(w, "record", b'{"class": "hat", "count": 2}')["ok"]
            for frame in frames:
                w.publish(f"{PREFIX}/camera/frame", frame)
                time.sleep(0.1)
            state_after(w, mark, lambda s: counts_of(s).get("hat", 0) >= 2)
            works = daemon.alive
        except AssertionError as exc:
            works = False
            problems.append(f"{name}: {exc}")
        daemon.stop()
        w.close()
        log = daemon.log()
        lines = [line for line in log.splitlines() if needle in line]
        logged_lines[name] = lines
        aside = list((store_path / "aside").glob("*/*")) if (store_path / "aside").exists() else []
        s = open_store(store_path, engine)
        after = {c.name: c.count for c in s.classes()}
        s.close()
        kept = after.get("hat") == 2 and after.get("shoes", 0) == start_counts["shoes"]
        ok = works and lines and "Traceback" not in log and aside and kept
        if not ok:
            failures += 1
            problems.append(f"{name}: works={works} lines={lines} aside={aside} after={after}\n{log[-2000:]}")
    report("store_faults_daemon", len(STORE_FAULTS), failures)
    assert failures == 0, "\n".join(problems)
    DAMAGED_STORE_LOG_LINES.update(logged_lines)


DAMAGED_STORE_LOG_LINES: dict = {}


def test_a_store_fault_is_logged_in_one_line():
    if not DAMAGED_STORE_LOG_LINES:
        pytest.skip("needs test_daemon_starts_on_a_damaged_store_logs_it_keeps_it_aside_and_works first")
    assert all(len(lines) == 1 for lines in DAMAGED_STORE_LOG_LINES.values()), DAMAGED_STORE_LOG_LINES


def test_full_disk_keeps_the_daemon_running_on_the_last_good_state(tmp_path, broker, watchers, daemons,
                                                                     engine, clothing):
    """RLIMIT_FSIZE makes every write past 250 kB fail (EFBIG), as a full card does: room for the
    empty database and its write-ahead log at start, full after some samples."""
    store_path = tmp_path / "store"
    limit = 250_000

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    daemon = daemons(daemon_config(tmp_path, broker.port, PREFIX, store=store_path), preexec_fn=limited)
    w = watchers(broker)
    mark = w.mark()
    daemon.start()
    online_after(w, mark)
    with FramePump(w, photo_bytes(clothing), rate=15):
        result = send(w, "record", b'{"class": "shoes", "count": 100}')
        assert result["ok"], result
        error = w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload).get("source") == "storage",
                       after=mark, timeout=60)
        st = state_after(w, mark, lambda s: s["fault"] == "storage" and s["mode"] == "classifying")
        later = w.mark()
        w.wait(f"{PREFIX}/prediction", after=later, timeout=20)          # still recognising
    acked = max(json.loads(m.payload)["samples"] for m in on_after(w, f"{PREFIX}/event", mark)
                if json.loads(m.payload)["event"] == "sample_added")
    assert daemon.alive and counts_of(st)["shoes"] == acked
    assert daemon.stop() == 0
    s = open_store(store_path, engine)
    try:
        on_disk, events = counts_on_disk(s), list(s.faults)
    finally:
        s.close()
    log = daemon.log()
    storage_lines = [line for line in log.splitlines() if "storage:" in line]
    report("full_disk_daemon", 1, int(on_disk.get("shoes") != acked or bool(events)), samples_acknowledged=acked)
    assert on_disk == {"shoes": acked} and events == [], (on_disk, acked, events)
    assert "could not save" in json.loads(error.payload)["message"]
    assert storage_lines and all("\n" not in line for line in storage_lines)
    assert "Traceback" not in log, log[-3000:]


# --- hostile frames -------------------------------------------------------------------------------

def _png(size, colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _bomb() -> bytes:
    """A 20000x20000 PNG (400 Mpx, 1.2 GB decoded) that compresses to well under a megabyte."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    w = h = 20000
    raw = zlib.compressobj(9)
    row = b"\0" + b"\0" * (w * 3)
    body = b"".join(raw.compress(row) for _ in range(h)) + raw.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def hostile_frames(rng, good: bytes, bomb: bytes) -> list:
    kinds = [
        lambda: good[: rng.randrange(1, len(good))],                                   # truncated JPEG
        lambda: b"\xff\xd8\xff" + os.urandom(rng.randrange(10, 5000)),                   # JPEG magic, garbage
        lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(rng.randrange(10, 5000)),              # PNG magic, garbage
        lambda: os.urandom(rng.randrange(0, 3000)),                                     # not an image
        lambda: b"GIF89a" + os.urandom(100),                                            # another format
        lambda: b"\xff\xd8\xff" + b"\0" * (5 * 1024 * 1024 + rng.randrange(1, 1000)),     # oversized
        lambda: bomb,                                                                   # decompression bomb
        lambda: _png((rng.randrange(1, 3), rng.randrange(1, 3))),                        # tiny but valid
        lambda: bytes(b ^ 0x55 if rng.random() < 0.01 else b for b in good),             # bit flips
    ]
    return [rng.choice(kinds)() for _ in range(len(kinds))]


def test_hostile_frames_are_refused_within_a_memory_bound(tmp_path, broker, watchers, daemons, clothing):
    total = count(60, 500, "fuzz_frames")
    daemon = daemons(daemon_config(tmp_path, broker.port, PREFIX))
    w = watchers(broker)
    mark = w.mark()
    daemon.start()
    online_after(w, mark)
    good = list_images(clothing / "test" / "hat")[0].read_bytes()
    bomb = _bomb()
    rng = random.Random(7)
    hwm_start = daemon.kib("VmHWM")
    sent, unanswered = 0, 0
    while sent < total:
        for frame in hostile_frames(rng, good, bomb):
            m = w.mark()
            w.publish(f"{PREFIX}/camera/frame", frame)
            sent += 1
            try:   # every frame is answered: an error event (refused) or a prediction (it was an image)
                wait_until(lambda: any(x.topic == f"{PREFIX}/prediction" or x.topic == f"{PREFIX}/event"
                                       and json.loads(x.payload).get("source") in ("frame", "camera")
                                       for x in w.messages[m:]), timeout=15, what="an answer to the frame")
            except AssertionError:
                unanswered += 1
    w.publish(f"{PREFIX}/camera/frame", good)
    m = w.mark()
    w.publish(f"{PREFIX}/camera/frame", good)
    recovered = json.loads(w.wait(f"{PREFIX}/prediction", after=m, timeout=20).payload)
    hwm = daemon.kib("VmHWM") // 1024
    alive = daemon.alive
    daemon.stop()
    log = daemon.log()
    report("fuzz_frames", sent, unanswered + (not alive) + (hwm > FRAME_RSS_BOUND_MIB),
           peak_rss_mib=hwm, rss_at_start_mib=hwm_start // 1024, bound_mib=FRAME_RSS_BOUND_MIB)
    assert alive and unanswered == 0, unanswered
    assert recovered["frame"] >= 1
    assert hwm <= FRAME_RSS_BOUND_MIB, f"peak RSS {hwm} MiB"
    assert "Traceback" not in log, log[-3000:]


def _raw_png(w: int, h: int, depth: int = 8, interlace: int = 0) -> bytes:
    """An all-black RGB PNG written a row at a time (the test never holds it decoded)."""
    import struct
    import zlib
    adam7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    passes = [((w - x + dx - 1) // dx, (h - y + dy - 1) // dy) for x, y, dx, dy in adam7] if interlace else [(w, h)]
    c, body = zlib.compressobj(9), []
    for pw, ph in passes:
        row = bytes(1 + pw * 3 * depth // 8)
        body += [c.compress(row) for _ in range(ph)]
    body.append(c.flush())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, interlace))
            + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))


def _big_jpeg(photo: Path, size, **kw) -> bytes:
    """A real photo scaled up to `size` with sensor-like noise (so it does not compress to nothing)."""
    rng = np.random.default_rng(3)
    img = Image.open(photo).convert("RGB").resize(size)
    noisy = np.asarray(img, np.int16) + rng.integers(-12, 13, (size[1], size[0], 1), np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_huge_pictures_and_messages_over_mqtt_stay_within_the_memory_bound(tmp_path, broker, watchers, daemons,
                                                                         clothing):
    """Issue 9, fault 6, through the running daemon: a 6320x6320 PNG (once 455 MiB), pictures
    that cannot be decoded reduced, and a 200 MiB message on a broker without max_packet_size
    (once 679 MiB). Each is answered (a prediction, or an error event) or, too big for the box's
    MQTT maximum packet size, never delivered; peak RSS stays within FRAME_RSS_BOUND_MIB."""
    daemon = daemons(daemon_config(tmp_path, broker.port, PREFIX))
    w = watchers(broker, topics=(f"{PREFIX}/status", f"{PREFIX}/prediction", f"{PREFIX}/event",
                                 f"{PREFIX}/cmd/result"))
    mark = w.mark()
    daemon.start()
    online_after(w, mark)
    hat = list_images(clothing / "test" / "hat")[0]
    hwm_start = daemon.kib("VmHWM") // 1024
    pictures = {"png 6320x6320": (_raw_png(6320, 6320), True),
                "png 6320x6320 16-bit": (_raw_png(6320, 6320, depth=16), False),
                "png 6320x6320 interlaced": (_raw_png(6320, 6320, interlace=1), False),
                "progressive jpeg 5000x5000": (_big_jpeg(hat, (5000, 5000), progressive=True, quality=40), False),
                "jpeg 4000x3000": (_big_jpeg(hat, (4000, 3000), quality=90), True)}
    answers, peaks = {}, {}
    for name, (data, valid) in pictures.items():
        m = w.mark()
        w.publish(f"{PREFIX}/camera/frame", data)
        answer = w.wait(f"{PREFIX}/prediction" if valid else f"{PREFIX}/event", after=m, timeout=60)
        answers[name] = (len(data), answer.topic.rsplit("/", 1)[1])
        peaks[name] = daemon.kib("VmHWM") // 1024
    # 200 MiB on the frame and the command topic, from a client of its own (the watcher does not
    # subscribe to them, so only the broker and the box could be hurt by it).
    sender = Watcher(broker, topics=(f"{PREFIX}/nothing-here",))
    try:
        for topic in (f"{PREFIX}/camera/frame", f"{PREFIX}/cmd/state"):
            sender.client.publish(topic, bytes(200 << 20), qos=0).wait_for_publish(timeout=120)
    finally:
        sender.close()
    m = w.mark()
    w.publish(f"{PREFIX}/cmd/state", b"{}")
    w.wait(f"{PREFIX}/cmd/result", after=m, timeout=30)                  # still answering commands
    m = w.mark()
    w.publish(f"{PREFIX}/camera/frame", hat.read_bytes())
    w.wait(f"{PREFIX}/prediction", after=m, timeout=30)                  # and pictures
    hwm = daemon.kib("VmHWM") // 1024
    alive = daemon.alive
    daemon.stop()
    log = daemon.log()
    report("memory_mqtt", len(pictures) + 2, int(not alive) + int(hwm > FRAME_RSS_BOUND_MIB),
           rss_at_start_mib=hwm_start, peak_rss_mib=hwm, bound_mib=FRAME_RSS_BOUND_MIB,
           **{k.replace(" ", "_"): v for k, v in peaks.items()})
    assert alive and "Traceback" not in log, log[-3000:]
    assert all(topic == ("prediction" if pictures[k][1] else "event") for k, (_, topic) in answers.items()), answers
    assert hwm <= FRAME_RSS_BOUND_MIB, (hwm, peaks)


def test_a_folder_of_phone_photos_stays_within_the_memory_bound(tmp_path, broker, watchers, daemons, clothing):
    """Issue 9, fault 6: a folder camera on 4000x3000 phone photos once kept ~900 MiB of decoded
    frames. Two passes over 24 of them, peak RSS within FRAME_RSS_BOUND_MIB."""
    camera = tmp_path / "camera"
    camera.mkdir()
    photos = [p for c in ("hat", "shoes") for p in list_images(clothing / "test" / c)[:12]]
    for i, photo in enumerate(photos):
        (camera / f"{i:02d}.jpg").write_bytes(_big_jpeg(photo, (4000, 3000), quality=92))
    size_mib = sum(p.stat().st_size for p in camera.iterdir()) / 2**20
    daemon = daemons(daemon_config(tmp_path, broker.port, PREFIX, source="folder", camera_folder=camera))
    w = watchers(broker, topics=(f"{PREFIX}/status", f"{PREFIX}/prediction"))
    mark = w.mark()
    daemon.start()
    start = online_after(w, mark)
    hwm_start = daemon.kib("VmHWM") // 1024
    wait_until(lambda: sum(m.topic == f"{PREFIX}/prediction" for m in w.messages[start:]) >= 2 * len(photos),
               timeout=180, what="two passes over the folder")
    hwm = daemon.kib("VmHWM") // 1024
    alive = daemon.alive
    daemon.stop()
    log = daemon.log()
    report("memory_folder", len(photos), int(not alive) + int(hwm > FRAME_RSS_BOUND_MIB),
           photos_mib=round(size_mib), rss_at_start_mib=hwm_start, peak_rss_mib=hwm, bound_mib=FRAME_RSS_BOUND_MIB)
    assert alive and "Traceback" not in log, log[-3000:]
    assert hwm <= FRAME_RSS_BOUND_MIB, hwm


# --- configs and imports through the real CLI -----------------------------------------------------

# Runs a command and prints its peak RSS. Linux carries the forking process's high-water mark into
# the child across exec, so the test process (hundreds of MiB) must not fork `edge` itself.
_PEAK = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write("\\nPEAK_KIB %d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def edge_cli(*args, cwd=None, timeout=120):
    """`edge ARGS` in a child; the result also carries that child's own peak RSS (`peak_mib`)."""
    r = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "edge", *map(str, args)],
                       capture_output=True, text=True, cwd=cwd, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    head, _, peak = r.stderr.rpartition("\nPEAK_KIB ")
    r.stderr, r.peak_mib = head, int(peak) / 1024
    return r


def test_invalid_config_files_give_one_line_and_exit_2_via_the_cli(tmp_path):
    """The in-process generator of tests/test_config.py, through `python -m edge check-config`."""
    import test_config as tc
    total = count(30, 300, "fuzz_config_cli")
    (tmp_path / "pics").mkdir()
    model = REPO / "models" / "mobilenet_v2_1.0_128_int8.tflite"
    valid = {
        "device_id": "box",
        "classes": [{"name": "A", "button": "GPIO17", "led": "GPIO27"},
                    {"name": "B", "button": "BOARD15", "led": 23}, {"name": "C", "button": None, "led": None}],
        "function_button": "GPIO26", "status_led": "J8:36", "led_pwm": False,
        "camera": {"source": "folder", "folder": "pics", "fps": 10, "width": 640, "mirror": False},
        "model": {"path": str(model), "threads": 2, "kernels": "auto"},
        "head": {"kind": "knn", "k": 3, "threshold": "auto", "smoothing": 5, "hysteresis": 0.1},
        "capture": {"rate": 6, "max_per_class": 200, "min_change": 0.02},
        "store": {"path": "var/store", "thumbnails": False},
        "mqtt": {"enabled": True, "host": "localhost", "port": 1883, "username": "box",
                 "password": "hunter2-secret", "prefix": "edge/box", "tls": {"insecure": False}},
    }
    text = yaml.safe_dump(valid, sort_keys=False)
    (tmp_path / "valid.yaml").write_text(text)
    ok = edge_cli("check-config", tmp_path / "valid.yaml")
    assert ok.returncode == 0, ok.stderr
    rng = random.Random(99)
    files = []
    while len(files) < total:
        i = len(files)
        content = tc._mutant(rng, valid) if i % 2 == 0 else tc._garbage(rng, text)
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else
                         yaml.safe_dump(content, sort_keys=False, allow_unicode=True).encode())
        files.append(path)

    def check(path):
        r = edge_cli("check-config", path)
        return path, r.returncode, r.stdout, r.stderr

    failures, invalid, problems = 0, 0, []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for path, rc, out, err in pool.map(check, files):
            if rc == 0:
                continue      # a mutation that happens to be valid
            invalid += 1
            lines = err.strip().splitlines()
            # every error on a line of its own (issue 10: all of them, in file order)
            good = (rc == 2 and lines and all(x.startswith(f"edge: error: {path.name}: ") for x in lines)
                    and "Traceback" not in err and "hunter2-secret" not in err + out)
            if not good:
                failures += 1
                problems.append(f"{path.name}: rc={rc} stderr={err[-500:]!r}")
    report("fuzz_config_cli", total, failures, invalid=invalid)
    assert failures == 0, "\n".join(problems[:10])
    assert invalid > total * 0.6


def _knowledge_bytes(tmp: Path, engine, names=("shoes",)) -> bytes:
    """A real export of a store with `names` (2 samples each), as `edge export` writes it."""
    folder = tmp / f"export-src-{len(list(tmp.glob('export-src-*')))}"
    with Store(folder, engine.model_id, engine.dim) as s:
        for n in names:
            add(s, n, np.full((2, engine.dim), 0.5, np.float32))
        transfer.export(s, folder / "out.edge")
    return (folder / "out.edge").read_bytes()


def _meta(data: bytes, change) -> bytes:
    """The export with its meta.json changed by change(meta dict)."""
    def edit(name, raw):
        if name != "meta.json":
            return raw
        meta = json.loads(raw)
        change(meta)
        return json.dumps(meta).encode()
    return _rezip(data, edit)


def _bomb_export(good: bytes) -> bytes:
    """The export's meta.json with a vectors.npy that deflates 511 MiB of zeros into ~0.5 MB."""
    src = zipfile.ZipFile(io.BytesIO(good))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("meta.json", src.read("meta.json"))
        with zf.open("vectors.npy", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(511):
                member.write(chunk)
    return out.getvalue()


def _setting(key, value):
    return lambda meta: meta["settings"].__setitem__(key, value)


def _classes(n):
    def change(meta):
        meta["classes"] = [dict(meta["classes"][0], name=f"c{i}", count=0, ts=[], source=[]) for i in range(n)]
        meta["classes"][0] = dict(meta["classes"][0], name="shoes", count=2, ts=[0.0, 0.0], source=["button"] * 2)
    return change


def _rezip(data: bytes, change, extra=()) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, change(info.filename, src.read(info.filename)))
        for name, raw in extra:
            zf.writestr(zipfile.ZipInfo(name), raw)
    return out.getvalue()


def test_bad_import_files_are_refused_via_the_cli_and_the_store_is_untouched(tmp_path, engine, clothing):
    store_path = tmp_path / "store"
    prefill(store_path, engine, clothing)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"store": {"path": str(store_path)}, "camera": {"source": "folder"}}))
    good = _knowledge_bytes(tmp_path, engine)
    cases = {
        "newer version": (_meta(good, lambda m: m.update(version=99)), "update edge"),
        "version 0": (_meta(good, lambda m: m.update(version=0)), "is not supported"),
        "wrong model hash": (_meta(good, lambda m: m.update(model_id="0" * 64)), "different model"),
        "threshold 'banana'": (_meta(good, _setting("threshold", "banana")), "threshold"),
        "threshold null": (_meta(good, _setting("threshold", None)), "threshold"),
        "renames [\"x\"]": (_meta(good, _setting("renames", ["x"])), "unknown setting"),
        "extra_classes 7": (_meta(good, _setting("extra_classes", 7)), "unknown setting"),
        "settings not an object": (_meta(good, lambda m: m.update(settings=[1])), "no settings"),
        "200 class names": (_meta(good, _classes(200)), "at most 8"),
        "class named ../../x": (_knowledge_bytes(tmp_path, engine, names=("shoes",)).replace(b'"shoes"', b'"../../x"', 1),
                                "cannot import"),
        "count larger than the vectors": (_meta(good, lambda m: m["classes"][0].update(count=3, ts=[0.0] * 3,
                                                                                       source=["button"] * 3)),
                                          "cannot import"),
        "corrupt archive": (good[:100] + os.urandom(200) + good[300:], "cannot import"),
        "truncated archive": (good[: len(good) // 2], "damaged or not a zip"),
        "not an archive": (b"hello", "not a zip"),
        "path escape ../": (_rezip(good, lambda n, r: r, [("../../escaped.txt", b"x")]), "unexpected members"),
        "absolute path": (_rezip(good, lambda n, r: r, [(str(tmp_path / "abs.txt"), b"x")]), "unexpected members"),
        "path into store": (_rezip(good, lambda n, r: r, [("store/knowledge.db", b"x")]), "unexpected members"),
        "zip bomb (vectors inflate to 511 MiB)": (_bomb_export(good), "too large"),
    }
    failures, problems, peak_mib = 0, [], 0.0
    for name, (data, message) in cases.items():
        bad = tmp_path / "in" / f"{name.replace(' ', '_').replace('/', '_')}.npz"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(data)
        before = tree(store_path)
        outside = set(tmp_path.parent.rglob("*"))
        r = edge_cli("import", bad, "--config", config, cwd=tmp_path)
        peak_mib = max(peak_mib, r.peak_mib)
        after_outside = set(tmp_path.parent.rglob("*"))
        # The LiteRT runtime prints its own "INFO: Created TensorFlow Lite XNNPACK delegate" banner.
        lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("INFO: Created TensorFlow Lite")]
        ok = (r.returncode == 1 and len(lines) == 1 and message in lines[0] and tree(store_path) == before
              and after_outside == outside)
        if not ok:
            failures += 1
            problems.append(f"{name}: rc={r.returncode} {r.stderr[-400:]!r}")
    report("import_cli", len(cases), failures, peak_rss_mib=round(peak_mib))
    assert failures == 0, "\n".join(problems)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert peak_mib <= 200, f"an `edge import` of a hostile file peaked at {peak_mib:.0f} MiB"
    ok = tmp_path / "in" / "good.edge"
    ok.write_bytes(good)
    r = edge_cli("import", ok, "--config", config, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-400:]
    assert "without button or LED: shoes" in r.stdout + r.stderr, r.stdout + r.stderr
    s = open_store(store_path, engine)
    assert [(c.name, c.count) for c in s.classes()][:1] == [("shoes", 2)]
    s.close()


# --- security -------------------------------------------------------------------------------------

def test_running_as_root_warns(tmp_path, broker, daemons):
    if os.geteuid() != 0:
        pytest.skip("the warning is for euid 0; these tests run as an ordinary user here")
    daemon = daemons(daemon_config(tmp_path, broker.port, PREFIX)).start()
    wait_until(lambda: "running as root" in daemon.log(), timeout=60, what="the root warning")
    daemon.stop()
    line = [line for line in daemon.log().splitlines() if "running as root" in line]
    assert line == ["WARNING edge.app: running as root: a box should run as its own user (see docs/install.md)"]


def test_shipped_mosquitto_config_refuses_anonymous_clients(tmp_path):
    """deploy/mosquitto/edge.conf on a free port with a temporary passwd file."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    port, ws = free_port(), free_port()
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), "edge", "box-pw-1"], check=True, capture_output=True)
    text = (REPO / "deploy" / "mosquitto" / "edge.conf").read_text()
    assert "allow_anonymous false" in text
    text = text.replace("/etc/mosquitto/edge.passwd", str(passwd))
    text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    text = re.sub(r"^listener 9001$", f"listener {ws} 127.0.0.1", text, flags=re.M)
    if os.geteuid() == 0:
        text += "\nuser root\n"
    conf = tmp_path / "edge.conf"
    conf.write_text(text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), timeout=10, what="mosquitto with the shipped config")

        def attempt(user=None, password=None):
            c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"t{time.monotonic_ns()}")
            if user:
                c.username_pw_set(user, password)
            got = []
            c.on_connect = lambda cl, u, f, rc, p: got.append(rc)
            c.connect("127.0.0.1", port)
            c.loop_start()
            wait_until(lambda: got, timeout=10, what="CONNACK")
            c.disconnect()
            c.loop_stop()
            return got[0]
        anonymous, wrong, right = attempt(), attempt("edge", "nope"), attempt("edge", "box-pw-1")
    finally:
        proc.kill()
        proc.wait(10)
    assert anonymous.is_failure and wrong.is_failure and not right.is_failure, (anonymous, wrong, right)


def _listening(port):
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_secrets_never_appear_in_logs_or_retained_messages(tmp_path, watchers, daemons, clothing):
    secret = "Zq9-very-secret-pw"
    broker = Broker(tmp_path / "broker", users={"edge": secret, "watch": "w"}).start()
    try:
        pwfile = tmp_path / "mqtt-password"
        pwfile.write_text(secret + "\n")
        config = daemon_config(tmp_path, broker.port, PREFIX,
                               mqtt={"username": "edge", "password_file": str(pwfile), "homeassistant": True})
        daemon = daemons(config)
        w = watchers(broker, topics=("#",), username="watch", password="w")
        mark = w.mark()
        daemon.argv.insert(daemon.argv.index("run"), "-v")     # debug logging: the most it ever says
        daemon.start()
        online_after(w, mark)
        for action, payload in (("state", b""), ("record", b"shoes"), ("record/stop", b""), ("jump", secret.encode())):
            send(w, action, payload)
        w.publish(f"{PREFIX}/camera/frame", b"not an image")
        broker.stop()                                           # reconnect messages too
        time.sleep(1.5)
        broker.start()
        w2 = watchers(broker, topics=("#",), username="watch", password="w")
        w2.wait(f"{PREFIX}/state", timeout=30)
        time.sleep(0.5)
        daemon.stop()
        text = daemon.log()
        messages = [m.payload for m in w.messages + w2.messages if not m.topic.endswith("cmd/jump")]
        assert len(text) > 500 and "DEBUG" in text
        assert secret not in text, "the password is in the daemon's log"
        leaked = [m for m in messages if secret.encode() in m]
        assert not leaked, leaked
        report("secrets", len(messages) + 1, len(leaked) + (secret in text))
    finally:
        broker.stop()


# --- camera errors and buttons (in process: the Box with real pins on gpiozero's mock factory) -----

def test_camera_that_raises_or_returns_garbage_recovers_without_restart(tmp_path, engine, clothing, mock_factory):
    """A source that raises (its own error, an OSError, a bug) or returns garbage arrays: the box
    shows the fault and carries on, and recovers by itself once frames are good again. A source that
    hangs is covered by tests/test_systemd.py::test_a_hung_camera_read_stops_the_watchdog_pings."""
    from edge.camera import CameraError, FolderCamera, Retrying
    from test_box import Rig
    trials = count(20, 200, "camera_faults")
    rig = Rig(tmp_path, engine, mock_factory)
    rig.show(list_images(clothing / "train" / "shoes")[:3])
    faults = [lambda: (_ for _ in ()).throw(CameraError("camera unplugged")),
              lambda: (_ for _ in ()).throw(OSError(5, "Input/output error")),
              lambda: (_ for _ in ()).throw(RuntimeError("driver bug")),
              lambda: np.zeros((7, 3), np.float64),
              lambda: np.zeros((0, 0, 3), np.uint8),
              lambda: np.full((4, 4, 5), 255, np.uint8),
              lambda: np.zeros((480, 640, 3), np.int32),
              lambda: "not an array"]
    plan = []

    class Flaky(FolderCamera):
        def read(self):
            if plan:
                return plan.pop()()
            return super().read()

    rng = random.Random(3)
    failures, problems = 0, []
    try:
        rig.box.camera = Retrying(Flaky(rig.cam, fps=30))
        assert wait_for_frames(rig, 3)
        for trial in range(trials):
            plan.extend(rng.choice(faults) for _ in range(rng.randrange(1, 4)))
            frames = rig.box.frames
            ok = wait_for(lambda: not plan and rig.box.frames > frames + 2 and rig.box.fault is None, 20)
            if not ok or not rig.thread.is_alive():
                failures += 1
                problems.append(f"trial {trial}: frames {rig.box.frames}, fault {rig.box.fault}")
        errors = [e for e in rig.events if e["event"] == "error"]
    finally:
        rig.stop()
    report("camera_faults", trials, failures, error_events=len(errors))
    assert failures == 0, problems
    assert errors, "faults are reported as error events"


def wait_for_frames(rig, n, timeout=30):
    start = rig.box.frames
    return wait_for(lambda: rig.box.frames >= start + n, timeout)




def test_bouncing_and_simultaneous_buttons(tmp_path, engine, clothing, mock_factory):
    """Mock pins toggled far faster than a finger (contact bounce), every button at once, and a
    button held through a restart (that one: tests/test_box.py::test_button_held_through_restart_...)."""
    from test_box import PINS, Rig
    rounds = count(5, 50, "button_bounce")
    rig = Rig(tmp_path, engine, mock_factory)
    rig.show(list_images(clothing / "train" / "shoes"))
    rng = random.Random(11)
    failures, problems = 0, []
    try:
        for r in range(rounds):
            pin = rig.pin(PINS[rng.choice(["A", "B"])][0])
            for _ in range(rng.randrange(20, 200)):          # bounce: 20..200 edges, 0..3 ms apart
                pin.drive_low() if rng.random() < 0.5 else pin.drive_high()
                time.sleep(rng.random() * 0.003)
            pin.drive_high()
            settled = wait_for(lambda: rig.box.recording is None, 5)
            everything = [rig.pin(PINS[c][0]) for c in PINS] + [rig.pin("GPIO26")]
            for p in everything:                              # all buttons at once…
                p.drive_low()
            time.sleep(rng.uniform(0.05, 0.6))
            for p in rng.sample(everything, len(everything)):  # …released in any order
                p.drive_high()
            settled = settled and wait_for(lambda: rig.box.recording is None, 5)
            if not (settled and rig.thread.is_alive()):
                failures += 1
                problems.append(f"round {r}: recording {rig.box.recording}, alive {rig.thread.is_alive()}")
        counts = rig.counts()
        internal = [e for e in rig.events if e["event"] == "error" and e["source"] != "camera"]
        stopped = [e for e in rig.events if e["event"] == "recording_stopped"]
        # The store agrees with the events: what was announced is what is kept.
        store_ok = counts_on_disk(rig.store) == counts and all(n <= 100 for n in counts.values())
        # It still works: a clean press records.
        before = rig.counts().get("A", 0)
        rig.pin(PINS["A"][0]).drive_low()
        works = wait_for(lambda: rig.counts().get("A", 0) >= before + 2, 15)
        rig.pin(PINS["A"][0]).drive_high()
    finally:
        rig.stop()
    report("buttons", rounds, failures + len(internal) + (not store_ok) + (not works),
           recordings=len(stopped))
    assert failures == 0 and not internal and store_ok and works, (problems, internal)


# --- regressions found by this suite --------------------------------------------------------------

@pytest.mark.parametrize("action,payload", [
    ("threshold", b'{"value": 1' + b"0" * 400 + b"}"),
    ("threshold", b"-1" + b"0" * 400),
    ("record", b'{"class": "shoes", "seconds": 9' + b"9" * 400 + b"}"),
])
def test_a_number_too_large_for_a_float_is_refused_not_crashed(action, payload):
    """Was: OverflowError escaped the parser, paho's callback swallowed it, no answer was sent."""
    with pytest.raises(CommandInvalid):
        C.parse_payload(action, payload)
