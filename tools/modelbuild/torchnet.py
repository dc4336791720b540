"""MobileNetV2 1.0 in plain torch.nn, with torchvision's parameter names.

torchvision does not import beside the torch we use, so the architecture is written out here; the
module names match torchvision's state dict so `load_state_dict(strict=True)` proves the structure.
Input: normalized RGB (N, 3, H, W) float; `features()` returns the 1280-d global-average-pooled
vector, `forward()` the 1000 ImageNet logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
BN_EPS = 1e-5


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(cin, hidden, 1, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, 3, 2)]
        cin = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_relu6(cin, LAST_CHANNELS, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(LAST_CHANNELS, num_classes))

    def pooled(self, x):
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.classifier(self.pooled(x))


MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def build(state: dict[str, np.ndarray]) -> MobileNetV2:
    """The reference network with the given weights, in eval mode (BatchNorm uses running stats)."""
    net = MobileNetV2()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return net.eval()


def features(net: MobileNetV2, rgb_uint8: np.ndarray, batch: int = 32) -> np.ndarray:
    """1280-d features of (N, H, W, 3) uint8 RGB images, normalized as torchvision does."""
    out = []
    with torch.no_grad():
        for i in range(0, len(rgb_uint8), batch):
            x = rgb_uint8[i:i + batch].astype(np.float32) / 255.0
            x = (x - MEAN) / STD
            out.append(net.pooled(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy())
    return np.concatenate(out)
