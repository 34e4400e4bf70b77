"""Checkpoints: one set of files per saved step, in RUN/checkpoints/.

    shared.step<g>.pt              rank 0: trunk, super head, their optimiser state, progress, config, world size
    rank<i>.step<g>.pt             one per rank: its RNG state, and the sub heads whose group rank i leads
                                   (weights and momentum, train/checkpoint_state.py): every head in one file only
    <file>.sha256                  each file's checksum (`sha256sum -c` format), written after it
    last.pt -> shared.step<g>.pt   the newest published step (a symlink; evaluation and people read it)
    round_<r>.pt (+ .sha256)       the shared file at the end of round r (a hard link), kept

Why several files: sub-heads live only on their owners, and no rank should gather all of them.
Why the step in every name: which step a file holds must not depend on which rename happened last,
and a step is usable only when every one of its files is (Loading, below).

A file (checkpoint/durable.py): tmp file -> fsync -> rename -> fsync of the folder; the checksum, computed while
the bytes went out, is then written the same way. A file without its checksum is unfinished. Any
error while writing deletes the tmp file; a full disk gives one CheckpointWriteError naming the
folder and the bytes needed. The two newest steps are kept: the last one and its fallback.

A save of step g, in three parts:
  1. guard_rewrite(g)  collective, training thread. A step can be saved again (an epoch's end, its
                       round's end, the next round's start share a step): if last.pt names step g,
                       rank 0 first points it at the fallback, then a barrier. Only then may a rank
                       unlink a checksum of step g to replace the file.
  2. write_step(g)     no collective, any thread: this rank's file, then (rank 0) the shared file.
                       An error is kept in the returned Written, not raised.
  3. publish(written)  collective, training thread: one all_gather_object of every rank's Written.
                       A failure anywhere raises on every rank (last.pt still names the previous
                       step). Otherwise every file of step g is complete on every rank, and only now
                       rank 0 points last.pt at it (and keeps the round copy) and deletes the steps
                       older than the fallback; a barrier; each rank deletes its own files of them.
`save()` runs 1, 2, 3 in a row. writer.CheckpointWriter runs 1, copies the state to host memory
(the training thread's one stall), runs 2 in a background thread while training goes on, and 3 at
the next save, before anything else of it, or when the run stops (its end, a preemption; rounds.Run
also publishes a round's last save once the next round's extraction is done). So a save never
starts before the previous one is published, and every collective runs on the training thread, at
the same point of the run on every rank (through comm.py; the writer thread has none). Until its
publication, last.pt names the previous step: evaluation reading last.pt lags one save behind.

What a kill leaves, whenever it comes: last.pt names a step whose files were complete on every rank
when it was set, and which nothing deletes or rewrites while it is named (pruning keeps it; a
rewrite moves last.pt first). A step being written, or written and not yet published, is on disk
without being named: Loading judges it by its checksums like any other, so a complete one is used
and an incomplete one skipped.

Loading: each rank checks its own rank file of every kept step against its checksum (rank 0 also
the shared file); one all_gather_object of these small verdicts lets every rank pick the same step,
the newest one good on *all* ranks, so a rank whose own file is bad makes every rank fall back. An
owner of a sub head reads it from its group leader's file (load_rank_file), checked by the leader
in the same verdicts. A round copy has no rank files: it restores the trunk and the progress, not
the heads nor the ranks' random streams. `load(round_fallback=True)` accepts one only for callers
that start fresh heads at a round boundary anyway (rounds.Run: DeeperCluster, DeepCluster); the run
then goes on deterministically but not bit-identical to an uninterrupted one. Everything is read with
torch.load(weights_only=True). A run resumes with the world size it was saved with (_check_world):
each rank's shards, random stream and position in the epoch are its own.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from dist_cluster.checkpoint.durable import (
    CheckpointWriteError,
    checksum_file,
    link_atomically,
    verify,
    write_checked,
    write_checksum,
    write_error,
)
from dist_cluster.runtime import comm, distributed

__all__ = ["CheckpointError", "CheckpointWriteError", "Loaded", "Written", "candidates", "checksum_file",
           "ckpt_dir", "guard_rewrite", "load", "load_rank_file", "peek", "publish", "rank_file", "rng_state",
           "save", "set_rng_state", "shared_file", "stored_config", "verify", "write_step"]

SHARED_RE = r"shared\.step(\d+)\.pt"
ROUND_RE = r"round_(\d+)\.pt"


class CheckpointError(RuntimeError):
    """No checkpoint in the folder can be resumed from; the message lists every file and why."""


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(run_dir, rank: int, global_step: int) -> Path:
    return ckpt_dir(run_dir) / f"rank{rank}.step{global_step}.pt"


def shared_file(run_dir, global_step: int) -> Path:
    return ckpt_dir(run_dir) / f"shared.step{global_step}.pt"


# ---------------------------------------------------------------- saving


def _steps(folder: Path, pattern: str) -> dict[int, Path]:
    rx = re.compile(pattern)
    return {int(m.group(1)): p for p in folder.iterdir() if (m := rx.fullmatch(p.name))}


def _prune(folder: Path, pattern: str, keep: Callable[[int], bool], tmp_pattern: str) -> None:
    """Delete the files of the steps not kept, and the tmp files of this writer that a kill -9
    mid-write left."""
    for g, path in _steps(folder, pattern).items():
        if not keep(g):
            checksum_file(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    for tmp in folder.glob("*.tmp"):
        if re.fullmatch(tmp_pattern, tmp.name[:-len(".tmp")].removesuffix(".sha256")):
            tmp.unlink(missing_ok=True)


def _point_last(path: Path, digest: str, round_copy: Optional[int]) -> None:
    """last.pt -> path; round_<r>.pt a hard link, so that it outlives the pruning of `path`."""
    try:
        link_atomically(path, path.with_name("last.pt"), symlink=True)
        if round_copy is not None:
            copy = path.with_name(f"round_{round_copy}.pt")
            checksum_file(copy).unlink(missing_ok=True)  # replaced below: unfinished until then
            link_atomically(path, copy, symlink=False)
            write_checksum(copy, digest)
    except OSError as err:  # a copy, where links are not supported, needs the space again
        raise write_error(path.with_name("last.pt"), err, path.stat().st_size) from None


def guard_rewrite(run_dir, global_step: int) -> None:
    """Collective, before step `global_step` is written: if last.pt names that step (saved again),
    rank 0 points it at the newest older complete step first, so that it never names files being
    replaced. Without an older step it is left (a kill then falls back as Loading says)."""
    last = ckpt_dir(run_dir) / "last.pt"
    if distributed.rank() == 0 and last.is_symlink() and os.readlink(last) == shared_file(run_dir, global_step).name:
        older = [g for g, p in _steps(last.parent, SHARED_RE).items()
                 if g < global_step and checksum_file(p).exists()]
        if older:
            link_atomically(shared_file(run_dir, max(older)), last, symlink=True)
    comm.barrier()


@dataclass
class Written:
    """What write_step left on this rank: what publish() needs, and the numbers for the log."""
    global_step: int
    seconds: float = 0.0
    nbytes: int = 0
    digest: Optional[str] = None  # rank 0: the shared file's sha256 (its round copy's too)
    error: Optional[BaseException] = None
    copy_s: float = 0.0  # writer: the host copy before the write, and how long the training
    wait_s: float = 0.0  # thread still waited for the write at the next save (for the log)

    def report(self) -> dict:
        """The small, picklable part every rank sees (publish's all_gather_object)."""
        return {"seconds": self.seconds, "nbytes": self.nbytes, "copy_s": self.copy_s, "wait_s": self.wait_s,
                "error": None if self.error is None else str(self.error)}


def write_step(run_dir, shared: Optional[dict], per_rank: dict, global_step: int) -> Written:
    """This rank's files of a step: its rank file, then (rank 0) the shared file built from `shared`.
    No collective: the background writer runs it. Errors are returned, for publish() to raise."""
    start, rank = time.perf_counter(), distributed.rank()
    out, paths = Written(global_step), [rank_file(run_dir, rank, global_step)]
    try:
        ckpt_dir(run_dir).mkdir(parents=True, exist_ok=True)
        write_checked({**per_rank, "global_step": global_step}, paths[0])
        if rank == 0:
            record = {**shared, "global_step": global_step, "world_size": distributed.world_size()}
            paths.append(shared_file(run_dir, global_step))
            out.digest = write_checked(record, paths[1])
        out.nbytes = sum(p.stat().st_size for p in paths)
    except Exception as err:  # noqa: BLE001 - raised by publish(), on every rank
        out.error = err
    out.seconds = time.perf_counter() - start
    return out


def _raise_failures(reports: list[dict], mine: Written) -> None:
    """Every rank raises when any rank's files of the step are missing: its own error where it
    failed, else one naming the rank that did."""
    if mine.error is not None:
        raise mine.error
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"] is not None]
    if failed:
        rank, why = failed[0]
        raise CheckpointWriteError(f"checkpoint of step {mine.global_step} not saved: rank {rank} failed: {why}. "
                                   "The previous checkpoint is intact.")


def publish(run_dir, written: Written, round_copy: Optional[int] = None) -> list[dict]:
    """Collective: make step written.global_step the last one once every rank's files of it are
    complete (see the module doc); returns every rank's Written.report(), in rank order.
    round_copy=r also keeps RUN/checkpoints/round_<r>.pt, the trunk at the end of round r."""
    reports = comm.all_gather_object(written.report())
    _raise_failures(reports, written)
    rank, g, folder = distributed.rank(), written.global_step, ckpt_dir(run_dir)
    if rank == 0:
        _point_last(shared_file(run_dir, g), written.digest, round_copy)
        # kept: this step and the newest one before it (the fallback); a newer one can only be left
        # from a save abandoned when a resume went back past it
        older = [s for s in _steps(folder, SHARED_RE) if s < g]
        kept = {g, max(older, default=g)}
        _prune(folder, SHARED_RE, kept.__contains__, rf"{SHARED_RE}|last\.pt|{ROUND_RE}")
    comm.barrier()  # rank 0 has chosen the fallback: the rank files follow it
    mine = rf"rank{rank}\.step(\d+)\.pt"
    _prune(folder, mine, lambda s: s == g or shared_file(run_dir, s).exists(), mine)
    return reports


def save(run_dir, shared: Optional[dict], per_rank: dict, global_step: int,
         round_copy: Optional[int] = None) -> list[dict]:
    """Collective, synchronous: guard_rewrite, write_step, publish (rank 0's `shared` is the one
    written; other ranks may pass None). Raises CheckpointWriteError on every rank if any failed."""
    guard_rewrite(run_dir, global_step)
    return publish(run_dir, write_step(run_dir, shared, per_rank, global_step), round_copy)


# ---------------------------------------------------------------- checking and loading


def peek(path: Path) -> dict:
    """The small entries of a shared file (config, progress, step, world size), its tensors left
    unread (mmap): what rounds.train compares before torch.distributed starts."""
    record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: record.get(k) for k in ("config", "progress", "global_step", "world_size")}


