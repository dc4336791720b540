"""The box: the one loop that owns all state (samples, classes, mode), and the composition root.

Frames flow one way: camera -> engine -> head -> smoothing -> LEDs and outputs. Commands flow the
other way into one queue: buttons (gpiozero threads), MQTT (its network thread), the terminal
simulator. Only the loop thread touches the store, the head and the LEDs' meaning, so the domain
code needs no locks and a button can never race an MQTT message.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from edge import __version__
from edge.camera import Camera, CameraError
from edge.engine import Embedder, ModelError, load_reference
from edge.head import Head, gate_features
from edge.image import ImageError
from edge.panel import Panel, Press
from edge.smoothing import UNKNOWN, Smoother
from edge.store import Store, StoreError
from edge.systemd import Notifier

log = logging.getLogger(__name__)

UNKNOWN_LABEL = "unknown"
SHORT_PRESS = 1.0        # function button released before this: undo the last burst
CLEAR_ALL_HOLD = 5.0     # function button held this long alone: clear everything
CAMERA_BACKOFF = (0.5, 10.0)


@dataclass
class Command:
    """A request from outside the loop (MQTT, CLI, tests). `reply` receives the result dict."""

    action: str
    args: dict = field(default_factory=dict)
    id: Optional[str] = None
    reply: Optional[Callable[[dict], None]] = None


@dataclass
class Decision:
    """What the box concluded about one frame."""

    label: str
    index: int
    confidence: float
    scores: Dict[str, float]
    ts: float
    frame: int
    changed: bool


@dataclass
class Recording:
    """A burst of samples being recorded for one class."""

    name: str
    source: str                      # "button" or "command"
    until: Optional[float] = None    # monotonic deadline (timed command)
    count: Optional[int] = None      # samples still wanted (counted command)
    added: int = 0
    next_at: float = 0.0
    last: Optional[np.ndarray] = None


class Outputs:
    """Where the box reports; MQTT implements it. Calls come from the loop thread only."""

    def decision(self, decision: Decision) -> None: ...

    def state(self, state: dict) -> None: ...

    def event(self, event: dict) -> None: ...


class CommandError(ValueError):
    """A command that cannot be carried out; its message goes back to the sender."""


class Box:
    """Owns the knowledge and the mode; runs the frame loop. Everything else talks via `submit`."""

    def __init__(self, cfg, engine: Embedder, store: Store, camera: Optional[Camera], panel: Optional[Panel],
                 notifier: Optional[Notifier] = None, outputs: Optional[List[Outputs]] = None,
                 max_classes: int = 8):
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.camera = camera
        self.panel = panel
        self.notifier = notifier or Notifier(address="")
        self.outputs: List[Outputs] = list(outputs or [])
        self.max_classes = max_classes
        self.queue: "queue.Queue" = queue.Queue()
        self.stop_event = threading.Event()

        self.button_classes = [c.name for c in cfg.classes]
        knowledge = store.knowledge
        self.head = Head(cfg.head.kind, k=cfg.head.k, mean=load_reference(engine.path, engine.dim),
                         threshold=knowledge.settings.get("threshold", cfg.head.threshold))
        self.head.set_samples(dict(knowledge.classes))
        self.smoother = Smoother(cfg.head.smoothing, cfg.head.hysteresis)
        self.recording: Optional[Recording] = None
        self.bursts: List[tuple] = []     # (class, samples added) for undo, newest last
        self.ignored: set = set()          # buttons held since start: ignored until released
        self.function_down: Optional[float] = None
        self.function_used = False
        self.frames = 0
        self.label = UNKNOWN_LABEL
        self.fault: Optional[str] = None
        self._camera_open = False
        self._camera_retry_at = 0.0
        self._camera_failures = 0
        self._period = 1.0 / cfg.capture.rate

    # --- public, thread-safe -----------------------------------------------------------------

    def submit(self, item) -> None:
        """Queue a Press or a Command for the loop (safe from any thread)."""
        self.queue.put(item)

    def stop(self) -> None:
        self.stop_event.set()
        self.queue.put(None)  # wake the loop if it waits on the queue

    # --- what the box knows ------------------------------------------------------------------

    @property
    def classes(self) -> List[str]:
        """Button classes in button order, then classes known only from samples or commands."""
        names = [self._button_class(b) for b in self.button_classes]
        extra = self.store.knowledge.settings.get("extra_classes", [])
        for name in list(self.store.knowledge.classes) + list(extra):
            if name not in names:
                names.append(name)
        return names

    def state(self) -> dict:
        counts = self.store.knowledge.counts()
        return {
            "mode": "recording" if self.recording else "classifying",
            "recording": self.recording.name if self.recording else None,
            "classes": [{"name": n, "samples": counts.get(n, 0)} for n in self.classes],
            "head": self.cfg.head.kind,
            "threshold": self.head.threshold_setting,
            "threshold_value": round(float(self.head.threshold), 4),
            "model": self.engine.path.name,
            "model_sha256": self.engine.model_id,
            "version": __version__,
            "fault": self.fault,
        }

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(): commands, frames, LEDs, watchdog."""
        if self.panel is not None:
            self.ignored = set(self.panel.held())
            if self.ignored:
                log.info("ignoring buttons held at start until released: %s", ", ".join(sorted(self.ignored)))
        self._set_fault(None)
        self._announce_state()
        self.notifier.ready(f"classes: {', '.join(self.classes)}")
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception as exc:  # a bug must not take the classroom box down; log it loudly
                log.exception("unexpected error in the frame loop")
                self._emit({"event": "error", "source": "internal", "message": f"{type(exc).__name__}: {exc}"})
                self.stop_event.wait(0.5)
        self._end_recording()

    def step(self) -> None:
        """One turn: handle queued commands, then one frame (or a camera retry)."""
        self._drain()
        self._check_function_hold()
        self.notifier.watchdog()
        frame = self._next_frame()
        if frame is None:
            if self.recording is not None and self.recording.until is not None \
                    and time.monotonic() >= self.recording.until:
                self._end_recording()  # a timed recording ends even when no frame comes
            self._check_links()
            return
        try:
            vec = self.engine.embed(frame)
        except ImageError as exc:
            self._camera_fault(f"camera sent an unusable frame: {exc}")
            return
        self.frames += 1
        self.process(vec)
        self._check_links()

    def process(self, vec: np.ndarray) -> Optional[Decision]:
        """Use one frame's embedding: a training sample while recording, else a decision."""
        if self.recording is not None:
            self._record(vec)
            self._show()
            return None
        return self._classify(vec)

    # --- camera ------------------------------------------------------------------------------

    def _next_frame(self) -> Optional[np.ndarray]:
        now = time.monotonic()
        if not self._camera_open:
            if now < self._camera_retry_at:
                self._wait(min(0.1, self._camera_retry_at - now))
                return None
            try:
                self.camera.open()
                self._camera_open = True
            except CameraError as exc:
                self._camera_fault(str(exc))
                return None
        try:
            frame = self.camera.read()
        except CameraError as exc:
            self._camera_fault(str(exc))
            return None
        except ImageError as exc:  # one bad frame (e.g. over MQTT): refuse it, keep the camera
            log.warning("frame rejected: %s", exc)
            self._emit({"event": "error", "source": "frame", "message": f"frame rejected: {exc}"})
            return None
        if frame is None:  # nothing new (a network source between frames)
            return None
        if self._camera_failures:
            log.info("camera is back after %d failed attempts", self._camera_failures)
            self._camera_failures = 0
            self._set_fault(None)
        return frame

    def _camera_fault(self, message: str) -> None:
        """Close, back off exponentially, show the camera blink code; the box keeps running."""
        self._camera_failures += 1
        delay = min(CAMERA_BACKOFF[0] * 2 ** (self._camera_failures - 1), CAMERA_BACKOFF[1])
        if self._camera_failures == 1 or self._camera_failures % 20 == 0:
            log.warning("%s (retrying in %.1fs)", message, delay)
            self._emit({"event": "error", "source": "camera", "message": message})
        with contextlib.suppress(Exception):
            self.camera.close()
        self._camera_open = False
        self._camera_retry_at = time.monotonic() + delay
        self._set_fault("camera")

    # --- commands ----------------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        """Sleep, but wake for commands (so buttons work while the camera is away)."""
        try:
            item = self.queue.get(timeout=max(0.0, seconds))
        except queue.Empty:
            return
        self._handle(item)

    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _handle(self, item) -> None:
        if item is None:
            return
        if isinstance(item, Press):
            self._press(item)
            return
        result = {"action": item.action, "ok": True}
        if item.id is not None:
            result["id"] = item.id
        try:
            extra = self.execute(item.action, item.args)
            if extra:
                result.update(extra)
        except CommandError as exc:
            result.update(ok=False, error=str(exc))
        except StoreError as exc:
            self._storage_fault(exc)
            result.update(ok=False, error=f"storage: {exc}")
        if item.reply is not None:
            try:
                item.reply(result)
            except Exception:  # a broken reply channel must not stop the box
                log.exception("sending a command result failed")

    def execute(self, action: str, args: dict) -> Optional[dict]:
        """Carry out one command (loop thread only). Raises CommandError when it cannot."""
        if action == "record":
            name = self._known_class(args.get("class"))
            seconds, count = args.get("seconds"), args.get("count")
            if seconds is None and count is None:
                seconds = 3.0
            self._start_recording(name, "command",
                                  until=None if seconds is None else time.monotonic() + float(seconds),
                                  count=None if count is None else int(count))
        elif action == "record/stop":
            if self.recording is None:
                raise CommandError("not recording")
            self._end_recording()
        elif action == "undo":
            self._undo()
        elif action == "clear":
            name = args.get("class")
            if name:
                self._clear(self._known_class(name))
            else:
                self._clear_all()
        elif action == "rename":
            self._rename(self._known_class(args.get("from")), args.get("to"))
        elif action == "threshold":
            self._set_threshold(args.get("value"))
        elif action == "classes":
            self._edit_classes(args.get("add"), args.get("remove"))
        elif action == "state":
            self._announce_state()
        else:
            raise CommandError(f"unknown action {action!r}")
        return None

    def _known_class(self, name) -> str:
        if not isinstance(name, str) or not name:
            raise CommandError("a class name is required")
        for known in self.classes:
            if known.lower() == name.lower():
                return known
        raise CommandError(f"unknown class {name!r} (classes: {', '.join(self.classes)})")

    # --- buttons -----------------------------------------------------------------------------

    def _button_class(self, button: str) -> Optional[str]:
        """The current name of a class button (it follows renames)."""
        if button not in self.button_classes:
            return None
        renames = self.store.knowledge.settings.get("renames", {})
        return renames.get(button, button)

    def _press(self, press: Press) -> None:
        if press.button in self.ignored:
            if not press.pressed:
                self.ignored.discard(press.button)
            return
        if press.button == "function":
            if press.pressed:
                self.function_down, self.function_used = press.at, False
            else:
                held = press.at - (self.function_down or press.at)
                self.function_down = None
                if not self.function_used and held < SHORT_PRESS:
                    self._safely(self._undo)
            return
        name = self._button_class(press.button)
        if name is None:
            return
        if press.pressed:
            if self.function_down is not None:
                self.function_used = True
                self._safely(lambda: self._clear(name))
            else:
                self._start_recording(name, "button")
        elif self.recording is not None and self.recording.name == name and self.recording.source == "button":
            self._end_recording()

    def _check_function_hold(self) -> None:
        if (self.function_down is not None and not self.function_used
                and time.monotonic() - self.function_down >= CLEAR_ALL_HOLD):
            self.function_used = True
            self._safely(self._clear_all)

    def _safely(self, action: Callable[[], None]) -> None:
        """Run a button action; its problems are logged and shown, never raised."""
        try:
            action()
        except CommandError as exc:
            log.info("%s", exc)
        except StoreError as exc:
            self._storage_fault(exc)

    # --- recording ---------------------------------------------------------------------------

    def _start_recording(self, name: str, source: str, until=None, count=None) -> None:
        if self.recording is not None:
            if self.recording.name == name and self.recording.source == source:
                return
            self._end_recording()
        if count is not None and count < 1:
            raise CommandError("count must be at least 1")
        self.recording = Recording(name, source, until=until, count=count)
        log.info("recording %s", name)
        self._announce_state()

    def _record(self, vec: np.ndarray) -> None:
        rec = self.recording
        now = time.monotonic()
        if rec.until is not None and now >= rec.until:
            self._end_recording()
            return
        if now < rec.next_at and self.camera is not None and self.camera.name != "mqtt":
            return  # pace a live camera; a pushed frame (MQTT) is paced by its sender
        view = gate_features(vec[np.newaxis], self.head.mean)[0]
        if rec.last is not None and 1.0 - float(view @ rec.last) < self.cfg.capture.min_change:
            return  # near-duplicate of the previous sample: nothing new to learn
        try:
            self.store.append({"op": "add", "class": rec.name, "vectors": vec[np.newaxis].astype(np.float32)})
        except StoreError as exc:
            self._storage_fault(exc)
            self._end_recording()
            return
        rec.added += 1
        rec.last = view
        rec.next_at = now + self._period
        self._class_changed(rec.name)
        self._emit({"event": "sample_added", "class": rec.name,
                    "samples": self.store.knowledge.counts().get(rec.name, 0)})
        if rec.count is not None:
            rec.count -= 1
            if rec.count <= 0:
                self._end_recording()

    def _end_recording(self) -> None:
        rec, self.recording = self.recording, None
        if rec is None:
            return
        if rec.added:
            self.bursts.append((rec.name, rec.added))
            del self.bursts[:-50]
        log.info("recorded %d samples of %s", rec.added, rec.name)
        self._emit({"event": "recording_stopped", "class": rec.name, "added": rec.added})
        self._announce_state()

    # --- changes to what the box knows -------------------------------------------------------

    def _class_changed(self, name: str) -> None:
        self.head.set_class(name, self.store.knowledge.classes.get(name, np.zeros((0, self.engine.dim), np.float32)))
        self.smoother.reset()
        if self.fault == "storage":
            self._set_fault(None)

    def _undo(self) -> None:
        if self.recording is not None:
            self._end_recording()
        if not self.bursts:
            raise CommandError("nothing to undo")
        name, n = self.bursts[-1]
        if name in self.store.knowledge.classes:
            self.store.append({"op": "remove_last", "class": name, "n": n})
        self.bursts.pop()
        self._class_changed(name)
        self._flash([name])
        self._emit({"event": "burst_undone", "class": name, "removed": n})
        self._announce_state()

    def _clear(self, name: str) -> None:
        if self.recording is not None and self.recording.name == name:
            self._end_recording()
        if name in self.store.knowledge.classes:
            self.store.append({"op": "clear", "class": name})
        self.bursts = [b for b in self.bursts if b[0] != name]
        self._class_changed(name)
        self._flash([name])
        self._emit({"event": "class_cleared", "class": name})
        self._announce_state()

    def _clear_all(self) -> None:
        self._end_recording()
        self.store.append({"op": "clear_all"})
        self.bursts.clear()
        self.head.set_samples({})
        self.smoother.reset()
        self._flash(self.classes)
        self._emit({"event": "all_cleared"})
        self._announce_state()

    def _rename(self, old: str, new) -> None:
        if not isinstance(new, str) or not new.strip() or len(new) > 32:
            raise CommandError("'to' must be a name of 1 to 32 characters")
        new = new.strip()
        if new.lower() == UNKNOWN_LABEL:
            raise CommandError("'unknown' is reserved")
        if any(c.lower() == new.lower() for c in self.classes if c != old):
            raise CommandError(f"a class named {new!r} exists already")
        settings = self.store.knowledge.settings
        renames = dict(settings.get("renames", {}))
        for button in self.button_classes:
            if renames.get(button, button) == old:
                renames[button] = new
        extra = [new if e == old else e for e in settings.get("extra_classes", [])]
        if old in self.store.knowledge.classes:
            self.store.append({"op": "rename", "from": old, "to": new})
        self.store.append({"op": "settings", "values": {"renames": renames, "extra_classes": extra}})
        self.bursts = [(new if b[0] == old else b[0], b[1]) for b in self.bursts]
        self.head.set_samples(dict(self.store.knowledge.classes))
        self.smoother.reset()
        self._emit({"event": "class_renamed", "from": old, "to": new})
        self._announce_state()

    def _set_threshold(self, value) -> None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            value = "auto"
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise CommandError("threshold must be 'auto' or a number from -1 to 1") from None
            if not -1.0 <= value <= 1.0:
                raise CommandError("threshold must be 'auto' or a number from -1 to 1")
        self.store.append({"op": "settings", "values": {"threshold": value}})
        self.head.set_threshold(value)
        self._announce_state()

    def _edit_classes(self, add, remove) -> None:
        extra = list(self.store.knowledge.settings.get("extra_classes", []))
        if add:
            if not isinstance(add, str) or not add.strip() or len(add) > 32:
                raise CommandError("'add' must be a name of 1 to 32 characters")
            add = add.strip()
            if add.lower() == UNKNOWN_LABEL or any(c.lower() == add.lower() for c in self.classes):
                raise CommandError(f"class {add!r} exists already or is reserved")
            if len(self.classes) >= self.max_classes:
                raise CommandError(f"at most {self.max_classes} classes")
            extra.append(add)
        if remove:
            name = self._known_class(remove)
            if name in [self._button_class(b) for b in self.button_classes]:
                raise CommandError(f"class {name!r} has a button; clear it instead")
            if name in self.store.knowledge.classes:
                self.store.append({"op": "clear", "class": name})
            extra = [e for e in extra if e != name]
            self._class_changed(name)
        if not add and not remove:
            raise CommandError("give 'add' or 'remove'")
        self.store.append({"op": "settings", "values": {"extra_classes": extra}})
        self._announce_state()

    def _storage_fault(self, exc: Exception) -> None:
        log.error("storage: %s", exc)
        self._set_fault("storage")
        self._emit({"event": "error", "source": "storage", "message": str(exc)})

    # --- recognising -------------------------------------------------------------------------

    def _classify(self, vec: np.ndarray) -> Decision:
        choice, gate = self.head.evaluate(vec)
        labels = self.head.labels
        index = self.smoother.update(choice[0], gate[0], self.head.threshold)
        label = labels[index] if index != UNKNOWN else UNKNOWN_LABEL
        changed = label != self.label
        self.label = label
        confidence = self.smoother.confidence()
        decision = Decision(label=label, index=self.classes.index(label) if index != UNKNOWN else -1,
                            confidence=round(confidence, 4),
                            scores={n: round(float(s), 4) for n, s in zip(labels, gate[0])},
                            ts=time.time(), frame=self.frames, changed=changed)
        self._show(confidence)
        for out in self.outputs:
            try:
                out.decision(decision)
            except Exception:
                log.exception("output %s failed", type(out).__name__)
        return decision

    # --- outputs -----------------------------------------------------------------------------

    def _show(self, confidence: float = 1.0) -> None:
        if self.panel is None:
            return
        label = None if self.label == UNKNOWN_LABEL or self.recording else self.label
        leds = self._led_names()
        self.panel.show(leds.get(label), confidence,
                        recording=leds.get(self.recording.name) if self.recording else None)

    def _flash(self, names) -> None:
        if self.panel is not None:
            leds = self._led_names()
            self.panel.flash([leds[n] for n in names if n in leds])

    def _led_names(self) -> Dict[str, str]:
        """Current class name -> the config name its button and LED are wired under."""
        return {self._button_class(b): b for b in self.button_classes}

    def _check_links(self) -> None:
        """Slow-blink the status LED while an output link (MQTT) is down and nothing worse is."""
        if self.panel is None or self.fault is not None:
            return
        down = any(getattr(out, "connected", True) is False for out in self.outputs)
        self.panel.set_status("mqtt" if down else "ok")

    def _set_fault(self, fault: Optional[str]) -> None:
        self.fault = fault
        if self.panel is not None:
            self.panel.set_status(fault or "ok")

    def _emit(self, event: dict) -> None:
        event = dict(event, ts=time.time())
        for out in self.outputs:
            try:
                out.event(event)
            except Exception:
                log.exception("output %s failed", type(out).__name__)

    def _announce_state(self) -> None:
        state = self.state()
        for out in self.outputs:
            try:
                out.state(state)
            except Exception:
                log.exception("output %s failed", type(out).__name__)


