"""Synthetic JPEG shards for the benchmarks: random images of 256 to 320 px a side, written by the
project's own shard builder (shards/pipeline.py -> shards/writer.py), with a manifest.

    root = synthetic_jpeg_shards(4096)      # bench/runs/synthetic-jpeg-4096/, built once, then reused

The content is a random coarse colour grid, bicubic-upsampled, plus pixel noise: smooth areas and
texture, so a q90 JPEG has roughly the size and decode cost of a 256 px photo (pure noise would
be several times larger and slower to decode than any photo). Deterministic from (seed, index).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from bench/ scripts: the repository's packages are importable
    sys.path.insert(0, str(ROOT))

from dist_cluster.data.manifest import load_manifest  # noqa: E402
from shards.images import ImageSettings  # noqa: E402
from shards.pipeline import build  # noqa: E402
from shards.sources import Record, Source  # noqa: E402

CACHE = ROOT / "bench" / "runs"  # ignored by git


class SyntheticSource(Source):
    """`count` random RGB images, each side uniform in [side, side + side // 4]; no labels."""
    kind = "synthetic"
    default_name = "synthetic"
    image_ext = "jpg"

    def __init__(self, count: int, side: int = 256, seed: int = 0, noise: float = 6.0):
        super().__init__(None)
        self.count, self.side, self.seed, self.noise = count, side, seed, noise

    def records(self) -> Iterator[Record]:
        for index in range(self.count):
            yield Record(f"synthetic-{index:08d}", index)

    def read(self, record: Record) -> Image.Image:
        rng = np.random.default_rng((self.seed, record.ref))
        height, width = (int(v) for v in rng.integers(self.side, self.side + self.side // 4 + 1, 2))
        cells = rng.integers(3, 17, 2)
        grid = rng.integers(0, 256, (cells[0], cells[1], 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = smooth + rng.normal(0.0, self.noise, smooth.shape).astype(np.float32)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def describe(self) -> dict:
        return {"type": self.kind, "count": self.count, "side": self.side, "seed": self.seed, "noise": self.noise}


def synthetic_jpeg_shards(count: int, root: Path | None = None, num_shards: int = 32, workers: int = 0) -> Path:
    """The shard directory of `count` synthetic JPEGs (q90), built unless already complete.

    num_shards: enough readers for ranks x loader workers (each needs a shard of its own).
    """
    root = Path(root) if root is not None else CACHE / f"synthetic-jpeg-{count}"
    manifest = root / "manifest.json"
    if manifest.exists() and load_manifest(root).num_samples == count:
        return root
    workers = workers or min(8, os.cpu_count() or 1)
    shard_size = max(1, math.ceil(count / num_shards))
    report = build(SyntheticSource(count), root, name=f"synthetic{count}", shard_size=shard_size,
                   settings=ImageSettings(image_ext="jpg", jpeg_quality=90), workers=workers, progress=False)
    print(f"synthetic JPEG shards: {report.summary()}", flush=True)
    return root
