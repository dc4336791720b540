"""Probe for issue 12's open point (3 classes at 10 shots, +1 point over the plain centroid):
does a *generic* prior of within-class spread help the choice?

  python benchmarks/prior_probe.py [--cache DIR] [--trials 100] [--seeds 0 1 2]

The prior is the spread of augmented views (crops 55-100 %, mirror, +-15 degrees, brightness,
contrast, colour) of the reference photos (even half of calibration/imagenet-sample plus the
registry photos: what `head_eval.py` builds the reference mean from), so it knows nothing of the
evaluation set. A variant "aA sS pP" whitens the gate view by
  S_w (the trial's pooled within-class spread) + A * (tr S_w / tr C) * C + S * (tr S_w / dim) * I
(C the prior) and blends the plain cosine with weight P; the head and the plain L2 centroid run
on the same draws. Prints accuracy, gain in points over the plain centroid and its standard error
(paired over trials). A probe, not the box's code.

"ensemble kK" (2026-12-07) is the box's head as it is, plus a second copy of it that sees the gate
view through a fixed map T = (A C / tr C + S I / dim)^(-1/2) (A 10, S 3; C kept to its top K
eigenpairs, the rest of its trace spread evenly, so the box could ship K rows beside the model),
the two whitened cosines averaged before the plain cosine is blended in. The second copy's own
shrinkage is then towards the prior instead of the identity; averaging the two views keeps what
each does well (the prior with few classes, the trial's own spread with many). --ensemble-only
prints just the plain centroid, the head and the ensembles (faster); --cost times its second view.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import head_eval  # noqa: E402
from edge.engine import DEFAULT_MODEL, Embedder  # noqa: E402
from edge.head import Head, gate_features, l2_normalize, plain_centroid_predict  # noqa: E402
from edge.image import load_image  # noqa: E402

VIEWS = 8


def augmented(root: Path, cache: Path | None) -> np.ndarray:
    """(photos, VIEWS, dim) embeddings of augmented reference photos."""
    engine = Embedder(DEFAULT_MODEL, threads=None)
    path = cache / f"prior_probe_{engine.model_id[:16]}.npy" if cache else None
    if path and path.exists():
        return np.load(path)
    views = []
    for i, f in enumerate(head_eval.reference_files(root)[0]):
        img = load_image(f).convert("RGB")
        rng = np.random.default_rng([7, i])
        for _ in range(VIEWS):
            w, h = img.size
            s = rng.uniform(0.55, 1.0)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.uniform(0, w - cw + 1)), int(rng.uniform(0, h - ch + 1))
            v = img.crop((x0, y0, x0 + cw, y0 + ch))
            v = ImageOps.mirror(v) if rng.random() < 0.5 else v
            v = v.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
                v = enhance(v).enhance(rng.uniform(0.7, 1.3))
            v = ImageEnhance.Color(v).enhance(rng.uniform(0.6, 1.4))
            views.append(engine.embed(v))
    out = np.array(views, np.float32).reshape(-1, VIEWS, views[0].shape[-1])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return out


def draws(train, test, names, shots, classes, trials, seed):
    """The same draws as edge.evaluate.run_trials (no holdout)."""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        order = list(rng.permutation(len(names)))
        known = [names[i] for i in sorted(order[:classes or len(names)])]
        taught, q, t = {}, [], []
        for ci, c in enumerate(known):
            taught[c] = train[c][rng.permutation(len(train[c]))[:shots]]
            q.append(test[c])
            t.append(np.full(len(test[c]), ci))
        yield taught, np.vstack(q), np.concatenate(t)


def prior_variant(prior: tuple, mean: np.ndarray, alpha: float, shrink: float, plain: float):
    """The variant as a predict function. Cosines in a whitened view depend only on P = S^-1
    (any W with W^T W = P gives them), and S is the fixed prior part M (eigendecomposed once:
    it only scales with tr S_w) plus the trial's low-rank S_w = R^T R / n, so P comes from
    Woodbury's identity with an n x n solve."""
    vals, vecs = prior

    def predict(taught, q):
        groups = [gate_features(v, mean).astype(np.float64) for v in taught.values()]
        r = np.vstack([g - g.mean(0) for g in groups])
        n, dim = r.shape
        tr = float(np.sum(r * r)) / n
        m_inv = 1.0 / (tr * (alpha * vals / vals.sum() + shrink / dim))   # M's eigenvalues, inverted
        apply_m = lambda x: ((x @ vecs) * m_inv) @ vecs.T                # x M^-1
        rm = apply_m(r)
        core = np.linalg.solve(n * np.eye(n) + rm @ r.T, rm)
        apply_p = lambda x: apply_m(x) - (x @ rm.T) @ core                # x S^-1
        rows = np.vstack(groups)
        pr = apply_p(rows)
        inv_len = 1.0 / np.sqrt(np.sum(pr * rows, axis=1, keepdims=True))   # 1 / |W g|
        ends = np.cumsum([len(g) for g in groups])[:-1]
        cw = np.stack([b.mean(0) for b in np.split(rows * inv_len, ends)])    # c_w, unwhitened
        cents = np.stack([b.mean(0) for b in np.split(pr * inv_len, ends)])   # P c_w
        c_len = np.sqrt(np.sum(cents * cw, axis=1))
        x = gate_features(q, mean).astype(np.float64)
        x_len = np.sqrt(np.sum(apply_p(x) * x, axis=1))
        white = (x @ cents.T) / x_len[:, None] / c_len[None, :]
        plain_c = l2_normalize(np.stack([l2_normalize(v).mean(0) for v in taught.values()]))
        return ((1 - plain) * white + plain * (l2_normalize(q) @ plain_c.T)).argmax(1)
    return predict


