"""The on-device head: learns instantly from a few samples and says "unknown" when nothing matches.

Two views of the same embeddings, each doing what it measures best here (see docs/head.md):
- a *gate* view: signed square root, minus a reference mean embedding (shipped beside the model),
  unit length. Cosine similarity to a class centroid in this view says whether a frame looks like
  that class at all; the "auto" threshold comes from leave-one-out similarities of the stored
  samples, so it adapts to how tight the taught classes are.
- a *choice* view: the gate view whitened by the classes' own pooled within-class spread (shrunk
  towards the identity). It down-weights directions in which the taught samples vary anyway
  (lighting, pose), which picks the right class more often than plain cosine (measured: 10-shot
  clothing-small 0.721 vs 0.689).
Pure numpy, no I/O; kinds: "centroid" (class means) and "knn" (mean of a class's k best matches,
so a class does not win by sample count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

HEADS = ("centroid", "knn")

# Within-class shrinkage: lambda = SHRINK * mean within-class variance. Chosen on clothing-small
# (10-shot accuracy is flat from 10 to 30); see docs/head.md.
SHRINK = 10.0
# "auto" threshold = AUTO_FACTOR * the AUTO_QUANTILE quantile of leave-one-out similarities.
AUTO_QUANTILE = 0.05
AUTO_FACTOR = 0.9
# Used until at least MIN_LOO leave-one-out similarities exist (classes of one sample each).
FALLBACK_THRESHOLD = 0.3
MIN_LOO = 4
# Rows used to estimate the within-class spread (keeps re-fitting fast with thousands of samples).
MAX_FIT_ROWS = 256


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    """sign(x) * sqrt(|x|): tames the few very large activations that dominate cosine."""
    x = np.asarray(x, dtype=np.float32)
    return np.sign(x) * np.sqrt(np.abs(x))


def gate_features(x: np.ndarray, mean: Optional[np.ndarray]) -> np.ndarray:
    """Signed sqrt, minus the reference mean (if any), unit length."""
    z = signed_sqrt(x)
    if mean is not None:
        z = z - mean
    return l2_normalize(z)


@dataclass
class Result:
    """The head's view of one frame."""

    index: int                 # best class (in `labels` order), -1 when the head knows no class
    known: bool                # gate passed: the frame looks like that class
    similarity: float          # gate cosine to the chosen class centroid
    scores: np.ndarray         # gate cosine to every class centroid


class Head:
    """Classes of samples; scores new embeddings against them. Rebuilt lazily after changes."""

    def __init__(self, kind: str = "centroid", k: int = 3, mean: Optional[np.ndarray] = None,
                 threshold="auto"):
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {kind!r}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.kind = kind
        self.k = k
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)
        self.threshold_setting = threshold
        self._samples: Dict[str, np.ndarray] = {}
        self._fit: Optional[dict] = None

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
        self._fit = None

    def add(self, label: str, vectors: np.ndarray) -> None:
        """Append raw embeddings (one or many rows) to a class."""
        vecs = gate_features(np.atleast_2d(vectors), self.mean)
        old = self._samples.get(label)
        self._samples[label] = vecs if old is None else np.vstack([old, vecs])
        self._fit = None

    def set_class(self, label: str, vectors: np.ndarray) -> None:
        """Replace one class's samples (raw embeddings); an empty array removes the class."""
        if len(vectors):
            self._samples[label] = gate_features(np.atleast_2d(vectors), self.mean)
        else:
            self._samples.pop(label, None)
        self._fit = None

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
            return {"labels": [], "threshold": self._threshold([])}
        z = np.vstack(groups)
        sizes = np.array([len(g) for g in groups])
        owner = np.repeat(np.arange(len(groups)), sizes)
        avg = (owner == np.arange(len(groups))[:, None]).astype(np.float32) / sizes[:, None]
        means = avg @ z            # class means as one product (C x N averaging matrix)
        white, choice = self._choice_fit(groups, z, owner, avg, means)
        return {"labels": labels, "centroids": l2_normalize(means), "white": white, "choice": choice,
                "threshold": self._threshold(groups)}

    def _choice_fit(self, groups, z, owner, avg, means) -> tuple:
        """(whitening function, class prototypes in the choice view) for the gate-view samples z
        of `groups` (owner: class index per row, avg: C x N averaging matrix)."""
        rows = np.arange(len(z))
        if len(z) > MAX_FIT_ROWS:
            rows = np.linspace(0, len(z) - 1, MAX_FIT_ROWS).astype(int)
        basis, scale, inv_sqrt_lam = _whitener(z[rows] - means[owner[rows]])
        white = lambda q: l2_normalize(q * inv_sqrt_lam + ((q @ basis.T) * scale) @ basis)
        if self.kind == "centroid":
            return white, _white_means(z, avg, basis, scale, inv_sqrt_lam)
        return white, [white(g) for g in groups]

    def _threshold(self, groups) -> float:
        if self.threshold_setting != "auto":
            return float(self.threshold_setting)
        return auto_threshold(groups)

    @property
    def threshold(self) -> float:
        """The gate threshold in force (calibrated when the setting is "auto")."""
        return self._ensure_fit()["threshold"]

    # --- scoring -------------------------------------------------------------------------

    def choice_scores(self, g: np.ndarray) -> np.ndarray:
        """Per-class scores in the whitened view for gate-view rows g: shape (N, C)."""
        fit = self._ensure_fit()
        w = fit["white"](g)
        if self.kind == "centroid":
            return w @ fit["choice"].T
        out = np.empty((len(w), len(fit["labels"])), dtype=np.float32)
        for c, samples in enumerate(fit["choice"]):
            sims = w @ samples.T
            k = min(self.k, sims.shape[1])
            out[:, c] = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
        return out

    def evaluate(self, x: np.ndarray) -> tuple:
        """(choice scores (N, C), gate scores (N, C)) for raw embeddings x."""
        fit = self._ensure_fit()
        g = gate_features(np.atleast_2d(x), self.mean)
        if not fit["labels"]:
            empty = np.zeros((len(g), 0), dtype=np.float32)
            return empty, empty
        return self.choice_scores(g), g @ fit["centroids"].T

    def predict(self, x: np.ndarray) -> tuple:
        """(class index per row or -1 for unknown, gate similarity per row)."""
        choice, gate = self.evaluate(x)
        if choice.shape[1] == 0:
            return np.full(len(choice), -1), np.zeros(len(choice), dtype=np.float32)
        idx = choice.argmax(axis=1)
        sim = gate[np.arange(len(idx)), idx]
        return np.where(sim >= self.threshold, idx, -1), sim

    def predict_closed(self, x: np.ndarray) -> np.ndarray:
        """Best class per row, ignoring the unknown gate (closed-set accuracy)."""
        choice, _ = self.evaluate(x)
        return choice.argmax(axis=1) if choice.shape[1] else np.full(len(choice), -1)


