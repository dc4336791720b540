"""The store module of edge 0.x, kept unchanged (but this line) as the writer of old-format test fixtures."""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from edge import __version__

log = logging.getLogger(__name__)

FORMAT = "edge-knowledge"
FORMAT_VERSION = 1

# Files in the store folder.
SNAPSHOT = "knowledge.npz"
BACKUP = "knowledge.bak.npz"
JOURNAL = "journal.bin"
LOCK = "lock"
ASIDE = "aside"
# Scratch files: always incomplete by definition, removed at open (we hold the lock then).
_SNAPSHOT_TMP = ".knowledge.npz.tmp"
_BACKUP_TMP = ".knowledge.bak.npz.tmp"
_JOURNAL_TMP = ".journal.bin.tmp"

# Members of a knowledge file (snapshot, backup and export share one format).
META_MEMBER = "meta.json"
VECTORS_MEMBER = "vectors.npy"
# Size limits for reading a knowledge file; a file from elsewhere must not exhaust a Pi's memory.
MAX_META_BYTES = 1 << 20
MAX_VECTOR_BYTES = 512 << 20

MAX_NAME_CHARS = 200
MAX_SETTINGS_BYTES = 64 << 10

# Journal record: magic, payload length, seq, crc32 of those 16 bytes, crc32 of the payload.
_MAGIC = b"EJRN"
_HEAD = struct.Struct("<4sIQ")
_RECORD = struct.Struct("<4sIQII")

_OP_KEYS = {
    "add": {"op", "class", "vectors"},
    "remove_last": {"op", "class", "n"},
    "clear": {"op", "class"},
    "clear_all": {"op"},
    "rename": {"op", "from", "to"},
    "settings": {"op", "values"},
}


class StoreError(RuntimeError):
    """A problem with the stored memory, told in one line (never a traceback for the user)."""