# --- composition root ----------------------------------------------------------------------------


def serve(cfg, simulate: Optional[bool] = None, terminal: bool = False) -> int:
    """Build everything from the config, run the box until SIGTERM/SIGINT, release it all.

    One ExitStack owns every resource, so a failure half-way through start-up still closes
    what was opened, in reverse order.
    """
    import os
    import signal

    from edge.camera import make_camera
    from edge.panel import gpio_available, use_mock_pins

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning("running as root: a box should run as its own user (see docs/install.md)")
    if simulate is None:
        simulate = not gpio_available()
        if simulate:
            log.warning("no GPIO found: running simulated (mock pins)")
    if simulate:
        use_mock_pins()

    with contextlib.ExitStack() as stack:
        try:
            engine = Embedder(cfg.model.model_path, threads=cfg.model.threads, kernels=cfg.model.kernels,
                              mirror=cfg.camera.mirror)
        except ModelError as exc:
            return _show_fault_until_stopped(cfg, "model", exc)
        store = Store(cfg.store.path, engine.model_id, engine.dim, max_per_class=cfg.capture.max_per_class)
        store.open()
        stack.callback(store.close)
        notifier = Notifier()
        stack.callback(notifier.close)
        stack.callback(notifier.stopping)

        box = Box(cfg, engine, store, camera=None, panel=None, notifier=notifier)
        link = None
        if cfg.mqtt.enabled:
            from edge.mqtt import MqttLink
            link = MqttLink(cfg.mqtt, cfg.device_id, box.submit, frame_source=cfg.camera.source == "mqtt")
            box.outputs.append(link)
        camera = link.camera if link is not None and link.camera is not None else \
            make_camera(cfg.camera, demo_folder=_demo_folder(), model_size=engine.size)
        box.camera = camera
        stack.callback(camera.close)
        box.panel = Panel(cfg.classes, cfg.function_button, cfg.status_led, send=box.submit, pwm=cfg.led_pwm)
        stack.callback(box.panel.close)
        log.info("edge %s: model %s (%s), camera %s, classes %s, store %s", __version__,
                 engine.path.name, engine.info.backend, camera.name, ", ".join(box.classes), cfg.store.path)
        if link is not None:
            link.start()
            stack.callback(link.close)
        # --- the web page (edge/web.py): its own thread; Requests in, Outputs back ---------
        if cfg.web.enabled:
            from edge.web import WebServer, upload_limit
            page = WebServer(cfg.web, box.submit, device_id=cfg.device_id,
                             max_upload=upload_limit(engine.dim, cfg.capture.max_per_class))
            box.outputs.append(page)
            if page.start():
                stack.callback(page.close)
        # --- end of the web page -------------------------------------------------------------
        if terminal:
            from edge.sim import Terminal
            sim = Terminal(box, box.panel, camera)
            sim.start()
            stack.callback(sim.close)

        def on_signal(signum, _frame):
            log.info("stopping (%s)", signal.Signals(signum).name)
            notifier.stopping()
            box.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        stack.callback(lambda: [signal.signal(s, h) for s, h in previous.items()])
        box.run()
        log.info("stopped cleanly")
    return 0


def _show_fault_until_stopped(cfg, code: str, exc: Exception) -> int:
    """A box without a screen shows a fatal fault on its status LED instead of just exiting
    (systemd would only restart it into the same fault). Exits 1 when stopped."""
    import signal

    log.error("%s", exc)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    panel = Panel(cfg.classes, cfg.function_button, cfg.status_led, send=lambda _item: None)
    notifier = Notifier()
    try:
        panel.set_status(code)
        notifier.ready(f"{code} fault: {exc}")
        while not stop.wait(1.0):
            notifier.watchdog()
    finally:
        notifier.stopping()
        notifier.close()
        panel.close()
        for s, h in previous.items():
            signal.signal(s, h)
    return 1


def _demo_folder():
    """Photos for the simulated camera when none is configured: the shared clothing test set."""
    import os
    from pathlib import Path
    root = Path(os.environ.get("EDGE_DATASETS", Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"))
    folder = root / "clothing-small" / "test"
    return folder if folder.is_dir() else None
