"""One summary line per evaluation stage with its wall time, and progress bars for the long ones.

    with Stage("extract train", seconds, key="extract_train") as st:
        ...
        st.detail = "60000 images, 1350 img/s"
    # prints "[eval] extract train: 60000 images, 1350 img/s (44.2 s)" and sets seconds["extract_train"]

    bar = count_bar("linear probe conv2", total=300)   # tqdm on rank 0, None on the other ranks
    bar.update(1) ... bar.close()

Every rank prints its own stages (under torchrun each rank fits its share of the probes), prefixed
with its rank when there are several; the bars stay on rank 0, where two ranks' bars cannot
overwrite each other on one terminal.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from dist_cluster.runtime import distributed


def say(text: str) -> None:
    """A line on stdout, flushed, tagged with the rank when the evaluation runs on several."""
    tag = "[eval]" if distributed.world_size() == 1 else f"[eval r{distributed.rank()}]"
    print(f"{tag} {text}", file=sys.stdout, flush=True)


class Stage:
    """Times a block; on success prints '<name>: <detail> (<seconds> s)' and records the seconds."""

    def __init__(self, name: str, seconds: Optional[dict] = None, key: Optional[str] = None):
        self.name, self.seconds, self.key = name, seconds, key or name
        self.detail = ""

    def __enter__(self) -> "Stage":
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.elapsed = time.perf_counter() - self.start
        if self.seconds is not None:
            self.seconds[self.key] = self.elapsed
        if exc_type is None:
            say(f"{self.name}: {self.detail + ' ' if self.detail else ''}({self.elapsed:.1f} s)")


def count_bar(desc: str, total: Optional[int] = None):
    """A tqdm counter on rank 0 (removed when closed: the stage line stays), None elsewhere."""
    if not distributed.is_main():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0, leave=False, file=sys.stderr)
