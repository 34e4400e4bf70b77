"""Class activation maps for the run's pseudo-classes: Grad-CAM on the last conv block.

    cams, explained, predicted = grad_cam(trunk, super_head, images, targets)   # [B, H, W] in [0, 1], [B], [B]
    rgb = overlay(image_uint8_hwc, cams[0].numpy())

Target: a logit of the super-class head on the ReLU'd trunk features (the path the training uses:
super_head(relu(trunk(x)))). Super-class s = rotation * m + super-cluster; the report explains, for
an upright image, the class s = its own assigned super-cluster (rotation 0): "what makes the trunk
put this image in its pseudo-class". Without targets, the head's top prediction is explained.
Why Grad-CAM: the trunks end in pooling followed by linear layers, BatchNorm and ReLU; the plain
CAM (Zhou et al. 2016) needs globally pooled features to feed the classifier linearly. With global
average pooling (smallvgg's default, ResNet-50) the gradient of the logit with respect to a channel
is the same at every position, so Grad-CAM's channel weights are exactly CAM's weights for the head
linearised at this image (its ReLU and BatchNorm states held fixed). With a pooled grid under the
feature layer (smallvgg pool_size > 1, VGG-16's 7 x 7) Grad-CAM is the usual channel-averaged
approximation.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def last_block_module(trunk: nn.Module) -> nn.Module:
    """The module whose output is the trunk's last conv block output (forward_blocks(x)[-1])."""
    if hasattr(trunk, "blocks"):  # SmallVGG: conv-BN-ReLU blocks and max pools
        return [b for b in trunk.blocks if not isinstance(b, nn.MaxPool2d)][-1]
    if hasattr(trunk, "layer4"):  # ResNet-50
        return trunk.layer4
    if hasattr(trunk, "features"):  # VGG-16-BN: the ReLU before the last max pool
        pools = [i for i, m in enumerate(trunk.features) if isinstance(m, nn.MaxPool2d)]
        return trunk.features[pools[-1] - 1]
    raise TypeError(f"no known last conv block in {type(trunk).__name__}")


def grad_cam(trunk: nn.Module, head: nn.Module, images: torch.Tensor,
             targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps [B, H, W] at the input resolution, each scaled to max 1; the class explained [B];
    the predicted class [B]). targets: the super-class to explain per image (default: the prediction).

    Eval mode, so every image's map depends on that image alone; no parameter gradient is touched.
    """
    was_training = trunk.training
    trunk.eval(), head.eval()
    captured = {}
    handle = last_block_module(trunk).register_forward_hook(lambda mod, inp, out: captured.__setitem__("act", out))
    try:
        with torch.enable_grad():
            logits = head(F.relu(trunk(images)))
            predicted = logits.argmax(1)
            classes = predicted if targets is None else targets.to(predicted.device).long()
            score = logits.gather(1, classes[:, None]).sum()
            grad, = torch.autograd.grad(score, captured["act"])
    finally:
        handle.remove()
        trunk.train(was_training)
    act = captured["act"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * act).sum(1, keepdim=True))
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cams / cams.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), classes.detach(), predicted.detach()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 image blended with the 'jet' colouring of a HxW map in [0, 1]."""
    from matplotlib import colormaps
    if image.shape[:2] != cam.shape:
        raise ValueError(f"image {image.shape[:2]} and map {cam.shape} differ in size")
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    return (image * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)
