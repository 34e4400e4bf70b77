"""Frozen features of a labelled shard split for the probes, and reading samples from shards by key.

    backbone = load_backbone("RUN")                  # RUN/checkpoints/last.pt, else RUN/export/
    split = extract_split(backbone.trunk, "data/fmnist/test", backbone.cfg.data, device, layer_dims=10000)
    whole = gather_split(split)                      # rank 0: all ranks' rows sorted by key; None elsewhere
    mine = share_split(split, feats_to=[0], block_to={"conv1": 1, "conv2": 0})   # or each part where needed
    members = read_members("data/fmnist/train", keys, exts=("png", "cls"))   # {key: {ext: bytes}}

Every rank extracts its own shards (ShardLoader rank/world, no shuffle, every sample once, center
crop, float32, eval mode; one forward pass gives the features and the block outputs). The rows
then go, in bounded row chunks, to the ranks whose probes need them (a probe needs the whole small,
labelled evaluation set in one place): the penultimate features to the ranks that fit probes on
them, each block's pooled output to the rank that fits its probe. Rows are sorted by key, so the
result is the same for any number of ranks (up to float rounding).
"""
from __future__ import annotations

import json
import math
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from dist_cluster.data.loader import ShardLoader
from dist_cluster.data.manifest import load_manifest
from dist_cluster.data.transforms import extract_transform
from dist_cluster.data.worker import DEFAULT_MAX_PIXELS
from dist_cluster.models import VGG16BN, ResNet50, build_trunk
from dist_cluster.models.export import load_exported
from dist_cluster.runtime import comm
from dist_cluster.runtime.logger import progress

# ---------------------------------------------------------------- the backbone


@dataclass
class Backbone:
    trunk: nn.Module  # eval mode
    super_head: Optional[nn.Linear]  # the run's super-class head (Grad-CAM); None for an export
    cfg: object  # the run's resolved config (DictConfig)
    source: str  # the file the weights came from


def _strip_wrappers(state: dict) -> dict:
    """Keys of a DDP / torch.compile wrapped module saved as is ('module.', '_orig_mod.')."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def _load_checkpoint(path: Path) -> Backbone:
    record = torch.load(path, map_location="cpu", weights_only=True)
    if "model" not in record or "config" not in record:
        raise ValueError(f"{path}: not a training checkpoint (needs keys 'model' and 'config', has {sorted(record)})")
    cfg = OmegaConf.create(record["config"])
    state = _strip_wrappers(record["model"])
    trunk = build_trunk(cfg.model, cfg.data.image_size)
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")})
    head = None
    if "super_head.weight" in state:
        weight = state["super_head.weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict({"weight": weight, "bias": state["super_head.bias"]})
        head.eval()
    return Backbone(trunk.eval(), head, cfg, str(path))


def _load_torchvision_export(path: Path) -> nn.Module:
    """An exported vgg16_bn / resnet50 back into a trunk (no Sobel layer: it is folded into conv1)."""
    meta = json.loads(path.with_suffix(".json").read_text())
    trunk = {"vgg16_bn": VGG16BN, "resnet50": ResNet50}[meta["arch"]](sobel=False)
    geo = meta["conv1"]
    wide = nn.Conv2d(3, 64, tuple(geo["kernel_size"]), stride=tuple(geo["stride"]),
                     padding=tuple(geo["padding"]), bias=geo["bias"])
    if meta["arch"] == "vgg16_bn":
        trunk.features[0] = wide
    else:
        trunk.conv1 = wide
    trunk.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return trunk.eval()


def _load_export(path: Path, run_dir: Path) -> Backbone:
    config = run_dir / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing: an exported backbone needs the run's config (image size)")
    cfg = OmegaConf.load(config)
    meta = json.loads(path.with_suffix(".json").read_text())
    trunk = load_exported(path) if meta.get("format") == "dist_cluster.smallvgg" else _load_torchvision_export(path)
    return Backbone(trunk, None, cfg, str(path))


def load_backbone(run_dir, checkpoint: Optional[str] = None) -> Backbone:
    """checkpoint (a .pt checkpoint or an exported .pth), else RUN/checkpoints/last.pt, else RUN/export/."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        last = run_dir / "checkpoints" / "last.pt"
        exports = sorted((run_dir / "export").glob("*_backbone.pth"))
        if not last.exists() and not exports:
            raise FileNotFoundError(f"{run_dir}: neither checkpoints/last.pt nor export/*_backbone.pth")
        path = last if last.exists() else exports[0]
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint {path} does not exist")
    if path.with_suffix(".json").exists() and path.suffix == ".pth":
        return _load_export(path, run_dir)
    return _load_checkpoint(path)


# ---------------------------------------------------------------- extraction


