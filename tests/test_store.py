"""The store: memory that survives reboots and power cuts. Real files, real processes, real SIGKILL.

EDGE_KILL_TRIALS sets the number of kill -9 trials per kill test (default 25); EDGE_KILL_SEED
replays a failing run.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge import store as st
from edge.store import Knowledge, Store, StoreError, model_id

REPO = Path(__file__).resolve().parent.parent
D = 8
MODEL = "a" * 64
OTHER = "b" * 64


def vec(value: float, n: int = 1, dim: int = D) -> np.ndarray:
    return np.full((n, dim), value, np.float32)


def rows(value_from: int, n: int, dim: int = D) -> np.ndarray:
    """n rows whose values are value_from, value_from+1, ... (so order is visible)."""
    return np.repeat(np.arange(value_from, value_from + n, dtype=np.float32)[:, None], dim, axis=1)


def make(folder: Path, model: str = MODEL, dim: int = D, **kw) -> Store:
    return Store(folder, model, dim, **kw)


def opened(folder: Path, **kw) -> Store:
    s = make(folder, **kw)
    s.open()
    return s


def die(s: Store) -> None:
    """What a crash leaves: files as they are, no compaction, the lock released by the kernel."""
    s._close_files()


def files(folder: Path) -> dict:
    """Every file under the folder (but the lock) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != st.LOCK}


def sample_ops() -> list:
    return [
        {"op": "add", "class": "A", "vectors": rows(0, 3)},
        {"op": "add", "class": "B", "vectors": rows(10, 2)},
        {"op": "add", "class": "A", "vectors": rows(3, 2)},
        {"op": "settings", "values": {"threshold": 0.62, "mode": "knn"}},
        {"op": "remove_last", "class": "A", "n": 1},
        {"op": "add", "class": "C", "vectors": rows(20, 1)},
        {"op": "rename", "from": "B", "to": "Bee"},
        {"op": "clear", "class": "C"},
        {"op": "settings", "values": {"threshold": "auto"}},
        {"op": "add", "class": "Zed ü/..", "vectors": rows(30, 2)},
    ]


def filled(folder: Path, **kw) -> Store:
    s = opened(folder, **kw)
    for op in sample_ops():
        s.append(op)
    return s


# --- Knowledge: the pure state ----------------------------------------------------------------


def test_every_op_in_memory():
    k = Knowledge(D)
    k.apply({"op": "add", "class": "A", "vectors": rows(0, 2)})
    k.apply({"op": "add", "class": "B", "vectors": rows(10, 1)[0]})  # one row as a 1-D vector
    k.apply({"op": "add", "class": "A", "vectors": rows(2, 2)})
    assert list(k.classes) == ["A", "B"] and k.counts() == {"A": 4, "B": 1}
    assert k.classes["A"][:, 0].tolist() == [0, 1, 2, 3]
    k.apply({"op": "remove_last", "class": "A", "n": 3})
    assert k.classes["A"][:, 0].tolist() == [0]
    k.apply({"op": "remove_last", "class": "A", "n": 0})
    assert k.counts() == {"A": 1, "B": 1}
    k.apply({"op": "add", "class": "C", "vectors": rows(5, 1)})
    k.apply({"op": "rename", "from": "A", "to": "Alpha"})
    assert list(k.classes) == ["Alpha", "B", "C"]  # a rename keeps the position
    k.apply({"op": "rename", "from": "B", "to": "B"})  # onto itself: nothing to do
    k.apply({"op": "remove_last", "class": "Alpha", "n": 5})  # undoing everything removes the class
    assert list(k.classes) == ["B", "C"]
    k.apply({"op": "clear", "class": "B"})
    assert list(k.classes) == ["C"]
    k.apply({"op": "settings", "values": {"threshold": 0.62}})
    k.apply({"op": "settings", "values": {"mode": "knn", "threshold": "auto"}})
    assert k.settings == {"threshold": "auto", "mode": "knn"}
    k.apply({"op": "clear_all"})
    assert k.classes == {} and k.settings == {"threshold": "auto", "mode": "knn"}


def test_cap_keeps_the_newest_samples():
    k = Knowledge(D, max_per_class=5)
    k.apply({"op": "add", "class": "A", "vectors": rows(0, 3)})
    k.apply({"op": "add", "class": "A", "vectors": rows(3, 4)})
    assert k.classes["A"][:, 0].tolist() == [2, 3, 4, 5, 6]
    k.apply({"op": "add", "class": "B", "vectors": rows(100, 9)})
    assert k.classes["B"][:, 0].tolist() == [104, 105, 106, 107, 108]


