"""DIR/manifest.json: the description of a shard directory that builders write and readers trust.

    {"name": "fmnist-train", "shards": [{"name": "fmnist-train-000000.tar", "num_samples": 1000}, ...],
     "num_samples": 60000, "has_labels": true, "classes": ["T-shirt/top", ...],
     "image_ext": "png", "skipped": {"undecodable": 0, ...}, "source": {...}}

Shard names are relative to DIR and stay inside it (no absolute path, no `..`; subfolders are fine:
shards/ingest.py writes `part-<I>/<shard>`). load_manifest checks the schema and names the file and
the field of any error; check_files names the listed shards that are not on disk. Every sample in a shard is `<key>.<image_ext>`, plus `<key>.cls`
(an integer, when has_labels) and `<key>.json` (metadata). Keys are unique across the directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional


class ManifestError(ValueError):
    """A manifest.json that cannot be trusted; the message names the file and the field."""


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

    def check_files(self, root: str | Path, names: Optional[Iterable[str]] = None) -> None:
        """FileNotFoundError naming the listed shards (all, or `names`) that are not files under root:
        a missing shard must stop a run before training, not be read as an empty one."""
        names = [s.name for s in self.shards] if names is None else list(names)
        missing = [n for n in names if not (Path(root) / n).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(f"{Path(root) / 'manifest.json'} lists {len(missing)} shard(s) that are "
                                    f"not in {root}: {shown}")

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
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    return parse_manifest(record, path)


# the type of each top-level field (bool is checked apart: in Python it is also an int)
_TYPES = {"name": str, "shards": list, "has_labels": bool, "classes": list, "image_ext": str,
          "skipped": dict, "source": dict, "num_samples": int}
_REQUIRED = ("name", "shards")


def parse_manifest(record, path: str | Path) -> Manifest:
    """A Manifest from the decoded JSON, or ManifestError naming `path` and the offending field."""
    if not isinstance(record, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for key in record:
        _check(key in _TYPES, path, key, f"unknown field (known: {', '.join(_TYPES)})")
    for key in _REQUIRED:
        _check(key in record, path, key, "missing")
    for key, value in record.items():
        _check(_is_a(value, _TYPES[key]), path, key, f"must be a {_TYPES[key].__name__}, got {value!r}")
    _check(all(isinstance(c, str) for c in record.get("classes", [])), path, "classes", "must be strings")
    shards = [_parse_shard(entry, path, f"shards[{i}]") for i, entry in enumerate(record["shards"])]
    _check_unique(shards, path)
    kept = {f.name: record[f.name] for f in fields(Manifest) if f.name in record and f.name != "shards"}
    manifest = Manifest(shards=shards, **kept)
    total = record.get("num_samples", manifest.num_samples)
    _check(total == manifest.num_samples, path, "num_samples",
           f"{total}, but the shards' counts sum to {manifest.num_samples}")
    return manifest


def _parse_shard(entry, path, where: str) -> ShardInfo:
    _check(isinstance(entry, dict), path, where, f"must be an object, got {entry!r}")
    for key in entry:
        _check(key in ("name", "num_samples"), path, f"{where}.{key}", "unknown field")
    for key in ("name", "num_samples"):
        _check(key in entry, path, f"{where}.{key}", "missing")
    name, count = entry["name"], entry["num_samples"]
    _check(isinstance(name, str) and name != "", path, f"{where}.name", f"must be a non-empty string, got {name!r}")
    _check(is_inside(name), path, f"{where}.name", f"{name!r} leaves the shard folder (absolute or `..`)")
    _check(_is_a(count, int) and count >= 0, path, f"{where}.num_samples", f"must be an integer >= 0, got {count!r}")
    return ShardInfo(name, count)


def _check_unique(shards: list[ShardInfo], path) -> None:
    """A shard listed twice would be read twice (by two ranks, or twice by one)."""
    seen = set()
    for i, shard in enumerate(shards):
        _check(shard.name not in seen, path, f"shards[{i}].name", f"{shard.name!r} is listed twice")
        seen.add(shard.name)


def is_inside(name: str) -> bool:
    """A relative path without `..`: joined to the folder, it names something in it (or below)."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def _is_a(value, kind: type) -> bool:
    if kind is int:  # JSON true/false are not counts
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check(ok: bool, path, field_name: str, why: str) -> None:
    if not ok:
        raise ManifestError(f"{path}: {field_name}: {why}")
