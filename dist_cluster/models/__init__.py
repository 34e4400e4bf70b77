"""Trunks: `build_trunk(cfg.model, cfg.data.image_size)`.

Every trunk maps [B, 3, H, W] normalised RGB to [B, trunk.feature_dim] penultimate features
(pre-ReLU, except ResNet-50 whose pooled features are post-ReLU by construction), and has
`forward_blocks(x) -> list[Tensor]` with the conv block outputs named by `trunk.block_names`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dist_cluster.models.smallvgg import SmallVGG
from dist_cluster.models.sobel import Sobel
from dist_cluster.models.torchvision_trunks import VGG16BN, ResNet50

ARCHS = ("smallvgg", "vgg16_bn", "resnet50")


def build_trunk(cfg_model, image_size: int) -> nn.Module:
    """The trunk named by cfg_model.arch, with cfg_model.sobel; checks the image size.

    cfg_model.feature_dim sets smallvgg's feature width only (vgg16_bn: 4096, resnet50: 2048).
    """
    arch = cfg_model.arch
    if arch == "smallvgg":
        trunk = SmallVGG(feature_dim=int(cfg_model.feature_dim), sobel=bool(cfg_model.sobel),
                         pool_size=int(cfg_model.pool_size))
    elif arch == "vgg16_bn":
        trunk = VGG16BN(sobel=bool(cfg_model.sobel))
    elif arch == "resnet50":
        trunk = ResNet50(sobel=bool(cfg_model.sobel))
    else:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    if image_size < trunk.min_size:
        raise ValueError(f"model.arch={arch} needs data.image_size >= {trunk.min_size} "
                         f"(its pools/strides), got {image_size}")
    return trunk


def initial_trunk(cfg_model, image_size: int, seed: int) -> nn.Module:
    """The trunk a run starts from: the same weights on every rank, in every run of `seed`
    (rounds.Run, and `launch/train.py --export-init` for the random-init baseline)."""
    torch.manual_seed(seed)
    return build_trunk(cfg_model, image_size)


__all__ = ["ARCHS", "build_trunk", "initial_trunk", "SmallVGG", "VGG16BN", "ResNet50", "Sobel"]