def prior_map(prior: tuple, alpha: float, shrink: float, rank: int | None) -> np.ndarray:
    """T = (alpha C / tr C + shrink I / dim)^(-1/2) for the prior C = (eigenvalues, vectors); with
    `rank`, only C's top `rank` eigenpairs are kept and its remaining trace spread evenly."""
    vals, vecs = prior
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0, None), vecs[:, order]
    dim = len(vals)
    rel = vals / vals.sum()
    if rank is not None and rank < dim:
        rel = np.concatenate([rel[:rank], np.full(dim - rank, (1.0 - rel[:rank].sum()) / (dim - rank))])
    scale = 1.0 / np.sqrt(alpha * rel + shrink / dim)
    if rank is None or rank >= dim:
        return ((vecs * scale) @ vecs.T).astype(np.float32)
    rest = scale[rank]
    return (rest * np.eye(dim) + (vecs[:, :rank] * (scale[:rank] - rest)) @ vecs[:, :rank].T).astype(np.float32)


def ensemble_variant(t_map: np.ndarray, mean: np.ndarray):
    """The head plus a head on the prior-mapped gate view: their whitened choice scores averaged,
    then the head's usual plain-cosine blend. The second head is handed rows whose gate view is
    the mapped one (signed squares of it, no mean), so both run the box's own code."""

    def to_raw(x):
        y = l2_normalize(gate_features(x, mean) @ t_map)
        return np.copysign(y * y, y)

    def predict(taught, q):
        a, b = Head(mean=mean), Head()
        a.set_samples(taught)
        b.set_samples({c: to_raw(v) for c, v in taught.items()})
        fit = a._ensure_fit()
        w = fit["plain_weight"]
        white = 0.5 * (a.choice_scores(gate_features(q, mean)) + b.choice_scores(gate_features(to_raw(q), None)))
        return ((1 - w) * white + w * (l2_normalize(q) @ fit["plain"].T)).argmax(1)
    return predict


