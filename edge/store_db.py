"""The store's folder: its SQLite file, schema and rules, and finding a usable one at open.

Opening locks the folder, migrates an old-format store, checks the database by the rules
(edge/rules.py and the schema's own), sets aside what fails and falls back to the last good copy
or an empty store, and serves a read-only disk from memory. edge/store.py does the commands on
the connection this returns. Faults and guarantees: docs/store.md ("Faults at open").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from edge import legacy_store, rules

log = logging.getLogger(__name__)

SOURCES = ("button", "mqtt", "web", "import")
"""Where a sample came from."""
MAX_THUMBNAIL_BYTES = 16 << 10
"""A thumbnail is a small JPEG (the gallery shows ~100 px); larger ones are refused."""


JPEG_START = b"\xff\xd8\xff"
"""A JPEG's start-of-image marker, the first bytes of every thumbnail."""


def is_thumbnail(data) -> bool:
    """Bytes that can be a thumbnail: a JPEG (JPEG_START) of at most MAX_THUMBNAIL_BYTES. An
    imported file's other bytes showed as broken pictures in the gallery."""
    return isinstance(data, (bytes, bytearray)) and len(data) <= MAX_THUMBNAIL_BYTES \
        and bytes(data[:len(JPEG_START)]) == JPEG_START
SETTINGS: Dict[str, Callable[[Any], Any]] = {
    "threshold": rules.threshold,          # set at run time (MQTT, web); beats the config's
    "threshold_config": rules.threshold,   # the config's threshold when it was set (see docs/store.md)
}
"""The settings a store keeps, each with its rule."""
SCHEMA_VERSION = 1
"""PRAGMA user_version of the database; a newer one is refused, an older one migrated."""

DB = "knowledge.db"
GOOD = "knowledge.good.db"
LOCK = "lock"
ASIDE = "aside"


def is_store_file(folder: Path, path: Path) -> bool:
    """A path the store in `folder` owns (its database, copies, lock, journal, set-aside files,
    the old store's files): an export written there would replace or hide what the box knows."""
    folder, path = Path(folder).resolve(), Path(path).resolve()
    if path.parent != folder:
        return folder / ASIDE in path.parents
    own = {DB, GOOD, LOCK, ASIDE, *legacy_store.FILES}
    return path.name in own or any(path.name == f"{name}{end}" for name in (DB, GOOD) for end in ("-wal", "-shm", "-journal"))
_TMP_PREFIX = ".tmp-"
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


class Bad(Exception):
    """A database that fails the checks; the message says why in one line."""


def why(e: BaseException) -> str:
    """An exception as one short line (for StoreError messages)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_only_error(e: BaseException) -> bool:
    """Whether an error means the disk or file cannot be written (not that it is damaged)."""
    text = str(e).lower()
    return ((isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM))
            or "readonly" in text or "read-only" in text)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def replace_durably(tmp: Path, dest: Path) -> None:
    """dest := the finished file tmp, surviving a power cut: fsync it, rename, fsync the folder."""
    _fsync(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def short_model(model: object) -> str:
    """A model id as people read it in messages (its first 12 hex digits)."""
    return str(model)[:12]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL: a committed command survives a power cut."""
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


def _memory() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)


