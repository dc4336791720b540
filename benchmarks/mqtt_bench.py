"""What MQTT costs the box, as ratios measured in one run (machine speed cancels out).

1. frame-to-decision time of the real Box loop with the MQTT link on / off (target <= 1.05):
   the camera hands over a decoded photo instantly, so the time is decode-free model + head +
   outputs. "on" publishes every prediction (the no-rate-limit case of the mqtt camera source),
   the worst case; the default rate limit is measured too.
2. round trip: a JPEG published to <prefix>/camera/frame until its prediction arrives back, over
   loopback through a real mosquitto, divided by one bare `Embedder.invoke()` (target <= 2).

Starts its own mosquitto on a free port. Run: .venv/bin/python benchmarks/mqtt_bench.py [--frames N]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import edge  # noqa: E402,F401  first: numpy then starts one BLAS thread, as in the box (edge/__init__.py)
import numpy as np  # noqa: E402
from edge.app import Box  # noqa: E402
from edge.camera import Camera  # noqa: E402
from edge.config import parse_config  # noqa: E402
from edge.engine import DEFAULT_MODEL, Embedder  # noqa: E402
from edge.image import list_images, load_image  # noqa: E402
from edge.mqtt import MqttLink  # noqa: E402
from edge.store import Store  # noqa: E402

PREFIX = "edge/bench"


class StillCamera(Camera):
    """Hands over the same decoded frame at once: only the box's own work is timed."""

    def __init__(self, frame: np.ndarray):
        self.frame = frame

    def read(self) -> np.ndarray:
        return self.frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(folder: Path) -> tuple:
    port = free_port()
    conf = folder / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "log_type error"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start (apt install mosquitto)")


def wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def make_box(folder: Path, port: int, engine: Embedder, camera, source: str, vectors: dict, **mqtt):
    cfg = parse_config({
        "device_id": "bench", "classes": [{"name": "shoes"}, {"name": "hat"}],
        "function_button": None, "status_led": None, "camera": {"source": source},
        "store": {"path": str(folder)},
        "mqtt": dict({"enabled": True, "host": "127.0.0.1", "port": port, "prefix": PREFIX,
                      "client_id": f"bench-{folder.name}"}, **mqtt),
    }, base=folder.parent)
    store = Store(cfg.store.path, engine.model_id, engine.dim)
    store.open()
    box = Box(cfg, engine, store, camera, None, queue.Queue())
    with store.command():
        for name, vecs in vectors.items():
            store.add_samples(name, vecs, "import", store.new_burst())
    box._refit()
    return cfg, box, store


def percentile(values, q):
    return round(float(np.percentile(values, q)), 3)


