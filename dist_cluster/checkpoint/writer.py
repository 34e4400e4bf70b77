"""Checkpoints written in the background: the training thread only copies the state to host memory.

    writer = CheckpointWriter(run_dir, background=True, logger=logger)
    writer.save(shared, per_rank, global_step)   # collective; returns once the state is copied
    ...                                          # training goes on while a thread writes the files
    writer.wait()                                # collective: that save published (last.pt names it)

Which part runs where, and why a kill at any moment leaves last.pt naming a complete step:
checkpoint/store.py's docstring. In short: save() = publish the previous save (waiting for its write
first), guard a rewrite of the same step, copy, start the write; wait() = join the write, publish.
The run calls wait() before it stops (its end, a preemption), so the last save is never lost.

Each save logs one `checkpoint` event (RUN/metrics.jsonl) and a console line when it is published:
copy_s, the stall of the training thread (the host copy); write_s, the write (in the background);
wait_s, how long the training thread still waited for that write at the next save (0 when saves
are further apart than a write takes), each the slowest rank's; publish_s, the closing collectives.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dist_cluster.checkpoint import store
from dist_cluster.runtime import distributed

_THREADS: set = set()  # writes started by this process and not joined yet


def join_abandoned() -> None:
    """Wait for writes that a writer abandoned (its run raised): a new run in the same process must
    not read a step while an old thread still writes it. No collective."""
    for thread in list(_THREADS):
        thread.join()
        _THREADS.discard(thread)


def _host_copy(tensor: torch.Tensor, copied_from_cuda: list) -> torch.Tensor:
    """A copy in host memory that training cannot change: pinned and asynchronous from a GPU (the
    caching host allocator reuses the pinned blocks from one save to the next), a clone on the CPU."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.clone()
    host = torch.empty_like(tensor, device="cpu", pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied_from_cuda.append(tensor.device)
    return host


def _copy_tree(obj, copied_from_cuda: list):
    if torch.is_tensor(obj):
        return _host_copy(obj, copied_from_cuda)
    if isinstance(obj, dict):  # dict or OrderedDict; a state_dict's _metadata (versions) goes along
        out = type(obj)((k, _copy_tree(v, copied_from_cuda)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = dict(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v, copied_from_cuda) for v in obj)
    return obj  # numbers, strings, None: immutable


def snapshot(obj):
    """obj (dicts, lists, tuples of tensors and plain values) with every tensor copied to host
    memory, as it is now; returns once the copies are done, so training may change the originals."""
    copied_from_cuda: list = []
    out = _copy_tree(obj, copied_from_cuda)
    for device in set(copied_from_cuda):
        torch.cuda.synchronize(device)
    return out


@dataclass
class _Pending:
    """A save started and not yet published."""
    global_step: int
    round_copy: Optional[int]
    copy_s: float
    thread: Optional[threading.Thread] = None
    written: Optional[store.Written] = None


class CheckpointWriter:
    """One run's saves, one at a time. background=False (train.async_checkpoint=false) writes the
    live state and publishes inside save(), as store.save does, with the same log."""

    def __init__(self, run_dir, background: bool = True, logger=None):
        join_abandoned()
        self.run_dir, self.background, self.logger = Path(run_dir), background, logger
        self._pending: Optional[_Pending] = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(self, shared: Optional[dict], per_rank: dict, global_step: int, round_copy: Optional[int] = None) -> None:
        """Collective: every rank, the same step. Publishes the previous save first (waiting for its
        write if it is still going), then writes `shared` (rank 0's; others may pass None) and
        `per_rank`: copied to host memory and written by a thread, or (background=False) inline."""
        self.wait()
        store.guard_rewrite(self.run_dir, global_step)
        if not self.background:  # training waits for the write: no copy needed
            self._pending = _Pending(global_step, round_copy, 0.0)
            self._write(self._pending, shared, per_rank)
            self.wait()
            return
        start = time.perf_counter()
        shared, per_rank = snapshot(shared), snapshot(per_rank)
        pending = self._pending = _Pending(global_step, round_copy, time.perf_counter() - start)
        pending.thread = threading.Thread(target=self._write, args=(pending, shared, per_rank),
                                          name=f"checkpoint-step{global_step}", daemon=False)
        _THREADS.add(pending.thread)
        pending.thread.start()

    def _write(self, pending: _Pending, shared, per_rank) -> None:
        """The writer thread's whole job: files only, no collective (store.write_step)."""
        pending.written = store.write_step(self.run_dir, shared, per_rank, pending.global_step)

    def join(self) -> None:
        """Wait until the pending save's files are written, without publishing it: no collective
        (tests, and a rank about to stop on its own)."""
        if self._pending is not None and self._pending.thread is not None:
            self._pending.thread.join()
            _THREADS.discard(self._pending.thread)

    def wait(self) -> None:
        """Collective: the pending save written on every rank and published; nothing when none is
        pending (the same on every rank: saves are collective). Raises CheckpointWriteError on every
        rank if any rank's write failed."""
        pending = self._pending
        if pending is None:
            return
        start = time.perf_counter()
        self.join()
        self._pending = None  # published below, or failed: never twice
        written = pending.written or store.Written(
            pending.global_step, error=RuntimeError("the checkpoint writer thread died"))
        joined = time.perf_counter()
        written.copy_s, written.wait_s = pending.copy_s, joined - start
        reports = store.publish(self.run_dir, written, pending.round_copy)
        self._log(pending, reports, time.perf_counter() - joined)

    def _log(self, pending: _Pending, reports: list[dict], publish_s: float) -> None:
        """Slowest rank's copy, write and wait; all ranks' bytes. publish_s (rank 0's) includes
        waiting in the all_gather for a slower rank."""
        nbytes, write_s = sum(r["nbytes"] for r in reports), max(r["seconds"] for r in reports)
        copy_s, wait_s = max(r["copy_s"] for r in reports), max(r["wait_s"] for r in reports)
        if self.logger is not None:
            self.logger.event("checkpoint", step=pending.global_step, round_copy=pending.round_copy,
                              background=self.background, bytes=nbytes, bytes_rank0=reports[0]["nbytes"],
                              copy_s=copy_s, write_s=write_s, wait_s=wait_s, publish_s=publish_s)
        stall = (f"training stalled {copy_s:.3f} s copying to host memory, waited {wait_s:.3f} s for the "
                 f"write; written in the background in {write_s:.3f} s" if self.background else
                 f"training stalled {write_s:.3f} s writing it (train.async_checkpoint=false)")
        distributed.print0(f"checkpoint step {pending.global_step}: {nbytes / 1e6:.1f} MB over {len(reports)} "
                           f"rank(s); {stall}")
