"""ROUTE and RETURN of hierarchical k-means with bounded buffers.

    plan = RoutePlan(super_local, owners, m)              # collective: one count exchange, one max
    recv = plan.send_rows(x_local, device, chunk_bytes)   # [n_recv, d] on device, sorted by super
    recv[plan.bounds[s]:plan.bounds[s + 1]]               # the rows of super-cluster s: a view
    sub_local = plan.return_labels(recv_sub)              # labels back, in this rank's row order

Each row goes to a member of the group owning its super-cluster (`route_destinations`). Every rank
learns from one exchange of its [W, m] counts how many rows of each super-cluster it receives from
each source, so the receive buffer is allocated once, on the run's device, ordered by super-cluster
(then source, then the source's order): level 2 works on contiguous slices, never on copies.

The rows travel in rounds: in round t, each source sends to each destination the next `per_pair`
rows of their block. `per_pair` is global (every rank derives the same split sizes from the counts
alone) and chosen so that one round sends, and receives, at most about `chunk_bytes`: the features
are never copied whole into a send buffer, nor staged whole on the GPU for NCCL.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from dist_cluster.cluster.rows import take_rows
from dist_cluster.runtime import comm

ROW_DTYPE = torch.float32  # routed rows, in the receive buffer and in flight
# int64 tensors of n entries alive at once while RoutePlan sorts the rows by destination
# (route_destinations: order, s_sorted, pos, member and the temporaries of one expression)
PLAN_INT64_PER_ROW = 6


def buffer_bytes(n_recv: int, d: int) -> int:
    """Bytes of the receive buffer send_rows allocates (receive_buffer): n_recv rows of d float32."""
    return n_recv * d * ROW_DTYPE.itemsize


def receive_buffer(n_recv: int, d: int, device: torch.device) -> torch.Tensor:
    """The [n_recv, d] buffer the routed rows land in, on the run's device: buffer_bytes(n_recv, d)."""
    return torch.empty(n_recv, d, dtype=ROW_DTYPE, device=device)


