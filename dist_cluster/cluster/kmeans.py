"""Sharded Lloyd k-means: each rank keeps its own rows; only k x d numbers cross the network.

    res = kmeans(x_local, k=1000, niter=20, seed=0, device=dev)   # collective over `group` (default: world)
    res.centroids            # [k, d], identical on every rank
    res.assign_local         # [n_local] int64, nearest final centroid of each local row

Per iteration: E-step on the local rows (faiss IndexFlatL2, a faiss GPU index, or a chunked torch
matmul), M-step as ONE all_reduce of [k*d sums | k counts | objective] in float64, then empty
clusters are re-split identically on every rank (same global counts, same seeded generator).
After `niter` iterations a final E-step assigns every row to the final centroids, so labels,
sizes and centroids agree. The E-step runs on the `device` the caller names (the run's device):
rows that live in RAM or a local memmap stream to it in chunks, as DeeperCluster feeds its faiss
GPU index from a CPU cache.

Matching faiss.Kmeans: `objective[i]` is faiss's `obj[i]` (sum of squared distances at the E-step
of iteration i). faiss.Kmeans takes initial centroids through `train(x, init_centroids=c)` and
silently subsamples to k * max_points_per_centroid (default 256) rows, so comparisons set
`max_points_per_centroid` high (bench/kmeans.py, tests/test_kmeans.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from dist_cluster.cluster.rows import num_rows, row_chunks, take_rows
from dist_cluster.runtime import comm
from dist_cluster.runtime.preemption import NO_POLL

SPLIT_EPS = 1.0 / 1024  # relative perturbation of a split centroid (faiss uses the same)
DATA_CHUNK_ELEMENTS = 2**24  # rows per data chunk = this / d (one chunk of a memmap in RAM at a time)
# faiss's GPU scratch space (StandardGpuResources reserves 18% of the card by default, outside
# torch's caching allocator): bounded, and torch's cached blocks are freed before it is reserved
FAISS_GPU_TEMP_BYTES = 1 << 30
# faiss's CPU search multiplies blocks of this many queries x centroids (faiss/utils/distances.cpp:
# distance_compute_blas_query_bs and distance_compute_blas_database_bs, their defaults)
FAISS_BLAS_QUERIES, FAISS_BLAS_CENTROIDS = 4096, 1024
TORCH_BLOCK_ELEMENTS = {"cuda": 2**27, "cpu": 2**22}  # TorchAssigner: [rows, k] distance block


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d] float32, CPU, identical on all ranks
    assign_local: torch.Tensor  # [n_local] int64, CPU
    objective: list[float]  # per iteration, global sum of squared distances at the E-step
    final_objective: float  # global sum of squared distances of assign_local to centroids
    sizes: torch.Tensor  # [k] int64, global cluster sizes of the final assignment
    empty_resplit: int  # empty clusters re-split over all iterations
    n_total: int  # global number of rows
    init_centroids: torch.Tensor  # [k, d] float32, the starting point (for references)
    iteration_seconds: list[float] = field(default_factory=list)

    @property
    def mean_objective(self) -> float:
        return self.final_objective / max(1, self.n_total)


# ---------------------------------------------------------------- E-step backends


def faiss_num_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto: faiss on CPU; on CUDA, faiss's GPU index when faiss was built with GPUs, else torch."""
    if backend == "auto":
        if device.type == "cuda":
            return "faiss" if faiss_num_gpus() > 0 else "torch"
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "torch"
        return "faiss"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"k-means backend must be auto | faiss | torch, got {backend!r}")
    return backend


