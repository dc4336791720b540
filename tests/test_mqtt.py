"""The MQTT link against a real mosquitto, the real model and real photos.

Each test that needs a broker starts its own mosquitto on a free port (tests/mqtt_broker.py) and
kills it at teardown; every wait has a timeout. Payload parsing and the frame queue are also
tested alone, without a broker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.app import Box, Decision
from edge.camera import FolderCamera
from edge.config import MqttConfig, TlsConfig, parse_config
from edge.image import ImageError, list_images
from edge import commands as C
from edge.mqtt import COMMAND_MAX_BYTES, CommandInvalid, MqttCamera, MqttLink, default_client_factory
from edge.store import Store
from mqtt_broker import Broker, Watcher, free_port, make_certs, mosquitto_available, wait_until

REPO = Path(__file__).resolve().parent.parent
PREFIX = "edge/test"
PASSWORD = "s3cret-Pw-9f2"
# The box takes at most capture.rate (30 in these tests) samples per second and ignores frames in
# between, so training frames are sent a little more than 1/30 s apart.
SAMPLE_GAP = 0.05

needs_broker = pytest.mark.skipif(
    not mosquitto_available() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="mosquitto is not installed (apt install mosquitto mosquitto-clients)")


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch):
    """Tests cannot wait paho's default backoff; the logic is the same with shorter delays."""
    monkeypatch.setattr(MqttLink, "RECONNECT_DELAY", (0.1, 0.5))


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every link must stop paho's thread on close()."""
    yield
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("paho-mqtt")],
               timeout=10, what="paho threads to end")


