"""The box: the one loop that owns all state (samples, classes, mode), and the composition root.

Frames flow one way: camera -> engine -> head -> smoothing -> LEDs and outputs. Commands flow the
other way into one queue: buttons (gpiozero threads), MQTT (its network thread), the web page,
the terminal simulator. Only the loop thread touches the store, the head and the LEDs' meaning,
so the domain code needs no locks and a button can never race an MQTT message. Each command is
one store transaction (edge.store), and is announced only after it was saved.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from edge import __version__, commands as C, rules, transfer
from edge.commands import Decision, Outputs
from edge.camera import Camera, Retrying
from edge.engine import Embedder, ModelError, load_reference, load_spread
from edge.gestures import Gestures
from edge.head import Head, gate_features
from edge.image import ImageError
from edge.panel import Panel, Press
from edge.smoothing import UNKNOWN, Smoother
from edge.store import SOURCES, NotFound, Store, StoreError
from edge.store_db import why
from edge.systemd import Notifier

log = logging.getLogger(__name__)

UNKNOWN_LABEL = "unknown"
PREVIEW_PERIOD = 0.2     # seconds between model-view pictures for outputs that show them
THUMBNAIL_SIZE = 96      # pixels: a sample's picture in the store (web gallery)
FEW_SAMPLES = 10         # fewer than this: a hint to teach a class more
FAULT_ORDER = ("model", "storage", "camera")   # the status LED shows the first present


@dataclass
class Recording:
    """A burst of samples being recorded for one class."""

    name: str
    source: str                      # a store source: button, mqtt, web
    by_button: bool = False
    until: Optional[float] = None    # monotonic deadline (timed command; counted: idle limit)
    count: Optional[int] = None      # samples still wanted (counted command)
    burst: Optional[int] = None      # store burst id, taken with the first sample
    added: int = 0
    next_at: float = 0.0
    last: Optional[np.ndarray] = None
    last_at: Optional[float] = None  # when the last sample was learned
    gap: float = 0.0                 # the longest time between two samples so far


class CommandError(ValueError):
    """A command that cannot be carried out; its message goes back to the sender."""


class Box:
    """Owns the knowledge and the mode; runs the frame loop. Everything else talks via `submit`."""

    def __init__(self, cfg, engine: Embedder, store: Store, camera: Camera, panel: Optional[Panel],
                 commands: "queue.Queue", notifier: Optional[Notifier] = None,
                 outputs: Optional[List[Outputs]] = None):
        """Built in one pass with all its parts: `commands` is the queue whose `put` the panel and
        the links were given (make it first), so nothing is filled in later."""
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.camera = camera if isinstance(camera, Retrying) else Retrying(camera)
        self.panel = panel
        self.notifier = notifier or Notifier(address="")
        self.outputs: List = list(outputs or [])
        self.queue = commands
        self.stop_event = threading.Event()
        self.started = time.time()
        self.faults: Dict[str, str] = {}
        self.smoother = Smoother(cfg.head.smoothing, cfg.head.hysteresis)
        self.recording: Optional[Recording] = None
        self.gestures = Gestures()
        self.frames = 0
        self.label = UNKNOWN_LABEL
        self._last_vec: Optional[np.ndarray] = None    # the last frame's embedding (`_answer_again`)
        self._stale = False     # what the box knows changed since the last answer
        self.view: Optional[np.ndarray] = None   # the model's input of the newest frame
        self._preview_at = 0.0
        self._period = 1.0 / cfg.capture.rate
        self._built = False     # no state announced while being built (`run` announces the first)
        for message in store.faults:
            self._fault_on("storage", message)
        self._reconcile()
        self.head = Head(cfg.head.kind, k=cfg.head.k, mean=load_reference(engine.path, engine.dim),
                         threshold=self._threshold_setting(), spread=_spread_or_none(engine))
        self._refit()
        self._built = True

    # --- public, thread-safe -----------------------------------------------------------------

    def submit(self, item) -> None:
        """Queue a Press or a commands.Request for the loop (safe from any thread)."""
        self.queue.put(item)

    def stop(self) -> None:
        self.stop_event.set()
        self.queue.put(None)  # wake the loop if it waits on the queue

    # --- what the box knows ------------------------------------------------------------------

    @property
    def classes(self) -> List[str]:
        """Every class in the store's order (button classes first on a new box)."""
        return [c.name for c in self.store.classes()]

    @property
    def fault(self) -> Optional[str]:
        for code in FAULT_ORDER:
            if code in self.faults:
                return code
        return None

    def _info(self, name: Optional[str]):
        """The store's ClassInfo of a class, or None."""
        return next((c for c in self.store.classes() if c.name == name), None)

    def button_class(self, button: str) -> Optional[str]:
        """The current name of the class a config button is bound to (it follows renames)."""
        for c in self.store.classes():
            if c.button == button:
                return c.name
        return None

    def state(self) -> dict:
        infos = self.store.classes()
        thresholds = self.head.class_thresholds() if hasattr(self.head, "class_thresholds") else {}
        return {
            "mode": "recording" if self.recording else "classifying",
            "recording": self.recording.name if self.recording else None,
            "classes": [{"name": c.name, "samples": c.count, "nothing": c.nothing, "button": c.button,
                         "led": self.led_of(c.name) is not None,
                         **({"threshold": round(float(thresholds[c.name]), 4)} if c.name in thresholds else {})}
                        for c in infos],
            "head": self.cfg.head.kind,
            "threshold": self.head.threshold_setting,
            "threshold_value": round(float(self.head.threshold), 4),
            "model": self.engine.path.name,
            "model_sha256": self.engine.model_id,
            "version": __version__,
            "uptime": round(time.time() - self.started, 1),
            "fault": self.fault,
            "faults": dict(self.faults),
        }

    # --- start: config and store agree -------------------------------------------------------

    def _reconcile(self) -> None:
        """Bind the store's classes to the config's buttons (bind_to_config), as one command."""
        try:
            with self.store.command():
                bind_to_config(self.store, self.cfg.classes)
        except (StoreError, rules.RuleError) as exc:
            self._storage_fault(exc)
        extra = [c.name for c in self.store.classes() if c.button is None]
        if extra:
            log.info("classes without a button (taught over MQTT, the web page or an import): %s",
                     ", ".join(extra))

    def _threshold_setting(self):
        """Precedence: a threshold set live (MQTT, web) wins while config.yaml still says what it
        said then; once config.yaml's value is changed, the file wins. Logged at start."""
        settings = self.store.settings()
        live, seen = settings.get("threshold"), settings.get("threshold_config")
        configured = self.cfg.head.threshold
        if live is None:
            log.info("threshold: %s (config.yaml)", configured)
            return configured
        if seen == configured:
            log.info("threshold: %s (set live; config.yaml still says %s)", live, configured)
            return live
        log.info("threshold: %s (config.yaml changed since %s was set live)", configured, live)
        return configured

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(): commands, frames, LEDs, watchdog (fed only after a healthy step)."""
        if self.panel is not None:
            held = self.panel.held()
            self.gestures = Gestures(held, self.gestures.clear_all_hold)
            if held:
                log.info("ignoring buttons held at start until released: %s", ", ".join(sorted(held)))
        self._show_status()
        self._announce_state()
        self.notifier.ready(f"classes: {', '.join(self.classes)}")
        while not self.stop_event.is_set():
            try:
                self.step()
                self.notifier.watchdog()
            except Exception as exc:  # a bug must not take the classroom box down; log it loudly
                log.exception("unexpected error in the frame loop")
                self._emit({"event": "error", "source": "internal", "message": f"{type(exc).__name__}: {exc}"})
                self.stop_event.wait(0.5)
        self._end_recording()

    def step(self) -> None:
        """One turn: handle queued commands, then one frame (or a camera retry); then the
        outputs' threads are woken (`flush`), after the frame, not in the middle of it."""
        try:
            self._turn()
            if self._stale:     # once a turn, however many changes its commands made
                self._answer_again()
        finally:
            self._tell("flush")

    def _turn(self) -> None:
        self._drain()
        self._check_function_hold()
        frame = self._next_frame()
        if frame is None:
            if self.recording is not None and self.recording.until is not None \
                    and time.monotonic() >= self.recording.until:
                self._end_recording()  # a timed recording ends even when no frame comes
            self._check_links()
            return
        # commands that came while the camera was waiting for this frame apply to it: a record
        # command sent over MQTT just before its first picture must record that picture
        self._drain()
        try:
            rgb = self.engine.prepare(frame)
            vec = self.engine.invoke(rgb)
        except ImageError as exc:
            self.camera.failed(f"camera sent an unusable frame: {exc}")
            self._camera_status()
            return
        self.frames += 1
        self.view = rgb
        self.process(vec)
        self._preview(rgb)
        self._check_links()

    def process(self, vec: np.ndarray) -> Optional[Decision]:
        """Use one frame's embedding: a training sample while recording, else a decision."""
        self._last_vec = vec
        if self.recording is not None:
            self._record(vec)
            self._show()
            return None
        return self._classify(vec)

    # --- camera ------------------------------------------------------------------------------

    def _next_frame(self) -> Optional[np.ndarray]:
        try:
            frame = self.camera.read()
        except ImageError as exc:  # one bad frame (e.g. over MQTT): refuse it, keep the camera
            log.warning("frame rejected: %s", exc)
            self._emit({"event": "error", "source": "frame", "message": f"frame rejected: {exc}"})
            return None
        self._camera_status()
        if frame is None and self.camera.retry_in() > 0:
            self._wait(min(0.1, self.camera.retry_in()))
        return frame

    def _camera_status(self) -> None:
        """Tell the camera's news and show its fault (the box keeps running meanwhile)."""
        for message in self.camera.news():
            log.warning("%s", message)
            self._emit({"event": "error", "source": "camera", "message": message})
        if self.camera.fault is not None:
            self._fault_on("camera", self.camera.fault)
        else:
            self._fault_off("camera")

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
        result = self.execute(item.command, item.source)
        if item.id is not None:
            result["id"] = item.id
        if item.reply is not None:
            try:
                item.reply(result)
            except Exception:  # a broken reply channel must not stop the box
                log.exception("sending a command result failed")

    def execute(self, command: C.Command, source: str = "mqtt") -> dict:
        """Carry out one command (loop thread only); always returns its result dict."""
        result = {"action": command.action, "ok": True}
        handler = self.HANDLERS.get(type(command))
        try:
            if handler is None:
                raise CommandError(f"{command.action} cannot be run here")
            extra = handler(self, command, source)
            if extra:
                result.update(extra)
        except (CommandError, rules.RuleError, NotFound) as exc:
            # a KeyError's str() quotes its message; other messages may end in a quoted value
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            result.update(ok=False, error=str(text))
        except StoreError as exc:
            self._storage_fault(exc)
            result.update(ok=False, error=f"storage: {exc}")
        except Exception as exc:    # a bug: answer at once (a page waited 60 s for a reply), log it loudly
            log.exception("unexpected error in the command %s", command.action)
            self._emit({"event": "error", "source": "internal", "message": f"{type(exc).__name__}: {exc}"})
            result.update(ok=False, error=f"internal error ({type(exc).__name__}); the box carries on")
        return result

    def _known(self, name) -> str:
        try:
            return rules.find_class(name, self.classes)
        except rules.RuleError as exc:
            raise CommandError(str(exc)) from None

    def _do_record(self, cmd: C.Record, source: str):
        name = self._known(cmd.cls)
        # a counted recording has a deadline too, moved on by each sample learned: on a still
        # scene, or with no pictures coming, it would never end and the box never answer
        seconds = rules.RECORD_IDLE_SECONDS if cmd.seconds is None else cmd.seconds
        self._start_recording(name, source, until=time.monotonic() + seconds, count=cmd.count)

    def _do_stop(self, cmd: C.StopRecording, source):
        if self.recording is None:
            raise CommandError("not recording")
        if cmd.cls is not None and self._known(cmd.cls) != self.recording.name:
            raise CommandError(f"not recording {self._known(cmd.cls)} (recording {self.recording.name})")
        self._end_recording()

    def _do_undo(self, cmd, source):
        self._undo()

    def _do_clear(self, cmd: C.Clear, source):
        if cmd.cls is None:
            self._clear_all()
        else:
            self._clear(self._known(cmd.cls))

    def _do_rename(self, cmd: C.Rename, source):
        old = self._known(cmd.old)
        new = rules.new_class_name(cmd.new, self.classes, replacing=old)
        if new == old:
            return None
        if self.recording is not None and self.recording.name == old:
            # ended, not carried on: the page or program that started it stops it by the old name
            self._end_recording()
        with self.store.command():
            self.store.rename_class(old, new)
        self._refit()
        self._emit({"event": "class_renamed", "from": old, "to": new})
        self._announce_state()

    def _do_threshold(self, cmd: C.SetThreshold, source):
        with self.store.command():
            self.store.set_setting("threshold", cmd.value)
            self.store.set_setting("threshold_config", self.cfg.head.threshold)
        self.head.set_threshold(cmd.value)
        self._announce_state()
        self._stale = True

    def _do_add(self, cmd: C.AddClass, source):
        name = rules.new_class_name(cmd.name, self.classes)
        if len(self.classes) >= rules.MAX_CLASSES:
            raise CommandError(f"at most {rules.MAX_CLASSES} classes")
        with self.store.command():
            self.store.add_class(name)
        self._emit({"event": "class_added", "class": name})
        self._announce_state()

    def _do_remove(self, cmd: C.RemoveClass, source):
        name = self._known(cmd.name)
        if self._info(name).button is not None:
            raise CommandError(f"class {name!r} is in config.yaml (its button and LED); clear it instead, "
                               f"or remove it from the config")
        if self.recording is not None and self.recording.name == name:
            self._end_recording()
        with self.store.command():
            self.store.remove_class(name)
        self._refit()
        self._emit({"event": "class_removed", "class": name})
        self._announce_state()

    def _do_nothing(self, cmd: C.SetNothing, source):
        name = self._known(cmd.cls)
        with self.store.command():
            self.store.set_nothing(name, cmd.nothing)
        self._refit()
        self._announce_state()

    def _do_state(self, cmd, source):
        self._announce_state()
        return {"state": self.state()}

    def _do_samples(self, cmd: C.ListSamples, source):
        name = self._known(cmd.cls)
        rows = self.store.samples(name, limit=cmd.limit, before=cmd.before)
        return {"class": name, "count": self._count(name),
                "samples": [{"id": r.id, "ts": round(r.ts, 3), "source": r.source, "burst": r.burst,
                             "thumbnail": r.thumbnail} for r in rows]}

    def _do_delete_sample(self, cmd: C.DeleteSample, source):
        try:
            with self.store.command():
                name = self.store.delete_sample(cmd.id)
        except KeyError:
            raise CommandError(f"no sample with id {cmd.id}") from None
        self._class_changed(name)
        self._emit({"event": "sample_deleted", "class": name, "id": cmd.id})
        self._announce_state()
        return {"class": name}

    def _do_delete_burst(self, cmd: C.DeleteBurst, source):
        if self.recording is not None and self.recording.burst == cmd.burst:
            self._end_recording()       # else its next samples would go on in the deleted burst
        try:
            with self.store.command():
                name, removed = self.store.delete_burst(cmd.burst)
        except KeyError:
            raise CommandError(f"no burst {cmd.burst}") from None
        if not removed:
            raise CommandError(f"no burst {cmd.burst}")
        self._class_changed(name)
        self._emit({"event": "burst_deleted", "class": name, "burst": cmd.burst, "removed": removed})
        self._announce_state()
        return {"class": name, "removed": removed}

    def _do_thumbnails(self, cmd: C.Thumbnails, source):
        out = {}
        for sample_id in cmd.ids:
            data = self.store.thumbnail(sample_id)
            if data is not None:
                out[str(sample_id)] = base64.b64encode(data).decode("ascii")
        return {"thumbnails": out}

    def _do_hints(self, cmd, source):
        return {"hints": self.hints()}

    def _do_export(self, cmd: C.Export, source):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "edge-export"
            transfer.export(self.store, path, thumbnails=cmd.thumbnails)
            return {"data": path.read_bytes()}

    def _do_import(self, cmd: C.Import, source):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload"
            try:
                path.write_bytes(cmd.data)
            except OSError as exc:
                raise StoreError(f"cannot keep the file to import: {why(exc)}") from None
            try:
                imported = transfer.read(self.store, path, "the file")
            except transfer.ImportRefused as exc:     # a wrong file: refused, nothing changes
                raise CommandError(str(exc)) from None
            self._end_recording()
            note = install_import(self.store, self.cfg, imported)
        self._refit()
        self._emit({"event": "imported", "message": note})
        self._announce_state()
        return {"message": note}

    HANDLERS: Dict[type, Callable] = {
        C.Record: _do_record, C.StopRecording: _do_stop, C.Undo: _do_undo, C.Clear: _do_clear,
        C.Rename: _do_rename, C.SetThreshold: _do_threshold, C.AddClass: _do_add,
        C.RemoveClass: _do_remove, C.SetNothing: _do_nothing, C.State: _do_state,
        C.ListSamples: _do_samples, C.DeleteSample: _do_delete_sample, C.DeleteBurst: _do_delete_burst,
        C.Thumbnails: _do_thumbnails, C.Hints: _do_hints, C.Export: _do_export, C.Import: _do_import,
    }

    # --- buttons -----------------------------------------------------------------------------

    def _press(self, press: Press) -> None:
        self._act(self.gestures.press(press.button, press.pressed, press.at))

    def _check_function_hold(self) -> None:
        self._act(self.gestures.tick(time.monotonic()))

    def _act(self, actions) -> None:
        """Carry out what the button gestures ask for (see edge/gestures.py)."""
        for action in actions:
            if action.kind == "undo":
                self._safely(self._undo)
            elif action.kind == "clear_all":
                self._safely(self._clear_all)
            else:
                name = self.button_class(action.button)
                if name is None:
                    continue
                if action.kind == "clear":
                    self._safely(lambda: self._clear(name))
                elif action.kind == "record":
                    self._start_recording(name, "button", by_button=True)
                elif self.recording is not None and self.recording.name == name and self.recording.by_button:
                    self._end_recording()

    def _safely(self, action: Callable[[], None]) -> None:
        """Run a button action; its problems are logged and shown, never raised."""
        try:
            action()
        except CommandError as exc:
            log.info("%s", exc)
        except StoreError as exc:
            self._storage_fault(exc)

    # --- recording ---------------------------------------------------------------------------

    def _start_recording(self, name: str, source: str, until=None, count=None, by_button=False) -> None:
        source = source if source in SOURCES else "mqtt"
        if self.recording is not None:
            if self.recording.name == name and self.recording.by_button == by_button:
                if not by_button:     # the same class again: its new limits apply
                    self.recording.until, self.recording.count = until, count
                    self._announce_state()
                return
            self._end_recording()
        self.recording = Recording(name, source, by_button=by_button, until=until, count=count)
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
        thumb = self._thumbnail() if self.cfg.store.thumbnails else None
        try:
            with self.store.command():
                # the recording's burst only once a sample of it is kept: a burst id taken in a
                # command that failed (a full card) was announced, then given to the next recording
                burst = self.store.new_burst() if rec.burst is None else rec.burst
                self.store.add_samples(rec.name, vec[np.newaxis].astype(np.float32), rec.source, burst,
                                       thumbnails=[thumb])
        except StoreError as exc:
            self._storage_fault(exc)
            self._end_recording()
            return
        except ValueError as exc:   # a model of one's own whose output the store refuses (rules.vectors_problem)
            log.error("a frame could not be learned: %s", exc)
            self._emit({"event": "error", "source": "model", "message": f"a frame could not be learned: {exc}"})
            self._end_recording()
            return
        rec.burst = burst
        rec.added += 1
        rec.last = view
        rec.next_at = now + self._period
        if rec.last_at is not None:
            rec.gap = max(rec.gap, now - rec.last_at)
        rec.last_at = now
        if rec.count is not None:
            rec.until = now + max(rules.RECORD_IDLE_SECONDS, rules.RECORD_IDLE_GAPS * rec.gap)
        self._class_changed(rec.name)
        self._emit({"event": "sample_added", "class": rec.name, "samples": self._count(rec.name)})
        if rec.count is not None:
            rec.count -= 1
            if rec.count <= 0:
                self._end_recording()

    def _thumbnail(self) -> Optional[bytes]:
        if self.view is None:
            return None
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(self.view).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).save(buf, "JPEG", quality=80)
        return buf.getvalue()

    def _end_recording(self) -> None:
        rec, self.recording = self.recording, None
        if rec is None:
            return
        log.info("recorded %d samples of %s", rec.added, rec.name)
        self._emit({"event": "recording_stopped", "class": rec.name, "added": rec.added, "burst": rec.burst})
        self._announce_state()
        self._show()            # the class LED stops blinking even when no frame comes (MQTT pictures)
        self._stale = True

    # --- changes to what the box knows -------------------------------------------------------

    def _count(self, name: str) -> int:
        info = self._info(name)
        return info.count if info is not None else 0

    def _refit(self) -> None:
        """Give the head everything the store holds (after a change of classes)."""
        infos = self.store.classes()
        vectors = self.store.all_vectors()
        self.head.set_samples({c.name: vectors[c.name] for c in infos})
        self.head.set_nothing([c.name for c in infos if c.nothing])
        self.smoother.reset()
        self._stale = True

    def _class_changed(self, name: str) -> None:
        self.head.set_class(name, self.store.vectors(name))
        self.smoother.reset()
        self._fault_off("storage")
        self._stale = True

    def _answer_again(self) -> None:
        """After a change of what the box knows (`_stale`), answer the last frame anew: with
        pictures sent over MQTT the next one may never come, and the label, LED and Home
        Assistant would go on showing a class that was cleared, renamed, removed or made
        "nothing". A frame answered meanwhile is answered with what the box knows now."""
        self._stale = False
        if self.recording is None and self._last_vec is not None:
            self._classify(self._last_vec, again=True)

    def _undo(self) -> None:
        if self.recording is not None:
            self._end_recording()
        last = self.store.last_burst()
        if last is None:
            raise CommandError("nothing to undo")
        name, burst, _ = last
        with self.store.command():
            _, removed = self.store.delete_burst(burst)
        self._class_changed(name)
        self._flash([name])
        self._emit({"event": "burst_undone", "class": name, "removed": removed, "burst": burst})
        self._announce_state()

    def _clear(self, name: str) -> None:
        if self.recording is not None and self.recording.name == name:
            self._end_recording()
        with self.store.command():
            self.store.clear(name)
        self._class_changed(name)
        self._flash([name])
        self._emit({"event": "class_cleared", "class": name})
        self._announce_state()

    def _clear_all(self) -> None:
        self._end_recording()
        with self.store.command():
            self.store.clear_all()
        self._refit()
        self._fault_off("storage")
        self._flash(self.classes)
        self._emit({"event": "all_cleared"})
        self._announce_state()

    def _storage_fault(self, exc: Exception) -> None:
        log.error("storage: %s", exc)
        self._fault_on("storage", str(exc))
        self._emit({"event": "error", "source": "storage", "message": str(exc)})

    def hints(self) -> List[str]:
        """Plain-words advice from what the box holds: too few samples, classes easily confused
        (leave-one-out nearest centroid over the stored samples)."""
        infos = [c for c in self.store.classes()]
        out = [f"{c.name} has only {c.count} pictures: hold its button a little longer while you "
               f"move the thing around" for c in infos if 0 < c.count < FEW_SAMPLES]
        out += [f"{c.name} has no pictures yet" for c in infos if c.count == 0]
        taught = [c.name for c in infos if c.count >= 2]
        if len(taught) >= 2:
            views = {n: gate_features(self.store.vectors(n), self.head.mean) for n in taught}
            sums = {n: v.sum(axis=0) for n, v in views.items()}
            for a in taught:
                cents = np.stack([sums[b] / len(views[b]) for b in taught])
                cents /= np.linalg.norm(cents, axis=1, keepdims=True) + 1e-9
                own = (sums[a][None, :] - views[a]) / (len(views[a]) - 1)
                own /= np.linalg.norm(own, axis=1, keepdims=True) + 1e-9
                sims = views[a] @ cents.T
                sims[:, taught.index(a)] = np.einsum("ij,ij->i", views[a], own)
                wrong = sims.argmax(axis=1)
                for j, b in enumerate(taught):
                    share = float(np.mean(wrong == j)) if b != a else 0.0
                    if share >= 0.2:
                        out.append(f"{a} and {b} look alike to the box: {round(share * 100)}% of {a}'s "
                                   f"pictures are closer to {b}. Show each from more sides, or with "
                                   f"different backgrounds")
        return out

    # --- recognising -------------------------------------------------------------------------

    def _classify(self, vec: np.ndarray, again: bool = False) -> Decision:
        self._stale = False
        choice, gate = self.head.evaluate(vec)
        labels = self.head.labels
        if self.camera is not None and self.camera.name == "mqtt":
            self.smoother.reset()   # each picture sent over MQTT gets its own answer
        index = self.smoother.update(choice[0], gate[0], self.head.threshold)
        infos = self.store.classes()     # read once a frame: the nothing flag, the index, the LED
        position, info = -1, None
        if index != UNKNOWN:
            position, info = next(((i, c) for i, c in enumerate(infos) if c.name == labels[index]), (-1, None))
        if info is not None and info.nothing:
            position, info = -1, None
        label = info.name if info is not None else UNKNOWN_LABEL
        changed = label != self.label
        self.label = label
        confidence = self.smoother.confidence() if info is not None else 0.0
        decision = Decision(label=label, index=position, confidence=round(confidence, 4),
                            scores={n: round(s, 4) for n, s in zip(labels, gate[0].tolist())},
                            ts=time.time(), frame=self.frames, changed=changed, again=again)
        if self.panel is not None:   # as _show, with the info at hand (not recording here)
            self.panel.show(info.button if info is not None else None, confidence)
        self._tell("decision", decision)
        return decision

    # --- outputs -----------------------------------------------------------------------------

    def led_of(self, name: Optional[str]) -> Optional[str]:
        """The config name a class's LED is wired under (None: no LED, or a nothing class)."""
        info = self._info(name)
        return info.button if info is not None and not info.nothing else None

    def _show(self, confidence: float = 1.0) -> None:
        if self.panel is None:
            return
        label = None if self.label == UNKNOWN_LABEL or self.recording else self.label
        recording = None
        if self.recording is not None:
            info = self._info(self.recording.name)
            recording = info.button if info is not None else None
        self.panel.show(self.led_of(label), confidence, recording=recording)

    def _flash(self, names) -> None:
        if self.panel is not None:
            self.panel.flash([led for led in (self.led_of(n) for n in names) if led is not None])

    def _preview(self, rgb: np.ndarray) -> None:
        now = time.monotonic()
        if now - self._preview_at < PREVIEW_PERIOD:
            return
        self._preview_at = now
        self._tell("preview", rgb)

    def _tell(self, method: str, *args) -> None:
        """The one fan-out: call `method` on every output that has it; a failing output is logged
        and never stops the others or the loop."""
        for out in self.outputs:
            call = getattr(out, method, None)
            if call is not None:
                try:
                    call(*args)
                except Exception:
                    log.exception("output %s failed", type(out).__name__)

    def _check_links(self) -> None:
        """Slow-blink the status LED while an output link (MQTT) is down and nothing worse is."""
        if self.panel is None or self.fault is not None:
            return
        down = any(getattr(out, "connected", True) is False for out in self.outputs)
        self.panel.set_status("mqtt" if down else "ok")

    def _fault_on(self, code: str, message: str) -> None:
        if self.faults.get(code) != message:
            self.faults[code] = message
            self._show_status()
            self._announce_state()      # the page shows what the status LED blinks

    def _fault_off(self, code: str) -> None:
        if code in self.faults and not (code == "storage" and getattr(self.store, "read_only", False)):
            del self.faults[code]
            self._show_status()
            self._announce_state()
            log.info("%s works again", code)       # the journal showed the error, never its end
            self._emit({"event": "recovered", "source": code})

    def _show_status(self) -> None:
        if self.panel is not None:
            self.panel.set_status(self.fault or "ok")

    def _emit(self, event: dict) -> None:
        self._tell("event", dict(event, ts=time.time()))

    def _announce_state(self) -> None:
        if self._built:
            self._tell("state", self.state())


