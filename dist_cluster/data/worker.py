"""What runs inside each DataLoader worker: read its tars, drop corrupt samples, decode, batch.

    stream: shards (shuffled per epoch) -> raw samples [-> resample: dist_cluster/data/resample.py] -> shuffle
    buffer -> resume skip (raw bytes, nothing decoded) -> decode + per-sample transform -> batch [-> finish_batch]

With decode="device" the stream is the same up to the batch, but JPEGs are not decoded here: the
batch carries their bytes (EncodedBatch) and the main process decodes them on the run's device
(dist_cluster/data/device_decode.py). Other formats (PNG...) are still decoded and transformed here.

Corrupt samples are counted, never raised, and so are two kinds of hostile ones, found before any
pixel is decoded: an image whose header declares more than data.max_image_pixels (a decompression
bomb: 389 kB of PNG can ask for 1.2 GB), and a .cls outside [0, number of manifest classes) (a
supervised loss indexes its logits with it). A shard with fewer samples than its manifest count (a
cut tar, or a manifest that over-counts: the reader cannot tell them apart) raises ShortShardError,
or with data.allow_short_shards is counted too. The counters live in a shared-memory tensor so the
main process (ShardLoader.stats in dist_cluster/data/loader.py) sees them:
    samples           images delivered in batches        decoded          images decoded
    skipped_corrupt   no image / undecodable / bad .cls  truncated_shards tars that ended early
    lost_truncated    manifest count - samples read      refilled         samples from a second pass
    skipped_resume    raw samples passed over by skip_batches (never decoded)
    skipped_too_large header over max_image_pixels   skipped_bad_label .cls outside the classes
    repeated, dropped, unlabelled     resample (raw samples read): extra copies, samples drawn 0 times,
                      keys without a count (extraction found them corrupt: no cluster, dropped)
Device mode: `decoded` also counts the JPEGs passed on undecoded; those the main process then cannot
decode move from `samples` to `skipped_corrupt` (its own row of the counters).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import tarfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from dist_cluster.data.image_header import image_pixels
from dist_cluster.data.resample import resampled
from dist_cluster.data.tar_stream import is_plain_tar, tar_members

STAT_KEYS = ("samples", "decoded", "skipped_corrupt", "truncated_shards", "lost_truncated",
             "refilled", "skipped_resume", "skipped_too_large", "skipped_bad_label",
             "repeated", "dropped", "unlabelled")
SKIP_KEYS = ("skipped_corrupt", "skipped_too_large", "skipped_bad_label")  # why a sample was dropped
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000: 150 MB as RGB uint8; data.max_image_pixels
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")  # jpeg, png, gif (+ webp below)
JPEG_MAGIC = _MAGIC[0]
_READ_BUFFER = 1 << 20  # shard reads: 1 MiB at a time instead of 8 KiB (tar headers are 512 B each)


class EncodedBatch(NamedTuple):
    """A batch as a decode="device" worker ships it: JPEGs still encoded, other samples decoded.

    All the JPEG bytes of the batch travel as ONE flat tensor: every tensor crossing the worker
    queue costs a shared-memory segment and a file descriptor, one per batch instead of one per image.
    """
    data: torch.Tensor  # uint8 [sum(sizes)]: the JPEG files back to back
    sizes: list  # bytes of each JPEG, in batch order
    jpeg_at: list  # position in the batch of each JPEG
    images: Optional[torch.Tensor]  # uint8 [B - len(sizes), 3, h, w]: the other samples, per_sample done
    keys: list
    labels: torch.Tensor  # int64 [B]
    passes: list  # pass of each sample: part of its augmentation seed, and of the `refilled` count
    copies: list  # copy index of each sample (resample), part of its augmentation seed


def _split_name(name: str) -> tuple[Optional[str], str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): the WebDataset rule, key up to the first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{head}/{stem}" if head else stem), ext.lower()


class ShortShardError(RuntimeError):
    """A shard read to its end with fewer samples than the manifest lists. Raised inside a DataLoader
    worker, it reaches the main process through the DataLoader with this message."""


def read_tar(path: str, take: int, stats: dict, allow_short: bool = False) -> Iterator[dict]:
    """The first `take` complete samples of one tar, as {'__key__': key, ext: bytes}.

    A tar that ends early (cut file, bad header, missing file) yields the samples before the cut (the
    partial one at the cut is dropped), then raises ShortShardError; with allow_short, `take - yielded`
    is counted as lost instead.
    """
    yielded, pending, error = 0, None, None
    try:
        with open(path, "rb", buffering=_READ_BUFFER) as fileobj:
            for name, data in _members(fileobj):
                key, ext = _split_name(name)
                if key is None:
                    continue
                if pending is not None and key != pending["__key__"]:
                    yield pending
                    yielded, pending = yielded + 1, None
                    if yielded >= take:
                        return
                pending = pending or {"__key__": key}
                pending[ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        error = err
    if pending is not None and error is None and yielded < take:
        yield pending
        yielded += 1
    if yielded < take:  # tarfile ends silently at a cut between members: the manifest count tells
        _short_shard(path, take, yielded, error, stats, allow_short)


def _members(fileobj) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files: tar_stream for plain tars (7.6x tarfile on 28 px samples), tarfile
    for compressed ones."""
    plain = is_plain_tar(fileobj.read(8))
    fileobj.seek(0)
    if plain:
        yield from tar_members(fileobj)
        return
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, tar.extractfile(member).read()