def model_id(path: Path) -> str:
    """The sha256 hex digest of a model file: the store remembers which model made its vectors."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the in-memory state ---------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_name(name: Any, what: str = "class name") -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, not {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    return name


class Knowledge:
    """What the box learned: ordered classes of raw float32 embeddings, plus small settings.

    Pure and without I/O. Every change goes through `apply(op)`, which checks the whole op before
    changing anything, so a refused op leaves the state exactly as it was. Copy-on-write: a change
    swaps in new `classes`/`settings` dicts and never edits the old ones, and stored arrays are
    read-only, so `copy()` is cheap and a reader (another thread) that took `classes` once has a
    consistent view. A class whose last sample is removed disappears.
    """

    def __init__(self, dim: int, max_per_class: Optional[int] = None):
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive integer, not {dim!r}")
        if max_per_class is not None and (not _is_int(max_per_class) or max_per_class < 1):
            raise ValueError(f"max_per_class must be a positive integer, not {max_per_class!r}")
        self.dim = int(dim)
        self.max_per_class = None if max_per_class is None else int(max_per_class)
        self.classes: Dict[str, np.ndarray] = {}
        self.settings: dict = {}

    def apply(self, op: dict) -> None:
        """Apply one op; ValueError (and no change at all) when it is invalid."""
        _, classes, settings = self._plan(op)
        self._set(classes, settings)

    def counts(self) -> Dict[str, int]:
        return {name: len(rows) for name, rows in self.classes.items()}

    def copy(self) -> Knowledge:
        """An independent copy (arrays are shared: they are read-only)."""
        other = Knowledge(self.dim, self.max_per_class)
        other.classes = dict(self.classes)
        other.settings = copy.deepcopy(self.settings)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Knowledge):
            return NotImplemented
        return (self.dim == other.dim and list(self.classes) == list(other.classes)
                and all(np.array_equal(self.classes[n], other.classes[n]) for n in self.classes)
                and self.settings == other.settings)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"Knowledge(dim={self.dim}, counts={self.counts()}, settings={self.settings})"

    # -- internals shared with Store --

    def _set(self, classes: Dict[str, np.ndarray], settings: dict) -> None:
        """Install a planned state by swapping in new dicts (copy-on-write): a reader in another
        thread that took `classes` once keeps a consistent view, never a half-changed one."""
        self.classes = classes
        self.settings = settings

    def _replace(self, other: Knowledge) -> None:
        self._set(dict(other.classes), copy.deepcopy(other.settings))

    def _vectors(self, vectors: Any) -> np.ndarray:
        if not isinstance(vectors, np.ndarray):
            raise ValueError(f"vectors must be a numpy array, not {type(vectors).__name__}")
        if vectors.dtype != np.float32:
            raise ValueError(f"vectors must be float32, not {vectors.dtype}")
        v = np.array(vectors, dtype=np.float32, copy=True, order="C")
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), not {vectors.shape}")
        if len(v) == 0:
            raise ValueError("add needs at least one vector")
        if not np.isfinite(v).all():
            raise ValueError("vectors contain NaN or infinite values")
        v.flags.writeable = False
        return v

    def _plan(self, op: Any) -> Tuple[dict, Dict[str, np.ndarray], dict]:
        """Check op against this state; return (normalized op, new classes, new settings).

        Changes nothing: the caller installs the result with `_set` (Store does so only after
        the op is on disk).
        """
        if not isinstance(op, dict):
            raise ValueError(f"an op must be a dict, not {type(op).__name__}")
        kind = op.get("op")
        if kind not in _OP_KEYS:
            raise ValueError(f"unknown op {kind!r}")
        keys = set(op)
        if keys != _OP_KEYS[kind]:
            wrong = sorted(keys ^ _OP_KEYS[kind])
            raise ValueError(f"op {kind!r} takes keys {sorted(_OP_KEYS[kind])}; check {wrong}")
        classes, settings = self.classes, self.settings

        if kind == "add":
            name = _check_name(op["class"])
            vecs = self._vectors(op["vectors"])
            old = classes.get(name)
            rows = vecs if old is None else np.concatenate([old, vecs])
            if self.max_per_class is not None and len(rows) > self.max_per_class:
                rows = rows[-self.max_per_class:].copy()  # the cap keeps the newest samples
            rows.flags.writeable = False
            new = dict(classes)
            new[name] = rows
            return {"op": "add", "class": name, "vectors": vecs}, new, settings

        if kind in ("remove_last", "clear"):
            name = op["class"]
            if not isinstance(name, str) or name not in classes:
                raise ValueError(f"no class named {name!r}")
            new = dict(classes)
            if kind == "clear":
                del new[name]
                return {"op": "clear", "class": name}, new, settings
            n = op["n"]
            if not _is_int(n) or n < 0:
                raise ValueError(f"n must be a non-negative integer, not {n!r}")
            n = int(n)
            if n >= len(classes[name]):
                del new[name]
            elif n > 0:
                new[name] = classes[name][:-n]
            return {"op": "remove_last", "class": name, "n": n}, new, settings

        if kind == "clear_all":
            return {"op": "clear_all"}, {}, settings

        if kind == "rename":
            old_name, new_name = op["from"], op["to"]
            if not isinstance(old_name, str) or old_name not in classes:
                raise ValueError(f"no class named {old_name!r}")
            _check_name(new_name, "new class name")
            if new_name != old_name and new_name in classes:
                raise ValueError(f"a class named {new_name!r} already exists")
            new = {(new_name if n == old_name else n): rows for n, rows in classes.items()}
            return {"op": "rename", "from": old_name, "to": new_name}, new, settings

        # settings: merged; values must survive a JSON round trip unchanged (they are saved so)
        values = op["values"]
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise ValueError("settings values must be a dict with string keys")
        try:
            text = json.dumps(values, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"settings must be plain JSON values: {e}") from None
        if len(text) > MAX_SETTINGS_BYTES:
            raise ValueError(f"settings are larger than {MAX_SETTINGS_BYTES} bytes")
        values = json.loads(text)
        merged = copy.deepcopy(settings)
        merged.update(values)
        return {"op": "settings", "values": values}, classes, merged


# --- knowledge files (snapshot, backup, export) ----------------------------------------------


class _BadFile(Exception):
    """A knowledge file that cannot be used; kind is corrupt, newer, version or invalid."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _write_knowledge(f: BinaryIO, knowledge: Knowledge, model: str, seq: int) -> None:
    """Write a knowledge file: a zip (readable by np.load) with meta.json and vectors.npy.

    All classes' rows go into one (total, dim) little-endian float32 array in class order; the
    per-class counts in meta.json split it again. Member names never contain user text.
    """
    counts = knowledge.counts()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_id": model,
        "dim": knowledge.dim,
        "seq": seq,
        "classes": [{"name": name, "count": n} for name, n in counts.items()],
        "settings": knowledge.settings,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "edge": __version__,
    }
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(META_MEMBER, json.dumps(meta, ensure_ascii=False, indent=1).encode("utf-8"))
        with zf.open(VECTORS_MEMBER, "w") as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": (sum(counts.values()), knowledge.dim)}
            np.lib.format.write_array_header_1_0(member, header)
            for rows in knowledge.classes.values():
                member.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())