def _whitener(residuals: np.ndarray) -> tuple:
    """Shrunk within-class whitening as (basis, per-direction scale, 1/sqrt(lambda)).

    The directions and variances are those of an SVD of the residuals (n x dim, n <= 256), found
    from the n x n Gram matrix instead: R R^T = U S^2 U^T gives the same S and V^T = S^-1 U^T R,
    at a fraction of the cost (docs/head.md). Directions with ~zero variance are dropped; their
    scale would be ~0 anyway (only the shrinkage acts there).
    """
    dim = residuals.shape[1]
    if len(residuals) < 2 or not np.any(residuals):
        return np.zeros((0, dim), np.float32), np.zeros(0, np.float32), np.float32(1.0)
    r = residuals.astype(np.float64)
    eig, u = np.linalg.eigh(r @ r.T)
    lam = max(SHRINK * float(np.clip(eig, 0, None).sum()) / len(r) / dim, 1e-12)
    keep = eig > max(float(eig[-1]), 0.0) * 1e-9
    eig, u = eig[keep], u[:, keep]
    basis = (u.T @ r) / np.sqrt(eig)[:, None]
    var = eig / len(r)
    scale = 1.0 / np.sqrt(var + lam) - 1.0 / np.sqrt(lam)
    return basis.astype(np.float32), scale.astype(np.float32), np.float32(1.0 / np.sqrt(lam))


def _white_means(z, avg, basis, scale, a) -> np.ndarray:
    """Unit-length class means (avg: C x N averaging matrix) of the whitened unit rows of z.

    Equal to averaging `white(z)` per class, with one projection instead of two: the rows of
    `basis` are orthonormal, so |a z + (P s) B|^2 = a^2 |z|^2 + sum_j (2 a s_j + s_j^2) P_j^2
    with P = z B^T, and the class sums need only P and z.
    """
    p = z @ basis.T
    sq = (a * a) * np.einsum("ij,ij->i", z, z) + (p * p) @ (2 * a * scale + scale * scale)
    inv = 1.0 / np.sqrt(np.maximum(sq, 1e-24))
    w = avg * inv
    return l2_normalize(a * (w @ z) + ((w @ p) * scale) @ basis)


def auto_threshold(groups) -> float:
    """Gate threshold from leave-one-out similarities of samples to their own class centroid."""
    loo = []
    for g in groups:
        if len(g) >= 2:
            rest = l2_normalize(g.sum(axis=0, keepdims=True) - g)
            loo.append(np.sum(rest * g, axis=1))
    values = np.concatenate(loo) if loo else np.zeros(0)
    if len(values) < MIN_LOO:
        return FALLBACK_THRESHOLD
    return float(AUTO_FACTOR * np.quantile(values, AUTO_QUANTILE))


def plain_centroid_predict(train: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The baseline the head is measured against: L2-normalized nearest centroid, no gate."""
    names = list(train)
    cents = l2_normalize(np.stack([l2_normalize(train[n]).mean(axis=0) for n in names]))
    return (l2_normalize(x) @ cents.T).argmax(axis=1)
