"""Training targets: (rotation y) x (super-cluster z1, sub-cluster z2) and the balancing weights.

Labels never leave the rank that read the images: `LabelTable` maps this rank's keys to their
(super, sub) labels. Super-class s = y * m + z1 (S = R * m classes); the sub-class head of s
predicts z2's index inside z1, i.e. z2 - z1 * (k // m).

Balancing ("big clusters must not dominate"), train.balance:
  weight    each sample weighs 1 / |its cluster| (super loss: super-cluster size, sub loss: sub-cluster
            size), normalised by the weight sum of the global batch. Equal in expectation to uniform
            sampling over sub-clusters for the sub loss, not for the super loss (uniform over the
            images of a super-cluster, not over its sub-clusters), and of high variance: one image
            of a singleton cluster can carry a large share of a step.
  resample  the original's sampler (DistUnifTargSampler: uniform over non-empty super-clusters, then
            over the super-cluster's non-empty sub-clusters, then over the cluster's images) realised
            in the stream: image i is read `expected_counts` times per epoch in expectation
            (repeated or dropped by the loader workers, dist_cluster/data/resample.py) and weighs 1.
  none      every sample weighs 1, read once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from dist_cluster.data.resample import expected_counts
from dist_cluster.data.transforms import rotate_batch


@dataclass
class Targets:
    images: torch.Tensor  # rotated images
    super_class: torch.Tensor  # [B] in [0, R * m)
    sub_local: torch.Tensor  # [B] in [0, k // m)
    super_weight: torch.Tensor  # [B]
    sub_weight: torch.Tensor  # [B]


class LabelTable:
    """This rank's key -> (super, sub) table, plus global cluster sizes for the weights.

    balance="resample": `repeat_counts` (key -> expected draws per epoch) is what the training
    loader needs; the weights are then 1, the sampler balances. None for the other modes.
    """

    def __init__(self, keys: Optional[np.ndarray], super_labels, sub_labels, super_sizes, sub_sizes,
                 k: int, m: int, balance: str):
        self.k, self.m = k, m
        self.index = None if keys is None else {key: i for i, key in enumerate(keys.tolist())}
        self.super_labels = None if keys is None else torch.as_tensor(np.asarray(super_labels), dtype=torch.long)
        self.sub_labels = None if keys is None else torch.as_tensor(np.asarray(sub_labels), dtype=torch.long)
        self.super_w = self._inverse(super_sizes, m, balance)
        self.sub_w = self._inverse(sub_sizes, k, balance)
        self.repeat_counts = None
        if balance == "resample" and keys is not None:
            self.repeat_counts = dict(zip(keys.tolist(), expected_counts(sub_labels, sub_sizes, m).tolist()))

    @staticmethod
    def _inverse(sizes, count: int, balance: str) -> torch.Tensor:
        if balance in ("none", "resample") or sizes is None:  # resample: the loader balances
            return torch.ones(count)
        sizes = torch.as_tensor(np.asarray(sizes), dtype=torch.float64)
        # empty clusters get weight 0: no sample carries them anyway
        return torch.where(sizes > 0, sizes.sum() / (count * sizes.clamp_min(1)), 0).float()

    @classmethod
    def supervised(cls, num_classes: int) -> "LabelTable":
        """The shards' own labels as the one flat level (the supervised upper bound)."""
        table = cls(None, None, None, None, None, num_classes, 1, "none")
        table.from_batch = True
        return table

    from_batch = False  # supervised: the batch's labels are the targets

    @classmethod
    def rotnet(cls) -> "LabelTable":
        """k = 1: every image in the one cluster, nothing to look up (nor to balance: with one
        cluster the original's sampler draws every image once per epoch in expectation)."""
        return cls(None, None, None, None, None, 1, 1, "none")

    def lookup(self, keys: Sequence[str], labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.from_batch:
            if labels is None or (labels < 0).any():
                raise ValueError("supervised mode needs labelled shards (.cls in every sample)")
            return torch.zeros(len(keys), dtype=torch.long), labels.long().cpu()
        if self.index is None:
            zeros = torch.zeros(len(keys), dtype=torch.long)
            return zeros, zeros.clone()
        try:
            rows = torch.tensor([self.index[key] for key in keys], dtype=torch.long)
        except KeyError as err:
            raise KeyError(f"image {err} has no cluster label on this rank: shard ownership changed "
                           "since the clustering (world size or shard list differs?)") from None
        return self.super_labels[rows], self.sub_labels[rows]


def make_targets(images: torch.Tensor, keys: Sequence[str], table: LabelTable, rotations: int,
                 all_rotations: bool, generator: torch.Generator, labels: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None, channels_last: bool = False) -> Targets:
    """Rotate the batch (one random rotation per image, or all four) and build its targets on
    `device` (default: the images' device).

    `generator` is a CPU generator seeded from (seed, epoch, step, rank): the rotations of a step
    are a function of where the run is, so a resumed run draws exactly the same ones. Labels and
    weights are looked up on the host and reach the device in ONE non-blocking copy.
    """
    device = device or images.device
    z1, z2 = table.lookup(keys, labels)
    n = len(keys)
    if rotations == 1:
        rot = torch.zeros(n, dtype=torch.long)
    elif all_rotations:
        rot = torch.arange(rotations).repeat_interleave(n)
        images, z1, z2 = images.repeat(rotations, 1, 1, 1), z1.repeat(rotations), z2.repeat(rotations)
    else:
        rot = torch.randint(0, rotations, (n,), generator=generator)
    sub_per_super = table.k // table.m
    host = torch.stack([rot.double(), (rot * table.m + z1).double(), (z2 - z1 * sub_per_super).double(),
                        table.super_w[z1].double(), table.sub_w[z2].double()])  # integers < 2^53: exact
    rot_d, super_class, sub_local, super_weight, sub_weight = to_device(host, device).unbind(0)
    images = images.to(device, non_blocking=True)
    images = rotate_batch(images, rot_d.long()) if rotations > 1 else images
    if channels_last:  # after the rotation, which does not keep the memory format
        images = images.contiguous(memory_format=torch.channels_last)
    return Targets(images=images, super_class=super_class.long(), sub_local=sub_local.long(),
                   super_weight=super_weight.float(), sub_weight=sub_weight.float())


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without blocking the host: through pinned memory on CUDA (a copy
    from pageable memory would wait for the whole stream)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
