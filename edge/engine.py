"""The embedding engine: one TFLite interpreter, reused for every frame, turning an image into a vector.

Everything about the model (input size, dtype, quantization) is read from the model file itself,
so the default int8 MobileNet, the classic `mobilenet_v1_1.0_224_quant.tflite` or a Teachable
Machine export all load the same way. Not thread-safe by design: one thread owns an Embedder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from edge.image import ImageLike, prepare

log = logging.getLogger(__name__)

KERNELS = ("auto", "builtin", "reference")

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
VARIANTS = {
    "224": "mobilenet_v2_1.0_224_int8.tflite",
    "160": "mobilenet_v2_1.0_160_int8.tflite",
    "128": "mobilenet_v2_1.0_128_int8.tflite",
}
DEFAULT_MODEL = MODELS_DIR / VARIANTS["224"]
FLOAT_MODEL = MODELS_DIR / "mobilenet_v2_1.0_224_float32.tflite"


def all_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: Optional[int]) -> int:
    """Interpreter threads: None means all cores (LiteRT itself would start only one)."""
    return all_cores() if threads is None else int(threads)


class ModelError(RuntimeError):
    """The model file is missing, damaged or not an image model; the message is one line."""


def _load_backend():
    """LiteRT's Interpreter, else tflite_runtime's (older Pis); names which one for the logs."""
    try:
        from ai_edge_litert import interpreter as backend
        return backend, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as backend  # type: ignore[no-redef]
        return backend, "tflite-runtime"
    except ImportError:
        raise ModelError("no TFLite runtime installed: pip install ai-edge-litert "
                         "(or tflite-runtime where LiteRT has no wheel)") from None


@dataclass(frozen=True)
class ModelInfo:
    """What the engine learned about a model from its own tensors."""

    path: str
    size: int
    input_dtype: str
    output_dim: int
    quantized_output: bool
    backend: str


class Embedder:
    """Loads a TFLite image model once and turns RGB frames into float32 embeddings.

    `kernels` picks LiteRT's operator set: "auto" (optimized, XNNPACK), "builtin" (optimized,
    no default delegate) or "reference" (slow portable kernels, used under qemu emulation where
    the optimized ARM kernels crash). `input_range` is used only for float-input models: the
    real value range their input expects (MobileNet and Teachable Machine use -1..1).
    `threads` None means all cores; `self.threads` is the count really given to the interpreter.
    """

    def __init__(self, model_path: Union[str, Path], threads: Optional[int] = None,
                 kernels: str = "auto", input_range: Sequence[float] = (-1.0, 1.0),
                 mirror: bool = False):
        if kernels not in KERNELS:
            raise ModelError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
        self.path = Path(model_path)
        self.mirror = mirror
        content = _read_model(self.path)
        self.model_id = hashlib.sha256(content).hexdigest()
        self.threads = resolve_threads(threads)
        backend, backend_name = _load_backend()
        resolver = {"auto": backend.OpResolverType.AUTO,
                    "builtin": backend.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                    "reference": backend.OpResolverType.BUILTIN_REF}[kernels]
        try:
            self._interp = backend.Interpreter(model_content=content, num_threads=self.threads,
                                               experimental_op_resolver_type=resolver)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path}: not a usable TFLite model ({first})") from None

        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input tensor, found {len(inputs)}")
        inp, out = inputs[0], outputs[0]
        shape = tuple(int(d) for d in inp["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2]:
            raise ModelError(f"{self.path}: not an image model (input shape {list(shape)}, "
                             "expected [1, N, N, 3])")
        self.size = shape[1]
        self._in_index = inp["index"]
        self._in_dtype = np.dtype(inp["dtype"])
        if self._in_dtype not in (np.uint8, np.int8, np.float32):
            raise ModelError(f"{self.path}: unsupported input dtype {self._in_dtype}")
        lo, hi = float(input_range[0]), float(input_range[1])
        self._float_scale = (hi - lo) / 255.0
        self._float_offset = lo

        self._out_index = out["index"]
        scale, zero = out["quantization"]
        self._out_scale = float(scale)
        self._out_zero = float(zero)
        self.dim = int(np.prod(out["shape"]))
        self.info = ModelInfo(path=str(self.path), size=self.size, input_dtype=self._in_dtype.name,
                              output_dim=self.dim, quantized_output=self._out_scale != 0.0,
                              backend=backend_name)
        log.debug("loaded %s: %s", self.path, self.info)

    def input_tensor(self, rgb: np.ndarray) -> np.ndarray:
        """A prepared RGB uint8 array as the model's input tensor (batch of one)."""
        if self._in_dtype == np.uint8:
            x = rgb
        elif self._in_dtype == np.int8:
            # int8-input image models take pixels shifted by 128 (their input zero point).
            x = (rgb.astype(np.int16) - 128).astype(np.int8)
        else:
            x = rgb.astype(np.float32) * self._float_scale + self._float_offset
        return x[np.newaxis]

    def invoke(self, rgb: np.ndarray) -> np.ndarray:
        """Run the model on an already prepared size x size RGB uint8 array."""
        self._interp.set_tensor(self._in_index, self.input_tensor(rgb))
        self._interp.invoke()
        raw = self._interp.get_tensor(self._out_index).reshape(-1)
        if self._out_scale:
            return (raw.astype(np.float32) - self._out_zero) * self._out_scale
        return raw.astype(np.float32, copy=True)

    def prepare(self, img: ImageLike) -> np.ndarray:
        """The engine's preprocessing: centre crop, resize to the model size, optional mirror."""
        return prepare(img, self.size, mirror=self.mirror)

    def embed(self, img: ImageLike) -> np.ndarray:
        """Any frame or image (PIL, or a uint8 array of any size) to its float32 embedding."""
        return self.invoke(self.prepare(img))


