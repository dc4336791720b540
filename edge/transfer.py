"""The export file: what a box learned as one portable, versioned zip (docs/store.md, "Export").

Writing reads the store once, under its lock, and replaces the file atomically. Reading checks a
whole file by the same rules as live commands (class names and count, settings) and against this
box (model, dim, size limits) before anything changes; members are read into memory with a bound
derived from classes x cap x dim, never extracted, so a zip bomb cannot get through.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edge import __version__, legacy_store, rules
from edge.store import ClassInfo, Store
from edge.store_db import (MAX_THUMBNAIL_BYTES, SETTINGS, SOURCES, StoreError, is_store_file, is_thumbnail,
                           replace_durably, short_model, why)

FORMAT = legacy_store.FORMAT
VERSION = 2
"""Version of export files; version 1 (edge 0.x, the old snapshot's layout) is still read."""
META, VECTORS, THUMBNAILS = legacy_store.META, legacy_store.VECTORS, "thumbnails.bin"


class _Refused(Exception):
    """Why a file is refused, in one line."""


class ImportRefused(StoreError):
    """A file `read` refuses for what it holds (not a fault of the store: a box told to import
    a wrong file must not signal a storage fault)."""


@dataclass
class Imported:
    """An export file, fully read and checked, ready for `apply`."""
    path: Path
    version: int
    classes: List[ClassInfo]
    settings: dict
    vectors: Dict[str, np.ndarray]
    ts: Dict[str, List[float]]
    thumbnails: Dict[str, List[Optional[bytes]]] = field(default_factory=dict)


def limits(store: Store) -> Dict[str, int]:
    """Byte limits of an export's members, from MAX_CLASSES x max_per_class x dim."""
    samples = rules.MAX_CLASSES * store.max_per_class
    return {META: 64 * 1024 + samples * 160, VECTORS: 4096 + samples * store.dim * 4,
            THUMBNAILS: samples * MAX_THUMBNAIL_BYTES}


def import_limit(store: Store) -> int:
    """The largest export file this box reads (its members' limits plus the zip's own overhead):
    what an upload may be, too."""
    return sum(limits(store).values()) + (1 << 20)


def export(store: Store, path: Path, thumbnails: bool = False) -> None:
    """Write everything the store holds to one file, atomically (StoreError when it cannot).
    Never over one of the store's own files: `edge export store/knowledge.db` replaced the database."""
    path = Path(path)
    if is_store_file(store.folder, path):
        raise StoreError(f"will not write an export over {path}, one of the box's store files; "
                         f"choose another file")
    with store.reading():
        meta_classes, blobs, thumbs = [], [], []
        for info in store.classes():
            ts, source, pictures = store.sample_rows(info.name)
            meta_classes.append({"name": info.name, "button": info.button, "nothing": info.nothing,
                                 "count": len(ts), "ts": ts, "source": source})
            blobs.append(np.ascontiguousarray(store.vectors(info.name), dtype="<f4"))
            if thumbnails:
                thumbs += [p or b"" for p in pictures]
        meta = {"format": FORMAT, "version": VERSION, "model_id": store.model_id, "dim": store.dim,
                "classes": meta_classes, "settings": store.settings(),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "edge": __version__}
    if thumbnails:
        meta["thumbnails"] = [len(t) for t in thumbs]
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                zf.writestr(META, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                with zf.open(VECTORS, "w") as member:
                    np.lib.format.write_array_header_1_0(member, {
                        "descr": "<f4", "fortran_order": False, "shape": (sum(len(b) for b in blobs), store.dim)})
                    for b in blobs:
                        member.write(b.tobytes())
                if thumbnails:
                    zf.writestr(THUMBNAILS, b"".join(thumbs))
        replace_durably(Path(tmp), path)
        tmp = None
    except OSError as e:
        raise StoreError(f"could not export to {path}: {why(e)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def read(store: Store, path: Path, name: Optional[str] = None) -> Imported:
    """Read and check a whole export file for this store without changing anything; a refusal
    in one line (ImportRefused for what the file holds, StoreError when it cannot be read),
    naming it `name` (default: its path)."""
    path = Path(path)
    name = str(path) if name is None else name
    try:
        return _read(store, path)
    except (_Refused, legacy_store.LegacyError, rules.RuleError) as e:
        raise ImportRefused(f"cannot import {name}: {e}") from None
    except OSError as e:
        raise StoreError(f"cannot import {name}: {why(e)}") from None


def apply(store: Store, imported: Imported) -> None:
    """Replace the store's classes, samples and settings with an import's, inside the caller's
    `store.command()`. Imported samples keep their times, get source "import" and one new burst
    per class (so an undo never takes an imported class apart)."""
    for info in store.classes():
        store.remove_class(info.name)
    for key in store.settings():
        store.set_setting(key, None)
    for c in imported.classes:
        store.add_class(c.name, c.button, c.nothing)
        if len(imported.vectors[c.name]):
            store.add_samples(c.name, imported.vectors[c.name], "import", store.new_burst(),
                              imported.thumbnails.get(c.name), ts=imported.ts[c.name])
    for key, value in imported.settings.items():
        store.set_setting(key, value)


def _read(store: Store, path: Path) -> Imported:
    bounds = limits(store)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):     # a device or pipe has no size to check: /dev/zero never ends
        raise _Refused("it is not a regular file")
    size = info.st_size
    if size > import_limit(store):
        raise _Refused(f"it is too large ({size} bytes) for {rules.MAX_CLASSES} classes of "
                       f"{store.max_per_class} samples")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if len(infos) != len(zf.infolist()) or not {META, VECTORS} <= set(infos) <= {META, VECTORS, THUMBNAILS}:
                raise _Refused(f"unexpected members {rules.show(sorted(infos), 80)}")
            raw = {name: legacy_store.read_member(zf, info, bounds[name]) for name, info in infos.items()}
    except (_Refused, legacy_store.LegacyError):
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, RuntimeError,
            NotImplementedError, KeyError, OverflowError, zlib.error) as e:
        raise _Refused(f"damaged or not a zip archive ({why(e)})") from None
    try:
        meta = json.loads(raw[META].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused(f"{META} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Refused("not an edge knowledge file")
    version = meta.get("version")
    if version not in (1, VERSION):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise _Refused(f"format version {rules.show(version)} is not supported (this edge reads 1 and "
                       f"{VERSION})" + ("; update edge" if newer else ""))
    if meta.get("model_id") != store.model_id:
        raise _Refused(f"it was made with a different model ({short_model(meta.get('model_id'))}; "
                       f"this box runs {short_model(store.model_id)})")
    if meta.get("dim") != store.dim:
        raise _Refused(f"it holds {rules.show(meta.get('dim'))}-dim embeddings; this box uses {store.dim}")
    if version == 1:
        return _version_1(store, path, raw[META], raw[VECTORS])
    return _version_2(store, path, meta, raw[VECTORS], raw.get(THUMBNAILS))


def _version_1(store: Store, path: Path, raw_meta: bytes, raw_vectors: bytes) -> Imported:
    meta, classes = legacy_store.knowledge_from_bytes(raw_meta, raw_vectors)
    rows, settings, _ = legacy_store.class_rows(classes, meta["settings"], store.dim, strict=True)
    cap = store.max_per_class
    return Imported(path, 1, [ClassInfo(n, b, False, min(len(v), cap)) for n, b, v in rows], settings,
                    {n: v[-cap:] for n, b, v in rows}, {n: [0.0] * min(len(v), cap) for n, b, v in rows})


def _version_2(store: Store, path: Path, meta: dict, raw_vectors: bytes, raw_thumbs: Optional[bytes]) -> Imported:
    classes, settings = meta.get("classes"), meta.get("settings")
    if not isinstance(classes, list) or not isinstance(settings, dict):
        raise _Refused(f"{META} has no list of classes or no settings")
    if not all(isinstance(c, dict) for c in classes):
        raise _Refused(f"{META} has a class that is not an object")
    names = rules.class_names([c.get("name") for c in classes])
    buttons, counts = [], []
    for c, name in zip(classes, names):
        count, ts, source = c.get("count"), c.get("ts"), c.get("source")
        if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= store.max_per_class * 64
                and isinstance(ts, list) and len(ts) == count and all(rules.is_timestamp(t) for t in ts)
                and isinstance(source, list) and len(source) == count and all(s in SOURCES for s in source)
                and isinstance(c.get("nothing"), bool)):
            raise _Refused(f"class {name!r} has a bad count, ts, source or nothing flag")
        if c.get("button") is not None:
            buttons.append(rules.class_name(c["button"]))
        counts.append(count)
    if len(set(buttons)) != len(buttons):
        raise _Refused("a button is bound to two classes")
    for key in settings:
        if key not in SETTINGS:
            raise _Refused(f"unknown setting {rules.show(key)}")
    clean = {key: SETTINGS[key](value) for key, value in settings.items()}
    total = sum(counts)
    vectors = legacy_store.parse_vectors(raw_vectors, total, store.dim)
    thumbs: List[Optional[bytes]] = [None] * total
    if raw_thumbs is not None:
        sizes = meta.get("thumbnails")
        if not (isinstance(sizes, list) and len(sizes) == total and all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_THUMBNAIL_BYTES for s in sizes)
                and sum(sizes) == len(raw_thumbs)):
            raise _Refused("thumbnails do not match their sizes")
        ends = np.cumsum([0] + sizes).tolist()
        thumbs = [raw_thumbs[a:b] or None for a, b in zip(ends, ends[1:])]
        if not all(t is None or is_thumbnail(t) for t in thumbs):
            raise _Refused(f"{THUMBNAILS} holds something that is not a JPEG picture")
    out = Imported(path, 2, [], clean, {}, {})
    start = 0
    for c, name, count in zip(classes, names, counts):
        keep = min(count, store.max_per_class)
        first, end = start + count - keep, start + count
        out.classes.append(ClassInfo(name, c.get("button"), c["nothing"], keep))
        out.vectors[name] = vectors[first:end]
        out.ts[name] = [float(t) for t in c["ts"][count - keep:]]
        if raw_thumbs is not None:
            out.thumbnails[name] = thumbs[first:end]
        start = end
    return out
