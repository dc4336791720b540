"""The embedding engine against the real int8 model and real photos."""

from pathlib import Path

import numpy as np
import pytest

from edge.engine import DEFAULT_MODEL, FLOAT_MODEL, MODELS_DIR, VARIANTS, Embedder, ModelError
from edge.image import list_images, load_image, prepare


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def photos(folder, n):
    return [load_image(p) for p in list_images(folder)[:n]]


def test_default_model_contract(engine):
    """Input [1,224,224,3] uint8, 1280 float outputs, int8 weights and activations."""
    interp = engine._interp
    inp = interp.get_input_details()[0]
    assert list(inp["shape"]) == [1, 224, 224, 3] and inp["dtype"] == np.uint8
    assert engine.dim == 1280
    vec = engine.embed(np.zeros((480, 640, 3), np.uint8))
    assert vec.shape == (1280,) and vec.dtype == np.float32
    dtypes = [t["dtype"] for t in interp.get_tensor_details()]
    assert sum(d == np.int8 for d in dtypes) > 100  # weights and activations
    assert not any(d == np.float32 for d in dtypes[1:-1]), "no float tensors inside the int8 model"


@pytest.mark.parametrize("variant", ["160", "128"])
def test_smaller_variants_load(variant):
    e = Embedder(MODELS_DIR / VARIANTS[variant], threads=1)
    assert e.size == int(variant) and e.dim == 1280


def test_interpreter_is_reused_and_deterministic(engine):
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    interp = engine._interp
    a, b = engine.embed(frame), engine.embed(frame)
    assert engine._interp is interp
    assert np.array_equal(a, b)


def test_int8_matches_float_network(clothing, engine):
    """The quantized model keeps the float network's geometry on photos it was not calibrated on."""
    fp32 = Embedder(FLOAT_MODEL, threads=2)
    imgs = photos(clothing / "test" / "shoes", 8) + photos(clothing / "test" / "dress", 8)
    sims = [cosine(engine.embed(i), fp32.embed(i)) for i in imgs]
    assert np.mean(sims) >= 0.96, sims