def reference_path(model_path: Union[str, Path]) -> Path:
    """Where a model's reference mean embedding lives: beside it, `<stem>.mean.npy`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".mean.npy")


def spread_beside(mean_file: Union[str, Path]) -> Path:
    """Where the spread prior (edge.head.spread_prior) made with a reference mean lives: beside
    it, `<name>.spread.npy` for `<name>.mean.npy` (or for `<name>.npy`)."""
    mean_file = Path(mean_file)
    name = mean_file.name[:-len(".mean.npy")] if mean_file.name.endswith(".mean.npy") else mean_file.stem
    return mean_file.with_name(name + ".spread.npy")


def spread_path(model_path: Union[str, Path]) -> Path:
    """Where a model's spread prior lives: beside its reference mean, `<stem>.spread.npy`."""
    return spread_beside(reference_path(model_path))


def load_reference(model_path: Union[str, Path], dim: int, path: Optional[Path] = None) -> Optional[np.ndarray]:
    """The model's reference mean embedding (see `edge reference`; or the one at `path`), or None
    when there is none."""
    return _load_beside(path or reference_path(model_path), "reference mean", "the unknown gate is less sharp",
                        lambda a: a.shape == (dim,), f"model outputs {dim}")


def load_spread(model_path: Union[str, Path], dim: int, path: Optional[Path] = None) -> Optional[np.ndarray]:
    """The model's spread prior (see `edge reference`; or the one at `path`), or None when there
    is none."""
    return _load_beside(path or spread_path(model_path), "spread prior", "the head chooses a little less well",
                        lambda a: a.ndim == 2 and 0 < a.shape[0] <= dim and a.shape[1] == dim
                        and float(np.sum(a.astype(np.float64) ** 2)) <= 1.001,
                        f"rows of {dim} numbers whose squares add up to at most 1")


def _load_beside(path: Path, what: str, without: str, fits, expected: str) -> Optional[np.ndarray]:
    """A float array saved beside the model by `edge reference`; None (and a log line saying what
    is lost) when there is none; ModelError in one line when it is unreadable or does not fit."""
    if not path.exists():
        log.info("no %s %s: %s; make one with `edge reference`", what, path.name, without)
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable {what} ({exc})") from None
    if array.dtype.kind != "f" or not np.isfinite(array).all() or not fits(array):
        raise ModelError(f"{path}: not a {what} for this model (shape {array.shape}, {expected})")
    return array.astype(np.float32)


def _read_model(path: Path) -> bytes:
    """The model's bytes, refusing what is plainly not a TFLite flatbuffer with a clear message."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelError(f"model path is a folder, not a .tflite file: {path}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ModelError(f"{path}: not a TFLite model (no TFL3 identifier; truncated or wrong file)")
    return content