BAD_OPS = [
    "not a dict",
    {"op": "explode"},
    {"class": "A"},
    {"op": "add", "class": "A"},
    {"op": "add", "class": "A", "vectors": rows(0, 1), "extra": 1},
    {"op": "add", "class": "", "vectors": rows(0, 1)},
    {"op": "add", "class": 7, "vectors": rows(0, 1)},
    {"op": "add", "class": "x" * 201, "vectors": rows(0, 1)},
    {"op": "add", "class": "A", "vectors": rows(0, 1, dim=D + 1)},
    {"op": "add", "class": "A", "vectors": rows(0, 1).astype(np.float64)},
    {"op": "add", "class": "A", "vectors": rows(0, 1).tolist()},
    {"op": "add", "class": "A", "vectors": np.zeros((0, D), np.float32)},
    {"op": "add", "class": "A", "vectors": np.zeros((2, 2, D), np.float32)},
    {"op": "add", "class": "A", "vectors": np.array([[np.nan] * D], np.float32)},
    {"op": "add", "class": "A", "vectors": np.vstack([rows(0, 1), np.full((1, D), np.inf, np.float32)])},
    {"op": "remove_last", "class": "nope", "n": 1},
    {"op": "remove_last", "class": "A", "n": -1},
    {"op": "remove_last", "class": "A", "n": True},
    {"op": "remove_last", "class": "A", "n": 1.0},
    {"op": "clear", "class": "nope"},
    {"op": "rename", "from": "nope", "to": "X"},
    {"op": "rename", "from": "A", "to": "B"},
    {"op": "rename", "from": "A", "to": ""},
    {"op": "settings", "values": [1, 2]},
    {"op": "settings", "values": {1: "x"}},
    {"op": "settings", "values": {"t": float("nan")}},
    {"op": "settings", "values": {"t": object()}},
    {"op": "settings", "values": {"t": "x" * (st.MAX_SETTINGS_BYTES + 1)}},
]


@pytest.mark.parametrize("op", BAD_OPS, ids=range(len(BAD_OPS)))
def test_an_invalid_op_raises_and_changes_nothing(op):
    k = Knowledge(D, max_per_class=10)
    k.apply({"op": "add", "class": "A", "vectors": rows(0, 3)})
    k.apply({"op": "add", "class": "B", "vectors": rows(10, 2)})
    k.apply({"op": "settings", "values": {"threshold": 0.5}})
    before, arrays = k.copy(), dict(k.classes)
    with pytest.raises(ValueError):
        k.apply(op)
    assert k == before
    assert all(k.classes[n] is arrays[n] for n in arrays)


def test_stored_arrays_are_private_and_read_only():
    k = Knowledge(D)
    v = rows(0, 2)
    k.apply({"op": "add", "class": "A", "vectors": v})
    v[:] = 99  # the caller reusing its buffer must not change what was learned
    assert k.classes["A"][:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError):
        k.classes["A"][0, 0] = 5
    c = k.copy()
    c.apply({"op": "add", "class": "A", "vectors": rows(2, 1)})
    c.apply({"op": "settings", "values": {"x": [1]}})
    assert k.counts() == {"A": 2} and k.settings == {} and c != k


# --- Store: round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("compact", [False, True], ids=["replay-journal", "from-snapshot"])
def test_every_op_round_trips_through_the_disk(tmp_path, compact):
    s = filled(tmp_path / "s")
    expected = s.knowledge.copy()
    assert s.seq == len(sample_ops())
    assert list(expected.classes) == ["A", "Bee", "Zed ü/.."]
    assert expected.settings == {"threshold": "auto", "mode": "knn"}
    s.close(compact=compact)
    again = make(tmp_path / "s")
    assert again.open() == expected and again.seq == len(sample_ops()) and again.events == []
    again.append({"op": "clear_all"})
    again.close(compact=compact)
    last = make(tmp_path / "s")
    assert last.open().classes == {} and last.knowledge.settings == expected.settings
    last.close()


def test_knowledge_is_one_object_whose_dicts_are_replaced_not_edited(tmp_path):
    s = make(tmp_path / "s")
    k = s.knowledge
    assert s.open() is k
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    view, settings = k.classes, k.settings  # what a reader thread took
    s.append({"op": "rename", "from": "A", "to": "B"})
    s.append({"op": "settings", "values": {"threshold": 0.5}})
    assert s.knowledge is k and list(k.classes) == ["B"] and k.settings == {"threshold": 0.5}
    assert list(view) == ["A"] and settings == {}  # the reader's view stayed consistent
    s.close()


def test_an_invalid_append_raises_value_error_and_writes_nothing(tmp_path):
    s = opened(tmp_path / "s", max_per_class=10)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 3)})
    s.append({"op": "add", "class": "B", "vectors": rows(10, 2)})
    before, on_disk = s.knowledge.copy(), files(tmp_path / "s")
    for op in BAD_OPS:
        with pytest.raises(ValueError):
            s.append(op)
    assert s.knowledge == before and files(tmp_path / "s") == on_disk
    s.close()


def test_closed_store_refuses_and_close_is_idempotent(tmp_path):
    s = filled(tmp_path / "s")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="not open"):
        s.append({"op": "clear_all"})
    with pytest.raises(StoreError, match="not open"):
        s.compact()
    assert s.open() is s.knowledge and s.knowledge.counts() == {"A": 4, "Bee": 2, "Zed ü/..": 2}
    s.close()


def test_cap_applies_on_disk_too(tmp_path):
    s = opened(tmp_path / "s", max_per_class=4)
    for i in range(0, 10, 2):
        s.append({"op": "add", "class": "A", "vectors": rows(i, 2)})
    assert s.knowledge.classes["A"][:, 0].tolist() == [6, 7, 8, 9]
    s.close(compact=False)
    again = opened(tmp_path / "s", max_per_class=4)
    assert again.knowledge.classes["A"][:, 0].tolist() == [6, 7, 8, 9]
    again.close()
    smaller = opened(tmp_path / "s", max_per_class=2)  # a smaller cap trims the oldest on load
    assert smaller.knowledge.classes["A"][:, 0].tolist() == [8, 9]
    smaller.close()


