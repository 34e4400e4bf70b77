"""PCA-whitening fitted over all ranks without gathering features anywhere.

    pca = fit_pca(features_local, dim=256, eps=1e-5, device=dev)   # collective: every rank calls it
    x = pca.apply(features_local, device=dev)          # [n_local, 256] float32, rows L2-normalised

Each rank accumulates (sum of rows, sum of outer products, count) in float64; one all_reduce of
D*D + D + 1 numbers gives the global covariance (the original code gathered every feature on
rank 0 instead). The eigendecomposition runs once, on the group's first rank, and the resulting
mean and projection are broadcast, so every rank holds bit-identical matrices whatever its LAPACK
threading does. Features may live anywhere (RAM, a local memmap, the GPU): chunks stream to the
`device` the caller names, never one inferred from where the data happens to be.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dist_cluster.cluster.rows import num_rows, row_chunks
from dist_cluster.runtime import comm
from dist_cluster.runtime.preemption import NO_POLL

CHUNK_ELEMENTS = 2**24  # rows per chunk = this / D: bounds the float64 copy of a chunk (128 MiB)


ABS_FLOOR = 1e-30


def _chunk_rows(d: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(1, d))


# ---------------------------------------------------------------- sizes (the planner's memory model)
# Each returns {what: (place, bytes)} at the peak of one phase, beyond the input rows; place is
# "device" (the run's device: host memory on CPU runs) or "host". plan/memory.py adds them up.
EIGH_MATRICES = 4  # covariance, eigenvectors, and LAPACK syevd's workspace (lwork = 1 + 6D + 2D^2)


def moments_elements(d: int) -> int:
    """float64 elements of the moments message: D*D outer products, D sums, the row count."""
    return d * d + d + 1


def params_elements(d: int, dim: int) -> int:
    """float64 elements of the broadcast result: projection, mean, eigenvalues, floored, kept."""
    return d * dim + d + 2 * dim + 1


def _chunk_items(n: int, d: int, device_type: str, rows_on_device: bool) -> dict:
    """A chunk of rows read from elsewhere: its copy on the device, pinned on the way to a GPU."""
    rows = min(_chunk_rows(d, None), n)
    if rows_on_device:
        return {}
    items = {"chunk copy": ("device", rows * d * 4)}
    if device_type == "cuda":
        items["pinned chunk"] = ("host", rows * d * 4)
    return items


def fit_memory(n: int, d: int, dim: int, device_type: str, rows_on_device: bool) -> list[dict]:
    """fit_pca's two phases: the moments (message and a float64 chunk on the device), then on the
    group's first rank the eigendecomposition on the host (the message's host copy, on GPU runs,
    is freed once the covariance holds it)."""
    rows = min(_chunk_rows(d, None), n)
    moments = {"moments": ("device", moments_elements(d) * 8), "chunk float64": ("device", rows * d * 8),
               **_chunk_items(n, d, device_type, rows_on_device)}
    eigh = {"eigh": ("host", EIGH_MATRICES * d * d * 8), "params": ("host", params_elements(d, dim) * 8)}
    return [moments, eigh]


def apply_memory(n: int, d: int, dim: int, device_type: str, rows_on_device: bool, out_on_device: bool) -> dict:
    """PCAWhitening.apply per chunk: float32 mean and projection, the centred chunk and its
    whitened rows on the device (+ their host copy when they are written to host memory)."""
    rows = min(_chunk_rows(d, None), n)
    items = {"mean, projection": ("device", (d + d * dim) * 4), "centred chunk": ("device", rows * d * 4),
             "whitened chunk": ("device", rows * dim * 4), **_chunk_items(n, d, device_type, rows_on_device)}
    if device_type == "cuda" and not out_on_device:
        items["whitened chunk copy"] = ("host", rows * dim * 4)
    return items


@dataclass
class PCAWhitening:
    mean: torch.Tensor  # [D] float64, CPU
    projection: torch.Tensor  # [D, dim] float64, CPU: eigenvectors / sqrt(floored eigenvalues)
    eigenvalues: torch.Tensor  # [dim] float64, before the floor (descending)
    n_floored: int  # components whose eigenvalue was raised to the floor
    explained_variance: float  # fraction of the total variance kept by the dim components
    count: int  # global number of rows the fit saw

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, x, device: torch.device, out=None, chunk_rows: Optional[int] = None, poll=NO_POLL):
        """Whitened, L2-normalised float32 rows of x (tensor, ndarray or memmap), computed on `device`
        chunk by chunk.

        Returns `out` when given (an ndarray/memmap or tensor [n, dim] to fill, e.g. a memmap on local
        disk when the result does not fit in RAM); else a new tensor on `device`. `poll`
        (preemption.UnevenLoopPoll) is stepped per chunk and finished at the end: collective.
        """
        n = num_rows(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"PCA was fitted on {self.mean.shape[0]}-dim features, got {x.shape[1]}")
        if out is None:
            out = torch.empty(n, self.dim, dtype=torch.float32, device=device)
        elif tuple(out.shape) != (n, self.dim):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, self.dim)}")
        mean = self.mean.to(device=device, dtype=torch.float32)
        proj = self.projection.to(device=device, dtype=torch.float32)
        for start, chunk in row_chunks(x, _chunk_rows(x.shape[1], chunk_rows), device):
            y = (chunk - mean) @ proj
            # a zero row (all features equal to the mean) stays zero instead of becoming NaN
            y.div_(y.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if isinstance(out, np.ndarray):
                out[start:start + len(y)] = y.cpu().numpy()
            else:
                out[start:start + len(y)] = y.to(out.device)
            del chunk, y  # before the next chunk is read: one chunk alive at a time
            poll.step()
        poll.finish()
        return out

    def state_dict(self) -> dict:
        return {"mean": self.mean.numpy(), "projection": self.projection.numpy(),
                "eigenvalues": self.eigenvalues.numpy()}


def _moments(x_local, chunk_rows: Optional[int], device: torch.device, poll) -> torch.Tensor:
    """This rank's [D*D + D + 1] float64 buffer: sum of x x^T, sum of x, row count, accumulated in
    place (the message itself: no concatenated copy of the D x D sums)."""
    d = int(x_local.shape[1])
    buf = torch.zeros(moments_elements(d), dtype=torch.float64, device=device)
    outer, total = buf[: d * d].view(d, d), buf[d * d: d * d + d]
    for _, chunk in row_chunks(x_local, _chunk_rows(d, chunk_rows), device):
        c64 = chunk.double()
        outer.addmm_(c64.T, c64)
        total += c64.sum(0)
        del chunk, c64  # before the next chunk is read: one chunk alive at a time
        poll.step()
    poll.finish()  # every rank leaves its (uneven) loop before the all_reduce below
    buf[-1] = float(num_rows(x_local))
    return buf


def _reduced_covariance(x_local, chunk_rows, device: torch.device, group, poll):
    """(global count, symmetrised covariance [D, D] float64, mean [D]) on the group's first rank,
    (count, None, None) elsewhere. The reduced moments are dropped as soon as the covariance is
    formed from them, so the first rank's host peak is eigh's (fit_memory)."""
    d = int(x_local.shape[1])
    buf = comm.all_reduce(_moments(x_local, chunk_rows, device, poll), group).cpu()
    count = int(buf[-1].item())
    if count < 2 or comm.group_rank(group) != 0:
        return count, None, None
    total = buf[d * d: d * d + d].clone()
    mean = total / count
    cov = torch.outer(total, mean)
    torch.sub(buf[: d * d].view(d, d), cov, out=cov)  # = outer - total mean^T, in cov's memory
    del buf
    cov.div_(count - 1)
    cov = cov + cov.T  # exact symmetry for eigh (the unsymmetrised one is freed here)
    cov.div_(2)
    return count, cov, mean


def _sign_fix(vectors: torch.Tensor) -> torch.Tensor:
    """Make each eigenvector's largest-magnitude entry positive, in place: the same PCA gives the same output."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors.mul_(signs)


