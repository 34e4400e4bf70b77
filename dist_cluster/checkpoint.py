"""Checkpoints: one set of files per saved step, in RUN/checkpoints/.

    shared.step<g>.pt              rank 0: trunk, super head, optimiser, progress, config, world size
    rank<i>.step<g>.pt             one per rank: its sub-heads and their optimiser, its RNG state
    <file>.sha256                  each file's checksum (`sha256sum -c` format), written after it
    last.pt -> shared.step<g>.pt   the newest step (a symlink; evaluation and people read it)
    round_<r>.pt (+ .sha256)       the shared file at the end of round r (a hard link), kept

Why several files: sub-heads live only on their owners, and no rank should gather all of them.
Why the step in every name: a crash between writing the rank files and the shared file must not
leave a rank file newer than the shared file of its step, and which step a file holds must not
depend on which rename happened last.

Writing: tmp file -> fsync -> rename -> fsync of the folder; the checksum, computed while the bytes
went out, is then written the same way. A file without its checksum is an unfinished save (a step
saved twice, a round's end and then the next round's start, drops its old checksum first). Any
error while writing deletes the tmp file; a full disk raises one CheckpointWriteError naming the
folder and the bytes needed. The two newest steps are kept: the last one and its fallback.

Loading: each rank checks its own rank file of every kept step against its checksum (rank 0 also
the shared file); one all_gather_object of these small verdicts lets every rank pick the same step,
the newest one good on *all* ranks, so a rank whose own file is bad makes every rank fall back. A
round copy has no rank files: it restores the trunk and the progress, not the heads nor the ranks'
random streams. `load(round_fallback=True)` accepts one only for callers that start fresh heads at a
round boundary anyway (rounds.Run: DeeperCluster, DeepCluster); the run then goes on deterministically
but not bit-identical to an uninterrupted one. Everything is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import comm, distributed

SHARED_RE = r"shared\.step(\d+)\.pt"
ROUND_RE = r"round_(\d+)\.pt"
CHUNK = 8 << 20  # bytes read at a time when checking a file


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written; nothing partial was left behind."""


class CheckpointError(RuntimeError):
    """No checkpoint in the folder can be resumed from; the message lists every file and why."""


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(run_dir, rank: int, global_step: int) -> Path:
    return ckpt_dir(run_dir) / f"rank{rank}.step{global_step}.pt"


def shared_file(run_dir, global_step: int) -> Path:
    return ckpt_dir(run_dir) / f"shared.step{global_step}.pt"


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ---------------------------------------------------------------- writing


