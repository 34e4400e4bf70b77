"""The one distributed runtime: who am I, which device, which groups; clean start and stop.

Rank detection, in order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR), SLURM or submitit
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first host of SLURM_JOB_NODELIST), else a
single process. The process group is always initialised (world size 1 included) so every code path
runs the same collectives whatever the world size.

    with distributed.session(cfg.dist) as env:
        ...   # an exception on any rank tears the group down instead of leaving peers hanging
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: Optional[DistEnv] = None


def free_port() -> int:
    """A TCP port free on this host now (single-host rendezvous: tests, benchmarks, one process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """'node[003-005,9],gpu1' -> 'node003' (what `scontrol show hostnames | head -1` gives)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_ranks(environ: Optional[dict] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, SLURM, or a single process; sets MASTER_* if needed."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # a fixed port derived from the job id: every task computes the same one without talking
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return rank, world, int(env.get("SLURM_LOCALID", 0))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return 0, 1, 0


def pick_backend_and_device(backend: str, device: str, local_rank: int) -> tuple[str, torch.device]:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("dist.device=cuda but CUDA is not available")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("dist.backend=nccl needs CUDA; use gloo on CPU")
    return backend, dev


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; nothing on CPU (slow there, and the CPU tests compare fp32)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attempt_store(world: int, timeout: datetime.timedelta, environ: Optional[dict] = None):
    """The rendezvous store of this torchrun attempt: the agent's store under a prefix of its own;
    None outside torchrun's agent store (init_process_group then reads MASTER_ADDR/PORT itself).

    Why: torchrun's agent hosts ONE TCPStore for all its attempts (torch 2.14: dynamic_rendezvous
    keeps its `_shared_tcp_store_server`, TORCHELASTIC_USE_AGENT_STORE=True) and the workers use it
    without a per-attempt prefix (rendezvous._create_c10d_store: "We create a new TCPStore for every
    retry so no need to add prefix", which the shared server makes untrue). Gloo's connect keys
    (`default_pg/0//cpu//0/<rank>`: each rank's listening address) of the killed attempt are still
    there when `--max-restarts` starts the next one, so a restarted rank may read a dead peer's
    address: it connects to nothing (refused, init fails within seconds) or waits for a peer that is
    itself connecting elsewhere (both ranks block in `_create_gloo_process_group` until gloo's
    connect timeout, minutes). NCCL's unique id is published through the same store. Under
    `attempt<TORCHELASTIC_RESTART_COUNT>/` every attempt starts from an empty namespace.
    Limit: an elastic membership change re-rendezvouses without counting a restart (multi-node
    `--nnodes MIN:MAX` only); runs here use a fixed node count.
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_cluster/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def init(backend: str = "auto", timeout_s: int = 600, device: str = "auto") -> DistEnv:
    """Initialise the default process group once; later calls return the same environment."""
    global _ENV
    if _ENV is not None:
        return _ENV
    rank, world, local_rank = detect_ranks()
    backend, dev = pick_backend_and_device(backend, device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=attempt_store(world, timeout),
                            device_id=dev if backend == "nccl" else None)  # NCCL's eager init only
    _ENV = DistEnv(rank, world, local_rank, dev, backend)
    return _ENV


def shutdown() -> None:
    global _ENV
    if dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None


def env() -> DistEnv:
    if _ENV is None:
        raise RuntimeError("distributed.init() has not been called")
    return _ENV


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (flushes: torchrun pipes stdout)."""
    if is_main():
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def session(cfg_dist=None) -> Iterator[DistEnv]:
    """init() ... shutdown(); on an exception, report the rank and exit non-zero at once.

    A rank that raises must not wait in destroy_process_group for peers that are themselves
    blocked in a collective: it exits, torchrun sees the failure and stops the others, and ranks
    started some other way hit the collective timeout instead of hanging forever.
    """
    kwargs = {} if cfg_dist is None else dict(backend=cfg_dist.backend, timeout_s=cfg_dist.timeout_s,
                                              device=cfg_dist.device)
    info = init(**kwargs)
    try:
        yield info
    except BaseException as err:  # noqa: BLE001 - we re-raise or exit; never swallow
        if info.world_size == 1 or isinstance(err, (SystemExit, KeyboardInterrupt)):
            shutdown()
            raise
        import traceback
        traceback.print_exc()
        print(f"[rank {info.rank}] failed: {err!r}; exiting so the other ranks are stopped",
              file=sys.stderr, flush=True)
        os._exit(1)
    shutdown()


def loopback_bytes() -> Optional[int]:
    """Bytes the loopback interface has carried so far (Linux /proc/net/dev), or None.

    On one host, gloo moves every inter-rank byte over `lo`, each byte counted once: the difference
    across a stage is the traffic of all ranks together, measured on the wire rather than modelled.
    This is how runs check the planner's network figures (tests, benchmarks); on several hosts it
    sees only what stays on this one, and NCCL's NVLink / InfiniBand traffic not at all.
    """
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[0])  # received bytes (= transmitted, on lo)
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------- groups


def ownership(num_items: int, world: int, loads: Optional[Sequence[float]] = None) -> list[list[int]]:
    """Ranks that own each of `num_items` items (super-clusters, heads), for any world size.

    Without loads (or all equal): world >= num_items, ranks split into contiguous groups whose
    sizes differ by at most one; world < num_items, item i goes to rank i * world // num_items.
    With loads (the rows of each item; the same list on every rank), the work follows the data:
    world >= num_items, each item gets one rank and every further rank goes to the item with the
    most rows per rank (D'Hondt), which minimises the largest rows-per-rank; world < num_items,
    largest item first to the least-loaded rank (LPT). Every rank owns something and every item
    has at least one owner.
    """
    if num_items < 1 or world < 1:
        raise ValueError(f"ownership needs num_items >= 1 and world >= 1, got {num_items}, {world}")
    if loads is not None and len(loads) != num_items:
        raise ValueError(f"ownership: {len(loads)} loads for {num_items} items")
    if loads is None or len(set(float(x) for x in loads)) <= 1:
        if world >= num_items:
            bounds = [i * world // num_items for i in range(num_items + 1)]
            return [list(range(bounds[i], bounds[i + 1])) for i in range(num_items)]
        return [[i * world // num_items] for i in range(num_items)]
    loads = [float(x) for x in loads]
    if world >= num_items:
        members = [1] * num_items
        for _ in range(world - num_items):
            busiest = max(range(num_items), key=lambda i: (loads[i] / members[i], -i))
            members[busiest] += 1
        starts = [sum(members[:i]) for i in range(num_items)]
        return [list(range(starts[i], starts[i] + members[i])) for i in range(num_items)]
    rank_load, rank_items, owners = [0.0] * world, [0] * world, [[0] for _ in range(num_items)]
    for i in sorted(range(num_items), key=lambda i: (-loads[i], i)):
        r = min(range(world), key=lambda r: (rank_load[r], rank_items[r], r))  # empty ranks first on ties
        owners[i] = [r]
        rank_load[r] += loads[i]
        rank_items[r] += 1
    return owners


def imbalance(owners: Sequence[Sequence[int]], loads: Sequence[float], world: int) -> float:
    """The busiest rank's rows over the mean rows per rank (1.0: perfectly balanced): how much longer
    the slowest rank of a stage whose work is proportional to the rows takes than an even split."""
    per_rank = [0.0] * world
    for item, ranks in enumerate(owners):
        for r in ranks:
            per_rank[r] += float(loads[item]) / len(ranks)
    mean = sum(per_rank) / world
    return max(per_rank) / mean if mean > 0 else 1.0


class GroupCache:
    """Process groups per partition (rank lists), the `capacity` most recently used ones kept.
    Ownership that follows the cluster sizes changes every round: evicting old partitions destroys
    their groups, so a long run does not pile up communicators (NCCL keeps device buffers for each).
    Every rank makes the same calls in the same order, so all evict and create together."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._world = None
        self._partitions: dict[tuple, list[Optional[dist.ProcessGroup]]] = {}  # oldest first

    def groups(self, rank_lists: Sequence[Sequence[int]]) -> list[Optional[dist.ProcessGroup]]:
        """new_groups(rank_lists), or the cached ones; collective on a miss."""
        if self._world is not dist.group.WORLD:  # a re-initialised default group: all stale
            self._partitions, self._world = {}, dist.group.WORLD
        key = tuple(tuple(r) for r in rank_lists)
        if key in self._partitions:
            self._partitions[key] = self._partitions.pop(key)  # most recent last
            return self._partitions[key]
        while len(self._partitions) >= self.capacity:
            self._destroy(self._partitions.pop(next(iter(self._partitions))))
        self._partitions[key] = new_groups(rank_lists)
        return self._partitions[key]

    def __len__(self) -> int:
        return len(self._partitions)

    @staticmethod
    def _destroy(groups: list[Optional[dist.ProcessGroup]]) -> None:
        for group in {id(g): g for g in groups if g is not None}.values():
            dist.destroy_process_group(group)


def new_groups(rank_lists: Sequence[Sequence[int]]) -> list[Optional[dist.ProcessGroup]]:
    """One process group per rank list (all ranks must call this, in the same order).

    Returns, per list, the group if this rank is a member, else None. Duplicate lists share one
    group; single-rank lists get None-free groups too, so callers never special-case them.
    """
    me = rank()
    cache: dict[tuple[int, ...], Optional[dist.ProcessGroup]] = {}
    out = []
    for ranks in rank_lists:
        key = tuple(sorted(ranks))
        if key not in cache:
            group = dist.new_group(list(key))  # collective over the default group: every rank calls it
            cache[key] = group if me in key else None
        out.append(cache[key])
    return out
