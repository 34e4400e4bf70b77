"""Run a benchmark function on W spawned local ranks and collect one result per rank.

A rank that raises or dies (even without a Python traceback: OOM kill, segfault) fails the whole
benchmark at once with its exit code, instead of leaving the parent waiting on the queue.
"""
from __future__ import annotations

import queue as queue_module
import time

import torch.multiprocessing as mp


def _call(target, rank, args, results):
    try:
        results.put((rank, "ok", target(rank, *args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then re-raised
        results.put((rank, "error", repr(err)))
        raise


def run_ranks(target, world: int, args: tuple, timeout_s: float = 3600.0) -> list:
    """[target(rank, *args) for rank in range(world)], each in its own spawned process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_call, args=(target, r, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    by_rank, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(by_rank) < world:
            try:
                rank, status, value = results.get(timeout=2.0)
            except queue_module.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in by_rank]
                if dead:
                    raise RuntimeError(f"rank(s) died without a result (rank, exit code): {dead}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no result from ranks {sorted(set(range(world)) - set(by_rank))} "
                                       f"after {timeout_s:.0f} s")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed: {value}")
            by_rank[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if len(by_rank) == world else 1)
            if p.is_alive():
                p.kill()
    return [by_rank[r] for r in range(world)]
