"""What the box learned, kept in one SQLite file that survives reboots and power cuts.

One command (a rename, a recorded sample, an import) is one SQLite transaction: all or nothing,
and durable when `command()` returns (WAL, synchronous=FULL). Persist first, then announce: the
app tells the world about a change only after its command has returned. Every row is checked by
edge/rules.py when the store opens; a file that fails is set aside and the last good copy is used.
Format, guarantees and faults: docs/store.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge import __version__, legacy_store, rules

log = logging.getLogger(__name__)

SOURCES = ("button", "mqtt", "web", "import")
"""Where a sample came from."""
SCHEMA_VERSION = 1
"""PRAGMA user_version of the database; a newer one is refused, an older one migrated."""
EXPORT_FORMAT = "edge-knowledge"
EXPORT_VERSION = 2
"""Version of export files; version 1 (edge 0.x) is still read."""
MAX_THUMBNAIL_BYTES = 16 << 10
"""A thumbnail is a small JPEG (the gallery shows ~100 px); larger ones are refused."""

DB = "knowledge.db"
GOOD = "knowledge.good.db"
LOCK = "lock"
ASIDE = "aside"
_TMP_PREFIX = ".tmp-"

_SETTINGS: Dict[str, Callable[[Any], Any]] = {
    "threshold": rules.threshold,          # set at run time (MQTT, web); beats the config's
    "threshold_config": rules.threshold,   # the config's threshold when it was set (see docs/store.md)
}
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE classes(id INTEGER PRIMARY KEY, position INTEGER NOT NULL, name TEXT NOT NULL UNIQUE,
                     button TEXT UNIQUE, `nothing` INTEGER NOT NULL DEFAULT 0);
CREATE TABLE samples(id INTEGER PRIMARY KEY AUTOINCREMENT,
                     class INTEGER NOT NULL REFERENCES classes(id) ON DELETE CASCADE,
                     ts REAL NOT NULL, source TEXT NOT NULL, burst INTEGER NOT NULL,
                     embedding BLOB NOT NULL, thumbnail BLOB);
CREATE INDEX samples_by_class ON samples(class, id);
CREATE INDEX samples_by_burst ON samples(burst);
CREATE TABLE settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_TABLES = {"meta", "classes", "samples", "settings", "sqlite_sequence"}


class StoreError(RuntimeError):
    """A problem with the stored memory, told in one line (never a traceback for the user)."""


class NotFound(StoreError, KeyError):
    """No class or sample of that name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def model_id(path: Path) -> str:
    """The sha256 hex digest of a model file: the store remembers which model made its vectors."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ClassInfo:
    """One class: `button` is the config class name (the button/LED wiring key) it is bound to."""
    name: str
    button: Optional[str]
    nothing: bool
    count: int


@dataclass(frozen=True)
class SampleInfo:
    """One sample without its embedding (for the gallery)."""
    id: int
    cls: str
    ts: float
    source: str
    burst: int
    thumbnail: bool


@dataclass
class Imported:
    """An export file, fully read and checked, ready for `Store.replace_with`."""
    path: Path
    version: int
    classes: List[ClassInfo]
    settings: dict
    vectors: Dict[str, np.ndarray]
    ts: Dict[str, List[float]]
    thumbnails: Dict[str, List[Optional[bytes]]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _why(e: BaseException) -> str:
    """An exception as one short line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(model: str) -> str:
    return model[:12]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_only_error(e: BaseException) -> bool:
    text = str(e).lower()
    return ((isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM))
            or "readonly" in text or "read-only" in text)


class _Bad(Exception):
    """A database that fails the checks at open; the message says why in one line."""


