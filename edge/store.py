"""What the box learned, kept in one SQLite file that survives reboots and power cuts.

One command (a rename, a recorded sample, an import) is one SQLite transaction: all or nothing,
and durable when `command()` returns (WAL, synchronous=FULL). Persist first, then announce: the
app tells the world about a change only after its command has returned. Opening (lock, checks,
recovery, migration) is edge/store_db.py; the export file is edge/transfer.py. Format, guarantees
and faults: docs/store.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge import rules
from edge.store_db import (MAX_THUMBNAIL_BYTES, SETTINGS, SOURCES, Folder, StoreError, is_thumbnail, read_only_error,
                           why)

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
        self._files = Folder(self.folder, model_id, dim, max_per_class, self.thumbnails_on, legacy_buttons)
        self._db: Optional[sqlite3.Connection] = None
        self._mutex = threading.RLock()
        self._depth = 0
        self._classes: Optional[List[Tuple[int, ClassInfo]]] = None   # (class id, info) in order
        self._vectors: Dict[int, np.ndarray] = {}                      # class id -> read-only rows

    # --- open and close ----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._files.path

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def faults(self) -> List[str]:
        """What went wrong at open or since (one line each): shown on the status LED and logged."""
        return self._files.faults

    @property
    def read_only(self) -> bool:
        """True when nothing can be saved (a read-only disk): what is stored is still served."""
        return self._files.read_only

    def open(self) -> None:
        """Lock the folder, then migrate, check and recover; see docs/store.md ("Faults at open").

        Raises StoreError only when nothing usable is left: another process holds the store, or it
        was written by a newer edge. Everything else is a line in `faults` (and a log warning).
        """
        with self._mutex:
            if self._db is None:
                self._forget()
                self._db = self._files.open()

    def close(self) -> None:
        """Checkpoint, check and keep a last good copy, release the lock. Idempotent; never raises
        (every command is saved already)."""
        with self._mutex:
            if self._db is not None:
                if self._depth == 0:
                    self._files.close(self._db)
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None
            self._depth = 0
            self._forget()
            self._files.release()

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

    def sample_rows(self, name: str) -> Tuple[List[float], List[str], List[Optional[bytes]]]:
        """A class's samples oldest first as (times, sources, thumbnails): what an export keeps."""
        with self._mutex:
            rows = self._conn().execute("SELECT ts, source, thumbnail FROM samples WHERE class = ? ORDER BY id",
                                        (self._class_id(name),)).fetchall()
            return ([r[0] for r in rows], [r[1] for r in rows],
                    [bytes(r[2]) if r[2] is not None else None for r in rows])

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold off other threads' commands while several reads must agree (an export)."""
        with self._mutex:
            yield

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
                raise StoreError(f"store is read-only: {self._files.read_only_why}")
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
                    thumbnails: Optional[List[Optional[bytes]]] = None,
                    ts: Union[None, float, Sequence[float]] = None) -> List[int]:
        """Add embeddings to a class; returns their sample ids. Beyond `max_per_class` the class's
        oldest samples are deleted. Thumbnails are dropped when the store keeps none. `ts`: one
        time for all (default now) or one per vector (an import keeps the recorded times)."""
        vectors = self._check_vectors(vectors)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {rules.show(source)}")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
            raise ValueError(f"burst must be a burst id, got {rules.show(burst)}")
        if thumbnails is not None and len(thumbnails) != len(vectors):
            raise ValueError("give one thumbnail (or None) per vector")
        thumbs = list(thumbnails) if thumbnails is not None and self.thumbnails_on else [None] * len(vectors)
        for t in thumbs:
            if t is not None and not is_thumbnail(t):
                raise ValueError(f"a thumbnail must be JPEG bytes of at most {MAX_THUMBNAIL_BYTES}")
        times = [time.time() if ts is None else ts] * len(vectors) if not isinstance(ts, (list, tuple)) else ts
        if len(times) != len(vectors) or not all(rules.is_number(t) for t in times):
            raise ValueError("ts must be one finite time, or one per vector")
        with self._write() as db:
            cid = self._class_id(name)
            other = db.execute("SELECT class FROM samples WHERE burst = ? AND class != ? LIMIT 1", (burst, cid)).fetchone()
            if other:
                raise StoreError(f"burst {burst} belongs to class {self._name_of(other[0])!r}")
            ids = []
            for v, t, when in zip(vectors, thumbs, times):
                cur = db.execute("INSERT INTO samples(class, ts, source, burst, embedding, thumbnail)"
                                 " VALUES (?, ?, ?, ?, ?, ?)", (cid, float(when), source, burst, v.tobytes(), t))
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
        if key not in SETTINGS:
            raise rules.RuleError(f"unknown setting {rules.show(key)} (settings: {', '.join(SETTINGS)})")
        with self._write() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)",
                           (key, json.dumps(SETTINGS[key](value))))

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
                raise StoreError(f"store is read-only: {self._files.read_only_why}")
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
        if read_only_error(e):
            self._files.set_read_only(why(e))
            return StoreError(f"store is read-only: {why(e)}")
        return StoreError(f"could not save to {self.path}: {why(e)}")

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
        problem = rules.vectors_problem(v)
        if problem is not None:
            raise ValueError(f"vectors contain {problem}")
        return v