def candidates(run_dir) -> list[Path]:
    """Shared files a resume may use, newest first: the step files (or, in the layout before
    checksums, a plain last.pt), then the round copies."""
    folder = ckpt_dir(run_dir)
    if not folder.is_dir():
        return []
    steps, rounds = _steps(folder, SHARED_RE), _steps(folder, ROUND_RE)
    last = folder / "last.pt"
    if last.is_symlink() and (named := re.fullmatch(SHARED_RE, os.readlink(last))):
        steps.setdefault(int(named.group(1)), folder / named.group(0))  # gone: reported as missing
    found = [steps[g] for g in sorted(steps, reverse=True)]
    if not found and last.is_file() and not last.is_symlink():
        found.append(last)
    return found + [rounds[r] for r in sorted(rounds, reverse=True)]


def stored_config(run_dir) -> Optional[tuple[Path, dict]]:
    """(path, peek) of the newest checkpoint whose config can be read, or None for a fresh run_dir.
    No process group needed: every rank reads the same files and reaches the same answer."""
    found, why = candidates(run_dir), []
    for path in found:
        try:
            record = peek(path)
        except Exception as err:  # noqa: BLE001 - judged below, after the other files
            why.append(f"{path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        if record["config"] is not None:
            return path, record
        why.append(f"{path.name}: no config")
    if found:  # load() could use none of them either: say so before anything is written
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir(run_dir)}:\n  " + "\n  ".join(why) +
                              "\nRestore the files, or move the folder away to start the run over.")
    return None