class Store:
    """The box's memory in one folder: a SQLite file, its last good copy, and a lock.

    Writes happen only inside `with store.command():`. Reads see the committed state plus the
    writes of the open command. Thread-safe: one lock serializes commands and reads (a reader in
    another thread waits for the command to end, so it never sees half of one).
    """

    def __init__(self, folder: Path, model_id: str, dim: int, max_per_class: int = 200, *,
                 thumbnails: bool = True, legacy_buttons: Sequence[str] = ()):
        """`legacy_buttons`: the config's class names in order, used only when migrating an old
        store (its renames were keyed by button), so the classes keep the order and binding the
        old box showed."""
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model_id must be a non-empty string")
        if not isinstance(dim, int) or dim < 1 or not isinstance(max_per_class, int) or max_per_class < 1:
            raise ValueError("dim and max_per_class must be positive integers")
        self.folder = Path(folder)
        self.model_id = model_id
        self.dim = dim
        self.max_per_class = max_per_class
        self.thumbnails_on = bool(thumbnails)
        self.legacy_buttons = tuple(legacy_buttons)
        self.faults: List[str] = []
        self.read_only = False
        self._read_only_why = ""
        self._db: Optional[sqlite3.Connection] = None
        self._lock_fd: Optional[int] = None
        self._mutex = threading.RLock()
        self._depth = 0
        self._classes: Optional[List[Tuple[int, ClassInfo]]] = None   # (class id, info) in order
        self._vectors: Dict[int, np.ndarray] = {}                      # class id -> read-only rows

    # --- open and close ----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.folder / DB

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> None:
        """Lock the folder, then migrate, check and recover; see docs/store.md ("Faults at open").

        Raises StoreError only when nothing usable is left: another process holds the store, or it
        was written by a newer edge. Everything else is a line in `faults` (and a log warning).
        """
        with self._mutex:
            if self._db is not None:
                return
            self.faults = []
            self.read_only, self._read_only_why = False, ""
            self._forget()
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if not _read_only_error(e):
                    raise StoreError(f"cannot create store folder {self.folder}: {_why(e)}") from None
                self._set_read_only(f"cannot create {self.folder} ({_why(e)})")
            try:
                self._take_lock()
                if not self.read_only and not os.access(self.folder, os.W_OK):
                    self._set_read_only(f"{self.folder} is not writable")
                if not self.read_only and self.path.exists() and not os.access(self.path, os.W_OK):
                    self._set_read_only(f"{self.path} is not writable")
                if self.read_only:
                    self._open_read_only()
                else:
                    try:
                        self._open_writable()
                    except (OSError, sqlite3.Error) as e:
                        # a read-only or full disk, an I/O error: what is stored can still be used
                        self._close_db()
                        self._set_read_only(f"cannot write to {self.folder}: {_why(e)}")
                        self._open_read_only()
            except StoreError:
                self._release()
                raise
            except (OSError, sqlite3.Error) as e:
                self._release()
                raise StoreError(f"cannot open store {self.folder}: {_why(e)}") from None

    def close(self) -> None:
        """Checkpoint the WAL into the database file, check it and save it as the last good copy,
        and release the lock. Idempotent; never raises (every command is saved already)."""
        with self._mutex:
            if self._db is not None and not self.read_only and self._depth == 0:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._check()
                    self._save_good()
                except (sqlite3.Error, _Bad, StoreError) as e:
                    log.warning("%s: at close: %s", self.folder, _why(e))
            self._release()

    def __enter__(self) -> "Store":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reads ---------------------------------------------------------------------------------

    def classes(self) -> List[ClassInfo]:
        """The classes in order (position)."""
        with self._mutex:
            return [info for _, info in self._class_rows()]

    def vectors(self, name: str) -> np.ndarray:
        """A class's embeddings, (n, dim) float32, oldest first (a read-only cached array)."""
        with self._mutex:
            return self._rows(self._class_id(name))

    def all_vectors(self) -> Dict[str, np.ndarray]:
        """Every class's embeddings in class order, empty classes included."""
        with self._mutex:
            return {info.name: self._rows(cid) for cid, info in self._class_rows()}

    def settings(self) -> dict:
        """The stored settings (each checked by rules when it was written and again at open)."""
        with self._mutex:
            return {k: json.loads(v) for k, v in self._conn().execute("SELECT key, value FROM settings ORDER BY key")}

    def samples(self, name: str, limit: int = 50, before: Optional[int] = None) -> List[SampleInfo]:
        """A class's samples, newest first; `before` (a sample id) pages on to older ones."""
        with self._mutex:
            cid = self._class_id(name)
            limit = max(0, min(int(limit), 10_000))
            rows = self._conn().execute(
                "SELECT id, ts, source, burst, thumbnail IS NOT NULL FROM samples WHERE class = ? AND id < ?"
                " ORDER BY id DESC LIMIT ?", (cid, before if before is not None else 2 ** 62, limit))
            return [SampleInfo(i, self._name_of(cid), ts, src, b, bool(t)) for i, ts, src, b, t in rows]

    def thumbnail(self, sample_id: int) -> Optional[bytes]:
        """A sample's JPEG thumbnail, or None (no such sample, or none kept)."""
        with self._mutex:
            row = self._conn().execute("SELECT thumbnail FROM samples WHERE id = ?", (sample_id,)).fetchone()
            return bytes(row[0]) if row and row[0] is not None else None

    def last_burst(self) -> Optional[Tuple[str, int, int]]:
        """(class, burst, samples) of the newest burst still present (imports are not bursts)."""
        with self._mutex:
            row = self._conn().execute(
                "SELECT class, burst, count(*) FROM samples WHERE source != 'import' AND burst = "
                "(SELECT max(burst) FROM samples WHERE source != 'import') GROUP BY class, burst").fetchone()
            return (self._name_of(row[0]), row[1], row[2]) if row else None

    # --- commands ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def command(self) -> Iterator[None]:
        """One transaction: everything written inside is saved together and durably, or not at all.

        An exception inside rolls everything back and is re-raised. A nested command joins the
        outer one (a savepoint: its own exception undoes only its part, if the caller catches it).
        """
        with self._mutex:
            db = self._conn()
            if self.read_only:
                raise StoreError(f"store is read-only: {self._read_only_why}")
            if self._depth:
                with self._savepoint():
                    yield
                return
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._write_failed(e) from None
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._rollback()
                raise
            self._depth = 0
            try:
                db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise self._write_failed(e) from None

    def add_class(self, name: str, button: Optional[str] = None, nothing: bool = False) -> None:
        """Append a class at the end (RuleError for a bad, taken or one-too-many name)."""
        with self._write() as db:
            rows = self._class_rows()
            name = rules.new_class_name(name, [i.name for _, i in rows])
            if len(rows) >= rules.MAX_CLASSES:
                raise rules.RuleError(f"at most {rules.MAX_CLASSES} classes")
            button = self._free_button(button)
            db.execute("INSERT INTO classes(position, name, button, `nothing`) VALUES (?, ?, ?, ?)",
                       (len(rows), name, button, int(bool(nothing))))

    def remove_class(self, name: str) -> None:
        """Remove a class with all its samples; the classes after it move up."""
        with self._write() as db:
            cid = self._class_id(name)
            db.execute("DELETE FROM classes WHERE id = ?", (cid,))   # samples go by ON DELETE CASCADE
            for position, (other, _) in enumerate(r for r in self._class_rows() if r[0] != cid):
                db.execute("UPDATE classes SET position = ? WHERE id = ?", (position, other))
            self._vectors.pop(cid, None)

    def rename_class(self, old: str, new: str) -> None:
        """Rename a class; it keeps its samples, button and position."""
        with self._write() as db:
            cid = self._class_id(old)
            new = rules.new_class_name(new, [i.name for _, i in self._class_rows()], replacing=self._name_of(cid))
            db.execute("UPDATE classes SET name = ? WHERE id = ?", (new, cid))

    def set_nothing(self, name: str, nothing: bool) -> None:
        """Mark a class as 'nothing in front of the camera' (or not)."""
        with self._write() as db:
            db.execute("UPDATE classes SET `nothing` = ? WHERE id = ?", (int(bool(nothing)), self._class_id(name)))

    def bind_button(self, name: str, button: Optional[str]) -> None:
        """Bind a class to a config button (None unbinds). A button bound elsewhere is an error."""
        with self._write() as db:
            cid = self._class_id(name)
            button = self._free_button(button, cid)
            db.execute("UPDATE classes SET button = ? WHERE id = ?", (button, cid))

    def new_burst(self) -> int:
        """A fresh burst id: larger than every id handed out before, also across restarts."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'last_burst'").fetchone()
            burst = int(row[0]) + 1 if row else 1
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_burst', ?)", (str(burst),))
            return burst

    def add_samples(self, name: str, vectors: np.ndarray, source: str, burst: int,
                    thumbnails: Optional[List[Optional[bytes]]] = None, ts: Optional[float] = None) -> List[int]:
        """Add embeddings to a class; returns their sample ids. Beyond `max_per_class` the class's
        oldest samples are deleted. Thumbnails are dropped when the store keeps none."""
        vectors = self._check_vectors(vectors)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {rules.show(source)}")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
            raise ValueError(f"burst must be a burst id, got {rules.show(burst)}")
        if thumbnails is not None and len(thumbnails) != len(vectors):
            raise ValueError("give one thumbnail (or None) per vector")
        thumbs = list(thumbnails) if thumbnails is not None and self.thumbnails_on else [None] * len(vectors)
        for t in thumbs:
            if t is not None and (not isinstance(t, (bytes, bytearray)) or len(t) > MAX_THUMBNAIL_BYTES):
                raise ValueError(f"a thumbnail must be JPEG bytes of at most {MAX_THUMBNAIL_BYTES}")
        ts = time.time() if ts is None else float(ts)
        if not math.isfinite(ts):
            raise ValueError("ts must be a finite time")
        with self._write() as db:
            cid = self._class_id(name)
            other = db.execute("SELECT class FROM samples WHERE burst = ? AND class != ? LIMIT 1", (burst, cid)).fetchone()
            if other:
                raise StoreError(f"burst {burst} belongs to class {self._name_of(other[0])!r}")
            ids = []
            for v, t in zip(vectors, thumbs):
                cur = db.execute("INSERT INTO samples(class, ts, source, burst, embedding, thumbnail)"
                                 " VALUES (?, ?, ?, ?, ?, ?)", (cid, ts, source, burst, v.tobytes(), t))
                ids.append(cur.lastrowid)
            cached = self._vectors.get(cid)
            self._trim(cid)
            if cached is not None:
                rows = np.concatenate([cached, vectors])[-self.max_per_class:]
                rows.flags.writeable = False
                self._vectors[cid] = rows
            self._classes = None
            return ids

    def delete_sample(self, sample_id: int) -> str:
        """Delete one sample by id; returns its class (NotFound if there is no such sample)."""
        with self._write() as db:
            row = db.execute("SELECT class FROM samples WHERE id = ?", (sample_id,)).fetchone()
            if row is None:
                raise NotFound(f"no sample {rules.show(sample_id)}")
            db.execute("DELETE FROM samples WHERE id = ?", (sample_id,))
            self._changed(row[0])
            return self._name_of(row[0])

    def delete_burst(self, burst: int) -> Tuple[str, int]:
        """Delete a burst's samples (undo); returns (class, removed). NotFound if none is left."""
        with self._write() as db:
            row = db.execute("SELECT class, count(*) FROM samples WHERE burst = ? GROUP BY class", (burst,)).fetchone()
            if row is None:
                raise NotFound(f"no samples of burst {rules.show(burst)}")
            db.execute("DELETE FROM samples WHERE burst = ?", (burst,))
            self._changed(row[0])
            return self._name_of(row[0]), row[1]

    def clear(self, name: str) -> int:
        """Delete a class's samples (the class stays); returns how many."""
        with self._write() as db:
            cid = self._class_id(name)
            removed = db.execute("DELETE FROM samples WHERE class = ?", (cid,)).rowcount
            self._changed(cid)
            return removed

    def clear_all(self) -> None:
        """Delete every sample; classes and settings stay."""
        with self._write() as db:
            db.execute("DELETE FROM samples")
            self._forget()

    def set_setting(self, key: str, value: Any) -> None:
        """Set a known setting, checked by its rule (None removes it); unknown keys are refused."""
        if key not in _SETTINGS:
            raise rules.RuleError(f"unknown setting {rules.show(key)} (settings: {', '.join(_SETTINGS)})")
        with self._write() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)",
                           (key, json.dumps(_SETTINGS[key](value))))

    # --- export and import ---------------------------------------------------------------------

    def export(self, path: Path, thumbnails: bool = False) -> None:
        """Write everything to one portable file (a zip, see docs/store.md), atomically."""
        path = Path(path)
        with self._mutex:
            classes, settings = self._class_rows(), self.settings()
            meta_classes, blobs, thumbs = [], [], []
            for cid, info in classes:
                rows = self._conn().execute("SELECT ts, source, thumbnail FROM samples WHERE class = ? ORDER BY id",
                                            (cid,)).fetchall()
                meta_classes.append({"name": info.name, "button": info.button, "nothing": info.nothing,
                                     "count": len(rows), "ts": [r[0] for r in rows], "source": [r[1] for r in rows]})
                blobs.append(np.ascontiguousarray(self._rows(cid), dtype="<f4"))
                if thumbnails:
                    thumbs += [bytes(r[2]) if r[2] is not None else b"" for r in rows]
            meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model_id": self.model_id, "dim": self.dim,
                    "classes": meta_classes, "settings": settings,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "edge": __version__}
            if thumbnails:
                meta["thumbnails"] = [len(t) for t in thumbs]
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                    zf.writestr(legacy_store.META, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                    with zf.open(legacy_store.VECTORS, "w") as member:
                        total = sum(len(b) for b in blobs)
                        np.lib.format.write_array_header_1_0(
                            member, {"descr": "<f4", "fortran_order": False, "shape": (total, self.dim)})
                        for b in blobs:
                            member.write(b.tobytes())
                    if thumbnails:
                        zf.writestr("thumbnails.bin", b"".join(thumbs))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
        except OSError as e:
            raise StoreError(f"could not export to {path}: {_why(e)}") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def limits(self) -> Dict[str, int]:
        """Byte limits of an export's members, from MAX_CLASSES x max_per_class x dim."""
        samples = rules.MAX_CLASSES * self.max_per_class
        return {"meta": 64 * 1024 + samples * 160, "vectors": 4096 + samples * self.dim * 4,
                "thumbnails": samples * MAX_THUMBNAIL_BYTES}

    def import_limit(self) -> int:
        """The largest export file this store reads (its members' limits plus the zip's own
        overhead): what an upload may be, too."""
        return sum(self.limits().values()) + (1 << 20)

    def read_export(self, path: Path) -> Imported:
        """Read and check a whole export file without changing anything (StoreError to refuse).

        The same rules as live commands: class names, class count, settings; and this box's model,
        dim and size limits. Members are read into memory with a bound, never extracted.
        """
        path = Path(path)
        try:
            return self._read_export(path)
        except (legacy_store.LegacyError, rules.RuleError, _Bad) as e:
            raise StoreError(f"cannot import {path}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot import {path}: {_why(e)}") from None

    def replace_with(self, imported: Imported, keep_buttons: Optional[Dict[str, str]] = None) -> None:
        """Replace classes, samples and settings with an import's (inside a command).

        `keep_buttons` ({button: class name}): when given, the file's bindings are dropped and each
        of these buttons is bound to the imported class of that name (ignoring case), if any.
        Imported samples get source "import" and one new burst per class.
        """
        with self._write() as db:
            db.execute("DELETE FROM samples")
            db.execute("DELETE FROM classes")
            db.execute("DELETE FROM settings")
            self._forget()
            binding = {c.name: c.button for c in imported.classes}
            if keep_buttons is not None:
                binding = {c.name: None for c in imported.classes}
                for button, name in keep_buttons.items():
                    for c in imported.classes:
                        if c.name.casefold() == str(name).casefold():
                            binding[c.name] = button
            for c in imported.classes:
                self.add_class(c.name, binding[c.name], c.nothing)
                if len(imported.vectors[c.name]):
                    self.add_samples(c.name, imported.vectors[c.name], "import", self.new_burst(),
                                     imported.thumbnails.get(c.name), 0.0)
                    ts = imported.ts[c.name][-self.max_per_class:]
                    ids = [r[0] for r in db.execute("SELECT id FROM samples WHERE class = ? ORDER BY id",
                                                    (self._class_id(c.name),))]
                    db.executemany("UPDATE samples SET ts = ? WHERE id = ?", list(zip(ts, ids)))
            for key, value in imported.settings.items():
                self.set_setting(key, value)

    # --- internals: the connection, transactions, caches -----------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.folder} is not open")
        return self._db

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[None]:
        db = self._conn()
        db.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            try:
                db.execute("ROLLBACK TO part")
                db.execute("RELEASE part")
            except sqlite3.Error:
                pass
            self._forget()
            raise
        db.execute("RELEASE part")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write operation: inside a command, and all or nothing itself (a savepoint)."""
        with self._mutex:
            self._conn()
            if self.read_only:
                raise StoreError(f"store is read-only: {self._read_only_why}")
            if not self._depth:
                raise StoreError("store changes must be made inside store.command()")
            try:
                with self._savepoint():
                    yield self._db
            except sqlite3.Error as e:
                raise self._write_failed(e) from None
            finally:
                self._classes = None   # names, buttons, counts: cheap to read again

    def _rollback(self) -> None:
        try:
            self._conn().execute("ROLLBACK")
        except sqlite3.Error:
            pass   # SQLite may have rolled back already (e.g. disk full at COMMIT)
        self._forget()

    def _write_failed(self, e: sqlite3.Error) -> StoreError:
        if _read_only_error(e):
            self._set_read_only(_why(e))
            return StoreError(f"store is read-only: {_why(e)}")
        return StoreError(f"could not save to {self.path}: {_why(e)}")

    def _forget(self) -> None:
        self._classes = None
        self._vectors = {}

    def _changed(self, cid: int) -> None:
        self._classes = None
        self._vectors.pop(cid, None)

    def _class_rows(self) -> List[Tuple[int, ClassInfo]]:
        if self._classes is None:
            rows = self._conn().execute(
                "SELECT c.id, c.name, c.button, c.`nothing`, (SELECT count(*) FROM samples s WHERE s.class = c.id)"
                " FROM classes c ORDER BY c.position, c.id").fetchall()
            self._classes = [(cid, ClassInfo(name, button, bool(nothing), n)) for cid, name, button, nothing, n in rows]
        return self._classes

    def _class_id(self, name: str) -> int:
        for cid, info in self._class_rows():
            if info.name == name:
                return cid
        raise NotFound(f"no class {rules.show(name)}")

    def _name_of(self, cid: int) -> str:
        for other, info in self._class_rows():
            if other == cid:
                return info.name
        raise NotFound(f"no class with id {cid}")

    def _rows(self, cid: int) -> np.ndarray:
        rows = self._vectors.get(cid)
        if rows is None:
            blobs = [r[0] for r in self._conn().execute("SELECT embedding FROM samples WHERE class = ? ORDER BY id", (cid,))]
            rows = np.frombuffer(b"".join(blobs), dtype="<f4").astype(np.float32).reshape(len(blobs), self.dim)
            rows.flags.writeable = False
            self._vectors[cid] = rows
        return rows

    def _trim(self, cid: int) -> None:
        """Keep a class's newest max_per_class samples."""
        self._conn().execute(
            "DELETE FROM samples WHERE class = ? AND id NOT IN"
            " (SELECT id FROM samples WHERE class = ? ORDER BY id DESC LIMIT ?)", (cid, cid, self.max_per_class))

    def _free_button(self, button: Optional[str], cid: Optional[int] = None) -> Optional[str]:
        if button is None:
            return None
        button = rules.class_name(button)
        for other, info in self._class_rows():
            if info.button == button and other != cid:
                raise rules.RuleError(f"button {button!r} is bound to class {info.name!r} already")
        return button

    def _check_vectors(self, vectors: Any) -> np.ndarray:
        if not isinstance(vectors, np.ndarray):
            raise ValueError(f"vectors must be a numpy array, not {type(vectors).__name__}")
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim or len(v) == 0:
            raise ValueError(f"vectors must have shape (n>=1, {self.dim}), not {vectors.shape}")
        if not np.isfinite(v).all():
            raise ValueError("vectors contain NaN or infinite values")
        return v

    # --- internals: opening, checking, recovering --------------------------------------------------

    def _set_read_only(self, why: str) -> None:
        if not self.read_only:
            self.read_only, self._read_only_why = True, why
            self._fault(f"store is read-only ({why}): what is stored is used, nothing new is saved")

    def _fault(self, message: str) -> None:
        log.warning("%s: %s", self.folder, message)
        self.faults.append(message)

    def _take_lock(self) -> None:
        path = self.folder / LOCK
        try:
            if self.read_only:
                raise OSError(errno.EROFS, "read-only")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            if not _read_only_error(e):
                raise StoreError(f"cannot open store {self.folder}: {_why(e)}") from None
            self._set_read_only(f"cannot write {path} ({_why(e)})")
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return   # no lock on a folder nobody can write: nothing can change under us
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = ""
            with contextlib.suppress(OSError):
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                owner = f" (pid {pid})" if pid.isdigit() else ""
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"store {self.folder} is in use by another edge process{owner}") from None
            raise StoreError(f"cannot lock store {self.folder}: {_why(e)}") from None
        self._lock_fd = fd
        if not self.read_only:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _release(self) -> None:
        self._close_db()
        self._depth = 0
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing the last descriptor releases the flock
            self._lock_fd = None

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._forget()

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA secure_delete = ON")   # a deleted sample or thumbnail is gone from the file
        except BaseException:
            db.close()
            raise
        return db

    def _open_writable(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                entry.unlink()   # scratch of an interrupted migration or copy: never complete
        if legacy_store.present(self.folder):
            if self.path.exists():
                self._aside(legacy_store.FILES, "migrated")   # a crash after the migration committed
            else:
                self._migrate()
        for attempt in ("db", "good", "empty"):
            if attempt == "good" and not (self.folder / GOOD).exists():
                continue
            try:
                if attempt == "good":
                    self._restore_good()
                self._db = self._connect(self.path)
                self._check()
                break
            except _Bad as e:
                why = str(e)
            except sqlite3.DatabaseError as e:
                if _read_only_error(e):
                    raise
                why = f"damaged ({_why(e)})"
            self._close_db()
            if attempt == "empty":
                raise StoreError(f"cannot start an empty store in {self.folder}: {why}")
            dest = self._aside([DB, DB + "-wal", DB + "-shm"] + ([GOOD] if attempt == "good" else []), "unusable")
            self._fault(f"{'the last good copy' if attempt == 'good' else DB} {why}; kept aside in {dest}")
            if attempt == "good" or not (self.folder / GOOD).exists():
                self._fault("starting with an empty store")
            else:
                self._fault("starting from the last good copy")
        self._tidy()
        self._save_good()

    def _open_read_only(self) -> None:
        """Serve reads from a copy in memory: nothing on disk is touched or needed later."""
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        sources = []
        if self.path.exists():
            sources.append(("db", self.path))
        if (self.folder / GOOD).exists():
            sources.append(("good", self.folder / GOOD))
        for what, path in sources:
            try:
                src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    src.close()   # cannot make the WAL index on a read-only disk: read the file as it is
                    src = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
                try:
                    src.backup(mem)
                finally:
                    src.close()
                self._db = mem
                self._check()
                if what == "good":
                    self._fault("using the last good copy")
                return
            except (_Bad, sqlite3.DatabaseError) as e:
                self._fault(f"{path.name} is unusable ({_why(e)})")
                mem.close()
                mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        if legacy_store.present(self.folder):
            try:
                self._db = mem
                self._check()   # creates the schema
                self._db.execute("BEGIN")
                self._fill_from_legacy(legacy_store.read_store(self.folder))
                self._db.execute("COMMIT")
                self._fault("old-format store read into memory (migrated once the store is writable)")
                return
            except (legacy_store.LegacyError, _Bad, sqlite3.Error) as e:
                self._fault(f"old-format store is unusable ({_why(e)})")
                mem.close()
                mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._db = mem
        self._check()
        if sources:
            self._fault("starting with an empty store")

    def _check(self) -> None:
        """Check the open database by the rules (_Bad when it fails); a new file gets the schema."""
        db = self._conn()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                           [("model_id", self.model_id), ("dim", str(self.dim)), ("last_burst", "0")])
            db.execute("COMMIT")
            return
        if version > SCHEMA_VERSION:
            self._close_db()
            raise StoreError(f"store {self.path} was written by a newer edge (schema {version}, this edge "
                             f"reads {SCHEMA_VERSION}); update edge to use it")
        if version != SCHEMA_VERSION or tables != _TABLES:
            raise _Bad(f"is not an edge store (schema {version}, tables {sorted(tables)})")
        result = db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            raise _Bad(f"fails the integrity check ({rules.show(result[0][0], 60)})")
        if db.execute("PRAGMA foreign_key_check").fetchone():
            raise _Bad("has samples of a class that does not exist")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("model_id") != self.model_id:
            raise _Bad(f"was made with model {_short(str(meta.get('model_id')))}; this box runs {_short(self.model_id)}")
        if meta.get("dim") != str(self.dim):
            raise _Bad(f"holds {meta.get('dim')}-dim embeddings; this box uses {self.dim}")
        if not str(meta.get("last_burst", "")).isdigit():
            raise _Bad("has no valid burst counter")
        classes = db.execute("SELECT id, name, button, `nothing` FROM classes ORDER BY position, id").fetchall()
        try:
            rules.class_names([c[1] for c in classes])
            buttons = [rules.class_name(c[2]) for c in classes if c[2] is not None]
        except rules.RuleError as e:
            raise _Bad(f"has a class that breaks the rules: {e}") from None
        if len(set(buttons)) != len(buttons) or any(c[3] not in (0, 1) for c in classes):
            raise _Bad("has a button bound twice or a bad 'nothing' flag")
        bad = db.execute(
            "SELECT count(*) FROM samples WHERE typeof(embedding) != 'blob' OR length(embedding) != ? OR"
            f" source NOT IN ({','.join('?' * len(SOURCES))}) OR typeof(burst) != 'integer' OR typeof(ts) != 'real'"
            " OR (thumbnail IS NOT NULL AND (typeof(thumbnail) != 'blob' OR length(thumbnail) > ?))"
            " OR burst > ?", (self.dim * 4, *SOURCES, MAX_THUMBNAIL_BYTES, int(meta["last_burst"]))).fetchone()[0]
        if bad:
            raise _Bad(f"has {bad} samples that break the rules (size, source, burst or thumbnail)")
        for key, value in db.execute("SELECT key, value FROM settings"):
            try:
                _SETTINGS[key](json.loads(value))
            except (KeyError, ValueError, RecursionError):
                raise _Bad(f"has a bad setting {rules.show(key)} = {rules.show(value)}") from None
        for cid, _, _, _ in classes:
            if not np.isfinite(self._rows(cid)).all():
                raise _Bad("has NaN or infinite embeddings")

    def _tidy(self) -> None:
        """What changed in the config since the last start: a smaller cap, thumbnails turned off."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        for cid, info in self._class_rows():
            if info.count > self.max_per_class:
                self._trim(cid)
                log.info("%s: kept the newest %d samples of %r (max_per_class)", self.folder, self.max_per_class, info.name)
        removed = 0
        if not self.thumbnails_on:
            removed = db.execute("UPDATE samples SET thumbnail = NULL WHERE thumbnail IS NOT NULL").rowcount
        db.execute("COMMIT")
        if removed:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # out of the WAL too (secure_delete zeroed them)
            log.info("%s: thumbnails are off; removed the %d stored ones", self.folder, removed)
        self._forget()

    def _save_good(self) -> None:
        """Copy the checked database to knowledge.good.db (atomically), the state used if the next
        start finds the database damaged or breaking the rules."""
        tmp = self.folder / f"{_TMP_PREFIX}{GOOD}"
        try:
            dst = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                self._conn().backup(dst)
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
            _fsync_file(tmp)
            os.replace(tmp, self.folder / GOOD)
            _fsync_dir(self.folder)
        except (OSError, sqlite3.Error) as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._fault(f"could not save the last good copy: {_why(e)}")

    def _restore_good(self) -> None:
        """knowledge.db := the last good copy (via a scratch file and a rename)."""
        tmp = self.folder / f"{_TMP_PREFIX}{DB}"
        src = sqlite3.connect(f"file:{self.folder / GOOD}?mode=ro&immutable=1", uri=True)
        try:
            dst = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        _fsync_file(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.folder)

    def _aside(self, names: Sequence[str], reason: str) -> Path:
        """Move files into aside/<timestamp>-<reason>/ (a rename, never a delete)."""
        root = self.folder / ASIDE
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = root / f"{stamp}-{reason}", 2
        while dest.exists():
            dest, n = root / f"{stamp}-{reason}-{n}", n + 1
        dest.mkdir(parents=True)
        for name in names:
            if (self.folder / name).exists():
                os.replace(self.folder / name, dest / name)
        _fsync_dir(dest)
        _fsync_dir(root)
        _fsync_dir(self.folder)
        return dest

    # --- internals: migration of the old format ---------------------------------------------------

    def _migrate(self) -> None:
        """Build knowledge.db from an old snapshot + journal, then move the old files aside."""
        try:
            old = legacy_store.read_store(self.folder)
        except legacy_store.LegacyError as e:
            dest = self._aside(legacy_store.FILES, "unusable-old-store")
            self._fault(f"old-format store is unusable ({e}); kept aside in {dest}")
            return
        if old.model_id != self.model_id or old.dim != self.dim:
            dest = self._aside(legacy_store.FILES, "other-model")
            self._fault(f"old-format store was made with model {_short(old.model_id)} dim {old.dim}; this box "
                        f"runs {_short(self.model_id)} dim {self.dim}; kept aside in {dest}")
            return
        tmp = self.folder / f"{_TMP_PREFIX}{DB}"
        self._db = self._connect(tmp)
        try:
            self._check()
            self._db.execute("BEGIN IMMEDIATE")
            self._fill_from_legacy(old)
            self._db.execute("COMMIT")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._close_db()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{tmp.name}{suffix}").unlink()
        _fsync_file(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.folder)
        dest = self._aside(legacy_store.FILES, "migrated")
        counts = {name: len(rows) for name, rows in old.classes.items()}
        log.info("%s: migrated the old-format store %s; old files kept in %s", self.folder, counts, dest)

    def _fill_from_legacy(self, old: legacy_store.Legacy) -> None:
        rows, settings, notes = legacy_store.class_rows(old.classes, old.settings, self.dim, self.legacy_buttons)
        for note in old.notes + notes:
            self._fault(f"migrating the old store: {note}")
        # The old format kept no times: the old files' last change is the best guess.
        mtimes = [(self.folder / n).stat().st_mtime for n in legacy_store.FILES if (self.folder / n).exists()]
        ts = max(mtimes, default=0.0)
        db = self._conn()
        for position, (name, button, vectors) in enumerate(rows):
            cid = db.execute("INSERT INTO classes(position, name, button, `nothing`) VALUES (?, ?, ?, 0)",
                             (position, name, button)).lastrowid
            if len(vectors):
                burst = int(db.execute("SELECT value FROM meta WHERE key = 'last_burst'").fetchone()[0]) + 1
                db.execute("UPDATE meta SET value = ? WHERE key = 'last_burst'", (str(burst),))
                keep = np.ascontiguousarray(vectors[-self.max_per_class:], dtype="<f4")
                db.executemany("INSERT INTO samples(class, ts, source, burst, embedding) VALUES (?, ?, 'button', ?, ?)",
                               [(cid, ts, burst, v.tobytes()) for v in keep])
        for key, value in settings.items():
            db.execute("INSERT INTO settings(key, value) VALUES (?, ?)", (key, json.dumps(value)))
        self._forget()

    # --- internals: reading an export --------------------------------------------------------------

    def _read_export(self, path: Path) -> Imported:
        limits = self.limits()
        size = path.stat().st_size
        if size > self.import_limit():
            raise _Bad(f"it is too large ({size} bytes) for {rules.MAX_CLASSES} classes of "
                       f"{self.max_per_class} samples")
        try:
            with zipfile.ZipFile(path) as zf:
                infos = {i.filename: i for i in zf.infolist()}
                if len(infos) != len(zf.infolist()) or not {legacy_store.META, legacy_store.VECTORS} <= set(infos) \
                        or not set(infos) <= {legacy_store.META, legacy_store.VECTORS, "thumbnails.bin"}:
                    raise _Bad(f"unexpected members {rules.show(sorted(infos), 80)}")
                raw_meta = legacy_store.read_member(zf, infos[legacy_store.META], limits["meta"])
                try:
                    meta = json.loads(raw_meta.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise _Bad("meta.json is not valid JSON") from None
                if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
                    raise _Bad("not an edge knowledge file")
                version = meta.get("version")
                if version not in (1, EXPORT_VERSION):
                    raise _Bad(f"format version {rules.show(version)} is not supported (this edge reads 1 "
                               f"and {EXPORT_VERSION})" + ("; update edge" if isinstance(version, int)
                                                          and version > EXPORT_VERSION else ""))
                if meta.get("model_id") != self.model_id:
                    raise _Bad(f"it was made with a different model ({_short(str(meta.get('model_id')))}; "
                               f"this box runs {_short(self.model_id)})")
                if meta.get("dim") != self.dim:
                    raise _Bad(f"it holds {rules.show(meta.get('dim'))}-dim embeddings; this box uses {self.dim}")
                raw_vectors = legacy_store.read_member(zf, infos[legacy_store.VECTORS], limits["vectors"])
                raw_thumbs = (legacy_store.read_member(zf, infos["thumbnails.bin"], limits["thumbnails"])
                              if "thumbnails.bin" in infos else None)
        except (_Bad, legacy_store.LegacyError):
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, RuntimeError,
                NotImplementedError, KeyError, OverflowError, zlib.error) as e:
            raise _Bad(f"damaged or not a zip archive ({_why(e)})") from None
        if version == 1:
            return self._import_v1(path, raw_meta, raw_vectors)
        return self._import_v2(path, meta, raw_vectors, raw_thumbs)

    def _import_v1(self, path: Path, raw_meta: bytes, raw: bytes) -> Imported:
        meta, classes = legacy_store.knowledge_from_bytes(raw_meta, raw)
        rows, settings, _ = legacy_store.class_rows(classes, meta["settings"], self.dim, strict=True)
        return Imported(path, 1, [ClassInfo(n, b, False, min(len(v), self.max_per_class)) for n, b, v in rows],
                        settings, {n: v[-self.max_per_class:] for n, b, v in rows},
                        {n: [0.0] * min(len(v), self.max_per_class) for n, b, v in rows})

    def _import_v2(self, path: Path, meta: dict, raw: bytes, raw_thumbs: Optional[bytes]) -> Imported:
        classes, settings = meta.get("classes"), meta.get("settings")
        if not isinstance(classes, list) or not isinstance(settings, dict):
            raise _Bad("meta.json has no list of classes or no settings")
        names = rules.class_names([c.get("name") if isinstance(c, dict) else c for c in classes])
        buttons, infos, total = [], [], 0
        for c, name in zip(classes, names):
            count, ts, source = c.get("count"), c.get("ts"), c.get("source")
            if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= self.max_per_class * 64
                    and isinstance(ts, list) and len(ts) == count and all(rules.is_number(t) for t in ts)
                    and isinstance(source, list) and len(source) == count and all(s in SOURCES for s in source)
                    and isinstance(c.get("nothing"), bool)):
                raise _Bad(f"class {name!r} has a bad count, ts, source or nothing flag")
            button = c.get("button")
            if button is not None:
                buttons.append(rules.class_name(button))
            infos.append((name, button, c["nothing"], count, [float(t) for t in ts]))
            total += count
        if len(set(buttons)) != len(buttons):
            raise _Bad("a button is bound to two classes")
        clean = {}
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise _Bad(f"unknown setting {rules.show(key)}")
            clean[key] = _SETTINGS[key](value)
        vectors = legacy_store.parse_vectors(raw, total, self.dim)
        sizes = meta.get("thumbnails")
        thumbs_all: List[Optional[bytes]] = [None] * total
        if raw_thumbs is not None:
            if not (isinstance(sizes, list) and len(sizes) == total and all(
                    isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_THUMBNAIL_BYTES for s in sizes)
                    and sum(sizes) == len(raw_thumbs)):
                raise _Bad("thumbnails do not match their sizes")
            pos = 0
            for i, s in enumerate(sizes):
                thumbs_all[i] = raw_thumbs[pos:pos + s] or None
                pos += s
        out = Imported(path, 2, [], clean, {}, {})
        start = 0
        for name, button, nothing, count, ts in infos:
            keep = min(count, self.max_per_class)
            out.classes.append(ClassInfo(name, button, nothing, keep))
            out.vectors[name] = vectors[start:start + count][count - keep:]
            out.ts[name] = ts[count - keep:]
            if raw_thumbs is not None:
                out.thumbnails[name] = thumbs_all[start:start + count][count - keep:]
            start += count
        return out
