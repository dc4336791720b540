"""The box end to end, in process: real model, real photos through a folder camera, real gpiozero
on mock pins, a real store on disk. Hold a button while photos play, then watch the LEDs."""

import io
import json
import os
import queue
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest

from edge import app as app_module
from edge import commands as C
from edge.app import Box
from edge.camera import FolderCamera, Retrying
from edge.config import parse_config
from edge.evaluate import embed_files
from edge.image import list_images
from edge.panel import Panel
from edge.store import Store
from edge.systemd import Notifier
from mqtt_broker import wait_until

PINS = {"A": ("GPIO17", "GPIO27"), "B": ("GPIO22", "GPIO23")}


def wait_for(predicate, timeout=30.0, step=0.05) -> bool:
    """wait_until as a truth value, for `assert wait_for(...), details`."""
    try:
        return bool(wait_until(predicate, timeout, step))
    except AssertionError:
        return False


class Rig:
    """A running box plus the handles a test needs: camera folder, pins, store."""

    def __init__(self, tmp_path, engine, factory):
        self.tmp = tmp_path
        self.engine = engine
        self.cam = tmp_path / "camera"
        self.cam.mkdir(exist_ok=True)
        self.cfg = parse_config({
            "classes": [{"name": n, "button": b, "led": l} for n, (b, l) in PINS.items()],
            "function_button": "GPIO26", "status_led": "GPIO16",
            "camera": {"source": "folder", "folder": str(self.cam), "fps": 30},
            "capture": {"rate": 12, "max_per_class": 100, "min_change": 0.01},
            "store": {"path": str(tmp_path / "store")},
        }, base=tmp_path)
        self.factory = factory
        self.events = []
        self.decisions = []
        self.states = []
        self.start()

    def start(self):
        self.store = Store(self.cfg.store.path, self.engine.model_id, self.engine.dim,
                           max_per_class=self.cfg.capture.max_per_class)
        self.store.open()
        commands = queue.Queue()
        panel = Panel(self.cfg.classes, self.cfg.function_button, self.cfg.status_led, send=commands.put,
                      pin_factory=self.factory)
        self.box = Box(self.cfg, self.engine, self.store, FolderCamera(self.cam, fps=30), panel, commands,
                       outputs=[self])
        self.attach(self.box)
        self.thread = threading.Thread(target=self.box.run, daemon=True)
        self.thread.start()

    def attach(self, box):
        """Called with each new box before it runs (tests/test_sim.py adds the terminal here)."""

    def stop(self):
        self.box.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.box.panel.close()
        self.store.close()

    # Outputs: the test listens like MQTT would.
    def decision(self, d):
        self.decisions.append(d)

    def state(self, s):
        self.states.append(s)

    def event(self, e):
        self.events.append(e)

    def show(self, files):
        for old in self.cam.iterdir():
            old.unlink()
        for i, f in enumerate(files):
            shutil.copy(f, self.cam / f"{i:03d}{f.suffix}")

    def pin(self, name):
        return self.factory.pin(name)

    def led(self, cls):
        return self.pin(PINS[cls][1]).state

    def counts(self):
        return {c.name: c.count for c in self.store.classes() if c.count}

    def send(self, action, body, reply, ident=None):
        self.box.submit(C.Request(C.parse(action, body), "mqtt", ident, reply))

    def teach(self, cls, files, n):
        self.show(files)
        before = self.counts().get(cls, 0)
        self.pin(PINS[cls][0]).drive_low()
        assert wait_for(lambda: self.counts().get(cls, 0) >= before + n), self.counts()
        self.pin(PINS[cls][0]).drive_high()
        assert wait_for(lambda: self.box.recording is None, 5)

    def lit_share(self, seconds=2.5):
        """Share of time each LED was on while the current photos played (after settling)."""
        time.sleep(0.8)
        on = {"A": 0, "B": 0}
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for c in on:
                on[c] += bool(self.led(c))
            n += 1
            time.sleep(0.02)
        return {c: v / n for c, v in on.items()}


@pytest.fixture
def rig(tmp_path, engine, mock_factory):
    r = Rig(tmp_path, engine, mock_factory)
    yield r
    if r.thread.is_alive():
        r.stop()


