"""Reading the store format of edge 0.x (snapshot `knowledge.npz` + journal `journal.bin`).

Only reading: the SQLite store (edge/store.py) migrates such a folder on its first open and moves
the old files aside. Version-1 export files have the same layout as the snapshot, so import reads
them with `read_knowledge` too. The file formats are described in docs/store.md ("Migration").
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edge import rules

FORMAT = "edge-knowledge"
VERSION = 1
SNAPSHOT = "knowledge.npz"
BACKUP = "knowledge.bak.npz"
JOURNAL = "journal.bin"
FILES = (SNAPSHOT, BACKUP, JOURNAL, ".knowledge.npz.tmp", ".knowledge.bak.npz.tmp", ".journal.bin.tmp")
"""Every file name of the old format (the scratch files of an interrupted write included)."""
META = "meta.json"
VECTORS = "vectors.npy"

_MAGIC = b"EJRN"
_HEAD = struct.Struct("<4sIQ")
_RECORD = struct.Struct("<4sIQII")


class LegacyError(Exception):
    """An old-format file that cannot be used, in one line."""


@dataclass
class Legacy:
    """What an old store held: classes in order (name -> float32 rows), settings, and notes."""
    model_id: str
    dim: int
    classes: Dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def present(folder: Path) -> bool:
    """Whether a folder holds old-format data (a snapshot, its backup or a journal)."""
    return any((folder / name).exists() for name in (SNAPSHOT, BACKUP, JOURNAL))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A zip member's bytes, never more than limit: the declared size is checked before inflating,
    and the read stops at limit + 1 whatever the member claims (a zip bomb cannot get through)."""
    if info.flag_bits & 0x1:
        raise LegacyError(f"member {info.filename!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise LegacyError(f"member {info.filename!r} uses an unsupported compression")
    if info.file_size > limit:
        raise LegacyError(f"member {info.filename!r} is too large ({info.file_size} bytes, limit {limit})")
    with zf.open(info) as member:
        data = member.read(limit + 1)   # reading to the end also checks the CRC
    if len(data) > limit:
        raise LegacyError(f"member {info.filename!r} is too large (over {limit} bytes)")
    if len(data) != info.file_size:
        raise LegacyError(f"member {info.filename!r} is truncated")
    return data


def parse_vectors(raw: bytes, rows: int, dim: int) -> np.ndarray:
    """A (rows, dim) float32 array from .npy bytes; the header is checked before any allocation."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(version)
    except Exception:  # numpy raises several kinds for a bad header; all mean the same here
        raise LegacyError(f"{VECTORS} is not a valid .npy array") from None
    if dtype != np.dtype("<f4") or fortran or tuple(shape) != (rows, dim):
        raise LegacyError(f"{VECTORS} holds {dtype} {tuple(shape)}; expected float32 ({rows}, {dim})")
    data = raw[f.tell():]
    if len(data) != rows * dim * 4:
        raise LegacyError(f"{VECTORS} is truncated")
    vectors = np.frombuffer(data, dtype="<f4").reshape(rows, dim).astype(np.float32)
    problem = rules.vectors_problem(vectors)
    if problem is not None:
        raise LegacyError(f"{VECTORS} holds {problem}")
    return vectors


def read_knowledge(path: Path, meta_limit: int, vector_limit: int) -> Tuple[dict, Dict[str, np.ndarray]]:
    """A version-1 knowledge file (snapshot, backup or export): its meta and its classes' rows."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if sorted(infos) != [META, VECTORS] or len(zf.infolist()) != 2:
                raise LegacyError(f"expected members {META} and {VECTORS}, found {sorted(infos)}")
            raw_meta = read_member(zf, infos[META], meta_limit)
            raw_vectors = read_member(zf, infos[VECTORS], vector_limit)
    except LegacyError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError,
            NotImplementedError, zlib.error, struct.error, KeyError, OverflowError) as e:
        raise LegacyError(f"damaged or not a zip archive ({e})") from None
    return knowledge_from_bytes(raw_meta, raw_vectors)


def knowledge_from_bytes(raw_meta: bytes, raw_vectors: bytes) -> Tuple[dict, Dict[str, np.ndarray]]:
    """The meta and classes of a version-1 file from its two members' bytes (checked)."""
    meta = _parse_meta(raw_meta)
    counts = [c["count"] for c in meta["classes"]]
    vectors = parse_vectors(raw_vectors, sum(counts), meta["dim"])
    classes, start = {}, 0
    for c in meta["classes"]:
        classes[c["name"]] = vectors[start:start + c["count"]]
        start += c["count"]
    return meta, classes


