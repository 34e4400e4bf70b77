"""Export a trained trunk as weights other code can load (RUN/export/).

    path = export_backbone(trunk, "vgg16_bn", "RUN/export")   # RUN/export/vgg16_bn_backbone.pth
    model = torchvision_backbone(path)                        # torchvision vgg16_bn, RGB input

vgg16_bn / resnet50: `<arch>_backbone.pth` is a plain state dict in torchvision's key names; it
lacks only the final classifier layer (classifier.6.* / fc.*), so
`torchvision.models.vgg16_bn(weights=None).load_state_dict(sd, strict=False)` reports exactly
those keys missing. Features = classifier[:4] output (VGG, pre-ReLU) / avgpool output (ResNet).

Sobel trunks: the fixed gray + Sobel layer is folded into the first conv, so the exported model
takes plain RGB (normalised as in training) and gives *exactly* the trunk's features, borders
included (the trunk keeps that conv's padding in the Sobel layer for this reason, see sobel.py).
The price: a kxk conv after a 3x3 Sobel is a (k+2)x(k+2) conv on RGB, and no kxk kernel equals
it, so the folded conv1 is 5x5 (VGG, padding 2) / 9x9 (ResNet, stride 2, padding 4). Stock
torchvision needs that one layer widened before loading; `torchvision_backbone` does it from the
sidecar `<arch>_backbone.json`, or by hand:
    model.features[0] = torch.nn.Conv2d(3, 64, 5, padding=2)                        # vgg16_bn
    model.conv1 = torch.nn.Conv2d(3, 64, 9, stride=2, padding=4, bias=False)        # resnet50

smallvgg: its own format, `smallvgg_backbone.pth` (state dict, Sobel buffers included) plus
`smallvgg_backbone.json` (its constructor arguments); `load_exported(path)` rebuilds it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from dist_cluster.models.smallvgg import SmallVGG
from dist_cluster.models.sobel import rgb_kernel
from dist_cluster.models.torchvision_trunks import VGG16BN, ResNet50

# (trunk class, name of the first conv in the state dict, keys of the layer we do not export)
_TORCHVISION = {
    "vgg16_bn": (VGG16BN, "features.0", ("classifier.6.weight", "classifier.6.bias")),
    "resnet50": (ResNet50, "conv1", ("fc.weight", "fc.bias")),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) and/or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees a half-written file


def _conv_geometry(conv: nn.Conv2d) -> dict:
    return dict(kernel_size=list(conv.kernel_size), stride=list(conv.stride),
                padding=list(conv.padding), bias=conv.bias is not None)


def torchvision_state_dict(trunk: nn.Module, arch: str) -> tuple[dict, dict]:
    """(state dict in torchvision names, RGB input, Sobel folded; geometry of the exported conv1)."""
    cls, conv_name, _ = _TORCHVISION[arch]
    if not isinstance(trunk, cls):
        raise TypeError(f"export as {arch} needs a {cls.__name__} trunk, got {type(trunk).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items() if not k.startswith("sobel.")}
    conv = trunk.get_submodule(conv_name)
    if trunk.sobel is None:
        return state, _conv_geometry(conv)
    state[f"{conv_name}.weight"] = rgb_kernel(trunk.sobel, conv.weight).cpu()
    geometry = _conv_geometry(conv)
    geometry["kernel_size"] = [k + 2 for k in conv.kernel_size]
    geometry["padding"] = [trunk.sobel.padding] * 2
    return state, geometry


def export_backbone(trunk: nn.Module, arch: str, out_dir: str | Path) -> Path:
    """Write out_dir/<arch>_backbone.pth (+ .json) and return the .pth path (see module doc)."""
    trunk = unwrap(trunk)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{arch}_backbone.pth"
    if arch == "smallvgg":
        if not isinstance(trunk, SmallVGG):
            raise TypeError(f"export as smallvgg needs a SmallVGG trunk, got {type(trunk).__name__}")
        meta = dict(trunk.config, format="dist_cluster.smallvgg")
        state = {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items()}
    elif arch in _TORCHVISION:
        state, conv1 = torchvision_state_dict(trunk, arch)
        meta = dict(arch=arch, format="torchvision", sobel_folded=trunk.sobel is not None, conv1=conv1,
                    missing_keys=list(_TORCHVISION[arch][2]))
    else:
        raise ValueError(f"unknown arch {arch!r}; expected smallvgg, vgg16_bn or resnet50")
    _atomic_save(state, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def _read_meta(path: Path) -> dict:
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} (written next to the weights by export_backbone) is missing")
    return json.loads(meta_path.read_text())


def load_exported(path: str | Path) -> SmallVGG:
    """Rebuild an exported smallvgg (eval mode) from smallvgg_backbone.pth + .json."""
    meta = _read_meta(Path(path))
    if meta.get("format") != "dist_cluster.smallvgg":
        raise ValueError(f"{path} is not a smallvgg export (format {meta.get('format')!r}); "
                         "use torchvision_backbone for vgg16_bn / resnet50")
    model = SmallVGG(feature_dim=meta["feature_dim"], sobel=meta["sobel"], widths=meta["widths"],
                     pool_size=meta.get("pool_size", 1))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def torchvision_backbone(path: str | Path) -> nn.Module:
    """Stock torchvision model (eval mode) holding an exported backbone; conv1 widened if folded.

    The final classifier layer is left at its random init: use `penultimate(model, arch, x)`.
    """
    meta = _read_meta(Path(path))
    arch = meta["arch"]
    if meta.get("format") != "torchvision" or arch not in _TORCHVISION:
        raise ValueError(f"{path} is not a torchvision export: {meta}")
    model = getattr(torchvision.models, arch)(weights=None)
    _, conv_name, expected_missing = _TORCHVISION[arch]
    geo = meta["conv1"]
    wide = nn.Conv2d(3, 64, tuple(geo["kernel_size"]), stride=tuple(geo["stride"]),
                     padding=tuple(geo["padding"]), bias=geo["bias"])
    parent, _, child = conv_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, wide)
    result = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    if sorted(result.missing_keys) != sorted(expected_missing) or result.unexpected_keys:
        raise ValueError(f"{path}: missing {result.missing_keys}, unexpected {result.unexpected_keys}; "
                         f"expected only {list(expected_missing)} missing")
    return model.eval()


def penultimate(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """The trunk's feature from a torchvision model: classifier[:4] (vgg16_bn) / pooled layer4 (resnet50)."""
    if arch == "vgg16_bn":
        return model.classifier[:4](torch.flatten(model.avgpool(model.features(x)), 1))
    if arch == "resnet50":
        return torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    raise ValueError(f"penultimate: unknown torchvision arch {arch!r}")