def test_model_id_is_the_sha256_of_the_file(tmp_path):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"model bytes")
    assert model_id(p) == hashlib.sha256(b"model bytes").hexdigest()


# --- compaction ---------------------------------------------------------------------------------


def journal_records(folder: Path) -> int:
    return len(st._scan_journal((folder / st.JOURNAL).read_bytes()).records)


def snapshot_seq(path: Path) -> int:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(st.META_MEMBER))["seq"]


def test_compaction_by_record_count_and_by_size(tmp_path):
    s = opened(tmp_path / "a", compact_records=5)
    for i in range(12):
        s.append({"op": "add", "class": "A", "vectors": rows(i, 1)})
        assert journal_records(tmp_path / "a") < 5
    assert snapshot_seq(tmp_path / "a" / st.SNAPSHOT) == 10
    assert snapshot_seq(tmp_path / "a" / st.BACKUP) == 5  # the previous snapshot, kept as backup
    expected = s.knowledge.copy()
    s.close(compact=False)
    assert opened(tmp_path / "a").knowledge == expected

    big = opened(tmp_path / "b", dim=256, compact_bytes=20_000)
    for i in range(30):
        big.append({"op": "add", "class": "A", "vectors": rows(i, 2, dim=256)})
        assert (tmp_path / "b" / st.JOURNAL).stat().st_size < 20_000 + 2 * 256 * 4 + 200
    big.close()


def test_close_compacts_and_an_idle_store_keeps_its_backup(tmp_path):
    s = filled(tmp_path / "s")
    s.close()
    assert journal_records(tmp_path / "s") == 0
    assert snapshot_seq(tmp_path / "s" / st.SNAPSHOT) == len(sample_ops())
    before = files(tmp_path / "s")
    s.open()
    s.compact()
    s.close()  # nothing changed: no new snapshot, the backup stays the last *different* state
    assert files(tmp_path / "s") == before


def test_compaction_that_fails_on_a_full_disk_changes_nothing(tmp_path, monkeypatch):
    s = filled(tmp_path / "s")
    expected, before = s.knowledge.copy(), files(tmp_path / "s")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match="No space left on device"):
        s.compact()
    monkeypatch.undo()
    assert s.knowledge == expected and files(tmp_path / "s") == before  # no temp file left either
    s.append({"op": "add", "class": "A", "vectors": rows(50, 1)})
    expected = s.knowledge.copy()
    s.close()
    assert opened(tmp_path / "s").knowledge == expected


def test_automatic_compaction_failure_does_not_fail_the_append(tmp_path, monkeypatch, caplog):
    s = opened(tmp_path / "s", compact_records=3)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.append({"op": "add", "class": "A", "vectors": rows(1, 1)})
    real = st.Store._write_snapshot

    def full(self, *a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.Store, "_write_snapshot", full)
    with caplog.at_level(logging.WARNING, logger="edge.store"):
        s.append({"op": "add", "class": "A", "vectors": rows(2, 1)})  # saved; compaction postponed
    assert "could not compact" in caplog.text
    monkeypatch.setattr(st.Store, "_write_snapshot", real)
    expected = s.knowledge.copy()
    die(s)
    assert opened(tmp_path / "s").knowledge == expected


class Crash(BaseException):
    """A simulated power cut: not an OSError, so no handler in the store catches it."""


def crash_at(monkeypatch, step: int) -> dict:
    """Make the step-th durable file-system call (fsync, rename, link, truncate) never happen."""
    count = {"n": 0}
    for name in ("fsync", "replace", "rename", "link", "ftruncate", "truncate", "unlink"):
        real = getattr(os, name)

        def wrapper(*a, _real=real, **kw):
            if count["n"] == step:
                raise Crash()
            count["n"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(os, name, wrapper)
    return count


def test_a_crash_at_every_step_of_compaction_loses_nothing(tmp_path, monkeypatch):
    base = tmp_path / "base"
    s = filled(base)
    s.compact()
    s.append({"op": "add", "class": "New", "vectors": rows(40, 2)})
    s.append({"op": "settings", "values": {"threshold": 0.7}})
    expected = s.knowledge.copy()
    die(s)
    probe = opened(shutil.copytree(base, tmp_path / "probe"))
    count = crash_at(monkeypatch, 10**9)
    probe.compact()
    monkeypatch.undo()
    steps = count["n"]
    assert steps >= 6
    for step in range(steps):
        folder = shutil.copytree(base, tmp_path / f"crash{step}")
        s = opened(folder)
        crash_at(monkeypatch, step)
        with pytest.raises(Crash):
            s.compact()
        monkeypatch.undo()
        die(s)
        again = opened(folder)
        assert again.knowledge == expected, f"crash at step {step}"
        assert again.events == [] and not (folder / st.ASIDE).exists(), f"crash at step {step}"
        again.append({"op": "add", "class": "New", "vectors": rows(42, 1)})
        after = again.knowledge.copy()
        die(again)
        assert opened(folder).knowledge == after, f"crash at step {step}"


# --- torn and damaged journals ------------------------------------------------------------------


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path, caplog):
    folder = tmp_path / "s"
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 2)})
    s.append({"op": "add", "class": "B", "vectors": rows(10, 1)})
    expected, start = s.knowledge.copy(), s._jsize
    s.append({"op": "add", "class": "A", "vectors": rows(2, 3)})
    full = s.knowledge.copy()
    die(s)
    data = (folder / st.JOURNAL).read_bytes()
    assert len(data) - start > 100
    for tail in ("cut", "zeros", "garbage"):
        for cut in range(start, len(data)):
            torn = data[:cut]
            if tail == "zeros":  # the size reached the disk, the data did not
                torn += bytes(len(data) - cut)
            elif tail == "garbage":
                torn += np.random.default_rng(cut).integers(0, 256, len(data) - cut, np.uint8).tobytes()
            (folder / st.JOURNAL).write_bytes(torn)
            with caplog.at_level(logging.WARNING, logger="edge.store"):
                caplog.clear()
                again = opened(folder)
            assert again.knowledge == expected, f"{tail} at {cut}"
            assert (folder / st.JOURNAL).stat().st_size == start  # the torn record is cut away
            if len(torn) > start:
                assert len(again.events) == 1 and "torn record" in again.events[0]
                assert "torn record" in caplog.text
            assert not (folder / st.ASIDE).exists()
            die(again)
    (folder / st.JOURNAL).write_bytes(data)
    again = opened(folder)
    assert again.knowledge == full and again.events == []
    # after a repaired tail, appending goes on normally
    (folder / st.JOURNAL).write_bytes(data[:-7])
    die(again)
    again = opened(folder)
    again.append({"op": "add", "class": "C", "vectors": rows(7, 1)})
    expected.apply({"op": "add", "class": "C", "vectors": rows(7, 1)})
    die(again)
    assert opened(folder).knowledge == expected


