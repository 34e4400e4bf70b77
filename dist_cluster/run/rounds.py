"""The round loop: EXTRACT -> CLUSTER -> TRAIN x `reassign` epochs, repeated, all ranks in lockstep.

    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/smoke.yaml run_dir=runs/smoke

Resume: the same command finds RUN/checkpoints/last.pt and continues where it stopped: before or
after the clustering of a round (assignments are reloaded from RUN/clusters/round_<r>/ when they are
complete, recomputed otherwise; clustering is deterministic given the trunk), or mid-epoch (the
loader skips the batches already done without decoding them).

Preemption (preemption.py): on SLURM's USR2 every rank saves the same step and stops (during
EXTRACT: at the same poll, with nothing to save); `train()` then hands over to submitit's requeue
(slurm.Trainer) or exits with PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cluster.checkpoint import store
from dist_cluster.checkpoint.writer import CheckpointWriter
from dist_cluster.cluster.extract import extract_features
from dist_cluster.cluster.stage import load_cluster_state, run_clustering
from dist_cluster.config import resume_changes, save_config
from dist_cluster.data.loader import ShardLoader, make_loader, reduce_stats, steps_per_epoch
from dist_cluster.data.manifest import load_manifest
from dist_cluster.data.transforms import extract_transform, train_transform
from dist_cluster.models import initial_trunk
from dist_cluster.models.export import export_backbone
from dist_cluster.runtime import distributed, preemption
from dist_cluster.runtime.logger import MetricLogger, Timer
from dist_cluster.runtime.syncbn import convert_sync_batchnorm
from dist_cluster.train import checkpoint_state
from dist_cluster.train.heads import RoutedHeads, TrunkAndSuperHead
from dist_cluster.train.targets import LabelTable
from dist_cluster.train.trainer import seed_this_rank, sgd, train_epoch


def wrap_ddp(module, device):
    """DDP without buffer broadcast: BN running stats are computed from global statistics, so they
    already agree on every rank; broadcasting rank 0's copy each forward would be pure traffic."""
    with warnings.catch_warnings():  # torch 2.14 renames the flag; its replacement still syncs at init
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


