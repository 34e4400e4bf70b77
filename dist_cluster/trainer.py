"""TRAIN: one epoch of rotation x cluster prediction over this rank's shards.

Per step: rotate, trunk forward (DDP + SyncBN over all ranks), super-class head (replicated, inside
DDP), ReLU'd features routed by all_to_all to the owners of the sub-class heads, weighted CE.
Loss convention: each rank's local loss is scaled so that, after DDP averages the trunk gradients
over W ranks, the trunk receives the gradient of the global batch's weighted mean loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed, preemption
from .extract import autocast_for
from .targets import LabelTable, make_targets


def step_seed(*parts: int) -> int:
    """A seed that is a pure function of (seed, epoch, step, rank): resumed runs redraw the same."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return value


def lr_at(step: int, total_steps: int, cfg_train, steps_per_epoch: int) -> float:
    warmup = cfg_train.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg_train.lr * (step + 1) / warmup
    if cfg_train.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg_train.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg_train.lr


def sgd(params, cfg_train) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg_train.lr, momentum=cfg_train.momentum,
                           weight_decay=cfg_train.weight_decay)


@dataclass
class StepStats:
    """Per-step numbers summed over ranks with one all_reduce (also carries the NaN check and the
    preemption flag, so every rank learns of a signal after the same step)."""
    loss_super: float
    loss_sub: float
    acc_super: float
    acc_sub: float
    images: int
    preempted: bool = False


def weighted_ce_local(logits, target, weight, world: int):
    """Local share of the global weighted mean CE: sum(w * ce) / sum_global(w) * W (see module doc)."""
    total_weight = weight.sum().detach().clone()
    dist.all_reduce(total_weight)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (weight * ce).sum() / total_weight.clamp_min(1e-12) * world


def reduce_step_stats(loss_super, loss_sub, correct_super, correct_sub, rows_sub, n, world) -> StepStats:
    finite = float(torch.isfinite(loss_super).item() and torch.isfinite(loss_sub).item())
    vec = torch.tensor([loss_super.item() if finite else 0.0, loss_sub.item() if finite else 0.0,
                        float(correct_super), float(correct_sub), float(rows_sub), float(n), 1.0 - finite,
                        float(preemption.requested())], dtype=torch.float64)
    dist.all_reduce(vec)
    if vec[6] > 0:
        raise FloatingPointError(
            f"non-finite loss on {int(vec[6])} rank(s): stopping; RUN/checkpoints/last.pt holds the last "
            "good state (lower train.lr or check the data)")
    return StepStats(loss_super=vec[0].item() / world, loss_sub=vec[1].item() / world,
                     acc_super=vec[2].item() / max(vec[5].item(), 1), acc_sub=vec[3].item() / max(vec[4].item(), 1),
                     images=int(vec[5].item()), preempted=bool(vec[7] > 0))


class PhaseTimer:
    """Wall time per phase of a step (bench/train.py); syncs CUDA so GPU work lands in its phase."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._last = device, {}, None

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_step(model, heads, targets, trunk_opt, head_opt, lr: float, cfg, device,
               timer: PhaseTimer | None = None) -> StepStats:
    """One optimisation step; `timer` (optional) splits it into forward/routing/backward/optimizer."""
    mark = timer.mark if timer is not None else (lambda phase: None)
    if timer is not None:
        timer.start()
    world = distributed.world_size()
    for opt in (trunk_opt, head_opt):
        for group in opt.param_groups:
            group["lr"] = lr
    with autocast_for(device, cfg.train.bf16):
        feats, super_logits = model(targets.images)
    mark("forward")
    loss_super = weighted_ce_local(super_logits, targets.super_class, targets.super_weight, world)
    if heads is not None:
        loss_sub, sub_stats = heads.loss(feats.float(), targets.super_class, targets.sub_local,
                                         targets.sub_weight, None)
        correct_sub, rows_sub = sub_stats["correct"].sum().item(), sub_stats["rows"].sum().item()
    else:  # RotNet: one cluster, no sub-class to predict
        loss_sub, correct_sub, rows_sub = super_logits.sum() * 0.0, 0, 0
    mark("routing")
    trunk_opt.zero_grad(set_to_none=True)
    head_opt.zero_grad(set_to_none=True)
    (loss_super + loss_sub).backward()
    if heads is not None:
        heads.sync_grads()
    mark("backward")
    stats = reduce_step_stats(loss_super.detach(), loss_sub.detach(),
                              (super_logits.argmax(1) == targets.super_class).sum().item(),
                              correct_sub, rows_sub, len(targets.super_class), world)
    trunk_opt.step()
    head_opt.step()
    mark("optimizer")
    return stats


def train_epoch(model, heads, table: LabelTable, loader, trunk_opt, head_opt, cfg, device, logger,
                progress_state: dict, total_steps: int, on_step=None) -> dict:
    """Train over `loader` (which already skips the batches done before a resume).

    progress_state: round, epoch, step (next batch index in the epoch), global_step; updated in place.
    on_step(progress_state) is called after every step (checkpointing decides there).
    A preemption signal on any rank ends the epoch after the current step on every rank, with
    summary["preempted"] = True (the caller saves and stops).
    """
    model.train()
    t = cfg.train
    rank, steps_per_epoch = distributed.rank(), len(loader)
    sums = dict(loss_super=0.0, loss_sub=0.0, acc_super=0.0, acc_sub=0.0, n=0, data_time=0.0, step_time=0.0)
    preempted = False
    epoch_start = tick = time.perf_counter()
    for images, keys, labels in loader:
        data_time = time.perf_counter() - tick
        generator = torch.Generator().manual_seed(
            step_seed(cfg.seed, progress_state["epoch"], progress_state["step"], rank))
        images = images.to(device, non_blocking=True)
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = make_targets(images, keys, table, t.rotations, t.all_rotations, generator, labels)
        lr = lr_at(progress_state["global_step"], total_steps, t, steps_per_epoch)
        stats = train_step(model, heads, targets, trunk_opt, head_opt, lr, cfg, device)
        step_time = time.perf_counter() - tick - data_time
        for key in ("loss_super", "loss_sub", "acc_super", "acc_sub"):
            sums[key] += getattr(stats, key)
        sums["n"] += 1
        sums["data_time"] += data_time
        sums["step_time"] += step_time
        progress_state["step"] += 1
        progress_state["global_step"] += 1
        if progress_state["global_step"] % t.log_every_steps == 0:
            logger.event("train", step=progress_state["global_step"], round=progress_state["round"],
                         epoch=progress_state["epoch"], lr=lr, loss_super=stats.loss_super,
                         loss_sub=stats.loss_sub, acc_super=stats.acc_super, acc_sub=stats.acc_sub,
                         img_per_s=stats.images / max(data_time + step_time, 1e-9),
                         data_time=data_time, step_time=step_time)
        if stats.preempted:
            preempted = True
            break
        if on_step is not None:
            on_step(progress_state)
        tick = time.perf_counter()
    n = max(sums.pop("n"), 1)
    seconds = time.perf_counter() - epoch_start
    summary = {key: value / n for key, value in sums.items()}
    summary.update(steps=n, seconds=seconds, preempted=preempted)
    return summary
