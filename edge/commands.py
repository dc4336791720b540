"""The one command model: every change to what the box knows is one of these, from any source.

MQTT (`<prefix>/cmd/<action>`), the web page and tests all turn what they receive into a
`Request` holding one typed command, using `decode` and `parse` here, so a payload means the same
thing wherever it arrives. Only the form is checked here (types, bounds, names by edge.rules);
what depends on the state (does the class exist?) is the box's loop to answer. The loop runs
each command as one store transaction and answers every request with one result dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Protocol, Tuple

from edge import rules

MAX_PAYLOAD = 4096
"""Bytes in one command payload at most (a command is a few dozen bytes)."""
MAX_DEPTH = 8
"""Nesting of JSON arrays/objects at most (a command needs 2)."""
MAX_ID = 128
MAX_LIST = 200
"""Samples listed per request at most."""
MAX_THUMBNAILS = 50
DEFAULT_RECORD_SECONDS = 3.0


class CommandInvalid(rules.RuleError):
    """A payload refused before it reaches the loop; the message is one line for the sender."""


# --- the commands -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    action: ClassVar[str] = ""
    changes: ClassVar[bool] = True     # False: only reads (anyone may send it; no PIN on the web)


@dataclass(frozen=True)
class Record(Command):
    """Record samples of a class: for `seconds`, or until `count` samples, or until StopRecording."""
    action: ClassVar[str] = "record"
    cls: str
    seconds: Optional[float] = None
    count: Optional[int] = None


@dataclass(frozen=True)
class StopRecording(Command):
    """End the recording; with a class, only a recording of that class (a page that closes must
    not end what Scratch or MQTT took over)."""
    action: ClassVar[str] = "record/stop"
    cls: Optional[str] = None


@dataclass(frozen=True)
class Undo(Command):
    """Remove the newest burst of samples still present."""
    action: ClassVar[str] = "undo"


@dataclass(frozen=True)
class Clear(Command):
    """Forget one class's samples (the class stays), or every class's when `cls` is None."""
    action: ClassVar[str] = "clear"
    cls: Optional[str]


@dataclass(frozen=True)
class Rename(Command):
    action: ClassVar[str] = "rename"
    old: str
    new: str


@dataclass(frozen=True)
class SetThreshold(Command):
    action: ClassVar[str] = "threshold"
    value: Any          # "auto" or a float in -1..1 (rules.threshold)


@dataclass(frozen=True)
class AddClass(Command):
    action: ClassVar[str] = "classes"
    name: str


@dataclass(frozen=True)
class RemoveClass(Command):
    action: ClassVar[str] = "classes"
    name: str


@dataclass(frozen=True)
class SetNothing(Command):
    """Mark a class as "nothing": taught like others, it lights no LED and answers unknown."""
    action: ClassVar[str] = "nothing"
    cls: str
    nothing: bool


@dataclass(frozen=True)
class State(Command):
    action: ClassVar[str] = "state"
    changes: ClassVar[bool] = False


@dataclass(frozen=True)
class ListSamples(Command):
    action: ClassVar[str] = "samples"
    changes: ClassVar[bool] = False
    cls: str
    limit: int = 50
    before: Optional[int] = None


@dataclass(frozen=True)
class DeleteSample(Command):
    action: ClassVar[str] = "sample/delete"
    id: int


@dataclass(frozen=True)
class DeleteBurst(Command):
    action: ClassVar[str] = "burst/delete"
    burst: int


@dataclass(frozen=True)
class Thumbnails(Command):
    action: ClassVar[str] = "thumbnails"
    changes: ClassVar[bool] = False
    ids: Tuple[int, ...]


@dataclass(frozen=True)
class Hints(Command):
    action: ClassVar[str] = "hints"
    changes: ClassVar[bool] = False


@dataclass(frozen=True)
class Export(Command):
    """The export file's bytes in the result's "data" (web download; not offered over MQTT)."""
    action: ClassVar[str] = "export"
    thumbnails: bool = False


@dataclass(frozen=True)
class Import(Command):
    """Replace what the box knows with an export file's content (web upload, CLI)."""
    action: ClassVar[str] = "import"
    data: bytes = b""


@dataclass
class Request:
    """One command on its way to the loop, with who sent it and where the answer goes.

    `reply` is called once, from the loop thread, with {"action", "ok", "error"?, "id"?, ...}.
    """
    command: Command
    source: str = "internal"
    id: Any = None
    reply: Optional[Callable[[dict], None]] = None


# --- what the loop sends out ---------------------------------------------------------------------

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
    again: bool = False     # the same frame answered anew after a change of classes: no new `prediction`