class Run:
    """Everything one training run holds; `run()` drives it round after round."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.env = distributed.env()
        self.device = self.env.device
        self.run_dir = Path(cfg.run_dir)
        self.logger = MetricLogger(self.run_dir)
        self.manifest = load_manifest(cfg.data.train)
        world, data = self.env.world_size, cfg.data
        self.steps = steps_per_epoch(self.manifest, world, data.batch_size, data.num_workers, data.max_samples)
        self.total_steps = self.steps * cfg.train.epochs
        self.num_rounds = math.ceil(cfg.train.epochs / cfg.train.reassign)
        self.num_super = cfg.train.rotations * cfg.cluster.m
        self.supervised = cfg.mode == "supervised"
        if self.supervised and not self.manifest.has_labels:
            raise ValueError(f"mode=supervised needs labelled shards; {data.train} has none")
        # k: clusters, or (supervised) the classes of the shards
        self.k = len(self.manifest.classes) if self.supervised else cfg.cluster.k
        self.sub_classes = self.k // cfg.cluster.m
        # identical trunk on every rank (DDP broadcasts it anyway)
        module = TrunkAndSuperHead(initial_trunk(cfg.model, data.image_size, cfg.seed), self.num_super, seed=cfg.seed)
        self.module = convert_sync_batchnorm(module, self.device).to(self.device)
        if cfg.model.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.model = wrap_ddp(self.module, self.device)
        if cfg.model.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model)
        self.trunk_opt = sgd(self.module.trunk.parameters(), cfg.train)
        seed_this_rank(cfg.seed, self.env.rank)
        self.state = dict(round=0, epoch=0, step=0, global_step=0, phase="cluster")
        self.heads = self.head_opt = None
        self._resumed = None  # the store.Loaded of resume()
        self._super_momentum: dict = {}  # the super head's momentum across a re-clustering (keeps_super_head)
        # one save at a time, written in the background; published at the next save or the stop
        self.writer = CheckpointWriter(self.run_dir, cfg.train.async_checkpoint, self.logger)

    @property
    def clusters_needed(self) -> bool:
        """RotNet (k = 1) and supervised runs never extract or cluster."""
        return self.cfg.cluster.k > 1 and not self.supervised

    @property
    def keeps_super_head(self) -> bool:
        """With one super-cluster the super head's classes are the rotations alone, whose meaning a
        re-clustering does not change: the original rebuilds that layer only when m > 1 (main.py,
        "reset prediction layers"), so it carries on here too, momentum included."""
        return self.cfg.cluster.m == 1 and self.num_super > 1

    # ------------------------------------------------------------------ stages

    def loader(self, epoch: int, train: bool, skip_batches: int = 0, repeat_counts=None) -> ShardLoader:
        """repeat_counts: LabelTable.repeat_counts (balance=resample), for training loaders only."""
        d = self.cfg.data
        transform = train_transform(d.image_size, d.min_scale) if train else extract_transform(d.resize, d.image_size)
        return make_loader(d, d.train, self.env.rank, self.env.world_size, transform, self.cfg.seed, epoch,
                           train=train, device=self.device, skip_batches=skip_batches, repeat_counts=repeat_counts)

    def cluster(self, round_idx: int, prev):
        """EXTRACT + CLUSTER for one round; returns this rank's cluster state (None for RotNet)."""
        cfg = self.cfg
        if not self.clusters_needed:
            return None
        self.release_training_state()
        loader = self.loader(round_idx, train=False)
        wire_start = distributed.loopback_bytes()
        poll = preemption.UnevenLoopPoll()
        try:  # a signal in EXTRACT or CLUSTER: every rank stops at the same poll; last.pt holds this round's start
            with Timer() as timer:
                feats, keys, stats = extract_features(
                    self.module.trunk, loader, loader.num_samples,
                    self.module.trunk.feature_dim, self.device, cfg.cluster, cfg.train.bf16,
                    cfg.model.channels_last, tag=f"round{round_idx}", poll=poll)
            # the previous round's last save was written during the extraction: published now
            # (last.pt, round_<r>.pt) rather than after the clustering, at the next save
            self.writer.wait()
            data_stats = reduce_stats(loader.stats)
            self.logger.event("extract", round=round_idx, seconds=timer.seconds, images=data_stats["samples"],
                              features_bytes_rank0=feats.numel() * feats.element_size(),
                              img_per_s=data_stats["samples"] / max(timer.seconds, 1e-9), data_stats=data_stats)
            state = run_clustering(feats, keys, cfg.cluster, round_idx, self.run_dir, self.logger,
                                   seed=cfg.seed + round_idx, device=self.device, prev=prev, poll=poll,
                                   overwrite_features=True)  # the features are not used after clustering
        except preemption.StopRequested:
            self.stop_for_preemption(save=False)
        self.logger.event("traffic", round=round_idx, phase="cluster",
                          loopback_bytes_per_rank=self.wire_bytes_per_rank(wire_start))
        return state

    def wire_bytes_per_rank(self, start):
        """Loopback bytes per rank since `start`: on a single host, the measured network volume
        the planner predicts (distributed.loopback_bytes); None where it cannot be read."""
        end = distributed.loopback_bytes()
        return None if start is None or end is None else (end - start) / self.env.world_size

    def label_table(self, clusters) -> LabelTable:
        if self.supervised:
            return LabelTable.supervised(self.k)
        if clusters is None:
            return LabelTable.rotnet()
        return LabelTable(clusters.keys, clusters.super, clusters.sub, clusters.super_sizes,
                          clusters.sub_sizes, clusters.k, clusters.m, self.cfg.train.balance)

    def head_loads(self, clusters) -> Optional[list[int]]:
        """Expected rows of each sub head, so that head ownership follows the data: with every image
        seen once per epoch (balance weight | none) super-class y * m + z1 gets the rows of
        super-cluster z1; the original's sampler (resample) draws the super-classes uniformly."""
        if clusters is None or self.cfg.train.balance == "resample":
            return None
        sizes = [int(n) for n in clusters.super_sizes]
        return [sizes[s % len(sizes)] for s in range(self.num_super)]

    def new_heads(self, round_idx: int, clusters=None, keep_super: bool = False) -> None:
        """Cluster ids are permuted between rounds: fresh heads and fresh head optimisers (keep_super:
        the super head and its momentum stay as they are)."""
        seed = self.cfg.seed * 1000 + round_idx
        init = self.cfg.train.head_init
        if not keep_super:
            self.module.super_head.reset(seed, init)
        params = list(self.module.super_head.parameters())
        self.heads = None
        if clusters is not None:  # cluster.method=pic finds its own k: the heads follow the round's
            self.sub_classes = clusters.k // clusters.m
        if self.sub_classes > 1:
            self.heads = RoutedHeads(self.module.trunk.feature_dim, self.num_super, self.sub_classes,
                                     self.device, seed=seed, loads=self.head_loads(clusters),
                                     sub_grad=self.cfg.train.sub_grad, init=init)
            params += list(self.heads.parameters())
        self.head_opt = sgd(params, self.cfg.train)
        if keep_super:
            checkpoint_state.load_param_state(self.head_opt, self.module.super_head, self._super_momentum)

    def release_training_state(self) -> None:
        """Before EXTRACT and CLUSTER: the last round's heads and their optimiser are replaced after
        the clustering anyway (its last save already holds them), and the gradients are rewritten by
        the next backward: free them, so that the clustering has their GPU memory (a sub head with
        gradient and momentum is 3.9 GB at the paper's settings)."""
        if self.head_opt is not None:  # small (S x D); carried over where keeps_super_head
            self._super_momentum = checkpoint_state.param_state(self.head_opt, self.module.super_head)
        self.heads, self.head_opt = None, None
        for param in self.module.parameters():
            param.grad = None

    def heads_for_round(self, round_idx: int, clusters) -> None:
        """After a re-clustering the targets are new: fresh heads. RotNet and supervised targets never
        change, so their classifier (and its momentum) carries on from the last round, as in the
        original's RotNet mode; only the first round, or a resume, builds it."""
        if self.clusters_needed or round_idx == 0:
            self.new_heads(round_idx, clusters, keep_super=round_idx > 0 and self.keeps_super_head)
        elif self.head_opt is None:  # resumed at a round boundary: the saved classifier
            self.restore_heads(round_idx, clusters)

    # ------------------------------------------------------------------ checkpoints

    def save(self, round_copy=None) -> None:
        """Collective. Each tensor once per save: the replicated part by rank 0, each sub head and
        its momentum by its group's first owner (train/checkpoint_state.py); returns after the host copy."""
        shared = checkpoint_state.shared_record(self.module, self.trunk_opt, self.head_opt, self.state,
                                          OmegaConf.to_yaml(self.cfg)) if self.env.is_main else None
        per_rank = checkpoint_state.rank_record(self.heads, self.head_opt, self.device)
        self.writer.save(shared, per_rank, self.state["global_step"], round_copy)

    def resume(self) -> bool:
        # a round copy (no rank files) only where a round boundary starts fresh heads anyway
        loaded = store.load(self.run_dir, map_location=self.device, round_fallback=self.clusters_needed)
        if loaded is None:
            return False
        shared, per_rank = loaded.shared, loaded.per_rank
        # before any state is touched: another run's checkpoint fails here naming the keys
        changes = resume_changes(shared["config"], self.cfg, shared["progress"], str(loaded.path))
        if loaded.rejected:
            distributed.print0(f"checkpoint: resuming from {loaded.path.name}, the newest usable one; skipped:\n  "
                               + "\n  ".join(loaded.rejected))
            self.logger.event("checkpoint_fallback", step=shared["global_step"], used=loaded.path.name,
                              rejected=loaded.rejected, round_copy=per_rank is None)
        self.module.load_state_dict(shared["model"])
        self.trunk_opt.load_state_dict(shared["trunk_opt"])
        self.state = dict(shared["progress"])
        if per_rank is not None:  # a round copy: the ranks' streams stay as seeded in __init__
            store.set_rng_state(per_rank, self.device)
        self._resumed = loaded
        self._super_momentum = {name: {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in state.items()}
                                for name, state in shared.get("super_head_optim", {}).items()}
        distributed.print0(f"resumed from {loaded.path} at {self.state}")
        self.logger.event("resume", step=self.state["global_step"], round=self.state["round"],
                          epoch=self.state["epoch"], epoch_step=self.state["step"], phase=self.state["phase"])
        for key, old, new in changes:  # the run's history of allowed changes (config.RESUMABLE_KEYS)
            distributed.print0(f"config change on resume: {key}: {old!r} -> {new!r}")
            self.logger.event("config_change", step=self.state["global_step"], key=key, old=old, new=new)
        return True

    def restore_heads(self, round_idx: int, clusters) -> None:
        """Resumed mid-round: the heads (super head included) and their optimiser as saved."""
        self.new_heads(round_idx, clusters)  # builds heads and optimiser; the saved values then overwrite them
        checkpoint_state.restore_from(self._resumed, self.run_dir, self.device, self.module, self.heads, self.head_opt)

    def maybe_checkpoint(self, state: dict, save: bool = False) -> bool:
        """train_epoch's checkpoint hook: is a save due after this step (mid-epoch; the epoch end
        saves anyway)? With save=True, save."""
        if save:
            self.save()
            return True
        every = self.cfg.train.ckpt_every_steps
        return every > 0 and state["global_step"] % every == 0 and state["step"] < self.steps

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self.resume()
        prev = load_cluster_state(self.run_dir, self.state["round"] - 1, self.env.rank) \
            if self.state["round"] > 0 and self.clusters_needed else None
        for round_idx in range(self.state["round"], self.num_rounds):
            if self.state["phase"] == "cluster":
                clusters = self.cluster(round_idx, prev)
                self.heads_for_round(round_idx, clusters)
                self.state.update(phase="train", epoch=round_idx * self.cfg.train.reassign, step=0)
                self.save()
            else:  # resumed inside the training phase of this round
                clusters = load_cluster_state(self.run_dir, round_idx, self.env.rank) \
                    if self.clusters_needed else None
                self.restore_heads(round_idx, clusters)
            self.train_round(round_idx, self.label_table(clusters))
            prev = clusters
            self.state.update(round=round_idx + 1, phase="cluster", step=0)
            self.save(round_copy=round_idx)
        self.finish()

    def train_round(self, round_idx: int, table: LabelTable) -> None:
        last_epoch = min((round_idx + 1) * self.cfg.train.reassign, self.cfg.train.epochs)
        while self.state["epoch"] < last_epoch:
            epoch, skip = self.state["epoch"], self.state["step"]
            loader = self.loader(epoch, train=True, skip_batches=skip, repeat_counts=table.repeat_counts)
            wire_start = distributed.loopback_bytes()
            summary = train_epoch(self.model, self.heads, table, loader, self.trunk_opt, self.head_opt,
                                  self.cfg, self.device, self.logger, self.state, self.total_steps,
                                  checkpoint=self.maybe_checkpoint)
            wire = self.wire_bytes_per_rank(wire_start)
            summary["loopback_bytes_per_rank_step"] = None if wire is None else wire / max(summary["steps"], 1)
            preempted = summary.pop("preempted")
            if preempted and self.state["step"] < self.steps:  # stopped mid-epoch
                self.stop_for_preemption()
            self.logger.event("epoch", step=self.state["global_step"], round=round_idx, epoch=epoch,
                              data_stats=reduce_stats(loader.stats), **summary)
            self.state.update(epoch=epoch + 1, step=0)
            self.save()
            if preempted:  # the signal came with the epoch's last step: that save is the checkpoint
                self.stop_for_preemption(save=False)

    def stop_for_preemption(self, save: bool = True):
        if save:
            self.save()
        self.writer.wait()  # every rank stops here: the last save published before the exit
        # the finished save of this step (file and checksum): just written, the round's start when
        # stopped in EXTRACT/CLUSTER (or its round copy, resumed from one), none in a new run's round 0
        g, r = self.state["global_step"], self.state["round"]
        found = [store.shared_file(self.run_dir, g)]
        if self.state["phase"] == "cluster" and r > 0:
            found.append(store.ckpt_dir(self.run_dir) / f"round_{r - 1}.pt")
        held = next((p for p in found if p.exists() and store.checksum_file(p).exists()), None)
        self.logger.event("preempted", step=self.state["global_step"], round=self.state["round"],
                          epoch=self.state["epoch"], epoch_step=self.state["step"], phase=self.state["phase"],
                          checkpoint=None if held is None else str(held))
        raise preemption.Preempted(self.state["global_step"], held)

    def finish(self) -> None:
        self.writer.wait()  # the last save (round copy included) published before the run ends
        if distributed.is_main():
            path = export_backbone(self.module.trunk, self.cfg.model.arch, self.run_dir / "export")
            distributed.print0(f"exported backbone to {path}")
        self.logger.event("done", step=self.state["global_step"], rounds=self.num_rounds)
        self.logger.close()


