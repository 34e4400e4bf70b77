"""Every torch.distributed collective of the package goes through this module (and nothing else
calls one: tests/test_comm.py walks the source and fails on any other call site).

Why one module: gloo takes CPU tensors and NCCL takes CUDA tensors only. A CPU test cannot see a
CPU tensor handed to NCCL, so the rule is enforced by construction: every function here moves its
input to the group's device (`comm_device`) and returns the result on the device the caller asked
for (default: where the input was). Each also works without a process group (one process: tools,
notebooks, bench/kmeans.py's faiss comparison), where it is the identity. With a process group
they always run the collective, world size 1 included: a one-GPU run goes through NCCL exactly as a
64-GPU one does, which is what lets one lent GPU prove the NCCL path (tests/test_gpu.py).

    comm.all_reduce(t)                          # in place, sum; t may live anywhere
    pending = comm.all_reduce_async(t, group); ...; pending.wait()   # the same, started now
    recv, counts = comm.all_to_all_rows(rows, send_counts, group, out_device=cuda)
    y = comm.all_to_all_autograd(x, recv_splits, send_splits, group)   # gradients flow back
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX
MIN = dist.ReduceOp.MIN


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def group_src(group=None) -> int:
    """Global rank of the group's first member (torch's broadcast and gather take global ranks)."""
    if not initialized() or group is None:
        return 0
    return dist.get_global_rank(group, 0)


def comm_device(group=None) -> torch.device:
    """Where a tensor must live to go through `group`: NCCL wants CUDA, gloo wants CPU."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


# ---------------------------------------------------------------- in-place reductions


def all_reduce(tensor: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """In-place all_reduce (sum by default); returns `tensor`, on its own device, reduced."""
    if not initialized():
        return tensor
    buf = _on(tensor, comm_device(group))
    dist.all_reduce(buf, op=op or SUM, group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


class Pending:
    """A started all_reduce: `wait()` finishes it and returns the reduced tensor, on its own device.

    Under NCCL, wait() only orders the caller's CUDA stream after the reduce (no host sync); under
    gloo it blocks the host until the reduce is done."""

    def __init__(self, tensor: torch.Tensor, buf: torch.Tensor, work):
        self.tensor, self._buf, self._work = tensor, buf, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._buf is not self.tensor:
                self.tensor.copy_(self._buf)
        return self.tensor


def all_reduce_async(tensor: torch.Tensor, group=None, op=None) -> Pending:
    """Start an in-place all_reduce (sum by default) and return at once: the caller keeps working
    (the rest of backward) while it runs, and calls `.wait()` before reading `tensor`. The tensor
    must not be touched in between. Same device handling as `all_reduce`."""
    if not initialized():
        return Pending(tensor, tensor, None)
    buf = _on(tensor, comm_device(group))
    return Pending(tensor, buf, dist.all_reduce(buf, op=op or SUM, group=group, async_op=True))


def broadcast(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place broadcast from the group's first member."""
    if not initialized():
        return tensor
    buf = _on(tensor, comm_device(group))
    dist.broadcast(buf, src=group_src(group), group=group)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def all_reduce_autograd(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks with a backward that sums the gradients too (SyncBN statistics on CPU)."""
    if not initialized():
        return tensor
    device = tensor.device
    with warnings.catch_warnings():  # marked deprecated; its replacement has no gloo/CPU autograd
        warnings.simplefilter("ignore", FutureWarning)
        out = dist_autograd.all_reduce(_on(tensor, comm_device(group)), group=group or dist.group.WORLD)
    return _on(out, device)


# ---------------------------------------------------------------- all_to_all


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """[world * c] counts out -> [world * c] counts in (block j of c numbers goes to rank j).

    Returns a tensor on the input's device; reading it on the host (.tolist()) is the one sync a
    variable-size all_to_all needs."""
    if not initialized():
        return send_counts.clone()
    out = _on(send_counts.contiguous(), comm_device(group))
    recv = torch.empty_like(out)
    dist.all_to_all_single(recv, out, group=group)
    return _on(recv, send_counts.device)


def all_to_all_rows_known(rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                          group=None, out_device: Optional[torch.device] = None) -> torch.Tensor:
    """Block j of `rows` (send_counts[j] rows) goes to rank j; returns the received blocks, in
    source-rank order, on `out_device` (default: the input's device)."""
    out_device = out_device or rows.device
    if not initialized():
        return _on(rows, out_device)
    dev = comm_device(group)
    recv = torch.empty((sum(recv_counts),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=dev)
    dist.all_to_all_single(recv, _on(rows, dev).contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts), group=group)
    return _on(recv, out_device)


def all_to_all_rows(rows: torch.Tensor, send_counts: Sequence[int], group=None,
                    out_device: Optional[torch.device] = None) -> tuple[torch.Tensor, list[int]]:
    """Like all_to_all_rows_known, with the counts exchanged first; returns (rows, recv_counts)."""
    world = group_size(group)
    if len(send_counts) != world:
        raise ValueError(f"send_counts has {len(send_counts)} entries for a group of {world} ranks")
    recv_counts = exchange_counts(torch.tensor(list(send_counts), dtype=torch.int64), group).tolist()
    return all_to_all_rows_known(rows, send_counts, recv_counts, group, out_device), recv_counts


def all_to_all_autograd(rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                        group=None) -> torch.Tensor:
    """all_to_all_rows_known whose backward sends the gradients back along the same splits."""
    if not initialized():
        return rows
    device = rows.device
    dev = comm_device(group)
    recv = torch.empty((sum(recv_counts),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=dev)
    with warnings.catch_warnings():  # the autograd all_to_all is marked deprecated, still the one gloo runs
        warnings.simplefilter("ignore", FutureWarning)
        out = dist_autograd.all_to_all_single(recv, _on(rows, dev).contiguous(), list(recv_counts),
                                              list(send_counts), group=group or dist.group.WORLD)
    return _on(out, device)


# ---------------------------------------------------------------- gathers (evaluation, small metadata)


def all_gather_rows_count(n: int, group=None) -> list[int]:
    """Every rank's `n`, in rank order."""
    if not initialized():
        return [n]
    dev = comm_device(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(group_size(group))]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=dev), group=group)
    return [int(c.item()) for c in counts]


def gather(tensor: torch.Tensor, dst: int = 0, group=None) -> Optional[list[torch.Tensor]]:
    """Equal-shape tensors of every rank on `dst` (CPU tensors, rank order); None elsewhere."""
    if not initialized():
        return [tensor.cpu()]
    dev = comm_device(group)
    send = _on(tensor, dev).contiguous()
    bufs = [torch.empty_like(send) for _ in range(group_size(group))] if group_rank(group) == dst else None
    dist.gather(send, bufs, dst=dst, group=group)
    return None if bufs is None else [b.cpu() for b in bufs]


def all_gather_object(obj, group=None) -> list:
    """Small picklable objects (names, shapes) of every rank, in rank order."""
    if not initialized():
        return [obj]
    out = [None] * group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj, dst: int = 0, group=None) -> Optional[list]:
    if not initialized():
        return [obj]
    out = [None] * group_size(group) if group_rank(group) == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