@pytest.mark.parametrize("where", ["payload", "head"])
def test_damage_in_the_middle_of_the_journal_is_kept_aside(tmp_path, where, caplog):
    folder = tmp_path / "s"
    s = opened(folder)
    ends = [s._jsize]
    for i in range(4):
        s.append({"op": "add", "class": "A", "vectors": rows(i, 1)})
        ends.append(s._jsize)
    die(s)
    data = bytearray((folder / st.JOURNAL).read_bytes())
    original = bytes(data)
    # damage the second record: a byte of its vectors, or a byte of its seq in the framing
    data[ends[2] - 3 if where == "payload" else ends[1] + 9] ^= 0x40
    (folder / st.JOURNAL).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edge.store"):
        again = opened(folder)
    assert again.knowledge.classes["A"][:, 0].tolist() == [0]
    assert any("damaged in the middle" in e and "kept aside" in e for e in again.events)
    assert "damaged in the middle" in caplog.text
    [aside] = (folder / st.ASIDE).iterdir()
    assert (aside / st.JOURNAL).read_bytes() == bytes(data)  # moved, not changed
    assert original != bytes(data)
    again.append({"op": "add", "class": "A", "vectors": rows(9, 1)})
    die(again)
    last = opened(folder)
    assert last.knowledge.classes["A"][:, 0].tolist() == [0, 9] and last.events == []
    last.close()


def damaged_journal(folder: Path) -> None:
    s = opened(folder)
    for i in range(4):
        s.append({"op": "add", "class": "A", "vectors": rows(i, 1)})
    die(s)
    data = bytearray((folder / st.JOURNAL).read_bytes())
    data[-40] ^= 0xFF  # inside the third record's vectors: records 3 and 4 cannot be trusted
    data[-200] ^= 0xFF
    (folder / st.JOURNAL).write_bytes(bytes(data))


def damaged_snapshot(folder: Path) -> None:
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.compact()
    s.append({"op": "add", "class": "B", "vectors": rows(1, 1)})
    s._write_snapshot(s.knowledge, s.seq)  # backup seq 1 + journal 2 is consistent
    die(s)
    corrupt(folder / st.SNAPSHOT)


@pytest.mark.parametrize("damage", [damaged_journal, damaged_snapshot], ids=["journal", "snapshot"])
def test_a_crash_at_every_step_of_an_open_time_repair(tmp_path, monkeypatch, damage):
    base = tmp_path / "base"
    damage(base)
    probe = make(shutil.copytree(base, tmp_path / "probe"))
    count = crash_at(monkeypatch, 10**9)
    probe.open()
    monkeypatch.undo()
    expected = probe.knowledge.copy()
    assert probe.events and expected.classes
    for step in range(count["n"]):
        folder = shutil.copytree(base, tmp_path / f"crash{step}")
        s = make(folder)
        crash_at(monkeypatch, step)
        with pytest.raises(Crash):
            s.open()
        monkeypatch.undo()
        die(s)
        again = opened(folder)
        assert again.knowledge == expected, f"crash at step {step}"
        die(again)
        assert opened(folder).events == [], f"crash at step {step}: repaired for good"


def test_missing_journal_is_started_again(tmp_path):
    s = filled(tmp_path / "s")
    s.close()
    expected = s.knowledge.copy()
    (tmp_path / "s" / st.JOURNAL).unlink()  # e.g. a crash right after the first snapshot
    again = opened(tmp_path / "s")
    assert again.knowledge == expected and again.events == []
    assert journal_records(tmp_path / "s") == 0
    again.close()


# --- damaged snapshots --------------------------------------------------------------------------


def corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_snapshot_falls_back_to_backup_plus_journal(tmp_path, caplog):
    folder = tmp_path / "s"
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.compact()                                   # snapshot seq 1, journal from 1
    s.append({"op": "add", "class": "B", "vectors": rows(1, 1)})
    s.append({"op": "settings", "values": {"threshold": 0.3}})
    s._write_snapshot(s.knowledge, s.seq)         # a compaction cut short after its snapshot
    expected = s.knowledge.copy()
    die(s)
    corrupt(folder / st.SNAPSHOT)
    bad = (folder / st.SNAPSHOT).read_bytes()
    with caplog.at_level(logging.WARNING, logger="edge.store"):
        again = opened(folder)
    assert again.knowledge == expected  # backup (seq 1) + journal records 2, 3
    assert "unreadable" in caplog.text and "backup" in caplog.text
    [aside] = (folder / st.ASIDE).iterdir()
    assert aside.name.endswith("corrupt-snapshot") and (aside / st.SNAPSHOT).read_bytes() == bad
    die(again)
    assert opened(folder).knowledge == expected


def test_corrupt_snapshot_with_a_later_journal_uses_the_backup_alone(tmp_path):
    folder = tmp_path / "s"
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.compact()
    backup_state = s.knowledge.copy()
    s.append({"op": "add", "class": "B", "vectors": rows(1, 1)})
    s.compact()                                   # backup seq 1, snapshot seq 2
    s.append({"op": "add", "class": "C", "vectors": rows(2, 1)})  # journal from seq 2
    die(s)
    corrupt(folder / st.SNAPSHOT)
    again = opened(folder)
    assert again.knowledge == backup_state  # never mixed with records that follow seq 2
    reasons = sorted(p.name.split("-", 2)[2] for p in (folder / st.ASIDE).iterdir())
    assert reasons == ["corrupt-snapshot", "journal"]
    assert any("gap" in e for e in again.events)
    again.close()


def test_corrupt_snapshot_and_backup_start_empty_or_replay_a_journal_from_zero(tmp_path):
    folder = tmp_path / "a"
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.compact()
    s.append({"op": "add", "class": "B", "vectors": rows(1, 1)})
    s.compact()
    s.append({"op": "add", "class": "C", "vectors": rows(2, 1)})
    die(s)
    corrupt(folder / st.SNAPSHOT)
    corrupt(folder / st.BACKUP)
    again = opened(folder)
    assert again.knowledge.classes == {} and any("starting from empty" in e for e in again.events)
    assert len(list((folder / st.ASIDE).iterdir())) == 3  # snapshot, backup, journal
    again.close()

    folder = tmp_path / "b"  # the journal still starts at seq 0: nothing is lost
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    s.append({"op": "add", "class": "B", "vectors": rows(1, 1)})
    expected = s.knowledge.copy()
    die(s)
    corrupt(folder / st.SNAPSHOT)
    assert opened(folder).knowledge == expected


def test_a_store_from_another_model_is_kept_aside_and_the_box_starts_empty(tmp_path, caplog):
    folder = tmp_path / "s"
    s = filled(folder)
    s.close()
    s = opened(folder)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    die(s)
    before = files(folder)
    with caplog.at_level(logging.WARNING, logger="edge.store"):
        other = opened(folder, model=OTHER)
    assert other.knowledge.classes == {} and other.knowledge.settings == {}
    line = [r.getMessage() for r in caplog.records if "made with model" in r.getMessage()]
    assert len(line) == 1 and "\n" not in line[0]
    assert f"made with model {MODEL[:12]}; this box runs model {OTHER[:12]}; kept aside in" in line[0]
    [aside] = (folder / st.ASIDE).iterdir()
    assert aside.name.endswith("-other-model")
    moved = {k: v for k, v in files(folder).items() if k.startswith(st.ASIDE)}
    assert {Path(k).name: v for k, v in moved.items()} == before  # all three files, byte for byte
    other.append({"op": "add", "class": "New", "vectors": rows(5, 1)})
    other.close()
    assert opened(folder, model=OTHER).knowledge.counts() == {"New": 1}


def test_a_store_with_another_dim_is_kept_aside(tmp_path):
    s = filled(tmp_path / "s")
    s.close()
    wide = opened(tmp_path / "s", dim=D * 2)
    assert wide.knowledge.classes == {} and "dim" in wide.events[0]
    [aside] = (tmp_path / "s" / st.ASIDE).iterdir()
    assert aside.name.endswith("-other-dim")
    with pytest.raises(ValueError, match="shape"):
        wide.append({"op": "add", "class": "A", "vectors": rows(0, 1)})
    wide.close()


def rewrite_meta(path: Path, **changes) -> None:
    with zipfile.ZipFile(path) as zf:
        meta, vectors = json.loads(zf.read(st.META_MEMBER)), zf.read(st.VECTORS_MEMBER)
    meta.update(changes)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(st.META_MEMBER, json.dumps(meta))
        zf.writestr(st.VECTORS_MEMBER, vectors)


@pytest.mark.parametrize("which", ["snapshot", "journal"])
def test_a_newer_format_is_refused_and_left_alone(tmp_path, which):
    folder = tmp_path / "s"
    s = filled(folder)
    s.close()
    if which == "snapshot":
        rewrite_meta(folder / st.SNAPSHOT, version=st.FORMAT_VERSION + 1)
    else:
        header = {"op": "journal", "version": st.FORMAT_VERSION + 1, "model_id": MODEL, "dim": D}
        (folder / st.JOURNAL).write_bytes(st._encode_record(10, header) + b"future records")
    before = files(folder)
    for _ in range(2):  # the lock is released after a refusal
        with pytest.raises(StoreError, match="newer edge"):
            make(folder).open()
    assert files(folder) == before and not (folder / st.ASIDE).exists()


