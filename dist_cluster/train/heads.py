"""Rotation x cluster heads: a replicated super-class head and routed sub-class heads.

Targets of an image: rotation y in [0, R), super-cluster z1 in [0, m), sub-cluster z2 (global id,
z1 * (k // m) + local). Super-class s = y * m + z1 (S = R * m classes); sub head s predicts the
local sub id (k // m classes) and exists only on the ranks that own s
(`distributed.ownership(S, W, loads)`, which follows the expected rows per head): W >= S, a
group of ranks shares a head; W < S, a rank owns several.

    model = DDP(TrunkAndSuperHead(trunk, S))            # replicated part, the trainer wraps it
    heads = RoutedHeads(D, S, k // m, device, seed)     # every rank, same arguments
    feats, super_logits = model(images)
    sums = trainer.global_weight_sums(...)              # [super, sub, per head] weight sums, all ranks
    sub_term, stats = heads.loss(feats, super_t, sub_t, sub_weight, sums[1], sums[2:])
    (super_term + sub_term).backward()                  # head reduces start in here (head_grads.py)
    heads.sync_grads(); optimizer.step()                # waits for them

Loss convention (the original's gradients, see trainer.py): every rank returns its local
weighted CE sum scaled by W / (global weight sum), so DDP's average over W ranks gives the trunk
the gradient of the global batch's weighted mean loss. Each head's gradient is rescaled to the
weighted mean over THAT head's rows and summed over its group: what the original's per-group DDP
gives a head whose ranks each average the CE over their own rows. The sums start during backward,
from gradient hooks (head_grads.py); `sync_grads` waits for them.

Host synchronisation: the one blocking read of a step is the routing's count matrix (the sizes of
the all_to_all must be known on the host); it also carries every rank's bad-row count, so all
ranks raise together instead of leaving peers waiting in a collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dist_cluster.runtime import comm, distributed
from dist_cluster.train.checkpoint_state import load_param_state, param_state
from dist_cluster.train.head_grads import HeadGradSync

HEAD_INIT_STD = 0.01  # train.head_init=normal: DeepCluster's top-layer init, N(0, 0.01), zero bias
HEAD_INITS = ("normal", "default")  # default: nn.Linear's own, as the original DeeperCluster's heads

# Heads are rebuilt after every re-clustering; their process groups only when the ownership
# changes (it follows the super-cluster sizes), and old partitions are destroyed: a new communicator
# per round would leak NCCL resources over a long run.
_HEAD_GROUPS = distributed.GroupCache(capacity=4)
_GROUPS: dict = {}  # the routing group, keyed by the default group (a re-initialised one is new)


def _cached(key: tuple, make):
    """Create-once process groups; every rank builds the same keys in the same order."""
    full_key = (dist.group.WORLD,) + key
    if full_key not in _GROUPS:
        _GROUPS[full_key] = make()
    return _GROUPS[full_key]


def _seeded_linear_(layer: nn.Linear, seed: int, index: int, init: str = "normal") -> None:
    """Same values on every rank and device: drawn on CPU from a generator keyed by (seed, index).

    index -1 is the super head, s >= 0 sub head s. init "normal": N(0, HEAD_INIT_STD) weights, zero
    bias; "default": nn.Linear.reset_parameters' law, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both."""
    if init not in HEAD_INITS:
        raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    with torch.no_grad():
        if init == "normal":
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * HEAD_INIT_STD)
            layer.bias.zero_()
            return
        bound = layer.in_features ** -0.5
        for param in (layer.weight, layer.bias):
            param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)