@pytest.fixture
def brokers(tmp_path):
    """make(start=True, **Broker options) -> a Broker of its own, killed at teardown (after the
    links and watchers of the test are closed, when those fixtures are listed after this one)."""
    made = []

    def make(start=True, **kw):
        b = Broker(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        return b.start() if start else b

    yield make
    for b in made:
        b.stop()


def mqtt_config(port, **changes) -> MqttConfig:
    return dataclasses.replace(MqttConfig(enabled=True, host="127.0.0.1", port=port, prefix=PREFIX,
                                          client_id="edge-test-box"), **changes)


@pytest.fixture
def links():
    """make(cfg, ...) -> a started MqttLink; all are closed at teardown."""
    made = []

    def make(cfg, submit=lambda cmd: None, frame_source=False, device_id="test", start=True):
        link = MqttLink(cfg, device_id, submit, frame_source=frame_source)
        made.append(link)
        if start:
            link.start()
        return link

    yield make
    for link in made:
        link.close()


def decision(label="shoes", index=0, changed=False, frame=1, confidence=0.9):
    return Decision(label=label, index=index, confidence=confidence,
                    scores={"shoes": 0.9, "hat": 0.1}, ts=time.time(), frame=frame, changed=changed)


class RunningBox:
    """A real Box (real model, store, MQTT link) running its loop on a thread."""

    def __init__(self, cfg, engine, link, camera, commands):
        self.store = Store(cfg.store.path, engine.model_id, engine.dim)
        self.store.open()
        self.box = Box(cfg, engine, self.store, camera, None, commands, outputs=[link])
        self.link = link
        self.thread = threading.Thread(target=self.box.run, name="box-loop", daemon=True)

    def start(self):
        self.link.start()
        self.thread.start()
        return self

    def stop(self):
        self.box.stop()
        if self.thread.ident is not None:
            self.thread.join(timeout=20)
            assert not self.thread.is_alive(), "box loop did not stop"
        self.link.close()
        self.store.close()


@pytest.fixture
def boxes(tmp_path, engine):
    """make(broker_port, source="mqtt", folder=None, **mqtt changes) -> a started RunningBox."""
    made = []

    def make(port, source="mqtt", folder=None, start=True, store_vectors=None, **mqtt):
        data = {
            "device_id": "test",
            "classes": [{"name": "shoes"}, {"name": "hat"}],
            "function_button": None, "status_led": None,
            "camera": {"source": source, "fps": 8},
            "head": {"smoothing": 1},
            "capture": {"rate": 30, "min_change": 0},
            "store": {"path": str(tmp_path / f"store{len(made)}")},
            "mqtt": dict({"enabled": True, "host": "127.0.0.1", "port": port,
                          "client_id": f"edge-test-{len(made)}"}, **mqtt),
        }
        if folder is not None:
            data["camera"]["folder"] = str(folder)
        cfg = parse_config(data, base=tmp_path)
        commands = queue.Queue()
        link = MqttLink(cfg.mqtt, cfg.device_id, commands.put, frame_source=source == "mqtt")
        camera = link.camera if source == "mqtt" else FolderCamera(cfg.camera.folder, cfg.camera.fps)
        running = RunningBox(cfg, engine, link, camera, commands)
        if store_vectors:
            with running.store.command():
                for name, vectors in store_vectors.items():
                    # knowledge the box starts with (an import: not an undoable burst)
                    running.store.add_samples(name, vectors, "import", running.store.new_burst())
            running.box._refit()
        made.append(running)
        return running.start() if start else running

    yield make
    for running in made:
        running.stop()


def jpeg_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def png_bytes(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# --- parsing, no broker ---------------------------------------------------------------------------

GOOD = [
    ("record", b"shoes", C.Record("shoes", seconds=3.0), None),
    ("record", b'"shoes"', C.Record("shoes", seconds=3.0), None),
    ("record", b'{"class": "hat", "seconds": 3}', C.Record("hat", seconds=3.0), None),
    ("record", b'{"class": "hat", "count": 20, "id": "r1"}', C.Record("hat", count=20), "r1"),
    ("record/stop", b"{}", C.StopRecording(), None),
    ("record/stop", b"1700000000", C.StopRecording(), None),     # Node-RED's inject sends a timestamp
    ("record/stop", b'{"class": "shoes"}', C.StopRecording("shoes"), None),
    ("undo", b'{"id": 7}', C.Undo(), 7),
    ("clear", b'{"all": true}', C.Clear(None), None),
    ("clear", b"hat", C.Clear("hat"), None),
    ("clear", b'{"class": "hat"}', C.Clear("hat"), None),
    ("rename", b'{"from": "hat", "to": "cap"}', C.Rename("hat", "cap"), None),
    ("threshold", b"0.7", C.SetThreshold(0.7), None),
    ("threshold", b"auto", C.SetThreshold("auto"), None),
    ("threshold", b'{"value": -0.25, "id": "t"}', C.SetThreshold(-0.25), "t"),
    ("classes", b'{"add": "cap"}', C.AddClass("cap"), None),
    ("classes", b'{"remove": "cap"}', C.RemoveClass("cap"), None),
    ("nothing", b'{"class": "table", "nothing": true}', C.SetNothing("table", True), None),
    ("state", b"{}", C.State(), None),
    ("samples", b'{"class": "hat", "limit": 10, "before": 99}', C.ListSamples("hat", 10, 99), None),
    ("sample/delete", b'{"sample": 5}', C.DeleteSample(5), None),
    ("burst/delete", b'{"burst": 2}', C.DeleteBurst(2), None),
    ("record", b'\xef\xbb\xbf{"class": "hat"}', C.Record("hat", seconds=3.0), None),   # a byte-order mark first
    ("classes", '{"add": "टोपी"}'.encode(), C.AddClass("टोपी"), None),            # vowel signs are marks
    ("record", b'{"class": "cafe\\u0301"}', C.Record("caf\u00e9", seconds=3.0), None),   # composed (NFC)
]


@pytest.mark.parametrize("action,payload,command,ident", GOOD)
def test_valid_commands_parse(action, payload, command, ident):
    assert C.parse_payload(action, payload) == (command, ident)


BAD = [
    ("jump", b"{}", "unknown action 'jump'"),
    ("record/start", b"shoes", "unknown action"),
    ("result", b"{}", "unknown action"),
    ("record", b"", "empty payload ignored"),
    ("undo", b"", "empty payload ignored"),      # mosquitto_pub -r -n clears a retained command
    ("clear", b"", "empty payload ignored"),
    ("clear", b"  ", "blank payload ignored"),
    ("clear", b'{"class": null}', "'class'"),
    ("clear", b"{}", 'send {"all": true}'),
    ("clear", b'{"all": 1}', '{"all": true}'),
    ("record", b'{"class": "shoes", "seconds": -1}', "'seconds' must be a number above 0"),
    ("record", b'{"class": "shoes", "seconds": 0}', "'seconds'"),
    ("record", b'{"class": "shoes", "seconds": 1e9}', "at most 60"),
    ("record", b'{"class": "shoes", "seconds": "3"}', "'seconds'"),
    ("record", b'{"class": "shoes", "seconds": NaN}', "'seconds'"),
    ("record", b'{"class": "shoes", "count": 0}', "'count' must be a whole number from 1 to 500"),
    ("record", b'{"class": "shoes", "count": 100000}', "'count'"),
    ("record", b'{"class": "shoes", "count": 2.5}', "'count'"),
    ("record", b'{"class": "shoes", "count": true}', "'count'"),
    ("record", b'{"class": "shoes", "count": 3, "seconds": 2}', "not both"),
    ("record", b'{"class": 5}', "'class'"),
    ("record", b'{"class": "shoes", "colour": "red"}', "unknown key 'colour'"),
    ("record", b'{"class": "shoes"', "not valid JSON"),
    ("record", b"[1, 2]", "must be an object or a string"),
    ("record", b"[" * 3000, "nests deeper"),
    ("record", b'{"a":' * 600 + b"1" + b"}" * 600, "nests deeper"),
    ("record", b"\xff\xfeshoes", "not UTF-8"),
    ("record", b'{"class": "' + b"a" * COMMAND_MAX_BYTES + b'"}', "larger than 4096 bytes"),
    ("record", b'{"class": "shoes", "id": [1]}', "'id'"),
    ("record", b'{"class": "\\u202eevil"}', "letters, digits"),
    ("record", b"x/../../y", "letters, digits"),
    ("classes", b'{"add": "+/#"}', "letters, digits"),
    ("classes", b'{"add": "\\u001b[31mred"}', "letters, digits"),
    ("classes", b'{"add": "' + b"a" * 33 + b'"}', "at most 32 characters"),
    ("undo", b'{"class": "shoes"}', "unknown key 'class'"),
    ("clear", b'{"class": 3}', "'class'"),
    ("rename", b"shoes", "rename needs a JSON object"),
    ("rename", b'{"from": "shoes"}', "'to'"),
    ("threshold", b"high", "threshold must be 'auto' or a number from -1 to 1"),
    ("threshold", b"2", "threshold must be"),
    ("threshold", b"NaN", "threshold must be"),
    ("threshold", b'{"value": true}', "threshold must be"),
    ("classes", b'{"add": "x", "remove": "y"}', "exactly one"),
    ("classes", b"{}", "exactly one"),
    ("classes", b"cap", "classes needs a JSON object"),
    ("nothing", b'{"class": "shoes", "nothing": "yes"}', "true or false"),
    ("thumbnails", b'{"ids": []}', "'ids'"),
    ("state", b'{"id": "\\ud800"}', "lone surrogate"),     # the answer echoing it could not be sent
    ("record", b'{"class": "\\udcff"}', "lone surrogate"),
    ("jump", b'{"id": "\\ud800"}', "lone surrogate"),
    ("record", b'{"class": "shoes", "class": "hat"}', "the key 'class' is given twice"),
    ("classes", b'{"add": "\\u0301a"}', "letters, digits"),                 # a mark on nothing
    ("classes", b'{"add": "unknown\\ufe0f"}', "letters, digits"),          # a mark shown as nothing
]


@pytest.mark.parametrize("action,payload,error", BAD)
def test_invalid_commands_are_refused(action, payload, error):
    with pytest.raises(CommandInvalid) as info:
        C.parse_payload(action, payload)
    assert error in str(info.value)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and "\u202e" not in str(info.value)


def test_mqtt_camera_queue_and_errors(clothing):
    cam = MqttCamera(depth=2, wait=0.05, max_bytes=1_000_000)
    assert cam.read() is None                            # nothing arrived: no frame, no error
    photo = list_images(clothing / "test" / "hat")[0]
    cam.offer(jpeg_bytes(photo))
    frame = cam.read()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    cam.offer(png_bytes())
    assert cam.read().shape == (48, 64, 3)
    cam.offer(b"\0" * 2_000_000)
    with pytest.raises(ImageError, match="larger than the limit"):
        cam.read()
    cam.offer(b"GIF89a not allowed")
    with pytest.raises(ImageError, match="not a JPEG or PNG"):
        cam.read()
    cam.offer(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(ImageError):
        cam.read()
    for i in range(5):                                   # a fast sender: the oldest are dropped
        cam.offer(png_bytes(colour=(i, i, i)))
    assert cam.dropped == 3 and cam.pending() == 2
    assert cam.read()[0, 0, 0] == 3 and cam.read()[0, 0, 0] == 4


def test_disabled_link_does_nothing(tmp_path):
    link = MqttLink(MqttConfig(enabled=False), "test", lambda cmd: None)
    link.start()
    link.decision(decision())
    link.state({"mode": "classifying"})
    link.event({"event": "all_cleared"})
    link.close()
    link.close()
    assert not link.connected and link.camera is None


# --- status, will, reconnects ---------------------------------------------------------------------

@needs_broker
def test_online_retained_and_offline_on_clean_close(broker, watchers, links):
    early = watchers(broker)
    link = links(mqtt_config(broker.port))
    wait_until(lambda: link.connected, what="link to connect")
    link.state({"mode": "classifying", "classes": [{"name": "shoes", "samples": 0}]})
    early.wait(f"{PREFIX}/state")
    late = watchers(broker)                              # subscribes after: sees retained values
    assert late.wait(f"{PREFIX}/status").payload == b"online"
    assert late.on(f"{PREFIX}/status")[0].retain
    state = late.wait(f"{PREFIX}/state")
    assert state.retain and json.loads(state.payload)["mode"] == "classifying"
    mark = late.mark()
    link.close()
    link.close()                                         # idempotent
    assert late.wait(f"{PREFIX}/status", after=mark).payload == b"offline"
    again = watchers(broker)
    msg = again.wait(f"{PREFIX}/status")
    assert msg.payload == b"offline" and msg.retain


@needs_broker
def test_client_factory_and_default_client_id(broker):
    made = []

    def factory(client_id):
        made.append(client_id)
        return default_client_factory(client_id)

    link = MqttLink(mqtt_config(broker.port, client_id=None), "box-7", lambda cmd: None,
                    client_factory=factory)
    try:
        link.start()
        link.start()                                     # a second start does nothing
        wait_until(lambda: link.connected, what="connect")
        assert made == ["edge-box-7"]
    finally:
        link.close()


@needs_broker
def test_last_will_when_the_connection_drops(broker, watchers, links):
    """The socket dies without a DISCONNECT: the broker publishes the will, the link comes back."""
    w = watchers(broker)
    link = links(mqtt_config(broker.port))
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    mark = w.mark()
    link._client.socket().shutdown(socket.SHUT_RDWR)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"offline", after=mark)
    mark = w.mark()
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online", after=mark)
    wait_until(lambda: link.connected, what="reconnect")


@needs_broker
def test_last_will_when_the_process_is_killed(broker, watchers):
    w = watchers(broker)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from edge.config import MqttConfig
        from edge.mqtt import MqttLink
        link = MqttLink(MqttConfig(enabled=True, host="127.0.0.1", port={broker.port},
                                   prefix={PREFIX!r}), "test", lambda cmd: None)
        link.start()
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online", timeout=30)
        mark = w.mark()
        proc.kill()
        proc.wait(timeout=10)
        w.wait(f"{PREFIX}/status", lambda m: m.payload == b"offline", after=mark)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@needs_broker
def test_retained_topics_come_back_after_a_broker_restart(broker, watchers, links, caplog):
    """The broker keeps nothing (persistence off): the link must re-send status, label, state."""
    link = links(mqtt_config(broker.port))
    wait_until(lambda: link.connected, what="connect")
    link.state({"mode": "classifying", "classes": []})
    link.decision(decision("hat", 1, changed=True))
    broker.stop()
    wait_until(lambda: not link.connected, what="link to notice the broker is gone")
    link.state({"mode": "recording", "classes": []})     # changes while away are not lost
    broker.start()
    wait_until(lambda: link.connected, timeout=15, what="reconnect")
    w = watchers(broker)
    assert w.wait(f"{PREFIX}/status").payload == b"online"
    assert w.wait(f"{PREFIX}/label").payload == b"hat"
    assert json.loads(w.wait(f"{PREFIX}/state").payload)["mode"] == "recording"
    late = watchers(broker)                              # after the re-sends: all retained
    assert [(m.payload, m.retain) for m in (late.wait(f"{PREFIX}/status"), late.wait(f"{PREFIX}/label"))] == [
        (b"online", True), (b"hat", True)]
    assert late.wait(f"{PREFIX}/state").retain
    assert "lost the broker" in caplog.text


@needs_broker
def test_bounded_offline_queue(brokers, watchers, links, monkeypatch):
    """Broker absent at start: start() does not raise, the newest max_queue messages wait."""
    monkeypatch.setattr(MqttLink, "RECONNECT_DELAY", (1, 1))  # time for the watcher to subscribe
    broker = brokers(start=False)
    link = links(mqtt_config(broker.port, max_queue=5))
    time.sleep(0.3)
    assert not link.connected
    for i in range(12):
        link.event({"event": "sample_added", "class": "shoes", "samples": i})
    link.state({"mode": "classifying"})
    assert link.dropped == 7
    broker.start()
    w = watchers(broker)
    wait_until(lambda: link.connected, timeout=15, what="late connect")
    wait_until(lambda: len(w.on(f"{PREFIX}/event")) >= 5, what="queued events")
    time.sleep(0.2)
    assert [e["samples"] for e in w.json(f"{PREFIX}/event")] == [7, 8, 9, 10, 11]
    state = json.loads(w.wait(f"{PREFIX}/state").payload)
    assert state["mqtt"]["dropped"] == 7


# --- predictions ----------------------------------------------------------------------------------

@needs_broker
def test_predictions_are_rate_limited_but_label_changes_always_go_out(broker, watchers, links):
    w = watchers(broker)
    link = links(mqtt_config(broker.port, rate=5))
    wait_until(lambda: link.connected, what="connect")
    start = time.monotonic()
    changes = {0: "shoes", 25: "hat", 26: "shoes", 50: "unknown"}
    label = "shoes"
    for i in range(75):                                  # 50 frames/s for 1.5 s
        label = changes.get(i, label)
        link.decision(decision(label, -1 if label == "unknown" else 0, changed=i in changes, frame=i))
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    time.sleep(0.3)
    frames = [p["frame"] for p in w.json(f"{PREFIX}/prediction")]
    assert set(changes) <= set(frames), "every label change is published"
    assert len(frames) <= 5 * elapsed * 1.15 + len(changes) + 1
    assert len(frames) >= 5 * elapsed * 0.6
    # "unknown" once at start (replaces a stale retained label), then every change
    assert w.payloads(f"{PREFIX}/label") == ["unknown", "shoes", "hat", "shoes", "unknown"]
    p = w.json(f"{PREFIX}/prediction")[-1]
    assert set(p) == {"label", "index", "confidence", "scores", "ts", "frame"}
    assert p["label"] == "unknown" and p["index"] == -1 and abs(p["ts"] - time.time()) < 10


@needs_broker
def test_frame_source_publishes_every_prediction(broker, watchers, links):
    w = watchers(broker)
    link = links(mqtt_config(broker.port, rate=1), frame_source=True)
    wait_until(lambda: link.connected, what="connect")
    for i in range(30):
        link.decision(decision(frame=i))
    wait_until(lambda: len(w.on(f"{PREFIX}/prediction")) == 30, what="30 predictions")


# --- login and TLS --------------------------------------------------------------------------------

@needs_broker
def test_username_and_password(brokers, watchers, links, caplog):
    caplog.set_level(logging.DEBUG)
    broker = brokers(users={"edge": PASSWORD, "teacher": "t-pw"})
    w = watchers(broker, username="teacher", password="t-pw")
    good = links(mqtt_config(broker.port, username="edge", password=PASSWORD))
    wait_until(lambda: good.connected, what="login")
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    bad = links(mqtt_config(broker.port, username="edge", password="wrong", client_id="other",
                            prefix="edge/other"))
    anonymous = links(mqtt_config(broker.port, client_id="anon", prefix="edge/anon"))
    time.sleep(1.5)                                      # several retries
    assert not bad.connected and not anonymous.connected
    warnings = [r for r in caplog.records if "refused the connection" in r.getMessage()
                and r.levelno == logging.WARNING]
    assert len(warnings) == 2, "a refused login is logged once per link, not on every retry"
    assert PASSWORD not in caplog.text and "wrong" not in caplog.text


@needs_broker
def test_tls(tmp_path, brokers, watchers, links):
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other")
    broker = brokers(tls=certs)
    w = watchers(broker, tls_ca=certs["ca"])
    link = links(mqtt_config(broker.port, host="localhost", tls=TlsConfig(ca=certs["ca"])))
    wait_until(lambda: link.connected, what="TLS connect")
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    by_ip = links(mqtt_config(broker.port, tls=TlsConfig(ca=certs["ca"]), client_id="ip",
                              prefix="edge/ip"))
    wait_until(lambda: by_ip.connected, what="TLS connect by IP address")
    stranger = links(mqtt_config(broker.port, host="localhost", tls=TlsConfig(ca=other["ca"]),
                                 client_id="stranger", prefix="edge/stranger"))
    plain = links(mqtt_config(broker.port, client_id="plain", prefix="edge/plain"))
    time.sleep(1.0)
    assert not stranger.connected, "a broker certificate from another CA is refused"
    assert not plain.connected


def test_unreadable_tls_file_leaves_mqtt_off(tmp_path, links, caplog):
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    link = links(mqtt_config(free_port(), tls=TlsConfig(ca=bad)))
    assert not link.connected and "MQTT is off" in caplog.text


# --- Home Assistant -------------------------------------------------------------------------------

@needs_broker
def test_home_assistant_discovery(broker, watchers, links):
    w = watchers(broker, topics=("homeassistant/#", f"{PREFIX}/#"))
    link = links(mqtt_config(broker.port, homeassistant=True), device_id="box-1")
    label_topic = "homeassistant/sensor/box-1/label/config"
    conf_topic = "homeassistant/sensor/box-1/confidence/config"
    label = json.loads(w.wait(label_topic).payload)
    conf = json.loads(w.wait(conf_topic).payload)
    late = watchers(broker, topics=("homeassistant/#",))
    assert late.wait(label_topic).retain and late.wait(conf_topic).retain
    assert label["unique_id"] == "edge_box_1_label" and conf["unique_id"] == "edge_box_1_confidence"
    assert label["state_topic"] == f"{PREFIX}/label" and conf["state_topic"] == f"{PREFIX}/confidence"
    assert "'nothing' if value == 'unknown'" in label["value_template"]    # see tests/test_clients.py
    for c in (label, conf):
        assert c["availability_topic"] == f"{PREFIX}/status"
        assert c["device"]["identifiers"] == ["edge_box_1"] and c["device"]["sw_version"]
        assert {"name", "model"} <= set(c["device"])
    mark = w.mark()
    w.publish("homeassistant/status", "online")          # Home Assistant restarted
    w.wait(label_topic, after=mark)
    w.wait(conf_topic, after=mark)
    assert link.connected


# --- a real box -----------------------------------------------------------------------------------

def result_after(w, mark, timeout=10.0):
    return json.loads(w.wait(f"{PREFIX}/cmd/result", after=mark, timeout=timeout).payload)


def send(w, action, payload, timeout=10.0):
    mark = w.mark()
    w.publish(f"{PREFIX}/cmd/{action}", payload)
    return result_after(w, mark, timeout)


SEMANTIC = [
    ("record", b"nosuchclass", "unknown class"),
    ("clear", b"nosuch", "unknown class"),
    ("rename", b'{"from": "shoes", "to": "hat"}', "exists already"),
    ("classes", b'{"add": "unknown"}', "reserved"),
    ("undo", b"{}", "nothing to undo"),
    ("record/stop", b"{}", "not recording"),
    ("classes", b'{"remove": "shoes"}', "is in config.yaml"),
    ("sample/delete", b'{"sample": 424242}', "no sample"),
]


@needs_broker
def test_bad_commands_change_nothing(broker, watchers, boxes, engine, clothing):
    vectors = engine.embed(Image.open(list_images(clothing / "train" / "shoes")[0]))[np.newaxis]
    running = boxes(broker.port, store_vectors={"shoes": vectors})
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    def snapshot():
        return running.store.classes(), running.store.settings(), running.store.last_burst()

    before = snapshot()
    for action, payload, error in [bad for bad in BAD if bad[0] != "result"] + SEMANTIC:
        result = send(w, action, payload)
        assert result["ok"] is False, (action, payload, result)
        assert error in result["error"], (action, payload, result)
        assert result["action"] == action
    result = send(w, "record", b'{"class": "shoes", "count": 0, "id": "req-9"}')
    assert result == {"action": "record", "ok": False, "error": result["error"], "id": "req-9"}
    result = send(w, "clear", b'{"class": "nosuch", "id": 12}')
    assert result["ok"] is False and result["id"] == 12
    assert snapshot() == before
    assert running.thread.is_alive()
    assert send(w, "state", b"{}")["ok"] is True               # still answering


@needs_broker
def test_retained_commands_are_not_run(broker, watchers, boxes):
    """A command left retained on the broker would run again at every reconnect: refuse it."""
    w = watchers(broker)
    w.publish(f"{PREFIX}/cmd/classes", b'{"add": "ghost", "id": "old"}', retain=True)
    running = boxes(broker.port)
    result = result_after(w, 0)
    assert result["ok"] is False and "retained" in result["error"] and result["id"] == "old"
    assert send(w, "state", b"{}")["ok"]
    assert "ghost" not in [c["name"] for c in json.loads(w.on(f"{PREFIX}/state")[-1].payload)["classes"]]
    assert [c.name for c in running.store.classes()] == ["shoes", "hat"]


@needs_broker
def test_retained_commands_are_refused_while_connected_and_clearing_them_does_nothing(broker, watchers, boxes,
                                                                                      engine, clothing):
    """A retained command published while the box is connected is refused too (MQTT 5
    retain-as-published), and clearing it (an empty retained message, `mosquitto_pub -r -n`)
    is ignored: no answer (one said "clear this one"), nothing undone or cleared."""
    vectors = engine.embed(Image.open(list_images(clothing / "train" / "shoes")[0]))[np.newaxis]
    running = boxes(broker.port, store_vectors={"shoes": vectors})
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    mark = w.mark()
    w.publish(f"{PREFIX}/cmd/classes", b'{"add": "ghost", "id": "live"}', retain=True)
    result = result_after(w, mark)
    assert result["ok"] is False and "retained" in result["error"] and result["id"] == "live"
    mark = w.mark()
    for action in ("clear", "undo", "classes"):
        w.publish(f"{PREFIX}/cmd/{action}", b"", retain=True)      # clears the retained message
    assert send(w, "state", b'{"id": "after"}')["id"] == "after"    # commands are answered in order
    answers = [json.loads(m.payload) for m in w.messages[mark:] if m.topic == f"{PREFIX}/cmd/result"]
    assert [a.get("id") for a in answers] == ["after"], answers
    assert [(c.name, c.count) for c in running.store.classes()] == [("shoes", 1), ("hat", 0)]


@needs_broker
def test_a_burst_of_commands_gets_every_answer(broker, watchers, boxes):
    """1,000 commands at once while connected: 1,000 answers, none dropped."""
    boxes(broker.port)
    w = watchers(broker, topics=(f"{PREFIX}/cmd/result", f"{PREFIX}/status"))
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    mark = w.mark()
    for i in range(1000):
        w.client.publish(f"{PREFIX}/cmd/state", json.dumps({"id": i}), qos=1)
    wait_until(lambda: len([m for m in w.messages[mark:] if m.topic.endswith("cmd/result")]) >= 1000,
               timeout=120, what="1000 answers")
    ids = sorted(json.loads(m.payload)["id"] for m in w.messages[mark:] if m.topic.endswith("cmd/result"))
    assert ids == list(range(1000))


@needs_broker
def test_commands_drive_the_box(broker, watchers, boxes, clothing):
    boxes(broker.port)
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")

    def state():
        return json.loads(w.on(f"{PREFIX}/state")[-1].payload)

    assert send(w, "rename", b'{"from": "shoes", "to": "boots", "id": "a"}') == {
        "action": "rename", "ok": True, "id": "a"}
    assert [c["name"] for c in state()["classes"]] == ["boots", "hat"]
    assert send(w, "threshold", b"0.5")["ok"]
    assert state()["threshold"] == 0.5
    assert send(w, "threshold", b"auto")["ok"]
    assert state()["threshold"] == "auto"
    assert send(w, "classes", b'{"add": "cap"}')["ok"]
    assert [c["name"] for c in state()["classes"]] == ["boots", "hat", "cap"]
    assert send(w, "classes", b'{"remove": "cap"}')["ok"]

    assert send(w, "record", b'{"class": "boots", "count": 2}')["ok"]
    assert state()["mode"] == "recording" and state()["recording"] == "boots"
    for photo in list_images(clothing / "train" / "shoes")[:2]:
        time.sleep(SAMPLE_GAP)
        mark = w.mark()
        w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(photo))
        w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "sample_added", after=mark)
    w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "recording_stopped")
    w.wait(f"{PREFIX}/state", lambda m: json.loads(m.payload)["mode"] == "classifying", after=mark)
    assert state()["classes"][0]["name"] == "boots" and state()["classes"][0]["samples"] == 2
    assert send(w, "record", b"hat")["ok"]                   # 3 s by default; stopped early
    assert send(w, "record/stop", b"{}")["ok"]
    assert send(w, "undo", b"{}")["ok"]
    assert state()["classes"][0]["samples"] == 0
    events = [e["event"] for e in w.json(f"{PREFIX}/event")]
    assert "burst_undone" in events and "class_renamed" in events
    assert send(w, "clear", b'{"all": true}')["ok"]
    assert "all_cleared" in [e["event"] for e in w.json(f"{PREFIX}/event")]
    assert "password" not in json.dumps(state())