def _short_shard(path: str, take: int, yielded: int, error: Optional[Exception], stats: dict,
                 allow_short: bool) -> None:
    what = f"{path}: {yielded} complete samples where the manifest promises {take}"
    if error is not None:
        what += f" (unreadable after them: {error!r})"
    if not allow_short:
        raise ShortShardError(f"{what}: a cut tar or a manifest that over-counts. Rebuild the shard "
                              f"(shards/build.py), or set data.allow_short_shards=true to train on what "
                              f"is there (counted as truncated_shards / lost_truncated)")
    if error is not None:
        warnings.warn(f"{what}; rest of the shard skipped")
    stats["truncated_shards"] += 1
    stats["lost_truncated"] += take - yielded


def _seed64(*parts) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _image_bytes(sample: dict) -> Optional[bytes]:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def _parse_label(sample: dict, has_labels: bool) -> Optional[int]:
    if not has_labels:
        return -1
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def skip_reason(sample: dict, has_labels: bool, num_classes: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """The counter (SKIP_KEYS) a sample is dropped under, from what can be checked without decoding
    pixels; None when it looks decodable. num_classes: labels must be in [0, num_classes) (0: the
    manifest lists no classes, only negatives are refused). max_pixels: 0 for no limit."""
    data = _image_bytes(sample)
    label = _parse_label(sample, has_labels)
    if data is None or label is None:
        return "skipped_corrupt"
    if not (data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        return "skipped_corrupt"
    if has_labels and (label < 0 or 0 < num_classes <= label):
        return "skipped_bad_label"
    if max_pixels > 0:
        pixels = image_pixels(data)
        if pixels is None:  # a signature but no readable size: the decoder's size is unknown too
            return "skipped_corrupt"
        if pixels > max_pixels:
            return "skipped_too_large"
    return None


def looks_decodable(sample: dict, has_labels: bool, num_classes: int = 0,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """The checks of decode_sample short of decoding pixels (skip_reason). Resume skips with them,
    so a skipped prefix drops the same samples as a full read, except images with a valid header
    and a broken body (seen only by decoding)."""
    return skip_reason(sample, has_labels, num_classes, max_pixels) is None


def check_same_shape(images) -> None:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes in one batch {sorted(shapes)}: "
                         f"the transform must end in a fixed-size crop")


def seeded_per_sample(per_sample: Callable, image: torch.Tensor, seed: int, epoch: int, key: str,
                      pass_index: int, copy: int = 0) -> torch.Tensor:
    """per_sample(image) with the global CPU generator seeded from (seed, epoch, key, pass[, copy]):
    the same augmentation wherever it runs (worker, main process, on a CUDA tensor: v2 draws its
    random parameters on the CPU), so a resumed epoch repeats it; each resampled copy its own (copy
    0 keeps the seed it had before resampling existed). The caller forks the RNG if it must."""
    parts = (seed, epoch, key, pass_index) + ((copy,) if copy else ())
    torch.default_generator.manual_seed(_seed64(*parts))  # 1 us; torch.manual_seed: 150 us
    return per_sample(image)


def decode_sample(sample: dict, has_labels: bool, num_classes: int = 0,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[tuple[torch.Tensor, int]]:
    """(uint8 RGB [3,H,W], label) or None for a sample to skip (skip_reason, or undecodable)."""
    if skip_reason(sample, has_labels, num_classes, max_pixels) is not None:
        return None
    return _decode_checked(sample, has_labels)


def _decode_checked(sample: dict, has_labels: bool) -> Optional[tuple[torch.Tensor, int]]:
    """decode_sample once skip_reason has passed the sample: the only place pixels are decoded."""
    label = _parse_label(sample, has_labels)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            raw = torch.frombuffer(bytearray(_image_bytes(sample)), dtype=torch.uint8)
            image = decode_image(raw, mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - any failure here is a property of the sample: counted skip
        return None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = to_dtype(image, torch.uint8, scale=True)
    return image, label


class WorkerReader:
    """Pipeline stage run by each DataLoader worker on its own slot of the plan: yields batches.

    A class, not a closure, so the pipeline also pickles under the spawn start method; the
    counters are a shared-memory tensor, so the main process sees every worker's counts.
    """

    def __init__(self, cfg: dict, transform: Optional[Callable], counters: torch.Tensor,
                 repeat_counts: Optional[Mapping[str, float]] = None):
        self.cfg, self.transform, self.counters = cfg, transform, counters
        self.repeat_counts = repeat_counts  # resample: key -> expected draws per epoch (this rank's keys)
        # transforms.SampleThenBatch: the elementwise tail runs once on the stacked batch
        self._per_sample = getattr(transform, "per_sample", transform)
        # no device: the workers finish the batch (parallel CPU); a device: uint8 crosses (4x less
        # than float32) and the main process finishes it there (ShardLoader.__iter__)
        self._finish_batch = getattr(transform, "finish_batch", None) if cfg["finish_in_worker"] else None

    def __call__(self, slots: Iterator[dict]) -> Iterator[tuple]:
        for slot in slots:  # exactly one: wds.split_by_worker kept this worker's slot
            stats = dict.fromkeys(STAT_KEYS, 0)
            try:
                yield from self._batches(slot, stats)
            finally:
                self._flush(slot["worker"], stats)

    def _flush(self, worker: int, stats: dict) -> None:
        self.counters[worker] = torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.int64)

    def _raw_pass(self, slot: dict, pass_index: int, stats: dict, tally: dict) -> Iterator[dict]:
        c, plan = self.cfg, list(slot["plan"])
        seeds = (c["seed"], c["epoch"], c["rank"], slot["worker"], pass_index)
        if c["shuffle"]:
            random.Random(_seed64("shards", *seeds)).shuffle(plan)
        samples = (s for name, take in plan
                   for s in read_tar(str(Path(c["root"]) / name), take, stats, c["allow_short_shards"]))
        samples = self._tallied(samples, tally)
        if self.repeat_counts is not None:
            samples = resampled(samples, self.repeat_counts, c["seed"], c["epoch"], pass_index, stats, tally)
        if c["shuffle"] and c["shuffle_buffer"] > 1:
            buffer = c["shuffle_buffer"]
            samples = wds.shuffle(buffer, buffer, rng=random.Random(_seed64("buffer", *seeds)))(samples)
        for sample in samples:
            sample["__pass__"] = pass_index
            yield sample

    @staticmethod
    def _tallied(samples: Iterator[dict], tally: dict) -> Iterator[dict]:
        for sample in samples:
            tally["read"] += 1
            yield sample

    def _raw_stream(self, slot: dict, stats: dict) -> Iterator[dict]:
        """Pass 0 of the worker's shards, then (equal_steps only) more passes while batches are owed."""
        passes = range(1 << 30) if self.cfg["equal_steps"] else range(1)
        for pass_index in passes:
            tally = dict(read=0, labelled=0)
            yield from self._raw_pass(slot, pass_index, stats, tally)
            if not self.cfg["equal_steps"]:
                continue
            where = f"rank {self.cfg['rank']} worker {slot['worker']}"
            if tally["read"] == 0:
                raise RuntimeError(f"{where}: no readable sample in {[n for n, _ in slot['plan']]}; "
                                   f"cannot fill {slot['quota']} batches")
            # a resampled pass may yield nothing (all drawn 0 times); a pass of unknown keys is an error
            if self.repeat_counts is not None and tally["labelled"] == 0:
                raise RuntimeError(f"{where}: none of the {tally['read']} keys read has a cluster label "
                                   "(balance=resample): shard ownership changed since the clustering?")

    def _good_samples(self, raw: Iterator[dict], stats: dict) -> Iterator[tuple]:
        c, current_pass, good_in_pass = self.cfg, None, True
        in_main = get_worker_info() is None
        for sample in raw:
            # a pass that gave samples, none good (a pass with none at all: resample dropped them all)
            if sample["__pass__"] != current_pass:
                if not good_in_pass:
                    skipped = ", ".join(f"{k}={stats[k]}" for k in SKIP_KEYS)
                    raise RuntimeError(f"rank {c['rank']}: a full pass over a worker's shards gave no decodable "
                                       f"sample ({skipped}); cannot fill the epoch")
                current_pass, good_in_pass = sample["__pass__"], False
            reason = self._skip_reason(sample)
            decoded = None if reason else self._decode(sample)
            stats["decoded"] += 1  # device mode: a JPEG is counted here, decoded in the main process
            if decoded is None:
                stats[reason or "skipped_corrupt"] += 1
                continue
            good_in_pass = True
            image, label = decoded
            if self.transform is not None and isinstance(image, torch.Tensor):
                # in the main process (num_workers=0) the caller's global RNG is left as it was
                with torch.random.fork_rng(devices=[]) if in_main else contextlib.nullcontext():
                    image = seeded_per_sample(self._per_sample, image, c["seed"], c["epoch"], sample["__key__"],
                                              sample["__pass__"], sample.get("__copy__", 0))
            yield image, sample["__key__"], label, sample["__pass__"], sample.get("__copy__", 0)

    def _skip_reason(self, sample: dict) -> Optional[str]:
        c = self.cfg
        return skip_reason(sample, c["has_labels"], c["num_classes"], c["max_image_pixels"])

    def _decode(self, sample: dict) -> Optional[tuple]:
        """A sample _skip_reason passed, decoded; in device mode a JPEG stays bytes (the header
        checks, pixel limit included, are done: the main process decodes it as it comes)."""
        has_labels = self.cfg["has_labels"]
        data = _image_bytes(sample)
        if self.cfg["decode"] == "device" and data.startswith(JPEG_MAGIC):
            return data, _parse_label(sample, has_labels)
        return _decode_checked(sample, has_labels)

    def _batches(self, slot: dict, stats: dict) -> Iterator[tuple]:
        c, batch_size = self.cfg, self.cfg["batch_size"]
        if c["equal_steps"] and slot["skip_batches"] >= slot["quota"]:
            return  # nothing owed (the passes of equal_steps never end by themselves)
        raw = self._raw_stream(slot, stats)
        to_skip = slot["skip_batches"] * batch_size
        while to_skip > 0:  # resume: the raw samples of this worker's skipped batches, none decoded
            sample = next(raw, None)
            if sample is None:
                break
            stats["skipped_resume"] += 1
            reason = self._skip_reason(sample)
            if reason is None:
                to_skip -= 1
            else:
                stats[reason] += 1
        made, items = slot["skip_batches"], []
        for item in self._good_samples(raw, stats):
            items.append(item)
            if len(items) == batch_size:
                batch = self._collate(items, stats)
                self._flush(slot["worker"], stats)  # before the yield: the main process reads them with it
                yield batch
                made, items = made + 1, []
                if c["equal_steps"] and made == slot["quota"]:
                    return
        if items:  # extraction only: equal_steps never runs dry (more passes)
            yield self._collate(items, stats)

    def _collate(self, items: list[tuple], stats: dict) -> tuple:
        stats["samples"] += len(items)  # device mode: the main process subtracts what it cannot decode
        stats["refilled"] += sum(item[3] > 0 for item in items)
        if self.cfg["decode"] == "device":
            return _collate_encoded(items)
        images, keys, labels, _, _ = zip(*items)
        check_same_shape(images)
        shape = (len(images), *images[0].shape)
        batch = torch.stack(images, out=_worker_tensor(shape, images[0].dtype))
        if self._finish_batch is not None:
            batch = self._finish_batch(batch, out=_worker_tensor(shape, torch.float32))
        return batch, list(keys), torch.tensor(labels, dtype=torch.long)


def _collate_encoded(items: list[tuple]) -> EncodedBatch:
    """EncodedBatch of (JPEG bytes or decoded uint8 image, key, label, pass, copy) items."""
    values, keys, labels, passes, copies = zip(*items)
    jpeg_at = [i for i, v in enumerate(values) if isinstance(v, bytes)]
    sizes = [len(values[i]) for i in jpeg_at]
    data = _worker_tensor((sum(sizes),), torch.uint8)
    flat, offset = data.numpy(), 0
    for i, size in zip(jpeg_at, sizes):  # straight into the shared segment: no joined copy
        flat[offset:offset + size] = np.frombuffer(values[i], dtype=np.uint8)
        offset += size
    images = [v for v in values if not isinstance(v, bytes)]
    stacked = None
    if images:
        check_same_shape(images)
        stacked = torch.stack(images, out=_worker_tensor((len(images), *images[0].shape), images[0].dtype))
    return EncodedBatch(data, sizes, jpeg_at, stacked, list(keys), torch.tensor(labels, dtype=torch.long),
                        list(passes), list(copies))


def _worker_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory inside a DataLoader worker: sending it to the main process
    then passes a handle instead of copying the batch (what torch's default_collate does too)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for size in shape:
        numel *= size
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)
