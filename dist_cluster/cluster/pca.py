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

from .. import comm
from ..preemption import NO_POLL
from .rows import num_rows, row_chunks

CHUNK_ELEMENTS = 2**24  # rows per chunk = this / D: bounds the float64 copy of a chunk (128 MiB)


ABS_FLOOR = 1e-30


def _chunk_rows(d: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(1, d))


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
            y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if isinstance(out, np.ndarray):
                out[start:start + len(y)] = y.cpu().numpy()
            else:
                out[start:start + len(y)] = y.to(out.device)
            poll.step()
        poll.finish()
        return out

    def state_dict(self) -> dict:
        return {"mean": self.mean.numpy(), "projection": self.projection.numpy(),
                "eigenvalues": self.eigenvalues.numpy()}


def _moments(x_local, chunk_rows: Optional[int], device: torch.device, poll) -> torch.Tensor:
    """This rank's [D*D + D + 1] float64 buffer: sum of x x^T, sum of x, row count."""
    d = int(x_local.shape[1])
    outer = torch.zeros(d, d, dtype=torch.float64, device=device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for _, chunk in row_chunks(x_local, _chunk_rows(d, chunk_rows), device):
        c64 = chunk.double()
        outer.addmm_(c64.T, c64)
        total += c64.sum(0)
        poll.step()
    poll.finish()  # every rank leaves its (uneven) loop before the all_reduce below
    count = torch.tensor([float(num_rows(x_local))], dtype=torch.float64, device=device)
    return torch.cat([outer.flatten(), total, count])


def _sign_fix(vectors: torch.Tensor) -> torch.Tensor:
    """Make each eigenvector's largest-magnitude entry positive: the same PCA gives the same output."""
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


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
    buf = comm.all_reduce(_moments(x_local, chunk_rows, device, poll), group).cpu()
    count = int(buf[-1].item())
    if count < 2:
        raise ValueError(f"PCA needs at least 2 rows over all ranks, got {count}")
    # eigh once, on the first rank of the group; everyone else receives the result, so all ranks
    # hold bit-identical mean and projection (params: projection, mean, eigenvalues, floored, kept)
    params = torch.zeros(d * dim + d + 2 * dim + 1, dtype=torch.float64)
    if comm.group_rank(group) == 0:
        outer, total = buf[: d * d].view(d, d), buf[d * d: d * d + d]
        mean = total / count
        cov = (outer - torch.outer(total, mean)) / (count - 1)
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0), _sign_fix(vectors.flip(1))
        top = values[:dim]
        # the absolute floor keeps 1/sqrt(floor) finite in float32 when the features have no variance
        floor = max(eps * float(values[0]), ABS_FLOOR)
        projection = vectors[:, :dim] / top.clamp_min(floor).sqrt()
        kept = float(top.clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-300))
        params = torch.cat([projection.flatten(), mean, top, (top < floor).double(),
                            torch.tensor([kept], dtype=torch.float64)])
    comm.broadcast(params, group)
    fields = params.split([d * dim, d, dim, dim, 1])
    projection, mean, eigenvalues = fields[0].view(d, dim).clone(), fields[1].clone(), fields[2].clone()
    n_floored, kept = int(fields[3].sum().item()), float(fields[4].item())
    return PCAWhitening(mean=mean, projection=projection, eigenvalues=eigenvalues,
                        n_floored=n_floored, explained_variance=kept, count=count)
