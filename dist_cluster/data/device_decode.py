"""data.decode=device: the loader workers ship JPEG bytes, the main process decodes them on the run's device.

    decoder = DeviceDecoder(transform, device, loader_cfg, counters_row)
    out = decoder(encoded_batch)      # (uint8 images [B', 3, h, w] on device, keys, labels) or None

Why: at 224 px, JPEG decoding + resizing is most of what host cores spend per image, and a GPU node
has few cores per GPU. On CUDA, torchvision.io.decode_jpeg decodes the whole batch in one nvjpeg
call; the per-sample augmentation then runs on the decoded CUDA tensors.

Same samples, same augmentations as decode=cpu: the workers read, shuffle, skip and batch exactly
as in cpu mode (a JPEG whose header looks valid is batched without decoding), and each image is
augmented with the seed the worker would have used (seeded_per_sample: the random parameters come
from the CPU generator even for a CUDA tensor). On device=cpu the output equals cpu mode exactly;
on CUDA it is close, not bitwise: nvjpeg is not libjpeg-turbo, and v2 resizes uint8 CUDA images in
float where the CPU has a uint8 kernel.

The workers have already applied the header checks (worker.skip_reason): no JPEG over
data.max_image_pixels and no label outside the manifest's classes reaches this process, so those
are skipped and counted (skipped_too_large, skipped_bad_label) exactly as in decode=cpu.

A JPEG that fails to decode (valid header, broken body) is dropped from its batch, which is then
short, and counted in skipped_corrupt, as decode=cpu counts it (where the worker refills the batch
instead). Resume is exact here: batches are made before decoding, so skip_batches replays them.

CUDA streams: torchvision's nvjpeg decoder allocates its outputs on the caller's stream but writes
them without waiting for the caller's pending kernels (reported in pytorch/vision PR 9606, closed;
torchcodec PR 1634 added the wait there), so it can overwrite a just-freed block that queued
kernels still read: silent corruption of the training step's tensors. The decoder therefore runs
on a stream of its own, synchronised before each decode call (only our previous batch's augment
kernels can be pending there, never the training step's); the caller's stream then waits for it,
and the batch is record_stream'ed so its block is not recycled while the caller still reads it.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dist_cluster.data.worker import STAT_KEYS, EncodedBatch, check_same_shape, seeded_per_sample


def _decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One decode_jpeg call for the whole list (one nvjpeg batch on CUDA); raises if any fails."""
    if device.type == "cuda":  # nothing pending on the current stream: see the module docstring
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


class DeviceDecoder:
    """Turns a worker's EncodedBatch into (uint8 images on `device`, keys, labels); see the module docstring.

    counters: the main process's row of the loader's shared counters (STAT_KEYS order); the workers
    own the other rows and overwrite them whole, so corrections go here.
    """

    def __init__(self, transform: Optional[Callable], device: torch.device, cfg: dict, counters: torch.Tensor):
        self.per_sample = getattr(transform, "per_sample", transform)
        self.device, self.cfg, self.counters = device, cfg, counters
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: EncodedBatch) -> Optional[tuple[torch.Tensor, list, torch.Tensor]]:
        if self.stream is None:
            return self._process(batch)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = self._process(batch)
        if out is not None:
            caller.wait_stream(self.stream)  # the caller's kernels start after the batch is made
            out[0].record_stream(caller)  # freed later: not reused before the caller's reads are done
        return out

    def _process(self, batch: EncodedBatch) -> Optional[tuple[torch.Tensor, list, torch.Tensor]]:
        jpegs = list(torch.split(batch.data, batch.sizes)) if batch.sizes else []
        images: list[Optional[torch.Tensor]] = [None] * len(batch.keys)
        for position, image in zip(batch.jpeg_at, self._augment(self._decode(jpegs), batch)):
            images[position] = image
        if batch.images is not None:  # decoded and augmented in the worker (not JPEG)
            jpeg_at = set(batch.jpeg_at)
            others = [i for i in range(len(images)) if i not in jpeg_at]
            for position, image in zip(others, batch.images.to(self.device, non_blocking=True)):
                images[position] = image
        keep = [i for i, image in enumerate(images) if image is not None]
        self._count_dropped([i for i in range(len(images)) if images[i] is None], batch)
        if not keep:
            return self._empty(batch)
        kept = [images[i] for i in keep]
        check_same_shape(kept)
        return torch.stack(kept), [batch.keys[i] for i in keep], batch.labels[keep]

    def _decode(self, jpegs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """All in one call; if that fails (one bad file fails the batch), one by one."""
        if not jpegs:
            return []
        try:
            return list(_decode_jpegs(jpegs, self.device))
        except RuntimeError:
            return [self._decode_one(data) for data in jpegs]

    def _decode_one(self, data: torch.Tensor) -> Optional[torch.Tensor]:
        try:
            return _decode_jpegs([data], self.device)[0]
        except RuntimeError:
            if self.device.type == "cpu":
                return None  # libjpeg-turbo, what the worker uses: really undecodable
        # nvjpeg lacks some variants libjpeg-turbo reads (e.g. CMYK): decode=cpu would keep the image
        try:
            return _decode_jpegs([data], torch.device("cpu"))[0].to(self.device)
        except RuntimeError:
            return None

    def _augment(self, decoded: list[Optional[torch.Tensor]], batch: EncodedBatch) -> list[Optional[torch.Tensor]]:
        if self.per_sample is None:
            return decoded
        c, out = self.cfg, []
        with torch.random.fork_rng(devices=[]):  # the caller's CPU generator is left as it was
            for position, image in zip(batch.jpeg_at, decoded):
                if image is not None:
                    image = seeded_per_sample(self.per_sample, image, c["seed"], c["epoch"], batch.keys[position],
                                              batch.passes[position], batch.copies[position])
                out.append(image)
        return out

    def _count_dropped(self, dropped: list[int], batch: EncodedBatch) -> None:
        """The worker counted these as delivered samples: move them to skipped_corrupt."""
        if not dropped:
            return
        row = dict(zip(STAT_KEYS, self.counters.tolist()))
        row["samples"] -= len(dropped)
        row["refilled"] -= sum(batch.passes[i] > 0 for i in dropped)
        row["skipped_corrupt"] += len(dropped)
        self.counters.copy_(torch.tensor([row[k] for k in STAT_KEYS], dtype=self.counters.dtype))

    def _empty(self, batch: EncodedBatch) -> None:
        """Every image of the batch failed: extraction goes on without it; training cannot, since
        every rank must take the same number of steps."""
        if self.cfg["equal_steps"]:
            raise RuntimeError(f"rank {self.cfg['rank']}: no image of a training batch could be decoded "
                               f"({len(batch.keys)} corrupt JPEGs, first key {batch.keys[0]!r})")
        return None
