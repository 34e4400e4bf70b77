"""Streaming reader for WebDataset shards: each rank reads its own fixed shards, nobody else's.

    loader = ShardLoader("data/fmnist/train", rank, world, batch_size=64, num_workers=2,
                         transform=train_transform(28, 0.5), seed=0, epoch=e, shuffle=True,
                         equal_steps=True, skip_batches=resume_step)
    for images, keys, labels in loader:   # FloatTensor[B,3,H,W], list[str], LongTensor[B] (-1: no labels)
        ...
    log(reduce_stats(loader.stats))       # counts of corrupt / lost / refilled samples, summed over ranks
    ShardLoader(..., device=torch.device("cuda"), decode="device")   # workers ship JPEG bytes, nvjpeg decodes
    ShardLoader(..., repeat_counts=table.repeat_counts)   # balance=resample: key -> expected draws per epoch

Plan (from the manifest alone, identical on every rank, independent of the epoch): shards go to
ranks greedily (largest first to the least-loaded rank), then the same way to the rank's DataLoader
workers; worker w reads only its own shards (the stream inside a worker: dist_cluster/data/worker.py).
Batch i of the epoch comes from worker i % W while every worker still has batches (the DataLoader's
round robin), which is what `_batch_owners` replays to resume mid-epoch.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Iterator, Mapping, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from dist_cluster.data.device_decode import DeviceDecoder
from dist_cluster.data.manifest import Manifest, ShardInfo, load_manifest
from dist_cluster.data.worker import DEFAULT_MAX_PIXELS, STAT_KEYS, WorkerReader
from dist_cluster.runtime import comm

# ---------------------------------------------------------------- the plan (manifest only)


def _greedy_bins(sizes: list[int], bins: int, min_items: int) -> list[list[int]]:
    """Indices of `sizes` per bin: largest first to the least-loaded bin (ties: lowest bin).

    Every bin gets at least `min_items` items (caller checks len(sizes) >= bins * min_items):
    once the items left are just enough to fill the bins still short, only those bins take them.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    deficit = bins * min_items
    for pos, item in enumerate(order):
        forced = len(order) - pos <= deficit
        load, b = heapq.heappop(heap)
        while forced and len(out[b]) >= min_items:  # b has enough; it takes nothing more
            load, b = heapq.heappop(heap)
        out[b].append(item)
        deficit -= len(out[b]) <= min_items
        heapq.heappush(heap, (load + sizes[item], b))
    return [sorted(b) for b in out]


def _check_enough_shards(manifest: Manifest, world: int, num_workers: int) -> None:
    readers = world * max(1, num_workers)
    if len(manifest.shards) < readers:
        raise ValueError(
            f"{manifest.name}: {len(manifest.shards)} shards for {world} ranks x {max(1, num_workers)} "
            f"loader workers = {readers} readers; every reader needs at least one shard. Build more, "
            f"smaller shards (shards/build.py) or lower data.num_workers "
            f"(at most {max(len(manifest.shards) // world, 0)} here).")


def _rank_shard_indices(manifest: Manifest, world: int, num_workers: int) -> list[list[int]]:
    _check_enough_shards(manifest, world, num_workers)
    return _greedy_bins([s.num_samples for s in manifest.shards], world, max(1, num_workers))


def _split_workers(manifest: Manifest, indices: list[int], num_workers: int) -> list[list[ShardInfo]]:
    sizes = [manifest.shards[i].num_samples for i in indices]
    return [[manifest.shards[indices[j]] for j in b] for b in _greedy_bins(sizes, max(1, num_workers), 1)]


def assign_shards(manifest: Manifest, rank: int, world: int, num_workers: int) -> list[ShardInfo]:
    """This rank's shards (manifest order): fixed, disjoint across ranks, balanced by samples."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return [manifest.shards[i] for i in _rank_shard_indices(manifest, world, num_workers)[rank]]


def read_plan(manifest: Manifest, rank: int, world: int, num_workers: int,
              max_samples: int = 0) -> list[list[tuple[str, int]]]:
    """Per loader worker of this rank: [(shard name, samples to read from it)].

    max_samples > 0 keeps a fixed subset (the first samples of each worker's shards, its even share
    of max_samples), the same whatever the epoch or shuffle: extraction and training see the same keys.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    indices = _rank_shard_indices(manifest, world, num_workers)[rank]
    workers = _split_workers(manifest, indices, num_workers)
    plans = []
    for w, shards in enumerate(workers):
        budget = math.inf
        if max_samples > 0:
            budget = max_samples // len(workers) + (w < max_samples % len(workers))
        plan = []
        for shard in shards:
            take = int(min(shard.num_samples, budget))
            if take > 0:
                plan.append((shard.name, take))
            budget -= take
        plans.append(plan)
    return plans