@needs_broker
def test_bad_frames_become_error_events(broker, watchers, boxes, clothing):
    running = boxes(broker.port)
    running.link.camera.max_bytes = 200_000
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    for payload, error in ((b"hello", "not a JPEG or PNG"), (b"\xff\xd8\xff" + b"\0" * 300_000, "larger than"),
                           (b"\x89PNG\r\n\x1a\n broken", "frame rejected")):
        mark = w.mark()
        w.publish(f"{PREFIX}/camera/frame", payload)
        event = json.loads(w.wait(f"{PREFIX}/event", after=mark).payload)
        assert event["event"] == "error" and error in event["message"]
    mark = w.mark()
    w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "test" / "hat")[0]))
    prediction = json.loads(w.wait(f"{PREFIX}/prediction", after=mark).payload)
    assert prediction["label"] == "unknown" and prediction["index"] == -1   # nothing taught yet
    assert running.thread.is_alive()


@needs_broker
def test_broker_restart_while_classifying(broker, watchers, boxes, tmp_path, clothing):
    folder = tmp_path / "frames"
    folder.mkdir()
    for photo in list_images(clothing / "test" / "hat")[:2]:
        shutil.copy(photo, folder / photo.name)
    running = boxes(broker.port, source="folder", folder=folder)
    w = watchers(broker)
    first = json.loads(w.wait(f"{PREFIX}/prediction").payload)
    broker.stop()
    wait_until(lambda: not running.link.connected, what="disconnect")
    frames = running.box.frames
    wait_until(lambda: running.box.frames > frames + 3, what="the box to keep classifying")
    broker.start()
    wait_until(lambda: running.link.connected, timeout=15, what="reconnect")
    after = watchers(broker)
    assert after.wait(f"{PREFIX}/status").payload == b"online"
    assert after.wait(f"{PREFIX}/label").payload == b"unknown"
    assert json.loads(after.wait(f"{PREFIX}/state").payload)["mode"] == "classifying"
    later = json.loads(after.wait(f"{PREFIX}/prediction",
                                  lambda m: json.loads(m.payload)["frame"] > frames).payload)
    assert later["frame"] > first["frame"]


