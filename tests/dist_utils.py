"""Run a function on W real processes joined by a gloo process group (CPU tests).

    results = run_ranks(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable

Each rank calls distributed.init() (torchrun-style variables are set for it), runs fn and sends
back its return value. A rank that raises fails the test with its traceback; a rank that hangs
fails it at `timeout` seconds (processes are killed, never left behind).
"""
from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from dist_cluster.runtime.distributed import free_port


def _worker(fn, rank, world_size, port, args, queue, threads):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(threads)
    from dist_cluster.runtime import distributed
    try:
        distributed.init(backend="gloo", timeout_s=120, device="cpu")
        result = fn(rank, world_size, *args)
        # plain pickle to bytes: torch's queue would pass tensors through shared memory that
        # vanishes when this process exits before the parent has read them
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        distributed.shutdown()


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 180, threads: int = 1,
              daemon: bool = True) -> list:
    """Results of fn on every rank, indexed by rank; raises on any rank's failure or a timeout.

    daemon=False lets a rank start child processes (DataLoader workers); ranks are still
    terminated below if they outlive the test."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue, threads), daemon=daemon)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break  # peers of a failed rank may be blocked in a collective: stop now
    except Exception as err:  # queue.Empty: a rank hung or died without a word
        errors.append(f"timeout/died after {timeout}s: {err!r}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.terminate()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