def bind_to_config(store: Store, classes) -> List[str]:
    """Inside a store command: give each config class (ClassConfig) its button, matching the
    store's classes by name ignoring case and adding the ones the store lacks; unbind buttons the
    config no longer has (those classes stay, without button or LED); apply `nothing: true`.
    Used at every start and after an import, so both follow the same rule. Returns the config
    classes that did not fit (the store holds MAX_CLASSES others): their buttons do nothing."""
    wiring = {c.name: c for c in classes}
    left_out = []
    for c in store.classes():
        if c.button is not None and c.button not in wiring:
            store.bind_button(c.name, None)
            log.info("class %s has no button in the config any more; it stays, without "
                     "button or LED (remove it over MQTT or the web page)", c.name)
    for name, config in wiring.items():
        infos = store.classes()
        mine = next((c for c in infos if c.button == name), None)
        if mine is None:
            same = next((c for c in infos if c.name.casefold() == name.casefold()), None)
            if same is not None and same.button is None:
                store.bind_button(same.name, name)
                mine = same
            elif same is None and len(infos) < rules.MAX_CLASSES:
                store.add_class(name, button=name, nothing=config.nothing)
            elif same is None:
                log.error("class %s from the config does not fit: the box knows %d classes "
                          "already (remove one)", name, rules.MAX_CLASSES)
                left_out.append(name)
            else:       # the name is taken by a class wired to another config entry (renamed)
                log.error("class %s from the config is not added: class %s, wired to the config's "
                          "class %s (renamed over MQTT or the web page), has that name; rename one of "
                          "them", name, same.name, same.button)
                left_out.append(name)
        if mine is not None and config.nothing and not mine.nothing:
            store.set_nothing(mine.name, True)
    return left_out