def test_teach_with_buttons_then_recognise_and_remember(rig, clothing, calibration):
    shoes_train = list_images(clothing / "train" / "shoes")
    hats_train = list_images(clothing / "train" / "hat")
    rig.teach("A", shoes_train, 15)
    rig.teach("B", hats_train, 15)
    assert rig.counts()["A"] >= 15 and rig.counts()["B"] >= 15
    assert any(e["event"] == "sample_added" and e["class"] == "A" for e in rig.events)

    rig.show(list_images(clothing / "test" / "shoes")[:12])
    share = rig.lit_share()
    assert share["A"] > 0.8 and share["B"] < 0.1, share
    rig.show(list_images(clothing / "test" / "hat")[:12])
    share = rig.lit_share()
    assert share["B"] > 0.8 and share["A"] < 0.1, share
    rig.show(list_images(calibration / "registry-photos")[:12])
    share = rig.lit_share()
    assert share["A"] < 0.2 and share["B"] < 0.2, share
    assert rig.box.label == "unknown" or max(share.values()) < 0.2

    counts = rig.counts()
    rig.stop()
    rig.start()  # a reboot: a new box on the same store
    assert rig.counts() == counts
    rig.show(list_images(clothing / "test" / "shoes")[:12])
    share = rig.lit_share()
    assert share["A"] > 0.8 and share["B"] < 0.1, share


def test_a_nothing_class_answers_unknown_and_lights_no_led(rig, clothing):
    """Decisions carry the class's place in the store's order; a "nothing" class is chosen
    like any other but answered as unknown, index -1, with its LED dark."""
    rig.teach("A", list_images(clothing / "train" / "shoes"), 10)
    rig.teach("B", list_images(clothing / "train" / "hat"), 10)
    replies = []
    rig.send("nothing", {"class": "B", "nothing": True}, replies.append)
    assert wait_for(lambda: replies) and replies[0]["ok"], replies
    rig.show(list_images(clothing / "test" / "hat")[:12])
    share = rig.lit_share()
    assert share["A"] < 0.1 and share["B"] == 0, share
    seen = rig.decisions[-10:]
    assert all(d.label == "unknown" and d.index == -1 and d.confidence == 0.0 for d in seen), seen
    rig.show(list_images(clothing / "test" / "shoes")[:12])
    share = rig.lit_share()
    assert share["A"] > 0.8 and share["B"] == 0, share
    seen = rig.decisions[-10:]
    assert all(d.label == "A" and d.index == 0 and d.confidence > 0 for d in seen), seen
    assert set(seen[-1].scores) == {"A", "B"}


def test_function_button_undo_and_clear(rig, clothing):
    rig.teach("A", list_images(clothing / "train" / "shoes"), 5)
    rig.teach("B", list_images(clothing / "train" / "hat"), 4)
    b_count = rig.counts()["B"]
    a_count = rig.counts()["A"]
    fn = rig.pin("GPIO26")
    fn.drive_low()
    time.sleep(0.1)
    fn.drive_high()  # a short tap: undo the last burst (B's)
    assert wait_for(lambda: "B" not in rig.counts()), rig.counts()
    assert rig.counts()["A"] == a_count and b_count > 0
    assert wait_for(lambda: any(e["event"] == "burst_undone" for e in rig.events), 5)

    fn.drive_low()  # hold function + press A: clear A
    time.sleep(0.1)
    rig.pin("GPIO17").drive_low()
    time.sleep(0.1)
    rig.pin("GPIO17").drive_high()
    fn.drive_high()
    assert wait_for(lambda: "A" not in rig.counts()), rig.counts()
    assert rig.box.recording is None


def test_hold_function_clears_everything(rig, clothing):
    rig.box.gestures.clear_all_hold = 0.5
    rig.teach("A", list_images(clothing / "train" / "shoes"), 3)
    rig.pin("GPIO26").drive_low()
    assert wait_for(lambda: rig.counts() == {}, 5), rig.counts()
    rig.pin("GPIO26").drive_high()
    assert wait_for(lambda: any(e["event"] == "all_cleared" for e in rig.events), 5)


