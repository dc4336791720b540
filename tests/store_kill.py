"""Power-cut trials for the store: a child runs random commands and is SIGKILLed at random moments.

The child (`python store_kill.py FOLDER DIM SEED`) prints `open <digest>` after opening the store,
`pending <digest>` inside each command just before its commit (the state the command is about to
make durable), and `committed <digest>` after it. `trials()` is the parent, used by
tests/test_store.py (a short run) and benchmarks/store_bench.py kill (200+).
"""

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge import rules, transfer
from edge.store import Store

MODEL = "a" * 64
THUMB = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def digest_of(s: Store) -> str:
    """Everything a user could see, as one short hash: classes (order, names, buttons, flags,
    counts), settings, every embedding, every sample's id, burst, source and time."""
    h = hashlib.sha256()
    h.update(repr([(c.name, c.button, c.nothing, c.count) for c in s.classes()]).encode())
    h.update(repr(sorted(s.settings().items())).encode())
    for c in s.classes():
        h.update(s.vectors(c.name).tobytes())
        h.update(repr([(x.id, x.burst, x.source, x.ts) for x in s.samples(c.name, limit=10_000)]).encode())
    return h.hexdigest()[:16]


def one_command(s: Store, rng: random.Random, dim: int, export: Path) -> None:
    classes = s.classes()
    names = [c.name for c in classes]
    roll = rng.random()
    if len(classes) < 3 or (roll < 0.08 and len(classes) < rules.MAX_CLASSES):
        free = [b for b in ("red", "green", "blue", "yellow") if b not in {c.button for c in classes}]
        s.add_class(f"c{rng.randrange(10**6)}", button=rng.choice(free) if free else None)
    elif roll < 0.50:
        name = rng.choice(names)
        n = rng.randint(1, 6)
        s.add_samples(name, np.asarray([[rng.random() for _ in range(dim)] for _ in range(n)], np.float32),
                      rng.choice(("button", "mqtt", "web")), s.new_burst(),
                      thumbnails=[THUMB if rng.random() < 0.5 else None for _ in range(n)], ts=float(rng.randrange(10**9)))
    elif roll < 0.60:
        name = rng.choice(names)
        s.rename_class(name, f"r{rng.randrange(10**6)}")
    elif roll < 0.66:
        s.remove_class(rng.choice(names))
    elif roll < 0.76:
        last = s.last_burst()
        if last:
            s.delete_burst(last[1])
    elif roll < 0.82:
        s.clear(rng.choice(names))
    elif roll < 0.84:
        s.clear_all()
    elif roll < 0.90:
        s.set_setting("threshold", rng.choice(["auto", round(rng.uniform(-1, 1), 3)]))
    elif roll < 0.93:
        transfer.export(s, export)
    else:
        if export.exists():
            transfer.apply(s, transfer.read(s, export))


def trials(folder: Path, count: int, seed: int, dim: int = 64) -> dict:
    """Start a child on one store and SIGKILL it after a random 0.05-0.6 s, `count` times.

    After each kill the store is opened again: its digest must be the last committed one, or the
    pending one if the kill came inside a command (before or after, never a mix). A kill while the
    child starts or opens leaves the state the previous check saw.
    """
    rng = random.Random(seed)
    repo = Path(__file__).resolve().parent.parent
    results = {"trials": 0, "mixed": [], "during_command": 0, "before_open": 0, "commands": 0, "faults": []}
    known = None
    for trial in range(count):
        proc = subprocess.Popen([sys.executable, __file__, str(folder), str(dim), str(rng.randrange(1 << 30))],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        out = proc.communicate()[0]
        committed, pending = known, None
        for line in out.split("\n")[:-1]:     # a line the kill cut off is not a promise yet
            kind, digest = line.split()
            if kind == "pending":
                pending = digest
            else:
                committed, pending = digest, None
                results["commands"] += kind == "committed"
        s = Store(folder, MODEL, dim, max_per_class=20)
        s.open()
        got = digest_of(s)
        results["faults"] += s.faults
        s.close()
        if known is not None and got not in (committed, pending):
            results["mixed"].append((trial, out.splitlines()[-3:], got))
        results["during_command"] += pending is not None
        results["before_open"] += not out
        results["trials"] += 1
        known = got
    return results


def main() -> None:
    folder, dim, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    s = Store(folder, MODEL, dim, max_per_class=20)
    s.open()
    print("open", digest_of(s), flush=True)
    export = folder.parent / "trial-export.edge"
    end = time.monotonic() + 20
    while time.monotonic() < end:
        with s.command():
            one_command(s, rng, dim, export)
            print("pending", digest_of(s), flush=True)
        print("committed", digest_of(s), flush=True)


if __name__ == "__main__":
    main()