def _unsafe_member(name: str) -> bool:
    return ("/" in name or "\\" in name or ".." in name or "\0" in name or ":" in name
            or name.startswith("~") or name == "")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, read into memory (never extracted) and never more than limit."""
    if info.flag_bits & 0x1:
        raise _BadFile("corrupt", f"member {info.filename!r} is encrypted")
    if info.file_size > limit:
        raise _BadFile("corrupt", f"member {info.filename!r} is too large ({info.file_size} bytes, limit {limit})")
    with zf.open(info) as member:
        data = member.read(limit + 1)  # reading to the end also checks the member's CRC
    if len(data) > limit:
        raise _BadFile("corrupt", f"member {info.filename!r} is too large (over {limit} bytes)")
    if len(data) != info.file_size:
        raise _BadFile("corrupt", f"member {info.filename!r} is truncated")
    return data


def _parse_meta(raw: bytes) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _BadFile("corrupt", f"{META_MEMBER} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _BadFile("corrupt", "not an edge knowledge file")
    version = meta.get("version")
    if not _is_int(version):
        raise _BadFile("corrupt", f"{META_MEMBER} has no format version")
    if version > FORMAT_VERSION:
        raise _BadFile("newer", f"it was written by a newer edge (format version {version}; "
                                f"this edge reads version {FORMAT_VERSION})")
    if version != FORMAT_VERSION:
        raise _BadFile("version", f"format version {version} is not supported (this edge reads "
                                  f"version {FORMAT_VERSION})")
    ok = (isinstance(meta.get("model_id"), str) and _is_int(meta.get("dim")) and meta["dim"] > 0
          and _is_int(meta.get("seq")) and meta["seq"] >= 0 and isinstance(meta.get("settings"), dict)
          and isinstance(meta.get("classes"), list)
          and all(isinstance(c, dict) and isinstance(c.get("name"), str) and _is_int(c.get("count"))
                  and c["count"] >= 1 for c in meta["classes"]))
    if not ok:
        raise _BadFile("corrupt", f"{META_MEMBER} is incomplete or has wrong types")
    names = [c["name"] for c in meta["classes"]]
    if len(set(names)) != len(names):
        raise _BadFile("corrupt", f"{META_MEMBER} names a class twice")
    return meta


def _parse_vectors(raw: bytes, rows: int, dim: int) -> np.ndarray:
    """The (rows, dim) float32 array of vectors.npy; the header is checked before any allocation."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy version {version}")
    except Exception:  # numpy raises several kinds for a bad header; all mean the same here
        raise _BadFile("corrupt", f"{VECTORS_MEMBER} is not a valid .npy array") from None
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != (rows, dim):
        raise _BadFile("corrupt", f"{VECTORS_MEMBER} holds {dtype} {tuple(shape)}; expected float32 ({rows}, {dim})")
    data = raw[f.tell():]
    if len(data) != rows * dim * 4:
        raise _BadFile("corrupt", f"{VECTORS_MEMBER} is truncated")
    return np.frombuffer(data, dtype="<f4").reshape(rows, dim).astype(np.float32, copy=False)