def import_file(store: Store, cfg, path: Path) -> str:
    """Replace what the store holds with an export file's content, checked whole first (the store
    is untouched when anything is refused). Returns one line saying what happened."""
    return install_import(store, cfg, transfer.read(store, path))


def install_import(store: Store, cfg, imported) -> str:
    """Replace what the store holds with a `transfer.read` file. Classes the config has get their
    buttons back; the others become classes without button or LED."""
    with store.command():
        transfer.apply(store, imported)
        left_out = bind_to_config(store, cfg.classes)
    infos = store.classes()
    total = sum(c.count for c in infos)
    loose = [c.name for c in infos if c.button is None]
    note = f"imported {total} samples in {sum(1 for c in infos if c.count)} classes"
    if loose:
        note += (f"; not in the config, so without button or LED: {', '.join(loose)} "
                 f"(add them to config.yaml's classes to wire them)")
    if left_out:
        note += (f"; the buttons of {', '.join(left_out)} have no class now: the box knows "
                 f"{rules.MAX_CLASSES} classes, the most, or another button's class has that name "
                 f"(remove or rename one to give them back)")
    log.info("%s", note)
    return note


# --- composition root ----------------------------------------------------------------------------


def serve(cfg, simulate: Optional[bool] = None, terminal: bool = False) -> int:
    """Build everything from the config, run the box until SIGTERM/SIGINT, release it all.

    One ExitStack owns every resource, so a failure half-way through start-up still closes
    what was opened, in reverse order.
    """
    import os
    import signal

    from edge.camera import make_camera
    from edge.panel import gpio_available, mock_pins

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning("running as root: a box should run as its own user (see docs/install.md)")
    if simulate is None:
        simulate = not gpio_available()
        if simulate:
            log.warning("no GPIO found: running simulated (mock pins)")
    pins = mock_pins() if simulate else None     # None: gpiozero's default factory (real pins)

    with contextlib.ExitStack() as stack:
        try:
            engine = Embedder(cfg.model.model_path, threads=cfg.model.threads, kernels=cfg.model.kernels,
                              mirror=cfg.camera.mirror)
        except ModelError as exc:
            return _show_fault_until_stopped(cfg, "model", exc, pins)
        store = Store(cfg.store.path, engine.model_id, engine.dim, max_per_class=cfg.capture.max_per_class,
                      thumbnails=cfg.store.thumbnails)
        try:
            store.open()
        except StoreError as exc:
            return _show_fault_until_stopped(cfg, "storage", exc, pins)
        stack.callback(store.close)
        notifier = Notifier()
        stack.callback(notifier.close)
        stack.callback(notifier.stopping)

        commands: "queue.Queue" = queue.Queue()     # first: every part that sends gets its put
        outputs: List[Outputs] = []
        link = None
        if cfg.mqtt.enabled:
            from edge.mqtt import MqttLink
            link = MqttLink(cfg.mqtt, cfg.device_id, commands.put, frame_source=cfg.camera.source == "mqtt",
                            frame_size=engine.size)
            outputs.append(link)
        page = None
        if cfg.web.enabled:     # the web page (edge/web.py): its own thread; Requests in, Outputs back
            from edge.web import WebServer
            page = WebServer(cfg.web, commands.put, device_id=cfg.device_id,
                             max_upload=transfer.import_limit(store))
            outputs.append(page)
        camera = link.camera if link is not None and link.camera is not None else \
            make_camera(cfg.camera, demo_folder=_demo_folder(), model_size=engine.size)
        stack.callback(camera.close)
        panel = Panel(cfg.classes, cfg.function_button, cfg.status_led, send=commands.put, pwm=cfg.led_pwm,
                      pin_factory=pins)
        stack.callback(panel.close)
        box = Box(cfg, engine, store, camera, panel, commands, notifier=notifier, outputs=outputs)
        log.info("edge %s: model %s (%s), camera %s, classes %s, store %s", __version__,
                 engine.path.name, engine.info.backend, camera.name, ", ".join(box.classes), cfg.store.path)
        if link is not None:
            link.start()
            stack.callback(link.close)
        if page is not None and page.start():
            stack.callback(page.close)
        if terminal:
            from edge.sim import Terminal
            sim = Terminal(box, panel, camera)
            box.outputs.append(sim)     # before run(): it listens like the web page does
            sim.start()
            stack.callback(sim.close)

        def on_signal(signum, _frame):
            log.info("stopping (%s)", signal.Signals(signum).name)
            notifier.stopping()
            box.stop()

        def on_hangup(_signum, _frame):
            log.info("SIGHUP: the box does not reload its config; restart it to apply changes "
                     "(sudo systemctl restart edge)")

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
        stack.callback(lambda: [signal.signal(s, h) for s, h in previous.items()])
        box.run()
        log.info("stopped cleanly")
    return 0


def _show_fault_until_stopped(cfg, code: str, exc: Exception, pins=None) -> int:
    """A box without a screen shows a fatal fault on its status LED instead of just exiting
    (systemd would only restart it into the same fault). Exits 1 when stopped."""
    import signal

    log.error("%s", exc)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: None)
    panel = Panel(cfg.classes, cfg.function_button, cfg.status_led, send=lambda _item: None,
                  pin_factory=pins)
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


def _spread_or_none(engine: Embedder) -> Optional[np.ndarray]:
    """The model's spread prior. The head only chooses a little less well without it, so a
    broken file is a warning, never a box that will not start (a broken reference mean is)."""
    try:
        return load_spread(engine.path, engine.dim)
    except ModelError as exc:
        log.warning("%s: choosing without it", exc)
        return None
