"""Photos for calibration and evaluation, always preprocessed with edge.image.prepare.

Split (fixed, so figures stay honest):
* calibration = calibration/registry-photos (all) + calibration/imagenet-sample at even positions
  of the sorted file list (150 photos), plus augmented views of those same photos;
* held-out ImageNet = imagenet-sample at odd positions (150 photos, 150 classes): top-1 and cosine;
* clothing-small is never used for calibration: cosine and few-shot accuracy.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge.image import list_images, load_image, prepare  # noqa: E402  (the runtime's own code)

CATEGORIES_FILE = Path(__file__).with_name("imagenet_categories.txt")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def imagenet_labels(files: list[Path]) -> list[int]:
    """Class index (0..999) of each `nXXXXXXXX_<name>.jpg`, by matching the name to torchvision's
    category list (which is in sorted-synset order). Names are matched in file order and indices
    must increase with the synset ids, which both confirms the order and settles repeated names."""
    categories = [_norm(c) for c in CATEGORIES_FILE.read_text().splitlines() if c.strip()]
    if len(categories) != 1000:
        raise ValueError(f"{CATEGORIES_FILE}: expected 1000 categories, found {len(categories)}")
    files = sorted(files, key=lambda p: p.name)
    labels, last = [], -1
    for path in files:
        synset, _, rest = path.stem.partition("_")
        name = _norm(rest)
        idx = next((i for i in range(last + 1, 1000) if categories[i] == name), None)
        if idx is None:
            raise ValueError(f"{path.name}: no ImageNet category '{rest}' after index {last}")
        labels.append(idx)
        last = idx
    return labels


@dataclass
class Photos:
    paths: list[Path]
    labels: list[int]      # ImageNet index or few-shot class index; -1 when unused


def calibration_and_heldout(calibration_dir: Path) -> tuple[Photos, Photos]:
    """(calibration photos, held-out ImageNet photos) from ../shared/datasets/calibration."""
    imagenet = list_images(calibration_dir / "imagenet-sample")
    registry = list_images(calibration_dir / "registry-photos")
    if len(imagenet) < 2 or not registry:
        raise FileNotFoundError(f"{calibration_dir}: expected imagenet-sample/ and registry-photos/")
    labels = imagenet_labels(imagenet)
    calib = Photos(registry + imagenet[0::2], [-1] * len(registry) + labels[0::2])
    heldout = Photos(imagenet[1::2], labels[1::2])
    return calib, heldout


@dataclass
class FewShot:
    classes: list[str]
    train: Photos
    test: Photos


def clothing(eval_dir: Path) -> FewShot:
    classes = sorted(p.name for p in (eval_dir / "train").iterdir() if p.is_dir())

    def split(name):
        paths, labels = [], []
        for ci, cls in enumerate(classes):
            files = list_images(eval_dir / name / cls)
            paths += files
            labels += [ci] * len(files)
        return Photos(paths, labels)

    return FewShot(classes, split("train"), split("test"))


def prepared(paths: list[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: exactly what the runtime feeds the model."""
    return np.stack([prepare(load_image(p), size) for p in paths])


def augmented_views(paths: list[Path], size: int, views: int, seed: int = 0) -> np.ndarray:
    """Deterministic extra views of calibration photos: random square crops (50-100% of the short
    side, anywhere in the frame), mirrored half the time, then the runtime's prepare().

    They widen the calibration set with the zooms and framings a camera sees, without adding new
    photos. views=0 gives nothing."""
    rng = np.random.default_rng(seed)
    out = []
    for path in paths:
        img = load_image(path)
        for _ in range(views):
            side = int(min(img.size) * rng.uniform(0.5, 1.0))
            left = int(rng.integers(0, img.width - side + 1))
            top = int(rng.integers(0, img.height - side + 1))
            crop = img.crop((left, top, left + side, top + side))
            out.append(prepare(crop, size, mirror=bool(rng.integers(0, 2))))
    if not out:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(out)
