"""Hierarchical k-means: m super-clusters over all ranks, then k/m sub-clusters inside each one,
computed by the rank group that owns it; features travel by all_to_all, labels come back.

    res = hierarchical_kmeans(x_local, k=1000, m=4, niter=20, seed=0, device=dev, backend="auto")
    res.super_local, res.sub_local   # [n_local] each, for THIS rank's rows, in their order

LEVEL 1  kmeans(m) over every rank.
ROUTE    each row goes to a rank of the group owning its super-cluster (distributed.ownership on
         the level-1 sizes: for W >= m contiguous groups sized by rows, for W < m a rank owns
         several super-clusters, largest first to the least loaded), in rounds of bounded size,
         into a buffer on `device` ordered by super-cluster (route.py).
LEVEL 2  for each owned super-cluster s, kmeans(k/m) over the rows of s inside the owning group.
RETURN   all_to_all back along the same splits: every rank gets (super, sub) for its own rows.

Sub-cluster ids are global: sub = s * (k // m) + local_sub, so sub // (k // m) == super.
A super-cluster with n_s < k/m rows gets n_s sub-clusters (ids s*(k/m) + n_s ... stay unused and
are reported in `clamped`); an empty one gets none. Every rank decides this from the global level-1
sizes, so all members of a group skip or join the same collectives.
Modes: m == 1 (flat DeepCluster) clusters over the world with no routing; k == m needs no level 2
(sub == super); k == 1 (RotNet) labels everything 0. method "kmeans" (Lloyd) or "sinkhorn" (the same
iterations with balanced assignments, sinkhorn.py) at both levels, or `super_method` at level 1 only;
`method_options` go to sinkhorn.

Memory: a rank holds its own rows (RAM or a local memmap) plus the rows routed to it (about n_local
again) on `device` (the GPU under NCCL), where level 2 reads them as contiguous slices; in flight,
one routing round: at most about route_chunk_bytes each way.
Preemption: `poll` (preemption.UnevenLoopPoll) polls after every Lloyd iteration of both levels;
level 2 is uneven (a rank may own several super-clusters), so its polls are finished after it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dist_cluster.cluster.kmeans import KMeansResult, kmeans
from dist_cluster.cluster.route import RoutePlan
from dist_cluster.cluster.sinkhorn import sinkhorn_kmeans
from dist_cluster.cluster.rows import num_rows
from dist_cluster.runtime import comm, distributed
from dist_cluster.runtime.logger import Timer
from dist_cluster.runtime.preemption import NO_POLL

_GROUP_CACHE = distributed.GroupCache(capacity=2)  # level-2 groups of the latest partitions
ROUTE_CHUNK_BYTES = 256 << 20  # per rank and routing round, each way (route.py)


@dataclass
class HierResult:
    super_local: torch.Tensor  # [n_local] int64
    sub_local: torch.Tensor  # [n_local] int64, global sub-cluster ids
    centroids_super: torch.Tensor  # [m, d]
    centroids_sub: dict[int, torch.Tensor]  # owned super-cluster -> [k_s, d] (k_s <= k // m)
    sub_sizes: torch.Tensor  # [k] int64, global
    super_sizes: torch.Tensor  # [m] int64, global
    seconds: dict[str, float]  # level1, route, level2, return (this rank's wall time)
    owners: list[list[int]]  # ranks owning each super-cluster
    empty_resplit: int = 0  # over both levels and all groups
    objective_level1: float = 0.0  # global sum of squared distances to the super centroids
    objective_level2: float = 0.0  # global sum of squared distances to the sub centroids
    clamped: dict[int, int] = field(default_factory=dict)  # super -> sub-clusters used, when < k // m
    level1: Optional[KMeansResult] = None
    level2: dict[int, KMeansResult] = field(default_factory=dict)


def _clusterer(method: str, options: dict) -> Callable:
    """The function each level calls, with kmeans()'s signature and result."""
    if method == "kmeans":
        return kmeans
    if method == "sinkhorn":
        return functools.partial(sinkhorn_kmeans, **options)
    raise ValueError(f"cluster method {method!r}: kmeans | sinkhorn (pic runs flat, outside the hierarchy)")


def owner_groups(m: int, super_sizes: Optional[torch.Tensor] = None) -> tuple[list[list[int]], list]:
    """(owners, process groups) for m super-clusters. With the level-1 sizes the owners follow the
    data (distributed.ownership): a group's level-2 work is rows x k/m, so ranks go where the rows
    are. Groups are rebuilt only when the partition changes (distributed.GroupCache)."""
    world = comm.group_size()
    loads = None if super_sizes is None else super_sizes.tolist()
    owners = distributed.ownership(m, world, loads)
    if not comm.initialized():
        return owners, [None] * m
    return owners, _GROUP_CACHE.groups(owners)


