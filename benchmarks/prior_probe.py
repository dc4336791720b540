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

"ensemble" (2026-12-07) is the box's head with the spread prior made from these photos (what it
does since: edge.head.PriorMap), "head" the box's head without it. --ensemble-only prints just
the plain centroid, the head and the ensemble (faster); --against COMMIT adds the ensemble as it
was at that commit, paired on the same draws (to check that a change to the head keeps its
figures).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import edge  # noqa: E402,F401  first: numpy then starts one BLAS thread, as in the box (edge/__init__.py)
import numpy as np  # noqa: E402
import head_eval  # noqa: E402
from edge.engine import DEFAULT_MODEL, Embedder  # noqa: E402
from edge.evaluate import Split, draw_kits, embed_reference  # noqa: E402
from edge.head import Head, gate_features, l2_normalize, plain_centroid_predict  # noqa: E402


def augmented(root: Path, cache: Path | None) -> np.ndarray:
    """(photos, SPREAD_VIEWS, dim) embeddings of augmented reference photos, as `edge reference`
    makes them for the spread prior (edge.evaluate.embed_reference)."""
    engine = Embedder(DEFAULT_MODEL, threads=None)
    path = cache / f"prior_probe_{engine.model_id[:16]}.npy" if cache else None
    if path and path.exists():
        return np.load(path)
    out = embed_reference(head_eval.reference_files(root)[0], engine.embed)[1]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--ensemble-only", action="store_true")
    ap.add_argument("--against", metavar="COMMIT", help="also the box's head as it was at this git commit "
                    "(edge/head.py read with git show), paired on the same draws")
    args = ap.parse_args()
    root = Path(os.environ.get("EDGE_DATASETS", REPO.parent / "shared" / "datasets"))
    e = head_eval.embeddings(root, args.cache)
    names = sorted(k.split("/")[1] for k in e if k.startswith("train/"))
    train, test, mean = {c: e[f"train/{c}"] for c in names}, {c: e[f"test/{c}"] for c in names}, e["mean"]
    spread = e["spread"]            # the box's prior, made by head_eval from these photos

    def head(taught, q):
        h = Head(mean=mean)
        h.set_samples(taught)
        return h.predict_closed(q)

    variants = {"plain centroid": plain_centroid_predict, "head": head}
    if not args.ensemble_only:      # the variants need the full C: the views themselves
        aug = augmented(root, args.cache)
        g = gate_features(aug.reshape(-1, aug.shape[-1]), mean).reshape(aug.shape)
        r = (g - g.mean(axis=1, keepdims=True)).reshape(-1, aug.shape[-1]).astype(np.float64)
        prior = np.linalg.eigh(r.T @ r / len(r))
        for alpha, shrink, plain in ((0, 3, 0), (3, 3, 0), (1, 1, 0.4), (3, 3, 0.4), (10, 3, 0.4), (10, 10, 0.4)):
            variants[f"a{alpha} s{shrink} p{plain}"] = prior_variant(prior, mean, alpha, shrink, plain)

    def ensemble(taught, q):
        h = Head(mean=mean, spread=spread)
        h.set_samples(taught)
        return h.predict_closed(q)
    variants["ensemble"] = ensemble
    if args.against:
        from head_bench import against

        def older(taught, q):
            h = against(args.against, "centroid", mean, spread)
            h.set_samples(taught)
            return h.predict_closed(q)
        variants[f"ensemble at {args.against}"] = older
    acc = {k: [] for k in variants}
    for seed in args.seeds:
        for _, taught, q, t, _ in draw_kits(Split(train), Split(test), args.shots, args.trials, seed, args.classes):
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
    if args.against:
        d = 100 * (np.array(acc["ensemble"]) - np.array(acc[f"ensemble at {args.against}"]))
        print(f"\nensemble now over the ensemble at {args.against}: {d.mean():+.3f} points "
              f"(s.e. {d.std() / np.sqrt(len(d)):.3f}), {np.count_nonzero(d)} of {len(d)} trials differ")


if __name__ == "__main__":
    main()