def _read_knowledge(path: Path, max_per_class: Optional[int]) -> Tuple[dict, Knowledge]:
    """Read and fully check a knowledge file. OSError if it cannot be opened, _BadFile if unusable."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_META_BYTES + MAX_VECTOR_BYTES + (1 << 20):
            raise _BadFile("corrupt", f"file is too large ({size} bytes)")
        try:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                names = [i.filename for i in infos]
                for name in names:
                    if _unsafe_member(name):
                        raise _BadFile("corrupt", f"unsafe member name {name!r}")
                for name in names:
                    if name not in (META_MEMBER, VECTORS_MEMBER):
                        raise _BadFile("corrupt", f"unexpected member {name!r}")
                if sorted(names) != [META_MEMBER, VECTORS_MEMBER]:
                    raise _BadFile("corrupt", f"expected members {META_MEMBER} and {VECTORS_MEMBER}, found {names}")
                by_name = {i.filename: i for i in infos}
                meta = _parse_meta(_read_member(zf, by_name[META_MEMBER], MAX_META_BYTES))
                raw = _read_member(zf, by_name[VECTORS_MEMBER], MAX_VECTOR_BYTES)
        except _BadFile:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError,
                NotImplementedError, zlib.error, struct.error, KeyError, OverflowError) as e:
            raise _BadFile("corrupt", f"damaged or not a zip archive ({e})") from None
    counts = [c["count"] for c in meta["classes"]]
    vectors = _parse_vectors(raw, sum(counts), meta["dim"])
    knowledge = Knowledge(meta["dim"], max_per_class)
    start = 0
    try:
        for c in meta["classes"]:
            knowledge.apply({"op": "add", "class": c["name"], "vectors": vectors[start:start + c["count"]]})
            start += c["count"]
        knowledge.apply({"op": "settings", "values": meta["settings"]})
    except ValueError as e:
        raise _BadFile("invalid", str(e)) from None
    return meta, knowledge


# --- the journal ------------------------------------------------------------------------------


def _encode_record(seq: int, op: dict) -> bytes:
    """One journal record: framing with two CRCs, then a JSON head and the raw float32 rows."""
    head = {k: v for k, v in op.items() if k != "vectors"}
    blob = b""
    if "vectors" in op:
        vecs = op["vectors"]
        head["shape"] = list(vecs.shape)
        blob = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
    text = json.dumps(head, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload = struct.pack("<I", len(text)) + text + blob
    start = _HEAD.pack(_MAGIC, len(payload), seq)
    return start + struct.pack("<II", zlib.crc32(start), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> dict:
    (n,) = struct.unpack_from("<I", payload, 0)
    if 4 + n > len(payload):
        raise ValueError("JSON head runs past the record")
    op = json.loads(payload[4:4 + n].decode("utf-8"))
    if not isinstance(op, dict):
        raise ValueError("record head is not an object")
    blob = payload[4 + n:]
    if "shape" in op:
        rows, dim = op.pop("shape")
        if len(blob) != rows * dim * 4:
            raise ValueError("vector bytes do not match the shape")
        op["vectors"] = np.frombuffer(blob, dtype="<f4").reshape(rows, dim).astype(np.float32, copy=False)
    elif blob:
        raise ValueError("unexpected bytes after the record head")
    return op


@dataclass
class _Record:
    seq: int
    op: dict
    start: int
    end: int


@dataclass
class _Scan:
    """What a journal file holds: its header, the good records, and how it ends."""
    header: Optional[dict] = None
    base: int = 0                       # seq of the snapshot the journal was started after
    records: List[_Record] = field(default_factory=list)
    good_end: int = 0                   # bytes of good data (header + good records)
    fault: Optional[str] = None         # None, "torn" (a crash mid-append) or "corrupt"
    detail: str = ""


def _parse_at(data: bytes, pos: int) -> Tuple[str, int, bytes, int]:
    """('ok', seq, payload, end) or ('short'|'bad-head'|'bad-payload', 0, b'', end or -1)."""
    if len(data) - pos < _RECORD.size:
        return "short", 0, b"", -1
    magic, length, seq, head_crc, payload_crc = _RECORD.unpack_from(data, pos)
    if magic != _MAGIC or zlib.crc32(data[pos:pos + _HEAD.size]) != head_crc:
        return "bad-head", 0, b"", -1
    end = pos + _RECORD.size + length
    if end > len(data):
        return "short", 0, b"", end
    payload = data[pos + _RECORD.size:end]
    if zlib.crc32(payload) != payload_crc:
        return "bad-payload", 0, b"", end
    return "ok", seq, payload, end


def _valid_record_after(data: bytes, pos: int) -> bool:
    """Whether any complete, intact record starts after pos (then pos is damage, not a torn tail)."""
    i = data.find(_MAGIC, pos)
    while i >= 0:
        if _parse_at(data, i)[0] == "ok":
            return True
        i = data.find(_MAGIC, i + 1)
    return False


def _scan_journal(data: bytes) -> _Scan:
    """Read records until the end or the first bad one, and classify how the file ends.

    A bad record is a torn tail (a crash while appending) when nothing intact follows it: it is
    incomplete, or it is the last record and its payload CRC fails, or its head is garbage with no
    intact record after it. Otherwise the journal is damaged in the middle.
    """
    scan = _Scan()
    pos = 0
    while pos < len(data):
        status, seq, payload, end = _parse_at(data, pos)
        if status == "ok":
            try:
                op = _decode_payload(payload)
            except (ValueError, TypeError, UnicodeDecodeError, struct.error, RecursionError) as e:
                scan.fault, scan.detail = "corrupt", f"record at byte {pos} cannot be decoded ({e})"
                break
            if scan.header is None:
                if op.get("op") != "journal" or not _is_int(op.get("version")):
                    scan.fault, scan.detail = "corrupt", "the first record is not a journal header"
                    break
                scan.header, scan.base = op, seq
                scan.good_end = pos = end
                if op["version"] > FORMAT_VERSION:
                    break  # a newer edge's journal: read no further
                continue
            expected = scan.records[-1].seq + 1 if scan.records else scan.base + 1
            if seq != expected or op.get("op") == "journal":
                scan.fault, scan.detail = "corrupt", f"record at byte {pos} has seq {seq}, expected {expected}"
                break
            scan.records.append(_Record(seq, op, pos, end))
            scan.good_end = pos = end
            continue
        torn = (status == "short" or (status == "bad-payload" and end == len(data))
                or (status == "bad-head" and not _valid_record_after(data, pos + 1)))
        scan.fault = "torn" if torn else "corrupt"
        scan.detail = f"bad record at byte {pos}"
        break
    return scan


# --- small file-system helpers ----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make renames and new names in a folder durable (a rename is only safe once this is done)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _short(model: str) -> str:
    return model[:12] if len(model) > 12 else model


@dataclass
class _Loaded:
    """The result of reading one of the store's own snapshot files."""
    status: str                          # ok, missing, corrupt, other (another model or dim)
    knowledge: Optional[Knowledge] = None
    seq: int = 0
    reason: str = ""                     # aside folder suffix
    detail: str = ""                     # for the log line


