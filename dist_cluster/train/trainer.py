"""TRAIN: one epoch of rotation x cluster prediction over this rank's shards.

Per step: rotate, trunk forward (DDP + SyncBN over all ranks), super-class head (replicated, inside
DDP), ReLU'd features routed by all_to_all to the owners of the sub-class heads, weighted CE.

Gradients are the original DeeperCluster's (facebookresearch/DeeperCluster, src/trainer.py): there
every rank averages the CE over its own batch, DDP averages the trunk and the super-class layer over
all ranks, and each sub-class layer is averaged over its own group of ranks. So the trunk and the
super head get the gradient of the global batch's mean loss, and each sub head the gradient of the
mean over its own rows. With balancing weights, "mean" is the weighted mean. Here each rank's loss
is its local weighted sum scaled by W / (global weight sum) (DDP's average then gives the global
mean), and RoutedHeads.sync_grads rescales each sub head to its own rows' mean.

Host synchronisation: a step blocks the host once, on the routing's row counts (heads.py). The
per-step statistics (losses, accuracies, the NaN check and the preemption flag) are all_reduced on
the device and read one step later, when they are long done (`PendingStats`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_cluster.runtime import comm, preemption
from dist_cluster.runtime.distributed import autocast_for
from dist_cluster.train.targets import LabelTable, make_targets, to_device


def step_seed(*parts: int) -> int:
    """A seed that is a pure function of (seed, epoch, step, rank): resumed runs redraw the same."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return value


def seed_this_rank(seed: int, rank: int) -> None:
    """After the (identical) model init: a random stream of this rank's own, CPU and CUDA alike, so
    that dropout masks and other draws differ between ranks as they would on independent GPUs."""
    torch.manual_seed(step_seed(seed, 0x5EED, rank))


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
    preemption flag, so every rank learns of a signal at the same step)."""
    loss_super: float
    loss_sub: float
    acc_super: float
    acc_sub: float
    images: int
    preempted: bool = False


STAT_FIELDS = ("loss_super", "loss_sub", "correct_super", "correct_sub", "rows_sub", "images", "nonfinite",
               "preempted")


def global_weight_sums(targets, num_heads: int) -> torch.Tensor:
    """[super weight sum, sub weight sum, sub weight sum per head (S)] over the global batch: one
    all_reduce on the device, no host sync."""
    per_head = torch.zeros(num_heads, dtype=torch.float64, device=targets.sub_weight.device)
    per_head.index_add_(0, targets.super_class, targets.sub_weight.double())
    local = torch.cat([torch.stack([targets.super_weight.double().sum(), targets.sub_weight.double().sum()]),
                       per_head])
    return comm.all_reduce(local)


def weighted_ce_local(logits, target, weight, global_weight_sum, world: int):
    """Local share of the global weighted mean CE: sum(w * ce) / sum_global(w) * W (see module doc)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (weight * ce).sum() * (world / global_weight_sum.float())


def step_stats_vector(loss_super, loss_sub, correct_super, correct_sub, rows_sub: int, images: int,
                      device) -> torch.Tensor:
    """The STAT_FIELDS of this rank as one float64 device tensor, all_reduced over ranks (no host
    sync: the host-side numbers travel through one pinned, non-blocking copy)."""
    finite = torch.isfinite(loss_super) & torch.isfinite(loss_sub)
    zero = torch.zeros((), dtype=torch.float64, device=loss_super.device)
    device_part = torch.stack([torch.where(finite, loss_super.double(), zero),
                               torch.where(finite, loss_sub.double(), zero),
                               correct_super.double(), correct_sub.double()])
    host_part = torch.tensor([float(rows_sub), float(images), 0.0, float(preemption.requested())],
                             dtype=torch.float64)
    host_part = to_device(host_part, device)
    host_part[2] = (~finite).double()
    return comm.all_reduce(torch.cat([device_part, host_part]).detach())