def test_same_object_is_closer_than_different_objects(clothing, engine):
    """Two views of one photo (shifted crop, mirror, darker) sit closer than two different photos."""
    imgs = photos(clothing / "test" / "hat", 4) + photos(clothing / "test" / "pants", 4)
    for img in imgs:
        w, h = img.size
        shifted = img.crop((w // 12, h // 12, w, h))
        darker = img.point(lambda v: int(v * 0.8))
        base = engine.embed(img)
        views = [engine.embed(shifted), engine.invoke(prepare(img, 224, mirror=True)), engine.embed(darker)]
        others = [engine.embed(o) for o in imgs if o is not img]
        assert min(cosine(base, v) for v in views) > max(cosine(base, o) for o in others)


def test_same_class_photos_are_closer_than_other_classes(clothing, engine):
    shoes = np.array([engine.embed(i) for i in photos(clothing / "test" / "shoes", 10)])
    hats = np.array([engine.embed(i) for i in photos(clothing / "test" / "hat", 10)])
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    within = (n(shoes) @ n(shoes).T)[np.triu_indices(10, 1)].mean()
    between = (n(shoes) @ n(hats).T).mean()
    assert within > between + 0.1


def test_threads_and_kernel_sets(clothing):
    """Every kernel set stays faithful to the float network (they round differently, so not equal)."""
    imgs = photos(clothing / "test" / "shirt", 4)
    fp32 = Embedder(FLOAT_MODEL, threads=1)
    for kernels in ("auto", "builtin", "reference"):
        e = Embedder(DEFAULT_MODEL, threads=1, kernels=kernels)
        sims = [cosine(e.embed(i), fp32.embed(i)) for i in imgs]
        assert np.mean(sims) >= 0.95, (kernels, sims)


def test_bad_model_files_give_clear_errors(tmp_path):
    real = DEFAULT_MODEL.read_bytes()
    cases = {
        "missing.tflite": None,
        "empty.tflite": b"",
        "text.tflite": b"this is not a model\n" * 10,
        "truncated.tflite": real[: len(real) // 3],
        "photo.tflite": (tmp_path / "x").write_bytes(b"") or b"\xff\xd8\xff\xe0" + b"\0" * 500,
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelError) as info:
            Embedder(path)
        msg = str(info.value)
        assert "\n" not in msg and name in msg, msg
    with pytest.raises(ModelError, match="folder"):
        Embedder(tmp_path)
    with pytest.raises(ModelError, match="kernels"):
        Embedder(DEFAULT_MODEL, kernels="fast")


def test_spread_prior_beside_the_model_loads_or_says_in_one_line_why_not(tmp_path):
    """The shipped models carry their spread prior; a missing one is None (the head works
    without it), a broken or foreign one is refused in one line naming the file."""
    from edge.engine import load_spread, spread_beside, spread_path
    from edge.head import SPREAD_RANK
    rows = load_spread(DEFAULT_MODEL, 1280)
    assert rows is not None and rows.dtype == np.float32 and rows.shape == (SPREAD_RANK, 1280)
    assert 0.5 < float(np.sum(rows.astype(np.float64) ** 2)) <= 1.001
    assert spread_path(DEFAULT_MODEL) == spread_beside(Path(DEFAULT_MODEL).with_suffix(".mean.npy"))
    assert spread_beside(tmp_path / "ref.npy") == tmp_path / "ref.spread.npy"
    model = tmp_path / "m.tflite"
    assert load_spread(model, 1280) is None
    cases = {"text": b"not numpy", "shape": np.zeros((4, 64), np.float32), "big": np.ones((2, 1280), np.float32),
             "nan": np.full((2, 1280), np.nan, np.float32), "ints": np.zeros((2, 1280), np.int64)}
    for name, content in cases.items():
        target = spread_path(model)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            np.save(target, content)
        with pytest.raises(ModelError) as info:
            load_spread(model, 1280)
        assert "\n" not in str(info.value) and target.name in str(info.value), (name, str(info.value))


def test_missing_runtime_is_a_clear_error(monkeypatch):
    """Without LiteRT and tflite_runtime the engine says what to install, not ImportError."""
    import sys
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(ModelError, match="pip install ai-edge-litert"):
        Embedder(DEFAULT_MODEL)


def test_input_conversion_for_other_model_kinds(engine):
    """int8- and float-input models get pixels converted the way such models expect."""
    rgb = np.array([[[0, 128, 255]]], np.uint8)
    engine._in_dtype = np.dtype(np.int8)
    try:
        assert engine.input_tensor(rgb)[0, 0, 0].tolist() == [-128, 0, 127]
        engine._in_dtype = np.dtype(np.float32)
        assert np.allclose(engine.input_tensor(rgb)[0, 0, 0], [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    finally:
        engine._in_dtype = np.dtype(np.uint8)


THREADS_PROBE = """
import json, os, sys, numpy as np
from edge.engine import DEFAULT_MODEL, Embedder
if len(sys.argv) > 1:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
tasks = lambda: len(os.listdir('/proc/self/task'))
before = tasks()
e = Embedder(DEFAULT_MODEL, threads=None)
e.invoke(np.zeros((e.size, e.size, 3), np.uint8))
print(json.dumps({"cores": len(os.sched_getaffinity(0)), "threads": e.threads,
                  "workers": tasks() - before}))
"""


@pytest.mark.parametrize("one_core", [False, True], ids=["all-cores", "pinned-to-one"])
def test_threads_null_uses_every_core_the_process_may_run_on(one_core):
    """model.threads: null = all cores (the affinity mask), and the interpreter really starts them:
    LiteRT's pool adds threads - 1 worker threads to the process."""
    import json, subprocess, sys
    args = [sys.executable, "-c", THREADS_PROBE] + (["one"] if one_core else [])
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    assert out["threads"] == out["cores"]
    assert out["workers"] == out["cores"] - 1
    if one_core:
        assert out["cores"] == 1
