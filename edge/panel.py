"""Buttons and LEDs: gpiozero devices, used directly.

Button callbacks run on gpiozero's threads, so they only put commands on the app's queue; the
app's loop, the one owner of state, acts on them. Off a Pi the same devices run on gpiozero's
MockFactory pins, which tests and the terminal simulator drive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

log = logging.getLogger(__name__)

# Status LED blink codes (on seconds, off seconds, blinks per group); documented in docs/box.md.
STATUS_CODES = {
    "ok": None,                     # steady on
    "starting": (0.1, 0.1, None),   # fast flicker
    "camera": (0.2, 0.2, 2),        # 2 blinks, pause
    "model": (0.2, 0.2, 3),         # 3 blinks, pause
    "storage": (0.2, 0.2, 4),       # 4 blinks, pause
    "mqtt": (1.0, 1.0, None),       # slow blink: network only, the box still works
}

BOUNCE_SECONDS = 0.03


def gpio_available() -> bool:
    """True when gpiozero can drive real pins here (a Pi with lgpio, RPi.GPIO or pigpio)."""
    import warnings

    from gpiozero import Device
    from gpiozero.exc import BadPinFactory
    from gpiozero.pins.mock import MockFactory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # gpiozero warns for each driver it falls back from
            Device.ensure_pin_factory()
    except (BadPinFactory, ImportError, OSError, RuntimeError):
        return False
    return not isinstance(Device.pin_factory, MockFactory)


def mock_pins():
    """A new factory of mock pins (PWM-capable) for simulation and tests, given to the Panel as
    its pin_factory (gpiozero's own way to choose pins per device; nothing global changes)."""
    from gpiozero.pins.mock import MockFactory, MockPWMPin
    return MockFactory(pin_class=MockPWMPin)


@dataclass
class Press:
    """A button event for the app's queue: which button, pressed or released, and when."""

    button: str          # class name, or "function"
    pressed: bool
    at: float


class Panel:
    """One button and one LED per class, an optional function button and status LED.

    `send` receives Press events from gpiozero's callback threads.
    """

    def __init__(self, classes, function_pin: Optional[str], status_pin: Optional[str],
                 send: Callable[[Press], None], pwm: bool = False, pin_factory=None):
        from gpiozero import LED, PWMLED, Button
        self.pin_factory = pin_factory       # None: gpiozero's default (the real pins on a Pi)
        self._send = send
        self._devices: List = []
        self.buttons = {}
        self.leds = {}
        self.pwm = pwm
        try:
            for c in classes:
                if c.button:
                    self.buttons[c.name] = self._button(Button, c.button, c.name)
                if c.led:
                    self.leds[c.name] = self._keep((PWMLED if pwm else LED)(c.led, pin_factory=pin_factory))
            self.function = self._button(Button, function_pin, "function") if function_pin else None
            self.status = self._keep(LED(status_pin, pin_factory=pin_factory)) if status_pin else None
        except Exception:
            self.close()
            raise
        self._status_code: Optional[str] = None
        self._blinking: set = set()
        self._flash_until: dict = {}

    def _keep(self, device):
        self._devices.append(device)
        return device

    def _button(self, cls, pin, name):
        button = self._keep(cls(pin, pull_up=True, bounce_time=BOUNCE_SECONDS, pin_factory=self.pin_factory))
        button.when_pressed = lambda: self._send(Press(name, True, time.monotonic()))
        button.when_released = lambda: self._send(Press(name, False, time.monotonic()))
        return button

    def held(self) -> List[str]:
        """Names of buttons pressed right now (used at start: a button held through a restart)."""
        names = [n for n, b in self.buttons.items() if b.is_pressed]
        if self.function is not None and self.function.is_pressed:
            names.append("function")
        return names

    # --- class LEDs ------------------------------------------------------------------------

    def show(self, label: Optional[str], confidence: float = 1.0, recording: Optional[str] = None):
        """Light the predicted class's LED (none for unknown); blink the one being recorded."""
        now = time.monotonic()
        for name, led in self.leds.items():
            if self._flash_until.get(name, 0.0) > now:
                continue
            if name == recording:
                if name not in self._blinking:
                    led.blink(on_time=0.1, off_time=0.1)
                    self._blinking.add(name)
                continue
            if name in self._blinking:
                led.off()
                self._blinking.discard(name)
            want = 0.0 if name != label else (max(0.1, min(1.0, confidence)) if self.pwm else 1.0)
            if led.value != want:
                led.value = want

    def flash(self, names, times: int = 3) -> None:
        """Acknowledge an action (undo, clear) with a few quick blinks of the given LEDs."""
        for name in names:
            led = self.leds.get(name)
            if led is not None:
                led.blink(on_time=0.08, off_time=0.08, n=times)
                self._flash_until[name] = time.monotonic() + times * 0.16
                self._blinking.discard(name)

    # --- status LED ------------------------------------------------------------------------

    def set_status(self, code: str) -> None:
        """Steady for ok, a blink code for a fault (see STATUS_CODES)."""
        if self.status is None or code == self._status_code:
            return
        self._status_code = code
        pattern = STATUS_CODES[code]
        self.status.source = None
        if pattern is None:
            self.status.on()
        elif pattern[2] is None:
            self.status.blink(on_time=pattern[0], off_time=pattern[1])
        else:
            self._blink_code(*pattern)

    def _blink_code(self, on: float, off: float, count: int) -> None:
        """n blinks then a pause, repeated: gpiozero's blink takes one rhythm, so run it per group."""
        pattern = [(1, on), (0, off)] * count + [(0, 1.0)]
        self.status.source_delay = 0.01
        self.status.source = _pattern_source(pattern)

    def close(self) -> None:
        for device in reversed(self._devices):
            try:
                device.close()
            except Exception as exc:  # closing must never stop shutdown
                log.debug("closing %s: %s", device, exc)
        self._devices.clear()


def _pattern_source(pattern):
    """An endless gpiozero source yielding LED values following (value, seconds) steps."""
    while True:
        for value, seconds in pattern:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                yield value