class Outputs(Protocol):
    """Where the box reports (MQTT, the web page, tests). Called from the loop thread only, and
    must return at once. An output may also define `preview(rgb)` to get the model's view, and
    `flush()`, called at the end of each turn of the loop: an output that serves from a thread
    of its own keeps the turn's decision and picture and wakes that thread there, once."""

    def decision(self, decision: Decision) -> None: ...

    def state(self, state: dict) -> None: ...

    def event(self, event: dict) -> None: ...


# --- payloads -----------------------------------------------------------------------------------

def _too_deep(text: str) -> bool:
    """True when JSON text nests deeper than MAX_DEPTH (checked before json.loads recurses)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def request_id(value: Any) -> Any:
    """A usable request id (short text or integer), else None."""
    if isinstance(value, str) and len(value) <= MAX_ID and _is_text(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63:
        return value
    return None


def _unique_keys(pairs) -> dict:
    """A JSON object whose keys are each given once: with {"class": "A", "class": "B"} the
    sender's meaning is unclear (JSON parsers keep the last), so it is refused, as config.yaml does."""
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} is given twice")
    return body


def decode(payload: bytes, max_bytes: int = MAX_PAYLOAD) -> Tuple[Any, Any]:
    """(body, id) of a payload: a dict for a JSON object, else a stripped text.

    A payload starting with `{` or `[` must be JSON, one starting with `"` a JSON string; any
    other text is taken as it is, so `0.7` or `shoes` work from tools that only send text.
    An empty payload is refused: on MQTT it is how a retained message is cleared, never a command.
    """
    if len(payload) > max_bytes:
        raise CommandInvalid(f"payload of {len(payload)} bytes is larger than {max_bytes} bytes")
    if not payload:
        raise CommandInvalid("empty payload ignored (an empty message only clears a retained one); "
                             "send {} or a value")
    try:
        # utf-8-sig: a byte-order mark some editors and tools put first is not part of the text
        text = bytes(payload).decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise CommandInvalid("payload is not UTF-8 text") from None
    if not text:
        raise CommandInvalid("blank payload ignored; send {} or a value")
    if text[0] not in '{["':
        return text, None
    if _too_deep(text):
        raise CommandInvalid(f"payload nests deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise CommandInvalid(f"payload is not valid JSON ({str(exc)[:80]})") from None
    if not _is_text(body):
        raise CommandInvalid("payload holds a lone surrogate escape such as \\ud800, which is not text")
    if isinstance(body, str):
        body = body.strip()
        if not body:
            raise CommandInvalid("blank payload ignored; send {} or a value")
        return body, None
    if not isinstance(body, dict):
        raise CommandInvalid("a JSON payload must be an object or a string")
    ident = body.get("id")
    if ident is not None and request_id(ident) is None:
        raise CommandInvalid(f"'id' must be a text of at most {MAX_ID} characters or an integer")
    return body, ident


def to_json(value: Any) -> bytes:
    """An answer, event or state as the box sends it (MQTT and the web page alike): compact UTF-8
    JSON; a lone surrogate (a file name that is not UTF-8) as its JSON escape, which is what
    backslashreplace writes inside a JSON string."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")


def _is_text(value: Any) -> bool:
    """False when a decoded JSON value holds a lone surrogate ("\\ud800" decodes to one): such a
    string cannot be written back as UTF-8, so an answer echoing it could not be sent."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loose_id(payload: bytes) -> Any:
    """The request id of a payload refused for its content, so the sender can match the answer."""
    try:
        text = bytes(payload[:MAX_PAYLOAD]).decode("utf-8-sig")
        if _too_deep(text):
            return None
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return request_id(body.get("id")) if isinstance(body, dict) else None


# --- parsing ------------------------------------------------------------------------------------

def _only(body: dict, allowed: Tuple[str, ...]) -> None:
    for key in body:
        if key not in allowed + ("id",):
            raise CommandInvalid(f"unknown key {rules.show(key)} (known: {', '.join(allowed + ('id',))})")


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CommandInvalid(f"'{key}' must be a class name")
    try:
        return rules.class_name(value.strip())
    except rules.RuleError as exc:
        raise CommandInvalid(f"'{key}': {exc}") from None


def _int(value: Any, key: str, lo: int = 1, hi: int = 2 ** 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CommandInvalid(f"'{key}' must be a whole number from {lo} to {hi}")
    return value


def _object(body: Any, action: str, example: str) -> dict:
    if not isinstance(body, dict):
        raise CommandInvalid(f"{action} needs a JSON object: {example}")
    return body


def _record(body):
    if not isinstance(body, dict):
        return Record(_name(body, "class"), seconds=DEFAULT_RECORD_SECONDS)
    _only(body, ("class", "seconds", "count"))
    seconds, count = body.get("seconds"), body.get("count")
    if seconds is not None and count is not None:
        raise CommandInvalid("give 'seconds' or 'count', not both")
    try:
        seconds = None if seconds is None else rules.record_seconds(seconds)
        count = None if count is None else rules.record_count(count)
    except rules.RuleError as exc:
        raise CommandInvalid(str(exc)) from None
    if seconds is None and count is None:
        seconds = DEFAULT_RECORD_SECONDS
    return Record(_name(body.get("class"), "class"), seconds=seconds, count=count)


def _plain(cls):
    def parse(body):
        if isinstance(body, dict):     # plain text is accepted: some tools cannot send {}
            _only(body, ())
        return cls()
    return parse


def _stop(body):
    if not isinstance(body, dict):     # any text: Node-RED's inject sends a timestamp
        return StopRecording()
    _only(body, ("class",))
    return StopRecording(_name(body["class"], "class") if "class" in body else None)


def _clear(body):
    if not isinstance(body, dict):
        return Clear(_name(body, "class"))
    _only(body, ("class", "all"))
    if "all" in body:
        if body["all"] is not True or "class" in body:
            raise CommandInvalid('to forget every class send {"all": true} (and no class)')
        return Clear(None)
    if "class" not in body:
        raise CommandInvalid('clear needs a class: {"class": "name"}; to forget everything send {"all": true}')
    return Clear(_name(body["class"], "class"))


def _rename(body):
    body = _object(body, "rename", '{"from": "old name", "to": "new name"}')
    _only(body, ("from", "to"))
    return Rename(_name(body.get("from"), "from"), _name(body.get("to"), "to"))


def _threshold(body):
    if isinstance(body, dict):
        _only(body, ("value",))
        body = body.get("value")
    try:
        return SetThreshold(rules.threshold(body))
    except rules.RuleError as exc:
        raise CommandInvalid(str(exc)) from None


def _classes(body):
    body = _object(body, "classes", '{"add": "name"} or {"remove": "name"}')
    _only(body, ("add", "remove"))
    if ("add" in body) == ("remove" in body):
        raise CommandInvalid("give exactly one of 'add' and 'remove'")
    if "add" in body:
        return AddClass(_name(body["add"], "add"))
    return RemoveClass(_name(body["remove"], "remove"))


def _nothing(body):
    body = _object(body, "nothing", '{"class": "name", "nothing": true}')
    _only(body, ("class", "nothing"))
    flag = body.get("nothing", True)
    if not isinstance(flag, bool):
        raise CommandInvalid("'nothing' must be true or false")
    return SetNothing(_name(body.get("class"), "class"), flag)


def _samples(body):
    if not isinstance(body, dict):
        return ListSamples(_name(body, "class"))
    _only(body, ("class", "limit", "before"))
    before = body.get("before")
    return ListSamples(_name(body.get("class"), "class"), _int(body.get("limit", 50), "limit", 1, MAX_LIST),
                       None if before is None else _int(before, "before"))


def _delete_sample(body):
    body = _object(body, "sample/delete", '{"sample": 123}')
    _only(body, ("sample",))
    return DeleteSample(_int(body.get("sample"), "sample"))


def _delete_burst(body):
    body = _object(body, "burst/delete", '{"burst": 7}')
    _only(body, ("burst",))
    return DeleteBurst(_int(body.get("burst"), "burst"))


def _thumbnails(body):
    body = _object(body, "thumbnails", '{"ids": [1, 2, 3]}')
    _only(body, ("ids",))
    ids = body.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_THUMBNAILS:
        raise CommandInvalid(f"'ids' must be a list of 1 to {MAX_THUMBNAILS} sample ids")
    return Thumbnails(tuple(_int(i, "ids") for i in ids))


PARSERS: Dict[str, Callable[[Any], Command]] = {
    "record": _record,
    "record/stop": _stop,
    "undo": _plain(Undo),
    "clear": _clear,
    "rename": _rename,
    "threshold": _threshold,
    "classes": _classes,
    "nothing": _nothing,
    "state": _plain(State),
    "samples": _samples,
    "sample/delete": _delete_sample,
    "burst/delete": _delete_burst,
    "thumbnails": _thumbnails,
    "hints": _plain(Hints),
}
ACTIONS = tuple(PARSERS)
"""Actions any JSON channel (MQTT, web) accepts; export and import travel as files instead."""


def parse(action: str, body: Any) -> Command:
    """The command for `action` with a decoded body (see `decode`), or CommandInvalid."""
    parser = PARSERS.get(action)
    if parser is None:
        raise CommandInvalid(f"unknown action {rules.show(action, 64)} (known: {', '.join(ACTIONS)})")
    return parser(body)


def parse_payload(action: str, payload: bytes) -> Tuple[Command, Any]:
    """(command, request id) from raw bytes: `decode` then `parse`."""
    body, ident = decode(payload)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "id"}
    return parse(action, body), ident