@needs_broker
def test_broker_absent_at_start(tmp_path, brokers, watchers, boxes, clothing):
    broker = brokers(start=False)
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(list_images(clothing / "test" / "shoes")[0], folder / "a.jpg")
    running = boxes(broker.port, source="folder", folder=folder)
    wait_until(lambda: running.box.frames > 3, what="the box to classify without a broker")
    assert not running.link.connected
    broker.start()
    w = watchers(broker)
    wait_until(lambda: running.link.connected, timeout=15, what="connect once the broker is up")
    assert w.wait(f"{PREFIX}/status").payload == b"online"
    w.wait(f"{PREFIX}/prediction")


@needs_broker
def test_train_two_classes_over_mqtt_end_to_end(broker, watchers, boxes, clothing):
    """Teach shoes and hat with cmd/record + camera/frame only, then recognise unseen photos."""
    boxes(broker.port)
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    per_class = 15
    for name in ("shoes", "hat"):
        result = send(w, "record", json.dumps({"class": name, "count": per_class, "id": name}).encode())
        assert result == {"action": "record", "ok": True, "id": name}
        for photo in list_images(clothing / "train" / name):
            time.sleep(SAMPLE_GAP)
            mark = w.mark()
            w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(photo))
            try:
                event = json.loads(w.wait(f"{PREFIX}/event", after=mark, timeout=3).payload)
            except AssertionError:
                continue                                  # a frame the box skipped
            if event["event"] == "sample_added" and event["samples"] == per_class:
                w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "recording_stopped",
                       after=mark)
                break
    trained = [{"name": "shoes", "samples": per_class}, {"name": "hat", "samples": per_class}]
    def counts(m):
        return [{"name": c["name"], "samples": c["samples"]} for c in json.loads(m.payload)["classes"]]
    w.wait(f"{PREFIX}/state", lambda m: counts(m) == trained and json.loads(m.payload)["mode"] == "classifying")

    mark = w.mark()
    sent, right = 0, 0
    for name in ("shoes", "hat"):
        for photo in list_images(clothing / "test" / name)[:10]:
            before = w.mark()
            w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(photo))
            prediction = json.loads(w.wait(f"{PREFIX}/prediction", after=before).payload)
            sent += 1
            right += prediction["label"] == name
            assert set(prediction["scores"]) == {"shoes", "hat"}
    time.sleep(0.5)
    predictions = [m for m in w.messages[mark:] if m.topic == f"{PREFIX}/prediction"]
    assert len(predictions) == sent, "exactly one prediction per frame"
    frames = [json.loads(m.payload)["frame"] for m in predictions]
    assert frames == list(range(frames[0], frames[0] + sent))
    assert right >= 0.8 * sent, f"{right}/{sent} right"


