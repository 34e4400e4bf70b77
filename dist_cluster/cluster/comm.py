"""Small helpers shared by the clustering modules: collectives that also work without a process
group (one process, e.g. a notebook or the faiss comparison in bench/kmeans.py), the device that
collectives need (CPU for gloo, CUDA for NCCL), and row-chunk iteration over tensors or memmaps.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def group_src(group=None) -> int:
    """Global rank of the group's first member (torch's broadcast takes global ranks)."""
    if not initialized() or group is None:
        return 0
    return dist.get_global_rank(group, 0)


def comm_device(group=None) -> torch.device:
    """Where a tensor must live to go through `group`: NCCL wants CUDA, gloo wants CPU."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """In-place all_reduce (sum by default) through the group's device; returns a tensor on the input's device."""
    if group_size(group) == 1:
        return tensor
    dev = comm_device(group)
    buf = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place broadcast from the group's first member."""
    if group_size(group) == 1:
        return tensor
    dev = comm_device(group)
    buf = tensor if tensor.device == dev else tensor.to(dev)
    dist.broadcast(buf, src=group_src(group), group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_to_all_rows(rows: torch.Tensor, send_counts: Sequence[int], group=None) -> tuple[torch.Tensor, list[int]]:
    """Exchange variable-size row blocks: block j of `rows` (send_counts[j] rows) goes to rank j.

    Counts are exchanged first so every receiver can size its buffer. Returns (received rows, in
    source-rank order, on the input's device; recv_counts).
    """
    world = group_size(group)
    if len(send_counts) != world:
        raise ValueError(f"send_counts has {len(send_counts)} entries for a group of {world} ranks")
    if world == 1:
        return rows, list(send_counts)
    dev = comm_device(group)
    counts_out = torch.tensor(list(send_counts), dtype=torch.int64, device=dev)
    counts_in = torch.empty_like(counts_out)
    dist.all_to_all_single(counts_in, counts_out, group=group)
    recv_counts = counts_in.tolist()
    send = rows.to(dev).contiguous()
    recv = torch.empty((sum(recv_counts),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=dev)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts,
                           input_split_sizes=list(send_counts), group=group)
    return recv.to(rows.device), recv_counts


def all_to_all_rows_known(rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                          group=None) -> torch.Tensor:
    """Same as all_to_all_rows when both sides already know the counts (the return trip)."""
    if group_size(group) == 1:
        return rows
    dev = comm_device(group)
    recv = torch.empty((sum(recv_counts),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=dev)
    dist.all_to_all_single(recv, rows.to(dev).contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts), group=group)
    return recv.to(rows.device)


def barrier(group=None) -> None:
    if group_size(group) > 1:
        dist.barrier(group=group)


# ---------------------------------------------------------------- rows


def num_rows(x) -> int:
    return int(x.shape[0])


def row_chunks(x, chunk_rows: int, device: Optional[torch.device] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 tensor chunk) over the rows of a tensor, ndarray or np.memmap.

    Only one chunk of a memmap is in RAM at a time; tensors are sliced without a copy unless a
    device or dtype change is needed.
    """
    n = num_rows(x)
    for start in range(0, n, max(1, chunk_rows)):
        stop = min(n, start + chunk_rows)
        chunk = x[start:stop]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        chunk = chunk.to(device=device or chunk.device, dtype=torch.float32)
        yield start, chunk


def take_rows(x, index: torch.Tensor) -> torch.Tensor:
    """x[index] as a float32 tensor, for tensors and (mem-mapped) ndarrays alike."""
    if isinstance(x, np.ndarray):
        idx = index.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))
    return x[index.to(x.device)].float()


def data_device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
