"""Row access shared by the clustering modules: features may be a tensor (RAM or GPU), an ndarray or
a local-disk np.memmap; every stage reads them chunk by chunk, on the device it is given.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def num_rows(x) -> int:
    return int(x.shape[0])


def row_chunks(x, chunk_rows: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 chunk on `device`) over the rows of a tensor, ndarray or np.memmap.

    Only one chunk of a memmap is in RAM at a time; a tensor already on `device` in float32 is
    sliced without a copy. Host chunks go to a CUDA device from pinned memory, asynchronously.
    """
    n = num_rows(x)
    for start in range(0, n, max(1, chunk_rows)):
        stop = min(n, start + chunk_rows)
        chunk = x[start:stop]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        if device.type == "cuda" and chunk.device.type == "cpu":
            chunk = chunk.float().pin_memory().to(device, non_blocking=True)
        yield start, chunk.to(device=device, dtype=torch.float32)


def take_rows(x, index: torch.Tensor) -> torch.Tensor:
    """x[index] as a float32 tensor on x's own device, for tensors and (mem-mapped) ndarrays alike."""
    if isinstance(x, np.ndarray):
        idx = index.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))
    return x[index.to(x.device)].float()
