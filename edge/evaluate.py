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

from edge.head import SPREAD_VIEWS, Head, plain_centroid_predict, signed_sqrt, spread_prior
from edge.image import IMAGE_SUFFIXES, ImageError, list_images, load_image

log = logging.getLogger(__name__)

NOTHING = "(nothing)"   # name of the "nothing" class taught by `edge eval --nothing`


class DatasetError(ValueError):
    """The dataset folder does not have the expected shape."""


@dataclass
class Split:
    """Embeddings per class of one split (train or test); `bursts` (optional): per class, burst
    frames of each image, (images, frames, dim), row i of `classes` being frame 0 of image i."""

    classes: Dict[str, np.ndarray]
    bursts: Optional[Dict[str, np.ndarray]] = None


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
        view = _crop(img, rng.uniform(0.85, 1.0), rng)
        out.append(ImageEnhance.Brightness(view).enhance(rng.uniform(0.92, 1.08)))
    return out


def _crop(img, s: float, rng: np.random.Generator):
    """A crop of s of each side of img at a random place."""
    w, h = max(1, int(img.width * s)), max(1, int(img.height * s))
    left, top = int(rng.uniform(0, img.width - w + 1)), int(rng.uniform(0, img.height - h + 1))
    return img.crop((left, top, left + w, top + h))


def spread_views(img, n: int, rng: np.random.Generator) -> list:
    """n augmented views of one everyday photo, for the spread prior (edge.head.spread_prior):
    crops of 55-100 % of each side, mirrored half the time, turned up to 15 degrees, brightness
    and contrast +-30 %, colour +-40 %. Deterministic for a seeded rng."""
    from PIL import Image, ImageEnhance, ImageOps
    img = img.convert("RGB")
    out = []
    for _ in range(n):
        view = _crop(img, rng.uniform(0.55, 1.0), rng)
        view = ImageOps.mirror(view) if rng.random() < 0.5 else view
        view = view.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
            view = enhance(view).enhance(rng.uniform(0.7, 1.3))
        out.append(ImageEnhance.Color(view).enhance(rng.uniform(0.6, 1.4)))
    return out


def embed_bursts(files: List[Path], embed: Callable, n: int, seed: int = 0,
                 views: Callable = burst_frames) -> np.ndarray:
    """Embeddings of n views per image file (`views`: burst frames, or `spread_views`): shape
    (files, n, dim); unreadable files are logged and skipped."""
    rows = []
    for i, path in enumerate(files):
        try:
            img = load_image(path)
        except ImageError as exc:
            log.warning("skipping %s", exc)
            continue
        rng = np.random.default_rng([seed, i])
        rows.append([embed(v) for v in views(img, n, rng)])
    return np.array(rows, dtype=np.float32)


def embed_reference(files: List[Path], embed: Callable) -> tuple:
    """(embeddings (photos, dim), augmented views (photos, SPREAD_VIEWS, dim)) of everyday photos,
    each photo read once: what `reference_of` makes a model's mean and spread prior from."""
    both = embed_bursts(files, embed, SPREAD_VIEWS + 1, seed=7,
                        views=lambda img, n, rng: [img] + spread_views(img, n - 1, rng))
    return both[:, 0], both[:, 1:]


def reference_of(photos: np.ndarray, views: np.ndarray) -> tuple:
    """(reference mean, spread prior) from `embed_reference`'s embeddings and views."""
    mean = signed_sqrt(photos).mean(axis=0).astype(np.float32)
    return mean, spread_prior(views, mean)


def load_dataset(root: Path, embed: Callable, burst: int = 1) -> tuple:
    """(train split, test split or None) with every image embedded once; with burst > 1 the
    training images are embedded as bursts of that many frames (see `burst_frames`)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = class_folders(root / "train"), class_folders(root / "test")
        if set(train_files) != set(test_files):
            raise DatasetError(f"{root}: train/ and test/ must have the same class folders")
    else:
        train_files, test_files = class_folders(root), None
    if len(train_files) < 2:
        raise DatasetError(f"{root}: need at least two class folders with images")
    if burst > 1:
        bursts = {c: embed_bursts(f, embed, burst) for c, f in train_files.items()}
        train = Split({c: b[:, 0] for c, b in bursts.items()}, bursts)
    else:
        train = Split({c: embed_files(f, embed) for c, f in train_files.items()})
    test = None if test_files is None else Split({c: embed_files(f, embed) for c, f in test_files.items()})
    return train, test


AUROC_OF = {"unknown_rate": "unknown_auroc", "holdout_unknown_rate": "holdout_auroc"}
# Threshold offsets (added to the head's threshold) at which the trade-off curve is reported.
CURVE_OFFSETS = (-0.15, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.15)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    values, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True,
                                        return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0      # average rank of each tied value
    ranks = mean_rank[inverse]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def draw_kits(train: Split, test: Optional[Split], shots: int, trials: int, seed: int = 0,
              classes: int = 0, holdout: int = 0):
    """Each trial's kit, as `run_trials` draws it: (the taught class names, their shots (all
    frames of each shot's burst when `train` has bursts), the known photos to test, each one's
    class index, the held-out classes' photos or None). `classes` 0: all but the held-out."""
    names = list(train.classes)
    taught_n = classes or len(names) - holdout
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        order = list(rng.permutation(len(names)))
        held = [names[i] for i in order[:holdout]]
        known = [names[i] for i in sorted(order[holdout:holdout + taught_n])]
        shots_by_class, queries, truth = {}, [], []
        for ci, c in enumerate(known):
            pool = train.classes[c]
            pick = rng.permutation(len(pool))
            rest = pool[pick[shots:]] if test is None else test.classes[c]
            if train.bursts is not None:
                shots_by_class[c] = train.bursts[c][pick[:shots]].reshape(-1, pool.shape[1])
            else:
                shots_by_class[c] = pool[pick[:shots]]
            queries.append(rest)
            truth.append(np.full(len(rest), ci))
        held_q = np.vstack([train.classes[c] if test is None else test.classes[c] for c in held]) if held else None
        yield known, shots_by_class, np.vstack(queries), np.concatenate(truth), held_q


