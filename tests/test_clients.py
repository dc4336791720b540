"""The client snippets of docs/mqtt.md, run for real: the Scratch extension in the real scratch-vm
(npm) over mosquitto's WebSocket listener, the Node-RED flow in a real Node-RED (npm), and the
Home Assistant discovery payloads against a documented field list.

The code is read from docs/mqtt.md itself, so what a teacher copies is what is tested. The npm
packages live in tests/node-mqtt/node_modules (script/test installs them; by hand:
cd tests/node-mqtt && npm ci).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge.camera import FolderCamera
from edge.config import parse_config
from edge.image import list_images
from edge.mqtt import MqttLink
from mqtt_broker import Broker, Watcher, mosquitto_available, wait_until
from test_mqtt import RunningBox

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "mqtt.md"
NODE_DIR = Path(__file__).resolve().parent / "node-mqtt"
PASSWORD = "Sc-7f2-pw"

pytestmark = pytest.mark.skipif(
    not mosquitto_available() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")


def docs_block(heading: str, lang: str, index: int = 0) -> str:
    """The index-th ```lang block under the `## heading` section of docs/mqtt.md."""
    text = DOCS.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    return blocks[index]


def node_with(package: str) -> str:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / package).is_dir():
        pytest.skip(f"node and tests/node-mqtt/node_modules/{package} not found "
                    "(apt-get install nodejs npm; cd tests/node-mqtt && npm install)")
    return node


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker", users={"box": PASSWORD, "scratch": PASSWORD},
               websockets=True).start()
    yield b
    b.stop()


def _running_box(tmp_path, engine, broker, device_id, classes, camera=None, **config) -> RunningBox:
    """A real box (model, store, MQTT link with the tests' login), built and not yet started;
    `camera` is a folder of photos, or None for pictures over MQTT."""
    source = {"source": "folder", "folder": str(camera), "fps": 10} if camera else {"source": "mqtt"}
    cfg = parse_config(dict({
        "device_id": device_id, "classes": [{"name": n} for n in classes], "function_button": None,
        "status_led": None, "camera": source, "store": {"path": str(tmp_path / "store")},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port, "username": "box",
                 "password": PASSWORD, "client_id": f"edge-{device_id}"},
    }, **config), base=tmp_path)
    commands = queue.Queue()
    link = MqttLink(cfg.mqtt, cfg.device_id, commands.put, frame_source=camera is None)
    return RunningBox(cfg, engine, link, FolderCamera(camera, 10) if camera else link.camera, commands)


def _hats(tmp_path, clothing, n) -> Path:
    """A camera folder showing n hat photos."""
    shown = tmp_path / "camera"
    shown.mkdir()
    for p in list_images(clothing / "test" / "hat")[:n]:
        shutil.copy(p, shown / p.name)
    return shown


@pytest.fixture
def box(tmp_path, engine, clothing, broker):
    """A real box (model, store, MQTT link) named `scratchbox`, its camera showing hats."""
    running = _running_box(tmp_path, engine, broker, "scratchbox", ["A"], _hats(tmp_path, clothing, 4),
                           head={"smoothing": 1}, capture={"rate": 30, "min_change": 0}).start()
    yield running
    running.stop()


# --- Scratch ---------------------------------------------------------------------------------------

