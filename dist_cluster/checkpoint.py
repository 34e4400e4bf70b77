"""Checkpoints: RUN/checkpoints/last.pt (rank 0: trunk, super head, optimiser, progress, config)
plus one `rank<i>.step<g>.pt` per rank (its sub-heads and their optimiser, its RNG state).

Why several files: sub-heads live only on their owners, and no rank should gather all of them.
Why the step in the per-rank names: a crash between writing the rank files and last.pt must not
leave a rank file newer than the last.pt that points at it. last.pt names the step; the rank files
of that step are kept until the next last.pt is in place. Every file is written to a temporary name
and renamed (atomic on POSIX). Everything is read back with torch.load(weights_only=True).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from . import comm, distributed


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(run_dir, rank: int, global_step: int) -> Path:
    return ckpt_dir(run_dir) / f"rank{rank}.step{global_step}.pt"


def save(run_dir, shared: dict, per_rank: dict, global_step: int, round_copy: Optional[int] = None) -> None:
    """Collective: every rank writes its own file, then rank 0 writes last.pt.

    round_copy=r also keeps RUN/checkpoints/round_<r>.pt: the trunk at the end of round r, for
    analysis and evaluation (heads are re-initialised every round, so it needs no rank files).
    """
    rank = distributed.rank()
    folder = ckpt_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save({**per_rank, "global_step": global_step}, rank_file(run_dir, rank, global_step))
    comm.barrier()  # every rank file of this step exists before last.pt may point at it
    if rank == 0:
        record = {**shared, "global_step": global_step, "world_size": distributed.world_size()}
        _atomic_save(record, folder / "last.pt")
        if round_copy is not None:
            _atomic_save(record, folder / f"round_{round_copy}.pt")
    comm.barrier()  # last.pt now names this step: older rank files can go
    for old in folder.glob(f"rank{rank}.step*.pt"):
        if old.name != rank_file(run_dir, rank, global_step).name:
            old.unlink(missing_ok=True)


def load(run_dir, map_location="cpu") -> Optional[tuple[dict, dict]]:
    """(shared, this rank's file) of the last checkpoint, or None when the run has none."""
    path = ckpt_dir(run_dir) / "last.pt"
    if not path.exists():
        return None
    shared = torch.load(path, map_location=map_location, weights_only=True)
    world = distributed.world_size()
    if shared["world_size"] != world:
        raise RuntimeError(
            f"{path} was written by {shared['world_size']} ranks, this run has {world}: sub-heads and "
            "shard ownership are per rank. Resume with the same world size, or start a new run_dir "
            "and initialise from RUN/export/.")
    mine = rank_file(run_dir, distributed.rank(), shared["global_step"])
    if not mine.exists():
        raise RuntimeError(f"{mine} is missing: the checkpoint at step {shared['global_step']} is incomplete")
    per_rank = torch.load(mine, map_location=map_location, weights_only=True)
    return shared, per_rank


def rng_state(device: torch.device) -> dict:
    """This rank's random generators: the CPU one, and the CUDA one of `device` on GPU runs (dropout
    masks draw from it there)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved. A checkpoint from a CPU run resumed on a GPU (or the reverse)
    keeps the CPU stream exact; the CUDA stream then starts from the run's seeding."""
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