class TorchAssigner:
    """Nearest centroid by ||c||^2 - 2 x.c (+ ||x||^2), chunked so the [rows, k] block stays bounded."""

    def __init__(self, device: torch.device, block_elements: Optional[int] = None):
        self.device = device
        self.block_elements = block_elements or TORCH_BLOCK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids.to(self.device, torch.float32)
        self.sq_norms = (self.centroids * self.centroids).sum(1)

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device)
        k = self.centroids.shape[0]
        rows = max(1, self.block_elements // k)
        dists = torch.empty(len(x), dtype=torch.float32, device=self.device)
        labels = torch.empty(len(x), dtype=torch.int64, device=self.device)
        for start in range(0, len(x), rows):
            xb = x[start:start + rows]
            scores = torch.addmm(self.sq_norms, xb, self.centroids.T, beta=1, alpha=-2)
            best, idx = scores.min(dim=1)
            dists[start:start + rows] = (best + (xb * xb).sum(1)).clamp_min_(0)
            labels[start:start + rows] = idx
        return dists, labels


class FaissAssigner:
    """faiss IndexFlatL2 (BLAS for big batches), or a faiss GPU flat index for CUDA tensors.

    The CPU index uses torch's thread count, so one knob (torch.set_num_threads, or
    OMP_NUM_THREADS under torchrun) sets the threads of both backends.
    """

    def __init__(self, d: int, device: torch.device):
        import faiss
        self.device = device
        if device.type == "cuda" and faiss_num_gpus() > 0:
            import faiss.contrib.torch_utils  # noqa: F401 - lets GPU indexes take torch CUDA tensors
            release_torch_cache(device)
            self._res = faiss.StandardGpuResources()
            self._res.setTempMemory(FAISS_GPU_TEMP_BYTES)
            config = faiss.GpuIndexFlatConfig()
            config.device = device.index or 0
            self.index = faiss.GpuIndexFlatL2(self._res, d, config)
            self.gpu = True
        else:
            faiss.omp_set_num_threads(torch.get_num_threads())
            self.index = faiss.IndexFlatL2(d)
            self.gpu = False

    def set_centroids(self, centroids: torch.Tensor) -> None:
        self.index.reset()
        if self.gpu:
            self.index.add(centroids.to(self.device, torch.float32).contiguous())
        else:
            self.index.add(np.ascontiguousarray(centroids.cpu().numpy(), dtype=np.float32))

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) == 0:
            return torch.empty(0, device=x.device), torch.empty(0, dtype=torch.int64, device=x.device)
        if self.gpu:
            dists, labels = self.index.search(x.to(self.device).contiguous(), 1)
            return dists[:, 0], labels[:, 0]
        dists, labels = self.index.search(np.ascontiguousarray(x.cpu().numpy()), 1)
        return torch.from_numpy(dists[:, 0]).to(x.device), torch.from_numpy(labels[:, 0]).to(x.device)