def frame_to_decision(folder: Path, port: int, engine: Embedder, frame: np.ndarray, vectors: dict,
                      frames: int, blocks: int = 12) -> dict:
    """Per-frame ms of Box.step() with no outputs, with the link publishing every prediction and
    with the link at its default rate. The three run in rotating blocks; each rotation gives an
    on/off ratio of block medians, and the median of those ratios is reported, so a busy
    neighbour (or a slow drift) weighs on both sides alike."""
    cfg, box, store = make_box(folder / "step", port, engine, StillCamera(frame), "folder", vectors)
    every = MqttLink(dataclasses.replace(cfg.mqtt, client_id="bench-every", rate=1e6), "bench", box.submit)
    limited = MqttLink(dataclasses.replace(cfg.mqtt, client_id="bench-limited", prefix=PREFIX + "2"),
                       "bench", box.submit)
    for link in (every, limited):
        link.start()
    wait(lambda: every.connected and limited.connected, what="links to connect")
    setups = {"off": [], "every": [every], "default": [limited]}
    blocks_ms = {name: [] for name in setups}
    per = max(5, frames // blocks)
    try:
        for _ in range(3):
            box.step()
        for _ in range(blocks):
            for name, outputs in setups.items():
                box.outputs = list(outputs)
                times = []
                for _ in range(per):
                    t0 = time.perf_counter()
                    box.step()
                    times.append((time.perf_counter() - t0) * 1000)
                blocks_ms[name].append(float(np.median(times)))
        box.outputs = []
        decision = box.process(engine.embed(frame))
        calls = []
        for _ in range(300):
            t0 = time.perf_counter()
            every.decision(decision)
            calls.append((time.perf_counter() - t0) * 1e6)
    finally:
        for link in (every, limited):
            link.close()
        store.close()
    off = np.array(blocks_ms["off"])
    ratio = {name: float(np.median(np.array(blocks_ms[name]) / off)) for name in ("every", "default")}
    return {
        "off_ms": round(float(np.median(off)), 3),
        "on_every_prediction_ms": round(float(np.median(blocks_ms["every"])), 3),
        "on_default_rate_ms": round(float(np.median(blocks_ms["default"])), 3),
        "ratio_every_prediction": round(ratio["every"], 4),
        "ratio_default_rate": round(ratio["default"], 4),
        "publish_one_prediction_us": round(float(np.median(calls)), 1),
        "frames_each": per * blocks,
        "target": 1.05,
        "ok": max(ratio.values()) <= 1.05,
    }


def round_trip(folder: Path, port: int, engine: Embedder, jpegs: list, prepared: np.ndarray,
               vectors: dict, frames: int, threads=None, blocks: int = 12) -> dict:
    """Median ms from publishing a JPEG to receiving its prediction, over one bare invoke().

    Round trips and bare invokes (on a second interpreter of the same model, as the box's own
    belongs to its loop thread) alternate in blocks; the ratio of each block pair is taken and
    the median reported, so load from other programs weighs on both alike."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    box_holder = {}
    link = MqttLink(parse_config({"mqtt": {"enabled": True, "host": "127.0.0.1", "port": port,
                                           "prefix": PREFIX, "client_id": "bench-rt"}},
                                 base=folder).mqtt,
                    "bench", lambda cmd: box_holder["box"].submit(cmd), frame_source=True)
    cfg, box, store = make_box(folder / "rt", port, engine, link.camera, "mqtt", vectors)
    box_holder["box"] = box
    box.outputs.append(link)
    bare = Embedder(engine.path, threads=threads)
    arrived: "queue.Queue[float]" = queue.Queue()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sender")
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/prediction", 0)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: arrived.put(time.perf_counter())
    client.connect("127.0.0.1", port)
    client.loop_start()
    link.start()
    thread = threading.Thread(target=box.run, daemon=True)
    thread.start()
    trips, invokes, ratios = [], [], []
    per = max(5, frames // blocks)

    def one_trip(payload: bytes) -> float:
        t0 = time.perf_counter()
        client.publish(f"{PREFIX}/camera/frame", payload, qos=0)
        try:
            return (arrived.get(timeout=10) - t0) * 1000
        except queue.Empty:
            raise SystemExit("no prediction came back within 10 s") from None

    def one_invoke() -> float:
        t0 = time.perf_counter()
        bare.invoke(prepared)
        return (time.perf_counter() - t0) * 1000

    try:
        if not subscribed.wait(10):
            raise SystemExit("benchmark client did not subscribe")
        wait(lambda: link.connected, what="the box to connect")
        for i in range(5):
            one_trip(jpegs[i % len(jpegs)])
            one_invoke()
        for b in range(blocks):
            t = [one_trip(jpegs[(b * per + i) % len(jpegs)]) for i in range(per)]
            v = [one_invoke() for _ in range(per)]
            trips += t
            invokes += v
            ratios.append(float(np.median(t) / np.median(v)))
    finally:
        box.stop()
        thread.join(timeout=20)
        link.close()
        client.disconnect()
        client.loop_stop()
        store.close()
    ratio = float(np.median(ratios))
    return {"round_trip_median_ms": round(float(np.median(trips)), 3),
            "round_trip_p90_ms": percentile(trips, 90),
            "invoke_median_ms": round(float(np.median(invokes)), 3), "ratio": round(ratio, 3),
            "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs])), "frames": len(trips),
            "target": 2.0, "ok": ratio <= 2.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240, help="frames per measurement (default 240)")
    parser.add_argument("--threads", type=int, default=None, help="model threads (default: all cores)")
    parser.add_argument("--photos", type=Path,
                        default=Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
                        / "clothing-small")
    args = parser.parse_args(argv)

    engine = Embedder(DEFAULT_MODEL, threads=args.threads)
    train = {name: list_images(args.photos / "train" / name)[:10] for name in ("shoes", "hat")}
    vectors = {name: np.stack([engine.embed(load_image(p)) for p in paths]) for name, paths in train.items()}
    tests = list_images(args.photos / "test" / "shoes")[:8] + list_images(args.photos / "test" / "hat")[:8]
    jpegs = [p.read_bytes() for p in tests]
    frame = np.asarray(load_image(tests[0]))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, port = start_broker(folder)
        try:
            step = frame_to_decision(folder, port, engine, frame, vectors, args.frames)
            rt = round_trip(folder, port, engine, jpegs, engine.prepare(frame), vectors, args.frames,
                            threads=args.threads)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    print(json.dumps({"model": DEFAULT_MODEL.name, "backend": engine.info.backend,
                      "threads": args.threads or os.cpu_count(), "cpus": os.cpu_count(),
                      "frame_to_decision": step, "camera_frame_round_trip": rt}, indent=2))
    return 0 if step["ok"] and rt["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
