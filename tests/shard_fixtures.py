"""Small WebDataset shard directories for the reader's tests (and the loader benchmark).

    shards = make_shards(tmp_path, num_shards=4, per_shard=10, corrupt_keys={sample_key(1, 3)})
    shards.keys, shards.labels[key], shards.images[key]   # the independent reference: what was written

Written with the standard `tarfile` module and PIL, independently of the reader under test.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from dist_cluster.data.manifest import Manifest, ShardInfo


def image_header(data: bytes, fmt: str) -> bytes:
    """The leading bytes of an encoded image up to its size field included (PNG: signature + IHDR
    chunk; JPEG: up to the end of the SOF segment): what the reader checks before decoding."""
    if fmt == "png":
        return data[:33]
    sof = data.index(b"\xff\xc0")
    return data[:sof + 2 + int.from_bytes(data[sof + 2:sof + 4], "big")]


def sample_key(shard: int, index: int) -> str:
    return f"s{shard:03d}_{index:04d}"


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """HxW (gray) or HxWx3 uint8 -> PNG/JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format={"png": "PNG", "jpg": "JPEG"}[fmt], quality=90)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: str | Path, shards: Iterable[Sequence[tuple[str, Optional[bytes], Optional[bytes]]]],
                 name: str, fmt: str, has_labels: bool, classes: Sequence[str] = ()) -> Manifest:
    """shards: per shard, [(key, image bytes or None = no image member, .cls bytes or None)]."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for index, samples in enumerate(shards):
        shard_name = f"{name}-{index:06d}.tar"
        with tarfile.open(root / shard_name, "w") as tar:
            for key, image, label in samples:
                if image is not None:
                    _add_member(tar, f"{key}.{fmt}", image)
                if label is not None:
                    _add_member(tar, f"{key}.cls", label)
        infos.append(ShardInfo(shard_name, len(samples)))
    manifest = Manifest(name=name, shards=infos, has_labels=has_labels, classes=list(classes), image_ext=fmt)
    manifest.save(root)
    return manifest


@dataclass
class FixtureShards:
    root: Path
    manifest: Manifest
    keys: list[str]  # every key, in write order
    labels: dict[str, int] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # HxWx3 uint8 as written (PNG: exact)
    shard_of: dict[str, int] = field(default_factory=dict)

    def shard_path(self, index: int) -> Path:
        return self.root / self.manifest.shards[index].name


def make_shards(root: str | Path, num_shards: int, per_shard: int | Sequence[int], size: int = 28,
                labels: bool = True, corrupt_keys: Iterable[str] = (), fmt: str = "png", gray: bool = False,
                missing_image_keys: Iterable[str] = (), bad_label_keys: Iterable[str] = (),
                broken_body_keys: Iterable[str] = ()) -> FixtureShards:
    """num_shards tars of random size x size images (gray: 1 channel stored); the *_keys samples are
    written broken (garbage image bytes / no image member / a non-integer .cls / the format's
    header, size included, then garbage: only decoding finds it) but still counted in the manifest, as a builder
    that did not notice would."""
    counts = [per_shard] * num_shards if isinstance(per_shard, int) else list(per_shard)
    corrupt, missing, bad_label = set(corrupt_keys), set(missing_image_keys), set(bad_label_keys)
    broken_body = set(broken_body_keys)
    out = FixtureShards(Path(root), None, [])
    all_shards = []
    for shard, count in enumerate(counts):
        samples = []
        for index in range(count):
            key = sample_key(shard, index)
            rng = np.random.default_rng(shard * 100_000 + index)
            pixels = rng.integers(0, 256, (size, size) if gray else (size, size, 3), dtype=np.uint8)
            image = encode_image(pixels, fmt)
            if key in corrupt:
                image = b"\x89PNG garbage" + rng.bytes(200)
            if key in broken_body:
                image = image_header(image, fmt) + rng.bytes(200)
            label = int(rng.integers(0, 10))
            label_bytes = (b"seven" if key in bad_label else str(label).encode()) if labels else None
            samples.append((key, None if key in missing else image, label_bytes))
            out.keys.append(key)
            out.labels[key] = label if labels else -1
            out.images[key] = np.repeat(pixels[..., None], 3, axis=2) if gray else pixels
            out.shard_of[key] = shard
        all_shards.append(samples)
    out.manifest = write_shards(root, all_shards, name="fixture", fmt=fmt, has_labels=labels,
                                classes=[str(c) for c in range(10)] if labels else [])
    return out


def make_class_shards(root: str | Path, num_shards: int, per_shard: int, size: int = 28, num_classes: int = 10,
                      seed: int = 0) -> FixtureShards:
    """Grayscale PNGs in `num_classes` visual classes, like a small Fashion-MNIST built here: each
    image is its class's coarse template (7 x 7 blocks, scaled up) shifted by up to 2 px, plus
    noise. Clusters, training and resume then have structure to work with, and no dataset has to
    be installed for the end-to-end tests."""
    rng = np.random.default_rng(seed)
    cell = -(-size // 7)
    templates = [np.kron(rng.integers(0, 256, (7, 7)), np.ones((cell, cell)))[:size, :size]
                 for _ in range(num_classes)]
    out = FixtureShards(Path(root), None, [])
    all_shards = []
    for shard in range(num_shards):
        samples = []
        for index in range(per_shard):
            key, label = sample_key(shard, index), int(rng.integers(0, num_classes))
            shifted = np.roll(templates[label], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
            pixels = np.clip(0.75 * shifted + 0.25 * rng.integers(0, 256, (size, size)), 0, 255).astype(np.uint8)
            samples.append((key, encode_image(pixels, "png"), str(label).encode()))
            out.keys.append(key)
            out.labels[key], out.images[key], out.shard_of[key] = label, np.repeat(pixels[..., None], 3, 2), shard
        all_shards.append(samples)
    out.manifest = write_shards(root, all_shards, name="classes", fmt="png", has_labels=True,
                                classes=[f"class{c}" for c in range(num_classes)])
    return out


def truncate_file(path: str | Path, keep_fraction: float) -> int:
    """Cut a file to keep_fraction of its bytes (a copy interrupted mid-way); returns the new size."""
    path = Path(path)
    data = path.read_bytes()
    keep = int(len(data) * keep_fraction)
    path.write_bytes(data[:keep])
    return keep
