"""The terminal simulator: keys press the buttons, the box is drawn on one status line.

Used when `edge run` finds no GPIO (a laptop): the box itself is unchanged and runs on gpiozero's
mock pins; this only drives those pins and shows what the box reports. It listens like the web
page does, as one of the box's Outputs (state, events, decisions, called on the loop thread),
reads the LEDs from the mock pins and the function button's countdown from the box's gestures;
it never touches the store or the head.

Keys: 1..9 press/release class buttons, f the function button, s holds the camera's picture
still (again: play on), n/p next/previous scene of the folder camera, or, while still (or in a
folder without scenes), the next/previous picture; q quit.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import select
import shutil
import signal
import sys
import textwrap
import threading
import time
from typing import List, Optional

log = logging.getLogger(__name__)

REDRAW = 0.05        # seconds between redraws: fast enough to show the 0.1 s recording blink


class Terminal:
    """Reads single keys from a TTY and redraws the status line; an Outputs of the box."""

    def __init__(self, box, panel, camera):
        self.box, self.panel, self.camera = box, panel, camera
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-terminal", daemon=True)
        self._saved = None
        self._held: set = set()
        self._classes: List[dict] = []      # the last state's classes, counts kept up by events
        self._recording: Optional[str] = None
        self._fault: Optional[str] = None
        self._label = "unknown"
        self._notes: collections.deque = collections.deque(maxlen=20)
        self._lock = threading.Lock()
        self._drawn, self._drawn_at = "", 0.0

    # --- Outputs (called on the box's loop thread) -------------------------------------------

    def decision(self, decision) -> None:
        self._label = decision.label

    def state(self, state: dict) -> None:
        with self._lock:
            self._classes = [dict(c) for c in state["classes"]]
            self._recording = state["recording"]
            self._fault = state["fault"]

    def event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "sample_added":
            with self._lock:
                for c in self._classes:
                    if c["name"] == event["class"]:
                        c["samples"] = event["samples"]
            return
        note = {
            "burst_undone": lambda e: f"undo: forgot the last {e['removed']} "
                                      f"picture{'' if e['removed'] == 1 else 's'} of {e['class']}",
            "class_cleared": lambda e: f"cleared {e['class']}: it has no pictures now",
            "all_cleared": lambda e: "cleared all classes: the box knows nothing now",
            "class_renamed": lambda e: f"renamed {e['from']} to {e['to']}",
        }.get(kind)
        if note is not None:
            self._notes.append(note(event))

    # --- what is drawn -----------------------------------------------------------------------

    def help(self) -> str:
        """The keys, wrapped to the terminal's width."""
        n = len(self.panel.buttons)
        hold = self.box.gestures.clear_all_hold
        keys = "no class buttons" if n == 0 else \
            f"{'1' if n == 1 else f'1..{n}'} press/release a class button (pressed: records)"
        text = (f"simulated box. Keys: {keys}, "
                f"f press/release the function button (tap: undo; with a class key: clear that "
                f"class; held {hold:g}s alone: clear all), s hold the picture still / play on, "
                f"n/p next/previous scene, or picture while still, q quit.")
        return "\n".join(textwrap.wrap(text, max(40, self._width() - 1)))

    def notes(self) -> List[str]:
        """Lines that happened since the last call (undo, clear, clear all, rename)."""
        out = []
        while self._notes:
            out.append(self._notes.popleft())
        return out

    def line(self, width: Optional[int] = None) -> str:
        """The status line: each class (key, name, samples, REC, LED), what the box sees, the
        function button with the clear-all countdown, the camera, the status LED. Fitted to
        `width` columns: a steady status LED is left out first, then long names are shortened,
        then the camera, then what the box sees (never the countdown); what is still too long is cut."""
        width = width or self._width()
        keys = {name: i + 1 for i, name in enumerate(self.panel.buttons)}
        with self._lock:
            classes = [dict(c) for c in self._classes]
            recording, fault = self._recording, self._fault
        function = []
        gestures, now = self.box.gestures, time.monotonic()
        if gestures.held_for(now) is not None:
            left = gestures.clear_all_in(now)
            function = [f"f: clear all in {math.ceil(left)}s" if left else "f held"]
        sees = [f"sees {self._label}"] + function
        camera = [f"cam {self._camera()}"]
        status = []
        if self.panel.status is not None:
            status = [f"status {'#' if self.panel.status.value else '.'}{' ' + fault if fault else ''}"]
        kept = status if fault else []      # a fault stays on the line; steady "ok" may go
        for limit, tail in ((32, sees + camera + status), (32, sees + camera + kept),
                            (12, sees + camera + kept), (8, sees + camera + kept),
                            (8, sees + kept), (5, sees + kept), (3, sees + kept), (3, function + kept)):
            cells = " ".join(self._cell(c, keys, recording, limit) for c in classes) or "starting"
            text = " | ".join([cells, *tail])
            if len(text) < width:
                return text
        return text[:width - 2] + ">"

    def _cell(self, c: dict, keys: dict, recording: Optional[str], limit: int) -> str:
        bound = c.get("button")
        key = keys.get(bound, "-") if bound else "-"
        name = c["name"] if len(c["name"]) <= limit else c["name"][:limit - 1].rstrip() + "~"
        led = self.panel.leds.get(bound) if bound else None
        lamp = "" if led is None else (" #" if led.value else " .")
        rec = " REC" if c["name"] == recording else ""
        return f"[{key} {name} {c['samples']}{rec}{lamp}]"

    def _camera(self) -> str:
        cam = self.camera
        if not hasattr(cam, "current_folder"):
            return cam.name
        scene = cam.current_folder().name[:14]
        if cam.still and cam.shown is not None:
            return f"{scene} {cam.shown_at[0]}/{cam.shown_at[1]} still"
        return scene

    @staticmethod
    def _width() -> int:
        return shutil.get_terminal_size((80, 24)).columns

    # --- keys --------------------------------------------------------------------------------

    def key(self, key: str) -> None:
        """One key as typed: drives a mock pin or the folder camera."""
        buttons = list(self.panel.buttons.values())
        if key.isdigit() and 1 <= int(key) <= len(buttons):
            self._toggle(buttons[int(key) - 1])
        elif key == "f" and self.panel.function is not None:
            self._toggle(self.panel.function)
        elif key == "s" and hasattr(self.camera, "set_still"):
            self.camera.set_still(not self.camera.still)
        elif key in ("n", "p") and hasattr(self.camera, "next_scene"):
            step = 1 if key == "n" else -1
            if self.camera.still or not self.camera.scenes():
                self.camera.step_picture(step)
            else:
                self.camera.next_scene(step)
        elif key == "q":
            self.box.stop()

    def _toggle(self, button) -> None:
        pin = button.pin
        if button in self._held:
            pin.drive_high()
            self._held.discard(button)
        else:
            pin.drive_low()
            self._held.add(button)

    # --- the terminal ------------------------------------------------------------------------

    def start(self) -> None:
        if not sys.stdin.isatty():
            log.info("stdin is not a terminal: simulator keys are off")
            return
        import termios
        import tty
        fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        if threading.current_thread() is threading.main_thread():
            # Ctrl-Z gives the shell its terminal back; after `fg` the shell has put it back in
            # line mode, where keys waited for Enter (a held class recorded on): take it again
            signal.signal(signal.SIGTSTP, self._suspend)
            signal.signal(signal.SIGCONT, self._resume)
        for handler in logging.getLogger().handlers:  # log lines overwrite the status line, not append to it
            if getattr(handler, "stream", None) is sys.stderr and handler.formatter is not None:
                handler.setFormatter(logging.Formatter("\r\x1b[K" + handler.formatter._fmt))
        print(self.help(), file=sys.stderr)
        self._thread.start()

    def _suspend(self, _signum, _frame) -> None:
        import termios
        if self._saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
        os.kill(os.getpid(), signal.SIGSTOP)        # SIGSTOP cannot be caught: this stops here

    def _resume(self, _signum, _frame) -> None:
        import tty
        if self._saved is not None:
            tty.setcbreak(sys.stdin.fileno())

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._saved is not None and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTSTP, signal.SIGCONT):
                signal.signal(signum, signal.SIG_DFL)
        if self._saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None
            print(file=sys.stderr)

    def _draw(self) -> None:
        """Write new notes and the status line when it changed, and now and then anyway (a log
        line from another thread has cleared it)."""
        notes, line, now = self.notes(), self.line(), time.monotonic()
        if not notes and line == self._drawn and now - self._drawn_at < 0.25:
            return
        self._drawn, self._drawn_at = line, now
        sys.stderr.write("".join(f"\r\x1b[K{note}\n" for note in notes) + f"\r\x1b[K{line}")
        sys.stderr.flush()

    def _run(self) -> None:
        fd = sys.stdin.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], REDRAW)
            if ready:
                key = os.read(fd, 1).decode(errors="ignore")
                if key:
                    self.key(key)
            self._draw()
