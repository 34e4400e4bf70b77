"""DIR/manifest.json: the description of a shard directory that builders write and readers trust.

    {"name": "fmnist-train", "shards": [{"name": "fmnist-train-000000.tar", "num_samples": 1000}, ...],
     "num_samples": 60000, "has_labels": true, "classes": ["T-shirt/top", ...],
     "image_ext": "png", "skipped": {"undecodable": 0, ...}, "source": {...}}

Shard names are relative to DIR. Every sample in a shard is `<key>.<image_ext>`, plus `<key>.cls`
(an integer, when has_labels) and `<key>.json` (metadata). Keys are unique across the directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ShardInfo:
    name: str
    num_samples: int


@dataclass
class Manifest:
    name: str
    shards: list[ShardInfo]
    has_labels: bool = False
    classes: list[str] = field(default_factory=list)
    image_ext: str = "jpg"
    skipped: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_paths(self, root: str | Path) -> list[str]:
        return [str(Path(root) / s.name) for s in self.shards]

    def save(self, root: str | Path) -> Path:
        """Atomic write: readers never see a half-written manifest."""
        path = Path(root) / "manifest.json"
        record = asdict(self)
        record["num_samples"] = self.num_samples
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        return path


def load_manifest(root: str | Path) -> Manifest:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build shards first, e.g. `python shards/build.py fmnist --split train --out {root}`")
    record = json.loads(path.read_text())
    record.pop("num_samples", None)
    record["shards"] = [ShardInfo(**s) for s in record["shards"]]
    return Manifest(**record)
