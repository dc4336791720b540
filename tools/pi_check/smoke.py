"""The program the Pi check runs: on the host, and under qemu in each emulated Raspberry Pi OS root.

It does what a box does, without a camera: imports every `edge` module, reads the repository's
config.yaml, drives the panel on mock pins, builds an MQTT client, loads the default int8 model
with LiteRT's reference kernels, embeds real photos, teaches the head a few of them, classifies
the rest, and saves, closes, reopens and compares the store. It writes its results as JSON (and
the embeddings as .npy) into --work; the caller compares the host's run with each emulated one.

Standard library only until the dependencies are put on sys.path; Python 3.9 syntax.

    python smoke.py --repo REPO --datasets DIR/clothing-small --work OUT [--site TARGET] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import site
import sys
import time
from pathlib import Path

# The runtime dependencies of pyproject.toml, by distribution name, with one module each.
DEPENDENCIES = {
    "numpy": "numpy",
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "pillow": "PIL.Image",
    "pyyaml": "yaml",
    "gpiozero": "gpiozero",
    "paho-mqtt": "paho.mqtt.client",
    "aiohttp": "aiohttp.web",
}

CLASSES = ("hat", "shoes", "pants", "dress")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--datasets", required=True, type=Path, help="the clothing-small folder")
    parser.add_argument("--work", required=True, type=Path, help="folder for results and the store")
    parser.add_argument("--site", action="append", default=[], help="a folder of installed "
                        "packages to add to sys.path (the target folder); repeatable")
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--shots", type=int, default=3, help="training photos per class")
    parser.add_argument("--tests", type=int, default=2, help="photos to classify per class")
    parser.add_argument("--quick", action="store_true",
                        help="imports, versions and one embedding only (the venv run)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    timings = {}

    def lap(name, since):
        timings[name] = round(time.monotonic() - since, 2)
        progress(f"{name}: {timings[name]} s")
        return time.monotonic()

    for folder in args.site:
        site.addsitedir(folder)      # like a site-packages folder: .pth files are honoured
    sys.path.insert(0, str(args.repo))
    args.work.mkdir(parents=True, exist_ok=True)

    result = {"platform": platform_facts()}
    t = time.monotonic()
    result["packages"] = import_dependencies()
    result["edge_modules"] = import_edge(args.repo)
    t = lap("imports", t)

    from edge.engine import DEFAULT_MODEL, Embedder, load_reference, load_spread
    from edge.image import load_image

    images = pick_images(args.datasets, args.classes.split(","), 1 if args.quick else args.shots,
                         0 if args.quick else args.tests)
    if args.quick:
        images = images[:1]
    engine = Embedder(DEFAULT_MODEL, threads=1, kernels="reference")
    result["model"] = {"file": DEFAULT_MODEL.name, "id": engine.model_id, "kernels": "reference",
                       "backend": engine.info.backend, "dim": engine.dim,
                       "output_scale": engine._out_scale}
    t = lap("model_load", t)

    import numpy as np

    vectors = []
    for item in images:
        rgb = engine.prepare(load_image(args.datasets / item["path"]))
        item["input_sha256"] = hashlib.sha256(rgb.tobytes()).hexdigest()
        vectors.append(engine.invoke(rgb))
    emb = np.stack(vectors).astype(np.float32)
    np.save(args.work / "embeddings.npy", emb)
    result["images"] = images
    result["embeddings"] = {"file": "embeddings.npy", "shape": list(emb.shape),
                            "sha256": hashlib.sha256(emb.tobytes()).hexdigest(),
                            "finite": bool(np.isfinite(emb).all())}
    t = lap("embed", t)
    timings["per_image"] = round(timings["embed"] / max(1, len(images)), 2)

    if not args.quick:
        result["config"] = check_config(args.repo)
        result["gpio"] = check_panel(result["config"]["_config"])
        del result["config"]["_config"]
        result["mqtt"] = check_mqtt()
        t = lap("config_gpio_mqtt", t)
        reference = load_reference(DEFAULT_MODEL, engine.dim), load_spread(DEFAULT_MODEL, engine.dim)
        result["head"] = check_head(images, emb, reference)
        t = lap("head", t)
        result["store"] = check_store(args.work / "store", engine.model_id, images, emb, reference,
                                      result["head"])
        t = lap("store", t)

    timings["total"] = round(time.monotonic() - started, 2)
    result["timings"] = timings
    (args.work / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps({"ok": True, "work": str(args.work), "timings": timings}))
    return 0


def progress(message: str) -> None:
    print(f"smoke[{platform.machine()} {sys.version.split()[0]}] {message}", file=sys.stderr,
          flush=True)


def platform_facts() -> dict:
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    return {"machine": platform.machine(), "python": sys.version.split()[0],
            "implementation": sys.implementation.name, "executable": sys.executable,
            "prefix": sys.prefix, "base_prefix": sys.base_prefix, "libc": libc,
            "byteorder": sys.byteorder, "path": list(sys.path)}


def import_dependencies() -> dict:
    """Import each runtime dependency: versions, locations, and the compiled modules loaded
    (their import is what breaks on another architecture or Python)."""
    from importlib import metadata

    found = {}
    for dist, module_name in DEPENDENCIES.items():
        module = importlib.import_module(module_name)
        found[dist] = {"version": metadata.version(dist), "file": module.__file__}
    native = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if path.endswith(".so") and name.split(".")[0] in ("numpy", "PIL", "yaml", "ai_edge_litert",
                                                                       "aiohttp", "multidict", "yarl", "frozenlist", "propcache"):
            native[name] = path
    found["_native"] = dict(sorted(native.items()))
    return found


def import_edge(repo: Path) -> list:
    """Every module of the edge package (not __main__, which runs the CLI)."""
    import pkgutil

    import edge

    if Path(edge.__file__).resolve().parent != (repo / "edge").resolve():
        raise SystemExit(f"edge was imported from {edge.__file__}, not from {repo}")
    names = []
    for info in pkgutil.iter_modules(edge.__path__):
        if info.name != "__main__":
            importlib.import_module("edge." + info.name)
            names.append(info.name)
    return names


def pick_images(root: Path, classes: list, shots: int, tests: int) -> list:
    """The first `shots` training and `tests` test photos of each class, in name order."""
    from edge.image import list_images

    picked = []
    for split, count in (("train", shots), ("test", tests)):
        for name in classes:
            files = sorted(list_images(root / split / name))
            if len(files) < count:
                raise SystemExit(f"{root / split / name}: {len(files)} photos, need {count}")
            picked += [{"path": str(f.relative_to(root)), "split": split, "class": name}
                       for f in files[:count]]
    return picked


def check_config(repo: Path) -> dict:
    """The repository's config.yaml through the real loader (PyYAML's C loader where present)."""
    import yaml

    from edge.config import load_config

    cfg = load_config(repo / "config.yaml", secrets=False)
    return {"classes": [c.name for c in cfg.classes], "kernels": cfg.model.kernels,
            "yaml_c_loader": hasattr(yaml, "CSafeLoader"), "_config": cfg}


def check_panel(cfg) -> dict:
    """The box's buttons and LEDs on gpiozero's mock pins: press a button, light an LED."""
    from edge.panel import Panel, gpio_available, mock_pins

    real = gpio_available()
    factory = mock_pins()
    presses = []
    panel = Panel(cfg.classes, cfg.function_button, cfg.status_led, send=presses.append,
                  pwm=cfg.led_pwm, pin_factory=factory)
    try:
        first = cfg.classes[0]
        panel.show(first.name)
        lit = [name for name, led in panel.leds.items() if led.is_lit]
        pin = factory.pin(first.button)
        pin.drive_low()
        deadline = time.monotonic() + 5
        while not presses and time.monotonic() < deadline:
            time.sleep(0.01)
        pin.drive_high()
    finally:
        panel.close()
    return {"real_gpio": real, "lit": lit, "pressed": [p.button for p in presses if p.pressed]}


def check_mqtt() -> dict:
    """An MQTT client object and one encoded message (no network: nothing to connect to here)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="edge-pi-check")
    info = client.publish("edge/pi-check", b"x", qos=0)   # not connected: refused, not sent
    return {"client": type(client).__name__, "publish_rc": int(info.rc)}


