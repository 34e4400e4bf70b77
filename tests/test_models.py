"""Trunks, the Sobel layer and the torchvision export.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q -s tests/test_models.py   # -s shows the timing
"""
import json
import time

import numpy as np
import pytest
import torch
import torchvision
from scipy.signal import correlate2d

from dist_cluster.config import load_config
from dist_cluster.models import VGG16BN, ResNet50, SmallVGG, Sobel, build_trunk
from dist_cluster.models.export import export_backbone, load_exported, penultimate, torchvision_backbone
from dist_cluster.models.sobel import fold_into_conv

torch.set_num_threads(1)


def _randomize_bn(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so the export of BN layers is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def _numpy_sobel(x, pad):
    """Reference: BT.601 gray of each image, zero padded by `pad`, then the two Sobel cross-correlations."""
    gray = np.tensordot(x.astype(np.float64), np.array([0.299, 0.587, 0.114]), axes=([1], [0]))  # [B, H, W]
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    return np.array([[correlate2d(np.pad(g, pad), k, mode="valid") for k in (kx, kx.T)] for g in gray])


@pytest.mark.parametrize("pad", [1, 2])
def test_sobel_matches_scipy_and_is_frozen(pad):
    x = torch.randn(2, 3, 9, 11)
    sobel = Sobel(padding=pad)
    got = sobel(x).numpy()
    want = _numpy_sobel(x.numpy(), pad)
    assert got.shape == (2, 2, 9 + 2 * (pad - 1), 11 + 2 * (pad - 1))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not list(sobel.parameters()) and {"gray", "edges"} <= set(sobel.state_dict())


def test_fold_into_conv_is_exact_with_stride_and_borders():
    torch.manual_seed(0)
    sobel, conv = Sobel(padding=3), torch.nn.Conv2d(2, 4, 5, stride=2, padding=0, bias=True)
    x = torch.randn(3, 3, 13, 12)
    folded = fold_into_conv(sobel, conv)
    assert folded.kernel_size == (7, 7) and folded.padding == (3, 3)
    torch.testing.assert_close(folded(x), conv(sobel(x)), atol=1e-5, rtol=1e-5)


def _same_in_one_pass(trunk, x, feats, blocks):
    """forward_with_blocks (one pass, the evaluation's extraction) gives exactly forward and forward_blocks."""
    both, both_blocks = trunk.forward_with_blocks(x)
    assert torch.equal(both, feats) and len(both_blocks) == len(blocks)
    assert all(torch.equal(a, b) for a, b in zip(both_blocks, blocks))


@pytest.mark.parametrize("sobel,pool_size", [(True, 1), (False, 1), (False, 3)])
def test_smallvgg_shapes_blocks_and_export(sobel, pool_size, tmp_path):
    trunk = _randomize_bn(SmallVGG(feature_dim=32, sobel=sobel, pool_size=pool_size))
    x = torch.randn(4, 3, 28, 28)
    feats, blocks = trunk(x), trunk.forward_blocks(x)
    assert feats.shape == (4, 32) and (feats < 0).any()  # pre-ReLU
    _same_in_one_pass(trunk, x, feats, blocks)
    assert [b.shape[1:] for b in blocks] == [(32, 28, 28), (64, 14, 14), (128, 7, 7), (256, 3, 3), (256, 3, 3)]
    assert len(trunk.block_names) == len(blocks)
    path = export_backbone(trunk, "smallvgg", tmp_path)
    assert path.name == "smallvgg_backbone.pth"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sobel"] == sobel and meta["pool_size"] == pool_size
    torch.testing.assert_close(load_exported(path)(x), feats)


def test_build_trunk_from_config_and_size_check():
    cfg = load_config(None, ["model.feature_dim=16", "cluster.pca_dim=16"])  # pca_dim <= feature dim
    trunk = build_trunk(cfg.model, cfg.data.image_size)
    assert isinstance(trunk, SmallVGG) and trunk.feature_dim == 16 and trunk.sobel is not None
    with pytest.raises(ValueError, match="image_size >= 32"):
        build_trunk(load_config(None, ["model.arch=resnet50"]).model, 28)


@pytest.fixture(scope="module")
def vgg_sobel():
    torch.manual_seed(0)
    return _randomize_bn(VGG16BN(sobel=True))


def test_vgg16_bn_sobel_shapes_and_folded_export(vgg_sobel, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = vgg_sobel(x)
        blocks = vgg_sobel.forward_blocks(x)
        _same_in_one_pass(vgg_sobel, x, feats, blocks)
    assert feats.shape == (2, 4096) and (feats < 0).any()  # pre-ReLU classifier[3]
    assert [b.shape[1:3] for b in blocks] == [(64, 64), (128, 32), (256, 16), (512, 8), (512, 4)]
    path = export_backbone(vgg_sobel, "vgg16_bn", tmp_path)
    assert tuple(torch.load(path, weights_only=True)["features.0.weight"].shape) == (64, 3, 5, 5)
    model = torchvision_backbone(path)  # raises unless exactly classifier.6.* is missing
    with torch.no_grad():
        want = penultimate(model, "vgg16_bn", x)
    torch.testing.assert_close(want, feats, atol=1e-4 * feats.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("sobel", [False, True])
def test_resnet50_shapes_and_export(sobel, tmp_path):
    torch.manual_seed(1)
    trunk = _randomize_bn(ResNet50(sobel=sobel))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = trunk(x)
        blocks = trunk.forward_blocks(x)
        _same_in_one_pass(trunk, x, feats, blocks)
    assert feats.shape == (2, 2048) and (feats >= 0).all()  # post-ReLU by construction
    assert [b.shape[1:] for b in blocks] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
    path = export_backbone(trunk, "resnet50", tmp_path)
    if sobel:
        model = torchvision_backbone(path)
        assert model.conv1.kernel_size == (9, 9) and model.conv1.padding == (4, 4)
    else:  # no Sobel: stock torchvision, nothing but the final layer missing
        model = torchvision.models.resnet50(weights=None)
        result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
        model.eval()
    with torch.no_grad():
        want = penultimate(model, "resnet50", x)
    torch.testing.assert_close(want, feats, atol=1e-5 * feats.abs().max().item(), rtol=1e-4)


def test_smallvgg_train_step_timing():
    """Forward + backward of 64 images at 28 px on one thread: printed, not asserted."""
    for channels_last in (False, True):
        trunk = SmallVGG(feature_dim=512, sobel=True)
        x = torch.randn(64, 3, 28, 28)
        if channels_last:
            trunk, x = trunk.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            trunk(x).relu().sum().backward()
            times.append(time.perf_counter() - start)
        print(f"\nsmallvgg fwd+bwd batch 64 @28px, 1 thread, channels_last={channels_last}: "
              f"{min(times[1:]):.3f} s (best of 3 after warm-up)")
        assert all(p.grad is not None for p in trunk.parameters())
