"""A child for the power-cut trials: open a store, then run random commands until killed.

It prints `open <digest>` after opening, `pending <digest>` inside each command just before its
commit (the state the command is about to make durable), and `committed <digest>` after it.
Run by tests/test_store.py and benchmarks/store_kill.py: python store_kill_child.py FOLDER DIM SEED
"""

import hashlib
import random
import sys
import time
from pathlib import Path

import numpy as np

from edge import rules
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
        s.export(export)
    else:
        if export.exists():
            s.replace_with(s.read_export(export))


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