def test_commands_answer_and_bad_ones_change_nothing(rig, clothing):
    rig.show(list_images(clothing / "train" / "shoes"))
    replies = []
    rig.send("record", {"class": "a", "count": 4}, replies.append, ident="r1")
    assert wait_for(lambda: rig.counts().get("A", 0) >= 4 and rig.box.recording is None)
    assert replies[0] == {"action": "record", "ok": True, "id": "r1"}
    before = rig.counts()
    for action, body in [("record", {"class": "Z"}), ("rename", {"from": "A", "to": "b"}),
                         ("classes", {"remove": "A"}), ("sample/delete", {"sample": 99999}),
                         ("burst/delete", {"burst": 99999}), ("record/stop", {})]:
        rig.send(action, body, replies.append)
    assert wait_for(lambda: len(replies) == 7)
    assert all(r["ok"] is False and r["error"] for r in replies[1:]), replies
    assert rig.counts() == before and rig.thread.is_alive()

    rig.send("rename", {"from": "A", "to": "Shoes"}, replies.append)
    rig.send("threshold", {"value": "0.5"}, replies.append)
    assert wait_for(lambda: len(replies) == 9)
    assert replies[-2]["ok"] and replies[-1]["ok"], replies
    state = rig.box.state()
    assert state["classes"][0]["name"] == "Shoes" and state["classes"][0]["samples"] == before["A"]
    assert state["threshold"] == 0.5
    rig.stop()
    rig.start()
    assert rig.box.state()["classes"][0]["name"] == "Shoes"  # renames survive a restart
    assert rig.box.head.threshold == 0.5
    rig.pin("GPIO17").drive_low()   # the renamed class keeps its button
    assert wait_for(lambda: rig.counts().get("Shoes", 0) > before["A"])
    rig.pin("GPIO17").drive_high()


def exported_with(rig, replies, change) -> io.BytesIO:
    """The box's export (its answer appended to `replies`) with `change(meta)` made to its meta.json."""
    rig.box.submit(C.Request(C.Export(), "web", None, replies.append))
    assert wait_for(lambda: replies)
    with zipfile.ZipFile(io.BytesIO(replies[-1]["data"])) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["meta.json"])
    change(meta)
    members["meta.json"] = json.dumps(meta).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


def test_a_wrong_file_to_import_is_refused_without_a_fault_or_ending_a_recording(rig, clothing):
    """A wrong file chosen on the web page's "Load a file" put the box into a storage fault (the
    status LED's full-card pattern) and ended a recording; a class entry that was not an object
    stopped the command unanswered."""
    rig.teach("A", list_images(clothing / "train" / "shoes"), 4)
    replies = []
    hostile = exported_with(rig, replies, lambda meta: meta["classes"].__setitem__(0, "A"))
    rig.show(list_images(clothing / "train" / "hat"))
    rig.pin(PINS["B"][0]).drive_low()               # a child records B meanwhile
    assert wait_for(lambda: rig.counts().get("B", 0) >= 1)
    before = rig.counts()["A"]
    for data in (os.urandom(30000), hostile.getvalue()):
        rig.box.submit(C.Request(C.Import(data), "web", None, replies.append))
    assert wait_for(lambda: len(replies) == 3, 10), replies
    for r in replies[1:]:
        assert r["ok"] is False and r["error"].startswith("cannot import the file: "), r
        assert "/" not in r["error"].split(":", 1)[0] and "\n" not in r["error"], r
    assert "not an object" in replies[2]["error"]
    assert rig.box.fault is None and not any(e.get("source") == "storage" for e in rig.events), rig.events
    assert rig.box.recording is not None, "the recording goes on"
    grown = rig.counts()["B"]
    assert wait_for(lambda: rig.counts()["B"] > grown)
    rig.pin(PINS["B"][0]).drive_high()
    assert rig.counts()["A"] == before and rig.thread.is_alive()


def test_an_import_that_fills_every_class_slot_says_which_buttons_lost_their_class(tmp_path):
    """Eight imported classes, none of them the config's A, B, C: the import said only that the
    eight had no button; that A, B and C's buttons now do nothing was in the log alone."""
    from edge import rules, transfer
    from edge.app import import_file
    dim = 8
    src = Store(tmp_path / "src", "m", dim)
    src.open()
    with src.command():
        for i in range(rules.MAX_CLASSES):
            src.add_class(f"X{i}")
            src.add_samples(f"X{i}", np.full((1, dim), i + 1, np.float32), "import", src.new_burst())
    transfer.export(src, tmp_path / "eight.edge")
    src.close()
    cfg = parse_config({"classes": [{"name": n, "button": b, "led": l} for n, (b, l) in PINS.items()],
                        "store": {"path": str(tmp_path / "box")}}, base=tmp_path)
    box = Store(cfg.store.path, "m", dim)
    box.open()
    note = import_file(box, cfg, tmp_path / "eight.edge")
    assert "the buttons of A, B have no class now" in note and "\n" not in note, note
    assert [c.name for c in box.classes()] == [f"X{i}" for i in range(rules.MAX_CLASSES)]
    box.close()


