"""Rotation x cluster heads: a replicated super-class head and routed sub-class heads.

Targets of an image: rotation y in [0, R), super-cluster z1 in [0, m), sub-cluster z2 (global id,
z1 * (k // m) + local). Super-class s = y * m + z1 (S = R * m classes); sub head s predicts the
local sub id (k // m classes) and exists only on the ranks that own s
(`distributed.ownership(S, W)`): W >= S, a group of ranks shares a head; W < S, a rank owns several.

    model = DDP(TrunkAndSuperHead(trunk, S))            # replicated part, the trainer wraps it
    heads = RoutedHeads(D, S, k // m, device, seed)     # every rank, same arguments
    super_t, sub_t = make_targets(rotation, z1, z2, m, k)
    feats, super_logits = model(images)
    sub_loss, stats = heads.loss(feats, super_t, sub_t, weight, global_batch)
    loss = scaled_local_sum(F.cross_entropy(super_logits, super_t, reduction="none"), weight,
                            stats["global_weight_sum"]) + sub_loss
    loss.backward(); heads.sync_grads(); optimizer.step()

Loss convention (what makes the gradients exact): with L = sum_i w_i CE_i / sum_i w_i over the
GLOBAL batch, every rank returns its local sum scaled by W / sum_i w_i, so the SUM over ranks of
the returned terms is W * L. DDP averages trunk gradients over the W ranks, giving dL/dtrunk;
`sync_grads` sums each head's gradient over its group and divides by W, giving dL/dhead. The
value to log is sum over ranks of the returned term / W (= L).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn as nn
import torch.nn.functional as F

from . import distributed

HEAD_INIT_STD = 0.01  # DeepCluster's top-layer init: N(0, 0.01), zero bias

# Heads are rebuilt after every re-clustering; their process groups are not: a new communicator
# per round would leak NCCL resources over a long run. Keyed by the default group itself, so a
# re-initialised default group (a new object) never sees stale groups.
_GROUPS: dict = {}


def _cached(key: tuple, make):
    """Create-once process groups; every rank builds the same keys in the same order."""
    full_key = (dist.group.WORLD,) + key
    if full_key not in _GROUPS:
        _GROUPS[full_key] = make()
    return _GROUPS[full_key]


def make_targets(rotation: torch.Tensor, super_cluster: torch.Tensor, sub_global: torch.Tensor,
                 m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(super-class y * m + z1, local sub id z2 - z1 * (k // m)); checks z2 lies inside z1."""
    per_super = k // m
    if not torch.equal(sub_global // per_super, super_cluster):
        raise ValueError("sub-cluster ids do not belong to their super-clusters (z2 // (k/m) != z1)")
    return rotation * m + super_cluster, sub_global - super_cluster * per_super


def scaled_local_sum(per_row: torch.Tensor, weight: Optional[torch.Tensor], global_weight_sum: float,
                     world: Optional[int] = None) -> torch.Tensor:
    """This rank's term of a global weighted mean: sum w * per_row * W / global_weight_sum."""
    world = distributed.world_size() if world is None else world
    total = per_row.sum() if weight is None else (per_row * weight.to(per_row.dtype)).sum()
    return total * (world / global_weight_sum)


def _seeded_linear_(layer: nn.Linear, seed: int, index: int) -> None:
    """Same values on every rank and device: drawn on CPU from a generator keyed by (seed, index).

    index -1 is the super head, s >= 0 sub head s."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * HEAD_INIT_STD)
        layer.bias.zero_()


class SuperHead(nn.Linear):
    """Linear(feature_dim, S) on relu(features); replicated (DDP) with the trunk."""

    def reset(self, seed: int) -> None:
        # DDP broadcasts parameters only at construction: a re-init must agree across ranks by itself
        _seeded_linear_(self, seed, -1)


class TrunkAndSuperHead(nn.Module):
    """The DDP-wrapped part: x -> (relu(trunk(x)), super logits)."""

    def __init__(self, trunk: nn.Module, num_super: int, seed: int = 0):
        super().__init__()
        self.trunk = trunk
        self.super_head = SuperHead(trunk.feature_dim, num_super)
        self.super_head.reset(seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = F.relu(self.trunk(x))
        return feats, self.super_head(feats)


class RoutedHeads(nn.Module):
    """The sub heads this rank owns, and the all_to_all routing of rows to their owners."""

    def __init__(self, feature_dim: int, num_heads: int, sub_classes: int,
                 device: Optional[torch.device] = None, seed: int = 0):
        super().__init__()
        if sub_classes < 1:
            raise ValueError(f"sub_classes must be >= 1, got {sub_classes}")
        if not dist.is_initialized():
            raise RuntimeError("RoutedHeads needs a process group: call distributed.init() first "
                               "(it also runs with world size 1)")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.num_heads, self.sub_classes, self.feature_dim = num_heads, sub_classes, feature_dim
        self.owners = distributed.ownership(num_heads, self.world)
        groups = _cached(("heads",) + tuple(map(tuple, self.owners)),
                         lambda: distributed.new_groups(self.owners))  # collective: every rank, same order
        self.owned = [s for s, ranks in enumerate(self.owners) if self.rank in ranks]
        self._groups = {s: groups[s] for s in self.owned}
        # the routing collectives get their own communicator, so they can never interleave with the
        # all_reduces DDP launches on the default group while backward runs
        self.route_group = _cached(("route",), lambda: dist.new_group(list(range(self.world))))
        self.heads = nn.ModuleDict({str(s): nn.Linear(feature_dim, sub_classes) for s in self.owned})
        self._table, self._sizes = self._owner_table()
        if device is not None:
            self.to(device)
        self.reset(seed)

    def _owner_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, max group size] owner ranks (padded with the first owner) and [S] group sizes."""
        width = max(map(len, self.owners))
        table = torch.tensor([r + [r[0]] * (width - len(r)) for r in self.owners], dtype=torch.long)
        return table, torch.tensor([len(r) for r in self.owners], dtype=torch.long)

    def reset(self, seed: int) -> None:
        """Re-initialise the owned heads (after every re-clustering); identical across a head's group."""
        for s in self.owned:
            _seeded_linear_(self.heads[str(s)], seed, s)

    # ------------------------------------------------------------------ routing

    def destinations(self, head: torch.Tensor) -> torch.Tensor:
        """Owner rank of each row: rows of a head spread round-robin over its group, offset by rank."""
        device = head.device
        table, sizes = self._table.to(device), self._sizes.to(device)
        order = torch.argsort(head, stable=True)
        counts = torch.bincount(head, minlength=self.num_heads)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(head)
        position[order] = torch.arange(len(head), device=device) - starts[head[order]]
        member = (position + self.rank) % sizes[head]  # the offset spreads small batches too
        return table[head, member]

    def _check_and_totals(self, feats, super_target, sub_target, weight) -> tuple[int, float]:
        """Global (rows, weight sum) by one all_reduce, which also carries every rank's bad-row count
        so that all ranks raise together instead of leaving peers waiting in the all_to_all."""
        rows = len(super_target)
        shapes_ok = (feats.dim() == 2 and feats.shape[1] == self.feature_dim and len(feats) == rows
                     and sub_target.shape == super_target.shape and (weight is None or weight.shape == (rows,)))
        bad = torch.tensor(float(rows + 1), device=feats.device)
        wsum = torch.zeros((), dtype=torch.float64, device=feats.device)
        if shapes_ok:
            ok = (super_target >= 0) & (super_target < self.num_heads)
            ok &= (sub_target >= 0) & (sub_target < self.sub_classes)
            if weight is not None:
                ok &= torch.isfinite(weight) & (weight >= 0)
                wsum = weight.detach().double().sum()
            else:
                wsum = wsum + rows
            bad = (~ok).sum().double()
        totals = torch.stack([torch.tensor(float(rows), dtype=torch.float64, device=feats.device),
                              wsum.double(), bad.double()])
        dist.all_reduce(totals, group=self.route_group)
        g_rows, g_wsum, g_bad = totals.tolist()
        if g_bad > 0:
            raise ValueError(f"RoutedHeads.loss: {int(g_bad)} bad rows over all ranks (this rank: shapes "
                             f"{'ok' if shapes_ok else 'wrong'}); need super in [0, {self.num_heads}), "
                             f"sub in [0, {self.sub_classes}), finite weights >= 0, feats [B, {self.feature_dim}]")
        if g_wsum <= 0:
            raise ValueError(f"RoutedHeads.loss: global weight sum is {g_wsum} (empty batch or all-zero weights)")
        return int(round(g_rows)), g_wsum

    def _exchange(self, feats, head, sub_target, weight):
        """Route rows to their owners: (features [n, D], [sub, weight] [n, 2]) received, sorted by
        head, and the number received per head (host ints)."""
        dest = self.destinations(head)
        key = dest * self.num_heads + head
        order = torch.argsort(key, stable=True)  # by destination, then head
        send_matrix = torch.bincount(key, minlength=self.world * self.num_heads)
        recv_matrix = torch.empty_like(send_matrix)
        dist.all_to_all_single(recv_matrix, send_matrix, group=self.route_group)
        send_matrix, recv_matrix = send_matrix.view(self.world, -1), recv_matrix.view(self.world, -1)
        send_splits, recv_splits = send_matrix.sum(1).tolist(), recv_matrix.sum(1).tolist()
        n_recv = sum(recv_splits)

        meta = torch.stack([sub_target.double(), weight.double()], 1)[order]
        meta_recv = meta.new_empty(n_recv, 2)
        dist.all_to_all_single(meta_recv, meta.contiguous(), recv_splits, send_splits, group=self.route_group)
        x_recv = feats.new_empty(n_recv, feats.shape[1])
        with warnings.catch_warnings():  # the autograd all_to_all is marked deprecated, still the one gloo runs
            warnings.simplefilter("ignore", FutureWarning)
            x_recv = dist_autograd.all_to_all_single(x_recv, feats[order].contiguous(), recv_splits,
                                                     send_splits, group=self.route_group)
        # received blocks are per source, each sorted by head: regroup head-major
        per_head = recv_matrix.sum(0).tolist()
        head_recv = torch.repeat_interleave(torch.arange(self.num_heads, device=feats.device).repeat(self.world),
                                            recv_matrix.flatten())
        by_head = torch.argsort(head_recv, stable=True)
        return x_recv[by_head], meta_recv[by_head], per_head

    def loss(self, feats: torch.Tensor, super_target: torch.Tensor, sub_target: torch.Tensor,
             weight: Optional[torch.Tensor] = None, global_batch: Optional[int] = None):
        """This rank's term of the global weighted-mean sub-head CE (see the module doc), and stats.

        feats [B, D] (ReLU'd, requires grad), super_target [B] in [0, S), sub_target [B] local ids,
        weight [B] or None, global_batch: if given, checked against the rows of all ranks.
        Every rank must call this at every step, with or without rows.
        Stats: correct [S] and rows [S] for the rows this rank scored (sum them over ranks),
        global_weight_sum and global_rows.
        """
        g_rows, g_wsum = self._check_and_totals(feats, super_target, sub_target, weight)
        if global_batch is not None and global_batch != g_rows:
            raise ValueError(f"RoutedHeads.loss: global_batch={global_batch} but the ranks hold {g_rows} rows")
        if weight is None:
            weight = torch.ones(len(feats), device=feats.device)
        x_recv, meta_recv, per_head = self._exchange(feats, super_target.long(), sub_target.long(), weight)
        # x_recv enters the loss even when empty, so every rank runs the all_to_all backward
        total = x_recv.sum() * 0.0
        correct = torch.zeros(self.num_heads, dtype=torch.long, device=feats.device)
        start = 0
        for s, count in enumerate(per_head):
            if count == 0:
                continue
            if s not in self._groups:
                raise RuntimeError(f"rank {self.rank} received rows for head {s} it does not own")
            x, meta = x_recv[start:start + count], meta_recv[start:start + count]
            sub, w = meta[:, 0].long(), meta[:, 1]
            start += count
            logits = self.heads[str(s)](x)
            total = total + (F.cross_entropy(logits, sub, reduction="none") * w.to(logits.dtype)).sum()
            correct[s] = (logits.detach().argmax(1) == sub).sum()
        stats = dict(correct=correct, rows=torch.tensor(per_head, dtype=torch.long, device=feats.device),
                     global_weight_sum=g_wsum, global_rows=g_rows)
        return total * (self.world / g_wsum), stats

    # ------------------------------------------------------------------ gradients and state

    def sync_grads(self) -> None:
        """After backward: head grads := sum over the head's group / W (= d global mean / d head).

        Every rank must call it; a head that saw no rows this step contributes zeros.
        """
        by_group: dict[int, list[nn.Parameter]] = {}
        members: dict[int, tuple] = {}
        for s in self.owned:
            key = id(self._groups[s])
            by_group.setdefault(key, []).extend(self.heads[str(s)].parameters())
            members[key] = (self._groups[s], len(self.owners[s]))
        for key, params in by_group.items():
            group, size = members[key]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if size > 1:
                dist.all_reduce(flat, group=group)
            flat /= self.world
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                p.grad = chunk.view_as(p).clone()

    def state_dict_owned(self) -> dict:
        """{head index: state dict} for the heads whose group this rank leads (first owner)."""
        return {s: {k: v.detach().cpu().clone() for k, v in self.heads[str(s)].state_dict().items()}
                for s in self.owned if self.owners[s][0] == self.rank}

    def load_state_dict_owned(self, heads_state: dict) -> None:
        """Load every owned head from {head index: state dict} (merged from all ranks' saves, any W)."""
        missing = [s for s in self.owned if s not in heads_state and str(s) not in heads_state]
        if missing:
            raise KeyError(f"rank {self.rank}: no saved state for owned heads {missing}")
        for s in self.owned:
            self.heads[str(s)].load_state_dict(heads_state[s] if s in heads_state else heads_state[str(s)])