@needs_broker
def test_a_counted_recording_that_learns_nothing_ends(broker, watchers, boxes, monkeypatch, clothing):
    """`record` with a count and no picture coming (or a still scene) ends once nothing was
    learned for RECORD_IDLE_SECONDS (or RECORD_IDLE_GAPS times the longest gap between its
    samples): it used to stay recording, and so not answering, for ever. `record` for the class
    already recording gives it the new limits."""
    from edge import rules
    monkeypatch.setattr(rules, "RECORD_IDLE_SECONDS", 1.0)
    boxes(broker.port)
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    mark = w.mark()
    assert send(w, "record", b'{"class": "shoes", "count": 5}')["ok"]
    stopped = json.loads(w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "recording_stopped",
                                after=mark, timeout=5).payload)
    assert stopped["class"] == "shoes" and stopped["added"] == 0
    mark = w.mark()
    assert send(w, "record", b'{"class": "hat", "seconds": 60}')["ok"]
    assert send(w, "record", b'{"class": "hat", "seconds": 0.5}')["ok"]     # the new limit applies
    w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "recording_stopped", after=mark, timeout=5)
    # pictures coming slowly: the wait grows to 4 times the longest gap between them (here 2.4 s)
    mark = w.mark()
    assert send(w, "record", b'{"class": "shoes", "count": 5}')["ok"]
    for i in range(2):
        step = w.mark()
        w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "train" / "shoes")[i]))
        w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "sample_added", after=step)
        time.sleep(0.6 * (1 - i))
    last = time.monotonic()
    stopped = w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "recording_stopped",
                     after=mark, timeout=10)
    assert json.loads(stopped.payload)["added"] == 2 and time.monotonic() - last > 1.8


