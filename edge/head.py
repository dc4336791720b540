"""The on-device head: nearest centroid or k-NN over normalized embeddings. Pure numpy, no I/O.

It learns instantly (adding a sample is an append) and scores every class with one matrix product.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

HEADS = ("centroid", "knn")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Head:
    """Classes of samples, and cosine scores of new embeddings against them.

    `kind="centroid"` compares with each class's mean direction; `kind="knn"` scores a class by the
    mean of its k most similar samples, so a class with many samples does not win by count.
    `center`, when given, is subtracted before normalizing (a reference mean embedding).
    """

    def __init__(self, kind: str = "centroid", k: int = 3, center: Optional[np.ndarray] = None):
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {kind!r}")
        if k < 1:
            raise ValueError("k must be at least 1")
        self.kind = kind
        self.k = k
        self.center = None if center is None else np.asarray(center, dtype=np.float32)
        self._samples: Dict[str, np.ndarray] = {}
        self._matrix: Optional[np.ndarray] = None  # cached class or sample matrix

    # --- what the head knows -------------------------------------------------------------

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Embeddings as the head compares them: centred (if configured), unit length."""
        x = np.asarray(x, dtype=np.float32)
        if self.center is not None:
            x = x - self.center
        return l2_normalize(x)

    @property
    def labels(self) -> List[str]:
        """Class names with at least one sample, in the order they were first taught."""
        return [name for name, s in self._samples.items() if len(s)]

    def counts(self) -> Dict[str, int]:
        return {name: len(s) for name, s in self._samples.items()}

    def set_samples(self, samples: Dict[str, np.ndarray]) -> None:
        """Replace everything the head knows with raw embeddings per class."""
        self._samples = {}
        for name, vecs in samples.items():
            self.add(name, vecs)

    def add(self, label: str, vectors: np.ndarray) -> None:
        """Append raw embeddings (one or many rows) to a class."""
        vecs = self.transform(np.atleast_2d(vectors))
        old = self._samples.get(label)
        self._samples[label] = vecs if old is None or not len(old) else np.vstack([old, vecs])
        self._matrix = None

    def remove_last(self, label: str, n: int) -> None:
        """Forget the newest n samples of a class (undo a burst)."""
        if label in self._samples and n > 0:
            self._samples[label] = self._samples[label][:-n] if n < len(self._samples[label]) \
                else self._samples[label][:0]
            self._matrix = None

    def clear(self, label: Optional[str] = None) -> None:
        """Forget one class, or everything."""
        if label is None:
            self._samples = {}
        else:
            self._samples.pop(label, None)
        self._matrix = None

    def samples(self, label: str) -> np.ndarray:
        """A class's normalized samples (read-only view)."""
        return self._samples[label]

    # --- scoring -------------------------------------------------------------------------

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Cosine score of each row of x against each class in `labels` order: shape (N, C)."""
        labels = self.labels
        q = self.transform(np.atleast_2d(x))
        if not labels:
            return np.zeros((len(q), 0), dtype=np.float32)
        if self.kind == "centroid":
            if self._matrix is None:
                self._matrix = l2_normalize(np.stack([self._samples[n].mean(axis=0) for n in labels]))
            return q @ self._matrix.T
        if self._matrix is None:
            self._matrix = np.vstack([self._samples[n] for n in labels])
        sims = q @ self._matrix.T
        out = np.empty((len(q), len(labels)), dtype=np.float32)
        start = 0
        for c, name in enumerate(labels):
            n = len(self._samples[name])
            block = sims[:, start:start + n]
            k = min(self.k, n)
            top = np.partition(block, n - k, axis=1)[:, n - k:] if k < n else block
            out[:, c] = top.mean(axis=1)
            start += n
        return out

    def predict(self, x: np.ndarray) -> tuple:
        """(best class index per row, its score); index -1 when the head knows no class."""
        s = self.scores(x)
        if s.shape[1] == 0:
            return np.full(len(s), -1), np.zeros(len(s), dtype=np.float32)
        idx = s.argmax(axis=1)
        return idx, s[np.arange(len(s)), idx]