def test_a_bug_in_a_command_is_answered_at_once_and_the_box_goes_on(rig, clothing, monkeypatch):
    """An unexpected error in a command handler reached the frame loop's catch-all: the command
    was never answered (the web page waited 60 s)."""
    def broken(box, cmd, source):
        raise KeyError("bug")
    monkeypatch.setitem(type(rig.box).HANDLERS, C.Hints, broken)
    replies = []
    rig.send("hints", {}, replies.append, ident=7)
    assert wait_for(lambda: replies, 5)
    assert replies[0] == {"action": "hints", "ok": False, "error": "internal error (KeyError); the box carries on", "id": 7}
    assert any(e.get("source") == "internal" for e in rig.events)
    rig.send("state", {}, replies.append)
    assert wait_for(lambda: len(replies) == 2) and replies[1]["ok"] and rig.thread.is_alive()


def test_a_stop_for_one_class_leaves_the_recording_of_another(rig, clothing):
    """A web page that closes stops only the class it was recording: Scratch or MQTT may have
    taken the recording over meanwhile."""
    rig.show(list_images(clothing / "train" / "shoes"))
    replies = []
    rig.send("record", {"class": "B", "count": 500}, replies.append)
    assert wait_for(lambda: rig.counts().get("B", 0) >= 1)
    rig.send("record/stop", {"class": "a"}, replies.append)
    assert wait_for(lambda: len(replies) == 2)
    assert replies[1] == {"action": "record/stop", "ok": False, "error": "not recording A (recording B)"}
    grown = rig.counts()["B"]
    assert wait_for(lambda: rig.counts()["B"] > grown), "B goes on recording"
    rig.send("record/stop", {"class": "b"}, replies.append)
    assert wait_for(lambda: len(replies) == 3) and replies[2]["ok"] and rig.box.recording is None


def test_gallery_commands_list_delete_and_survive_restart(rig, clothing):
    rig.teach("A", list_images(clothing / "train" / "shoes"), 5)
    replies = []
    rig.send("samples", {"class": "A"}, replies.append)
    assert wait_for(lambda: replies)
    listed = replies[0]["samples"]
    assert replies[0]["ok"] and len(listed) == rig.counts()["A"]
    assert listed == sorted(listed, key=lambda r: -r["id"])     # newest first
    assert all(r["source"] == "button" and r["thumbnail"] for r in listed)
    rig.send("thumbnails", {"ids": [listed[0]["id"]]}, replies.append)
    assert wait_for(lambda: len(replies) == 2)
    import base64
    assert base64.b64decode(replies[1]["thumbnails"][str(listed[0]["id"])])[:3] == b"\xff\xd8\xff"
    rig.send("sample/delete", {"sample": listed[0]["id"]}, replies.append)
    assert wait_for(lambda: len(replies) == 3) and replies[2]["ok"], replies
    left = rig.counts()["A"]
    assert left == len(listed) - 1
    rig.stop()
    rig.start()
    assert rig.counts()["A"] == left
    rig.send("samples", {"class": "A"}, replies.append)
    assert wait_for(lambda: len(replies) == 4)
    assert listed[0]["id"] not in [r["id"] for r in replies[3]["samples"]]


def test_button_held_through_restart_is_ignored_until_released(rig, clothing):
    rig.show(list_images(clothing / "train" / "shoes"))
    rig.stop()
    rig.pin("GPIO17").drive_low()  # held while the box starts
    rig.start()
    time.sleep(1.0)
    assert rig.box.recording is None and rig.counts() == {}
    rig.pin("GPIO17").drive_high()
    rig.pin("GPIO17").drive_low()  # a fresh press records
    assert wait_for(lambda: rig.counts().get("A", 0) >= 2)
    rig.pin("GPIO17").drive_high()


