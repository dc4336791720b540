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
import re
import shutil
import subprocess
from pathlib import Path

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


@pytest.fixture
def box(tmp_path, engine, clothing, broker):
    """A real box (model, store, MQTT link) named `scratchbox`, its camera showing hats."""
    shown = tmp_path / "camera"
    shown.mkdir()
    for p in list_images(clothing / "test" / "hat")[:4]:
        shutil.copy(p, shown / p.name)
    cfg = parse_config({
        "device_id": "scratchbox", "classes": [{"name": "A"}], "function_button": None,
        "status_led": None, "camera": {"source": "folder", "folder": str(shown), "fps": 10},
        "head": {"smoothing": 1}, "capture": {"rate": 30, "min_change": 0},
        "store": {"path": str(tmp_path / "store")},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port, "username": "box",
                 "password": PASSWORD, "client_id": "edge-scratchbox"},
    }, base=tmp_path)
    holder = {}
    link = MqttLink(cfg.mqtt, cfg.device_id, lambda cmd: holder["box"].box.submit(cmd))
    running = RunningBox(cfg, engine, link, FolderCamera(shown, 10))
    holder["box"] = running
    running.start()
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
    shown = tmp_path / "camera"
    shown.mkdir()
    for p in list_images(clothing / "test" / "hat")[:3]:
        shutil.copy(p, shown / p.name)
    cfg = parse_config({
        "device_id": "edge-1", "classes": [{"name": "hat"}, {"name": "shoes"}], "function_button": None,
        "status_led": None, "camera": {"source": "folder", "folder": str(shown), "fps": 10},
        "store": {"path": str(tmp_path / "store")},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port, "username": "box",
                 "password": PASSWORD, "client_id": "edge-edge-1"},
    }, base=tmp_path)
    holder = {}
    link = MqttLink(cfg.mqtt, cfg.device_id, lambda cmd: holder["box"].box.submit(cmd))
    running = RunningBox(cfg, engine, link, FolderCamera(shown, 10))
    holder["box"] = running
    running.start()
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
