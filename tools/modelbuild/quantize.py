"""TFLite conversion of the TF port: the float32 model and the int8 recipes.

Every model takes uint8 RGB (1, S, S, 3) and returns (1, 1280) features. The float32 model casts
the uint8 input inside the graph; the int8 models let the converter quantize the float input with
the calibrated range 0..255, i.e. scale 1, so the uint8 pixels enter the int8 graph unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from . import tfnet


@dataclass
class Recipe:
    """How an int8 model is made; each field is one quantization step measured in the card."""
    name: str
    augment_views: int = 0          # extra augmented views per calibration photo
    bias_correction: bool = False   # correct each conv bias for its int8 weight rounding error
    float_pool: bool = False        # dequantize before the global average pool, pool in float
    float_layers: list[str] = field(default_factory=list)  # convs kept float (names in tfnet)
    mse_ranges: bool = False        # activation ranges that minimise quantization MSE, not min/max
    equalize: float = 0.0           # strength (0..1) of residual-stream channel equalization


def _tf():
    import tensorflow as tf
    return tf


def _concrete(params: tfnet.Params, size: int, uint8_input: bool):
    """A traced tf.function for the converter."""
    tf = _tf()
    dtype = tf.uint8 if uint8_input else tf.float32

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], dtype, name="rgb")])
    def embed(rgb):
        x = tf.cast(rgb, tf.float32) if uint8_input else rgb
        return {"features": tfnet.forward(tf, params, x)}

    return embed.get_concrete_function()


def float32_model(params: tfnet.Params, size: int) -> bytes:
    tf = _tf()
    fn = _concrete(params, size, uint8_input=True)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], fn)
    return converter.convert()


def _int8_converter(params, size, calibration: np.ndarray, float_output: bool):
    tf = _tf()
    fn = _concrete(params, size, uint8_input=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative() -> Iterable[list[np.ndarray]]:
        for img in calibration:
            yield [img[None].astype(np.float32)]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32 if float_output else tf.int8
    return converter


def int8_model(params: tfnet.Params, size: int, calibration: np.ndarray, recipe: Recipe) -> bytes:
    """Full-integer model (int8 weights and activations, uint8 input) per the recipe.

    Calibration runs first (TFLite records each activation's min/max on the representative
    set); then, with `mse_ranges`, those ranges are replaced by MSE-optimal ones; finally the
    MLIR quantizer turns the calibrated float model into int8, leaving denylisted ops float.
    """
    tf = _tf()
    from tensorflow.lite.python import convert

    float_output = recipe.float_pool
    converter = _int8_converter(params, size, calibration, float_output)
    converter.experimental_new_quantizer = True
    converter._experimental_calibrate_only = True  # noqa: SLF001 (the documented debugger route)
    calibrated = converter.convert()
    if recipe.mse_ranges:
        calibrated = with_mse_ranges(calibrated, calibration)

    scopes = list(recipe.float_layers) + (["pool"] if recipe.float_pool else [])
    nodes = []
    if scopes:
        # Ops are named by their output tensors in the float model, which carry our name scopes.
        nodes = [name for op, name in _op_outputs(params, size)
                 if (op == "MEAN" and "pool" in scopes)
                 or any(part.startswith(scope + "/") for part in name.split(";") for scope in scopes)]
        if not nodes:
            raise ValueError(f"no ops found for float layers {scopes}")
    output_type = tf.float32 if float_output else tf.int8
    # As TFLiteConverter does: the quantizer itself gives the uint8 input (scale 1: the pixels)
    # and the int8 or float32 output.
    model = bytes(convert.mlir_quantize(calibrated, input_data_type=tf.uint8, output_data_type=output_type,
                                        denylisted_nodes=nodes or None))
    _check_input_is_pixels(model)
    return model


def _check_input_is_pixels(model: bytes) -> None:
    """The uint8 input must be the pixels themselves (scale 1, zero point 0), which holds when the
    calibration images span 0..255; otherwise the engine's raw frames would be misread."""
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_content=model).get_input_details()[0]
    scale, zero = detail["quantization"]
    if detail["dtype"] != np.uint8 or abs(scale - 1.0) > 1e-6 or zero != 0:
        raise ValueError(f"int8 model input is {detail['dtype']} scale {scale} zero point {zero}, "
                         "expected uint8 scale 1 zero point 0 (calibration images must span 0..255)")


# Ops that only move the raw input around; their tensors keep the full 0..255 range (scale 1).
_INPUT_OPS = {"SPLIT", "PAD", "PADV2", "CONCATENATION", "QUANTIZE", "CAST"}