def train(cfg, on_preempted=None) -> None:
    """One rank's whole run (launch/train.py, slurm.Trainer): init, Run(cfg).run(), shutdown.

    On the preemption signal all ranks save the same step; then (preemption.stop_and_exit) rank 0
    writes RUN/preempted.json, `on_preempted(stop, previous_handler)` runs on every rank
    (slurm.Trainer: submitit's requeue on task 0), the ranks meet at a barrier so that none exits
    before the requeue is asked for, and each exits with PREEMPTED_EXIT_CODE unless on_preempted
    exited first. What the launchers then report: preemption.py's docstring.
    """
    previous_handler = preemption.install()  # before init: a signal during start-up is kept
    check_resume(cfg)  # before init and before config.yaml: another run's run_dir fails untouched
    with distributed.session(cfg.dist) as env:
        if env.is_main:
            save_config(cfg, cfg.run_dir)
            preemption.clear_marker(cfg.run_dir)
            note = preemption.launcher_note()
            if note:
                print(note, flush=True)
        try:
            Run(cfg).run()
        except preemption.Preempted as stop:
            distributed.print0(str(stop))
            preemption.stop_and_exit(stop, cfg.run_dir, env.is_main, env.world_size, on_preempted,
                                     previous_handler)


def check_resume(cfg) -> list:
    """Every rank, before torch.distributed: cfg against the config in run_dir's newest checkpoint
    (read by mmap, no tensor loaded; every rank reads the same file, so each decides alone). Raises
    config.ConfigError naming each key that may not change; returns the allowed changes, which
    Run.resume logs against the checkpoint it actually resumes from."""
    found = store.stored_config(cfg.run_dir)
    if found is None:
        return []
    path, record = found
    return resume_changes(record["config"], cfg, record["progress"], str(path))
