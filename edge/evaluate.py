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

from edge.head import Head, plain_centroid_predict
from edge.image import IMAGE_SUFFIXES, ImageError, list_images, load_image

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


def burst_frames(img, n: int, rng: np.random.Generator) -> list:
    """n near-duplicate views of one photo, like frames 1/6 s apart while a button is held:
    the photo itself, then crops of 85-100 % of each side at small random offsets with +-8 %
    brightness. Deterministic for a seeded rng."""
    from PIL import ImageEnhance
    out = [img]
    for _ in range(n - 1):
        s = rng.uniform(0.85, 1.0)
        w, h = max(1, int(img.width * s)), max(1, int(img.height * s))
        left = int(rng.uniform(0, img.width - w + 1))
        top = int(rng.uniform(0, img.height - h + 1))
        view = img.crop((left, top, left + w, top + h))
        out.append(ImageEnhance.Brightness(view).enhance(rng.uniform(0.92, 1.08)))
    return out


def embed_bursts(files: List[Path], embed: Callable, n: int, seed: int = 0) -> np.ndarray:
    """Embeddings of n burst frames per image file: shape (files, n, dim); unreadable skipped."""
    rows = []
    for i, path in enumerate(files):
        try:
            img = load_image(path)
        except ImageError as exc:
            log.warning("skipping %s", exc)
            continue
        rng = np.random.default_rng([seed, i])
        rows.append([embed(v) for v in burst_frames(img, n, rng)])
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
               head_factory: Callable[[], Head] = Head, unknown: Optional[np.ndarray] = None,
               holdout: int = 0) -> dict:
    """Few-shot trials with the daemon's head; each trial redraws shots (and held-out classes).

    Reports closed-set `accuracy` (best class, no unknown gate), `known_accuracy` (gate on: a
    known photo called unknown counts as wrong), `baseline_accuracy` (plain L2 nearest centroid
    on the same draws), and with `unknown` photos or `holdout` classes the share called unknown.
    """
    classes = list(train.classes)
    if holdout and not 0 < holdout <= len(classes) - 1:
        raise DatasetError(f"--holdout-classes must be between 1 and {len(classes) - 1}")
    for c in classes:
        need = shots + (1 if test is None else 0)
        if len(train.classes[c]) < need:
            raise DatasetError(f"class {c!r} has {len(train.classes[c])} images; "
                               f"{shots} shots need at least {need}")
    rng = np.random.default_rng(seed)
    sums = {k: [] for k in ("accuracy", "known_accuracy", "baseline_accuracy", "unknown_rate",
                            "holdout_unknown_rate")}
    per_class = {c: [] for c in classes}
    n_test = 0
    for _ in range(trials):
        held = set(rng.choice(classes, size=holdout, replace=False)) if holdout else set()
        known = [c for c in classes if c not in held]
        shots_by_class, queries, truth, held_queries = {}, [], [], []
        for c in classes:
            pool = train.classes[c]
            order = rng.permutation(len(pool))
            rest = pool[order[shots:]] if test is None else test.classes[c]
            if c in held:
                held_queries.append(pool if test is None else test.classes[c])
                continue
            shots_by_class[c] = pool[order[:shots]]
            queries.append(rest)
            truth.append(np.full(len(rest), known.index(c)))
        q, t = np.vstack(queries), np.concatenate(truth)
        n_test = len(q)
        head = head_factory()
        head.set_samples(shots_by_class)
        closed = head.predict_closed(q)
        gated, _ = head.predict(q)
        sums["accuracy"].append(float((closed == t).mean()))
        sums["known_accuracy"].append(float((gated == t).mean()))
        sums["baseline_accuracy"].append(float((plain_centroid_predict(shots_by_class, q) == t).mean()))
        for ci, c in enumerate(known):
            mask = t == ci
            if mask.any():
                per_class[c].append(float((closed[mask] == ci).mean()))
        if unknown is not None and len(unknown):
            sums["unknown_rate"].append(float((head.predict(unknown)[0] == -1).mean()))
        if held_queries:
            sums["holdout_unknown_rate"].append(float((head.predict(np.vstack(held_queries))[0] == -1).mean()))
    result = {k: float(np.mean(v)) for k, v in sums.items() if v}
    result.update({
        "accuracy_std": float(np.std(sums["accuracy"])),
        "per_class": {c: float(np.mean(v)) for c, v in per_class.items() if v},
        "shots": shots,
        "trials": trials,
        "classes": len(classes),
        "test_images": int(n_test),
    })
    if unknown is not None:
        result["unknown_images"] = int(len(unknown))
    if holdout:
        result["holdout_classes"] = holdout
    return result


def load_unknown(folder: Path, embed: Callable) -> np.ndarray:
    """Embeddings of every image under a folder (recursively): photos of none of the classes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"unknown-photos folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images under {folder}")
    return embed_files(files, embed)