class Folder:
    """One store folder: its lock, faults and read-only state while open."""

    def __init__(self, folder: Path, model_id: str, dim: int, max_per_class: int, thumbnails: bool,
                 legacy_buttons: Sequence[str]):
        self.folder = Path(folder)
        self.model_id, self.dim, self.max_per_class = model_id, dim, max_per_class
        self.thumbnails, self.legacy_buttons = thumbnails, tuple(legacy_buttons)
        self.faults: List[str] = []
        self.read_only = False
        self.read_only_why = ""
        self._lock_fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return self.folder / DB

    def open(self) -> sqlite3.Connection:
        """Lock the folder and return a checked database (in memory when the disk is read-only).

        Raises StoreError only when nothing usable is left: another process holds the store, or it
        was written by a newer edge. Everything else is a line in `faults` (and a log warning).
        """
        self.faults, self.read_only, self.read_only_why = [], False, ""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if not read_only_error(e):
                raise StoreError(f"cannot create store folder {self.folder}: {why(e)}") from None
            self.set_read_only(f"cannot create {self.folder} ({why(e)})")
        try:
            self._take_lock()
            if not self.read_only and not os.access(self.folder, os.W_OK):
                self.set_read_only(f"{self.folder} is not writable")
            if not self.read_only and self.path.exists() and not os.access(self.path, os.W_OK):
                self.set_read_only(f"{self.path} is not writable")
            if self.read_only:
                return self._open_read_only()
            try:
                return self._open_writable()
            except (OSError, sqlite3.Error) as e:
                # a read-only or full disk, an I/O error: what is stored can still be used
                self.set_read_only(f"cannot write to {self.folder}: {why(e)}")
                return self._open_read_only()
        except StoreError:
            self.release()
            raise
        except (OSError, sqlite3.Error) as e:
            self.release()
            raise StoreError(f"cannot open store {self.folder}: {why(e)}") from None

    def close(self, db: sqlite3.Connection) -> None:
        """Checkpoint the WAL into the file, check it and save it as the last good copy."""
        if not self.read_only:
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.check(db)
                self._save_good(db)
            except (sqlite3.Error, Bad) as e:
                log.warning("%s: at close: %s", self.folder, why(e))

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing the last descriptor releases the flock
            self._lock_fd = None

    def set_read_only(self, reason: str) -> None:
        if not self.read_only:
            self.read_only, self.read_only_why = True, reason
            self._fault(f"store is read-only ({reason}): what is stored is used, nothing new is saved")

    def check(self, db: sqlite3.Connection) -> None:
        """Check a database by the rules (Bad when it fails); a new, empty file gets the schema."""
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
            raise StoreError(f"store {self.folder} was written by a newer edge (schema {version}, this edge "
                             f"reads {SCHEMA_VERSION}); update edge to use it")
        if version != SCHEMA_VERSION or tables != _TABLES:
            raise Bad(f"is not an edge store (schema {version}, tables {sorted(tables)})")
        result = db.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            raise Bad(f"fails the integrity check ({rules.show(result[0][0], 60)})")
        if db.execute("PRAGMA foreign_key_check").fetchone():
            raise Bad("has samples of a class that does not exist")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("model_id") != self.model_id:
            raise Bad(f"was made with model {short_model(meta.get('model_id'))}; this box runs {short_model(self.model_id)}")
        if meta.get("dim") != str(self.dim):
            raise Bad(f"holds {meta.get('dim')}-dim embeddings; this box uses {self.dim}")
        if not str(meta.get("last_burst", "")).isdigit():
            raise Bad("has no valid burst counter")
        classes = db.execute("SELECT id, name, button, `nothing` FROM classes ORDER BY position, id").fetchall()
        try:
            rules.class_names([c[1] for c in classes])
            buttons = [rules.class_name(c[2]) for c in classes if c[2] is not None]
        except rules.RuleError as e:
            raise Bad(f"has a class that breaks the rules: {e}") from None
        if len(set(buttons)) != len(buttons) or any(c[3] not in (0, 1) for c in classes):
            raise Bad("has a button bound twice or a bad 'nothing' flag")
        bad = db.execute(
            "SELECT count(*) FROM samples WHERE typeof(embedding) != 'blob' OR length(embedding) != ? OR"
            f" source NOT IN ({','.join('?' * len(SOURCES))}) OR typeof(burst) != 'integer' OR typeof(ts) != 'real'"
            " OR (thumbnail IS NOT NULL AND (typeof(thumbnail) != 'blob' OR length(thumbnail) > ?))"
            " OR burst > ?", (self.dim * 4, *SOURCES, MAX_THUMBNAIL_BYTES, int(meta["last_burst"]))).fetchone()[0]
        if bad:
            raise Bad(f"has {bad} samples that break the rules (size, source, burst or thumbnail)")
        for key, value in db.execute("SELECT key, value FROM settings"):
            try:
                SETTINGS[key](json.loads(value))
            except (KeyError, ValueError, RecursionError):
                raise Bad(f"has a bad setting {rules.show(key)} = {rules.show(value)}") from None
        blobs = b"".join(r[0] for r in db.execute("SELECT embedding FROM samples"))
        # NaN or infinity only: a store that took values beyond rules.MAX_FEATURE before that rule
        # (an import) would be set aside whole, and its good copy with it: the box would look empty
        if not np.isfinite(np.frombuffer(blobs, dtype="<f4")).all():   # one check, not one per sample
            raise Bad("has NaN or infinite embeddings")

    # --- internals ---------------------------------------------------------------------------------

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
            if not read_only_error(e):
                raise StoreError(f"cannot open store {self.folder}: {why(e)}") from None
            self.set_read_only(f"cannot write {path} ({why(e)})")
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
            raise StoreError(f"cannot lock store {self.folder}: {why(e)}") from None
        self._lock_fd = fd
        if not self.read_only:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _open_writable(self) -> sqlite3.Connection:
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
            db = None
            try:
                if attempt == "good":
                    self._restore_good()
                db = connect(self.path)
                self.check(db)
                break
            except (Bad, sqlite3.DatabaseError) as e:
                if db is not None:
                    db.close()
                if not isinstance(e, Bad) and read_only_error(e):
                    raise
                reason = str(e) if isinstance(e, Bad) else f"damaged ({why(e)})"
            except BaseException:
                if db is not None:
                    db.close()
                raise
            if attempt == "empty":
                raise StoreError(f"cannot start an empty store in {self.folder}: {reason}")
            dest = self._aside([DB, DB + "-wal", DB + "-shm"] + ([GOOD] if attempt == "good" else []), "unusable")
            self._fault(f"{'the last good copy' if attempt == 'good' else DB} {reason}; kept aside in {dest}")
            if attempt == "good" or not (self.folder / GOOD).exists():
                self._fault("starting with an empty store")
            else:
                self._fault("starting from the last good copy")
        try:
            self._tidy(db)
            self._save_good(db)
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self) -> sqlite3.Connection:
        """Serve reads from a copy in memory: nothing on disk is touched or needed later."""
        sources = [(what, path) for what, path in (("db", self.path), ("good", self.folder / GOOD)) if path.exists()]
        for what, path in sources:
            mem = _memory()
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
                self.check(mem)
                if what == "good":
                    self._fault("using the last good copy")
                return mem
            except (Bad, sqlite3.DatabaseError) as e:
                self._fault(f"{path.name} is unusable ({why(e)})")
                mem.close()
        mem = _memory()
        self.check(mem)   # creates the schema
        if legacy_store.present(self.folder):
            try:
                mem.execute("BEGIN")
                self._fill_from_legacy(mem, legacy_store.read_store(self.folder))
                mem.execute("COMMIT")
                self._fault("old-format store read into memory (migrated once the store is writable)")
                return mem
            except (legacy_store.LegacyError, Bad, sqlite3.Error) as e:
                self._fault(f"old-format store is unusable ({why(e)})")
                mem.close()
                mem = _memory()
                self.check(mem)
        if sources:
            self._fault("starting with an empty store")
        return mem

    def _tidy(self, db: sqlite3.Connection) -> None:
        """What changed in the config since the last start (a smaller cap, thumbnails turned off),
        and thumbnails an older import let in that are not pictures."""
        db.execute("BEGIN IMMEDIATE")
        over = db.execute("SELECT c.id, c.name FROM classes c WHERE (SELECT count(*) FROM samples s"
                          " WHERE s.class = c.id) > ?", (self.max_per_class,)).fetchall()
        for cid, name in over:
            db.execute("DELETE FROM samples WHERE class = ? AND id NOT IN (SELECT id FROM samples"
                       " WHERE class = ? ORDER BY id DESC LIMIT ?)", (cid, cid, self.max_per_class))
            log.info("%s: kept the newest %d samples of %r (max_per_class)", self.folder, self.max_per_class, name)
        removed = 0
        if not self.thumbnails:
            removed = db.execute("UPDATE samples SET thumbnail = NULL WHERE thumbnail IS NOT NULL").rowcount
        # thumbnails that are not JPEG pictures (imported before store_db.is_thumbnail checked
        # them) are dropped, their samples kept: the gallery showed them as broken pictures
        broken = db.execute("UPDATE samples SET thumbnail = NULL WHERE thumbnail IS NOT NULL"
                            " AND substr(thumbnail, 1, ?) != ?", (len(JPEG_START), JPEG_START)).rowcount
        if broken:
            log.warning("%s: dropped %d thumbnails that were not JPEG pictures (their samples stay)",
                        self.folder, broken)
        db.execute("COMMIT")
        if removed:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")   # out of the WAL too (secure_delete zeroed them)
            log.info("%s: thumbnails are off; removed the %d stored ones", self.folder, removed)

    def _save_good(self, db: sqlite3.Connection) -> None:
        """Copy the checked database to knowledge.good.db (atomically), the state used if the next
        start finds the database damaged or breaking the rules."""
        try:
            self._copy_into(db, GOOD)
        except (OSError, sqlite3.Error) as e:
            with contextlib.suppress(OSError):
                (self.folder / f"{_TMP_PREFIX}{GOOD}").unlink()
            self._fault(f"could not save the last good copy: {why(e)}")

    def _restore_good(self) -> None:
        """knowledge.db := the last good copy (via a scratch file and a rename)."""
        src = sqlite3.connect(f"file:{self.folder / GOOD}?mode=ro&immutable=1", uri=True)
        try:
            self._copy_into(src, DB)
        finally:
            src.close()

    def _copy_into(self, src: sqlite3.Connection, name: str) -> None:
        """The folder's file `name` := a copy of database src, atomically (a scratch file, fsync,
        rename, fsync of the folder)."""
        tmp = self.folder / f"{_TMP_PREFIX}{name}"
        dst = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
        replace_durably(tmp, self.folder / name)

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
        fsync_dir(dest)
        fsync_dir(root)
        fsync_dir(self.folder)
        return dest

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
            self._fault(f"old-format store was made with model {short_model(old.model_id)} dim {old.dim}; this box "
                        f"runs {short_model(self.model_id)} dim {self.dim}; kept aside in {dest}")
            return
        tmp = self.folder / f"{_TMP_PREFIX}{DB}"
        db = connect(tmp)
        try:
            self.check(db)
            db.execute("BEGIN IMMEDIATE")
            self._fill_from_legacy(db, old)
            db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{tmp.name}{suffix}").unlink()
        replace_durably(tmp, self.path)
        dest = self._aside(legacy_store.FILES, "migrated")
        counts = {name: len(rows) for name, rows in old.classes.items()}
        log.info("%s: migrated the old-format store %s; old files kept in %s", self.folder, counts, dest)

    def _fill_from_legacy(self, db: sqlite3.Connection, old: legacy_store.Legacy) -> None:
        rows, settings, notes = legacy_store.class_rows(old.classes, old.settings, self.dim, self.legacy_buttons)
        for note in old.notes + notes:
            self._fault(f"migrating the old store: {note}")
        # The old format kept no times: the old files' last change is the best guess.
        mtimes = [(self.folder / n).stat().st_mtime for n in legacy_store.FILES if (self.folder / n).exists()]
        ts = max(mtimes, default=0.0)
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
