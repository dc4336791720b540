"""What the buttons mean: press events with timestamps in, actions out. Pure, so it is tested with
plain numbers and the loop only carries the actions out.

- hold a class button: record that class while it is held;
- tap the function button (shorter than SHORT_PRESS): undo the last burst;
- hold the function button and press a class button: clear that class;
- hold the function button alone for CLEAR_ALL_HOLD seconds: clear everything;
- a button already held when the box starts is ignored until it is released (a child leaning on
  it through a power cut must not start a recording).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Set

FUNCTION = "function"
SHORT_PRESS = 1.0        # seconds: a shorter function press is a tap (undo)
CLEAR_ALL_HOLD = 5.0     # seconds: holding the function button this long clears everything


@dataclass(frozen=True)
class Action:
    """What a gesture asks for: kind is record, stop, undo, clear or clear_all; button names the
    class button (the loop maps it to the class it is bound to)."""

    kind: str
    button: Optional[str] = None


class Gestures:
    """The state of the buttons between events (one owner: the loop thread)."""

    def __init__(self, held_at_start: Iterable[str] = (), clear_all_hold: float = CLEAR_ALL_HOLD):
        self.ignored: Set[str] = set(held_at_start)
        self.clear_all_hold = clear_all_hold
        self.function_down: Optional[float] = None   # when the function button went down
        self._function_used = False                  # it took part in a clear: its release is no tap

    def press(self, button: str, pressed: bool, at: float) -> List[Action]:
        """One button going down (pressed) or up at time `at` (seconds, monotonic)."""
        if button in self.ignored:
            if not pressed:
                self.ignored.discard(button)
            return []
        if button == FUNCTION:
            if pressed:
                self.function_down, self._function_used = at, False
                return []
            held = at - (self.function_down if self.function_down is not None else at)
            tap = not self._function_used and self.function_down is not None and held < SHORT_PRESS
            self.function_down = None
            return [Action("undo")] if tap else []
        if pressed:
            if self.function_down is not None:
                self._function_used = True
                return [Action("clear", button)]
            return [Action("record", button)]
        return [Action("stop", button)]      # the loop stops only a recording this button started

    def tick(self, now: float) -> List[Action]:
        """Called every loop turn: a long enough function hold clears everything, once."""
        if (self.function_down is not None and not self._function_used
                and now - self.function_down >= self.clear_all_hold):
            self._function_used = True
            return [Action("clear_all")]
        return []

    def held_for(self, now: float) -> Optional[float]:
        """Seconds the function button has been held (the simulator shows it), or None."""
        return None if self.function_down is None else now - self.function_down

    def clear_all_in(self, now: float) -> Optional[float]:
        """Seconds until the function button held alone clears everything (the simulator's
        countdown); None when it is not held, or a clear already used this hold."""
        if self.function_down is None or self._function_used:
            return None
        return max(0.0, self.function_down + self.clear_all_hold - now)
