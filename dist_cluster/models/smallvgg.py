"""A small VGG-style trunk for 28-64 px images (the CPU default).

    trunk = SmallVGG(feature_dim=512, sobel=True)   # [B, 3, H, W] -> [B, 512] pre-ReLU features

Layout: [Sobel] -> conv-BN-ReLU blocks with 2x2 max pools between stages -> global average
pooling -> Linear(C, feature_dim) -> BatchNorm1d. The output is the pre-ReLU penultimate feature
the clustering uses; the training heads apply the ReLU. Global pooling followed by linear layers
keeps class activation maps well defined.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from dist_cluster.models.sobel import Sobel

# 32-pool-64-pool-128-pool-256-256: a forward+backward of 64 images at 28 px takes ~0.12 s on one
# CPU thread (~0.10 s channels_last; printed by tests/test_models.py); the wider VGG layout
# 64-64-pool-128-128-pool-256-256 costs ~0.6 s, because its early layers run at full resolution.
DEFAULT_WIDTHS: tuple = (32, "M", 64, "M", 128, "M", 256, 256)

Layout = Sequence[Union[int, str]]


def _conv_bn_relu(c_in: int, c_out: int, padding: int) -> nn.Sequential:
    # no conv bias: the BatchNorm that follows has its own shift
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallVGG(nn.Module):
    """VGG-style conv trunk ending in global pooling and a linear feature layer."""

    arch = "smallvgg"

    def __init__(self, feature_dim: int = 512, sobel: bool = True, widths: Layout = DEFAULT_WIDTHS,
                 pool_size: int = 1):
        super().__init__()
        if not widths or not isinstance(widths[0], int):
            raise ValueError(f"widths must start with a conv width, got {widths!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.config = dict(arch="smallvgg", feature_dim=feature_dim, sobel=sobel, widths=list(widths),
                           pool_size=pool_size)
        self.feature_dim = feature_dim
        # with Sobel, the first conv's padding moves into the Sobel layer so the pair folds exactly
        self.sobel = Sobel(padding=2) if sobel else None
        c_in = 2 if sobel else 3
        blocks, names, first = [], [], True
        for i, w in enumerate(widths):
            if w == "M":
                blocks.append(nn.MaxPool2d(2))
                continue
            blocks.append(_conv_bn_relu(c_in, int(w), padding=0 if (first and sobel) else 1))
            names.append(f"conv{len(names) + 1}")
            c_in, first = int(w), False
        self.blocks = nn.ModuleList(blocks)
        self.block_names = names  # one per conv block, in forward_blocks order
        self.min_size = 2 ** sum(1 for w in widths if w == "M")  # each pool halves the side
        # pool_size 1: global average pooling; s > 1 keeps an s x s layout for the feature layer, like
        # VGG-16's fc6 over its 7 x 7 map (where an object part sits matters on 28 px clothes)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(c_in * pool_size * pool_size, feature_dim, bias=False)
        self.bn = nn.BatchNorm1d(feature_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0, 0.01)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(x) if self.sobel is not None else x

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every conv block (post-ReLU, before any following pool), for per-layer probes."""
        outs, x = [], self._stem(x)
        for block in self.blocks:
            x = block(x)
            if not isinstance(block, nn.MaxPool2d):
                outs.append(x)
        return outs

    def forward_with_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(forward(x), forward_blocks(x)) in one pass: the evaluation's per-layer probes."""
        blocks = self.forward_blocks(x)
        return self.bn(self.fc(torch.flatten(self.pool(blocks[-1]), 1))), blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for block in self.blocks:
            x = block(x)
        return self.bn(self.fc(torch.flatten(self.pool(x), 1)))
