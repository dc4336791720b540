"""Speed and memory of the engine, as ratios measured in one run (machine speed cancels out).

Timings are medians of interleaved blocks so that a busy neighbour slows both sides alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 5) -> float:
    """Median wall time of fn in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def interleaved_blocks(fns: dict, runs: int, blocks: int = 5) -> dict:
    """Per block, the median ms of each named function; the functions take turns block by block,
    so the same entry of two lists was measured at nearly the same time."""
    per = max(1, runs // blocks)
    samples = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            samples[name].append(median_ms(fn, per, warmup=2))
    return samples


def interleaved(fns: dict, runs: int, blocks: int = 5) -> dict:
    """Median ms of each named function, measured in alternating blocks."""
    return {name: float(np.median(v)) for name, v in interleaved_blocks(fns, runs, blocks).items()}


def paired_ratio(blocks: dict, over: str, under: str) -> float:
    """The median over blocks of one function's time over another's measured next to it: load
    that comes and goes between blocks then weighs on both sides of each ratio alike."""
    return float(np.median(np.array(blocks[over]) / np.array(blocks[under])))


def in_loop(invoke, head, runs: int) -> dict:
    """The head's cost as in the box, where each frame's head runs after an invoke (which evicts
    what the head keeps in cache) and before the next (which reloads what the head evicted): per
    iteration invoke, head, invoke, invoke, each timed; the head's time plus what the invoke after
    it took more than the invoke after an invoke, measured side by side in every iteration, so
    load that comes and goes weighs on both (a ratio of two block medians of invoke with and
    without the head swung between 0.05 and 0.13 for the same code)."""
    costs, heads, reloads = [], [], []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        invoke()
        t1 = time.perf_counter()
        head()
        t2 = time.perf_counter()
        invoke()
        t3 = time.perf_counter()
        invoke()
        t4 = time.perf_counter()
        if i >= 5:
            heads.append(t2 - t1)
            reloads.append((t3 - t2) - (t4 - t3))
            costs.append(((t2 - t1) + (t3 - t2) - (t4 - t3)) / (t4 - t3))
    return {"over_invoke": round(float(np.median(costs)), 4), "head_ms": round(float(np.median(heads)) * 1000, 3),
            "reload_ms": round(float(np.median(reloads)) * 1000, 3)}


def heads_5000(engine, *kinds: str) -> list:
    """Heads of each kind as the box makes them (the model's reference mean and spread prior),
    taught the same 10 classes x 500 samples and not yet fitted: the per-frame figures of issue
    12 (`edge bench`, benchmarks/box_bench.py)."""
    from edge.engine import load_reference, load_spread
    from edge.head import Head
    rng = np.random.default_rng(0)
    samples = {f"c{k}": np.abs(rng.normal(0, 1, (500, engine.dim))).astype(np.float32) for k in range(10)}
    reference = dict(mean=load_reference(engine.path, engine.dim), spread=load_spread(engine.path, engine.dim))
    heads = [Head(kind, **reference) for kind in kinds]
    for head in heads:
        head.set_samples(samples)
    return heads


def engine_rss_mb(model: Path, threads: Optional[int]) -> dict:
    """Resident memory of a fresh process that imported edge and loaded one engine."""
    code = (
        "import json, numpy as np\n"
        "from edge.engine import Embedder\n"
        f"e = Embedder({str(model)!r}, threads={threads!r})\n"
        "e.invoke(np.zeros((e.size, e.size, 3), np.uint8))\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "print(json.dumps({k: int(st[k].split()[0]) / 1024 for k in ('VmRSS', 'VmHWM')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rss_after_load_mb": round(data["VmRSS"], 1), "peak_rss_mb": round(data["VmHWM"], 1)}


# CPU features that decide how fast int8 runs: x86 VNNI, ARM dot product / int8 matrix multiply.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_info() -> dict:
    """The processor's model name and its int8 dot-product flags (/proc/cpuinfo; Linux only)."""
    model, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    if model == "unknown":
        try:   # ARM boards: /proc/device-tree/model ("Raspberry Pi 4 Model B Rev 1.4")
            model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
        except OSError:
            pass
    return {"cpu": model, "int8_flags": " ".join(f for f in INT8_FLAGS if f in flags) or "none"}


def run_bench(model: Optional[str] = None, threads: Optional[int] = None, runs: int = 200) -> dict:
    """int8/float32 invoke ratio, preprocessing/invoke ratio, the head's cost per frame in the
    loop with 5,000 stored samples / invoke, and engine memory."""
    from edge.camera import isp_size
    from edge.engine import DEFAULT_MODEL, FLOAT_MODEL, Embedder
    from edge.image import prepare

    model_path = Path(model) if model else DEFAULT_MODEL
    int8 = Embedder(model_path, threads=threads)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (int8.size, int8.size, 3), dtype=np.uint8)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    w, h = isp_size(640, 480, int8.size)    # what the Pi camera and the webcam now deliver
    source = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fns = {"int8_invoke_ms": lambda: int8.invoke(x),
           "preprocess_640x480_ms": lambda: prepare(frame, int8.size),
           f"preprocess_{w}x{h}_ms": lambda: prepare(source, int8.size)}
    if FLOAT_MODEL.exists() and int8.size == 224:
        fp32 = Embedder(FLOAT_MODEL, threads=threads)
        fns["float32_invoke_ms"] = lambda: fp32.invoke(x)
    ms = interleaved(fns, runs)
    result = {"model": model_path.name, "backend": int8.info.backend,
              "threads": int8.threads, "cpus": os.cpu_count()}
    result.update(cpu_info())
    result.update({k: round(v, 3) for k, v in ms.items()})
    if "float32_invoke_ms" in ms:
        result["int8_over_float32"] = round(ms["int8_invoke_ms"] / ms["float32_invoke_ms"], 3)
    result["preprocess_over_int8_invoke"] = round(ms["preprocess_640x480_ms"] / ms["int8_invoke_ms"], 3)
    result[f"preprocess_{w}x{h}_over_int8_invoke"] = round(ms[f"preprocess_{w}x{h}_ms"] / ms["int8_invoke_ms"], 3)
    head, = heads_5000(int8, "centroid")      # the default head
    vec = int8.invoke(x)
    head.evaluate(vec)              # the fit, once
    loop = in_loop(lambda: int8.invoke(x), lambda: head.evaluate(vec), max(20, runs // 4))
    result["head_5000_in_loop_ms"] = loop["head_ms"]
    result["head_5000_in_loop_over_int8_invoke"] = loop["over_invoke"]
    result.update(engine_rss_mb(model_path, threads))
    return result
