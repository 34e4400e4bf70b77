"""Sub-head gradients all_reduced over each head's group while the trunk's backward still runs.

Why: at paper scale a sub head is Linear(4096, 80000), 1.3 GB of gradient per step to sum over its
group of ranks. Reduced after backward, that time adds to every step. The heads come last in the
forward (trunk -> routing -> heads), so their gradients are ready first in backward: a reduce
started from the head parameters' post-accumulate hooks runs while the routing's and the trunk's
backward still compute, and `finish()` (RoutedHeads.sync_grads) only waits for it.

What a head ends with is unchanged: its local gradient times scale[s] / W, summed over its group
(scale: RoutedHeads.loss, from the global weight sums, so known before backward and the same on
every member); a head without rows on this rank contributes zeros.

Ordering. The members of a group must issue its collectives in the same order, or they sum the
wrong buffers or hang. A head's reduces are issued together, as one unit in a fixed order (its
parameters in registration order: weight, bias), and units in ascending head order on every rank:
a head is launched only once it is ready and every lower head this rank owns has been launched.
Ready means all its parameters' hooks have fired, or, for a head that received no rows on this
rank, at once: its parameters have no gradient path, their hooks never fire (whether a head got
rows is known on the host from the routing's counts before backward). Such heads are launched
when the frontier reaches them: from a hook, or at the latest from a hook on the routed features,
which fires on every rank after all heads' backward and before the routing's. So a member without
rows joins its group's reduce during backward too, not after it, and any two ranks issue the
units of the groups they share in the same (ascending) order, whatever order backward fires the
hooks in. Today a rank owns at most one head with a group larger than one (`ownership`), so the
ascending rule is a guard for other layouts, free when it does not bind.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn as nn

from dist_cluster.runtime import comm


class HeadGradSync:
    """Per-step scaling and group all_reduce of the owned heads' gradients (see the module doc).

    `overlap=False`: no hooks act; `finish()` launches every reduce after backward and waits (the
    blocking sync this replaced, kept to measure the overlap against)."""

    def __init__(self, heads: dict[int, nn.Module], groups: dict, shared: set[int], world: int,
                 overlap: bool = True):
        self.order = sorted(heads)
        self.params = {s: list(heads[s].parameters()) for s in self.order}
        self.groups, self.shared, self.world, self.overlap = groups, shared, world, overlap
        self._scale: Optional[torch.Tensor] = None  # [S] while a step is armed
        self._waiting: dict[int, set[int]] = {}  # head -> parameter indices whose hook has not fired
        self._next = 0  # index in self.order of the first head not yet launched
        self._pending: list[comm.Pending] = []
        me = weakref.ref(self)  # the hooks live on the parameters: no cycle through them
        for s in self.order:
            for i, p in enumerate(self.params[s]):
                p.register_post_accumulate_grad_hook(lambda param, s=s, i=i: _accumulated(me, s, i))

    def arm(self, scale: torch.Tensor, rows: list[int], routed: torch.Tensor) -> None:
        """Start a step: `scale` [S] (device), `rows` [S] rows this rank scores per head (host ints),
        `routed` the routed features every owned head's input is sliced from."""
        self._drain()
        self._scale, self._next = scale, 0
        self._waiting = {s: set(range(len(self.params[s]))) if self.overlap and rows[s] > 0 else set()
                         for s in self.order}
        if self.overlap and routed.requires_grad:
            routed.register_hook(lambda grad: self._advance())

    def finish(self) -> None:
        """After backward: launch what is left (everything, without overlap), then wait for all."""
        if self._scale is None:
            raise RuntimeError("sync_grads() before loss(): no step to synchronise")
        self._advance(force=True)
        self._drain()
        self._scale = None

    def _on_accumulated(self, s: int, i: int) -> None:
        if self._scale is None or not self.overlap:
            return  # not inside a training step's backward
        if i not in self._waiting[s]:
            raise RuntimeError(f"head {s}: a gradient arrived that was not expected this step (its reduce "
                               f"has started, or it received no rows)")
        self._waiting[s].discard(i)
        self._advance()

    def _advance(self, force: bool = False) -> None:
        """Launch heads in ascending order while the next one is ready (all of them if `force`)."""
        while self._next < len(self.order):
            s = self.order[self._next]
            if self._waiting[s] and not force:
                return
            self._launch(s)
            self._next += 1

    def _launch(self, s: int) -> None:
        scale = self._scale[s] / self.world  # from global sums: the same on every member
        for p in self.params[s]:  # registration order: the same on every member
            if p.grad is None:  # no rows here (or no backward): this member adds zeros
                p.grad = torch.zeros_like(p)
            p.grad.mul_(scale)
            if s in self.shared:  # in place: no flat copy of a 1.3 GB head gradient
                self._pending.append(comm.all_reduce_async(p.grad, self.groups[s]))

    def _drain(self) -> None:
        for pending in self._pending:
            pending.wait()
        self._pending = []


def _accumulated(ref: weakref.ref, s: int, i: int) -> None:
    sync = ref()
    if sync is not None:
        sync._on_accumulated(s, i)