def rows_per_round(d: int, chunk_bytes: int) -> int:
    """Rows one routing round sends (and receives) at most per rank: chunk_bytes of rows."""
    return max(1, chunk_bytes // max(1, d * ROW_DTYPE.itemsize))


def round_bytes(n: int, n_recv: int, d: int, chunk_bytes: int, world: int) -> tuple[int, int]:
    """(send, receive) bytes of the largest routing round of a rank that sends n rows and receives
    n_recv: the gathered rows it sends and the block it receives, each at most chunk_bytes of rows
    (or one row per peer, when chunk_bytes holds fewer: RoutePlan._per_pair)."""
    per_round = max(rows_per_round(d, chunk_bytes), world)
    return buffer_bytes(min(n, per_round), d), buffer_bytes(min(n_recv, per_round), d)


def round_items(send: int, got: int, eager: bool) -> dict:
    """What a routing round adds to the receive buffer at its peak: {what: (place, bytes)}.
    eager (a GPU): the buffer is allocated whole, and a round's sent and received rows coexist.
    Else (host memory, mapped lazily): the buffer's pages are backed as rows land in them, so at the
    last round the buffer lacks that round's rows: the buffer plus the larger of the two."""
    if eager:
        return {"round sent": ("device", send), "round received": ("device", got)}
    return {"round in flight": ("device", max(send, got))}


def index_bytes(n: int, n_recv: int) -> tuple[int, int]:
    """(peak while planning, kept after) bytes of RoutePlan's int64 indexes: the sort by
    destination, or `order` and the key (n each) with the arrival index built from its parts
    (n_recv twice); kept: `order` and the arrival index, which send_rows and return_labels use."""
    return 8 * max(PLAN_INT64_PER_ROW * n, 2 * n + 2 * n_recv), 8 * (n + n_recv)


def route_destinations(super_local: torch.Tensor, owners: Sequence[Sequence[int]], rank: int) -> torch.Tensor:
    """Destination rank of every local row: a member of its super-cluster's group, round-robin
    (starting at an offset equal to the sender's rank, so the members get near-equal shares)."""
    n = len(super_local)
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    width = max(len(o) for o in owners)
    members = torch.tensor([list(o) + [o[0]] * (width - len(o)) for o in owners], dtype=torch.int64)
    group_len = torch.tensor([len(o) for o in owners], dtype=torch.int64)
    order = torch.argsort(super_local, stable=True)
    s_sorted = super_local[order]
    pos = torch.arange(n) - torch.searchsorted(s_sorted, s_sorted, side="left")  # rank within its super
    member = (pos + rank) % group_len[s_sorted]
    dest = torch.empty(n, dtype=torch.int64)
    dest[order] = members[s_sorted, member]
    return dest


class RoutePlan:
    """Who sends which rows where, from the level-1 labels; see the module docstring."""

    def __init__(self, super_local: torch.Tensor, owners: Sequence[Sequence[int]], m: int):
        self.world, self.rank, self.m = comm.group_size(), comm.group_rank(), m
        super_local = super_local.cpu()
        key = route_destinations(super_local, owners, self.rank) * m + super_local
        self.order = torch.argsort(key, stable=True)  # local rows by (destination, super)
        self.send = torch.bincount(key, minlength=self.world * m).view(self.world, m)
        self.recv = comm.exchange_counts(self.send.flatten()).view(self.world, m)  # [source, super]
        self.send_total, self.recv_total = self.send.sum(1), self.recv.sum(1)
        per_super = self.recv.sum(0)
        self.bounds = [0] + torch.cumsum(per_super, 0).tolist()  # buffer rows of super s: bounds[s]..[s+1]
        self.index = self._arrival_index()

    def _arrival_index(self) -> torch.Tensor:
        """Buffer position of each received row, in arrival order (source-major, then the source's
        own order, which is sorted by super-cluster)."""
        parts = []
        before_source = torch.cumsum(self.recv, 0) - self.recv  # rows of super s from sources < j
        for j in range(self.world):
            for s in range(self.m):
                count = int(self.recv[j, s])
                start = self.bounds[s] + int(before_source[j, s])
                parts.append(torch.arange(start, start + count, dtype=torch.int64))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _per_pair(self, d: int, chunk_bytes: int) -> tuple[int, int]:
        """(rows per (source, destination) pair per round, rounds): the same on every rank."""
        stats = torch.tensor([int(self.send_total.max()), int((self.send_total > 0).sum()),
                              int((self.recv_total > 0).sum())])
        largest_pair, fan_out, fan_in = comm.all_reduce(stats, op=comm.MAX).tolist()
        per_pair = max(1, rows_per_round(d, chunk_bytes) // max(1, fan_out, fan_in))
        return per_pair, math.ceil(largest_pair / per_pair) if largest_pair else 0

    def send_rows(self, x_local, device: torch.device, chunk_bytes: int) -> torch.Tensor:
        """Route the rows of x_local (tensor, ndarray or memmap, anywhere) into a [n_recv, d] float32
        buffer on `device`, ordered by super-cluster. Collective."""
        d = int(x_local.shape[1])
        out = receive_buffer(int(self.recv_total.sum()), d, device)
        per_pair, rounds = self._per_pair(d, chunk_bytes)
        send_start = (torch.cumsum(self.send_total, 0) - self.send_total).tolist()  # dest j's block in `order`
        recv_start = (torch.cumsum(self.recv_total, 0) - self.recv_total).tolist()  # source j's in `index`
        for t in range(rounds):
            lo = t * per_pair
            send_splits = (self.send_total - lo).clamp(0, per_pair).tolist()
            recv_splits = (self.recv_total - lo).clamp(0, per_pair).tolist()
            rows = torch.cat([self.order[send_start[j] + lo: send_start[j] + lo + send_splits[j]]
                              for j in range(self.world)])
            got = comm.all_to_all_rows_known(take_rows(x_local, rows), send_splits, recv_splits,
                                             out_device=device)
            where = torch.cat([self.index[recv_start[j] + lo: recv_start[j] + lo + recv_splits[j]]
                               for j in range(self.world)])
            out.index_copy_(0, where.to(device), got)
            del rows, got, where  # before the next round: one round's rows alive at a time (round_items)
        return out

    def return_labels(self, recv_labels: torch.Tensor) -> torch.Tensor:
        """Labels of the routed rows (buffer order) back to their sources: [n_local] in the local
        rows' order. Collective (one exchange of n_local int64s: 1/d of the features' traffic)."""
        back = comm.all_to_all_rows_known(recv_labels.cpu()[self.index], self.recv_total.tolist(),
                                          self.send_total.tolist())
        labels = torch.empty(len(self.order), dtype=torch.int64)
        labels[self.order] = back
        return labels