# --- the store --------------------------------------------------------------------------------


class Store:
    """The box's memory in one folder: snapshot + journal, one process at a time (flock).

    `append(op)` writes and fsyncs one journal record, then applies the op to `knowledge`.
    `compact()` folds the journal into a new snapshot (the previous one is kept as a backup);
    it runs by itself when the journal passes `compact_records` records or `compact_bytes` bytes,
    and on `close()`. `open()` repairs what a crash or a bad disk left: see docs/store.md.
    Thread-safe: one lock serializes all changes.
    """

    def __init__(self, folder: Path, model_id: str, dim: int, max_per_class: int = 200, *,
                 compact_records: int = 500, compact_bytes: int = 8 << 20):
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model_id must be a non-empty string")
        self.folder = Path(folder)
        self.model_id = model_id
        self.dim = dim
        self.max_per_class = max_per_class
        self.compact_records = compact_records
        self.compact_bytes = compact_bytes
        self.knowledge = Knowledge(dim, max_per_class)
        self.events: List[str] = []      # the fault lines of the last open (also logged)
        self._mutex = threading.RLock()
        self._lock_fd: Optional[int] = None
        self._jfd: Optional[int] = None
        self._seq = 0                    # seq of the last change in knowledge
        self._snap_seq = -1              # seq the snapshot on disk holds
        self._jsize = 0                  # bytes of good data in the journal
        self._jrecords = 0               # records in the journal (after its header)
        self._jdirty = False             # a failed append may have left bytes after _jsize
        self._jstale = False             # the journal ends before the snapshot (after an import)
        self._compact_after = compact_records
        self._compact_after_bytes = compact_bytes

    # -- public API --

    @property
    def seq(self) -> int:
        """The sequence number of the last saved change."""
        return self._seq

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> Knowledge:
        """Lock the folder, load snapshot + journal, repair faults; returns `knowledge`."""
        with self._mutex:
            if self._lock_fd is not None:
                return self.knowledge
            self.events = []
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store folder {self.folder}: {_why(e)}") from None
            try:
                self._take_lock()
                for name in (_SNAPSHOT_TMP, _BACKUP_TMP, _JOURNAL_TMP):
                    _remove_quietly(self._path(name))
                self._recover()
            except OSError as e:
                self._close_files()
                raise StoreError(f"cannot open store {self.folder}: {_why(e)}") from None
            except BaseException:
                self._close_files()
                raise
            if self._compact_due():
                self._compact_quietly()
            return self.knowledge

    def append(self, op: dict) -> None:
        """Save one op durably, then apply it. ValueError for an invalid op, StoreError if the
        disk refuses (then neither the file nor the memory changed)."""
        with self._mutex:
            self._require_open()
            normalized, classes, settings = self.knowledge._plan(op)
            seq = self._seq + 1
            if self._jstale:
                self._new_journal_or_fail()
            self._write_record(_encode_record(seq, normalized))
            self.knowledge._set(classes, settings)
            self._seq = seq
            self._jrecords += 1
            if self._compact_due():
                self._compact_quietly()

    def compact(self) -> None:
        """Write a snapshot of the current state, then start an empty journal (crash-safe)."""
        with self._mutex:
            self._require_open()
            if self._jrecords == 0 and self._snap_seq == self._seq and not self._jstale:
                return
            try:
                self._write_snapshot(self.knowledge, self._seq)
                self._new_journal(self._seq)
            except OSError as e:
                raise StoreError(f"could not compact store {self.folder}: {_why(e)}") from None

    def close(self, compact: bool = True) -> None:
        """Compact (unless told not to) and release the lock. Idempotent; never raises for a full
        disk: the journal already holds every change."""
        with self._mutex:
            if self._lock_fd is None:
                return
            try:
                if compact:
                    self.compact()
            except StoreError as e:
                log.warning("%s; the journal keeps every change", e)
            finally:
                self._close_files()

    def export(self, path: Path) -> None:
        """Write the current knowledge to one portable file (atomically: old file or new file)."""
        path = Path(path)
        with self._mutex:
            self._require_open()
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    _write_knowledge(f, self.knowledge, self.model_id, self._seq)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
                _fsync_dir(path.parent)
            except OSError as e:
                raise StoreError(f"could not export to {path}: {_why(e)}") from None
            finally:
                if tmp is not None:
                    _remove_quietly(Path(tmp))

    def import_file(self, path: Path) -> Knowledge:
        """Replace the knowledge with a file's, durably; the state before is kept as the backup.

        The file is fully read and checked in memory first; any refusal leaves the store untouched.
        """
        path = Path(path)
        with self._mutex:
            self._require_open()
            try:
                meta, imported = _read_knowledge(path, self.max_per_class)
            except _BadFile as e:
                raise StoreError(f"cannot import {path}: {e}") from None
            except OSError as e:
                raise StoreError(f"cannot import {path}: {_why(e)}") from None
            if meta["model_id"] != self.model_id:
                raise StoreError(f"cannot import {path}: it was made with a different model "
                                 f"({_short(meta['model_id'])}; this box runs {_short(self.model_id)})")
            if meta["dim"] != self.dim:
                raise StoreError(f"cannot import {path}: it holds {meta['dim']}-dim embeddings; "
                                 f"this box uses {self.dim}")
            self.compact()  # the backup will then hold the complete state before the import
            seq = self._seq + 1
            try:
                self._write_snapshot(imported, seq)
            except OSError as e:
                raise StoreError(f"could not import {path}: {_why(e)}") from None
            # The snapshot is durable: the import happened. The old journal must not be appended
            # to any more (its records end before seq); it is replaced now or before the next append.
            self.knowledge._replace(imported)
            self._seq = seq
            self._jstale = True
            try:
                self._new_journal(seq)
            except OSError as e:
                log.warning("imported %s, but could not start a new journal yet: %s", path, _why(e))
            log.info("imported %s: %s", path, imported.counts())
            return self.knowledge

    def __enter__(self) -> Store:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery at open --

    def _recover(self) -> None:
        """Load the best consistent state; move aside (never delete) what cannot be used.

        First everything is read without changing a file, so that a newer format can still be
        refused untouched; then faults are repaired.
        """
        snap = self._read_own(SNAPSHOT)
        bak = self._read_own(BACKUP) if snap.status != "ok" else None
        jpath = self._path(JOURNAL)
        scan = _scan_journal(jpath.read_bytes()) if jpath.exists() else None
        if scan is not None and scan.header is not None and scan.header["version"] > FORMAT_VERSION:
            raise StoreError(f"store {self.folder} was written by a newer edge (journal format version "
                             f"{scan.header['version']}); update edge to use it")

        empty = _Loaded("ok", Knowledge(self.dim, self.max_per_class), seq=0)
        if snap.status == "missing" and bak.status == "missing" and scan is None:
            log.info("new store in %s", self.folder)
            self._install(empty.knowledge, 0)
            self._write_snapshot(empty.knowledge, 0)
            self._new_journal(0)
            return

        if snap.status == "other":
            dest = self._aside([SNAPSHOT, BACKUP, JOURNAL], snap.reason)
            self._fault(f"{snap.detail}; kept aside in {dest}; starting empty")
            self._install(empty.knowledge, 0)
            self._write_snapshot(empty.knowledge, 0)
            self._new_journal(0)
            return

        if snap.status == "ok":
            base = snap
        else:
            if snap.status == "corrupt":
                dest = self._aside([SNAPSHOT], "corrupt-snapshot")
                self._fault(f"snapshot {SNAPSHOT} is unreadable ({snap.detail}); kept aside in {dest}")
            else:
                self._fault(f"snapshot {SNAPSHOT} is missing")
            if bak.status == "ok":
                base = bak
                self._fault(f"using the backup snapshot {BACKUP} (seq {bak.seq})")
            else:
                if bak.status != "missing":
                    dest = self._aside([BACKUP], "corrupt-backup" if bak.status == "corrupt" else bak.reason)
                    self._fault(f"backup {BACKUP} is unusable ({bak.detail}); kept aside in {dest}")
                base = empty
                self._fault("no usable snapshot; starting from empty")

        knowledge, seq = base.knowledge, base.seq
        aside_journal = ""      # a log line when the journal must be kept aside
        new_journal = scan is None
        if scan is not None:
            header = scan.header
            if header is None and scan.fault == "torn":
                self._fault("journal was cut short before its header; starting a new journal")
                new_journal = True
            elif header is None:
                aside_journal = f"journal {JOURNAL} is damaged at its start ({scan.detail})"
            elif header.get("model_id") != self.model_id or header.get("dim") != self.dim:
                aside_journal = (f"journal {JOURNAL} was made with model {_short(str(header.get('model_id')))} "
                                 f"dim {header.get('dim')}; this box runs model {_short(self.model_id)} dim {self.dim}")
            elif scan.base > base.seq:
                aside_journal = (f"journal {JOURNAL} continues a snapshot at seq {scan.base} but the one in use "
                                 f"ends at seq {base.seq}; its changes cannot be applied without a gap")
            else:
                for rec in scan.records:
                    if rec.seq <= base.seq:
                        continue  # already in the snapshot (a crash during compaction)
                    try:
                        knowledge.apply(rec.op)
                    except ValueError as e:
                        scan.fault, scan.good_end = "corrupt", rec.start
                        scan.detail = f"record {rec.seq} does not apply ({e})"
                        break
                    seq = rec.seq
                if scan.fault == "torn":
                    dropped = jpath.stat().st_size - scan.good_end
                    self._fault(f"journal ended with a torn record (a crash while saving); "
                                f"dropped its {dropped} bytes, kept changes up to seq {seq}")
                elif scan.fault == "corrupt":
                    aside_journal = (f"journal {JOURNAL} is damaged in the middle ({scan.detail}); "
                                     f"kept changes up to seq {seq}")
                last = scan.records[-1].seq if scan.records else scan.base
                if not aside_journal and last < seq:
                    new_journal = True  # it ends before the snapshot (a crash right after an import)

        self._install(knowledge, seq)
        self._snap_seq = base.seq if base is snap else -1
        if base is not snap or (aside_journal and seq > base.seq):
            self._write_snapshot(knowledge, seq)  # before the journal goes: it holds replayed changes
        if aside_journal:
            dest = self._aside([JOURNAL], "journal")
            self._fault(f"{aside_journal}; kept aside in {dest}")
            new_journal = True
        if new_journal or base is not snap:
            self._new_journal(seq)
        else:
            self._open_journal(scan.good_end, len(scan.records))

    def _read_own(self, name: str) -> _Loaded:
        path = self._path(name)
        if not path.exists():
            return _Loaded("missing")
        try:
            meta, knowledge = _read_knowledge(path, self.max_per_class)
        except _BadFile as e:
            if e.kind == "newer":
                raise StoreError(f"store {self.folder} was written by a newer edge ({name}: {e}); "
                                 f"update edge to use it") from None
            return _Loaded("corrupt", detail=str(e))
        except OSError as e:
            return _Loaded("corrupt", detail=_why(e))
        if meta["model_id"] != self.model_id:
            return _Loaded("other", reason="other-model",
                           detail=f"store was made with model {_short(meta['model_id'])}; "
                                  f"this box runs model {_short(self.model_id)}")
        if meta["dim"] != self.dim:
            return _Loaded("other", reason="other-dim",
                           detail=f"store holds {meta['dim']}-dim embeddings; this box uses {self.dim}")
        return _Loaded("ok", knowledge, seq=meta["seq"])

    def _install(self, knowledge: Knowledge, seq: int) -> None:
        self.knowledge._replace(knowledge)
        self._seq = seq

    def _aside(self, names: List[str], reason: str) -> Path:
        """Move files into aside/<timestamp>-<reason>/ (same file system: a rename, no copy)."""
        root = self._path(ASIDE)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = root / f"{stamp}-{reason}"
        n = 2
        while dest.exists():
            dest = root / f"{stamp}-{reason}-{n}"
            n += 1
        dest.mkdir(parents=True)
        for name in names:
            if self._path(name).exists():
                os.replace(self._path(name), dest / name)
        _fsync_dir(dest)
        _fsync_dir(root)
        _fsync_dir(self.folder)
        return dest

    def _fault(self, message: str) -> None:
        log.warning("%s: %s", self.folder, message)
        self.events.append(message)

    # -- files --

    def _path(self, name: str) -> Path:
        return self.folder / name

    def _take_lock(self) -> None:
        path = self._path(LOCK)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open store {self.folder}: {_why(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = ""
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    owner = f" (pid {pid})" if pid.isdigit() else ""
                except OSError:
                    pass
                os.close(fd)
                raise StoreError(f"store {self.folder} is in use by another edge process{owner}") from None
            os.close(fd)
            raise StoreError(f"cannot lock store {self.folder}: {_why(e)}") from None
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is only a courtesy for the error message

    def _close_files(self) -> None:
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"store {self.folder} is not open")

    def _write_snapshot(self, knowledge: Knowledge, seq: int) -> None:
        """Atomically replace the snapshot; the one it replaces becomes the backup."""
        snap, tmp = self._path(SNAPSHOT), self._path(_SNAPSHOT_TMP)
        try:
            with open(tmp, "wb") as f:
                _write_knowledge(f, knowledge, self.model_id, seq)
                f.flush()
                os.fsync(f.fileno())
            if snap.exists():
                self._keep_backup(snap)
            os.replace(tmp, snap)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(self.folder)
        self._snap_seq = seq

    def _keep_backup(self, snap: Path) -> None:
        """backup := snapshot, while the snapshot itself stays in place (a hard link, or a copy on
        file systems without links)."""
        tmp = self._path(_BACKUP_TMP)
        _remove_quietly(tmp)
        try:
            os.link(snap, tmp)
        except OSError:
            shutil.copyfile(snap, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, self._path(BACKUP))
        _fsync_dir(self.folder)

    def _new_journal(self, base_seq: int) -> None:
        """Atomically replace the journal with an empty one that continues after base_seq."""
        path, tmp = self._path(JOURNAL), self._path(_JOURNAL_TMP)
        header = {"op": "journal", "version": FORMAT_VERSION, "model_id": self.model_id, "dim": self.dim}
        data = _encode_record(base_seq, header)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(self.folder)
        self._jstale = False
        self._open_journal(len(data), 0)

    def _new_journal_or_fail(self) -> None:
        try:
            self._new_journal(self._seq)
        except OSError as e:
            raise StoreError(f"could not save to {self._path(JOURNAL)}: {_why(e)}") from None

    def _open_journal(self, good_end: int, records: int) -> None:
        fd = os.open(self._path(JOURNAL), os.O_RDWR)
        try:
            if os.fstat(fd).st_size != good_end:
                os.ftruncate(fd, good_end)  # drop a torn tail
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        if self._jfd is not None:
            os.close(self._jfd)
        self._jfd = fd
        self._jsize = good_end
        self._jrecords = records
        self._jdirty = False
        self._compact_after = self.compact_records
        self._compact_after_bytes = self.compact_bytes

    def _write_record(self, data: bytes) -> None:
        """Write one record at the end of the good data and fsync; on failure cut it off again."""
        fd = self._jfd
        try:
            if self._jdirty:
                os.ftruncate(fd, self._jsize)
                self._jdirty = False
            os.lseek(fd, self._jsize, os.SEEK_SET)
            view = memoryview(data)
            done = 0
            while done < len(data):
                n = os.write(fd, view[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, self._jsize)
                os.fsync(fd)
            except OSError:
                self._jdirty = True  # retried before the next write; a reopen cuts it as a torn tail
            raise StoreError(f"could not save to {self._path(JOURNAL)}: {_why(e)}") from None
        self._jsize += len(data)

    def _compact_due(self) -> bool:
        return self._jrecords >= self._compact_after or self._jsize >= self._compact_after_bytes

    def _compact_quietly(self) -> None:
        """Compaction after a saved change: a failure must not fail the change (it is durable)."""
        try:
            self.compact()
        except StoreError as e:
            self._compact_after = self._jrecords + max(1, self.compact_records // 10)
            self._compact_after_bytes = self._jsize + max(1, self.compact_bytes // 10)
            log.warning("%s; will retry later", e)
