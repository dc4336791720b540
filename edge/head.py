"""The on-device head: learns instantly from a few samples and says "unknown" when nothing matches.

Two views of the same embeddings, each doing what it measures best here (see docs/head.md):
- a *gate* view: signed square root, minus a reference mean embedding (shipped beside the model),
  unit length. Cosine similarity to a class centroid in this view says whether a frame looks like
  that class at all; with "auto" a second test asks whether it is more like that class than like
  what all taught classes share. Both thresholds come from leave-one-out scores of the stored
  samples (leaving out a sample's near-duplicates with it: frames of one burst), so they adapt
  to how tight the taught classes are.
- a *choice* view: the gate view whitened by the classes' own pooled within-class spread (shrunk
  towards the identity), blended with the plain cosine of the raw embeddings, the whitened part
  weighing more the more samples there are to estimate the spread from. With the model's spread
  prior (how views of one everyday photo differ) the whitened cosine is the mean of two: as
  above, and in the gate view mapped by the prior, where the taught spread is shrunk towards it
  (a frame's length in that view taken from the first's, `_Frame`).
Pure numpy, no I/O; kinds: "centroid" (class means) and "knn" (mean of a class's k best matches,
so a class does not win by sample count).
"""

from __future__ import annotations

from itertools import count
from statistics import NormalDist
from typing import Dict, List, NamedTuple, Optional

import numpy as np

HEADS = ("centroid", "knn")

# Within-class shrinkage: lambda = SHRINK * mean within-class variance. Chosen on clothing-small
# (10-shot accuracy is flat from 10 to 30); see docs/head.md.
SHRINK = 10.0
# "auto" gate: two tests, calibrated by leave-one-out (LOO) over the stored samples (docs/head.md):
# - like the class at all: gate cosine to the chosen centroid;
# - more like it than like what the taught classes share: cosine after removing the mean of the
#   class centroids ("relative" score).
# Each threshold is the lower prediction bound of a normal fit of the LOO scores that a share
# `gate_budget(agree)` of new samples would fall below (Student-t, so that 20 scores of 2
# classes count for less than 100 of 10). A rejected known photo costs accuracy only if it would
# have been answered right, about as often as a left-out taught sample is (`agree`, its LOO
# centroid beats every other class's), so the share is BUDGET_AT_90 at agreement 0.9 and grows
# as (0.9 / agree) ** BUDGET_POWER, at most MAX_BUDGET: one 3 % share for every kit cost over 3
# points at 2 classes and under 2 at 10; a share growing as the square root of the class count
# about 1.2 at 3 shots; this costs 2.0-2.4 at 10 shots with every kit size (1.9-2.8 over 300
# draws), 1.7-1.9 at 3 shots (docs/head.md, "The unknown gate").
BUDGET_AT_90 = 0.02
BUDGET_POWER = 2.4
MAX_BUDGET = 0.06
# Until at least MIN_LOO leave-one-out similarities exist (classes of one sample, or of
# near-duplicates of one view, each) the threshold is the taught classes' similarity to each other
# (`_fallback_threshold`), at least FALLBACK_THRESHOLD: two unrelated everyday photos reach a gate
# cosine of 0.2 in about 3 % of pairs (150 held-out reference photos: 0.16 at the 95th percentile,
# 0.26 at the 99th); the fixed 0.3 used alone until 2026-12-08 let every untaught thing through
# when all pictures share a scene (docs/head.md, "One view per class").
FALLBACK_THRESHOLD = 0.2
MIN_LOO = 4
# Residuals used to estimate the within-class spread (keeps re-fitting fast with thousands of
# samples), evenly spaced samples of each class. A frame reads each row of the gate view's spread,
# so each class's residuals are cut to its top FRAME_ROWS / classes directions (`_residual_rows`):
# with all 10 classes of clothing-small and 300-500 samples that changed 2-3 % of the choices and
# gave +0.05 to +0.46 points over the 256 rows (k-NN −0.3 to +0.4), where 128 evenly spaced
# residuals instead lost 0.15-0.4 points; the frame at 5,000 samples then cost 0.068-0.072 of an
# invoke instead of 0.077-0.096 (benchmarks/README.md, "2026-12-07, night").
MAX_FIT_ROWS = 256
FRAME_ROWS = 128
# Names each view part (`_view_part`): the key of its residual rows in other parts' kept products.
_SERIALS = count()
# The spread prior (`<model>.spread.npy`, made by `edge reference`): how augmented views of one
# everyday photo differ (crops, mirror, turns, light, colour). The choice is scored twice, in the
# gate view and in the gate view mapped by (PRIOR_WEIGHT C / tr C + PRIOR_SHRINK I / dim)^(-1/2),
# C the prior; the two whitened cosines are averaged. With few samples the taught spread is
# thin and the prior's view adds what it knows; with many the taught spread decides in both.
# On clothing-small +0.22 to +0.30 points at 10 shots (2, 3 and 10 classes), never below the
# head without it (docs/head.md). SPREAD_RANK eigenpairs of C are kept (the rest of its trace
# spread evenly): the full C, its top 384 and its top 256 gave the same figures (600 draws of 3
# classes x 10 shots: +0.94, +0.94, +0.96 points; 192 and 128 lower, docs/head.md); a frame does
# not read them (`_Frame`). A longer file (made before 2026-12-07, night) is cut to its top rows.
PRIOR_WEIGHT = 10.0
PRIOR_SHRINK = 3.0
SPREAD_RANK = 256
# The prior's view sees up to PRIOR_SAMPLES evenly spaced samples of each class (a class recorded
# for 30 s is 200 near-duplicate frames; 32 of them, one every second, show its views as well) and
# takes its spread from up to PRIOR_FIT_ROWS rows in all: over every sample it doubled the refit
# after each recorded frame (benchmarks/README.md, "2026-12-07, later"). Up to 10 shots of up to
# 12 classes, every sample still counts in both views.
PRIOR_SAMPLES = 32
PRIOR_FIT_ROWS = 128
# A frame is scored at the gate view's length only, the other views' scores rescaled by their
# mean length ratio over about LENGTH_ROWS evenly spaced samples of the kit (`_Frame`; one per
# class beyond LENGTH_ROWS classes).
LENGTH_ROWS = 64
SPREAD_VIEWS = 8        # augmented views of each photo (edge.evaluate.spread_views)
# Near-duplicates: samples of one class whose gate cosine reaches DUPLICATE count as views of one
# thing (frames of one burst, 1/6 s apart). On clothing-small, 5 views of one photo have cosines
# 0.81-0.95 (1st-75th percentile), different photos of one class 0.38-0.78 (median to 99.9th).
# A leave-one-out score leaves a sample's near-duplicates out too (else a burst vouches for
# itself and the threshold rejects most new frames), and the plain-view weight counts distinct
# views, not frames. Per class, up to MAX_LOO_ROWS evenly spaced samples are scored.
DUPLICATE = 0.8
MAX_LOO_ROWS = 64
# k-NN per frame: one product over all stored samples reads samples x dim floats (26 MB at
# 5,000 samples), which costs a third of an invoke here. Above KNN_EXACT_MAX samples, a frame
# (up to KNN_FAST_ROWS rows at once) is first scored in a KNN_RANK-dim principal subspace of the
# stored samples, and only the KNN_CANDIDATES best of each class are scored exactly; the k best
# of those are the class's score (docs/head.md measures both paths).
KNN_EXACT_MAX = 1024
KNN_RANK = 192
KNN_CANDIDATES = 16
KNN_FAST_ROWS = 4
# The choice blends the whitened cosine with the plain cosine of unit raw embeddings (the
# baseline), the plain one weighted PLAIN_SAMPLES / (PLAIN_SAMPLES + samples): with few samples
# the spread estimate is noise and the plain view decides; with many, the whitened one.
# Chosen on clothing-small (never below the plain nearest centroid at 1-10 shots, 2-10 classes).
PLAIN_SAMPLES = 20


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    # what np.linalg.norm(x, axis=-1) computes for real rows, without its checks: the head runs
    # this for every frame, where each numpy call costs microseconds (benchmarks/README.md)
    norms = np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norms, 1e-12)


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    """sign(x) * sqrt(|x|): tames the few very large activations that dominate cosine."""
    x = np.asarray(x, dtype=np.float32)
    z = np.sqrt(np.abs(x))
    return np.copysign(z, x, out=z)