@needs_broker
def test_the_label_follows_class_changes_without_a_new_picture(broker, watchers, boxes, engine, clothing):
    """With pictures over MQTT the next picture may never come: clearing, renaming or marking the
    class just answered answers the last picture again (label and Home Assistant's confidence),
    without a second `prediction` for it. A rename to the same name does nothing; a real one
    ends a recording of the class (its starter stops it by the old name)."""
    shoes = list_images(clothing / "train" / "shoes")
    vectors = np.stack([engine.embed(Image.open(p)) for p in shoes[:6]])
    boxes(broker.port, store_vectors={"shoes": vectors, "hat": np.stack(
        [engine.embed(Image.open(p)) for p in list_images(clothing / "train" / "hat")[:6]])}, homeassistant=True)
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    w.wait(f"{PREFIX}/confidence", lambda m: m.payload == b"0")    # retained from the start, with the label
    mark = w.mark()
    w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "test" / "shoes")[0]))
    assert json.loads(w.wait(f"{PREFIX}/prediction", after=mark).payload)["label"] == "shoes"
    w.wait(f"{PREFIX}/label", lambda m: m.payload == b"shoes", after=mark)
    for action, payload, label in (("rename", b'{"from": "shoes", "to": "boots"}', b"boots"),
                                   ("nothing", b'{"class": "boots", "nothing": true}', b"unknown"),
                                   ("nothing", b'{"class": "boots", "nothing": false}', b"boots"),
                                   ("clear", b'{"all": true}', b"unknown")):
        step = w.mark()
        assert send(w, action, payload)["ok"]
        w.wait(f"{PREFIX}/label", lambda m: m.payload == label, after=step, timeout=5)
    w.wait(f"{PREFIX}/confidence", lambda m: m.payload == b"0", after=mark, timeout=5)
    time.sleep(0.3)
    assert len([m for m in w.messages[mark:] if m.topic == f"{PREFIX}/prediction"]) == 1
    mark = w.mark()
    assert send(w, "record", b'{"class": "hat", "count": 3}')["ok"]
    assert send(w, "rename", b'{"from": "hat", "to": "hat"}')["ok"]         # the same name: nothing happens
    w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "train" / "hat")[7]))
    added = json.loads(w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "sample_added",
                              after=mark).payload)
    assert added == dict(added, **{"class": "hat", "samples": 1})
    state = send(w, "state", b"{}")["state"]      # as the `state` topic says it
    assert state["device_id"] == "test" and "dropped" in state["mqtt"] and state["recording"] == "hat"
    assert send(w, "rename", b'{"from": "hat", "to": "Cap"}')["ok"]
    events = [e for e in (json.loads(m.payload) for m in w.messages[mark:] if m.topic == f"{PREFIX}/event")]
    assert [e["event"] for e in events if e["event"] != "sample_added"] == ["recording_stopped", "class_renamed"]


@needs_broker
def test_deleting_the_burst_being_recorded_ends_the_recording(broker, watchers, boxes, clothing):
    running = boxes(broker.port)
    w = watchers(broker)
    w.wait(f"{PREFIX}/status", lambda m: m.payload == b"online")
    mark = w.mark()
    assert send(w, "record", b'{"class": "shoes", "count": 10}')["ok"]
    w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "train" / "shoes")[0]))
    w.wait(f"{PREFIX}/event", lambda m: json.loads(m.payload)["event"] == "sample_added", after=mark)
    burst = running.store.last_burst()[1]
    assert send(w, "burst/delete", json.dumps({"burst": burst}).encode())["ok"]
    stopped = [json.loads(m.payload) for m in w.messages[mark:] if m.topic == f"{PREFIX}/event"]
    assert [e["event"] for e in stopped][-2:] == ["recording_stopped", "burst_deleted"], stopped
    w.publish(f"{PREFIX}/camera/frame", jpeg_bytes(list_images(clothing / "train" / "shoes")[1]))
    time.sleep(1.0)
    assert running.store.classes()[0].count == 0           # not recorded into the deleted burst