def cost(e: dict, names: list, t_map: np.ndarray, mean: np.ndarray, runs: int = 30) -> None:
    """Median ms of a refit after one class of 8 x 200 samples changed, and of one frame's
    choice scores, for the head and for the prior-mapped copy the ensemble adds."""
    import time
    rng = np.random.default_rng(0)
    samples = {c: (np.repeat(e[f"burst/{c}"].reshape(-1, t_map.shape[0]), 2, axis=0)[:200]
                   * rng.uniform(0.97, 1.03, (200, t_map.shape[0]))).astype(np.float32) for c in names[:8]}
    to_raw = lambda x: (lambda y: np.copysign(y * y, y))(l2_normalize(gate_features(x, mean) @ t_map))
    a, b = Head(mean=mean), Head()
    a.set_samples(samples)
    b.set_samples({c: to_raw(v) for c, v in samples.items()})
    q = e[f"test/{names[0]}"][:1]
    steps = {"head refit": lambda: (a.set_class(names[0], samples[names[0]].copy()), a._ensure_fit()),
             "copy refit": lambda: (b.set_class(names[0], to_raw(samples[names[0]])), b._ensure_fit()),
             "head frame": lambda: a.evaluate(q),
             "copy frame": lambda: b.choice_scores(gate_features(to_raw(q), None))}
    for name, step in steps.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(f"{name}: {1000 * float(np.median(times)):.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--ensemble-only", action="store_true")
    ap.add_argument("--cost", action="store_true", help="time the ensemble's second view and exit")
    args = ap.parse_args()
    root = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
    e = head_eval.embeddings(root, args.cache)
    names = sorted(k.split("/")[1] for k in e if k.startswith("train/"))
    train, test, mean = {c: e[f"train/{c}"] for c in names}, {c: e[f"test/{c}"] for c in names}, e["mean"]
    aug = augmented(root, args.cache)
    g = gate_features(aug.reshape(-1, aug.shape[-1]), mean).reshape(aug.shape)
    r = (g - g.mean(axis=1, keepdims=True)).reshape(-1, aug.shape[-1]).astype(np.float64)
    prior = np.linalg.eigh(r.T @ r / len(r))

    def head(taught, q):
        h = Head(mean=mean)
        h.set_samples(taught)
        return h.predict_closed(q)

    if args.cost:
        cost(e, names, prior_map(prior, 10, 3, None), mean)
        return
    variants = {"plain centroid": plain_centroid_predict, "head": head}
    if not args.ensemble_only:
        for alpha, shrink, plain in ((0, 3, 0), (3, 3, 0), (1, 1, 0.4), (3, 3, 0.4), (10, 3, 0.4), (10, 10, 0.4)):
            variants[f"a{alpha} s{shrink} p{plain}"] = prior_variant(prior, mean, alpha, shrink, plain)
    for rank in (None, 384):
        variants[f"ensemble k{rank or 'all'}"] = ensemble_variant(prior_map(prior, 10, 3, rank), mean)
    acc = {k: [] for k in variants}
    for seed in args.seeds:
        for taught, q, t in draws(train, test, names, args.shots, args.classes, args.trials, seed):
            for k, f in variants.items():
                acc[k].append(float((f(taught, q) == t).mean()))
    base = np.array(acc["plain centroid"])
    print(f"{args.shots} shots, {args.classes or 'all'} classes, {len(base)} trials (seeds {args.seeds})\n")
    print("| variant | accuracy | gain (points) | s.e. | gain over the head | s.e. |\n| --- | --- | --- | --- | --- | --- |")
    for k, v in acc.items():
        d = 100 * (np.array(v) - base)
        h = 100 * (np.array(v) - np.array(acc["head"]))
        print(f"| {k} | {np.mean(v):.4f} | {d.mean():+.2f} | {d.std() / np.sqrt(len(d)):.2f} "
              f"| {h.mean():+.2f} | {h.std() / np.sqrt(len(h)):.2f} |")


if __name__ == "__main__":
    main()