@dataclass
class Loaded:
    shared: dict
    per_rank: Optional[dict]  # None: a round copy (fresh heads; the ranks' RNG from the seed)
    path: Path  # the shared file resumed from
    rejected: list[str] = field(default_factory=list)  # the newer checkpoints skipped, and why
    step: Optional[int] = None  # the step of the rank files (None: a round copy)


def _check_world(found: list[Path]) -> None:
    """All checkpoints of a run_dir have the world size of its first run: the first readable one
    tells, before any file is blamed for it."""
    for path in found:
        try:
            recorded = peek(path)["world_size"]
        except Exception:  # noqa: BLE001 - an unreadable file is judged by verify()
            continue
        world = distributed.world_size()
        if recorded is not None and recorded != world:
            raise RuntimeError(
                f"{path} was written by {recorded} ranks, this run has {world}: sub-heads and shard "
                "ownership are per rank. Resume with the same world size, or start a new run_dir and "
                "initialise from RUN/export/.")
        return


def _my_verdicts(run_dir, steps: list[int]) -> dict[int, Optional[str]]:
    """Per step: None when this rank can use it, else why not (rank 0 also checks the shared file)."""
    rank, out = distributed.rank(), {}
    for g in steps:
        shared, mine = shared_file(run_dir, g), rank_file(run_dir, rank, g)
        why = verify(shared) if rank == 0 else (None if shared.exists() else "missing")
        out[g] = f"{shared.name}: {why}" if why else None
        if out[g] is None and (why := verify(mine)):
            out[g] = f"{mine.name}: {why}"
    return out