def run_trials(train: Split, test: Optional[Split], shots: int, trials: int, seed: int = 0,
               head_factory: Callable[[], Head] = Head, unknown: Optional[np.ndarray] = None,
               holdout: int = 0, classes: int = 0, nothing: Optional[np.ndarray] = None,
               nothing_shots: int = 20) -> dict:
    """Few-shot trials with the daemon's head; each trial redraws shots (and classes).

    `classes` N > 0 teaches N random classes per trial (a 3-button kit); `holdout` M never
    teaches M classes and shows them. With bursts in `train`, each shot is all frames of one
    image's burst. `nothing`: photos of none of the classes; each trial teaches `nothing_shots`
    of them as a "nothing" class and shows the rest (`nothing_unknown_rate`).

    Reports closed-set `accuracy` (best class, no unknown gate), `known_accuracy` (gate on: a
    known photo called unknown counts as wrong), `baseline_accuracy` (plain L2 nearest centroid
    on the same draws), with `unknown` photos or `holdout` classes the share called unknown, the
    AUROC of known against held-out photos by gate score, and `curve`: those figures when the
    threshold is moved by each of CURVE_OFFSETS.
    """
    names = list(train.classes)
    taught_n = classes or len(names) - holdout
    if holdout and not 0 < holdout <= len(names) - 1:
        raise DatasetError(f"--holdout-classes must be between 1 and {len(names) - 1}")
    if classes and not 2 <= classes <= len(names) - holdout:
        raise DatasetError(f"--classes must be between 2 and {len(names) - holdout} "
                           f"({len(names)} classes, {holdout} held out)")
    for c in names:
        need = shots + (1 if test is None else 0)
        if len(train.classes[c]) < need:
            raise DatasetError(f"class {c!r} has {len(train.classes[c])} images; "
                               f"{shots} shots need at least {need}")
    if nothing is not None and not 0 < nothing_shots < len(nothing):
        raise DatasetError(f"--nothing needs more than {nothing_shots} photos, found {len(nothing)}")
    nothing_rng = np.random.default_rng([seed, 1])   # own stream: the same trials as without it
    keys = ("accuracy", "known_accuracy", "baseline_accuracy", "unknown_rate", "holdout_unknown_rate",
            "holdout_auroc", "unknown_auroc", "nothing_unknown_rate", "nothing_known_accuracy",
            "nothing_holdout_unknown_rate")
    sums = {k: [] for k in keys}
    curve = {o: {"known_accuracy": [], "unknown_rate": [], "holdout_unknown_rate": []} for o in CURVE_OFFSETS}
    per_class = {c: [] for c in names}
    n_test = 0
    for known, shots_by_class, q, t, held_q in draw_kits(train, test, shots, trials, seed, taught_n, holdout):
        n_test = len(q)
        head = head_factory()
        head.set_samples(shots_by_class)
        idx, margin = head.decide(q)
        sums["accuracy"].append(float((idx == t).mean()))
        sums["known_accuracy"].append(float(((idx == t) & (margin >= 0)).mean()))
        sums["baseline_accuracy"].append(float((plain_centroid_predict(shots_by_class, q) == t).mean()))
        for ci, c in enumerate(known):
            mask = t == ci
            per_class[c].append(float((idx[mask] == ci).mean()))
        others = {}
        if unknown is not None and len(unknown):
            others["unknown_rate"] = head.decide(unknown)[1]
        if held_q is not None:
            others["holdout_unknown_rate"] = head.decide(held_q)[1]
        for key, m in others.items():
            sums[key].append(float((m < 0).mean()))
            sums[AUROC_OF[key]].append(auroc(margin, m))
        for o in CURVE_OFFSETS:
            curve[o]["known_accuracy"].append(float(((idx == t) & (margin >= o)).mean()))
            for key, m in others.items():
                curve[o][key].append(float((m < o).mean()))
        if nothing is not None:
            pick = nothing_rng.permutation(len(nothing))
            head.set_samples({**shots_by_class, NOTHING: nothing[pick[:nothing_shots]]})
            head.set_nothing([NOTHING])
            sums["nothing_unknown_rate"].append(float((head.predict(nothing[pick[nothing_shots:]])[0] == -1).mean()))
            sums["nothing_known_accuracy"].append(float((head.predict(q)[0] == t).mean()))
            if held_q is not None:
                sums["nothing_holdout_unknown_rate"].append(float((head.predict(held_q)[0] == -1).mean()))
    result = {k: float(np.mean(v)) for k, v in sums.items() if v}
    result.update({
        "accuracy_std": float(np.std(sums["accuracy"])),
        "per_class": {c: float(np.mean(v)) for c, v in per_class.items() if v},
        "curve": [{"offset": o, **{k: float(np.mean(v)) for k, v in curve[o].items() if v}}
                  for o in CURVE_OFFSETS],
        "shots": shots,
        "trials": trials,
        "classes": len(names),
        "taught_classes": taught_n,
        "test_images": int(n_test),
    })
    if train.bursts is not None:
        result["burst"] = int(train.bursts[names[0]].shape[1])
    if unknown is not None:
        result["unknown_images"] = int(len(unknown))
    if holdout:
        result["holdout_classes"] = holdout
    if nothing is not None:
        result.update(nothing_images=int(len(nothing)), nothing_shots=nothing_shots)
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