def steps_per_epoch(manifest: Manifest, world: int, batch_size: int, num_workers: int,
                    max_samples: int = 0) -> int:
    """Full batches every rank can take this epoch: min over ranks of sum over its workers of
    (worker samples // batch_size). Batches are built inside workers, so that is what a rank can
    give without mixing workers; it equals (rank samples // batch_size) when worker counts divide."""
    per_rank = []
    for rank in range(world):
        plans = read_plan(manifest, rank, world, num_workers, max_samples)
        per_rank.append(sum(sum(t for _, t in p) // batch_size for p in plans))
    steps = min(per_rank)
    if steps == 0:
        worst = per_rank.index(0)
        raise ValueError(f"{manifest.name}: rank {worst} of {world} gets no full batch of {batch_size} "
                         f"per epoch ({manifest.num_samples} samples, {num_workers} workers per rank): "
                         f"lower data.batch_size or data.num_workers, or use more data / fewer ranks")
    return steps


def _worker_quotas(capacities: list[int], steps: int) -> list[int]:
    """Batches per worker summing to `steps`: round robin (batch i from worker i % W) where every
    worker can give its share, else the excess moves to the workers with the most room left."""
    n = len(capacities)
    quotas = [len(range(w, steps, n)) for w in range(n)]
    excess = sum(max(0, q - c) for q, c in zip(quotas, capacities))
    quotas = [min(q, c) for q, c in zip(quotas, capacities)]
    while excess > 0:
        w = max(range(n), key=lambda i: (capacities[i] - quotas[i], -i))
        quotas[w] += 1
        excess -= 1
    return quotas


def _batch_owners(counts: list[int]) -> list[int]:
    """Worker of each batch in DataLoader order: round robin over the workers that still have batches."""
    left, owners = list(counts), []
    while any(left):
        for w in range(len(left)):
            if left[w]:
                owners.append(w)
                left[w] -= 1
    return owners


# ---------------------------------------------------------------- the loader


class ShardLoader:
    """One epoch of one rank's shards; iterate for (images, keys, labels). See the module docstring.

    equal_steps=True (training): exactly steps_per_epoch(...) full batches on every rank (short
    workers re-read their shards, counted in stats['refilled']).
    A listed shard missing on disk fails here; one with fewer samples than its manifest count fails
    the epoch when it is read (worker.ShortShardError, naming it), unless allow_short_shards
    (data.allow_short_shards): then the shortfall is counted (truncated_shards, lost_truncated).
    equal_steps=False (extraction): every sample of the rank once, deterministic order, each worker's last batch may be partial.
    skip_batches=n: the first n batches are skipped before decoding; the rest are those of an
    uninterrupted epoch (exactly, unless the skipped part holds an image with a valid header and a
    broken body: see looks_decodable).
    decode="device": the workers batch JPEGs undecoded and the main process decodes them on `device`
    (CPU when None), same samples and augmentations (dist_cluster/data/device_decode.py); a JPEG that
    fails there leaves its batch short.
    max_image_pixels: images whose header declares more pixels are skipped before decoding (0: no
    limit); labels outside [0, len(manifest.classes)) too; both counted (worker.skip_reason).
    repeat_counts (training only; train.balance=resample, targets.LabelTable.repeat_counts): key ->
    expected draws per epoch, for this rank's keys; the workers repeat or drop each raw sample by
    seeded stochastic rounding of it (worker.draw_count). The batch count stays the one above:
    a worker's resampled stream is cut at its quota or continued with more passes.
    len(loader) is the epoch's batch count; iteration yields len(loader) - skip_batches of them.
    """

    def __init__(self, shard_dir: str, rank: int, world: int, batch_size: int, num_workers: int,
                 transform: Optional[Callable] = None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 equal_steps: bool = True, skip_batches: int = 0, shuffle_buffer: int = 1000,
                 max_samples: int = 0, pin_memory: bool = False, mp_context: Optional[str] = None,
                 device: Optional[torch.device] = None, allow_short_shards: bool = False,
                 decode: str = "cpu", max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 repeat_counts: Optional[Mapping[str, float]] = None):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode must be 'cpu' or 'device', got {decode!r}")
        if repeat_counts is not None and not equal_steps:
            raise ValueError("repeat_counts (resampling) is for training loaders; extraction reads every sample once")
        if decode == "device" and device is None:
            device = torch.device("cpu")  # decoded in the main process, on its CPU
        self.manifest = load_manifest(shard_dir)
        self.plans = read_plan(self.manifest, rank, world, num_workers, max_samples)
        # this rank's shards only: every rank stats its own, not all of them every epoch
        self.manifest.check_files(shard_dir, [name for plan in self.plans for name, _ in plan])
        self.capacities = [sum(t for _, t in p) for p in self.plans]
        self.num_workers, self.pin_memory, self.transform = num_workers, pin_memory, transform
        self.repeat_counts = repeat_counts
        self.mp_context = mp_context  # None: the platform default; "fork" starts workers fastest
        self.device = device  # set: uint8 batches go there and are normalised there (4x less IPC, PCIe)
        if equal_steps:
            steps = steps_per_epoch(self.manifest, world, batch_size, num_workers, max_samples)
            self.worker_batches = _worker_quotas([c // batch_size for c in self.capacities], steps)
        else:
            self.worker_batches = [math.ceil(c / batch_size) for c in self.capacities]
        self.cfg = dict(root=str(shard_dir), rank=rank, world=world, batch_size=batch_size, seed=seed,
                        shuffle=shuffle, shuffle_buffer=shuffle_buffer, equal_steps=equal_steps,
                        has_labels=self.manifest.has_labels, finish_in_worker=device is None,
                        allow_short_shards=allow_short_shards, decode=decode,
                        num_classes=len(self.manifest.classes), max_image_pixels=int(max_image_pixels))
        # a row per worker, written by that worker; the last row: the main process (device decode)
        self._counters = torch.zeros(len(self.plans) + 1, len(STAT_KEYS), dtype=torch.int64).share_memory_()
        self.set_epoch(epoch, skip_batches)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches={skip_batches} outside [0, {len(self)}] batches of this epoch")
        self.cfg["epoch"], self.skip_batches = epoch, skip_batches
        owners = _batch_owners(self.worker_batches)
        self._skips = [owners[:skip_batches].count(w) for w in range(len(self.plans))]
        # a fresh DataLoader starts its round robin at worker 0: hand worker 0 the slot that owns the
        # next batch, worker 1 the slot after it..., and the merge continues where the epoch was
        self._first_slot = owners[skip_batches] if skip_batches < len(owners) else 0

    def __len__(self) -> int:
        return sum(self.worker_batches)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in an extraction epoch (from the manifest)."""
        return sum(self.capacities)

    @property
    def stats(self) -> dict:
        """Counters of the current/last iteration, summed over workers (and the main process's decoder)."""
        return dict(zip(STAT_KEYS, self._counters.sum(0).tolist()))

    def __iter__(self) -> Iterator[tuple]:
        self._counters.zero_()
        slots = [dict(worker=w, plan=p, quota=q, skip_batches=s)
                 for w, (p, q, s) in enumerate(zip(self.plans, self.worker_batches, self._skips))]
        slots = slots[self._first_slot:] + slots[:self._first_slot]
        pipeline = wds.DataPipeline([slots], wds.split_by_worker,  # [slots]: a list arg is read as stages
                                    WorkerReader(dict(self.cfg), self.transform, self._counters, self.repeat_counts))
        loader = DataLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False, in_order=True,
                            multiprocessing_context=self.mp_context if self.num_workers else None,
                            generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        if self.device is None:
            yield from loader
            return
        finish = getattr(self.transform, "finish_batch", None)
        decoder = None
        if self.cfg["decode"] == "device":
            decoder = DeviceDecoder(self.transform, self.device, dict(self.cfg), self._counters[-1])
        for batch in loader:
            if decoder is not None:
                batch = decoder(batch)
                if batch is None:  # an extraction batch without one decodable JPEG (counted)
                    continue
            images, keys, labels = batch
            images = images.to(self.device, non_blocking=True)
            yield (finish(images) if finish is not None else images), keys, labels


def make_loader(cfg_data, shard_dir: str, rank: int, world: int, transform: Callable, seed: int, epoch: int,
                train: bool, device: torch.device, skip_batches: int = 0,
                repeat_counts: Optional[Mapping[str, float]] = None) -> ShardLoader:
    """ShardLoader from the `data` config section: train=True shuffles with equal steps, else extraction.

    `device` is the run's device (distributed.env().device), never guessed from what the machine
    has: on CUDA, batches arrive there as uint8 from pinned memory and are normalised there (4x less
    than float32 over PCIe); on CPU the workers normalise them. cfg_data.decode=device: JPEGs are
    decoded on `device` in this process (nvjpeg on CUDA), not in the workers.
    repeat_counts: balance=resample (training only, see ShardLoader).
    """
    cuda, on_device = device.type == "cuda", cfg_data.decode == "device"
    return ShardLoader(shard_dir, rank, world, cfg_data.batch_size, cfg_data.num_workers, transform, seed, epoch,
                       shuffle=train, equal_steps=train, skip_batches=skip_batches,
                       shuffle_buffer=cfg_data.shuffle_buffer, max_samples=cfg_data.max_samples, pin_memory=cuda,
                       device=device if cuda or on_device else None, allow_short_shards=cfg_data.allow_short_shards,
                       decode=cfg_data.decode, max_image_pixels=cfg_data.max_image_pixels,
                       repeat_counts=repeat_counts if train else None)


def reduce_stats(stats: dict, group=None) -> dict:
    """Loader stats summed over ranks, for logging (a collective: every rank calls it, same keys)."""
    keys = sorted(stats)
    values = comm.all_reduce(torch.tensor([stats[k] for k in keys], dtype=torch.int64), group)
    return dict(zip(keys, values.tolist()))
