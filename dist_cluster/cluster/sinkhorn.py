"""Balanced clustering: Lloyd iterations whose assignment step is Sinkhorn-Knopp's equipartition
(SeLa: Asano, Rupprecht, Vedaldi, ICLR 2020; the prototypes' assignment of SwAV), sharded like
kmeans.py: each rank keeps its rows, only k-sized vectors and the k x d M-step cross the network.

    res = sinkhorn_kmeans(x_local, k=1000, niter=20, seed=0, device=dev, epsilon=0.05, iters=3)

Assignment (per Lloyd iteration): scores S_ij = <x_i, c_j> / |c_j| / epsilon (the rows are PCA-whitened
and L2-normalised by cluster/pca.py, the centroids normalised: cosines). With P = exp(S), SeLa's
Sinkhorn-Knopp scales P to Q = diag(a) P diag(b) with row sums 1/N and column sums 1/k:
    a = (1/N) ./ (P b)  (local to each row)      b = (1/k) ./ (P^T a)  (a sum over every rank's rows)
`iters` times from b = 1, in the log domain; each iteration is one pass over the local rows in
chunks (no rank holds an N x k matrix) and two all_reduces of k numbers (the column log-sum-exp:
maxima, then sums rescaled to them). Labels: argmax_j S_ij + log b_j (the row scale a_i does not
move a row's argmax). M-step: the mean of each cluster's rows (one all_reduce, as kmeans.py), empty
clusters re-split as there. Returned as a KMeansResult, so it drops in wherever kmeans() is called,
both levels of the hierarchy included; the objective reported is k-means' (sum of squared distances
to the assigned centroid), so the two are comparable.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from dist_cluster.cluster.kmeans import (TORCH_BLOCK_ELEMENTS, KMeansResult, _global_count, chunk_rows_for,
                                         initial_centroids, m_step, message_elements)
from dist_cluster.cluster.rows import num_rows, row_chunks
from dist_cluster.runtime import comm
from dist_cluster.runtime.preemption import NO_POLL


def score_rows(k: int, d: int, device_type: str) -> int:
    """Rows of one chunk: its [rows, k] float64 scores stay within half of kmeans' distance block."""
    return max(1, min(chunk_rows_for(d), TORCH_BLOCK_ELEMENTS[device_type] // (2 * k)))


def sinkhorn_memory(n: int, k: int, d: int, device_type: str, rows_on_device: bool) -> dict:
    """One Lloyd iteration of sinkhorn_kmeans() over n local rows at its peak, beyond the rows:
    {what: (place, bytes)} as kmeans.lloyd_memory (plan/memory.py adds it up)."""
    rows = min(score_rows(k, d, device_type), n)
    items = {"centroids": ("device", k * d * 4), "initial centroids": ("host", k * d * 4),
             "unit centroids": ("device", k * d * 8), "labels": ("device", n * 8),
             "message": ("device", message_elements(k, d, True) * 8), "chunk sums": ("device", k * d * 4),
             "scores, exp": ("device", 2 * rows * k * 8), "column statistics": ("device", 4 * k * 8),
             "chunk in float64 (then its residuals)": ("device", rows * d * 8)}
    if not rows_on_device:
        items["chunk copy"] = ("device", rows * d * 4)
    return items


def messages_per_iteration(k: int, d: int, iters: int) -> list[int]:
    """float64 elements of each all_reduce of one Lloyd iteration (two of k per Sinkhorn iteration)."""
    return [k] * (2 * iters) + [message_elements(k, d, True)]


def _scores(chunk: torch.Tensor, unit: torch.Tensor, epsilon: float) -> torch.Tensor:
    return (chunk.double() @ unit.T) / epsilon


def _row_log_scale(scores: torch.Tensor, log_b: torch.Tensor, log_n: float) -> torch.Tensor:
    """log a_i = -log N - logsumexp_j (S_ij + log b_j)."""
    return -log_n - torch.logsumexp(scores + log_b, dim=1)


def sinkhorn_scaling(x_local, centroids: torch.Tensor, epsilon: float, iters: int, device: torch.device,
                     group=None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """log b [k] (float64, identical on every rank) after `iters` Sinkhorn-Knopp iterations. Collective."""
    k, d = centroids.shape
    n_total = _global_count(x_local, group)
    unit = torch.nn.functional.normalize(centroids.double(), dim=1).to(device)
    log_b = torch.zeros(k, dtype=torch.float64, device=device)
    log_n, log_k = math.log(n_total), math.log(k)
    chunk_rows = chunk_rows or score_rows(k, d, device.type)
    for _ in range(iters):
        col_max = torch.full((k,), -math.inf, dtype=torch.float64, device=device)
        col_sum = torch.zeros(k, dtype=torch.float64, device=device)
        for _, chunk in row_chunks(x_local, chunk_rows, device):
            z = _scores(chunk, unit, epsilon)
            z += _row_log_scale(z, log_b, log_n)[:, None]  # S_ij + log a_i
            new_max = torch.maximum(col_max, z.max(dim=0).values)
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(z - new_max).sum(dim=0)
            col_max = new_max
        global_max = comm.all_reduce(col_max.clone(), group, op=comm.MAX)
        empty = torch.isinf(col_max)  # a rank without rows adds nothing
        col_sum = torch.where(empty, torch.zeros_like(col_sum), col_sum * torch.exp(col_max - global_max))
        col_sum = comm.all_reduce(col_sum, group)
        log_b = -log_k - (global_max + torch.log(col_sum))  # b = (1/k) ./ (P^T a)
    return comm.broadcast(log_b.contiguous(), group)


def _assign_pass(x_local, centroids: torch.Tensor, log_b: torch.Tensor, epsilon: float, device, chunk_rows: int,
                 with_sums: bool):
    """labels = argmax_j S_ij + log b_j; the float64 message [sums (k*d) | counts (k) | squared distances]."""
    k, d = centroids.shape
    unit = torch.nn.functional.normalize(centroids.double(), dim=1).to(device)
    labels = torch.empty(num_rows(x_local), dtype=torch.int64, device=device)
    message = torch.zeros(message_elements(k, d, with_sums), dtype=torch.float64, device=device)
    sums = message[:k * d].view(k, d) if with_sums else None
    partial = torch.zeros(k, d, dtype=torch.float32, device=device) if with_sums else None
    base = k * d if with_sums else 0
    counts, objective = message[base:base + k], message[base + k:]
    for start, chunk in row_chunks(x_local, chunk_rows, device):
        idx = (_scores(chunk, unit, epsilon) + log_b).argmax(dim=1)
        labels[start:start + len(idx)] = idx
        objective += (chunk - centroids[idx]).square().sum(dim=1).sum(dtype=torch.float64)
        counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64, device=device))
        if with_sums:  # float32 sums per chunk (bounded rows), float64 across chunks and ranks (kmeans.py)
            partial.zero_().index_add_(0, idx, chunk)
            sums += partial
    return labels, message


def sinkhorn_kmeans(x_local, k: int, niter: int, seed: int, device: torch.device, backend: str = "auto", group=None,
                    init_samples_per_rank: int = 10000, log: Optional[Callable[..., None]] = None,
                    init_centroids: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                    poll=NO_POLL, epsilon: float = 0.05, iters: int = 3) -> KMeansResult:
    """kmeans()'s signature and result with balanced assignments (module doc). Collective over `group`;
    `backend` is accepted for that signature (the scores are a torch matmul)."""
    if x_local.ndim != 2:
        raise ValueError(f"sinkhorn k-means expects [n, d] rows, got shape {tuple(x_local.shape)}")
    n_total = _global_count(x_local, group)
    if not 1 <= k <= n_total:
        raise ValueError(f"sinkhorn k-means with k={k} clusters needs 1 <= k <= n={n_total}")
    if epsilon <= 0 or iters < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iters >= 1, got {epsilon}, {iters}")
    d = int(x_local.shape[1])
    chunk_rows = chunk_rows or score_rows(k, d, device.type)
    centroids = (init_centroids.to(device=device, dtype=torch.float32).clone() if init_centroids is not None
                 else initial_centroids(x_local, k, seed, init_samples_per_rank, device, group))
    init = centroids.to("cpu", copy=True)
    objective, seconds, empty_resplit = [], [], 0
    for it in range(niter if k > 1 else 0):
        start = time.perf_counter()
        log_b = sinkhorn_scaling(x_local, centroids, epsilon, iters, device, group, chunk_rows)
        message = comm.all_reduce(_assign_pass(x_local, centroids, log_b, epsilon, device, chunk_rows, True)[1],
                                  group)
        poll.now()
        obj, resplit = m_step(centroids, message, k, seed, it)
        empty_resplit += resplit
        objective.append(obj)
        seconds.append(time.perf_counter() - start)
        if log is not None:
            log(iteration=it, objective=obj / n_total, seconds=seconds[-1])
    centroids = comm.broadcast(centroids.contiguous(), group)
    log_b = sinkhorn_scaling(x_local, centroids, epsilon, iters, device, group, chunk_rows)
    labels, message = _assign_pass(x_local, centroids, log_b, epsilon, device, chunk_rows, False)
    message = comm.all_reduce(message, group).cpu()
    return KMeansResult(centroids=centroids.cpu(), assign_local=labels.cpu(), objective=objective,
                        final_objective=float(message[k].item()), sizes=message[:k].round().long(),
                        empty_resplit=empty_resplit, n_total=n_total, init_centroids=init,
                        iteration_seconds=seconds)
