"""Run-directory logging: RUN/metrics.jsonl (one JSON object per event), TensorBoard, tqdm.

Only rank 0 writes; every other rank gets no-op versions, so callers never test the rank.

    log = MetricLogger(run_dir)
    log.event("kmeans", round=0, level=1, iteration=3, objective=0.41, seconds=0.8)
    for batch in progress(loader, desc="extract", total=n): ...
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable, Optional

from dist_cluster.runtime import distributed


def _jsonable(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricLogger:
    """Appends events to RUN/metrics.jsonl and numeric fields to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.enabled = distributed.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def event(self, stage: str, step: Optional[int] = None, **fields) -> dict:
        """Write one event; `step` (a global counter) indexes the TensorBoard scalars."""
        record = {"stage": stage, "time": round(time.time(), 3)}
        if step is not None:
            record["step"] = step
        record.update({k: _jsonable(v) for k, v in fields.items()})
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            if self._tb is not None and step is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key not in ("step", "time"):
                        self._tb.add_scalar(f"{stage}/{key}", value, step)
        return record

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir: str | Path, stage: Optional[str] = None) -> list[dict]:
    """The events of a run (optionally one stage), for tests, reports and the planner."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if stage is None or e["stage"] == stage]


def progress(iterable: Iterable, desc: str = "", total: Optional[int] = None, **kwargs):
    """tqdm on rank 0, the bare iterable elsewhere."""
    if not distributed.is_main():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, mininterval=2.0, **kwargs)


class Timer:
    """`with Timer() as t: ...; t.seconds` - wall time of a block."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