def _whitening_params(cov: torch.Tensor, mean: torch.Tensor, dim: int, eps: float, params: torch.Tensor) -> None:
    """Fill params = [projection (D*dim) | mean (D) | eigenvalues (dim) | floored (dim) | kept (1)]."""
    d = len(mean)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    _sign_fix(vectors)
    top = values[:dim]
    # the absolute floor keeps 1/sqrt(floor) finite in float32 when the features have no variance
    floor = max(eps * float(values[0]), ABS_FLOOR)
    projection, rest = params[: d * dim].view(d, dim), params[d * dim:]
    torch.div(vectors[:, :dim], top.clamp_min(floor).sqrt(), out=projection)
    kept = float(top.clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-300))
    rest.copy_(torch.cat([mean, top, (top < floor).double(), torch.tensor([kept], dtype=torch.float64)]))


def fit_pca(x_local, dim: int, eps: float, device: torch.device, group=None, chunk_rows: Optional[int] = None,
            poll=NO_POLL) -> PCAWhitening:
    """Collective over `group`: global mean and covariance, top-`dim` whitening, moments on `device`.

    Eigenvalues below `eps` * (largest eigenvalue) are raised to that floor, so near-degenerate
    directions are not blown up into noise. A rank with 0 rows passes an empty [0, D] array.
    `poll` (preemption.UnevenLoopPoll over the world) is stepped per chunk of the moments.
    """
    if x_local.ndim != 2:
        raise ValueError(f"fit_pca expects [n, D] features, got shape {tuple(x_local.shape)}")
    d = int(x_local.shape[1])
    if not 1 <= dim <= d:
        raise ValueError(f"PCA dim={dim} must be in [1, D={d}] (the feature dimension)")
    count, cov, mean = _reduced_covariance(x_local, chunk_rows, device, group, poll)
    if count < 2:
        raise ValueError(f"PCA needs at least 2 rows over all ranks, got {count}")
    # eigh once, on the first rank of the group; everyone else receives the result, so all ranks
    # hold bit-identical mean and projection (params: projection, mean, eigenvalues, floored, kept)
    params = torch.zeros(params_elements(d, dim), dtype=torch.float64)
    if cov is not None:
        _whitening_params(cov, mean, dim, eps, params)
        del cov
    comm.broadcast(params, group)
    fields = params.split([d * dim, d, dim, dim, 1])  # views: the whitening keeps this one buffer
    return PCAWhitening(mean=fields[1], projection=fields[0].view(d, dim), eigenvalues=fields[2],
                        n_floored=int(fields[3].sum().item()), explained_variance=float(fields[4].item()),
                        count=count)