def with_mse_ranges(calibrated: bytes, calibration: np.ndarray, bins: int = 2048) -> bytes:
    """Replace recorded min/max activation ranges by the ranges that minimise the expected
    squared error of int8 quantization (rounding noise inside the range + clipping outside), from
    each tensor's histogram over the calibration set. One rare outlier no longer spreads 256
    levels over a range where almost no values fall."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    graph = model.subgraphs[0]
    opnames = {i: _opcode_name(code) for i, code in enumerate(model.operatorCodes)}
    skip = set(graph.inputs)
    for op in graph.operators:
        if opnames[op.opcodeIndex] in _INPUT_OPS:
            skip.update(op.outputs)
    targets = {}
    for i, t in enumerate(graph.tensors):
        q = t.quantization
        if i in skip or q is None or q.min is None or q.max is None or len(q.min) != 1:
            continue
        lo, hi = float(q.min[0]), float(q.max[0])
        if hi > lo:
            targets[i] = (lo, hi)

    interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                         num_threads=2)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    hist = {i: np.zeros(bins, np.int64) for i in targets}
    for img in calibration:
        interp.set_tensor(inp, img[None].astype(np.float32))
        interp.invoke()
        for i, (lo, hi) in targets.items():
            x = interp.get_tensor(i).ravel()
            idx = np.clip(((x - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1)
            hist[i] += np.bincount(idx, minlength=bins)

    for i, (lo, hi) in targets.items():
        new_lo, new_hi = _mse_range(hist[i], lo, hi)
        q = graph.tensors[i].quantization
        q.min, q.max = [new_lo], [new_hi]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _opcode_name(code) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    value = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(value, str(value))


def _mse_range(counts: np.ndarray, lo: float, hi: float, levels: int = 255) -> tuple[float, float]:
    """(lo, hi) minimising E[(x - q(x))^2] for a histogram over [lo, hi]. A lower bound of 0
    stays 0 (ReLU outputs: keeps zero exact and the full code range for positive values)."""
    n = len(counts)
    width = (hi - lo) / n
    centres = lo + (np.arange(n) + 0.5) * width
    c = counts.astype(np.float64)
    total = c.sum()
    if total == 0:
        return lo, hi
    # Candidate cut points: bin edges at fine quantiles of the distribution (and the extremes).
    cdf = np.cumsum(c) / total
    qs = np.concatenate([[0.0], np.logspace(-7, -1.3, 40)])
    hi_idx = np.unique(np.clip(np.searchsorted(cdf, 1 - qs, side="left") + 1, 1, n))
    lo_idx = np.array([0]) if lo >= 0 else np.unique(np.clip(np.searchsorted(cdf, qs, side="right"), 0, n - 1))
    best, best_err = (lo, hi), np.inf
    for a in lo_idx:
        for b in hi_idx:
            if b <= a:
                continue
            cl, ch = lo + a * width, lo + b * width
            if lo < 0:
                cl = min(cl, 0.0)
            step = (ch - cl) / levels
            under = centres < cl
            over = centres > ch
            err = (np.sum(c[under] * (cl - centres[under]) ** 2) + np.sum(c[over] * (centres[over] - ch) ** 2)
                   + np.sum(c[~under & ~over]) * step * step / 12.0)
            if err < best_err:
                best, best_err = (float(cl), float(ch)), err
    return best


def _op_outputs(params: tfnet.Params, size: int) -> list[tuple[str, str]]:
    """(op type, output tensor name) of every op in the float TFLite conversion of the graph."""
    tf = _tf()
    from ai_edge_litert.interpreter import Interpreter

    fn = _concrete(params, size, uint8_input=False)
    interp = Interpreter(model_content=tf.lite.TFLiteConverter.from_concrete_functions([fn], fn).convert())
    tensors = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    return [(op["op_name"], tensors[i]) for op in interp._get_ops_details() for i in op["outputs"]]


def bias_corrected(params: tfnet.Params, calibration: np.ndarray, batch: int = 16) -> tfnet.Params:
    """Bias correction (Nagel et al. 2019, data-driven form).

    TFLite quantizes conv weights per output channel, symmetric, to int8 (scale = max|w|/127).
    The rounding error dW shifts each output channel's mean by E[conv(x, dW)], which is not zero
    for real (non-centred, ReLU6-positive) activations. We measure that shift on the float
    network's own inputs to every conv over the calibration photos and subtract it from the bias.
    The weights themselves are unchanged, so TFLite rounds them exactly as simulated here.
    """
    tf = _tf()
    convs = params.convs()
    deltas = {c.name: quantization_error(c.w, c.depthwise) for c in convs}
    sums = {c.name: np.zeros(c.b.shape, np.float64) for c in convs}
    positions = {c.name: 0 for c in convs}
    for i in range(0, len(calibration), batch):
        taps: dict = {}
        tfnet.forward(tf, params, tf.constant(calibration[i:i + batch].astype(np.float32)), taps=taps)
        for c in convs:
            # conv(x, dW) with no bias and no ReLU6: the error the rounding adds before the bias.
            linear = tfnet.Conv(c.name, deltas[c.name], np.zeros_like(c.b), c.stride, c.depthwise, False)
            pad_colour = params.stem_pad_colour if c.name == "stem" else None
            err = tfnet.apply_conv(tf, taps[c.name], linear, pad_colour=pad_colour).numpy()
            sums[c.name] += err.sum(axis=(0, 1, 2), dtype=np.float64)
            positions[c.name] += int(np.prod(err.shape[:3]))
    new = {}
    for c in convs:
        shift = sums[c.name] / positions[c.name]
        new[c.name] = tfnet.Conv(c.name, c.w, (c.b - shift).astype(np.float32), c.stride,
                                 c.depthwise, c.relu6)
    return params.with_convs(new)


def stream_groups(params: tfnet.Params) -> list[tuple[list[str], list[str]]]:
    """(producers, consumers) of each bottleneck stream: the linear, residual-connected channels
    between stages. Producers are the project convs writing the stream (first block of a stage and
    its residual blocks); consumers are the 1x1 convs reading it (expand convs of the residual
    blocks and the first conv of the next stage, or the head)."""
    groups, current = [], None
    for blk in params.blocks:
        first, last = blk.convs[0], blk.convs[-1]
        if current is not None and first.kernel == 1:
            current[1].append(first.name)
        if blk.residual and current is not None:
            current[0].append(last.name)
            continue
        if current is not None:
            groups.append(current)
            current = None
        if last.name.endswith("_project"):
            current = ([last.name], [])
    return groups


def equalized(params: tfnet.Params, calibration: np.ndarray, strength: float, batch: int = 16) -> tfnet.Params:
    """Cross-layer equalization of the residual streams, exact in float.

    Int8 activations share one scale per tensor, but the bottleneck channels of MobileNetV2 have
    ranges that differ by 10-100x, so the narrow channels get only a few int8 levels: the
    project outputs are where the int8 network loses most (lowest SQNR). The stream is linear
    (no ReLU, only adds), so channel c can be multiplied by s_c in every conv that writes it and
    divided by s_c in every conv that reads it without changing the function. s_c =
    (R / r_c)^strength with r_c the channel's largest |value| on the calibration photos and R the
    largest over channels; strength < 1 leaves the consumers' weights (quantized per output
    channel, so an input channel scaled down loses weight precision) part of the balance."""
    tf = _tf()
    groups = stream_groups(params)
    ranges: dict[str, np.ndarray] = {}
    for i in range(0, len(calibration), batch):
        taps: dict = {}
        tfnet.forward(tf, params, tf.constant(calibration[i:i + batch].astype(np.float32)), taps=taps)
        for _, consumers in groups:
            for name in consumers:
                r = np.abs(taps[name].numpy()).max(axis=(0, 1, 2))
                ranges[name] = np.maximum(ranges.get(name, 0), r)
    by_name = {c.name: c for c in params.convs()}
    new = {}
    for producers, consumers in groups:
        r = np.max([ranges[n] for n in consumers], axis=0)
        r = np.maximum(r, 1e-6 * r.max())
        scale = (r.max() / r) ** strength
        for name in producers:
            c = by_name[name]
            new[name] = tfnet.Conv(name, (c.w * scale).astype(np.float32), (c.b * scale).astype(np.float32),
                                   c.stride, c.depthwise, c.relu6)
        for name in consumers:
            c = new.get(name, by_name[name])
            new[name] = tfnet.Conv(name, (c.w / scale[None, None, :, None]).astype(np.float32), c.b,
                                   c.stride, c.depthwise, c.relu6)
    return params.with_convs(new)


def quantization_error(w: np.ndarray, depthwise: bool) -> np.ndarray:
    """w_int8_dequantized - w for TFLite's per-channel symmetric int8 weights.

    Output channels are axis 3 of HWIO and axis 2 of depthwise HWC1."""
    axes = (0, 1, 3) if depthwise else (0, 1, 2)   # all but the output-channel axis
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round(w / scale), -127, 127)
    return (q * scale - w).astype(np.float32)


# The recipe the shipped models use, and the steps measured for the card's table (each row adds
# one step to the row before, except the two "not adopted" rows, which add to FINAL).
BASELINE = Recipe("min/max PTQ, 213 photos")
AUG_MINMAX = Recipe("min/max PTQ + 3 augmented views per photo", augment_views=3)
MSE = Recipe("MSE-optimal activation ranges", mse_ranges=True)
BIAS = Recipe("+ bias correction", mse_ranges=True, bias_correction=True)
EQUALIZE = Recipe("+ residual-stream equalization (0.5)", mse_ranges=True, bias_correction=True,
                  equalize=0.5)
FINAL = Recipe("+ 3 augmented views per photo (final)", mse_ranges=True, bias_correction=True,
               equalize=0.5, augment_views=3)
FLOAT_POOL = Recipe("final + float pool and float output (not adopted)", mse_ranges=True,
                    bias_correction=True, equalize=0.5, augment_views=3, float_pool=True)
FLOAT_HEAD = Recipe("final + float last 1x1 conv and pool (not adopted)", mse_ranges=True,
                    bias_correction=True, equalize=0.5, augment_views=3, float_pool=True,
                    float_layers=["head"])
ABLATION = [BASELINE, AUG_MINMAX, MSE, BIAS, EQUALIZE, FINAL, FLOAT_POOL, FLOAT_HEAD]
