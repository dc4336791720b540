"""The MobileNetV2 feature extractor as TensorFlow ops, ready for the TFLite converter.

Parameters live in plain numpy (`Conv` records), so quantization-aware transforms (bias correction)
can edit them before the graph is traced. Three things keep the port exact:

* BatchNorm is folded into each conv (w * g/sqrt(v+eps), b = beta - mean * g/sqrt(v+eps)), eps=1e-5.
* Padding is explicit and symmetric (pad 1 each side, then a `VALID` conv), as torch does;
  TF's `SAME` would pad stride-2 convs bottom/right only and shift every feature map.
* The input is raw RGB 0..255. torchvision's (x/255 - mean)/std is folded into the stem conv, and
  the stem's zero padding, which torch applies in normalized space, becomes padding with the
  mean colour (255*mean) in raw space, so border outputs match too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np

from . import torchnet


@dataclass
class Conv:
    """One conv + folded BN. w: HWIO (regular) or HWC1 (depthwise), float32."""
    name: str
    w: np.ndarray
    b: np.ndarray
    stride: int
    depthwise: bool
    relu6: bool

    @property
    def kernel(self) -> int:
        return self.w.shape[0]


@dataclass
class Block:
    """Convs applied in order; `residual` adds the block input to the output."""
    convs: list[Conv]
    residual: bool


@dataclass
class Params:
    stem_pad_colour: np.ndarray  # raw RGB value that corresponds to 0 in normalized space
    blocks: list[Block]
    classifier_w: np.ndarray     # (1000, 1280), only for ImageNet top-1 checks
    classifier_b: np.ndarray

    def convs(self) -> list[Conv]:
        return [c for blk in self.blocks for c in blk.convs]

    def with_convs(self, new: dict[str, Conv]) -> "Params":
        blocks = [Block([new.get(c.name, c) for c in blk.convs], blk.residual) for blk in self.blocks]
        return replace(self, blocks=blocks)


def _fold(state, conv_key: str, bn_key: str, depthwise: bool):
    w = state[conv_key + ".weight"].astype(np.float64)          # OIHW (depthwise: C,1,H,W)
    gamma, beta = state[bn_key + ".weight"], state[bn_key + ".bias"]
    mean, var = state[bn_key + ".running_mean"], state[bn_key + ".running_var"]
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + torchnet.BN_EPS)
    w = w * scale[:, None, None, None]
    b = beta - mean * scale
    w = w.transpose(2, 3, 1, 0)  # -> HWIO; depthwise (C,1,H,W) -> (H,W,1,C)
    if depthwise:
        w = w.transpose(0, 1, 3, 2)  # -> HWC1, tf.nn.depthwise_conv2d's layout
    return w, b.astype(np.float64)


def from_state_dict(state: dict[str, np.ndarray]) -> Params:
    """Fold BN and the input normalization; mirror torchnet.MobileNetV2's structure exactly."""
    blocks: list[Block] = []

    # Stem: fold (x/255 - mean)/std into the weights and bias (float64 while folding).
    w, b = _fold(state, "features.0.0", "features.0.1", False)
    mean = torchnet.MEAN.astype(np.float64)
    std = torchnet.STD.astype(np.float64)
    b = b - np.einsum("hwio,i->o", w, mean / std)
    w = w / (255.0 * std)[None, None, :, None]
    blocks.append(Block([Conv("stem", w, b, 2, False, True)], residual=False))

    index, cin = 1, torchnet.STEM_CHANNELS
    for t, c, n, s in torchnet.INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            prefix = f"features.{index}.conv"
            convs = []
            k = 0
            if t != 1:
                w, b = _fold(state, f"{prefix}.0.0", f"{prefix}.0.1", False)
                convs.append(Conv(f"b{index}_expand", w, b, 1, False, True))
                k = 1
            w, b = _fold(state, f"{prefix}.{k}.0", f"{prefix}.{k}.1", True)
            convs.append(Conv(f"b{index}_dw", w, b, stride, True, True))
            w, b = _fold(state, f"{prefix}.{k + 1}", f"{prefix}.{k + 2}", False)
            convs.append(Conv(f"b{index}_project", w, b, 1, False, False))
            blocks.append(Block(convs, residual=(stride == 1 and cin == c)))
            index, cin = index + 1, c

    w, b = _fold(state, f"features.{index}.0", f"features.{index}.1", False)
    blocks.append(Block([Conv("head", w, b, 1, False, True)], residual=False))

    params = Params(
        stem_pad_colour=(255.0 * mean).astype(np.float32),
        blocks=blocks,
        classifier_w=state["classifier.1.weight"].astype(np.float32),
        classifier_b=state["classifier.1.bias"].astype(np.float32),
    )
    for conv in params.convs():
        conv.w = conv.w.astype(np.float32)
        conv.b = conv.b.astype(np.float32)
    return params


# ---------------------------------------------------------------------------------------------
# TensorFlow graph


def _pad_with_colour(tf, x, colour):
    """Pad H and W by 1 on each side with a per-channel constant (PadV2 per channel, then concat)."""
    channels = tf.split(x, 3, axis=-1)
    padded = [tf.pad(ch, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=float(v))
              for ch, v in zip(channels, colour)]
    return tf.concat(padded, axis=-1)


def apply_conv(tf, x, conv: Conv, w=None, b=None, pad_colour=None):
    """One folded conv on NHWC x with torch-style symmetric padding; w/b override the params.
    Ops are named under the conv's name scope, so TFLite tensors can be traced back to layers."""
    scope = tf.name_scope(conv.name) if conv.name else contextlib.nullcontext()
    with scope:
        return _apply_conv(tf, x, conv, w, b, pad_colour)


def _apply_conv(tf, x, conv, w, b, pad_colour):
    w = conv.w if w is None else w
    b = conv.b if b is None else b
    if conv.kernel > 1:
        if pad_colour is not None:
            x = _pad_with_colour(tf, x, pad_colour)
        else:
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    strides = [1, conv.stride, conv.stride, 1]
    if conv.depthwise:
        y = tf.nn.depthwise_conv2d(x, tf.constant(w), strides, "VALID")
    else:
        y = tf.nn.conv2d(x, tf.constant(w), strides, "VALID")
    y = tf.nn.bias_add(y, tf.constant(b))
    return tf.nn.relu6(y) if conv.relu6 else y


def forward(tf, params: Params, x, taps: dict | None = None):
    """Raw RGB float (N,H,W,3) in 0..255 -> (N,1280) pooled features.

    If `taps` is a dict, each conv's input is stored in it by conv name (for statistics).
    """
    for blk in params.blocks:
        block_in = x
        for conv in blk.convs:
            if taps is not None:
                taps[conv.name] = x
            pad_colour = params.stem_pad_colour if conv.name == "stem" else None
            x = apply_conv(tf, x, conv, pad_colour=pad_colour)
        if blk.residual:
            x = x + block_in
    with tf.name_scope("pool"):
        return tf.reduce_mean(x, axis=[1, 2])


def features(params: Params, rgb_uint8: np.ndarray, batch: int = 32) -> np.ndarray:
    """Eager TF features of (N,H,W,3) uint8 images (for checking the port against torch)."""
    import tensorflow as tf

    out = []
    for i in range(0, len(rgb_uint8), batch):
        x = tf.constant(rgb_uint8[i:i + batch].astype(np.float32))
        out.append(forward(tf, params, x).numpy())
    return np.concatenate(out)