def _load(path: Path, map_location) -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_rank_file(run_dir, rank: int, global_step: int, map_location="cpu") -> dict:
    """Rank `rank`'s file of a step: a rank's own, or (the sub heads of its group) its group
    leader's. Unchecked here: load() chose the step only after every rank had checked its own."""
    return _load(rank_file(run_dir, rank, global_step), map_location)


def load(run_dir, map_location="cpu", round_fallback: bool = False) -> Optional[Loaded]:
    """Collective (one all_gather_object): the newest checkpoint every rank can use, or None when
    the run has none. Raises CheckpointError, naming every file and why, when none can be used."""
    found = candidates(run_dir)
    if not found:
        return None
    _check_world(found)
    rank = distributed.rank()
    if found[0].name == "last.pt":  # written before checksums: nothing to check it against
        shared = _load(found[0], map_location)
        distributed.print0(f"{found[0]} was written before checksums: loaded unchecked")
        g = shared["global_step"]
        return Loaded(shared, load_rank_file(run_dir, rank, g, map_location), found[0], step=g)
    steps = [int(re.fullmatch(SHARED_RE, p.name).group(1)) for p in found if re.fullmatch(SHARED_RE, p.name)]
    verdicts = comm.all_gather_object(_my_verdicts(run_dir, steps))
    rejected = []
    # the steps any rank listed: a step another rank did not see (a listing taken while a file
    # appeared) is missing there, so every rank judges the same steps the same way
    for g in sorted(set().union(*verdicts), reverse=True):
        why = [f"rank {r}: {v.get(g, shared_file(run_dir, g).name + ': missing')}"
               for r, v in enumerate(verdicts) if v.get(g, "") is not None]
        if not why:
            path = shared_file(run_dir, g)
            return Loaded(_load(path, map_location), load_rank_file(run_dir, rank, g, map_location), path, rejected, g)
        rejected.append(f"step {g}: " + "; ".join(why))
    rounds = found[len(steps):]
    if rounds and not round_fallback:
        rejected.append(f"{', '.join(p.name for p in rounds)}: a round copy has no rank files (heads, "
                        "their optimiser, RNG), which this run needs")
    for path in rounds if round_fallback else ():  # one file for all ranks: each decides alone
        why = verify(path)
        if why is None:
            return Loaded(_load(path, map_location), None, path, rejected)
        rejected.append(f"{path.name}: {why}")
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir(run_dir)}:\n  " + "\n  ".join(rejected) +
                          "\nRestore the files, or move the folder away to start the run over.")


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
