"""Settings: frozen dataclasses loaded from config.yaml and strictly validated.

Every problem with a config file is a ConfigError whose message is one line naming the file, the
key path and the bad value, for example
``config.yaml: camera.fps: expected a number > 0, got 'fast'``. Nothing a teacher can put in the
file (a typo, a wrong type, binary garbage) produces a traceback. docs/config.md documents every key.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import math
import os
import re
import reprlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

from edge.engine import KERNELS, MODELS_DIR, VARIANTS
from edge import rules
from edge.head import HEADS

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"

CAMERA_SOURCES = ("auto", "picamera2", "webcam", "folder", "mqtt")
MAX_CLASSES = rules.MAX_CLASSES
MAX_NAME = rules.MAX_NAME
MAX_FILE_BYTES = 1 << 20  # a config file is a few kB; anything bigger is the wrong file
MAX_SECRET_BYTES = 4096


class ConfigError(ValueError):
    """A bad setting. The message is always one line: `file: key.path: what is wrong, got value`.

    A file with several bad settings gives one ConfigError listing them all in `errors` (one line
    each, in the order they appear in the file); its message is the first of them.
    """

    def __init__(self, message: str, errors: Optional[list] = None):
        lines = [" ".join(str(line).splitlines()) for line in (errors or [message])]
        super().__init__(lines[0] if errors else " ".join(str(message).splitlines()))
        self.errors = lines


# --- pins ---------------------------------------------------------------------------------------

# Physical pin of the 40-pin header (J8, "BOARD" numbering) -> BCM GPIO number.
BOARD_TO_BCM = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10,
    21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19,
    36: 16, 37: 26, 38: 20, 40: 21,
}
BOARD_POWER = {1: "a 3.3V power pin", 17: "a 3.3V power pin", 2: "a 5V power pin", 4: "a 5V power pin",
               6: "a ground pin", 9: "a ground pin", 14: "a ground pin", 20: "a ground pin",
               25: "a ground pin", 30: "a ground pin", 34: "a ground pin", 39: "a ground pin"}
_PIN_RE = re.compile(r"(GPIO|BCM|BOARD|J8:)?(0|[1-9][0-9]?)")
_PIN_HELP = "use GPIO17, BCM17, 17, BOARD11 or J8:11"


def normalize_pin(value: Any) -> int:
    """The BCM GPIO number of a gpiozero-style pin name: GPIO17, BCM17, 17, BOARD11 or J8:11.

    Names are case-insensitive. Raises ValueError (one line) for anything that is not a GPIO pin
    of the 40-pin header, including power and ground pins.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a pin name ({_PIN_HELP}), got {_show(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 27:
            raise ValueError(f"pin {_show(value)} is out of range (BCM GPIO numbers are 0..27)")
        return value
    match = _PIN_RE.fullmatch(value.strip().upper())
    if match is None:
        raise ValueError(f"{_show(value)} is not a pin name ({_PIN_HELP})")
    prefix, number = match.group(1), int(match.group(2))
    if prefix in ("BOARD", "J8:"):
        if number in BOARD_POWER:
            raise ValueError(f"{_show(value)} is {BOARD_POWER[number]}, not a GPIO")
        if number not in BOARD_TO_BCM:
            raise ValueError(f"{_show(value)} is out of range (header pins are 1..40)")
        return BOARD_TO_BCM[number]
    if number > 27:
        raise ValueError(f"{_show(value)} is out of range (BCM GPIO numbers are 0..27)")
    return number


# --- the settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassConfig:
    """One class the box can learn: its name, its teach button and its LED."""

    name: str
    """Shown in logs and MQTT messages; unique (ignoring case), 1..32 letters, digits, space, _ or -."""
    button: Optional[str] = None
    """Pin of the button held to teach this class (None: trainable over MQTT only)."""
    led: Optional[str] = None
    """Pin of the LED that lights when this class is recognised (None: no LED)."""
    nothing: bool = False
    """A "nothing" class (the empty table, hands, the room): taught like any other, it lights
    no LED and answers unknown, so what looks like it stops lighting other LEDs."""


def _default_classes() -> Tuple[ClassConfig, ...]:
    return (ClassConfig("A", "GPIO17", "GPIO27"),
            ClassConfig("B", "GPIO22", "GPIO23"),
            ClassConfig("C", "GPIO5", "GPIO6"))


@dataclass(frozen=True)
class CameraConfig:
    """Where frames come from and how many."""

    source: str = "auto"
    """auto (Pi camera, else webcam, else a folder), picamera2, webcam, folder or mqtt."""
    folder: Optional[Path] = None
    """Images to replay for the folder source (None: the app's demo pictures)."""
    device: int = 0
    """Webcam index (/dev/video0 is 0), for boxes with a USB camera."""
    width: int = 640
    """Capture width in pixels; the engine crops and scales down, so more only costs time."""
    height: int = 480
    """Capture height in pixels."""
    fps: float = 10.0
    """Frames per second to grab; caps CPU use (the Pi also runs the model on every frame)."""
    mirror: bool = False
    """Flip images left-right, for a camera facing the user like a mirror."""


@dataclass(frozen=True)
class ModelConfig:
    """Which embedding model runs and how."""

    variant: str = "224"
    """Input size of the bundled MobileNetV2: 224 (best), 160 or 128 (faster on a Pi Zero)."""
    path: Optional[Path] = None
    """A different .tflite image model; overrides variant."""
    threads: Optional[int] = None
    """Interpreter threads (None: all cores); lower it to leave CPU for other programs."""
    kernels: str = "auto"
    """LiteRT kernel set: auto, builtin, or reference (slow but safe under emulation)."""

    @property
    def model_path(self) -> Path:
        """The model file to load: `path` if given, else the bundled file of `variant`."""
        return self.path if self.path is not None else MODELS_DIR / VARIANTS[self.variant]


@dataclass(frozen=True)
class HeadConfig:
    """How embeddings become a class: the head, the unknown threshold and smoothing."""

    kind: str = "centroid"
    """centroid (mean of each class) or knn (k nearest samples); knn copes with varied classes."""
    k: int = 3
    """Neighbours per class for knn."""
    threshold: Union[str, float] = "auto"
    """Cosine score below which the answer is 'unknown'; "auto" derives it from the samples."""
    smoothing: int = 5
    """Frames in the vote window, so one odd frame does not flip the LEDs."""
    hysteresis: float = 0.03
    """Score margin needed to change the answer, so the LEDs do not flicker between two classes."""


MAX_PER_CLASS = 1000
"""The most samples a class may keep: 8 classes of 1,000 are 41 MB of embeddings (a Pi Zero 2 has
512 MB in all) and 8,000 samples, above the 5,000 the head's per-frame cost is measured at."""


@dataclass(frozen=True)
class CaptureConfig:
    """How samples are taken while a teach button is held."""

    rate: float = 6.0
    """Samples per second while a button is held."""
    max_per_class: int = 200
    """Samples kept per class; bounds memory and keeps learning fast on a Pi."""
    min_change: float = 0.02
    """Cosine distance below which a frame is a near-duplicate of the last sample and skipped."""


@dataclass(frozen=True)
class StoreConfig:
    """Where learned samples are kept across restarts."""

    path: Path = Path("var/store")
    """Folder of the saved samples (relative paths resolve against the config file's folder)."""
    thumbnails: bool = True
    """Keep a small JPEG of every sample (the web page's gallery); never exported unless asked."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the MQTT connection; on when a CA or client certificate is given."""

    ca: Optional[Path] = None
    """CA certificate file the broker's certificate is checked against."""
    cert: Optional[Path] = None
    """Client certificate file, for brokers that authenticate clients by certificate."""
    key: Optional[Path] = None
    """Private key of the client certificate (if not inside the cert file)."""
    insecure: bool = False
    """Skip the broker hostname check (self-signed test brokers only)."""

    @property
    def enabled(self) -> bool:
        return self.ca is not None or self.cert is not None


@dataclass(frozen=True)
class MqttConfig:
    """The optional MQTT link: predictions out, commands and training in, Home Assistant discovery."""

    enabled: bool = False
    """Connect to a broker at all; the box works fully without one."""
    host: str = "localhost"
    """Broker host name or IP address."""
    port: int = 1883
    """Broker port: 1883 plain, usually 8883 with TLS."""
    client_id: Optional[str] = None
    """MQTT client id (None: chosen by the app); must be unique on the broker."""
    prefix: Optional[str] = None
    """Topic prefix of this box (edge/<device_id> after loading), so many boxes share a broker."""
    username: Optional[str] = None
    """Broker user name (None: anonymous)."""
    password: Optional[str] = field(default=None, repr=False)
    """Broker password after loading (from password, password_env or password_file); never logged."""
    password_env: Optional[str] = None
    """Name of an environment variable holding the password, to keep it out of this file."""
    password_file: Optional[str] = None
    """File holding the password (e.g. a systemd credential), read at load."""
    tls: TlsConfig = TlsConfig()
    """TLS settings."""
    keepalive: int = 30
    """Seconds between keepalive pings; how fast a dead connection is noticed."""
    rate: float = 5.0
    """Most predictions published per second, to spare the broker and the network."""
    max_queue: int = 100
    """Messages buffered while the broker is away; older ones are dropped beyond this."""
    homeassistant: bool = False
    """Publish Home Assistant discovery so the box appears there as a device by itself."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery topic prefix."""


@dataclass(frozen=True)
class WebConfig:
    """The box's own web page (docs/web.md): live view, teaching, gallery, Scratch over WebSocket."""

    enabled: bool = True
    """Serve the page at all; the box works fully without it."""
    host: str = "0.0.0.0"
    """Address to listen on: 0.0.0.0 for every network of the box, 127.0.0.1 for this computer only."""
    port: int = 8080
    """TCP port of the page (http://<box>:8080/)."""
    pin: Optional[str] = field(default=None, repr=False)
    """PIN every change needs (teach, delete, clear, import, rename, threshold); None: anyone may."""


def _default_device_id() -> str:
    """The host name, lower-cased and cut to [a-z0-9-] (first label only); "edge" if nothing is left."""
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    name = re.sub(r"[^a-z0-9-]+", "-", host.split(".")[0].lower()).strip("-")[:63].strip("-")
    return name or "edge"


@dataclass(frozen=True)
class Config:
    """All settings of a box. Build with load_config() or parse_config(), which validate."""

    device_id: str = field(default_factory=_default_device_id)
    """Names this box in MQTT topics and Home Assistant; defaults to the host name."""
    classes: Tuple[ClassConfig, ...] = field(default_factory=_default_classes)
    """The classes, in button order (1..8)."""
    function_button: Optional[str] = "GPIO26"
    """Pin of the function button (undo, clear, save); None: no function button."""
    status_led: Optional[str] = "GPIO16"
    """Pin of the status LED (steady: running, blink codes: faults); None: no status LED."""
    led_pwm: bool = False
    """Drive class LEDs with PWM so brightness can show confidence; false: plain on/off."""
    camera: CameraConfig = CameraConfig()
    model: ModelConfig = ModelConfig()
    head: HeadConfig = HeadConfig()
    capture: CaptureConfig = CaptureConfig()
    store: StoreConfig = StoreConfig()
    mqtt: MqttConfig = MqttConfig()
    web: WebConfig = WebConfig()
    source: str = "defaults"
    """Name of the file the settings came from, for messages."""

    def public_dict(self) -> Dict[str, Any]:
        """The settings as a JSON-able dict without the MQTT password (for logs and MQTT state)."""
        data = _jsonable(dataclasses.asdict(self))
        data["mqtt"].pop("password", None)
        data["web"].pop("pin", None)
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- loading --------------------------------------------------------------------------------------

def load_config(path: Union[str, Path, None] = None, secrets: bool = True) -> Config:
    """Settings from a YAML file (None: the built-in defaults, no file). Raises ConfigError.

    `secrets=False` skips reading the MQTT password (env var or file): for commands that do not
    connect, such as `edge export` run while the service (and its credential) is stopped.
    """
    if path is None:
        return parse_config({}, source="defaults", base=Path.cwd(), secrets=secrets)
    path = Path(path)
    name = path.name or str(path)
    try:
        path = path.resolve()
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{name}: file not found: {path}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {_os_reason(exc)}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: file is larger than {MAX_FILE_BYTES // 1024} kB; is it a config file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not a text file (invalid UTF-8 at byte {exc.start})") from None
    data = _load_yaml(text, name)
    if data is None:
        raise ConfigError(f"{name}: the file is empty (expected settings such as 'classes:')")
    return parse_config(data, source=name, base=path.parent, secrets=secrets)


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice is an error, and a value PyYAML cannot
    build (a date like 2023-13-45, !!int x) is a YAML error with a line number, not a ValueError."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key_node.value)}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            shown = _show(node.value) if isinstance(node, yaml.ScalarNode) else "value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown}: {exc} (put it in quotes if it is meant as text)",
                node.start_mark) from None


# Numbers as people (and YAML 1.2) write them. YAML 1.1, PyYAML's, reads 010 as 8, 0x11, 0b10001
# and 1_7 as 17 and 1:30 as 90 (a button written 010 became GPIO8, an SPI pin), and 1e-2 as text:
# here an integer is plain decimal digits (anything else stays text, so a pin 010 is refused),
# a float has a point or an exponent.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(0|[1-9][0-9]*)$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
                       r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"), list("-+0123456789."))


def _load_yaml(text: str, name: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark and exc.context_mark is not mark:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(f"{name}: YAML error: {where}{problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = f" #x{exc.character:04x}" if isinstance(exc.character, int) else ""
        raise ConfigError(f"{name}: YAML error: line {line}: unacceptable character{char} "
                          f"(is this a text file?)") from None
    except RecursionError:
        raise ConfigError(f"{name}: YAML error: nesting is too deep") from None
    except Exception as exc:  # PyYAML has a few more ways to fail; none may become a traceback
        raise ConfigError(f"{name}: YAML error: {type(exc).__name__}: {exc}") from None


def parse_config(data: dict, source: str = "config", base: Optional[Path] = None,
                 secrets: bool = True) -> Config:
    """Validated settings from already-parsed YAML. Relative paths resolve against `base`
    (default: the current folder). Raises ConfigError naming `source` and the key path; with
    several bad settings, all of them, in the order of the file (ConfigError.errors)."""
    base = Path.cwd() if base is None else Path(base)
    found: List[_Invalid] = []
    token = _FOUND.set(found)
    try:
        config = _parse(data, source, base, secrets)
    except _Invalid as exc:
        if not isinstance(exc, _Stop):
            found.append(exc)
        config = None
    finally:
        _FOUND.reset(token)
    if found:
        order = _positions(data)
        ranked = sorted(enumerate(found), key=lambda item: (_position(order, item[1].at), item[0]))
        lines = [(f"{source}: {exc.path}: " if exc.path else f"{source}: ") + exc.message
                 for _, exc in ranked]
        raise ConfigError(lines[0], errors=list(dict.fromkeys(lines)))
    return config


class _Invalid(Exception):
    """Internal: a bad value at a key path; parse_config turns it into a ConfigError. `at` is
    where it sits in the file when that differs from `path` (an unknown key of a section)."""

    def __init__(self, path: str, message: str, at: Optional[str] = None):
        super().__init__(message)
        self.path, self.message = path, message
        self.at = path if at is None else at


class _Stop(_Invalid):
    """A section whose problems are already recorded: use the fallback, record nothing more."""

    def __init__(self):
        super().__init__("", "")


# The problems found so far while one parse_config runs: each section is checked on after a bad
# value (with that setting's default), so one run reports every bad setting, not just the first.
_FOUND: "contextvars.ContextVar[List[_Invalid]]" = contextvars.ContextVar("edge_config_found")


def _note(exc: _Invalid) -> None:
    """Record a problem and carry on (outside parse_config: raise it)."""
    if isinstance(exc, _Stop):
        return
    found = _FOUND.get(None)
    if found is None:
        raise exc
    found.append(exc)


def _checked(fallback, step: Callable[[], Any]):
    """step(), or `fallback` after recording the problem it raised."""
    try:
        return step()
    except _Invalid as exc:
        _note(exc)
        return fallback


def _positions(data: Any) -> Dict[str, int]:
    """Key path -> its rank in the file: the parsed YAML keeps the file's order of keys."""
    order: Dict[str, int] = {}
    seen = set()

    def walk(value: Any, path: str) -> None:
        if isinstance(value, (dict, list)):
            if id(value) in seen:   # an alias: its keys were ranked where it was first written
                return              # (walking every alias of aliases expands a "billion laughs")
            seen.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                sub = _join(path, str(key))
                order.setdefault(sub, len(order))
                walk(item, sub)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                sub = f"{path}[{i}]"
                order.setdefault(sub, len(order))
                walk(item, sub)

    try:
        walk(data, "")
    except RecursionError:
        pass
    return order


def _position(order: Dict[str, int], path: str) -> int:
    """The rank of a key path in the file, or of its nearest parent there (a key the file does
    not have, such as the model.variant of a missing model file, sorts with its section)."""
    probe = path
    while probe:
        if probe in order:
            return order[probe]
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
        probe = "" if parent == probe else parent
    return -1 if not path else len(order)


def _noted(*paths: str) -> bool:
    """Whether a problem was recorded at one of these key paths (or inside them)."""
    return any(e.path == p or e.path.startswith(p + ".") or e.path.startswith(p + "[")
               for e in _FOUND.get([]) for p in paths)


# --- value checkers: each takes (key path, value) and returns the clean value or raises _Invalid ---

class _ShortRepr(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlevel, self.maxlist, self.maxdict, self.maxset = 2, 4, 4, 4

    def repr_int(self, x, level):
        return "<a very large number>" if x.bit_length() > 128 else super().repr_int(x, level)


_REPR = _ShortRepr()


def _show(value: Any) -> str:
    """A value as the teacher would recognise it, short and on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping" if value else "{}"
    if isinstance(value, list) and value:
        return "a list"
    if isinstance(value, datetime.date):            # YAML's 2001-12-14, as written
        return f"{value.isoformat()!r} (a date)"
    if isinstance(value, bytes):                    # YAML's !!binary
        return "'binary data' (not text)"
    return _REPR.repr(value)


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


Checker = Callable[[str, Any], Any]


def _expected(path: str, what: str, value: Any) -> _Invalid:
    return _Invalid(path, f"expected {what}, got {_show(value)}")


def _boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected(path, "true or false", value)
    return value


def _integer(lo: int, hi: Optional[int] = None) -> Checker:
    what = f"an integer >= {lo}" if hi is None else f"an integer between {lo} and {hi}"

    def check(path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, what, value)
        if value < lo or (hi is not None and value > hi):
            raise _expected(path, what, value)
        return value
    return check


def _number(lo: float, hi: Optional[float] = None, lo_open: bool = False) -> Checker:
    """A finite int or float with lo < value (lo_open) or lo <= value, and value <= hi."""
    low = f"> {lo:g}" if lo_open else f">= {lo:g}"
    if hi is None:
        what = f"a number {low}"
    elif lo_open:
        what = f"a number {low} and <= {hi:g}"
    else:
        what = f"a number between {lo:g} and {hi:g}"

    def check(path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected(path, what, value)
        try:
            number = float(value)
        except OverflowError:
            raise _expected(path, what, value) from None
        if not math.isfinite(number) or number < lo or (lo_open and number == lo) or (hi is not None and number > hi):
            raise _expected(path, what, value)
        return number
    return check


def _string(path: str, value: Any, secret: bool = False) -> str:
    """A non-empty string. Numbers and booleans are refused with a hint to quote them."""
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid(path, "must not be empty")
        return value
    if secret:  # say what kind of value it is, never the value
        kind = "true or false" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) \
            else "something else"
        raise _Invalid(path, f"expected text, got {kind} (put the password in quotes)")
    if isinstance(value, (bool, int, float, datetime.date)):
        raise _Invalid(path, f"expected text, got {_show(value)} (put it in quotes if it is meant as text)")
    raise _expected(path, "text", value)


def _choice(options) -> Checker:
    options = tuple(options)

    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise _expected(path, f"one of {', '.join(options)}", value)
        return value
    return check


def _optional(check: Checker) -> Checker:
    return lambda path, value: None if value is None else check(path, value)


def _pin(path: str, value: Any) -> Optional[str]:
    """A pin as written (upper-cased, so gpiozero accepts it); an int 17 becomes "GPIO17"."""
    if value is None:
        return None
    try:
        number = normalize_pin(value)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from None
    return f"GPIO{number}" if isinstance(value, int) else value.strip().upper()


def _variant(path: str, value: Any) -> str:
    """"224", or the number 224 as YAML reads an unquoted 224."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or text not in VARIANTS:
        raise _expected(path, f"one of {', '.join(VARIANTS)}", value)
    return text


def _threshold(path: str, value: Any) -> Union[str, float]:
    try:
        return rules.threshold(value)
    except rules.RuleError:
        raise _expected(path, "'auto' or a number between -1 and 1", value) from None


def _pin_code(path: str, value: Any) -> str:
    """The web PIN: 4 to 32 digits or letters, in quotes. A bare number is refused because YAML
    reads 0123 as 83 and 1e3 as text. Never shown in messages."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise _Invalid(path, 'put the PIN in quotes, e.g. pin: "1234"')
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]{4,32}", value):
        raise _Invalid(path, "expected 4 to 32 digits or letters, in quotes")
    return value


def _device_id(path: str, value: Any) -> str:
    value = _string(path, value)
    if not re.fullmatch(r"[a-z0-9-]{1,63}", value):
        raise _expected(path, "lowercase letters, digits and '-' (1 to 63 of them)", value)
    return value


def _topic(path: str, value: Any) -> str:
    value = _string(path, value)
    if "+" in value or "#" in value or value.startswith("/") or value.endswith("/") or "\0" in value:
        raise _expected(path, "an MQTT topic without +, # or a leading or trailing /", value)
    return value


def _host(path: str, value: Any) -> str:
    value = _string(path, value)
    if any(c.isspace() for c in value):
        raise _expected(path, "a host name or IP address without spaces", value)
    if "://" in value:
        raise _expected(path, "a host name or IP address, without a scheme such as mqtt://", value)
    if value.count(":") == 1 or value.startswith("["):   # an IPv6 address has several colons
        raise _expected(path, f"a host name or IP address, without a port (put the port in "
                              f"{path.rsplit('.', 1)[0]}.port)", value)
    return value


def _path_text(path: str, value: Any) -> str:
    value = _string(path, value)
    if "\0" in value:
        raise _expected(path, "a file path", value)
    return value


# --- sections: key -> checker, in the order of the dataclass fields (and of messages) -------------

TOP = {
    "device_id": _optional(_device_id),
    "classes": None,  # a list, checked by _classes
    "function_button": _pin,
    "status_led": _pin,
    "led_pwm": _boolean,
    "camera": None, "model": None, "head": None, "capture": None, "store": None, "mqtt": None,
    "web": None,
}
CLASS = {"name": _string, "button": _pin, "led": _pin, "nothing": _boolean}
CAMERA = {
    "source": _choice(CAMERA_SOURCES),
    "folder": _optional(_path_text),
    "device": _integer(0, 63),
    "width": _integer(16, 4096),
    "height": _integer(16, 4096),
    "fps": _number(1, 120),      # below 1 a command waited a whole frame period (and the watchdog)
    "mirror": _boolean,
}
MODEL = {
    "variant": _variant,
    "path": _optional(_path_text),
    "threads": _optional(_integer(1, 64)),
    "kernels": _choice(KERNELS),
}
HEAD = {
    "kind": _choice(HEADS),
    "k": _integer(1, 100),
    "threshold": _threshold,
    "smoothing": _integer(1, 300),
    "hysteresis": _number(0),
}
CAPTURE = {
    "rate": _number(0.1, 30),
    "max_per_class": _integer(1, MAX_PER_CLASS),
    "min_change": _number(0, 1),
}
STORE = {"path": _path_text, "thumbnails": _boolean}
TLS = {"ca": _optional(_path_text), "cert": _optional(_path_text), "key": _optional(_path_text),
       "insecure": _boolean}
MQTT = {
    "enabled": _boolean,
    "host": _host,
    "port": _integer(1, 65535),
    "client_id": _optional(_string),
    "prefix": _optional(_topic),
    "username": _optional(_string),
    "password": _optional(lambda path, value: _string(path, value, secret=True)),
    "password_env": _optional(_string),
    "password_file": _optional(_path_text),
    "tls": None,  # a section, checked by _mqtt
    "keepalive": _integer(5, 3600),
    "rate": _number(0.01, 1000),
    "max_queue": _integer(1, 100000),
    "homeassistant": _boolean,
    "discovery_prefix": _topic,
}

WEB = {
    "enabled": _boolean,
    "host": _host,
    "port": _integer(1, 65535),
    "pin": _optional(lambda path, value: _pin_code(path, value)),
}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(path: str, value: Any, spec: Dict[str, Optional[Checker]]) -> Dict[str, Any]:
    """Check a section: a mapping (or null for all defaults) with only known keys.

    Returns the checked values of the keys present; keys whose checker is None are passed through
    raw for the caller to check."""
    if value is None and path:
        return {}
    if not isinstance(value, dict):
        where = "" if path else " at the top level"
        raise _Invalid(path, f"expected a mapping of settings{where}, got {_show(value)}")
    for key in value:
        if not isinstance(key, str) or key not in spec:
            _note(_Invalid(path, f"unknown key {_show(key)} (known: {', '.join(spec)})",
                           at=_join(path, str(key))))
    checked: Dict[str, Any] = {}
    for key, check in spec.items():
        if key in value:
            if check is None:
                checked[key] = value[key]
                continue
            try:
                checked[key] = check(_join(path, key), value[key])
            except _Invalid as exc:
                _note(exc)          # left out: the setting's default stands in for it
    return checked


def _resolve(text: str, base: Path) -> Path:
    """A path from the file: ~ expanded, relative paths taken from `base` (the file's folder)."""
    try:
        return base / Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist, or no home folder
        return base / text


def _file(path: str, text: str, base: Path, folder: bool = False) -> Path:
    """`text` as an absolute path that must be an existing file (or folder)."""
    resolved = _resolve(text, base)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    try:
        found = resolved.is_dir() if folder else resolved.is_file()
        wrong = not found and (resolved.is_file() if folder else resolved.is_dir())
    except (OSError, ValueError):  # a name too long for the file system, say
        found = wrong = False
    if wrong:
        raise _Invalid(path, f"expected a {kind}, but {resolved} is a {other}")
    if not found:
        raise _Invalid(path, f"{kind} not found: {resolved}")
    return resolved


def _no_file_in_the_way(path: str, folder: Path) -> None:
    """A folder the box makes when missing (the store): refused only when it, or the nearest
    part of it that exists, is a file (the box would start into a storage fault)."""
    try:
        nearest = next(part for part in (folder, *folder.parents) if part.exists())
        in_the_way = not nearest.is_dir()
    except (OSError, ValueError):   # unreadable or a name too long: the box says so at start
        return
    if in_the_way:
        raise _Invalid(path, f"expected a folder, but {nearest} is a file")


def _parse(data: Any, source: str, base: Path, secrets: bool = True) -> Config:
    """Check every section; a bad one is recorded (_note) and replaced by its defaults so the
    others are still checked. Raises only when the whole file is unusable."""
    if data is None:
        raise _Invalid("", "no settings (expected a mapping such as 'classes:' at the top level)")
    top = _mapping("", data, TOP)
    device_id = top.get("device_id") or _default_device_id()
    classes = _checked(None, lambda: _classes(top["classes"])) if "classes" in top else _default_classes()
    function_button = top.get("function_button", Config.function_button)
    status_led = top.get("status_led", Config.status_led)
    if classes is not None and not _noted("function_button", "status_led"):
        _checked(None, lambda: _check_pins(classes, function_button, status_led))
    if classes is None:
        classes = _default_classes()

    def section(name: str, spec: Dict[str, Optional[Checker]]) -> Dict[str, Any]:
        return _checked({}, lambda: _mapping(name, top.get(name), spec))

    camera = CameraConfig(**section("camera", CAMERA))
    if camera.folder is not None:
        folder = _checked(None, lambda: _file("camera.folder", camera.folder, base, folder=True))
        camera = dataclasses.replace(camera, folder=folder)

    model = ModelConfig(**section("model", MODEL))
    if model.path is not None:
        model = dataclasses.replace(model, path=_checked(None, lambda: _file("model.path", model.path, base)))
    elif not _noted("model") and not _is_file(model.model_path):
        _note(_Invalid("model.variant", f"model file not found: {model.model_path} "
                                        f"(build it with tools/build_model.py, or set model.path)"))

    store = section("store", STORE)
    store["path"] = _resolve(store.get("path", "var/store"), base)
    _checked(None, lambda: _no_file_in_the_way("store.path", store["path"]))

    mqtt = _checked(None, lambda: _mqtt(top.get("mqtt"), device_id, base, secrets))
    if camera.source == "mqtt" and mqtt is not None and not mqtt.enabled and not _noted("mqtt.enabled"):
        _note(_Invalid("camera.source", "'mqtt' needs mqtt.enabled: true (frames arrive over MQTT)"))
    return Config(
        device_id=device_id,
        classes=classes,
        function_button=function_button,
        status_led=status_led,
        led_pwm=top.get("led_pwm", False),
        camera=camera,
        model=model,
        head=HeadConfig(**section("head", HEAD)),
        capture=CaptureConfig(**section("capture", CAPTURE)),
        store=StoreConfig(**store),
        mqtt=mqtt if mqtt is not None else MqttConfig(prefix=f"edge/{device_id}"),
        web=WebConfig(**section("web", WEB)),
        source=source,
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _classes(value: Any) -> Tuple[ClassConfig, ...]:
    if not isinstance(value, list):
        raise _expected("classes", f"a list of 1 to {MAX_CLASSES} classes", value)
    if not 1 <= len(value) <= MAX_CLASSES:
        raise _Invalid("classes", f"expected 1 to {MAX_CLASSES} classes, got {len(value)}")
    classes, seen, bad = [], {}, False
    for i, item in enumerate(value):
        path = f"classes[{i}]"
        try:
            if not isinstance(item, dict):
                raise _expected(path, "a mapping with name, button and led", item)
            found = len(_FOUND.get([]))
            checked = _mapping(path, item, CLASS)
            if len(_FOUND.get([])) > found:
                bad = True
            if "name" not in checked:
                if not any(e.path == f"{path}.name" for e in _FOUND.get([])):
                    raise _Invalid(path, "missing key 'name'")
                continue
            name = checked["name"] = _class_name(f"{path}.name", checked["name"])    # as the store keeps it (NFC)
            folded = name.casefold()
            if folded in seen:
                raise _Invalid(f"{path}.name", f"class name {_show(name)} is already used by {seen[folded]}.name "
                                               f"(names are compared ignoring case)")
            seen[folded] = path
            classes.append(ClassConfig(**checked))
        except _Invalid as exc:
            _note(exc)
            bad = True
    if bad:
        raise _Stop()
    return tuple(classes)


def _class_name(path: str, name: str) -> str:
    try:
        return rules.class_name(name)
    except rules.RuleError as exc:
        raise _Invalid(path, str(exc)) from None


def _check_pins(classes, function_button: Optional[str], status_led: Optional[str]) -> None:
    """A pin may be used once across buttons, LEDs, the function button and the status LED."""
    used: Dict[int, str] = {}
    wiring = []
    for i, cls in enumerate(classes):
        wiring += [(f"classes[{i}].button", cls.button), (f"classes[{i}].led", cls.led)]
    wiring += [("function_button", function_button), ("status_led", status_led)]
    for path, pin in wiring:
        if pin is None:
            continue
        number = normalize_pin(pin)
        if number in used:
            shown = _show(pin) if pin == f"GPIO{number}" else f"{_show(pin)} (GPIO{number})"
            raise _Invalid(path, f"pin {shown} is already used by {used[number]}")
        used[number] = path


def _mqtt(value: Any, device_id: str, base: Path, secrets: bool = True) -> MqttConfig:
    mqtt = _mapping("mqtt", value, MQTT)
    tls = _mapping("mqtt.tls", mqtt.pop("tls", None), TLS)
    for key in ("ca", "cert", "key"):
        if tls.get(key) is not None:
            tls[key] = _file(f"mqtt.tls.{key}", tls[key], base)
    if tls.get("key") is not None and tls.get("cert") is None:
        raise _Invalid("mqtt.tls.key", "a key needs mqtt.tls.cert (the client certificate) too")
    if tls.get("insecure") and tls.get("ca") is None and tls.get("cert") is None:
        raise _Invalid("mqtt.tls.insecure", "TLS is off (set mqtt.tls.ca or mqtt.tls.cert to turn it on)")
    mqtt["tls"] = TlsConfig(**tls)

    sources = [key for key in ("password", "password_env", "password_file") if mqtt.get(key) is not None]
    if len(sources) > 1:
        raise _Invalid(f"mqtt.{sources[1]}", f"give only one of password, password_env and password_file "
                                             f"(also set: mqtt.{sources[0]})")
    if not secrets:
        pass
    elif "password_env" in sources:
        name = mqtt["password_env"]
        if name not in os.environ:
            raise _Invalid("mqtt.password_env", f"environment variable {_show(name)} is not set")
        mqtt["password"] = os.environ[name]
    elif "password_file" in sources:
        mqtt["password"] = _read_secret("mqtt.password_file", mqtt["password_file"], base)
    if sources and mqtt.get("username") is None:
        raise _Invalid(f"mqtt.{sources[0]}", "a password needs mqtt.username too")

    if mqtt.get("prefix") is None:
        mqtt["prefix"] = f"edge/{device_id}"
    return MqttConfig(**mqtt)


def _read_secret(path: str, text: str, base: Path) -> str:
    """The contents of a password file without its trailing newline; never shown in messages."""
    target = _resolve(text, base)
    try:
        with open(target, "rb") as handle:
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise _Invalid(path, f"file not found: {target}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise _Invalid(path, f"cannot read {target}: {_os_reason(exc)}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise _Invalid(path, f"{target} is larger than {MAX_SECRET_BYTES} bytes; is it a password file?")
    try:
        secret = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(path, f"{target} is not UTF-8 text") from None
    return secret.rstrip("\r\n")
