"""The BiT ResNet stem of the hybrid R50+ViT models, with Google's numerics.

Parameter names follow the reference implementation (``root.conv``, ``body.block1.unit1.conv1``,
``downsample``, ``gn_proj``) so that its saved state_dicts load unchanged. The arithmetic follows
Google's ``vit_jax/models_resnet.py`` instead, where the reference differs:

* weight standardisation divides by ``std + 1e-5`` (population std over each output filter);
* every GroupNorm has 32 groups and eps 1e-6, the projection shortcut's included;
* convolutions and the stem's max-pool use TensorFlow "SAME" padding, which pads more on the
  bottom/right than on the top/left for even inputs (56x56 after the stem at 224 px, not 55x55).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad an NCHW tensor as TensorFlow's padding="SAME" does for this kernel and stride."""
    top, bottom = _same_padding(x.shape[-2], kernel, stride)
    left, right = _same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation and "SAME" padding (Google's ``StdConv``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck unit: stride on the 3x3 conv, GroupNorm after each conv.

    (The reference calls this class ``PreActBottleneck``, although its normalisation comes after
    the convolutions, as in Google's ``ResidualUnit``.)
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StdConv2d(cin, cmid, 1)
        self.gn1 = group_norm(cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride)
        self.gn2 = group_norm(cmid)
        self.conv3 = StdConv2d(cmid, cout, 1)
        self.gn3 = group_norm(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride)
            self.gn_proj = group_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.downsample(x)) if hasattr(self, "downsample") else x
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class MaxPoolSame(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, 3, 2, value=-math.inf), 3, 2)


class ResNetV2(nn.Module):
    """Stem (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool) and stages of bottleneck units.

    Stage i has ``block_units[i]`` units of width ``64 * width_factor * 2**i``; every stage but the
    first halves the resolution, so (3, 4, 9) reduces 224 px to a 14x14 grid of 1024 channels.
    """

    def __init__(self, block_units: tuple[int, ...], width_factor: int) -> None:
        super().__init__()
        width = int(64 * width_factor)
        self.width = width
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(3, width, 7, stride=2),
                gn=group_norm(width),
                relu=nn.ReLU(inplace=True),
                pool=MaxPoolSame(),
            )
        )
        stages = OrderedDict()
        cin = width
        for i, units in enumerate(block_units):
            cmid, cout = width * 2**i, width * 4 * 2**i
            stage = OrderedDict()
            for j in range(units):
                stride = 2 if i > 0 and j == 0 else 1
                stage[f"unit{j + 1}"] = Bottleneck(cin, cout, cmid, stride)
                cin = cout
            stages[f"block{i + 1}"] = nn.Sequential(stage)
        self.body = nn.Sequential(stages)
        self.out_channels = cin
        self.num_downsamples = num_downsamples(block_units)

    def feature_grid(self, img_size: int) -> int:
        return feature_grid(img_size, self.num_downsamples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.root(x))


def feature_grid(img_size: int, num_downsamples: int) -> int:
    """The side of the feature map for a square input, as "SAME" padding rounds it."""
    for _ in range(num_downsamples):
        img_size = math.ceil(img_size / 2)
    return img_size


def num_downsamples(block_units: tuple[int, ...]) -> int:
    """Halvings of the input: the stem's convolution and pool, then each stage after the first."""
    return 2 + max(len(block_units) - 1, 0)