def test_docs_scratch_extension_in_the_real_scratch_vm(tmp_path, broker, box):
    node = node_with("scratch-vm")
    watcher = Watcher(broker, topics=("edge/scratchbox/#",), username="scratch", password=PASSWORD)
    try:
        wait_until(lambda: watcher.payloads("edge/scratchbox/status") == ["online"], what="box online")
    finally:
        watcher.close()
    extension = tmp_path / "edge-mqtt.js"
    extension.write_text(docs_block("Scratch (TurboWarp)", "js"))
    done = subprocess.run([node, str(NODE_DIR / "scratch_mqtt.js"), str(extension),
                           f"ws://127.0.0.1:{broker.ws_port}", "scratch", PASSWORD],
                          capture_output=True, text=True, timeout=150, cwd=NODE_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finished"], report
    assert report["wrong_address"].startswith("cannot reach ws://127.0.0.1:1"), report
    assert report["wrong_password"].startswith("the broker refused the login: wrong user name or password")
    assert report["connected_wrong_password"] is False or report["connected_wrong_password"] == "false"
    assert report["wrong_box"] == ("no box 'edge' answers on edge/edge/status "
                                   "(boxes online: scratchbox)"), report
    # The block's own default box name works as it is.
    assert report["defaults"]["connect"]["BOX"] == "any"
    assert report["connected"] in (True, "true") and report["problem"] == "", report
    assert report["box"] == "scratchbox"
    assert report["label"] == "unknown"                      # retained, before anything is taught
    assert report["teach_label"] == "A"                      # taught with a block, then recognised
    result = json.loads(report["result"])                    # the default payload "{}" is a command
    assert result["action"] == "undo" and result["ok"] is True, result
    refused = json.loads(report["bad_count"])                # teach with "abc": the box's own refusal
    assert refused["action"] == "record" and refused["ok"] is False and "'count'" in refused["error"], refused


# --- Node-RED --------------------------------------------------------------------------------------

def docs_flow(port: int) -> list:
    """The docs' flow with the broker's address changed, as a user does in the broker node."""
    flow = json.loads(docs_block("Node-RED", "json"))
    broker_node = next(n for n in flow if n["type"] == "mqtt-broker")
    broker_node.update(broker="127.0.0.1", port=str(port))
    return flow


class NodeRed:
    """A real Node-RED (npm node-red) in its own user folder, on a free port."""

    def __init__(self, node: str, folder: Path, settings: dict):
        from mqtt_broker import free_port
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        settings = dict(settings, uiPort=self.port, uiHost="127.0.0.1", credentialSecret=False,
                        flowFile="flows.json", logging={"console": {"level": "info"}})
        (folder / "settings.js").write_text("module.exports = " + json.dumps(settings) + ";\n")
        self.log = folder / "node-red.log"
        self.proc = subprocess.Popen(
            [node, str(NODE_DIR / "node_modules" / "node-red" / "red.js"), "--userDir", str(folder),
             "--settings", str(folder / "settings.js")],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=folder)
        wait_until(lambda: "Started flows" in self.text() or self.proc.poll() is not None,
                   timeout=60, what="Node-RED to start")
        assert self.proc.poll() is None, self.text()[-3000:]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, body=None, headers=None):
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def nodered_box(tmp_path, engine, clothing, broker):
    """A real box named edge-1 (the name in the docs' flow), its camera showing hats."""
    running = _running_box(tmp_path, engine, broker, "edge-1", ["hat", "shoes"], _hats(tmp_path, clothing, 3)).start()
    yield running
    running.stop()


@pytest.mark.parametrize("how", ["flows.json", "admin API"])
def test_docs_node_red_flow_in_a_real_node_red(tmp_path, broker, nodered_box, how):
    node = node_with("node-red")
    flow = docs_flow(broker.port)
    assert any(n["type"] == "tab" for n in flow)
    assert all(n.get("z") == "edge_tab" for n in flow if n["type"] not in ("tab", "mqtt-broker"))
    folder = tmp_path / "node-red"
    folder.mkdir()
    credentials = {"user": "box", "password": PASSWORD}
    if how == "flows.json":
        (folder / "flows.json").write_text(json.dumps(flow))
        (folder / "flows_cred.json").write_text(json.dumps({"edge_broker": credentials}))
    watcher = Watcher(broker, topics=("edge/edge-1/#",), username="scratch", password=PASSWORD)
    red = NodeRed(node, folder, {})
    try:
        if how == "admin API":
            for n in flow:
                if n["type"] == "mqtt-broker":
                    n["credentials"] = credentials
            status, _ = red.request("POST", "/flows", flow, {"Node-RED-Deployment-Type": "full"})
            assert status in (200, 204)
        # A prediction of the running box arrives in the flow (its debug node logs it).
        wait_until(lambda: "edge/edge-1/prediction" in red.text(), timeout=30,
                   what="a prediction in Node-RED's debug output")
        # The undo button sends a command the box answers.
        mark = watcher.mark()
        status, _ = red.request("POST", "/inject/edge_undo_button")
        assert status == 200
        sent = watcher.wait("edge/edge-1/cmd/undo", after=mark, timeout=15)
        assert sent.payload == b"{}"
        answer = json.loads(watcher.wait("edge/edge-1/cmd/result", after=mark, timeout=15).payload)
        assert answer["action"] == "undo", answer
        wait_until(lambda: "edge/edge-1/cmd/result" in red.text(), timeout=15,
                   what="the command's result in Node-RED's debug output")
        assert "Error" not in red.text().split("Started flows", 1)[1], red.text()[-3000:]
    finally:
        red.close()
        watcher.close()