# --- the lock -----------------------------------------------------------------------------------


def test_a_second_opener_in_the_same_process_is_refused(tmp_path):
    s = opened(tmp_path / "s")
    with pytest.raises(StoreError, match=r"is in use by another edge process \(pid \d+\)"):
        make(tmp_path / "s").open()
    s.close()
    make(tmp_path / "s").open()


HOLDER = """
import sys, time
from pathlib import Path
from edge.store import Store
Store(Path(sys.argv[1]), sys.argv[2], 8).open()
print("open", flush=True)
time.sleep(60)
"""


def test_a_second_edge_process_is_refused_until_the_first_dies(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "s"), MODEL],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match=f"in use by another edge process \\(pid {child.pid}\\)"):
            make(tmp_path / "s").open()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    s = opened(tmp_path / "s")  # the kernel released the lock of the dead process
    s.close()


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_during_append_changes_neither_file_nor_memory(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    s = filled(folder)
    expected, before = s.knowledge.copy(), files(folder)
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 8:
            real_write(fd, bytes(data[: len(data) // 2]))  # the disk takes half, then is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StoreError, match="No space left on device") as err:
        s.append({"op": "add", "class": "A", "vectors": rows(70, 3)})
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert s.knowledge == expected and files(folder) == before

    def fsync_fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(StoreError, match="Input/output error"):
        s.append({"op": "rename", "from": "A", "to": "Q"})
    monkeypatch.undo()
    assert s.knowledge == expected and files(folder) == before

    s.append({"op": "add", "class": "A", "vectors": rows(80, 1)})  # space is back: all works again
    expected = s.knowledge.copy()
    die(s)
    assert opened(folder).knowledge == expected


FSIZE_CHILD = """
import os, resource, signal, sys
from pathlib import Path
import numpy as np
from edge.store import Store, StoreError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
folder = Path(sys.argv[1])
s = Store(folder, sys.argv[2], 256)
s.open()
s.append({"op": "add", "class": "A", "vectors": np.ones((1, 256), np.float32)})
journal = folder / "journal.bin"
before = journal.read_bytes()
resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, resource.RLIM_INFINITY))
try:
    s.append({"op": "add", "class": "A", "vectors": np.ones((4, 256), np.float32)})
    print("saved")
except StoreError as e:
    print("refused:", e)
print("same file:", journal.read_bytes() == before)
print("counts:", s.knowledge.counts())
s.close(compact=False)
"""


def test_a_real_file_size_limit_in_a_child_process(tmp_path):
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "s"), MODEL],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: could not save to") and "too large" in lines[0]
    assert lines[1:] == ["same file: True", "counts: {'A': 1}"]
    s = opened(tmp_path / "s", dim=256)
    assert s.knowledge.counts() == {"A": 1} and s.events == []
    s.close()


# --- export and import --------------------------------------------------------------------------


def test_export_then_import_into_another_box(tmp_path):
    s = filled(tmp_path / "a")
    s.export(tmp_path / "lesson.npz")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with np.load(tmp_path / "lesson.npz") as npz:  # plain numpy can read it
        assert npz["vectors"].shape == (8, D)
    box = opened(tmp_path / "b")
    box.append({"op": "add", "class": "Old", "vectors": rows(99, 2)})
    old = box.knowledge.copy()
    got = box.import_file(tmp_path / "lesson.npz")
    assert got is box.knowledge and got == s.knowledge
    box.append({"op": "add", "class": "After", "vectors": rows(5, 1)})
    expected = box.knowledge.copy()
    die(box)
    again = opened(tmp_path / "b")
    assert again.knowledge == expected
    die(again)
    # the state before the import is the backup: lose the snapshot and the backup is what remains
    corrupt(tmp_path / "b" / st.SNAPSHOT)
    assert opened(tmp_path / "b").knowledge == old


def test_import_trims_to_this_boxs_cap(tmp_path):
    s = opened(tmp_path / "a", max_per_class=50)
    s.append({"op": "add", "class": "A", "vectors": rows(0, 10)})
    s.export(tmp_path / "x.npz")
    small = opened(tmp_path / "b", max_per_class=3)
    assert small.import_file(tmp_path / "x.npz").classes["A"][:, 0].tolist() == [7, 8, 9]


def test_a_crash_at_every_step_of_import_leaves_old_or_new_never_a_mix(tmp_path, monkeypatch):
    src = filled(tmp_path / "src")
    src.export(tmp_path / "x.npz")
    new = src.knowledge.copy()
    base = tmp_path / "base"
    s = opened(base)
    s.append({"op": "add", "class": "Mine", "vectors": rows(50, 2)})
    old = s.knowledge.copy()
    die(s)
    probe = opened(shutil.copytree(base, tmp_path / "probe"))
    count = crash_at(monkeypatch, 10**9)
    probe.import_file(tmp_path / "x.npz")
    monkeypatch.undo()
    seen = set()
    for step in range(count["n"]):
        folder = shutil.copytree(base, tmp_path / f"crash{step}")
        s = opened(folder)
        crash_at(monkeypatch, step)
        with pytest.raises(Crash):
            s.import_file(tmp_path / "x.npz")
        monkeypatch.undo()
        die(s)
        again = opened(folder)
        assert again.knowledge in (old, new), f"crash at step {step}"
        assert again.events == [], f"crash at step {step}"
        seen.add("new" if again.knowledge == new else "old")
        again.append({"op": "add", "class": "Later", "vectors": rows(1, 1)})  # no gap in the journal
        after = again.knowledge.copy()
        die(again)
        last = opened(folder)
        assert last.knowledge == after and last.events == [], f"crash at step {step}"
        die(last)
    assert seen == {"old", "new"}


def zip_bytes(members, compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as zf:
        warnings.simplefilter("ignore")  # a duplicate name is what one case wants
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data) if compression == zipfile.ZIP_STORED \
                else zf.writestr(name, data, compress_type=compression)
    return buf.getvalue()


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def meta(**changes) -> bytes:
    m = {"format": st.FORMAT, "version": st.FORMAT_VERSION, "model_id": MODEL, "dim": D, "seq": 3,
         "classes": [{"name": "A", "count": 2}, {"name": "B", "count": 1}], "settings": {"t": 1}}
    m.update(changes)
    return json.dumps(m).encode()


GOOD_VECTORS = rows(0, 3)


def archive(meta_bytes=None, vectors=None, extra=()) -> bytes:
    return zip_bytes([(st.META_MEMBER, meta() if meta_bytes is None else meta_bytes),
                      (st.VECTORS_MEMBER, npy(GOOD_VECTORS if vectors is None else vectors)), *extra])


def nan_rows():
    v = GOOD_VECTORS.copy()
    v[1, 3] = np.nan
    return v


def damaged() -> bytes:
    data = bytearray(archive())
    i = bytes(data).index(npy(GOOD_VECTORS)) + 140  # a byte of the vectors: its CRC no longer matches
    data[i] ^= 0x01
    return bytes(data)


REFUSED = {
    "newer version": (lambda: archive(meta(version=st.FORMAT_VERSION + 1)), "newer edge"),
    "old version": (lambda: archive(meta(version=0)), "not supported"),
    "other model": (lambda: archive(meta(model_id=OTHER)), "made with a different model"),
    "other dim": (lambda: archive(meta(dim=4), rows(0, 3, dim=4)), "4-dim"),
    "damaged": (damaged, "damaged|CRC"),
    "truncated": (lambda: archive()[:-40], "damaged or not a zip"),
    "half": (lambda: archive()[: len(archive()) // 2], "damaged or not a zip"),
    "not an archive": (lambda: b"threshold: 0.6\n", "not a zip"),
    "empty file": (lambda: b"", "not a zip"),
    "unexpected member": (lambda: archive(extra=[("notes.txt", b"hi")]), "unexpected member 'notes.txt'"),
    "slash": (lambda: zip_bytes([("x/meta.json", meta()), (st.VECTORS_MEMBER, npy(GOOD_VECTORS))]), "unsafe"),
    "dotdot": (lambda: archive(extra=[("../evil", b"x")]), "unsafe member name '../evil'"),
    "absolute": (lambda: archive(extra=[("/etc/cron.d/evil", b"x")]), "unsafe"),
    "backslash": (lambda: archive(extra=[("..\\evil", b"x")]), "unsafe"),
    "duplicate member": (lambda: archive(extra=[(st.META_MEMBER, meta())]), "expected members"),
    "missing member": (lambda: zip_bytes([(st.META_MEMBER, meta())]), "expected members"),
    "meta not json": (lambda: archive(b"{not json"), "not valid JSON"),
    "meta deeply nested": (lambda: archive(b"[" * 200000), "not valid JSON"),
    "not edge": (lambda: archive(meta(format="something-else")), "not an edge knowledge file"),
    "missing fields": (lambda: archive(meta(dim="wide")), "incomplete"),
    "class twice": (lambda: archive(meta(classes=[{"name": "A", "count": 2}, {"name": "A", "count": 1}])), "twice"),
    "counts do not match": (lambda: archive(meta(classes=[{"name": "A", "count": 5}])), "expected float32"),
    "float64": (lambda: archive(vectors=GOOD_VECTORS.astype(np.float64)), "expected float32"),
    "pickled objects": (lambda: archive(vectors=np.array([{"a": 1}] * 3, dtype=object)), "expected float32"),
    "npy garbage": (lambda: zip_bytes([(st.META_MEMBER, meta()), (st.VECTORS_MEMBER, b"\x93NUMPY garbage")]), "not a valid .npy"),
    "npy short": (lambda: zip_bytes([(st.META_MEMBER, meta()), (st.VECTORS_MEMBER, npy(GOOD_VECTORS)[:-5])]), "truncated"),
    "nan": (lambda: archive(vectors=nan_rows()), "NaN or infinite"),
    "inf": (lambda: archive(vectors=np.where(GOOD_VECTORS > 1, np.inf, GOOD_VECTORS).astype(np.float32)), "NaN or infinite"),
    "bad settings": (lambda: archive(meta(settings={"t": "x" * (st.MAX_SETTINGS_BYTES + 10)})), "settings"),
    "bad class name": (lambda: archive(meta(classes=[{"name": "", "count": 3}])), "class name"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_refuses_and_leaves_the_store_untouched(tmp_path, case):
    build, message = REFUSED[case]
    s = filled(tmp_path / "s")
    expected, before = s.knowledge.copy(), files(tmp_path / "s")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(build())
    with pytest.raises(StoreError, match=message) as err:
        s.import_file(bad)
    assert str(err.value).startswith(f"cannot import {bad}: ") and "\n" not in str(err.value)
    assert s.knowledge == expected and files(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "s"]  # nothing extracted
    s.append({"op": "add", "class": "A", "vectors": rows(60, 1)})  # and the store goes on
    s.close()


def test_the_good_archive_of_the_refusal_cases_is_accepted(tmp_path):
    (tmp_path / "good.npz").write_bytes(archive())
    s = opened(tmp_path / "s")
    k = s.import_file(tmp_path / "good.npz")
    assert k.counts() == {"A": 2, "B": 1} and k.settings == {"t": 1}
    s.close()


def test_import_refuses_a_missing_file_and_oversized_members(tmp_path, monkeypatch):
    s = filled(tmp_path / "s")
    before = files(tmp_path / "s")
    with pytest.raises(StoreError, match="No such file"):
        s.import_file(tmp_path / "nope.npz")
    # a zip bomb: a few KB on disk, 4 MB of zeros once inflated
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(zip_bytes([(st.META_MEMBER, meta()), (st.VECTORS_MEMBER, bytes(4 << 20))],
                               zipfile.ZIP_DEFLATED))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(st, "MAX_VECTOR_BYTES", 1 << 20)
    with pytest.raises(StoreError, match="too large"):
        s.import_file(bomb)
    monkeypatch.setattr(st, "MAX_META_BYTES", 100)
    (tmp_path / "fat.npz").write_bytes(archive(meta(settings={"pad": "x" * 200})))
    with pytest.raises(StoreError, match="'meta.json' is too large"):
        s.import_file(tmp_path / "fat.npz")
    assert files(tmp_path / "s") == before
    s.close()


# --- kill -9 ------------------------------------------------------------------------------------

KILL_DIM = 16

APPENDER = """
import sys
from pathlib import Path
import numpy as np
from edge.store import Store
folder, mode = Path(sys.argv[1]), sys.argv[2]
store = Store(folder, "kill-model", %d, max_per_class=10**6, compact_records=int(sys.argv[3]))
store.open()
i = sum(store.knowledge.counts().values())
print("ready", store.seq, i, flush=True)
while True:
    n = 1 + i %% 3
    batch = np.repeat(np.arange(i, i + n, dtype=np.float32)[:, None], %d, axis=1)
    store.append({"op": "add", "class": "c%%d" %% (i %% 4), "vectors": batch})
    i += n
    print(store.seq, i, flush=True)
    if mode == "compact":
        store.compact()
""" % (KILL_DIM, KILL_DIM)


def check_samples(knowledge: Knowledge, acked: int) -> int:
    """Every acknowledged sample is there, whole batches only, in order; returns the total."""
    values = {}
    for name, r in knowledge.classes.items():
        assert (r == r[:, :1]).all(), f"class {name} has a mixed row"
        values[name] = r[:, 0].astype(int).tolist()
    total = sum(len(v) for v in values.values())
    pos = {name: 0 for name in values}
    i = 0
    while i < total:
        n, name = 1 + i % 3, f"c{i % 4}"
        got = values[name][pos[name]:pos[name] + n]
        assert got == list(range(i, i + n)), f"batch at {i}: {got}"
        pos[name] += n
        i += n
    assert i == total and all(pos[n] == len(v) for n, v in values.items())
    assert acked <= total <= acked + 3, f"acknowledged {acked}, found {total}"
    return total


def kill_trials(tmp_path: Path, mode: str, trials: int, compact_records: int) -> None:
    seed = int(os.environ.get("EDGE_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    folder = tmp_path / "s"
    kills_after_ready, known = 0, 0  # known: the samples found after the previous trial
    for trial in range(trials):
        where = f"seed {seed}, trial {trial}"
        child = subprocess.Popen([sys.executable, "-c", APPENDER, str(folder), mode, str(compact_records)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        watchdog = threading.Timer(60, child.kill)
        watchdog.start()
        try:
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 0.4))  # maybe during start-up or open-time repairs
            else:
                ready = child.stdout.readline()
                assert ready.startswith(b"ready"), (where, ready, child.stderr.read())
                time.sleep(rng.uniform(0, 0.12))
                kills_after_ready += 1
            child.send_signal(signal.SIGKILL)
            child.wait()
            out = child.stdout.read()
            err = child.stderr.read()
        finally:
            watchdog.cancel()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL, (where, err)
        lines = [ln.split() for ln in out.decode().split("\n")[:-1]]  # a cut last line does not count
        acks = [ln for ln in lines if ln[0] != "ready"]
        acked_seq, acked = (int(acks[-1][0]), int(acks[-1][1])) if acks else (0, known)
        store = Store(folder, "kill-model", KILL_DIM, max_per_class=10**6)
        store.open()
        try:
            known = check_samples(store.knowledge, acked)
            assert store.seq >= acked_seq, where
            assert all("torn record" in e for e in store.events), (where, store.events)
            assert not (folder / st.ASIDE).exists(), where
        finally:
            store.close(compact=False)
    assert kills_after_ready > 0


def kill_trial_count(default: int = 25) -> int:
    return int(os.environ.get("EDGE_KILL_TRIALS", default))


@pytest.mark.slow
def test_kill_9_while_appending_loses_no_acknowledged_sample(tmp_path):
    kill_trials(tmp_path, "append", kill_trial_count(), compact_records=7)


@pytest.mark.slow
def test_kill_9_while_compacting_loses_no_acknowledged_sample(tmp_path):
    kill_trials(tmp_path, "compact", kill_trial_count(), compact_records=500)
