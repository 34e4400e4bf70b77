"""train.balance=resample: the original DeeperCluster sampler, realised in the streaming loader.

The original (facebookresearch/DeeperCluster, src/trainer.py) trains each super-class on its own
group of GPUs, all with the same batch size, and inside a group DistUnifTargSampler draws the same
number of images for every sub-cluster label present (with replacement where the cluster is small).
One draw thus picks a non-empty super-cluster uniformly, one of its non-empty sub-clusters
uniformly, then one of that cluster's images uniformly (rotations are drawn per sample, as here).

Here no rank holds the global label table, and the loaders stream their own shards. What can be
realised is each image's expected number of draws in an epoch, `expected_counts`: it depends only
on the image's own label and the global cluster sizes, so every rank computes it for its own images
(targets.LabelTable.repeat_counts). The loader workers then repeat or drop each raw sample by
stochastic rounding of that count (`draw_count`, a pure function of (seed, epoch, key, pass): the
resume skip replays the same copies), before the shuffle buffer, which spreads the copies
(worker.WorkerReader). The epoch keeps its batch count: a worker's quota cuts a long stream,
more passes (new draws) fill a short one. The loss weights are then 1.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Mapping

import numpy as np


def expected_counts(sub_labels, sub_sizes, m: int) -> np.ndarray:
    """Draws of each image in an epoch of N = sum(sub_sizes) draws of the original's sampler:
    e_i = N / (m' * k'_s * |c|), with m' the non-empty super-clusters, k'_s the non-empty
    sub-clusters of i's super-cluster s and |c| the size of i's sub-cluster c (global ids: c // (k/m) == s).
    """
    sizes = np.asarray(sub_sizes, dtype=np.int64)
    sub = np.asarray(sub_labels, dtype=np.int64)
    per_super = (sizes > 0).reshape(m, -1).sum(1)  # k'_s
    draws = sizes.sum() / (np.count_nonzero(per_super) * per_super[sub // (len(sizes) // m)])
    return draws / np.maximum(sizes[sub], 1)  # an image's cluster is never empty; max: no 0/0 warning


def draw_count(expected: float, seed: int, epoch: int, key: str, pass_index: int) -> int:
    """floor(expected) or ceil(expected), the latter with probability frac(expected): stochastic
    rounding, unbiased, drawn from (seed, epoch, key, pass) alone so a resumed epoch redraws it."""
    whole = math.floor(expected)
    digest = hashlib.blake2b(f"resample/{seed}/{epoch}/{key}/{pass_index}".encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "little") & ((1 << 63) - 1)) / (1 << 63)  # in [0, 1)
    return whole + (uniform < expected - whole)


def resampled(samples: Iterator[dict], counts: Mapping[str, float], seed: int, epoch: int, pass_index: int,
              stats: dict, tally: dict) -> Iterator[dict]:
    """Each raw sample draw_count times (the copies share its bytes), tagged with its copy index.

    A key without a count is dropped: extraction could not decode it, so it has no cluster.
    Counted: stats repeated (copies beyond the first), dropped (drawn 0 times), unlabelled;
    tally["labelled"]: samples of this pass that had a count.
    """
    for sample in samples:
        expected = counts.get(sample["__key__"])
        if expected is None:
            stats["unlabelled"] += 1
            continue
        tally["labelled"] += 1
        count = draw_count(expected, seed, epoch, sample["__key__"], pass_index)
        stats["dropped"] += count == 0
        stats["repeated"] += max(count - 1, 0)
        for copy in range(count):
            yield {**sample, "__copy__": copy}