def test_camera_fault_shows_on_status_led_and_recovers(rig, clothing):
    rig.show(list_images(clothing / "train" / "shoes")[:3])
    assert wait_for(lambda: rig.box.frames > 3)
    for f in rig.cam.iterdir():
        f.unlink()  # the camera "sees" nothing: a fault
    assert wait_for(lambda: rig.box.fault == "camera", 5)
    assert any(e["event"] == "error" and e["source"] == "camera" for e in rig.events)
    rig.show(list_images(clothing / "train" / "shoes")[:3])
    assert wait_for(lambda: rig.box.fault is None, 15)
    assert rig.pin("GPIO16").state == 1  # steady on again


def test_storage_fault_keeps_the_box_running(rig, clothing, monkeypatch):
    """A full or failing card: the sample is not kept, the fault is shown, recognition goes on.
    (How the store turns disk errors into StoreError is tested in test_store.py.)"""
    from edge.store import Store, StoreError
    rig.teach("A", list_images(clothing / "train" / "shoes"), 4)
    before = rig.counts()
    real = Store.add_samples

    def full_disk(self, *args, **kwargs):
        raise StoreError("database or disk is full")

    monkeypatch.setattr(Store, "add_samples", full_disk)
    rig.pin("GPIO22").drive_low()  # record B: every write fails
    assert wait_for(lambda: rig.box.fault == "storage", 10)
    rig.pin("GPIO22").drive_high()
    # the loop sets the fault, then tells its outputs: wait for the event, it may be a moment behind
    assert wait_for(lambda: any(e["event"] == "error" and e["source"] == "storage" for e in rig.events), 5)
    assert rig.counts() == before and rig.thread.is_alive()
    stopped = [e for e in rig.events if e["event"] == "recording_stopped" and e["class"] == "B"]
    assert stopped[-1]["added"] == 0 and stopped[-1]["burst"] is None, "no burst id for what was not kept"
    assert not any(e["event"] == "recovered" and e["source"] == "storage" for e in rig.events)
    monkeypatch.setattr(Store, "add_samples", real)
    rig.teach("B", list_images(clothing / "train" / "hat"), 2)  # the card is back: learning resumes
    assert rig.box.fault is None
    assert wait_for(lambda: any(e["event"] == "recovered" and e["source"] == "storage" for e in rig.events), 5)
    assert rig.store.last_burst() is not None


def test_garbage_frames_are_survived(rig, clothing):
    class Garbage(FolderCamera):
        def read(self):
            self.pacer.wait()
            return np.zeros((7, 3), np.float64)  # wrong shape and type

    rig.box.camera = Retrying(Garbage(rig.cam, fps=30))
    assert wait_for(lambda: rig.box.fault == "camera", 5)
    rig.box.camera = Retrying(FolderCamera(rig.cam, fps=30))
    rig.show(list_images(clothing / "train" / "shoes")[:2])
    assert wait_for(lambda: rig.box.fault is None, 15) and rig.thread.is_alive()


def test_model_fault_keeps_the_daemon_up_showing_the_fault(tmp_path):
    """A broken model file: one clear log line, the status LED blinks the model code (the daemon
    stays up instead of being restarted into the same fault), SIGTERM ends it."""
    import signal
    import subprocess
    import sys
    model = tmp_path / "model.tflite"
    model.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)  # looks like a model, is not one
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  path: {model}\nstore:\n  path: {tmp_path / 'store'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "--config", str(config), "--no-keys"],
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "model.tflite: not a usable TFLite model" in err and "Traceback" not in err