def pool_side(channels: int, height: int, width: int, max_dims: int) -> tuple[int, int]:
    """Output side of the average pool that keeps channels x side^2 <= max_dims (never upsamples)."""
    side = max(1, math.isqrt(max(1, max_dims // channels)))
    return min(side, height), min(side, width)


def pool_block(x: torch.Tensor, max_dims: int) -> torch.Tensor:
    """[B, C, H, W] conv output -> [B, <= max_dims] by adaptive average pooling (the papers' probes)."""
    side = pool_side(x.shape[1], x.shape[2], x.shape[3], max_dims)
    return torch.flatten(F.adaptive_avg_pool2d(x, side), 1)


@dataclass
class Split:
    feats: np.ndarray  # [n, D] float32, penultimate, pre-ReLU
    labels: np.ndarray  # [n] int64 (-1: unlabelled shards)
    keys: np.ndarray  # [n] str
    blocks: dict = field(default_factory=dict)  # block name -> [n, d] float32 pooled block outputs

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.feats[index], self.labels[index], self.keys[index],
                     {name: x[index] for name, x in self.blocks.items()})


def reading_ranks(shard_dir, world: int) -> int:
    """How many ranks read a split: all of them, or one per shard when it has fewer shards than ranks
    (a small labelled set built as one shard): evaluation only reads, so the other ranks get no rows
    and the probes still run on every rank (share_split sends each its rows)."""
    return max(1, min(world, len(load_manifest(shard_dir).shards)))


def usable_workers(shard_dir, readers: int, wanted: int) -> int:
    """Loader workers per reading rank such that every worker has a shard (ShardLoader's rule)."""
    return min(wanted, len(load_manifest(shard_dir).shards) // readers)


def _max_pixels(cfg_data) -> int:
    """data.max_image_pixels of the run; a run saved before the key existed gets the default."""
    value = getattr(cfg_data, "max_image_pixels", None)
    return DEFAULT_MAX_PIXELS if value is None else int(value)


@torch.no_grad()
def extract_split(trunk: nn.Module, shard_dir, cfg_data, device: torch.device, rank: int = 0, world: int = 1,
                  batch_size: int = 256, num_workers: int = 2, layer_dims: int = 0, max_samples: int = 0,
                  desc: str = "extract", channels_last: bool = False) -> Split:
    """This rank's rows: penultimate features and (layer_dims > 0) pooled block outputs.

    channels_last: NHWC input, as the run trained (model.channels_last): float32 either way, the
    same features up to rounding (~1e-6 relative), 1.6x faster on CPU for smallvgg. A split of fewer
    shards than ranks is read by the first ranks alone (reading_ranks); the others return no rows."""
    readers = reading_ranks(shard_dir, world)
    if rank >= readers:
        dim = getattr(trunk, "feature_dim", 0)
        return Split(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, dtype=str), {})
    loader = ShardLoader(str(shard_dir), rank, readers, batch_size, usable_workers(shard_dir, readers, num_workers),
                         transform=extract_transform(cfg_data.resize, cfg_data.image_size), seed=0, epoch=0,
                         shuffle=False, equal_steps=False, max_samples=max_samples,
                         max_image_pixels=_max_pixels(cfg_data))
    trunk.eval()
    rows, cap = 0, loader.num_samples
    feats, labels, keys, blocks = None, np.full(cap, -1, np.int64), [], {}
    for images, batch_keys, batch_labels in progress(loader, desc=desc, total=len(loader)):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # one pass for both: the per-layer probes used to cost a second forward of every image
        out, outs = trunk.forward_with_blocks(images) if layer_dims > 0 else (trunk(images), [])
        out = out.float().cpu().numpy()
        if feats is None:
            feats = np.empty((cap, out.shape[1]), np.float32)
        stop = rows + len(out)
        feats[rows:stop], labels[rows:stop] = out, batch_labels.numpy()
        keys.extend(batch_keys)
        if layer_dims > 0:
            for name, x in zip(trunk.block_names, outs):
                pooled = pool_block(x.float(), layer_dims).cpu().numpy()
                if name not in blocks:
                    blocks[name] = np.empty((cap, pooled.shape[1]), np.float32)
                blocks[name][rows:stop] = pooled
        rows = stop
    dim = getattr(trunk, "feature_dim", 0) if feats is None else feats.shape[1]
    feats = np.zeros((0, dim), np.float32) if feats is None else feats
    return Split(feats[:rows], labels[:rows], np.asarray(keys, dtype=str),
                 {name: x[:rows] for name, x in blocks.items()})


# ---------------------------------------------------------------- gathering to rank 0


def gather_rows(x: np.ndarray, dst: int = 0, chunk_bytes: int = 256 << 20) -> Optional[np.ndarray]:
    """All ranks' rows of x concatenated in rank order on `dst` (None elsewhere). Collective.

    Rows travel in rounds of at most ~chunk_bytes per rank, so no buffer is larger than that on any
    device (NCCL gathers through GPU memory). Trailing dims and dtype must agree across ranks.
    """
    world, me = comm.group_size(), comm.group_rank()
    if world == 1:
        return x
    counts = comm.all_gather_rows_count(len(x))
    row_bytes = max(1, int(np.prod(x.shape[1:])) * x.itemsize)
    step = max(1, chunk_bytes // row_bytes)
    out = np.empty((sum(counts),) + x.shape[1:], x.dtype) if me == dst else None
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for start in range(0, max(counts), step):
        piece = np.zeros((step,) + x.shape[1:], x.dtype)
        mine = x[start:start + step]
        piece[:len(mine)] = mine
        bufs = comm.gather(torch.from_numpy(piece), dst)
        if me == dst:
            for r, buf in enumerate(bufs):
                take = max(0, min(step, counts[r] - start))
                out[offsets[r] + start:offsets[r] + start + take] = buf[:take].cpu().numpy()
    return out


def _agreed_blocks(blocks: dict) -> dict:
    """The same block arrays on every rank: a rank that read no row (all its samples corrupt) has
    none, and would otherwise skip collectives the others enter."""
    if comm.group_size() == 1:
        return blocks
    dims = comm.all_gather_object({name: x.shape[1] for name, x in blocks.items()})
    union = {name: dim for d in dims for name, dim in d.items()}
    return {name: blocks.get(name, np.zeros((0, dim), np.float32)) for name, dim in union.items()}


def share_split(split: Split, feats_to: Iterable[int], block_to: dict) -> Split:
    """All ranks' rows sorted by key (identical for any world size), each part where it is needed:
    labels and keys on every rank, the penultimate features on the ranks in `feats_to`, each block on
    `block_to[name]` (a rank without a part gets it with 0 columns). Collective."""
    world, me = comm.group_size(), comm.group_rank()
    if world == 1:
        return split.take(np.argsort(split.keys, kind="stable"))
    parts = comm.all_gather_object(split.keys.tolist())
    keys = np.asarray([k for part in parts for k in part], dtype=str)
    labels = _to_every_rank(split.labels)
    feats = np.zeros((len(keys), 0), np.float32)
    for dst in sorted(set(feats_to)):
        rows = gather_rows(split.feats, dst)
        feats = rows if me == dst else feats
    blocks = {}
    for name, x in sorted(_agreed_blocks(split.blocks).items()):
        rows = gather_rows(x, block_to[name])
        if me == block_to[name]:
            blocks[name] = rows
    return Split(feats, labels, keys, blocks).take(np.argsort(keys, kind="stable"))


def _to_every_rank(x: np.ndarray) -> np.ndarray:
    """All ranks' rows of a small array on every rank, in rank order (one gather per destination)."""
    out = None
    for dst in range(comm.group_size()):
        rows = gather_rows(x, dst)
        out = rows if comm.group_rank() == dst else out
    return out


def gather_split(split: Split, dst: int = 0) -> Optional[Split]:
    """Every rank's rows on `dst`, sorted by key (identical for any world size); None elsewhere."""
    shared = share_split(split, [dst], defaultdict(lambda: dst))
    return shared if comm.group_rank() == dst else None


# ---------------------------------------------------------------- samples by key


def _split_member(name: str) -> tuple[str, str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): the WebDataset rule, key up to the first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def read_members(shard_dir, keys: Optional[Iterable[str]], exts: Iterable[str]) -> dict:
    """{key: {ext: bytes}} for the wanted keys (None: every key) and member extensions.

    One pass over the tars in manifest order, reading only the wanted members (other members are
    skipped by seeking); stops as soon as every wanted key has been found.
    """
    wanted = None if keys is None else set(keys)
    exts = {e.lower() for e in exts}
    found: dict = {}
    for path in load_manifest(shard_dir).shard_paths(shard_dir):
        if wanted is not None and len(found) == len(wanted) and all(len(v) == len(exts) for v in found.values()):
            break
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = _split_member(member.name)
                if member.isreg() and ext in exts and (wanted is None or key in wanted):
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def read_labels(shard_dir, keys: Optional[Iterable[str]] = None, stats: Optional[dict] = None) -> dict:
    """{key: class id} from the .cls members. Left out, and counted in `stats` when given: a .cls
    that is not an integer (skipped_corrupt) or outside [0, number of manifest classes)
    (skipped_bad_label; no upper bound when the manifest lists no classes), as the loader does."""
    num_classes = len(load_manifest(shard_dir).classes)
    stats = {} if stats is None else stats
    labels = {}
    for key, members in read_members(shard_dir, keys, ("cls",)).items():
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            stats["skipped_corrupt"] = stats.get("skipped_corrupt", 0) + 1
            continue
        if label < 0 or 0 < num_classes <= label:
            stats["skipped_bad_label"] = stats.get("skipped_bad_label", 0) + 1
            continue
        labels[key] = label
    return labels