def hierarchical_kmeans(x_local, k: int, m: int, niter: int, seed: int, device: torch.device,
                        backend: str = "auto", log: Optional[Callable[..., None]] = None,
                        init_samples_per_rank: int = 10000, poll=NO_POLL,
                        route_chunk_bytes: int = ROUTE_CHUNK_BYTES, method: str = "kmeans",
                        method_options: Optional[dict] = None, super_method: str = "") -> HierResult:
    """Collective over the world, computed on `device`.
    `log(level=, super=, iteration=, objective=, seconds=)` per iteration; `route_chunk_bytes`
    bounds what one routing round sends and receives per rank. `super_method` clusters level 1
    when it differs from `method` (e.g. sinkhorn: m super-clusters of N/m rows, so every owner
    group gets the same level-2 work; '' = `method`)."""
    if m < 1 or k < m or k % m:
        raise ValueError(f"hierarchical k-means needs 1 <= m <= k and k % m == 0, got k={k}, m={m}")
    cluster_fn = _clusterer(method, method_options or {})
    super_fn = _clusterer(super_method or method, method_options or {})
    n_total = int(comm.all_reduce(torch.tensor([num_rows(x_local)]), None).item())
    if k > n_total:
        raise ValueError(f"k={k} clusters but only n={n_total} images over all ranks")
    kpm, rank = k // m, comm.group_rank()
    seconds = {"level1": 0.0, "route": 0.0, "level2": 0.0, "return": 0.0}

    def level_log(level, s=None):
        return None if log is None else (lambda **kw: log(level=level, super=s, **kw))

    with Timer() as timer:
        level1 = super_fn(x_local, m, niter, seed, device, backend, None, init_samples_per_rank, level_log(1),
                          poll=poll)
        poll.finish()
    seconds["level1"] = timer.seconds
    super_local, super_sizes = level1.assign_local, level1.sizes
    owners, groups = owner_groups(m, super_sizes if kpm > 1 and m > 1 else None)  # same sizes on every rank
    res = HierResult(super_local=super_local, sub_local=super_local.clone(), centroids_super=level1.centroids,
                     centroids_sub={}, sub_sizes=torch.zeros(k, dtype=torch.int64), super_sizes=super_sizes,
                     seconds=seconds, owners=owners, level1=level1)
    mine = [s for s in range(m) if rank in owners[s]]
    level2_stats = torch.zeros(2, dtype=torch.float64)  # empties, objective (group leaders only)

    if kpm == 1:  # k == m (includes k == 1): the super-cluster is the sub-cluster
        res.centroids_sub = {s: level1.centroids[s:s + 1].clone() for s in mine}
        level2_stats[1] = level1.final_objective if rank == 0 else 0.0
    elif m == 1:  # flat k-means over the world: nothing to route
        with Timer() as timer:
            flat = cluster_fn(x_local, k, niter, seed + 1, device, backend, None, init_samples_per_rank,
                          level_log(2, 0), poll=poll)
            poll.finish()
        seconds["level2"] = timer.seconds
        res.sub_local, res.centroids_sub, res.level2 = flat.assign_local, {0: flat.centroids}, {0: flat}
        if rank == 0:
            level2_stats += torch.tensor([flat.empty_resplit, flat.final_objective], dtype=torch.float64)
    else:
        _route_and_cluster(x_local, res, k, m, niter, seed, device, backend, init_samples_per_rank,
                           owners, groups, mine, level2_stats, level_log, poll, route_chunk_bytes, cluster_fn)

    res.clamped = {s: int(n) for s, n in enumerate(super_sizes.tolist()) if n < kpm and kpm > 1}
    level2_stats = comm.all_reduce(level2_stats)
    res.empty_resplit = level1.empty_resplit + int(level2_stats[0].item())
    res.objective_level1, res.objective_level2 = level1.final_objective, float(level2_stats[1].item())
    res.sub_sizes = comm.all_reduce(torch.bincount(res.sub_local, minlength=k))
    return res


def _route_and_cluster(x_local, res: HierResult, k, m, niter, seed, device, backend, init_samples_per_rank,
                       owners, groups, mine, level2_stats, level_log, poll, route_chunk_bytes, cluster_fn) -> None:
    """ROUTE -> LEVEL 2 -> RETURN (route.py); fills res.sub_local, res.centroids_sub, res.level2."""
    kpm, rank = k // m, comm.group_rank()
    seconds = res.seconds
    with Timer() as timer:
        plan = RoutePlan(res.super_local, owners, m)
        recv_x = plan.send_rows(x_local, device, route_chunk_bytes)  # on device, sorted by super
    seconds["route"] = timer.seconds

    with Timer() as timer:
        recv_sub = torch.full((len(recv_x),), -1, dtype=torch.int64)
        for s in mine:
            n_s = int(res.super_sizes[s])
            if n_s == 0:
                continue  # every member sees the same global size and skips together
            lo, hi = plan.bounds[s], plan.bounds[s + 1]
            sub = cluster_fn(recv_x[lo:hi], min(kpm, n_s), niter, seed * 1_000_003 + s + 1, device,
                         backend, groups[s], init_samples_per_rank, level_log(2, s), poll=poll)
            recv_sub[lo:hi] = s * kpm + sub.assign_local
            res.centroids_sub[s], res.level2[s] = sub.centroids, sub
            if comm.group_rank(groups[s]) == 0:
                level2_stats += torch.tensor([sub.empty_resplit, sub.final_objective], dtype=torch.float64)
        poll.finish()  # ranks own different numbers of super-clusters: join until all are done
        if (recv_sub < 0).any():
            raise RuntimeError(f"rank {rank}: {(recv_sub < 0).sum()} routed rows belong to a super-cluster "
                               "this rank does not own (routing and ownership disagree)")
    seconds["level2"] = timer.seconds
    del recv_x  # the routed rows: freed before RETURN, whose peak is then labels only

    with Timer() as timer:
        res.sub_local = plan.return_labels(recv_sub)
    seconds["return"] = timer.seconds
