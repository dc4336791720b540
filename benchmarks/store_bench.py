"""The store's speed and its power-cut trials, measured on this machine's disk.

    python benchmarks/store_bench.py speed [--folder var/bench-store]
    python benchmarks/store_bench.py kill --trials 200 [--seed N]

`speed` reports one recorded sample per command (what the box does while recording) against one
fsynced 4 kB write on the same disk (the floor for anything durable), vectors() cached against
read from the file, and open / export / import times of a full store (8 classes x 200 samples x
1280 dims with thumbnails). `kill` runs the SIGKILL trials of tests/store_kill.py and prints the
figures docs/reliability.md records. The folder must be on the disk you care about (not tmpfs).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import edge  # noqa: E402,F401  first: numpy then starts one BLAS thread, as in the box (edge/__init__.py)
import numpy as np  # noqa: E402
from edge import transfer  # noqa: E402
from edge.store import Store  # noqa: E402

DIM = 1280
THUMB = bytes(4000)


def fsync_write_ms(folder: Path, n: int = 100) -> float:
    path = folder / "fsync-probe"
    times = []
    with open(path, "wb") as f:
        for _ in range(n):
            t = time.perf_counter()
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t)
    path.unlink()
    return statistics.median(times) * 1000


def speed(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    s = Store(folder / "store", "a" * 64, DIM, max_per_class=200)
    s.open()
    rng = np.random.default_rng(0)
    with s.command():
        for i in range(8):
            s.add_class(f"class {i}")
    times = []
    for i in range(8 * 200):
        v = rng.standard_normal(DIM).astype(np.float32)
        t = time.perf_counter()
        with s.command():
            s.add_samples(f"class {i % 8}", v, "button", s.new_burst(), thumbnails=[THUMB])
        times.append(time.perf_counter() - t)
    add_ms = statistics.median(times) * 1000
    p95 = sorted(times)[int(len(times) * 0.95)] * 1000
    floor = fsync_write_ms(folder)
    s.all_vectors()                     # the first read fills the cache
    t = time.perf_counter()
    for _ in range(100):
        s.all_vectors()
    cached = (time.perf_counter() - t) / 100 * 1000
    t = time.perf_counter()
    for _ in range(20):
        s._forget()
        s.all_vectors()
    uncached = (time.perf_counter() - t) / 20 * 1000
    s.close()
    t = time.perf_counter()
    s.open()
    open_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    transfer.export(s, folder / "export.edge", thumbnails=True)
    export_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    imported = transfer.read(s, folder / "export.edge")
    with s.command():
        transfer.apply(s, imported)
    import_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    s.close()
    close_ms = (time.perf_counter() - t) * 1000
    size = (folder / "store" / "knowledge.db").stat().st_size
    print(f"one sample per command (1280 dims + 4 kB thumbnail): median {add_ms:.2f} ms, p95 {p95:.2f} ms; "
          f"one fsynced 4 kB write: {floor:.2f} ms; ratio {add_ms / floor:.2f}")
    print(f"all_vectors() of 8 x 200: cached {cached * 1000:.1f} µs, from the file {uncached:.2f} ms; "
          f"ratio {cached / uncached:.5f}")
    print(f"full store ({size / 1e6:.1f} MB): open {open_ms:.0f} ms, close {close_ms:.0f} ms, "
          f"export with thumbnails {export_ms:.0f} ms, read + apply {import_ms:.0f} ms")
    shutil.rmtree(folder, ignore_errors=True)


def kill(trials: int, seed: int, folder: Path) -> int:
    import store_kill
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    r = store_kill.trials(folder / "store", trials, seed)
    print(f"seed {seed}: {r['trials']} SIGKILLs in {time.perf_counter() - t:.0f} s, {r['commands']} commands "
          f"committed, {r['during_command']} kills inside a command, {r['before_open']} before the store was "
          f"open; mixed states: {len(r['mixed'])}; faults at reopen: {len(r['faults'])}")
    for m in r["mixed"]:
        print("MIXED", m)
    shutil.rmtree(folder, ignore_errors=True)
    return 1 if r["mixed"] or r["faults"] else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("speed")
    a.add_argument("--folder", type=Path, default=REPO / "var" / "bench-store")
    k = sub.add_parser("kill")
    k.add_argument("--trials", type=int, default=200)
    k.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    k.add_argument("--folder", type=Path, default=REPO / "var" / "bench-kill")
    args = p.parse_args()
    if args.what == "speed":
        speed(args.folder)
        return 0
    return kill(args.trials, args.seed, args.folder)


if __name__ == "__main__":
    sys.exit(main())