def test_the_watchdog_is_fed_only_by_healthy_steps(tmp_path, engine, mock_factory, clothing):
    """A bug that fails every frame must not look alive to systemd: the loop logs each error but
    stops the watchdog pings (systemd then restarts the box); a healthy loop keeps pinging."""
    import socket
    import tempfile

    class Broken(FolderCamera):
        def read(self):
            self.pacer.wait()
            raise RuntimeError("a bug on every frame")       # not a camera fault: a bug

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in list_images(clothing / "train" / "shoes")[:2]:
        shutil.copy(f, photos / f.name)
    cfg = parse_config({"classes": [{"name": "A"}], "function_button": None, "status_led": None,
                        "camera": {"source": "folder", "folder": str(photos)},
                        "store": {"path": str(tmp_path / "store")}}, base=tmp_path)
    pings = {}
    with tempfile.TemporaryDirectory(prefix="edge-wd-") as short:
        for name, camera in (("healthy", FolderCamera(photos, fps=20)), ("broken", Broken(photos, fps=20))):
            address = f"{short}/{name}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
            sock.settimeout(0.1)
            store = Store(cfg.store.path, engine.model_id, engine.dim)
            store.open()
            box = Box(cfg, engine, store, camera, None, queue.Queue(),
                      notifier=Notifier(address=address, watchdog_usec="200000"))
            thread = threading.Thread(target=box.run, daemon=True)
            thread.start()
            got, end = [], time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    got.append(sock.recv(4096).decode())
                except socket.timeout:
                    pass
            frames_or_errors = box.frames
            box.stop()
            thread.join(10)
            store.close()
            sock.close()
            pings[name] = sum("WATCHDOG=1" in m.split("\n") for m in got)
            assert any("READY=1" in m.split("\n") for m in got), got
            if name == "broken":
                assert frames_or_errors == 0
    assert pings["healthy"] >= 5, pings          # 3 s at a 0.2 s watchdog: pinged every 0.1 s or so
    assert pings["broken"] == 0, pings


