"""Smoothing with hysteresis, so the LEDs do not flicker between two classes or in and out of unknown.

Scores are averaged with an exponential filter over about `window` frames. A class is entered
when its smoothed score is the best and reaches the threshold; it is kept until its score falls
`margin` below the threshold or another class beats it by more than `margin` (a Schmitt trigger).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

UNKNOWN = -1


class Smoother:
    """Turns per-frame class scores into a steady decision (class index, or UNKNOWN)."""

    def __init__(self, window: int = 5, margin: float = 0.05):
        self.alpha = 2.0 / (max(1, window) + 1.0)
        self.margin = margin
        self.current = UNKNOWN
        self._ema: Optional[np.ndarray] = None

    def reset(self) -> None:
        """Forget history (the classes changed)."""
        self.current = UNKNOWN
        self._ema = None

    @property
    def smoothed(self) -> Optional[np.ndarray]:
        return self._ema

    def update(self, scores: np.ndarray, threshold: float) -> int:
        """Feed one frame's scores; returns the decision after it."""
        scores = np.asarray(scores, dtype=np.float32)
        if self._ema is None or self._ema.shape != scores.shape:
            self._ema = scores.copy()
            self.current = UNKNOWN
        else:
            self._ema += self.alpha * (scores - self._ema)
        ema = self._ema
        if ema.size == 0:
            self.current = UNKNOWN
            return self.current
        best = int(ema.argmax())
        cur = self.current
        if cur != UNKNOWN and cur < ema.size:
            holds = ema[cur] >= threshold - self.margin and ema[best] - ema[cur] <= self.margin
            if holds:
                return cur
        self.current = best if ema[best] >= threshold else UNKNOWN
        return self.current
