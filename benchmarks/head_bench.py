"""Head benchmarks, as ratios measured in one run (see benchmarks/README.md, docs/head.md).

  refit: the head's refit after a recording (set_class + fit) at 8 classes x 200 samples, the
         Gram-matrix fit against the old SVD fit (tests/head_reference.py), and per invoke();
         with --against COMMIT also against edge/head.py as it was at that commit (read with
         git show), e.g. --against 855533a^ : the head when issue 10 measured 136 ms; then
         also its per-frame `evaluate` time and the largest choice-score difference.
  frame: one frame's head cost (evaluate + predict) with 5,000 stored samples / invoke(), and
         evaluate alone (what the box calls per frame).
Times are medians; the two refits are interleaved, so other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import edge  # noqa: E402,F401  first: numpy then starts one BLAS thread, as in the box (edge/__init__.py)
import numpy as np  # noqa: E402
from edge.bench import median_ms  # noqa: E402
from edge.engine import DEFAULT_MODEL, Embedder, load_reference, load_spread  # noqa: E402
from edge.head import Head  # noqa: E402
from edge.image import list_images, load_image  # noqa: E402
from head_reference import SvdHead  # noqa: E402


def samples(rng, classes: int, per_class: int, dim: int) -> dict:
    return {f"c{i}": np.abs(rng.normal(0, 1, (per_class, dim))).astype(np.float32) for i in range(classes)}


def head_at(commit: str):
    """The Head class of edge/head.py at a git commit, loaded beside the current one."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:edge/head.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("head_at_commit")
    sys.modules[module.__name__] = module          # dataclasses look their module up
    exec(compile(source, f"{commit}:edge/head.py", "exec"), module.__dict__)
    return module.Head


def against(commit: str, kind: str, mean, spread):
    """The head of that commit, with the spread prior when it takes one (since 72d86dc)."""
    cls = head_at(commit)
    if "spread" in inspect.signature(cls).parameters:
        return cls(kind, mean=mean, spread=spread)
    return cls(kind, mean=mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--against", metavar="COMMIT", help="also time the head of this git commit")
    args = ap.parse_args()
    engine = Embedder(DEFAULT_MODEL, threads=args.threads)
    mean, spread = load_reference(engine.path, engine.dim), load_spread(engine.path, engine.dim)
    rng = np.random.default_rng(0)
    root = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
    x = engine.prepare(load_image(list_images(root / "clothing-small" / "test" / "shoes")[0]))
    invoke = median_ms(lambda: engine.invoke(x), args.runs * 2, warmup=1)
    out = {"invoke_ms": round(invoke, 2)}

    data = samples(rng, 8, 200, engine.dim)
    heads = {"gram": Head(mean=mean, spread=spread), "svd": SvdHead(mean=mean, spread=spread)}
    if args.against:
        heads["against"] = against(args.against, "centroid", mean, spread)
    times = {name: [] for name in heads}
    for head in heads.values():
        head.set_samples(data)
    for _ in range(args.runs):          # interleaved: load from other jobs hits both alike
        for name, head in heads.items():
            t = time.perf_counter()
            head.set_class("c0", data["c0"])
            head.threshold                  # the fit happens lazily on first use
            times[name].append(time.perf_counter() - t)
    for name, t in times.items():
        out[f"refit_{name}_ms"] = round(float(np.median(t[1:])) * 1000, 2)
    out["refit_gram_over_svd"] = round(out["refit_gram_ms"] / out["refit_svd_ms"], 3)
    out["refit_gram_over_invoke"] = round(out["refit_gram_ms"] / invoke, 3)
    if args.against:
        out["against"] = args.against
        out["refit_gram_over_against"] = round(out["refit_gram_ms"] / out["refit_against_ms"], 3)

    big = samples(rng, 10, 500, engine.dim)
    frame = np.abs(rng.normal(0, 1, (1, engine.dim))).astype(np.float32)
    for kind in ("centroid", "knn"):
        head = Head(kind, mean=mean, spread=spread)
        head.set_samples(big)
        head.predict(frame)
        ms = median_ms(lambda: (head.evaluate(frame), head.predict(frame)), args.runs * 4, warmup=1)
        out[f"frame_{kind}_5000_ms"] = round(ms, 3)
        out[f"frame_{kind}_5000_over_invoke"] = round(ms / invoke, 4)
        # what the box does per frame (Box.process): one evaluate, the smoother decides
        ms = median_ms(lambda: head.evaluate(frame), args.runs * 4, warmup=1)
        out[f"evaluate_{kind}_5000_over_invoke"] = round(ms / invoke, 4)
        if args.against:            # the same frame through the older head: its cost, its scores
            other = against(args.against, kind, mean, spread)
            other.set_samples(big)
            other.evaluate(frame)
            out[f"evaluate_{kind}_5000_ms"] = round(ms, 4)
            out[f"evaluate_{kind}_5000_against_ms"] = round(median_ms(lambda: other.evaluate(frame), args.runs * 4, warmup=1), 4)
            rows = big["c0"][:50]
            out[f"choice_{kind}_max_difference_against"] = float(np.abs(head.evaluate(rows)[0] - other.evaluate(rows)[0]).max())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
