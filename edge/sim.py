"""The terminal simulator: keys hold the buttons, the LEDs are drawn on one status line.

Used when `edge run` finds no GPIO (a laptop): the box itself is unchanged and runs on gpiozero's
mock pins; this only drives those pins and draws them.
Keys: 1..9 press/release class buttons, f function button, n/p next/previous scene (what the
folder camera shows), q quit.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading

log = logging.getLogger(__name__)


class Terminal:
    """Reads single keys from a TTY and redraws the LEDs a few times a second."""

    def __init__(self, box, panel, camera):
        self.box, self.panel, self.camera = box, panel, camera
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-terminal", daemon=True)
        self._saved = None
        self._held: set = set()

    def start(self) -> None:
        if not sys.stdin.isatty():
            log.info("stdin is not a terminal: simulator keys are off")
            return
        import termios
        import tty
        fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        for handler in logging.getLogger().handlers:  # log lines overwrite the LED line, not append to it
            if getattr(handler, "stream", None) is sys.stderr and handler.formatter is not None:
                handler.setFormatter(logging.Formatter("\r\x1b[K" + handler.formatter._fmt))
        print(self.help(), file=sys.stderr)
        self._thread.start()

    def help(self) -> str:
        keys = ", ".join(f"{i + 1}={name}" for i, name in enumerate(self.panel.buttons))
        return (f"simulated box: keys {keys} press/release a class button (hold = record), "
                "f function (tap: undo, +class: clear class, hold 5s: clear all), "
                "n/p change what the camera shows, q quit")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
            self._saved = None
            print(file=sys.stderr)

    def _toggle(self, button) -> None:
        pin = button.pin
        if button in self._held:
            pin.drive_high()
            self._held.discard(button)
        else:
            pin.drive_low()
            self._held.add(button)

    def _key(self, key: str) -> None:
        buttons = list(self.panel.buttons.values())
        if key.isdigit() and 1 <= int(key) <= len(buttons):
            self._toggle(buttons[int(key) - 1])
        elif key == "f" and self.panel.function is not None:
            self._toggle(self.panel.function)
        elif key in ("n", "p") and hasattr(self.camera, "next_scene"):
            self.camera.next_scene(1 if key == "n" else -1)
        elif key == "q":
            self.box.stop()

    def _draw(self) -> None:
        leds = " ".join(f"[{name} {'#' if led.value else '.'}]" for name, led in self.panel.leds.items())
        status = self.panel.status.value if self.panel.status is not None else None
        held = ",".join(n for n, b in self.panel.buttons.items() if b in self._held)
        scene = self.camera.current_folder().name if hasattr(self.camera, "current_folder") else self.camera.name
        line = (f"\r{leds}  status {'#' if status else '.'}  label {self.box.label:<12} "
                f"held {held or '-':<6} camera: {scene:<14}")
        sys.stderr.write(line)
        sys.stderr.flush()

    def _run(self) -> None:
        fd = sys.stdin.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                key = os.read(fd, 1).decode(errors="ignore")
                if key:
                    self._key(key)
            self._draw()