class PendingStats:
    """A step's statistics vector on its way to the host: the copy starts now, `result()` reads it
    (the next step, when the routing sync has long passed it: nothing left to wait for)."""

    def __init__(self, vector: torch.Tensor, **info):
        self.info = info  # host numbers of the step (global step, lr, times) for the log
        if vector.device.type == "cuda":
            self._host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            self._host.copy_(vector, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = vector, None

    def result(self, world: int) -> StepStats:
        if self._event is not None:
            self._event.synchronize()
        values = dict(zip(STAT_FIELDS, self._host.numpy()))
        if values["nonfinite"] > 0:
            raise FloatingPointError(
                f"non-finite loss on {int(values['nonfinite'])} rank(s) at step {self.info.get('step', '?')}: "
                "stopping; RUN/checkpoints/last.pt holds the last good state (lower train.lr or check the data)")
        images = max(float(values["images"]), 1.0)
        return StepStats(loss_super=float(values["loss_super"]) / world, loss_sub=float(values["loss_sub"]) / world,
                         acc_super=float(values["correct_super"]) / images,
                         acc_sub=float(values["correct_sub"]) / max(float(values["rows_sub"]), 1.0),
                         images=int(values["images"]), preempted=bool(values["preempted"] > 0))


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
               timer: PhaseTimer | None = None) -> torch.Tensor:
    """One optimisation step; returns its STAT_FIELDS vector summed over ranks (on the device:
    wrap it in PendingStats to read it). `timer` (optional) splits it into phases."""
    mark = timer.mark if timer is not None else (lambda phase: None)
    if timer is not None:
        timer.start()
    world = comm.group_size()
    for opt in (trunk_opt, head_opt):
        for group in opt.param_groups:
            group["lr"] = lr
    with autocast_for(device, cfg.train.bf16):
        feats, super_logits = model(targets.images)
    mark("forward")
    sums = global_weight_sums(targets, super_logits.shape[1])
    loss_super = weighted_ce_local(super_logits, targets.super_class, targets.super_weight, sums[0], world)
    if heads is not None:
        loss_sub, sub_stats = heads.loss(feats.float(), targets.super_class, targets.sub_local,
                                         targets.sub_weight, sums[1], sums[2:])
        correct_sub, rows_sub = sub_stats["correct"].sum(), sum(sub_stats["rows"])
    else:  # RotNet: one cluster, no sub-class to predict
        loss_sub, correct_sub, rows_sub = super_logits.sum() * 0.0, torch.zeros((), device=device), 0
    mark("routing")
    trunk_opt.zero_grad(set_to_none=True)
    head_opt.zero_grad(set_to_none=True)
    (loss_super + loss_sub).backward()
    if heads is not None:
        heads.sync_grads()
    mark("backward")
    stats = step_stats_vector(loss_super.detach(), loss_sub.detach(),
                              (super_logits.detach().argmax(1) == targets.super_class).sum(),
                              correct_sub, rows_sub, len(targets.super_class), device)
    trunk_opt.step()
    head_opt.step()
    mark("optimizer")
    return stats


class EpochLog:
    """Sums of the step statistics over an epoch and the `train` events, fed one step late."""

    def __init__(self, logger, every: int, world: int):
        self.logger, self.every, self.world = logger, every, world
        self.sums = dict(loss_super=0.0, loss_sub=0.0, acc_super=0.0, acc_sub=0.0, data_time=0.0, step_time=0.0)
        self.n = 0

    def add(self, pending: PendingStats) -> bool:
        """Read a finished step's statistics (raises on a non-finite loss); True if preempted."""
        stats, info = pending.result(self.world), pending.info
        for key in ("loss_super", "loss_sub", "acc_super", "acc_sub"):
            self.sums[key] += getattr(stats, key)
        self.sums["data_time"] += info["data_time"]
        self.sums["step_time"] += info["step_time"]
        self.n += 1
        if info["step"] % self.every == 0:
            self.logger.event("train", loss_super=stats.loss_super, loss_sub=stats.loss_sub,
                              acc_super=stats.acc_super, acc_sub=stats.acc_sub,
                              img_per_s=stats.images / max(info["data_time"] + info["step_time"], 1e-9), **info)
        return stats.preempted

    def summary(self, seconds: float) -> dict:
        n = max(self.n, 1)
        return {**{key: value / n for key, value in self.sums.items()}, "steps": self.n, "seconds": seconds}


def train_epoch(model, heads, table: LabelTable, loader, trunk_opt, head_opt, cfg, device, logger,
                progress_state: dict, total_steps: int, checkpoint=None) -> dict:
    """Train over `loader` (which already skips the batches done before a resume).

    progress_state: round, epoch, step (next batch index in the epoch), global_step; updated in place.
    checkpoint(progress_state) -> bool says whether to save after this step, and saves when called
    with save=True: a step's statistics (its NaN check) are read before its checkpoint is written.
    A preemption signal on any rank ends the epoch on every rank after the same step, with
    summary["preempted"] = True (the caller saves and stops).
    """
    model.train()
    t = cfg.train
    rank, steps_per_epoch, world = comm.group_rank(), len(loader), comm.group_size()
    log = EpochLog(logger, t.log_every_steps, world)
    pending, preempted = None, False
    epoch_start = tick = time.perf_counter()
    for images, keys, labels in loader:
        data_time = time.perf_counter() - tick
        generator = torch.Generator().manual_seed(
            step_seed(cfg.seed, progress_state["epoch"], progress_state["step"], rank))
        targets = make_targets(images, keys, table, t.rotations, t.all_rotations, generator, labels,
                               device=device, channels_last=cfg.model.channels_last)
        lr = lr_at(progress_state["global_step"], total_steps, t, steps_per_epoch)
        vector = train_step(model, heads, targets, trunk_opt, head_opt, lr, cfg, device)
        progress_state["step"] += 1
        progress_state["global_step"] += 1
        done = PendingStats(vector, step=progress_state["global_step"], round=progress_state["round"],
                            epoch=progress_state["epoch"], lr=lr, data_time=data_time,
                            step_time=time.perf_counter() - tick - data_time)
        if pending is not None:  # the previous step's numbers: finished by now, reading them is free
            preempted = log.add(pending)
        pending = done
        if not preempted and checkpoint is not None and checkpoint(progress_state):
            preempted, pending = log.add(pending), None  # this step checked before it is saved
            if not preempted:
                checkpoint(progress_state, save=True)
        if preempted:  # the same step on every rank: the flag was summed over ranks
            break
        tick = time.perf_counter()
    if pending is not None:
        preempted = log.add(pending) or preempted
    summary = log.summary(time.perf_counter() - epoch_start)
    summary["preempted"] = preempted
    return summary