class SuperHead(nn.Linear):
    """Linear(feature_dim, S) on relu(features); replicated (DDP) with the trunk."""

    def reset(self, seed: int, init: str = "normal") -> None:
        # DDP broadcasts parameters only at construction: a re-init must agree across ranks by itself
        _seeded_linear_(self, seed, -1, init)


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
    """The sub heads this rank owns, and the all_to_all routing of rows to their owners.

    overlap=False reduces the head gradients after backward instead of during it (for benchmarks).
    sub_grad="own_rows" (the original's per-group DDP): head s learns from the weighted mean loss over
    its own rows; "global_batch": from the sum over its rows divided by the global batch's weight, about
    1/S of that (this project's code before 2026-11-30, kept for the ablation in bench/ablation.py)."""

    def __init__(self, feature_dim: int, num_heads: int, sub_classes: int,
                 device: Optional[torch.device] = None, seed: int = 0, overlap: bool = True,
                 loads: Optional[list] = None, sub_grad: str = "own_rows", init: str = "normal"):
        super().__init__()
        if sub_grad not in ("own_rows", "global_batch"):
            raise ValueError(f"sub_grad must be own_rows or global_batch, got {sub_grad!r}")
        self.own_rows_mean = sub_grad == "own_rows"
        if sub_classes < 1:
            raise ValueError(f"sub_classes must be >= 1, got {sub_classes}")
        if not dist.is_initialized():
            raise RuntimeError("RoutedHeads needs a process group: call distributed.init() first "
                               "(it also runs with world size 1)")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.num_heads, self.sub_classes, self.feature_dim = num_heads, sub_classes, feature_dim
        # loads: the expected rows of each head (the same on every rank), so that the ranks go where
        # the rows are; None: an even split (the rows per head are equal in expectation)
        self.owners = distributed.ownership(num_heads, self.world, loads)
        groups = _HEAD_GROUPS.groups(self.owners)  # collective on a new partition: every rank, same order
        self.owned = [s for s, ranks in enumerate(self.owners) if self.rank in ranks]
        self._groups = {s: groups[s] for s in self.owned}
        # the routing collectives get their own communicator, so they can never interleave with the
        # all_reduces DDP launches on the default group while backward runs
        self.route_group = _cached(("route",), lambda: distributed.new_groups([list(range(self.world))])[0])
        self.heads = nn.ModuleDict({str(s): nn.Linear(feature_dim, sub_classes) for s in self.owned})
        table, sizes = self._owner_table()
        # buffers, so they move to the device once with the module (a per-step upload would sync)
        self.register_buffer("_table", table, persistent=False)
        self.register_buffer("_sizes", sizes, persistent=False)
        if device is not None:
            self.to(device)
        self.reset(seed, init)
        shared = {s for s in self.owned if len(self.owners[s]) > 1}  # one-rank heads need no reduce
        self._grads = HeadGradSync({s: self.heads[str(s)] for s in self.owned}, self._groups, shared,
                                   self.world, overlap)

    def _owner_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, max group size] owner ranks (padded with the first owner) and [S] group sizes."""
        width = max(map(len, self.owners))
        table = torch.tensor([r + [r[0]] * (width - len(r)) for r in self.owners], dtype=torch.long)
        return table, torch.tensor([len(r) for r in self.owners], dtype=torch.long)

    def reset(self, seed: int, init: str = "normal") -> None:
        """Re-initialise the owned heads (after every re-clustering); identical across a head's group."""
        for s in self.owned:
            _seeded_linear_(self.heads[str(s)], seed, s, init)

    # ------------------------------------------------------------------ routing

    def destinations(self, head: torch.Tensor) -> torch.Tensor:
        """Owner rank of each row: rows of a head spread round-robin over its group, offset by rank.

        Written without bincount or nonzero, which wait for the GPU to learn their output size."""
        device = head.device
        order = torch.argsort(head, stable=True)
        counts = torch.zeros(self.num_heads, dtype=torch.long, device=device).index_add_(
            0, head, torch.ones_like(head))
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(head)
        position[order] = torch.arange(len(head), device=device) - starts[head[order]]
        member = (position + self.rank) % self._sizes[head]  # the offset spreads small batches too
        return self._table[head, member]

    def _bad_rows(self, feats, super_target, sub_target, weight) -> torch.Tensor:
        """Rows this rank cannot route (out-of-range target, negative or non-finite weight), as a
        device scalar; a shape error counts every row plus one (so even an empty batch reports it)."""
        rows = len(super_target)
        shapes_ok = (feats.dim() == 2 and feats.shape[1] == self.feature_dim and len(feats) == rows
                     and sub_target.shape == super_target.shape and weight.shape == (rows,))
        if not shapes_ok:
            return torch.tensor(rows + 1, dtype=torch.long, device=feats.device)
        ok = (super_target >= 0) & (super_target < self.num_heads)
        ok &= (sub_target >= 0) & (sub_target < self.sub_classes)
        ok &= torch.isfinite(weight) & (weight >= 0)
        return (~ok).sum()

    def _route_counts(self, head: torch.Tensor, bad: torch.Tensor):
        """Exchange the [W, S] row counts (plus each rank's bad-row count in a last column) and read
        both sides on the host: the step's one blocking sync. Returns (key order, device recv
        counts [W, S], host send counts [W][S+1], host recv counts [W][S+1])."""
        dest = self.destinations(head)
        key = dest * self.num_heads + head
        order = torch.argsort(key, stable=True)  # by destination, then head
        counts = torch.zeros(self.world * self.num_heads, dtype=torch.long, device=head.device)
        counts.index_add_(0, key, torch.ones_like(key))
        send = torch.cat([counts.view(self.world, -1), bad.view(1, 1).expand(self.world, 1)], 1)
        recv = comm.exchange_counts(send.flatten(), self.route_group).view(self.world, -1)
        host = torch.cat([send.flatten(), recv.flatten()]).tolist()
        width = self.num_heads + 1
        rows = [host[i * width:(i + 1) * width] for i in range(2 * self.world)]
        return order, recv[:, :-1], rows[:self.world], rows[self.world:]

    def _exchange(self, feats, head, sub_target, weight, bad):
        """Route rows to their owners: (features [n, D], [sub, weight] [n, 2]) received, sorted by
        head, and the number received per head (host ints)."""
        # clamped: a bad target must not index out of range before the counts say to raise
        order, recv_counts, send_host, recv_host = self._route_counts(head.clamp(0, self.num_heads - 1), bad)
        total_bad = sum(row[-1] for row in recv_host)  # every source's count: the same sum on all ranks
        if total_bad > 0:
            raise ValueError(f"RoutedHeads.loss: {total_bad} bad rows over all ranks (this rank: "
                             f"{send_host[0][-1]}); need super in [0, {self.num_heads}), sub in "
                             f"[0, {self.sub_classes}), finite weights >= 0, feats [B, {self.feature_dim}]")
        send_splits = [sum(row[:-1]) for row in send_host]
        recv_splits = [sum(row[:-1]) for row in recv_host]
        per_head = [sum(row[s] for row in recv_host) for s in range(self.num_heads)]
        meta = torch.stack([sub_target.double(), weight.double()], 1)[order]
        meta_recv = comm.all_to_all_rows_known(meta, send_splits, recv_splits, self.route_group)
        x_recv = comm.all_to_all_autograd(feats[order], send_splits, recv_splits, self.route_group)
        # received blocks are per source, each sorted by head: regroup head-major
        heads_of_blocks = torch.arange(self.num_heads, device=feats.device).repeat(self.world)
        head_recv = torch.repeat_interleave(heads_of_blocks, recv_counts.flatten(), output_size=sum(recv_splits))
        by_head = torch.argsort(head_recv, stable=True)
        return x_recv[by_head], meta_recv[by_head], per_head

    def loss(self, feats: torch.Tensor, super_target: torch.Tensor, sub_target: torch.Tensor,
             weight: torch.Tensor, weight_sum: torch.Tensor, head_weight_sums: torch.Tensor):
        """This rank's term of the global weighted-mean sub-head CE (see the module doc), and stats.

        feats [B, D] (ReLU'd, requires grad), super_target [B] in [0, S), sub_target [B] local ids,
        weight [B]; weight_sum: the global sum of `weight` (device scalar), head_weight_sums [S]: the
        global sum per head (both from one all_reduce in the trainer). Every rank must call this at
        every step, with or without rows. Stats: correct [S] (device) and rows [S] (host ints) for
        the rows this rank scored: sum them over ranks.
        """
        bad = self._bad_rows(feats, super_target, sub_target, weight)
        x_recv, meta_recv, per_head = self._exchange(feats, super_target.long(), sub_target.long(), weight, bad)
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
        # the head gradients' scale: from the global mean (what the trunk gets) to each head's
        # own-rows mean; a head without rows this step gets 0, not 0 * inf
        scale = torch.where(head_weight_sums > 0, weight_sum / head_weight_sums.clamp_min(1e-30),
                            torch.zeros_like(head_weight_sums))
        if not self.own_rows_mean:  # the ablation: keep the global batch's mean
            scale = (head_weight_sums > 0).to(scale.dtype)
        self._grads.arm(scale, per_head, x_recv)
        return total * (self.world / weight_sum), dict(correct=correct, rows=per_head)

    # ------------------------------------------------------------------ gradients and state

    def sync_grads(self) -> None:
        """After backward: head s grads := sum over the head's group / W * (global weight sum /
        weight sum of head s) = d(weighted mean CE over head s's rows) / d head s. Every rank must
        call it after loss(); a head that saw no rows this step contributes zeros. The reduces were
        started during backward (head_grads.py): this launches any left and waits for all."""
        self._grads.finish()

    def state_dict_owned(self, optimizer=None) -> dict:
        """{head index: state dict} for the heads whose group this rank leads (first owner): over
        all ranks, every head once (its owners hold equal copies). With `optimizer`, each entry also
        holds "optim": the head's optimiser state by parameter name (its momentum). The live
        tensors, as nn.Module.state_dict gives them: a checkpoint copies them (writer.snapshot)."""
        out = {}
        for s in self.owned:
            if self.owners[s][0] != self.rank:
                continue
            out[s] = dict(self.heads[str(s)].state_dict())
            if optimizer is not None:
                out[s]["optim"] = param_state(optimizer, self.heads[str(s)])
        return out

    def load_state_dict_owned(self, heads_state: dict, optimizer=None) -> None:
        """Load every owned head from {head index: state dict} (merged from the leaders' saves), and
        with `optimizer` its optimiser state ("optim": absent, the head has none, as before a step)."""
        missing = [s for s in self.owned if s not in heads_state and str(s) not in heads_state]
        if missing:
            raise KeyError(f"rank {self.rank}: no saved state for owned heads {missing}")
        for s in self.owned:
            saved = dict(heads_state[s] if s in heads_state else heads_state[str(s)])
            optim = saved.pop("optim", {})
            self.heads[str(s)].load_state_dict(saved)
            if optimizer is not None:
                load_param_state(optimizer, self.heads[str(s)], optim)
