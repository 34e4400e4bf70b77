"""EXTRACT: every rank runs the trunk over its own shards (center crop, eval mode) and keeps the
pre-ReLU penultimate features of its images, with their keys, for the clustering stage.

Features stay on the rank that read the images (brief: no stage funnels data through one rank).
They live in RAM, or in a memmap on local disk when they exceed `cluster.memmap_gb` per rank
(scratch.private_memmap: its file is unlinked at once, so its space is freed with the returned
tensor, after a completed round as after an exception; nothing is left in cluster.memmap_dir).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dist_cluster.runtime import distributed
from dist_cluster.runtime.distributed import autocast_for
from dist_cluster.runtime.logger import progress
from dist_cluster.runtime.preemption import NO_POLL
from dist_cluster.runtime.scratch import private_memmap


def features_bytes(rows: int, dim: int) -> int:
    return rows * dim * 4  # float32


def features_in_ram(rows: int, dim: int, memmap_gb: float) -> bool:
    """Whether feature_buffer keeps the features in RAM (else a local-disk memmap)."""
    return features_bytes(rows, dim) <= memmap_gb * 2**30


def keys_bytes(rows: int, key_chars: int) -> tuple[int, int]:
    """(kept, transient) host bytes of the keys: the numpy unicode array returned (4 bytes a
    character), and the per-batch arrays it is concatenated from. Each batch's str objects become an
    array at once: a list of every key as str objects (~70 bytes each) would stay resident in
    CPython's allocator after it is freed."""
    return rows * key_chars * 4, rows * key_chars * 4


def feature_buffer(rows: int, dim: int, memmap_gb: float, memmap_dir: str, tag: str):
    """(float32 [rows, dim] buffer, memmap path for logs or None): a torch tensor in RAM, or a torch
    view of a private local-disk memmap (scratch.private_memmap: already unlinked, freed with it)."""
    nbytes = features_bytes(rows, dim)
    if features_in_ram(rows, dim, memmap_gb):
        return torch.empty(rows, dim, dtype=torch.float32), None
    array = private_memmap(memmap_dir, f"feats.{tag}.rank{distributed.rank()}.f32", (rows, dim))
    path = getattr(array, "filename", None) or memmap_dir
    distributed.print0(f"extract: {nbytes / 2**30:.1f} GiB of features per rank -> memmap {path}")
    return torch.from_numpy(array), path


@torch.no_grad()
def extract_features(trunk: torch.nn.Module, loader, max_rows: int, feature_dim: int, device: torch.device,
                     cfg_cluster, bf16: bool = True, channels_last: bool = False, tag: str = "round",
                     poll=NO_POLL):
    """(features [n, D] float32 CPU tensor, keys np.ndarray[str], stats) for this rank's images.

    `max_rows` bounds the rows (the rank's samples in the manifest); corrupt samples skipped by the
    loader make n smaller, never larger. `poll` (preemption.UnevenLoopPoll) is stepped once per
    batch and finished after the last one; when it raises, the memmap (if any) is released.
    """
    was_training = trunk.training
    trunk.eval()
    feats, memmap_path = feature_buffer(max_rows, feature_dim, cfg_cluster.memmap_gb, cfg_cluster.memmap_dir, tag)
    keys: list[np.ndarray] = []  # one array per batch (keys_bytes)
    rows, start = 0, time.perf_counter()
    try:
        for images, batch_keys, _ in progress(loader, desc="extract", total=len(loader)):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, bf16):
                out = trunk(images)
            if rows + len(out) > max_rows:
                raise RuntimeError(f"loader yielded more than the {max_rows} samples the manifest promises")
            feats[rows:rows + len(out)] = out.float().cpu()
            if len(batch_keys):  # an empty batch adds nothing (np.asarray([]) would be float64)
                keys.append(np.asarray(batch_keys))
            rows += len(out)
            poll.step()
        poll.finish()
    except BaseException:
        del feats  # the traceback keeps this frame: drop the mapping now, not when the exception dies
        raise
    trunk.train(was_training)
    seconds = time.perf_counter() - start
    stats = {"images": rows, "seconds": seconds, "img_per_s": rows / max(seconds, 1e-9),
             "memmap": str(memmap_path) if memmap_path else ""}
    return feats[:rows], np.concatenate(keys) if keys else np.asarray([]), stats