def test_a_broken_spread_prior_costs_the_prior_not_the_box(tmp_path, engine, clothing, caplog):
    """The spread prior beside a model is optional: a corrupt one is one warning line naming the
    file, and the box starts, learns and answers with one view (a broken model or mean refuses)."""
    from edge.engine import Embedder, reference_path, spread_path
    model = tmp_path / "mine.tflite"
    shutil.copy(engine.path, model)
    shutil.copy(reference_path(engine.path), reference_path(model))
    spread_path(model).write_bytes(b"not a numpy file\n")
    mine = Embedder(model)
    photos = tmp_path / "photos"
    photos.mkdir()
    cfg = parse_config({"classes": [{"name": "A"}, {"name": "B"}], "function_button": None, "status_led": None,
                        "camera": {"source": "folder", "folder": str(photos)},
                        "store": {"path": str(tmp_path / "store")}}, base=tmp_path)
    store = Store(cfg.store.path, mine.model_id, mine.dim)
    store.open()
    with caplog.at_level("WARNING", logger="edge.app"):
        box = Box(cfg, mine, store, FolderCamera(photos), None, queue.Queue())
    warned = [r.getMessage() for r in caplog.records if spread_path(model).name in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "choosing without it" in warned[0], warned
    assert box.head.prior is None and box.head.mean is not None
    embed = lambda split, c: embed_files(list_images(clothing / split / c)[:5], mine.embed)
    box.head.set_samples({"A": embed("train", "shoes"), "B": embed("train", "hat")})
    assert (box.head.predict_closed(embed("test", "hat")) == 1).all()
    store.close()


def test_a_command_that_came_while_waiting_for_a_frame_applies_to_that_frame(tmp_path, engine, clothing):
    """Over MQTT a record command and then its first picture arrive while the loop waits for a
    picture: the command must take effect first, so that picture is learned, not classified (the
    documented teach-over-MQTT snippet lost its first picture, and recorded the test photo)."""
    from edge.commands import Record, Request
    from edge.image import load_image
    photo = np.asarray(load_image(list_images(clothing / "train" / "shoes")[0]))

    class Sender(FolderCamera):
        """A picture source whose sender also sends a command just before each picture."""

        def read(self):
            box.submit(Request(Record(cls="A", count=1), "mqtt"))
            return photo

    cfg = parse_config({"classes": [{"name": "A"}], "function_button": None, "status_led": None,
                        "camera": {"source": "folder", "folder": str(tmp_path)},
                        "store": {"path": str(tmp_path / "store")}}, base=tmp_path)
    store = Store(cfg.store.path, engine.model_id, engine.dim)
    store.open()
    box = Box(cfg, engine, store, Sender(tmp_path), None, queue.Queue())
    box.step()
    assert {c.name: c.count for c in store.classes()} == {"A": 1} and box.recording is None
    store.close()


def test_a_config_class_named_like_a_renamed_class_is_reported_not_dropped(tmp_path, engine, caplog):
    """Class A renamed to "Hatty" over MQTT keeps A's button; a config class "hatty" added later
    cannot take that name: its button has no class, and the log says why in one line (it was
    silently dropped)."""
    store = Store(tmp_path / "store", engine.model_id, engine.dim)
    store.open()
    try:
        first = parse_config({"classes": [{"name": "A"}]}, base=tmp_path).classes
        with store.command():
            assert app_module.bind_to_config(store, first) == []
            store.rename_class("A", "Hatty")
        both = parse_config({"classes": [{"name": "A"}, {"name": "hatty"}]}, base=tmp_path).classes
        with store.command():
            assert app_module.bind_to_config(store, both) == ["hatty"]
        assert [(c.name, c.button) for c in store.classes()] == [("Hatty", "A")]
        lines = [r.getMessage() for r in caplog.records if "hatty" in r.getMessage()]
        assert lines and "rename one of them" in lines[0] and "\n" not in lines[0], lines
    finally:
        store.close()


def test_a_camera_fault_is_announced_at_once(rig, clothing):
    """The page and MQTT `state` learn of a camera fault when it starts and ends, not with the
    next change of something else (the page said "status: ok" while the LED blinked)."""
    rig.show(list_images(clothing / "train" / "shoes")[:2])
    assert wait_for(lambda: rig.decisions)
    for f in rig.cam.iterdir():
        f.write_bytes(b"garbage")
    assert wait_for(lambda: any(s["fault"] == "camera" for s in rig.states), 10), rig.states[-1:]
    rig.show(list_images(clothing / "train" / "shoes")[:2])
    assert wait_for(lambda: rig.states[-1]["fault"] is None and not rig.states[-1]["faults"], 15), rig.states[-1]


def test_an_error_ending_in_a_quoted_value_keeps_its_quote(rig):
    """Answers lost the closing quote of a value at the end of their message (the page showed
    `unknown setting 'evil`); a missing sample's KeyError still comes without its own quotes."""
    replies = []
    bad = exported_with(rig, replies, lambda meta: meta["settings"].update(evil=1))
    rig.box.submit(C.Request(C.Import(bad.getvalue()), "web", None, replies.append))
    rig.send("sample/delete", {"sample": 99999}, replies.append)
    assert wait_for(lambda: len(replies) == 3)
    assert replies[1]["error"].endswith("unknown setting 'evil'"), replies[1]
    assert replies[2]["error"] == "no sample with id 99999", replies[2]


def test_a_box_starts_with_a_store_fault_and_survives_a_frame_it_cannot_learn(tmp_path, engine, mock_factory):
    """A store that opened with a fault (here: a database that broke the rules, set aside) is in
    the box's state, which is announced once the box is built (announcing it before the head
    existed stopped the box from starting; `run` announces the first); a frame whose embedding the store refuses (a model of one's own with
    huge outputs) ends the recording with one error event instead of an error on every frame."""
    import sqlite3
    from edge import store_db as sdb
    folder = tmp_path / "store"
    s = Store(folder, engine.model_id, engine.dim)
    s.open()
    with s.command():
        s.add_class("A", button="A")
    s.close()
    db = sqlite3.connect(folder / sdb.DB)
    db.executescript("CREATE TABLE evil(x)")
    db.commit()
    db.close()
    s = Store(folder, engine.model_id, engine.dim)
    s.open()
    assert s.faults
    cfg = parse_config({"classes": [{"name": "A"}], "function_button": None, "status_led": None,
                        "camera": {"source": "folder", "folder": str(tmp_path)},
                        "store": {"path": str(folder)}}, base=tmp_path)
    seen = Rig.__new__(Rig)
    seen.events, seen.decisions, seen.states = [], [], []
    box = Box(cfg, engine, s, FolderCamera(tmp_path, fps=30), None, queue.Queue(), outputs=[seen])
    try:
        assert box.fault == "storage" and box.state()["fault"] == "storage" and not seen.states
        assert box.execute(C.Record("A", count=3))["ok"]
        box.process(np.full(engine.dim, 2e4, np.float32))
        assert box.recording is None and s.classes()[0].count == 0
        errors = [e for e in seen.events if e["event"] == "error"]
        assert len(errors) == 1 and errors[0]["source"] == "model" and "values beyond" in errors[0]["message"]
    finally:
        s.close()
