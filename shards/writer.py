"""Write one shard: a tar of `<key>.<ext>`, `<key>.cls`, `<key>.json` per sample, atomically.

    result = write_shard(ShardTask(index=3, records=[...], source=src, settings=s, out_dir="data/x", name="x"))

The tar is written to `DIR/.<shard>.tmp` and renamed at the end; its build record
`DIR/.build/<shard>.json` (sample count, skip counts, settings) is written just before the rename.
A shard whose tar and record exist, whose record matches this task (same records, same settings)
and whose tar holds the recorded number of samples is complete: a re-run reuses it untouched.
Members get a fixed mtime and owner, so the same input gives byte-identical tars whatever the
number of workers.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import ImageSettings, SkipSample, prepare_image

TAR_MTIME = 1577836800  # 2020-01-01: fixed so shards are reproducible (0 makes tar warn)
BUILD_DIR = ".build"


def shard_file_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def sample_key(member_name: str) -> str:
    """webdataset's rule: the key ends at the first dot of the basename."""
    return member_name.split(".", 1)[0]


def count_tar_samples(path: Path) -> int:
    """Distinct keys in a tar (reads headers only); raises on a damaged tar."""
    with tarfile.open(path) as tar:
        return len({sample_key(m.name) for m in tar if m.isfile()})


@dataclass
class ShardTask:
    index: int
    records: list  # of sources.Record, in shard order
    source: Any  # a sources.Source: picklable, opens its reader inside the worker
    settings: ImageSettings
    out_dir: str
    name: str

    @property
    def file_name(self) -> str:
        return shard_file_name(self.name, self.index)

    def fingerprint(self) -> dict:
        """What must be equal for an existing shard to be reused."""
        return {"num_records": len(self.records), "first_key": self.records[0].key,
                "last_key": self.records[-1].key, "settings": self.settings.as_dict(),
                "source": self.source.describe()}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


def _sample_members(record, image_bytes: bytes, info: dict, source, ext: str) -> list[tuple[str, bytes]]:
    meta = {"key": record.key, **record.meta, **info}
    members = [(f"{record.key}.{ext}", image_bytes)]
    if record.label is not None:
        members.append((f"{record.key}.cls", str(record.label).encode()))
        meta["label"] = record.label
        if source.classes:
            meta["label_name"] = source.classes[record.label]
    members.append((f"{record.key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def _record_path(task: ShardTask) -> Path:
    return Path(task.out_dir) / BUILD_DIR / (task.file_name[:-len(".tar")] + ".json")


def _reusable(task: ShardTask) -> dict | None:
    """The stored result of a complete, matching shard, else None."""
    final, record_path = Path(task.out_dir) / task.file_name, _record_path(task)
    if not (final.exists() and record_path.exists()):
        return None
    try:
        stored = json.loads(record_path.read_text())
        if stored.get("fingerprint") != task.fingerprint():
            return None
        if count_tar_samples(final) != stored["num_samples"]:
            return None
    except (OSError, ValueError, KeyError, tarfile.TarError):
        return None  # damaged record or tar: rebuild it
    return stored


def _read_records(reader, records: list):
    """(record, bytes or the exception reading it raised), in record order. A reader with read_all
    (the url layout: shards/yfcc.py UrlReader) reads ahead concurrently; others read one by one."""
    read_all = getattr(reader, "read_all", None)
    if read_all is not None:
        yield from read_all(records)
        return
    for record in records:
        try:
            yield record, reader.read(record)
        except SkipSample as skip:
            yield record, skip


def write_shard(task: ShardTask) -> dict:
    """Write (or reuse) one shard; returns {name, index, num_samples, num_records, skipped, reused, ...}."""
    start = time.perf_counter()
    stored = _reusable(task)
    if stored is not None:
        return {**stored, "reused": True, "seconds": time.perf_counter() - start}
    out_dir = Path(task.out_dir)
    final, record_path = out_dir / task.file_name, _record_path(task)
    tmp = out_dir / f".{task.file_name}.tmp"
    # remove the old pair first: a crash below then leaves no tar, never an old tar with a new record
    for stale in (final, record_path):
        stale.unlink(missing_ok=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    skipped, written = Counter(), 0
    ext = task.settings.image_ext
    try:
        with task.source.open_reader() as reader, tarfile.open(tmp, "w") as tar:
            for record, data in _read_records(reader, task.records):
                try:
                    if isinstance(data, BaseException):
                        raise data
                    image_bytes, info = prepare_image(data, task.settings)
                except SkipSample as skip:
                    skipped[skip.reason] += 1
                    continue
                for member_name, data in _sample_members(record, image_bytes, info, task.source, ext):
                    _add_member(tar, member_name, data)
                written += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # an unexpected error (disk full, bug) fails the build, no debris
        raise
    result = {"name": task.file_name, "index": task.index, "num_samples": written,
              "num_records": len(task.records), "skipped": dict(skipped), "bytes": tmp.stat().st_size,
              "fingerprint": task.fingerprint()}
    record_tmp = record_path.with_suffix(".json.tmp")
    record_tmp.write_text(json.dumps(result, indent=1))
    os.replace(record_tmp, record_path)
    os.replace(tmp, final)  # the commit point: the tar appears complete or not at all
    return {**result, "reused": False, "seconds": time.perf_counter() - start}