def centred(x: np.ndarray, mean: Optional[np.ndarray]) -> np.ndarray:
    """Signed sqrt, minus the reference mean (if any): the gate view before unit length."""
    z = signed_sqrt(x)
    if mean is not None:
        z -= mean
    return z


def gate_features(x: np.ndarray, mean: Optional[np.ndarray]) -> np.ndarray:
    """Signed sqrt, minus the reference mean (if any), unit length."""
    return l2_normalize(centred(x, mean))


class Head:
    """Classes of samples; scores new embeddings against them. Rebuilt lazily after changes."""

    def __init__(self, kind: str = "centroid", k: int = 3, mean: Optional[np.ndarray] = None,
                 threshold="auto", spread: Optional[np.ndarray] = None):
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {kind!r}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.kind = kind
        self.k = k
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)
        # the spread prior's view (`PriorMap`); the k-NN head keeps one view (its per-frame cost)
        self.prior = PriorMap(spread) if spread is not None and kind == "centroid" else None
        self.threshold_setting = threshold
        self._samples: Dict[str, np.ndarray] = {}
        self._plain: Dict[str, np.ndarray] = {}   # per class: sum of unit-length raw embeddings
        self._nothing: set = set()
        self._fit: Optional[dict] = None
        self._parts: Dict[str, tuple] = {}        # per class: (its samples, _class_part of them)

    # --- what the head knows -------------------------------------------------------------

    @property
    def labels(self) -> List[str]:
        """Class names with at least one sample, in the order they were first taught."""
        return [name for name, s in self._samples.items() if len(s)]

    def counts(self) -> Dict[str, int]:
        return {name: len(s) for name, s in self._samples.items()}

    def set_samples(self, samples: Dict[str, np.ndarray]) -> None:
        """Replace everything the head knows with raw embeddings per class (ordered)."""
        self._samples = {name: gate_features(np.atleast_2d(v), self.mean)
                         for name, v in samples.items() if len(v)}
        self._plain = {name: l2_normalize(np.atleast_2d(v)).sum(axis=0)
                       for name, v in samples.items() if len(v)}
        self._fit = None

    def add(self, label: str, vectors: np.ndarray) -> None:
        """Append raw embeddings (one or many rows) to a class."""
        vecs = gate_features(np.atleast_2d(vectors), self.mean)
        old = self._samples.get(label)
        self._samples[label] = vecs if old is None else np.vstack([old, vecs])
        self._plain[label] = self._plain.get(label, 0) + l2_normalize(np.atleast_2d(vectors)).sum(axis=0)
        self._fit = None

    def set_class(self, label: str, vectors: np.ndarray) -> None:
        """Replace one class's samples (raw embeddings); an empty array removes the class."""
        if len(vectors):
            self._samples[label] = gate_features(np.atleast_2d(vectors), self.mean)
            self._plain[label] = l2_normalize(np.atleast_2d(vectors)).sum(axis=0)
        else:
            self._samples.pop(label, None)
            self._plain.pop(label, None)
        self._fit = None

    def set_nothing(self, names) -> None:
        """Mark "nothing" classes (the empty table, hands...): they take part in the choice, so
        frames like them stop going to other classes, but `predict` answers unknown for them and
        they are left out of the spread and the leave-one-out thresholds (they are taught as
        varied); the one-view threshold counts them (`_fallback_threshold`)."""
        self._nothing = set(names)
        self._fit = None

    @property
    def nothing(self) -> List[str]:
        """The taught classes marked as "nothing", in label order."""
        return [n for n in self.labels if n in self._nothing]

    def set_threshold(self, value) -> None:
        """A number, or "auto" to calibrate from the samples."""
        self.threshold_setting = value
        self._fit = None

    # --- fitting ---------------------------------------------------------------------------

    def _ensure_fit(self) -> dict:
        if self._fit is None:
            self._fit = self._make_fit()
        return self._fit

    def _make_fit(self) -> dict:
        labels = self.labels
        groups = [self._samples[n] for n in labels]
        if not groups:
            return {"labels": [], "threshold": self._fixed_or(FALLBACK_THRESHOLD)}
        parts = self._class_parts(labels)
        means = np.stack([p["sum"] for p in parts]) / np.array([len(g) for g in groups], np.float32)[:, None]
        real = np.array([n not in self._nothing for n in labels])
        shaping = np.flatnonzero(real) if real.any() else np.arange(len(groups))   # define the spread
        per_class = max(1, MAX_FIT_ROWS // len(shaping))
        choice = [self._view_fit(groups, parts, shaping, per_class)]
        if self.prior is not None:      # the same fit in the prior's view; the two cosines averaged
            second = [p["prior"] for p in parts]
            choice.append(self.prior.to_gate_view(self._view_fit([v["samples"] for v in second], second, shaping,
                                                                 max(1, PRIOR_FIT_ROWS // len(shaping)), remap=True)))
        taught = [p for p, r in zip(parts, real) if r]
        distinct = sum(p["distinct"] for p in taught)
        centroids = l2_normalize(means)
        fit = {"labels": labels, "knn": choice[0] if self.kind == "knn" else None,
               "plain": l2_normalize(np.stack([self._plain[n] for n in labels])),
               "plain_weight": PLAIN_SAMPLES / (PLAIN_SAMPLES + (distinct if taught else sum(map(len, groups)))),
               "nothing": ~real, "threshold": self._fixed_or(_fallback_threshold(centroids))}
        relative = None
        if self.threshold_setting == "auto":
            gate, rel, views, agree = _loo_scores(taught, centroids[real])
            like, apart = (_gate_threshold(scores, agree, views) for scores in (gate, rel))
            if like is not None:
                fit["threshold"] = like
            if apart is not None:
                # compared as rel + offset >= threshold, so one threshold serves both tests
                shared = centroids[real].mean(axis=0)
                relative = (shared, l2_normalize(centroids - shared), fit["threshold"] - apart)
        fit["views"] = choice if self.kind == "centroid" else []       # `_View`s, each scoring at its own length
        rows = np.vstack([_evenly(g, max(1, LENGTH_ROWS // len(groups))) for g in groups]) if fit["views"] else None
        fit["frame"] = _Frame(centroids, relative, fit["views"], rows)
        return fit

    def _class_parts(self, labels) -> list:
        """`_class_part` of each class, kept between refits while its samples stay the same
        array (they are replaced, never changed in place): a recording changes one class, and
        the near-duplicate search is a third of a refit at 8 x 200 (benchmarks/README.md)."""
        kept = {}
        for name in labels:
            g = self._samples[name]
            hit = self._parts.get(name)
            if hit is None or hit[0] is not g:
                hit = (g, _class_part(g))
                if self.prior is not None:
                    view = _view_part(self.prior(_evenly(g, PRIOR_SAMPLES)))
                    hit[1]["prior"] = {**view, "remapped": _view_part(self.prior.apply(view["samples"]))}
            kept[name] = hit
        self._parts = kept
        return [kept[n][1] for n in labels]

    def _fixed_or(self, default: float) -> float:
        return default if self.threshold_setting == "auto" else float(self.threshold_setting)

    def _view_fit(self, groups, parts, shaping, per_class, remap: bool = False):
        """`_choice_fit` with the residual rows of the classes at the indices `shaping` (those
        that define the within-class spread), per_class rows each. remap (the prior's view, whose
        samples are gate-view samples mapped by T and made unit length): also the class means and
        residual rows of those samples mapped by T once more (kept per class as the `_view_part`
        "remapped"), so that a frame is scored in that view without being mapped
        (`PriorMap.to_gate_view`)."""
        keep = None if remap else max(1, FRAME_ROWS // len(shaping))
        blocks = [((parts[i]["serial"], per_class, keep), _residual_rows(parts[i], per_class, keep)) for i in shaping]
        mapped = None
        if remap:
            again = [p["remapped"] for p in parts]
            mapped = (np.stack([p["sum"] / np.float32(len(g)) for g, p in zip(groups, again)]),
                      [_residual_rows(again[i], per_class) for i in shaping])
        return self._choice_fit(groups, parts, blocks, mapped)

    def _choice_fit(self, groups, parts, blocks, mapped=None):
        """One view of the choice: the spread comes from `blocks`, (key, `_residual_rows`) of the
        classes that define it ("nothing" classes left out), the prototypes from all of `groups`.
        See `_Metric` for how it whitens without whitening. The centroid head gets a `_View` (a
        centroid is its class's mean, whitened: averaging each sample whitened to unit length
        instead decided the same within 0.01 points over 600 draws, docs/head.md, and needed
        every sample's products with the residual rows at every refit); mapped: (class means,
        residual rows) mapped by T once more, for the prior's view. k-NN gets a scoring function,
        gate-view rows (N, dim) -> (N, C), over its samples' products with the residual rows,
        kept in each class's part (`_products`) so that a refit computes only those of the
        classes that changed."""
        factor = spread_factor([b for _, b in blocks])
        metric = _Metric(np.vstack([b.rows for _, b in blocks]) * factor, sum(b.count for _, b in blocks),
                         sum(b.squares for _, b in blocks) * factor ** 2)
        if self.kind == "centroid":
            means = np.stack([p["sum"] / np.float32(len(g)) for g, p in zip(groups, parts)])
            return metric.view(means, None if mapped is None else (mapped[0], np.vstack([b.rows for b in mapped[1]]) * factor))
        products = [_products(p, g, [(key, b.rows) for key, b in blocks]) * factor for g, p in zip(groups, parts)]
        index = _knn_index([metric.unit_rows(g, p["sq"], u) for g, p, u in zip(groups, parts, products)])
        return lambda q: _knn_scores(index, metric.unit_queries(q), self.k)

    @property
    def threshold(self) -> float:
        """The gate threshold in force (calibrated when the setting is "auto")."""
        return self._ensure_fit()["threshold"]

    # --- scoring -------------------------------------------------------------------------

    def evaluate(self, x: np.ndarray) -> tuple:
        """(choice scores (N, C), gate scores (N, C)) for raw embeddings x. The gate scores, to
        compare with `threshold`, are the cosine to each centroid and, with "auto", no more than
        the relative score (plus its calibrated offset): a frame passes only when both pass."""
        fit = self._ensure_fit()
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if not fit["labels"]:
            empty = np.zeros((len(x), 0), dtype=np.float32)
            return empty, empty
        # every numpy call after an invoke costs microseconds (cold caches): the gate-view rows
        # are not made unit length, their products are (`_Frame.products`)
        z = centred(x, self.mean)
        frame = fit["frame"]
        products, squares = frame.products(z)
        choice = frame.choice(products, squares) if fit["knn"] is None else fit["knn"](l2_normalize(z))
        w = fit["plain_weight"]
        return (1.0 - w) * choice + w * (l2_normalize(x) @ fit["plain"].T), frame.gate(products, squares)

    def predict(self, x: np.ndarray) -> tuple:
        """(class index per row or -1 for unknown, gate score per row). A frame whose best class
        is a "nothing" class is unknown too."""
        idx, margin = self.decide(x)
        return np.where(margin >= 0, idx, -1), margin + self.threshold

    def decide(self, x: np.ndarray) -> tuple:
        """(best class per row, gate score minus threshold per row), with a "nothing" class as
        best counted as -inf margin: evaluation sweeps the threshold with this."""
        choice, gate = self.evaluate(x)
        if choice.shape[1] == 0:
            return np.full(len(choice), -1), np.full(len(choice), -np.inf, dtype=np.float32)
        idx = choice.argmax(axis=1)
        margin = gate[np.arange(len(idx)), idx] - self.threshold
        return idx, np.where(self._ensure_fit()["nothing"][idx], -np.inf, margin)

    def predict_closed(self, x: np.ndarray) -> np.ndarray:
        """Best class per row, ignoring the unknown gate (closed-set accuracy)."""
        choice, _ = self.evaluate(x)
        return choice.argmax(axis=1) if choice.shape[1] else np.full(len(choice), -1)


def _knn_index(groups) -> dict:
    """The stored whitened samples in one matrix, with where each class's rows go in a padded
    (classes x largest class) table; above KNN_EXACT_MAX rows also a KNN_RANK-dim principal basis
    (from up to 512 evenly spaced rows, through their Gram matrix) and every row projected on it."""
    sizes = np.array([len(g) for g in groups])
    stacked = np.ascontiguousarray(np.vstack(groups), dtype=np.float32)
    width = int(sizes.max())
    owner = np.repeat(np.arange(len(groups)), sizes)
    slot = owner * width + (np.arange(len(stacked)) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    row_of = np.full(len(groups) * width, -1)       # the stored row in each table slot (-1: padding)
    row_of[slot] = np.arange(len(stacked))
    index = {"stacked": stacked, "sizes": sizes, "width": width, "slot": slot, "basis": None, "row_of": row_of}
    if len(stacked) > KNN_EXACT_MAX:
        sub = _evenly(stacked, 512).astype(np.float64)
        eig, u = np.linalg.eigh(sub @ sub.T)
        top = np.argsort(eig)[::-1][:KNN_RANK]
        top = top[eig[top] > eig.max() * 1e-9]
        basis = ((u[:, top].T @ sub) / np.sqrt(eig[top])[:, None]).astype(np.float32)
        # every row's coordinates, one row per basis vector: a frame's coarse product then
        # reads them in order (48 against 61 us at 5,000 x 192 here)
        index.update(basis=basis, projected=np.ascontiguousarray((stacked @ basis.T).T))
    return index


def _padded(values: np.ndarray, index: dict) -> np.ndarray:
    """Per-sample values (rows x samples) as a (rows, classes, largest class) table, -inf where a
    class has fewer samples."""
    n_classes, width = len(index["sizes"]), index["width"]
    table = np.full((len(values), n_classes * width), -np.inf, dtype=np.float32)
    table[:, index["slot"]] = values
    return table.reshape(len(values), n_classes, width)


def _mean_of_best(table: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """(rows, classes): mean of the min(k, size) largest entries of each class's row of table."""
    kk = min(k, table.shape[2])
    top = np.partition(table, table.shape[2] - kk, axis=2)[:, :, -kk:]
    if sizes.min() >= kk:       # every class has k samples: no padding among the best
        return top.mean(axis=2, dtype=np.float32)
    best = -np.sort(-top, axis=2)
    per_class = np.minimum(kk, sizes)
    sums = np.cumsum(np.where(np.isfinite(best), best, 0.0), axis=2)
    return (sums[:, np.arange(len(sizes)), per_class - 1] / per_class).astype(np.float32)


def _knn_scores(index: dict, w: np.ndarray, k: int) -> np.ndarray:
    """k-NN class scores of whitened unit rows w: exact with few samples or many rows at once;
    else a coarse pass in the principal subspace picks the KNN_CANDIDATES best of each class
    (more on a tie) to score exactly. The picks are the coarse scores at or above each class's
    KNN_CANDIDATES-th best (np.partition): a third of what np.argpartition costs here, and the
    box scores one frame at a time (benchmarks/README.md)."""
    stacked, sizes, width = index["stacked"], index["sizes"], index["width"]
    if index["basis"] is None or len(w) > KNN_FAST_ROWS:
        return _mean_of_best(_padded(w @ stacked.T, index), sizes, k)
    coarse = _padded((w @ index["basis"].T) @ index["projected"], index)
    cand = min(max(KNN_CANDIDATES, k), width)
    cut = np.partition(coarse, width - cand, axis=2)[:, :, width - cand, None]
    out = np.empty((len(w), len(sizes)), dtype=np.float32)
    for i, (picked, q) in enumerate(zip(coarse >= cut, w)):
        slots = np.flatnonzero(picked)
        rows = index["row_of"][slots]
        if sizes.min() < cand:          # a class smaller than `cand`: its padding is picked too
            slots, rows = slots[rows >= 0], rows[rows >= 0]
        exact = stacked[rows] @ q
        if len(slots) == cand * len(sizes):     # no ties: `cand` picks per class, in class order
            out[i] = _mean_of_best(exact.reshape(1, len(sizes), cand), sizes, k)[0]
        else:
            table = np.full((1, len(sizes) * width), -np.inf, dtype=np.float32)
            table[0, slots] = exact
            out[i] = _mean_of_best(table.reshape(1, len(sizes), width), sizes, k)[0]
    return out


def _evenly(rows: np.ndarray, most: int) -> np.ndarray:
    """Up to `most` evenly spaced rows (all of them when there are no more)."""
    return rows if len(rows) <= most else rows[np.linspace(0, len(rows) - 1, most).astype(int)]


class _Rows(NamedTuple):
    """One class's rows for the within-class spread (`_residual_rows`), how many residuals they
    stand for and the residuals' sum of squares."""
    rows: np.ndarray
    count: int
    squares: float


def _residual_rows(part: dict, per_class: int, keep: Optional[int] = None) -> _Rows:
    """One class's rows for the within-class spread: up to per_class of the samples of its
    `_view_part`, evenly spaced, minus their mean, scaled by 1/sqrt(their count); kept in the part.
    keep: at most that many rows, the residuals' top principal directions scaled by their spread:
    R^T R without its weakest directions (see FRAME_ROWS); count and squares stay the residuals'."""
    cache = part.setdefault("residuals", {})
    if (per_class, keep) not in cache:
        g = part["samples"]
        rows = _evenly(g, per_class)
        rows = ((rows - part["sum"] / np.float32(len(g))) / np.sqrt(len(rows))).astype(np.float32)
        count, squares = len(rows), float(np.sum(rows.astype(np.float64) ** 2))
        if keep is not None and count > keep:
            vals, vecs = np.linalg.eigh((rows @ rows.T).astype(np.float64))
            rows = (vecs[:, np.argsort(vals)[::-1][:keep]].T.astype(np.float32) @ rows)
        cache[(per_class, keep)] = _Rows(rows, count, squares)
    return cache[(per_class, keep)]


def spread_factor(blocks) -> float:
    """The weight of the rows for the within-class spread, each class's `_residual_rows` (up to
    MAX_FIT_ROWS in all), so that every class counts the same: a class recorded for long (200
    near-duplicate frames) must not define the spread for all."""
    return float(np.sqrt(sum(b.count for b in blocks) / len(blocks)))


def _products(part: dict, g: np.ndarray, blocks) -> np.ndarray:
    """g's products with every class's residual rows (`blocks`: (key, rows)), side by side;
    kept in g's part per block key, so a refit after one class changed computes only the
    products of that class's samples and of its residual rows (benchmarks/README.md)."""
    old = part.get("products", {})
    kept = {key: old[key] if key in old else g @ rows.T for key, rows in blocks}
    part["products"] = kept
    return np.hstack([kept[key] for key, _ in blocks])


def spread_prior(views: np.ndarray, mean: Optional[np.ndarray]) -> np.ndarray:
    """The spread prior from raw embeddings of augmented views, (photos, views, dim): the top
    SPREAD_RANK eigenpairs of their within-photo spread in the gate view, as rows
    sqrt(eigenvalue / trace) x eigenvector (what `edge reference` writes beside the model)."""
    photos, n, dim = views.shape
    g = gate_features(views.reshape(-1, dim), mean).reshape(photos, n, dim).astype(np.float64)
    r = (g - g.mean(axis=1, keepdims=True)).reshape(-1, dim)
    vals, vecs = np.linalg.eigh(r.T @ r)
    top = np.argsort(vals)[::-1][:SPREAD_RANK]
    vals = np.clip(vals, 0.0, None)
    return (vecs[:, top] * np.sqrt(vals[top] / vals.sum())).T.astype(np.float32)


class PriorMap:
    """The map of gate-view rows into the spread prior's view (see PRIOR_WEIGHT): x ->
    x (PRIOR_WEIGHT C / tr C + PRIOR_SHRINK I / dim)^(-1/2), unit length, with C given by the
    prior's rows (its remaining trace spread evenly over the other directions)."""

    def __init__(self, rows: np.ndarray):
        # C = rows^T rows, as its eigenpairs: the rows of a file are its eigenvectors scaled, but
        # float16 keeps them orthogonal only to 4e-5, and a row's length in this view
        # (`to_gate_view`) assumes orthonormal directions; a file that is not (accepted by
        # engine.load_spread) would drive that length below zero
        rows = np.asarray(rows, dtype=np.float64)
        vals, basis = np.linalg.eigh(rows @ rows.T)          # through the Gram matrix: 12 against 52 ms (SVD)
        keep = np.argsort(vals)[::-1][:SPREAD_RANK]
        keep = keep[vals[keep] > max(vals.max(), 0.0) * 1e-12]
        share = vals[keep]                                                   # eigenvalue / trace
        self.vectors = ((basis[:, keep].T @ rows) / np.sqrt(share)[:, None]).astype(np.float32)
        rank, dim = self.vectors.shape
        rest = max(1.0 - float(share.sum()), 0.0) / max(dim - rank, 1)
        scale = lambda v: 1.0 / np.sqrt(PRIOR_WEIGHT * v + PRIOR_SHRINK / dim)
        self.rest = np.float32(scale(rest))
        self.extra = (scale(share) - scale(rest)).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(self.apply(x))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x T (T symmetric; no unit length)."""
        return x * self.rest + ((x @ self.vectors.T) * self.extra) @ self.vectors

    def to_gate_view(self, view: "_View") -> "_View":
        """A view fitted in the prior's view, its numerators and spread rows mapped by T once
        more (`_Metric.view` with `mapped`), as a view of gate-view rows g: with h = g T / |g T|,
        its score of h is g.(T n) / sqrt(|g T|^2 - u K u), u = (g.(T s_j)), and, the prior's
        directions v_j being orthonormal, |g T|^2 = rest^2 |g|^2 + sum_j ((rest + extra_j)^2 -
        rest^2) (g.v_j)^2."""
        squares = (self.rest + self.extra) ** 2 - self.rest ** 2
        return view._replace(base=view.base * float(self.rest) ** 2, rows=self.vectors,
                             weights=(squares * np.float32(view.base)).astype(np.float32))


class _View(NamedTuple):
    """One view of the centroid choice as what a gate-view row g needs: its scores are
    (g.n_c) / sqrt(base |g|^2 + sum_i w_i (g.r_i)^2 - u K u), u = (g.s_j) over the spread rows
    s_j, with numerators n_c (C, dim), rows r_i and weights w_i (the prior's directions, in its
    view), spread rows and kernel K (`_Metric`). `_Frame` takes what a frame needs of it."""
    numerators: np.ndarray
    base: float
    rows: np.ndarray
    weights: np.ndarray
    spread: np.ndarray
    kernel: np.ndarray

    def lengths(self, g: np.ndarray) -> np.ndarray:
        """The denominator of the scores of each row of g in this view (its whitened length)."""
        length = self.base * np.einsum("ij,ij->i", g, g)
        if len(self.weights):
            length = length + ((g @ self.rows.T) ** 2) @ self.weights
        u = g @ self.spread.T
        return np.sqrt(np.maximum(length - np.einsum("ij,ij->i", u @ self.kernel, u), 1e-24))


class _Frame:
    """What a frame's scores need of a fit, as one matrix read once per frame: the gate's
    centroids (and the relative test's) and, for the centroid head, one numerator per class and
    the first (gate) view's spread rows, folded with its kernel (K = L L^T: u K u = |L^T u|^2).

    Each view divides by the frame's length in that view, one number per frame; the prior's view
    needed its 256 directions and its own spread rows for it, 2 of the 2.8 MB a frame read after
    each invoke. Its ratio to the gate view's length varies little (3 % on clothing-small's test
    photos), so the other views' scores are taken at the gate view's length times the mean ratio
    over up to LENGTH_ROWS of the kit's samples (`rows`), and all views' numerators add up to one
    row per class: 0.02-0.4 % of choices changed, accuracy −0.031 to +0.025 points (docs/head.md,
    Speed)."""

    def __init__(self, centroids: np.ndarray, relative, views: list, rows: np.ndarray):
        blocks = [centroids]
        self.classes = len(centroids)
        self.relative = None
        if relative is not None:
            shared, rel_cents, offset = relative
            blocks += [rel_cents, shared[None, :]]
            self.relative = (float(shared @ shared), shared @ rel_cents.T, offset)
        self.numerators = sum(map(len, blocks))
        self.length = None
        if views:       # the first is the gate view (no prior directions: its rows are empty)
            first = views[0]
            own = first.lengths(rows)
            ratios = [1.0] + [np.mean(own / v.lengths(rows)) for v in views[1:]]
            blocks.append(sum(v.numerators * np.float32(r) for v, r in zip(views, ratios)) / len(views))
            folded = (np.linalg.cholesky(first.kernel).T @ first.spread if np.any(first.kernel)
                      else np.zeros((0, first.spread.shape[1]), np.float32))
            start = sum(map(len, blocks))
            blocks.append(folded)
            self.length = (np.float32(first.base), slice(start, start + len(folded)))
        self.matrix = np.ascontiguousarray(np.vstack(blocks), dtype=np.float32)

    def products(self, z: np.ndarray) -> tuple:
        """(the products of z's rows made unit length (gate-view rows g) with every row, |g|^2
        per row: 1, or 0 for a zero row)."""
        squares = np.einsum("ij,ij->i", z, z)
        scale = 1.0 / np.maximum(np.sqrt(squares), 1e-12)
        return (z @ self.matrix.T) * scale[:, None], squares * scale * scale

    def choice(self, products: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """The centroid choice: the mean of the views' whitened cosines, (N, C)."""
        base, spread = self.length
        u = products[:, spread]
        length = np.sqrt(np.maximum(base * squares - np.einsum("ij,ij->i", u, u), 1e-24))
        return products[:, self.numerators:self.numerators + self.classes] / length[:, None]

    def gate(self, products: np.ndarray, squares: np.ndarray) -> np.ndarray:
        """Gate scores (see `Head.evaluate`), (N, C)."""
        n = self.classes
        gate = products[:, :n]
        if self.relative is not None:
            shared_sq, shared_rel, offset = self.relative
            away = np.sqrt(np.maximum(squares - 2 * products[:, 2 * n] + shared_sq, 1e-24))
            gate = np.minimum(gate, (products[:, n:2 * n] - shared_rel) / away[:, None] + offset)
        return gate


class _Metric:
    """Cosines in the view whitened by the shrunk within-class spread S = R^T R / n + lambda I
    (R: rows standing for n <= MAX_FIT_ROWS residuals, lambda = SHRINK x their mean variance), without
    whitening anything.

    The whitened cosine of x and y is x^T P y / (|x|_P |y|_P) with P = S^-1, and by Woodbury's
    identity lambda P = I - R^T K R with K = (n lambda I + R R^T)^-1, an n x n inverse. So a row
    needs only its n products with R (u = R x): x^T P y ~ x.y - u_x K u_y. The eigendecomposition
    of R R^T and the projection of every sample on its basis that whitening needed were two
    thirds of a refit (benchmarks/README.md, "2026-12-07").
    """

    def __init__(self, residuals: np.ndarray, n: int, squares: float):
        """residuals: the rows R; n: how many residuals they stand for (more when a class's were
        cut to its top directions, `_Rows`), squares: the residuals' sum of squares."""
        r = np.asarray(residuals, dtype=np.float32)
        self.rows = r
        m, dim = r.shape
        if n < 2 or not np.any(r):     # no spread known: plain cosines
            self.k = np.zeros((m, m), np.float32)
            return
        gram = r @ r.T
        lam = max(SHRINK * squares / n / dim, 1e-12)
        # float32 is enough: the eigenvalues lie between n lambda and n lambda + trace, a
        # condition number of at most 1 + dim / SHRINK (129)
        self.k = np.linalg.inv(gram + np.float32(n * lam) * np.eye(m, dtype=np.float32))

    def _parts(self, x: np.ndarray, squares: np.ndarray, u: Optional[np.ndarray] = None) -> tuple:
        """(u K for each row of x, |x|_P per row (up to the common factor)); squares: |x|^2,
        u: the rows' products with the residual rows when known."""
        u = x @ self.rows.T if u is None else u
        uk = u @ self.k
        return uk, np.sqrt(np.maximum(squares - np.einsum("ij,ij->i", uk, u), 1e-24))

    def view(self, means: np.ndarray, mapped: Optional[tuple] = None) -> _View:
        """The centroid choice in this view: whitened cosines to the rows `means`. mapped:
        (means T, residual rows T) for a view that scores rows mapped by a fixed symmetric T
        (`PriorMap.to_gate_view` adds the rest), else T = I."""
        out_means, out_rows = (means, self.rows) if mapped is None else mapped
        uk, lengths = self._parts(means, np.einsum("ij,ij->i", means, means))
        return _View(((out_means - uk @ out_rows) / lengths[:, None]).astype(np.float32), 1.0,
                     np.zeros((0, means.shape[1]), np.float32), np.zeros(0, np.float32), out_rows, self.k)

    def unit_rows(self, g: np.ndarray, squares: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Rows scaled to unit whitened length (k-NN's stored side)."""
        return (g / self._parts(g, squares, u)[1][:, None]).astype(np.float32)

    def unit_queries(self, q: np.ndarray) -> np.ndarray:
        """P q scaled to unit whitened length (k-NN's query side): its dot product with a
        `unit_rows` row is their whitened cosine."""
        uk, q_len = self._parts(q, np.einsum("ij,ij->i", q, q))
        return ((q - uk @ self.rows) / q_len[:, None]).astype(np.float32)


def _loo_rows(g: np.ndarray) -> tuple:
    """(rows to score, their near-duplicate masks over all of g): up to MAX_LOO_ROWS evenly spaced
    rows of one class's gate-view samples; each row is a near-duplicate of itself."""
    rows = _evenly(np.arange(len(g)), MAX_LOO_ROWS)
    dup = (g[rows] @ g.T) >= DUPLICATE
    dup[np.arange(len(rows)), rows] = True
    return rows, dup


def _view_part(samples: np.ndarray) -> dict:
    """What a view's fit needs of one class's samples in that view (the gate view's, in
    `_class_part`, and the prior's, `PriorMap`): the samples, their sum and squared lengths, and a
    serial naming their residual rows in other parts' kept products."""
    return {"samples": samples, "sum": samples.sum(axis=0), "sq": np.einsum("ij,ij->i", samples, samples),
            "serial": next(_SERIALS)}


def _class_part(g: np.ndarray) -> dict:
    """What a refit needs of one class's gate-view samples g that depends on them alone: their
    sum, how many distinct views they are, and their leave-one-out rows: each scored against the
    class centroid computed without it and its near-duplicates ("own", unit length). A sample
    whose class is all its near-duplicates has no score: like a class of one sample, one view
    tells nothing of how far new views go ("own" is None when no sample has one)."""
    rows, dup = _loo_rows(g)
    part = {**_view_part(g), "distinct": len(g) * float(np.mean(1.0 / dup.sum(axis=1))), "own": None}
    total = part["sum"]
    keep = dup.sum(axis=1) < len(g)      # else only near-duplicates: one view, no score
    if keep.any():
        k_rows, k_dup = rows[keep], dup[keep]
        own = l2_normalize(total[None, :] - k_dup.astype(np.float32) @ g)
        scored = g[k_rows]
        part.update(own=own, rows=scored, gate=np.sum(own * scored, axis=1),
                    ss=part["sq"][k_rows].astype(np.float64),
                    oo=np.einsum("ij,ij->i", own, own).astype(np.float64),
                    views=len(g) * float(np.mean(1.0 / k_dup.sum(axis=1))) * len(k_rows) / len(keep),
                    full=_full_centroid_gain(total / np.float32(len(g)), part["distinct"]))
    return part


def _full_centroid_gain(mean: np.ndarray, views: float) -> float:
    """How much closer a new sample comes to the centroid of all m views of a class than a left-
    out one to the centroid of the other m - 1: the mean of m unit samples x = mu + e has squared
    length |mu|^2 + (1 - |mu|^2) / m, and a sample's cosine to it is x.mu over that length, so
    every score scales by the ratio of the two lengths (its spread too: scaled, not shifted).
    m counts distinct views, not frames (a burst's frames are one view). The gate scores left-out
    samples against m - 1 views but meets new frames with all m: without this the few-shot
    thresholds were pessimistic (3 classes x 3 shots, 200 draws: 0.734 of unrelated photos
    unknown for 0.85 points of known accuracy, with it 0.779 for 1.25). The relative test's
    scores are left as they are (this ratio is not theirs), so it stays lenient at few shots."""
    m = max(views, 2.0)
    signal = float(np.clip((float(mean @ mean) - 1.0 / m) / (1.0 - 1.0 / m), 1e-3, 1.0))
    noise = 1.0 - signal
    return float(np.sqrt((signal + noise / (m - 1.0)) / (signal + noise / m)))


def _loo_scores(parts, centroids) -> tuple:
    """Leave-one-out gate and relative scores of samples against their own class (`parts`: the
    classes' `_class_part`, `centroids` their unit class centroids), how many distinct views the
    scores stand for, and their agreement: the share of the left-out samples closer to their own
    class's centroid (without them) than to any other's (1 with one class). The relative scores
    need two classes."""
    gate, rel, views, agreed = [], [], 0.0, 0
    n_classes = len(parts)
    shared = centroids.mean(axis=0) if n_classes else None
    for c, part in enumerate(parts):
        if part["own"] is None:
            continue
        views += part["views"]
        gate.append(part["gate"] * part["full"])
        if n_classes >= 2:
            rel.append(_relative_loo(part, shared, centroids[c], n_classes))
            rival = np.delete(part["rows"] @ centroids.T, c, axis=1).max(axis=1)
            agreed += int(np.count_nonzero(part["gate"] > rival))
        else:
            agreed += len(part["gate"])
    cat = lambda v: np.concatenate(v) if v else np.zeros(0, np.float32)
    gate = cat(gate)
    return gate, cat(rel), views, agreed / len(gate) if len(gate) else 1.0


def _relative_loo(part: dict, shared: np.ndarray, centroid: np.ndarray, n_classes: int) -> np.ndarray:
    """Relative scores of a class's leave-one-out rows s: the cosine of s - h to o - h, where o
    is the row's own leave-one-out centroid and h = shared + (o - centroid) / n_classes the mean
    of the class centroids with o in the class's place. Written out in dot products of s and o
    with shared and centroid (and the cached s.o, |s|^2, |o|^2): four matrix-vector products per
    class instead of two (rows x dim) differences and normalisations per refit."""
    both = np.stack([shared, centroid], axis=1)
    s_h, s_c = (part["rows"] @ both).astype(np.float64).T
    o_h, o_c = (part["own"] @ both).astype(np.float64).T
    s_o, s_s, o_o = part["gate"].astype(np.float64), part["ss"], part["oo"]
    h_h, h_c, c_c = (float(np.dot(a, b)) for a, b in ((shared, shared), (shared, centroid), (centroid, centroid)))
    n = float(n_classes)
    s_i = s_h + (s_o - s_c) / n                                  # s . h
    o_i = o_h + (o_o - o_c) / n                                  # o . h
    i_i = h_h + 2 * (o_h - h_c) / n + (o_o - 2 * o_c + c_c) / n ** 2   # h . h
    u_v = s_o - s_i - o_i + i_i
    u_u = np.maximum(s_s - 2 * s_i + i_i, 0.0)
    v_v = np.maximum(o_o - 2 * o_i + i_i, 0.0)
    return (u_v / (np.maximum(np.sqrt(u_u), 1e-12) * np.maximum(np.sqrt(v_v), 1e-12))).astype(np.float32)


def _fallback_threshold(centroids: np.ndarray) -> float:
    """The "like the class" threshold while there are no leave-one-out scores (one view per
    class): a frame must look more like its class than the taught classes ("nothing" classes
    too) look like each other on average (their unit centroids' mean gate-view cosine), and at
    least FALLBACK_THRESHOLD. The level comes from the kit: with every picture on one table the
    classes' cosines are near 0.5, where a fixed threshold lets any new thing through."""
    n = len(centroids)
    if n < 2:
        return FALLBACK_THRESHOLD
    c = centroids.astype(np.float64)
    total = c.sum(axis=0)
    cross = (float(total @ total) - float(np.sum(c * c))) / (n * (n - 1))    # mean of c_i . c_j, i != j
    return max(FALLBACK_THRESHOLD, cross)


def gate_budget(agree: float) -> float:
    """The share of new known samples each gate test may reject when a share `agree` of the
    left-out taught samples is closest to its own class (`_loo_scores`): 1.55 % at 1 (classes
    never confused), 2 % at 0.9, 4 % at 0.67, 6 % from 0.57 down."""
    return float(min(BUDGET_AT_90 * (0.9 / max(agree, 1e-3)) ** BUDGET_POWER, MAX_BUDGET))


def _gate_threshold(scores: np.ndarray, agree: float, views: float) -> Optional[float]:
    """One gate test's threshold from its leave-one-out scores (`gate_budget` of the taught
    samples' leave-one-out agreement), or None until MIN_LOO scores exist; the scores stand for
    at least 2 views."""
    if len(scores) < MIN_LOO:
        return None
    return _budget_threshold(scores, gate_budget(agree), max(views, 2.0))


def _budget_threshold(values: np.ndarray, budget: float, n: Optional[float] = None) -> float:
    """The score below which a share `budget` of *new* samples like `values` would fall: the
    lower prediction bound of a normal fit, mean + t * std * sqrt(1 + 1/n), with t the Student-t
    quantile for n - 1 degrees of freedom. With 20 scores (2 classes of 10) mean and spread are
    themselves uncertain, and the plain normal quantile rejected 4.3 % of known photos for the
    3 % budget then in force (docs/head.md). n: how many independent samples the values stand
    for (distinct views; default their count). A plain quantile cannot reach below the lowest of
    20 values (5 %); the fitted spread can."""
    n = float(len(values) if n is None else n)
    nu = max(n - 1.0, 1.0)
    z = NormalDist().inv_cdf(budget)
    # Cornish-Fisher expansion of the t quantile (stdlib only): within 1 % of it for nu >= 5,
    # less extreme below (-2.86 for -3.48 at nu = 3)
    t = z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)
    return float(values.mean() + t * values.std(ddof=1) * np.sqrt(1.0 + 1.0 / max(n, 1.0)))


def plain_centroid_predict(train: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The baseline the head is measured against: L2-normalized nearest centroid, no gate."""
    names = list(train)
    cents = l2_normalize(np.stack([l2_normalize(train[n]).mean(axis=0) for n in names]))
    return (l2_normalize(x) @ cents.T).argmax(axis=1)