# --- Home Assistant --------------------------------------------------------------------------------

def documented_discovery_fields() -> dict:
    """{field: type} from the field table of docs/mqtt.md's Home Assistant section."""
    text = DOCS.read_text()
    section = text[text.index("\n## Home Assistant\n"):text.index("\n## Cost\n")]
    table = section[section.index("| Field | Type |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def render(template: str, payload: str) -> str:
    """A Home Assistant MQTT value template rendered as HA does: `value` is the payload text,
    `value_json` its JSON (when it is JSON)."""
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    try:
        value_json = json.loads(payload)
    except ValueError:
        value_json = None
    return env.from_string(template).render(value=payload, value_json=value_json).strip()


@pytest.fixture
def ha_link(broker):
    import dataclasses
    from edge.config import MqttConfig
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port, prefix="edge/edge-1",
                     client_id="edge-ha-test", homeassistant=True, username="box", password=PASSWORD)
    link = MqttLink(dataclasses.replace(cfg), "edge-1", lambda cmd: None)
    link.start()
    wait_until(lambda: link.connected, what="connect")
    yield link
    link.close()


def _decision(label, confidence, changed=False, frame=1):
    import time
    from edge.commands import Decision
    return Decision(label=label, index=0 if label != "unknown" else -1, confidence=confidence,
                    scores={}, ts=time.time(), frame=frame, changed=changed)


def test_home_assistant_discovery_uses_only_documented_fields(broker, ha_link):
    fields = documented_discovery_fields()
    assert {"state_topic", "device", "unique_id"} <= set(fields)
    watcher = Watcher(broker, topics=("homeassistant/#",), username="scratch", password=PASSWORD)
    try:
        configs = {t: json.loads(watcher.wait(t).payload) for t in (
            "homeassistant/sensor/edge-1/label/config", "homeassistant/sensor/edge-1/confidence/config")}
    finally:
        watcher.close()
    for topic, config in configs.items():
        undocumented = set(config) - set(fields)
        assert not undocumented, (topic, undocumented)
        for key, value in config.items():
            kind = fields[key]
            if kind in ("text", "topic", "template"):
                assert isinstance(value, str) and value, (key, value)
            elif kind == "int":
                assert isinstance(value, int), (key, value)
            elif kind == "object":
                assert set(value) == {"identifiers", "name", "model", "manufacturer", "sw_version"}
                assert isinstance(value["identifiers"], list) and value["identifiers"]
            elif kind.startswith("`mdi:"):
                assert value.startswith("mdi:")
            else:
                assert value == kind.strip("`"), (key, value)
        assert config["state_topic"].startswith("edge/edge-1/")
        assert config["availability_topic"] == "edge/edge-1/status"


def test_home_assistant_sees_nothing_instead_of_unknown(broker, ha_link):
    label = ha_link.discovery()["homeassistant/sensor/edge-1/label/config"]
    assert render(label["value_template"], "unknown") == "nothing"
    assert render(label["value_template"], "hat") == "hat"
    assert render(label["value_template"], "Unknown hat") == "Unknown hat"
    # The box's own label topic keeps "unknown" (the contract for everything else).
    watcher = Watcher(broker, topics=("edge/edge-1/label",), username="scratch", password=PASSWORD)
    try:
        assert watcher.wait("edge/edge-1/label").payload == b"unknown"
    finally:
        watcher.close()


def test_home_assistant_confidence_is_rounded_and_rate_limited(broker, ha_link, monkeypatch):
    import time
    import edge.mqtt as mqtt
    monkeypatch.setattr(mqtt, "HA_CONFIDENCE_PERIOD", 0.6)
    watcher = Watcher(broker, topics=("edge/edge-1/confidence", "edge/edge-1/prediction"),
                      username="scratch", password=PASSWORD)
    try:
        rng = __import__("random").Random(3)
        ha_link.decision(_decision("hat", 0.81, changed=True, frame=0))
        start = time.monotonic()
        frame = 1
        while time.monotonic() - start < 2.0:           # 20 decisions a second, jittering
            ha_link.decision(_decision("hat", 0.6 + rng.random() * 0.3, frame=frame))
            frame += 1
            time.sleep(0.05)
        ha_link.decision(_decision("unknown", 0.0, changed=True, frame=frame))   # label change: at once
        wait_until(lambda: watcher.payloads("edge/edge-1/confidence")[-1:] == ["0"], what="the label change")
        elapsed = time.monotonic() - start
        values = watcher.payloads("edge/edge-1/confidence")
        assert values[0] == "0"                         # retained from the start, beside "unknown"
        values = values[1:]
        assert values[0] == "80"                        # 0.81 -> whole percent in steps of 5
        assert all(int(v) % 5 == 0 and 0 <= int(v) <= 100 for v in values)
        assert len(values) <= elapsed / 0.6 + 2, values  # one per period, plus the two changes
        assert len(values) * 5 < frame                   # of ~40 decisions, a handful reach HA
        assert len(watcher.on("edge/edge-1/prediction")) > len(values)
        # Every value the renderer would show is the payload itself (no template needed).
        conf = ha_link.discovery()["homeassistant/sensor/edge-1/confidence/config"]
        assert "value_template" not in conf and conf["state_topic"] == "edge/edge-1/confidence"
        late = Watcher(broker, topics=("edge/edge-1/confidence",), username="scratch", password=PASSWORD)
        assert late.wait("edge/edge-1/confidence").retain
        late.close()
    finally:
        watcher.close()


def test_docs_automations_are_valid_yaml_in_both_forms():
    import yaml
    new, old = (yaml.safe_load(docs_block("Home Assistant", "yaml", i))["automation"][0] for i in (0, 1))
    assert new["triggers"][0]["trigger"] == "state" and new["actions"][0]["action"] == "light.turn_on"
    assert old["trigger"][0]["platform"] == "state" and old["action"][0]["service"] == "light.turn_on"
    assert new["triggers"][0]["to"] == old["trigger"][0]["to"]


# --- pictures over MQTT: what a client sending pictures sees ----------------------------------------

def test_mqtt_camera_box_says_its_label_at_start_and_answers_each_picture_alone(
        tmp_path, engine, clothing, broker):
    """A fresh MQTT-camera box publishes `label` (retained, once) before any picture; with the
    default smoothing, a shoe photo after many hat photos is still answered "shoes"."""
    from edge.image import load_image
    running = _running_box(tmp_path, engine, broker, "camerabox", ["hat", "shoes"])
    assert running.box.cfg.head.smoothing > 1           # the default smooths over 5 frames
    watcher = Watcher(broker, topics=("edge/camerabox/#",), username="scratch", password=PASSWORD)
    vectors = {name: np.stack([engine.embed(load_image(p)) for p in list_images(clothing / "train" / name)[:8]])
               for name in ("hat", "shoes")}
    with running.store.command():
        for name, v in vectors.items():
            running.store.add_samples(name, v, "mqtt", running.store.new_burst())
    running.box._refit()
    running.start()
    try:
        wait_until(lambda: watcher.payloads("edge/camerabox/status") == ["online"], what="online")
        label = watcher.wait("edge/camerabox/label")
        assert label.payload == b"unknown" and not watcher.on("edge/camerabox/prediction")
        import time
        time.sleep(0.5)
        assert watcher.payloads("edge/camerabox/label") == ["unknown"]      # once, not repeated
        hats = list_images(clothing / "test" / "hat")[:6]
        shoe = list_images(clothing / "test" / "shoes")[0]
        answers = []
        for photo in hats + [shoe]:
            mark = watcher.mark()
            watcher.publish("edge/camerabox/camera/frame", photo.read_bytes())
            answers.append(json.loads(watcher.wait("edge/camerabox/prediction", after=mark, timeout=20).payload))
        assert [a["label"] for a in answers[:-1]].count("hat") >= 5, answers
        assert answers[-1]["label"] == "shoes", answers[-1]
    finally:
        running.stop()
        watcher.close()
