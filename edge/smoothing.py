"""Smoothing with hysteresis, so LEDs do not flicker between two classes or in and out of unknown.

Both score views (see edge/head.py) are averaged with an exponential filter over about `window`
frames. A class is entered when it is the best choice and its gate similarity reaches the
threshold; it is kept until its gate similarity falls `margin` below the threshold or another
class beats it by more than `margin` (a Schmitt trigger).
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
        self._choice: Optional[np.ndarray] = None
        self._gate: Optional[np.ndarray] = None

    def reset(self) -> None:
        """Forget history (the classes changed)."""
        self.current = UNKNOWN
        self._choice = self._gate = None

    def confidence(self) -> float:
        """Smoothed gate similarity of the current decision (0 when unknown)."""
        if self.current == UNKNOWN or self._gate is None:
            return 0.0
        return float(self._gate[self.current])

    def update(self, choice: np.ndarray, gate: np.ndarray, threshold: float) -> int:
        """Feed one frame's scores (choice view, gate view); returns the decision after it."""
        choice = np.asarray(choice, dtype=np.float32)
        gate = np.asarray(gate, dtype=np.float32)
        if self._choice is None or self._choice.shape != choice.shape:
            self._choice, self._gate = choice.copy(), gate.copy()
            self.current = UNKNOWN
        else:
            self._choice += self.alpha * (choice - self._choice)
            self._gate += self.alpha * (gate - self._gate)
        if choice.size == 0:
            self.current = UNKNOWN
            return self.current
        best = int(self._choice.argmax())
        cur = self.current
        if cur != UNKNOWN:
            holds = (self._gate[cur] >= threshold - self.margin
                     and self._choice[best] - self._choice[cur] <= self.margin)
            if holds:
                return cur
        self.current = best if self._gate[best] >= threshold else UNKNOWN
        return self.current
