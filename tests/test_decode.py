"""data.decode=device on CPU: the main process decodes the workers' JPEG bytes, with the very same
result as the workers decoding them (decode=cpu), through the code a GPU runs with device=cuda.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_decode.py
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_cluster.config import ConfigError, load_config
from dist_cluster.data.loader import ShardLoader, make_loader
from dist_cluster.data.transforms import IMAGENET_STD, extract_transform, train_transform
from tests.shard_fixtures import encode_image, make_shards, sample_key, write_shards

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    """Shards of different sizes (workers own different batch counts), 20 px RGB JPEGs."""
    return make_shards(tmp_path_factory.mktemp("jpeg"), 4, [13, 7, 11, 9], size=20, fmt="jpg")


def _loader(root, decode, workers, train, skip=0, batch=3, **kw):
    transform = train_transform(12, 0.3) if train else extract_transform(16, 12)
    return ShardLoader(root, 0, 1, batch, workers, transform, seed=7, epoch=1, shuffle=train, equal_steps=train,
                       skip_batches=skip, shuffle_buffer=5, decode=decode, device=CPU if decode == "device" else None,
                       **kw)


def _epoch(loader):
    return [(images, list(keys), labels) for images, keys, labels in loader]


def _assert_same(a, b):
    assert [k for _, k, _ in a] == [k for _, k, _ in b]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert all(x[0].dtype == y[0].dtype == torch.float32 and torch.equal(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "extract"])
@pytest.mark.parametrize("skip", [0, 2])
def test_device_decode_equals_worker_decode(jpeg, workers, train, skip):
    cpu, dev = _loader(jpeg.root, "cpu", workers, train, skip), _loader(jpeg.root, "device", workers, train, skip)
    reference, result = _epoch(cpu), _epoch(dev)
    assert len(result) == len(dev) - skip and len(result) > 0
    _assert_same(result, reference)
    assert dev.stats == cpu.stats  # same counters: decoded, samples, skipped_resume, ...


def test_device_decode_leaves_the_callers_rng_alone(jpeg):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _epoch(_loader(jpeg.root, "device", 0, True))
    assert torch.equal(torch.rand(3), expected)


def test_gray_jpeg_decodes_to_rgb_like_the_worker(tmp_path):
    fx = make_shards(tmp_path, 2, 5, size=16, fmt="jpg", gray=True)
    _assert_same(_epoch(_loader(fx.root, "device", 0, False)), _epoch(_loader(fx.root, "cpu", 0, False)))


@pytest.mark.parametrize("workers", [0, 2])
def test_png_and_mixed_batches_same_as_worker_decode(tmp_path, workers):
    """PNGs are decoded and augmented in the worker; JPEGs of the same batch in the main process."""
    png = make_shards(tmp_path / "png", 2, 8, size=20, fmt="png")
    rng = np.random.default_rng(0)
    mixed = [[(f"m{s}_{i}", encode_image(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "jpg" if i % 3 else "png"),
               str(i).encode()) for i in range(9)] for s in range(2)]
    write_shards(tmp_path / "mixed", mixed, name="mixed", fmt="png", has_labels=True)  # decoded by signature
    for root in (png.root, tmp_path / "mixed"):
        for train in (True, False):
            _assert_same(_epoch(_loader(root, "device", workers, train)), _epoch(_loader(root, "cpu", workers, train)))


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_jpeg_is_skipped_and_counted(tmp_path, workers):
    broken = {sample_key(0, 4), sample_key(1, 0)}
    fx = make_shards(tmp_path, 2, 8, size=16, fmt="jpg", broken_body_keys=broken)
    cpu, dev = _loader(fx.root, "cpu", workers, False), _loader(fx.root, "device", workers, False)
    reference, result = _epoch(cpu), _epoch(dev)
    flat, expected = [k for _, keys, _ in result for k in keys], [k for _, keys, _ in reference for k in keys]
    # one worker: the same order; two: each worker's batches are cut elsewhere, so the merge differs
    assert (flat if workers == 0 else sorted(flat)) == (expected if workers == 0 else sorted(expected))
    assert not broken & set(flat)
    by_key = {k: img for images, keys, _ in reference for k, img in zip(keys, images)}
    assert all(torch.equal(img, by_key[k]) for images, keys, _ in result for k, img in zip(keys, images))
    # the batches were cut before decoding: as many as the manifest promises, two of them one short
    assert len(result) == len(dev) and sum(len(keys) for _, keys, _ in result) == 16 - 2
    assert dev.stats["skipped_corrupt"] == cpu.stats["skipped_corrupt"] == 2
    assert dev.stats["samples"] == cpu.stats["samples"] == 14

    train = _loader(fx.root, "device", workers, True, batch=2)
    batches = _epoch(train)
    assert len(batches) == len(train)  # equal steps kept: a short batch, never a missing one
    delivered = sum(len(k) for _, k, _ in batches)
    assert delivered == train.stats["samples"] == 2 * len(batches) - train.stats["skipped_corrupt"]


def test_batch_without_a_decodable_jpeg(tmp_path):
    fx = make_shards(tmp_path, 2, 4, size=16, fmt="jpg", broken_body_keys={sample_key(0, 0), sample_key(0, 1)})
    extract = _loader(fx.root, "device", 0, False, batch=2)
    keys = [k for _, batch_keys, _ in _epoch(extract) for k in batch_keys]
    assert keys == fx.keys[2:] and extract.stats["skipped_corrupt"] == 2  # the empty batch is left out
    train = ShardLoader(fx.root, 0, 1, 2, 0, None, shuffle=False, equal_steps=True, decode="device")
    with pytest.raises(RuntimeError, match="no image of a training batch could be decoded"):
        _epoch(train)  # every rank must take the same steps: a missing batch would hang the others


def test_make_loader_passes_decode_through(jpeg):
    cfg = SimpleNamespace(batch_size=3, num_workers=0, shuffle_buffer=8, max_samples=0, allow_short_shards=False,
                          decode="device", max_image_pixels=1000)
    loader = make_loader(cfg, str(jpeg.root), 0, 1, train_transform(12, 0.5), 0, 0, train=True, device=CPU)
    assert loader.device == CPU and loader.cfg["decode"] == "device" and not loader.pin_memory
    images, keys, labels = next(iter(loader))
    assert images.shape == (3, 3, 12, 12) and images.dtype == torch.float32
    assert load_config(None, ["data.decode=device"]).data.decode == "device"
    with pytest.raises(ConfigError, match=r"data\.decode"):
        load_config(None, ["data.decode=gpu"])
    with pytest.raises(ValueError, match="decode must be"):
        ShardLoader(jpeg.root, 0, 1, 3, 0, decode="gpu")


@pytest.mark.gpu  # deselected in CI; scripts/gpu_check.sh runs it
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_decode_close_to_worker_decode(jpeg, workers):
    """nvjpeg + float resize on CUDA: the same keys, labels and crops, pixels within a few levels."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    reference = _epoch(_loader(jpeg.root, "cpu", workers, True))
    loader = ShardLoader(jpeg.root, 0, 1, 3, workers, train_transform(12, 0.3), seed=7, epoch=1, shuffle=True,
                         equal_steps=True, shuffle_buffer=5, decode="device", device=cuda, pin_memory=True)
    result = _epoch(loader)
    assert [k for _, k, _ in result] == [k for _, k, _ in reference]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(result, reference))
    assert all(x[0].device.type == "cuda" for x in result)
    scale = 255 * torch.tensor(IMAGENET_STD).view(3, 1, 1)  # normalised units -> 8-bit levels
    levels = torch.cat([(x[0].cpu() - y[0]).abs() * scale for x, y in zip(result, reference)])
    assert levels.mean() < 3, f"mean difference {levels.mean():.2f} levels"
