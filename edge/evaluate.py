"""`edge eval`: would the box learn these classes? Few-shot trials with the daemon's own pipeline.

A dataset is a folder of class folders (shots drawn from each class, the rest are the test), or a
folder with `train/` and `test/` folders of class folders (shots from train, test on test).
Every image is embedded once; trials then only redraw which embeddings train the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from edge.head import Head
from edge.image import ImageError, list_images, load_image

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset folder does not have the expected shape."""


@dataclass
class Split:
    """Embeddings per class of one split (train or test)."""

    classes: Dict[str, np.ndarray]


def class_folders(folder: Path) -> Dict[str, List[Path]]:
    """Class name -> image files, for each non-hidden subfolder that holds images."""
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        if files:
            out[sub.name] = files
    return out


def embed_files(files: List[Path], embed: Callable) -> np.ndarray:
    """Embeddings of image files; unreadable files are logged and skipped."""
    rows = []
    for path in files:
        try:
            rows.append(embed(load_image(path)))
        except ImageError as exc:
            log.warning("skipping %s", exc)
    return np.array(rows, dtype=np.float32)


def load_dataset(root: Path, embed: Callable) -> tuple:
    """(train split, test split or None) with every image embedded once."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = class_folders(root / "train"), class_folders(root / "test")
        if set(train_files) != set(test_files):
            raise DatasetError(f"{root}: train/ and test/ must have the same class folders")
    else:
        train_files, test_files = class_folders(root), None
    if len(train_files) < 2:
        raise DatasetError(f"{root}: need at least two class folders with images")
    train = Split({c: embed_files(f, embed) for c, f in train_files.items()})
    test = None if test_files is None else Split({c: embed_files(f, embed) for c, f in test_files.items()})
    return train, test


def run_trials(train: Split, test: Optional[Split], shots: int, trials: int, seed: int = 0,
               head_factory: Callable[[], Head] = Head) -> dict:
    """Mean accuracy and per-class accuracy over seeded few-shot trials."""
    classes = list(train.classes)
    for c in classes:
        need = shots + (1 if test is None else 0)
        if len(train.classes[c]) < need:
            raise DatasetError(f"class {c!r} has {len(train.classes[c])} images; "
                               f"{shots} shots need at least {need}")
    rng = np.random.default_rng(seed)
    accs, per_class = [], {c: [] for c in classes}
    for _ in range(trials):
        head = head_factory()
        queries, truth = [], []
        for ci, c in enumerate(classes):
            pool = train.classes[c]
            order = rng.permutation(len(pool))
            head.add(c, pool[order[:shots]])
            rest = pool[order[shots:]] if test is None else test.classes[c]
            queries.append(rest)
            truth.append(np.full(len(rest), ci))
        q, t = np.vstack(queries), np.concatenate(truth)
        order_in_head = [classes.index(n) for n in head.labels]
        pred = np.asarray(order_in_head)[head.predict(q)[0]]
        accs.append(float((pred == t).mean()))
        for ci, c in enumerate(classes):
            mask = t == ci
            if mask.any():
                per_class[c].append(float((pred[mask] == ci).mean()))
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "per_class": {c: float(np.mean(v)) for c, v in per_class.items() if v},
        "shots": shots,
        "trials": trials,
        "classes": len(classes),
        "test_images": int(len(q)),
    }