def check_head(images: list, emb, reference) -> dict:
    """Teach the training photos, classify the test photos (centroid and knn heads); reference:
    the model's (reference mean, spread prior)."""
    import numpy as np

    from edge.head import Head

    train = [i for i, item in enumerate(images) if item["split"] == "train"]
    test = [i for i, item in enumerate(images) if item["split"] == "test"]
    out = {}
    for kind in ("centroid", "knn"):
        head = Head(kind=kind, mean=reference[0], spread=reference[1])
        for name in dict.fromkeys(images[i]["class"] for i in train):
            head.add(name, emb[[i for i in train if images[i]["class"] == name]])
        labels = head.labels
        pred, sim = head.predict(emb[test])
        closed = head.predict_closed(emb[test])
        truth = [labels.index(images[i]["class"]) for i in test]
        out[kind] = {"labels": labels, "threshold": round(float(head.threshold), 6),
                     "predicted": [int(p) for p in pred], "closed": [int(p) for p in closed],
                     "similarity": [round(float(s), 6) for s in sim],
                     "accuracy": float(np.mean(np.asarray(closed) == np.asarray(truth)))}
    return out


def check_store(folder: Path, model_id: str, images: list, emb, reference, head: dict) -> dict:
    """Write, close, reopen, compare; then a command left only in the WAL by a process that dies
    without closing (os._exit in a forked child), reopened and replayed by SQLite."""
    import shutil

    import numpy as np

    from edge.head import Head
    from edge.store import Store
    from edge.store_db import DB

    shutil.rmtree(folder, ignore_errors=True)
    dim = emb.shape[1]
    train = [i for i, item in enumerate(images) if item["split"] == "train"]
    expected = {}
    for i in train:
        expected.setdefault(images[i]["class"], []).append(i)
    store = Store(folder, model_id, dim)
    store.open()
    for name, rows in expected.items():
        with store.command():
            store.add_class(name)
            store.add_samples(name, emb[rows], "import", store.new_burst())
    with store.command():
        store.set_setting("threshold", "auto")
    store.close()                                    # checkpoints the WAL into the database

    again = Store(folder, model_id, dim)
    again.open()
    stored = again.all_vectors()
    reopened_equal = (list(stored) == list(expected) and again.settings().get("threshold") == "auto"
                      and all(len(stored[n]) == len(r) for n, r in expected.items()))
    bits_equal = all(np.array_equal(stored[n], emb[r].astype(np.float32)) for n, r in expected.items())
    relearned = Head(kind="centroid", mean=reference[0], spread=reference[1])
    relearned.set_samples(dict(stored))
    test = [i for i, item in enumerate(images) if item["split"] == "test"]
    same_predictions = [int(p) for p in relearned.predict(emb[test])[0]] == head["centroid"]["predicted"]
    again.close()

    extra = images[test[0]]["class"]
    pid = os.fork()
    if pid == 0:                                     # the child: one command, then death, no close
        child = Store(folder, model_id, dim)
        child.open()
        with child.command():
            child.add_samples(extra, emb[test[:1]], "button", child.new_burst())
        os._exit(0)
    os.waitpid(pid, 0)
    wal = folder / (DB + "-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    third = Store(folder, model_id, dim)
    third.open()
    expected[extra] = expected[extra] + test[:1]
    replayed = third.all_vectors()
    replayed_equal = all(np.array_equal(replayed[n], emb[r].astype(np.float32)) for n, r in expected.items())
    counts = {c.name: c.count for c in third.classes()}
    third.close()
    return {"reopened_equal": bool(reopened_equal), "vectors_bit_equal": bool(bits_equal),
            "same_predictions_after_reopen": bool(same_predictions),
            "wal_replay_equal": bool(replayed_equal), "wal_bytes_before_replay": wal_bytes, "counts": counts,
            "faults": list(third.faults), "files": sorted(p.name for p in folder.iterdir())}


if __name__ == "__main__":
    sys.exit(main())