class _HashingWriter:
    """What torch.save writes to: the file, hashed on the way. torch turns an exception raised in
    write() into an 'unexpected pos' RuntimeError, so the original one is kept here for the message."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except BaseException as err:
            self.error = err
            raise
        self.sha.update(data)
        self.nbytes += n
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    """Make renames and deletions in `folder` durable (POSIX: fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot sync a directory; the rename is atomic anyway
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _tensor_bytes(obj) -> int:
    """About what torch.save of obj needs: its tensors (the pickle around them is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_error(path: Path, err: BaseException, need: int) -> CheckpointWriteError:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return CheckpointWriteError(
            f"checkpoint not saved: no space left in {path.parent} for {path.name} (about "
            f"{need / 2**20:.2f} MiB needed, {free / 2**20:.2f} MiB free; {err.strerror}). No partial file "
            "was left and the previous checkpoint is intact: free space (or move run_dir) and run the "
            "same command again to resume.")
    return CheckpointWriteError(f"checkpoint not saved: writing {path} failed: {err!r}. No partial file was left.")


def _replace_durably(path: Path, write: Callable) -> None:
    """write(f) into path.tmp, fsync, rename over path, fsync the folder; on any error remove the tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_checksum(path: Path, digest: str) -> None:
    line = f"{digest}  {path.name}\n".encode()
    _replace_durably(checksum_file(path), lambda f: f.write(line))


def write_checked(obj, path: Path) -> str:
    """torch.save(obj) to path, then its checksum file; returns the sha256 hex digest."""
    writer = None

    def save_to(f):
        nonlocal writer
        writer = _HashingWriter(f)
        torch.save(obj, writer)

    try:
        if checksum_file(path).exists():  # the same step again: unfinished until its new checksum
            checksum_file(path).unlink()
            _fsync_dir(path.parent)
        _replace_durably(path, save_to)
        _write_checksum(path, writer.sha.hexdigest())
    except Exception as err:  # noqa: BLE001 - one clear error instead of torch's
        cause = writer.error if writer is not None and writer.error is not None else err
        raise _write_error(path, cause, max(_tensor_bytes(obj), writer.nbytes if writer else 0)) from None
    return writer.sha.hexdigest()


def _link(target: Path, name: Path, symlink: bool) -> None:
    """name -> target, atomically: a relative symlink (symlink=True) or a hard link, else (a
    filesystem without them) a copy. Either way `name` reads as the target's bytes."""
    tmp = name.with_name(name.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(target.name, tmp) if symlink else os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, name)
        _fsync_dir(name.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _point_last(path: Path, digest: str, round_copy: Optional[int]) -> None:
    """last.pt -> path; round_<r>.pt a hard link, so that it outlives the pruning of `path`."""
    try:
        _link(path, path.with_name("last.pt"), symlink=True)
        if round_copy is not None:
            copy = path.with_name(f"round_{round_copy}.pt")
            checksum_file(copy).unlink(missing_ok=True)  # replaced below: unfinished until then
            _link(path, copy, symlink=False)
            _write_checksum(copy, digest)
    except OSError as err:  # a copy, where links are not supported, needs the space again
        raise _write_error(path.with_name("last.pt"), err, path.stat().st_size) from None


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


def save(run_dir, shared: dict, per_rank: dict, global_step: int, round_copy: Optional[int] = None) -> None:
    """Collective: every rank writes its own file, then rank 0 the shared file, and points last.pt
    at it. round_copy=r also keeps RUN/checkpoints/round_<r>.pt, the trunk at the end of round r."""
    rank = distributed.rank()
    folder = ckpt_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_checked({**per_rank, "global_step": global_step}, rank_file(run_dir, rank, global_step))
    comm.barrier()  # every rank file of this step exists before the shared file may name the step
    if rank == 0:
        record = {**shared, "global_step": global_step, "world_size": distributed.world_size()}
        path = shared_file(run_dir, global_step)
        _point_last(path, write_checked(record, path), round_copy)
        # kept: this step and the newest one before it (the fallback); a newer one can only be left
        # from a save abandoned when a resume went back past it
        older = [g for g in _steps(folder, SHARED_RE) if g < global_step]
        kept = {global_step, max(older, default=global_step)}
        _prune(folder, SHARED_RE, kept.__contains__, rf"{SHARED_RE}|last\.pt|{ROUND_RE}")
    comm.barrier()  # the step is complete and rank 0 has chosen the fallback: the rank files follow it
    mine = rf"rank{rank}\.step(\d+)\.pt"
    _prune(folder, mine, lambda g: g == global_step or shared_file(run_dir, g).exists(), mine)


# ---------------------------------------------------------------- checking and loading


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def verify(path: Path) -> Optional[str]:
    """None when path matches its checksum file, else why not (for the messages)."""
    if not path.exists():
        return "missing"
    if not checksum_file(path).exists():
        return f"no {checksum_file(path).name} (its save did not finish)"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if [sha256_of(path)] != checksum_file(path).read_text().split()[:1]:
        return f"checksum mismatch ({size} bytes: truncated or overwritten)"
    return None


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
        return Loaded(shared, _load(rank_file(run_dir, rank, shared["global_step"]), map_location), found[0])
    steps = [int(re.fullmatch(SHARED_RE, p.name).group(1)) for p in found if re.fullmatch(SHARED_RE, p.name)]
    verdicts = comm.all_gather_object(_my_verdicts(run_dir, steps))
    rejected = []
    for g in steps:
        why = [f"rank {r}: {v[g]}" for r, v in enumerate(verdicts) if v[g] is not None]
        if not why:
            path = shared_file(run_dir, g)
            return Loaded(_load(path, map_location), _load(rank_file(run_dir, rank, g), map_location), path, rejected)
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