def release_torch_cache(device: torch.device) -> None:
    """Hand torch's cached, unused GPU blocks back to the driver, so that an allocator outside torch
    (faiss's cudaMalloc) finds them: torch keeps freed blocks for itself until told otherwise."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def make_assigner(backend: str, d: int, device: torch.device):
    return FaissAssigner(d, device) if backend == "faiss" else TorchAssigner(device)


# ---------------------------------------------------------------- initialisation


def init_quotas(counts: list[int], cap: int, k: int) -> list[int]:
    """Rows each rank offers to the init pool: min(n_r, cap), cap raised until the pool holds k."""
    cap = max(1, cap)
    if sum(min(n, cap) for n in counts) < k:
        lo, hi = cap, max(counts)  # the smallest cap whose pool holds k (exists: sum(counts) >= k)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if sum(min(n, mid) for n in counts) < k else (lo, mid)
        cap = lo
    return [min(n, cap) for n in counts]


def initial_centroids(x_local, k: int, seed: int, init_samples_per_rank: int, device: torch.device,
                      group=None) -> torch.Tensor:
    """k distinct rows drawn uniformly from a pool of bounded random subsets, one per rank.

    Rank r's subset is init_samples_per_rank random rows of its own (fewer if it has fewer; more
    only when the pool would otherwise hold fewer than k). The k pool positions are drawn by a
    generator seeded identically on every rank; each rank writes the rows it owns into a zero
    [k, d] buffer and one all_reduce assembles it: the same centroids everywhere, O(k d) memory
    and traffic, and no rank ever holds another rank's pool (an all_gather would cost W * pool * d).
    """
    world, me = comm.group_size(group), comm.group_rank(group)
    n_local, d = num_rows(x_local), int(x_local.shape[1])
    counts = torch.zeros(world, dtype=torch.int64)
    counts[me] = n_local
    counts = comm.all_reduce(counts, group).tolist()
    quotas = init_quotas(counts, init_samples_per_rank, k)
    offset = sum(quotas[:me])
    chosen = np.random.default_rng([seed, 7]).choice(sum(quotas), size=k, replace=False)
    slots = np.flatnonzero((chosen >= offset) & (chosen < offset + quotas[me]))
    centroids = torch.zeros(k, d, dtype=torch.float32, device=device)
    if len(slots):
        subset = np.random.default_rng([seed, 11, me]).choice(n_local, size=quotas[me], replace=False)
        rows = torch.from_numpy(subset[chosen[slots] - offset])
        centroids[torch.from_numpy(slots).to(device)] = take_rows(x_local, rows).to(device)
    return comm.all_reduce(centroids, group)  # x + 0 + ... + 0 == x exactly: identical everywhere


# ---------------------------------------------------------------- Lloyd


def split_empty_clusters(centroids: torch.Tensor, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Give every empty cluster half of a big one (faiss's rule), in place; returns how many.

    The cluster to split is drawn with probability proportional to (size - 1) and its centroid is
    copied with a small symmetric perturbation to both. `counts` (global sizes) is updated assuming
    an even split. Same counts + same generator state on every rank => the same result everywhere.
    """
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return 0
    d = centroids.shape[1]
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1
    for ci in empty:
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() == 0:  # every cluster has <= 1 row: fewer rows than clusters
            raise ValueError(f"cannot re-split empty cluster {ci}: {int(counts.sum())} rows for {len(counts)} clusters")
        cj = int(rng.choice(len(counts), p=weights / weights.sum()))
        base = centroids[cj].clone()
        centroids[ci] = base * (1 + SPLIT_EPS * sign)
        centroids[cj] = base * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def chunk_rows_for(d: int) -> int:
    """Rows of one E-step data chunk: DATA_CHUNK_ELEMENTS / d (the planner sizes its tiles with it)."""
    return max(1, DATA_CHUNK_ELEMENTS // max(1, d))


def message_elements(k: int, d: int, with_sums: bool, extra: int = 0) -> int:
    """float64 elements of one M-step message: [sums (k*d) | counts (k) | objective (1) | extra]."""
    return (k * d if with_sums else 0) + k + 1 + extra


def assigner_memory(backend: str, device_type: str, k: int, d: int, rows: int) -> dict:
    """What the E-step assigner holds while it searches a chunk of `rows` rows: {what: (place, bytes)}
    (place "device": the run's device, host memory on CPU runs)."""
    out = {"distances, labels": ("device", rows * (4 + 8))}
    if backend == "torch":
        block = min(rows, max(1, TORCH_BLOCK_ELEMENTS[device_type] // k))
        return {**out, "norms": ("device", k * 4), "distance block": ("device", block * (k + d + 3) * 4)}
    if device_type == "cuda":  # a faiss GPU flat index: its copy of the centroids and its scratch
        return {**out, "faiss index": ("device", k * d * 4), "faiss scratch": ("device", FAISS_GPU_TEMP_BYTES)}
    block = min(rows, FAISS_BLAS_QUERIES) * min(k, FAISS_BLAS_CENTROIDS) * 4
    return {**out, "faiss index": ("host", k * d * 4), "faiss block": ("host", block + (rows + k) * 4)}


def lloyd_memory(n: int, k: int, d: int, device_type: str, backend: str, rows_on_device: bool) -> dict:
    """One Lloyd iteration of kmeans() over n local rows, at its peak, beyond the rows themselves:
    centroids, labels, the float64 message and the float32 chunk sums, one chunk's E-step (and its
    copy when the rows are not on the device), the host copy of the initial centroids."""
    rows = min(chunk_rows_for(d), n)
    items = {"centroids": ("device", k * d * 4), "initial centroids": ("host", k * d * 4),
             "labels": ("device", n * 8), "message": ("device", message_elements(k, d, True, 1) * 8),
             "chunk sums": ("device", k * d * 4),
             "chunk ones, float64 distances": ("device", rows * 16),  # counts' index_add_, objective's sum
             **assigner_memory(backend, device_type, k, d, rows)}
    if not rows_on_device:
        items["chunk copy"] = ("device", rows * d * 4)
        if device_type == "cuda":
            items["pinned chunk"] = ("host", rows * d * 4)
    return items


def result_bytes(n: int, k: int, d: int) -> int:
    """Host bytes a KMeansResult keeps: final and initial centroids, the local labels."""
    return 2 * k * d * 4 + n * 8


def _pass(x_local, assigner, k: int, device: torch.device, chunk_rows: int, with_sums: bool, extra: int = 0):
    """One E-step over the local rows: labels, and the float64 message [sums | counts | objective |
    `extra` zeros] accumulated in place in one buffer (no concatenated copy of the k x d sums)."""
    d = int(x_local.shape[1])
    n_local = num_rows(x_local)
    labels = torch.empty(n_local, dtype=torch.int64, device=device)
    message = torch.zeros(message_elements(k, d, with_sums, extra), dtype=torch.float64, device=device)
    sums = message[: k * d].view(k, d) if with_sums else None
    partial = torch.zeros(k, d, dtype=torch.float32, device=device) if with_sums else None
    base = k * d if with_sums else 0
    counts, objective = message[base: base + k], message[base + k: base + k + 1]
    for start, chunk in row_chunks(x_local, chunk_rows, device):
        dists, idx = assigner.assign(chunk)
        idx = idx.to(device)
        labels[start:start + len(idx)] = idx  # on the device: no host sync per chunk
        objective += dists.to(device).sum(dtype=torch.float64)
        counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64, device=device))  # bincount syncs on CUDA
        if with_sums:
            # float32 sums per chunk (bounded rows), float64 across chunks and ranks
            partial.zero_().index_add_(0, idx, chunk)
            sums += partial
        del chunk, dists, idx  # before the next chunk is read: one chunk alive at a time
    return labels, message


def _update_centroids(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
    """centroids[c] := sums[c] / counts[c] for every non-empty c, in place (sums is overwritten):
    the same float64 division and float32 rounding as (sums[c] / counts[c]).float(), without the
    k x d temporaries of that expression (2.6 GB each at k/m = 80000, d = 4096)."""
    nonempty = counts > 0
    sums.div_(counts.clamp_min(1)[:, None])
    if not bool(nonempty.all()):
        sums[~nonempty] = centroids[~nonempty].double()  # empty clusters keep their centroid (exact)
    centroids.copy_(sums)


def m_step(centroids: torch.Tensor, message: torch.Tensor, k: int, seed: int, iteration: int) -> tuple[float, int]:
    """The M-step from the reduced message [sums (k x d), counts (k), objective]: centroids updated in
    place, empty clusters re-split the same way on every rank; returns (objective, clusters re-split)."""
    d = centroids.shape[1]
    sums, counts, objective = message[:k * d].view(k, d), message[k * d:k * d + k], float(message[k * d + k].item())
    counts_np = counts.cpu().numpy().astype(np.int64)
    _update_centroids(centroids, sums, counts)
    return objective, split_empty_clusters(centroids, counts_np, np.random.default_rng([seed, 13, iteration]))


def _global_count(x_local, group) -> int:
    return int(comm.all_reduce(torch.tensor([num_rows(x_local)], dtype=torch.int64), group).item())


def kmeans(x_local, k: int, niter: int, seed: int, device: torch.device, backend: str = "auto", group=None,
           init_samples_per_rank: int = 10000, log: Optional[Callable[..., None]] = None,
           init_centroids: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
           poll=NO_POLL) -> KMeansResult:
    """Collective over `group`. x_local: [n_local, d] tensor/ndarray/memmap (n_local may be 0),
    anywhere; the E-step and M-step run on `device`.

    `log(iteration=, objective=, seconds=)` is called after every iteration on every rank, with the
    global mean squared distance. `init_centroids` (identical on all ranks) replaces the seeded init.
    `poll` (preemption.UnevenLoopPoll over the world) is asked after every iteration: its flag rides
    on the M-step all_reduce when `group` is the world, else poll.now() polls; the caller finishes it.
    """
    if x_local.ndim != 2:
        raise ValueError(f"kmeans expects [n, d] rows, got shape {tuple(x_local.shape)}")
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got k={k}")
    n_total = _global_count(x_local, group)
    if k > n_total:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got n={n_total} over all ranks")
    d = int(x_local.shape[1])
    chunk_rows = chunk_rows or chunk_rows_for(d)
    if init_centroids is not None:
        if tuple(init_centroids.shape) != (k, d):
            raise ValueError(f"init_centroids has shape {tuple(init_centroids.shape)}, expected {(k, d)}")
        centroids = init_centroids.to(device=device, dtype=torch.float32).clone()
    else:
        centroids = initial_centroids(x_local, k, seed, init_samples_per_rank, device, group)
    init = centroids.to("cpu", copy=True)
    assigner = make_assigner(resolve_backend(backend, device), d, device)

    objective, seconds, empty_resplit = [], [], 0
    for it in range(niter if k > 1 else 0):  # k == 1: the centroid is the mean, no iteration
        start = time.perf_counter()
        assigner.set_centroids(centroids)
        vote = 1 if group is None else 0  # the preemption flag rides in a last slot of the world's message
        buf = _pass(x_local, assigner, k, device, chunk_rows, with_sums=True, extra=vote)[1]  # labels freed now
        if vote:
            buf[-1] = poll.vote()
        buf = comm.all_reduce(buf, group)
        if vote:
            poll.decide(float(buf[-1]))
            buf = buf[:-1]
        else:
            poll.now()
        obj, resplit = m_step(centroids, buf, k, seed, it)
        empty_resplit += resplit
        objective.append(obj)
        seconds.append(time.perf_counter() - start)
        if log is not None:
            log(iteration=it, objective=obj / n_total, seconds=seconds[-1])
    if k == 1:
        assigner.set_centroids(centroids)
        buf = _pass(x_local, assigner, 1, device, chunk_rows, with_sums=True)[1]
        buf = comm.all_reduce(buf, group)
        centroids = (buf[:d] / buf[d]).float().view(1, d)

    # bit-identical centroids everywhere, whatever the collectives' rounding did
    centroids = comm.broadcast(centroids.contiguous(), group)
    assigner.set_centroids(centroids)
    labels, buf = _pass(x_local, assigner, k, device, chunk_rows, with_sums=False)
    buf = comm.all_reduce(buf, group).cpu()
    return KMeansResult(centroids=centroids.cpu(), assign_local=labels.cpu(), objective=objective,
                        final_objective=float(buf[-1].item()), sizes=buf[:k].round().long(),
                        empty_resplit=empty_resplit, n_total=n_total, init_centroids=init,
                        iteration_seconds=seconds)
