"""Cut a source's records into shards, write them with W processes, then write DIR/manifest.json.

    report = build(FmnistSource("train"), "data/fmnist/train", workers=4)
    print(report.summary())

Shard boundaries are fixed by the record order and --shard-size alone (never by which worker is
faster), so any number of workers gives the same shards. Records are streamed to the workers with
at most 2 x W shards in flight: a 100M-line metadata file is never held in memory.
"""
from __future__ import annotations

import glob
import itertools
import multiprocessing
import pickle
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from dist_cluster.data.manifest import Manifest, ShardInfo

from .images import ImageSettings
from .sources import BuildError, Source
from .writer import ShardTask, write_shard


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def run_tasks(tasks: Iterable[ShardTask], workers: int) -> Iterator[dict]:
    """write_shard over tasks, in this process (workers <= 1) or a spawn pool; results unordered."""
    if workers <= 1:
        yield from map(write_shard, tasks)
        return
    # spawn, not fork: the caller may hold threads (an HTTP server in tests, urllib pools)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = set()
        for task in tasks:
            pending.add(pool.submit(write_shard, task))
            if len(pending) >= 2 * workers:  # back-pressure: the task iterator is read lazily
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed shard stops the build, no orphans
        raise
    pool.shutdown(wait=True)


@dataclass
class BuildReport:
    manifest: Manifest
    out_dir: Path
    seconds: float
    reused: int  # shards found complete and not rewritten
    empty: int  # shards whose every record was skipped (kept on disk, left out of the manifest)
    stale: list  # <name>-*.tar files in DIR that this build did not produce

    def summary(self) -> str:
        m = self.manifest
        reused = f" ({self.reused} reused)" if self.reused else ""
        return (f"written {m.num_samples}, skipped {dict(sorted(m.skipped.items()))}, "
                f"shards {len(m.shards)}{reused}, {self.seconds:.1f} s -> {self.out_dir / 'manifest.json'}")


def _progress(results: Iterator[dict]) -> Iterator[dict]:
    try:
        from tqdm import tqdm
    except ImportError:
        return results
    return tqdm(results, desc="shards", unit="shard", disable=None, mininterval=2.0, file=sys.stderr)


def build(source: Source, out_dir: str | Path, name: Optional[str] = None, shard_size: Optional[int] = None,
          settings: Optional[ImageSettings] = None, workers: int = 1, progress: bool = True) -> BuildReport:
    """Write DIR/<name>-NNNNNN.tar for every shard_size records, reuse complete shards, save the manifest."""
    start = time.perf_counter()
    name = name or source.default_name
    shard_size = shard_size or source.default_shard_size
    settings = settings or ImageSettings(image_ext=source.image_ext)
    if shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {shard_size}")
    if "/" in name or not name:
        raise BuildError(f"--name must be a non-empty file name prefix, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        try:
            pickle.dumps(source)
        except Exception as err:  # noqa: BLE001
            raise BuildError(f"--workers > 1 needs a picklable source (a module-level fetcher): {err}") from None

    tasks = (ShardTask(index, records, source, settings, str(out_dir), name)
             for index, records in enumerate(batched(source.records(), shard_size)))
    results = run_tasks(tasks, workers)
    results = sorted(_progress(results) if progress else results, key=lambda r: r["index"])
    if not results:
        raise BuildError(f"no samples to write: skipped {dict(source.skipped)}")

    skipped = Counter(source.skipped)
    for result in results:
        skipped.update(result["skipped"])
    manifest = Manifest(
        name=name,
        shards=[ShardInfo(r["name"], r["num_samples"]) for r in results if r["num_samples"] > 0],
        has_labels=source.has_labels, classes=list(source.classes), image_ext=settings.image_ext,
        skipped=dict(sorted(skipped.items())),
        source={**source.describe(), "limit": source.limit, "shard_size": shard_size,
                "build": settings.as_dict()})
    manifest.save(out_dir)
    produced = {r["name"] for r in results}
    stale = sorted(p.name for p in out_dir.glob(f"{glob.escape(name)}-*.tar") if p.name not in produced)
    return BuildReport(manifest, out_dir, time.perf_counter() - start,
                       reused=sum(r["reused"] for r in results),
                       empty=sum(r["num_samples"] == 0 for r in results), stale=stale)