def _parse_meta(raw: bytes) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LegacyError(f"{META} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LegacyError("not an edge knowledge file")
    if meta.get("version") != VERSION:
        raise LegacyError(f"format version {meta.get('version')!r} is not version {VERSION}")
    ok = (isinstance(meta.get("model_id"), str) and _is_int(meta.get("dim")) and meta["dim"] > 0
          and _is_int(meta.get("seq")) and meta["seq"] >= 0 and isinstance(meta.get("settings"), dict)
          and isinstance(meta.get("classes"), list)
          and all(isinstance(c, dict) and isinstance(c.get("name"), str) and _is_int(c.get("count"))
                  and c["count"] >= 1 for c in meta["classes"]))
    if not ok:
        raise LegacyError(f"{META} is incomplete or has wrong types")
    names = [c["name"] for c in meta["classes"]]
    if len(set(names)) != len(names):
        raise LegacyError(f"{META} names a class twice")
    return meta


# --- the journal: replayed on top of the snapshot -----------------------------------------------


def _records(data: bytes):
    """(seq, op) of each intact record in order; stops at the first bad one (a torn tail or damage:
    the old store kept the changes before it in both cases)."""
    pos = 0
    while len(data) - pos >= _RECORD.size:
        magic, length, seq, head_crc, payload_crc = _RECORD.unpack_from(data, pos)
        end = pos + _RECORD.size + length
        if magic != _MAGIC or zlib.crc32(data[pos:pos + _HEAD.size]) != head_crc or end > len(data):
            return
        payload = data[pos + _RECORD.size:end]
        if zlib.crc32(payload) != payload_crc:
            return
        try:
            (n,) = struct.unpack_from("<I", payload, 0)
            op = json.loads(payload[4:4 + n].decode("utf-8"))
            blob = payload[4 + n:]
            if not isinstance(op, dict):
                return
            if "shape" in op:
                rows, dim = op.pop("shape")
                if len(blob) != rows * dim * 4:
                    return
                op["vectors"] = np.frombuffer(blob, dtype="<f4").reshape(rows, dim).astype(np.float32)
        except (ValueError, TypeError, UnicodeDecodeError, struct.error, RecursionError):
            return
        yield seq, op
        pos = end


def _apply(classes: Dict[str, np.ndarray], settings: dict, op: dict, dim: int) -> None:
    """One journal op, as the old store applied it (ValueError if it does not apply)."""
    kind = op.get("op")
    if kind == "add":
        v = op["vectors"]
        if v.ndim != 2 or v.shape[1] != dim or rules.vectors_problem(v) is not None:
            raise ValueError("bad vectors")
        old = classes.get(op["class"])
        classes[op["class"]] = v if old is None else np.concatenate([old, v])
    elif kind == "remove_last":
        name, n = op["class"], int(op["n"])
        if name not in classes:
            raise ValueError(f"no class {name!r}")
        if n >= len(classes[name]):
            del classes[name]
        elif n > 0:
            classes[name] = classes[name][:-n]
    elif kind == "clear":
        del classes[op["class"]]
    elif kind == "clear_all":
        classes.clear()
    elif kind == "rename":
        old, new = op["from"], op["to"]
        if old not in classes or (new != old and new in classes):
            raise ValueError("rename does not apply")
        renamed = {(new if n == old else n): rows for n, rows in classes.items()}
        classes.clear()
        classes.update(renamed)
    elif kind == "settings":
        if not isinstance(op.get("values"), dict):
            raise ValueError("bad settings")
        settings.update(op["values"])
    else:
        raise ValueError(f"unknown op {kind!r}")


def read_store(folder: Path, meta_limit: int = 1 << 20, vector_limit: int = 512 << 20) -> Legacy:
    """The state an old store folder holds: the snapshot (or its backup), then the journal's changes.

    LegacyError when no snapshot, backup or journal can be read at all. A torn or damaged journal
    keeps the changes before the bad record, as the old store did; each such repair is a note.
    """
    notes: List[str] = []
    meta, classes, base = None, {}, 0
    for name in (SNAPSHOT, BACKUP):
        path = folder / name
        if not path.exists():
            continue
        try:
            meta, classes = read_knowledge(path, meta_limit, vector_limit)
            base = meta["seq"]
            break
        except LegacyError as e:
            notes.append(f"old {name} is unusable ({e})")
    settings = dict(meta["settings"]) if meta else {}
    model, dim = (meta["model_id"], meta["dim"]) if meta else (None, None)
    jpath = folder / JOURNAL
    if jpath.exists():
        records = list(_records(jpath.read_bytes()))
        if records and records[0][1].get("op") == "journal":
            header_seq, header = records[0]
            if model is None:
                model, dim = header.get("model_id"), header.get("dim")
                base = 0 if meta is None else base
            if header.get("model_id") != model or header.get("dim") != dim:
                notes.append("old journal belongs to another model; not replayed")
            elif header_seq > base:
                notes.append(f"old journal continues seq {header_seq}, the snapshot ends at {base}; not replayed")
            else:
                expected = header_seq + 1
                for seq, op in records[1:]:
                    if seq != expected:
                        notes.append(f"old journal is out of order at seq {seq}; later changes not replayed")
                        break
                    expected += 1
                    if seq <= base:
                        continue
                    try:
                        _apply(classes, settings, op, dim)
                    except (ValueError, KeyError, TypeError) as e:
                        notes.append(f"old journal record {seq} does not apply ({e}); later changes not replayed")
                        break
        elif meta is None:
            raise LegacyError("old journal is damaged at its start and there is no snapshot")
    if model is None or not isinstance(model, str) or not _is_int(dim):
        raise LegacyError("no readable old snapshot, backup or journal")
    return Legacy(model, dim, classes, settings, notes)


# --- the old settings as class rows ---------------------------------------------------------------


def _fixed_name(name: str, taken: List[str]) -> str:
    """A valid, unused class name as close to an old one as possible (old stores allowed any text)."""
    from edge import rules
    text = "".join(c if (c in rules.NAME_PUNCTUATION or (c.isalnum() and c.isprintable())) else "_"
                   for c in name).strip()[:rules.MAX_NAME].strip() or "class"
    candidate, n = text, 2
    while True:
        try:
            return rules.new_class_name(candidate, taken)
        except rules.RuleError:
            suffix = f" {n}"
            candidate = (text[:rules.MAX_NAME - len(suffix)] + suffix) if text.casefold() not in rules.RESERVED \
                else f"class{suffix}"
            n += 1


def class_rows(classes: Dict[str, np.ndarray], settings: dict, dim: int, buttons: Tuple[str, ...] = (),
               strict: bool = False) -> Tuple[List[Tuple[str, Optional[str], np.ndarray]], dict, List[str]]:
    """Old classes + the old settings `renames` (button -> class) and `extra_classes` as class rows.

    Returns ([(name, button, rows)] in the old box's order, new settings, notes). The old box showed
    its config's buttons first (`buttons`, when known), then classes with samples, then the extra
    classes. `strict` (an import) raises LegacyError on the first value that breaks a rule;
    otherwise (a migration) bad values are fixed or dropped with a note, and no sample is lost
    unless the classes are over the limit (their files stay aside).
    """
    from edge import rules
    notes: List[str] = []

    def fault(message: str) -> None:
        if strict:
            raise LegacyError(message)
        notes.append(message)

    unknown = sorted(k for k in settings if k not in ("threshold", "renames", "extra_classes"))
    if unknown:
        fault(f"unknown settings {rules.show(unknown)}")
    new_settings = {}
    if "threshold" in settings:
        try:
            new_settings["threshold"] = rules.threshold(settings["threshold"])
        except rules.RuleError as e:
            fault(f"setting threshold: {e}")
    renames = settings.get("renames", {})
    if not isinstance(renames, dict) or not all(isinstance(v, str) for v in renames.values()):
        fault(f"setting renames must map buttons to class names, got {rules.show(renames)}")
        renames = {}
    extra = settings.get("extra_classes", [])
    if not isinstance(extra, list) or not all(isinstance(e, str) for e in extra):
        fault(f"setting extra_classes must be a list of class names, got {rules.show(extra)}")
        extra = []
    if strict:
        for button, name in renames.items():
            rules.class_name(button)
            rules.class_name(name)
        rules.class_names(extra)
    bound = {name: button for button, name in renames.items()}
    entries: List[Tuple[str, Optional[str]]] = [(renames.get(b, b), b) for b in buttons]
    listed = {name for name, _ in entries}
    for name in list(classes) + [n for n in renames.values() if not buttons] + extra:
        if name in listed:
            continue
        listed.add(name)
        if name in bound:
            entries.append((name, bound[name]))
        elif not buttons and name in classes and name not in extra:
            entries.append((name, name))   # a button class never renamed: its button has its name
        else:
            entries.append((name, None))
    if buttons:   # classes without samples that the config no longer shows are not kept
        entries = [(n, b) for n, b in entries if b in buttons or n in classes or n in extra]

    rows: List[Tuple[str, Optional[str], np.ndarray]] = []
    names: List[str] = []
    empty = np.zeros((0, dim), np.float32)
    for name, button in entries:
        try:
            good = rules.new_class_name(name, names)
        except rules.RuleError as e:
            fault(f"class {rules.show(name)}: {e}")
            good = _fixed_name(name, names)
            notes[-1] += f"; renamed to {good!r}"
        if button is not None:
            try:
                rules.class_name(button)
            except rules.RuleError as e:
                fault(f"button of class {good!r}: {e}")
                button = None
        names.append(good)
        rows.append((good, button, classes.get(name, empty)))
    if len(rows) > rules.MAX_CLASSES:
        keep = [i for i, r in enumerate(rows) if len(r[2])][:rules.MAX_CLASSES]
        keep += [i for i, r in enumerate(rows) if not len(r[2])][:rules.MAX_CLASSES - len(keep)]
        dropped = [r[0] for i, r in enumerate(rows) if i not in keep]
        fault(f"{len(rows)} classes, at most {rules.MAX_CLASSES}: not kept {rules.show(dropped, 80)}")
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows, new_settings, notes
