"""What the planner knows about the trunks, and the throughputs it assumes when nothing was measured.

    cost = arch_cost("vgg16_bn", image_size=224, sobel=True)      # params, MACs, activations per image
    rates = default_rates(cost, gpus_per_node=8, workers=10)       # each Rate carries its source
    rates, notes = measured_rates(rates, "bench/results", workers=10, image_size=224, device="cuda")

Parameter counts are computed from the layer layouts of dist_cluster/models (tests/test_plan.py
checks them against the real modules); MACs and activation sizes likewise, checked against
torchvision's documented 15.47 GFLOPS (multiply-adds) for VGG-16 at 224 px.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
SMALLVGG_LAYOUT = (32, "M", 64, "M", 128, "M", 256, 256)  # models/smallvgg.py DEFAULT_WIDTHS
# torchvision resnet50 without fc (25,557,032 - 2048 * 1000 - 1000); docs: 4.09 GFLOPS (MACs);
# timm's resnet50 model card: 11.1 M activations per 224-px image
RESNET50_PARAMS, RESNET50_MACS_224, RESNET50_ACTS_224 = 23_508_032, 4.09e9, 11.1e6
SAVED_COPIES = 2.0  # tensors backward keeps per conv output (conv out for BN, BN/ReLU out for the next conv)

# defaults when bench/results has nothing; each is printed with its source
EFFECTIVE_TFLOPS = 40.0  # assumption: sustained bf16 conv throughput of one A100/H100-class GPU
DECODE_IMG_S_PER_WORKER = 150.0  # assumption: PIL decode + crop of a ~500 px JPEG, ~6-7 ms per core
# k-means E-step on one A100 (the planned GPU), from a measured figure scaled by a published peak:
# faiss wiki "Low level benchmarks" (github.com/facebookresearch/faiss/wiki/Low-level-benchmarks):
# 1M x 256-d -> 20k centroids, 25 iterations (128 T multiply-adds) in 55 s on one P100, float32:
# 2.33 T multiply-adds/s, 44 % of the P100 SXM2's 10.6 TFLOP/s FP32 peak. The same efficiency at
# the A100's 19.5 TFLOP/s FP32 peak (NVIDIA A100 datasheet: www.nvidia.com/content/dam/en-zz/
# Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf) gives 30 s for
# that job. FP32 on purpose: TF32 (156 TFLOP/s) is not assumed for faiss's flat index.
P100_FP32_TFLOPS, A100_FP32_TFLOPS = 10.6, 19.5
KMEANS_S_PER_PCD = 55.0 * P100_FP32_TFLOPS / A100_FP32_TFLOPS / (1e6 * 2e4 * 256 * 25)
PCA_FP64_FLOPS = 5e12  # assumption: 2/3 of a V100's 7.8 TFLOP/s fp64 peak (the moments are float64)
NODE_NET_GBIT = 400.0  # assumption: 4 x 100 Gb/s InfiniBand per 8-GPU node (DGX-1 class)
INTRA_NODE_BYTES_S = 100e9  # assumption: NVLink, one node


@dataclass(frozen=True)
class ArchCost:
    params: int  # trainable trunk parameters (Sobel filters are buffers)
    macs: float  # multiply-adds per image, forward, at the planned image size
    act_elems: float  # output elements of every conv/linear layer per image (what backward keeps)
    max_act: float  # the largest single layer output per image (inference peak)
    feature_dim: int


def _conv_stack(layout, in_ch: int, size: int, bias: bool) -> tuple[int, float, float, float, int, int]:
    """(params, MACs, activations, largest activation, channels, side) of 3x3 conv-BN-ReLU blocks
    and 2x2 max pools; the convs keep the side (padding 1, or the Sobel layer's padding)."""
    params, macs, acts, largest, ch = 0, 0.0, 0.0, 0.0, in_ch
    for item in layout:
        if item == "M":
            size //= 2
            continue
        params += 9 * ch * item + (item if bias else 0) + 2 * item  # conv (+ bias) + BN affine
        out = float(item * size * size)
        macs += out * 9 * ch
        acts += out
        largest = max(largest, out)
        ch = item
    return params, macs, acts, largest, ch, size


def arch_cost(arch: str, image_size: int = 224, sobel: bool = True, feature_dim: int = 512,
              pool_size: int = 1) -> ArchCost:
    """Cost of the trunk `build_trunk` makes for `arch` (feature_dim, pool_size: smallvgg only)."""
    in_ch = 2 if sobel else 3
    if arch == "vgg16_bn":
        params, macs, acts, largest, ch, _ = _conv_stack(VGG16_LAYOUT, in_ch, image_size, bias=True)
        fc = [(ch * 7 * 7, 4096), (4096, 4096)]  # adaptive 7x7 pool, classifier[0] and [3]
        params += sum(i * o + o for i, o in fc)
        macs += sum(i * o for i, o in fc)
        return ArchCost(params, macs, acts + 2 * 4096, largest, 4096)
    if arch == "smallvgg":
        params, macs, acts, largest, ch, _ = _conv_stack(SMALLVGG_LAYOUT, in_ch, image_size, bias=False)
        fc_in = ch * pool_size * pool_size  # adaptive pool to pool_size x pool_size, flattened
        params += fc_in * feature_dim + 2 * feature_dim  # Linear without bias + BatchNorm1d
        macs += fc_in * feature_dim
        return ArchCost(params, macs, acts + feature_dim, largest, feature_dim)
    if arch == "resnet50":
        scale = (image_size / 224) ** 2
        params = RESNET50_PARAMS - (64 * 7 * 7 if sobel else 0)  # conv1 takes 2 Sobel channels, not 3
        return ArchCost(params, RESNET50_MACS_224 * scale, RESNET50_ACTS_224 * scale,
                        64 * (image_size / 2) ** 2, 2048)
    raise ValueError(f"arch must be vgg16_bn | resnet50 | smallvgg, got {arch!r}")


# ----------------------------------------------------------------------------- throughputs


@dataclass(frozen=True)
class Rate:
    value: float
    source: str


@dataclass(frozen=True)
class Rates:
    train_rows_s: Rate  # per GPU: forward + backward of one image (one rotation)
    extract_img_s: Rate  # per GPU: forward only
    loader_img_s: Rate  # per rank: read + decode + augment with all its workers
    kmeans_s_pcd: Rate  # E-step seconds per point x centroid x dimension
    pca_flops: Rate  # float64 FLOP/s of the covariance accumulation
    net_bytes_s: Rate  # per rank, between nodes: what a collective spanning nodes moves per second
    intra_bytes_s: Rate  # per rank, inside a node (NVLink)

    def sources(self) -> dict:
        return {name: {"value": rate.value, "source": rate.source} for name, rate in vars(self).items()}


def default_rates(cost: ArchCost, gpus_per_node: int, workers: int) -> Rates:
    flops = EFFECTIVE_TFLOPS * 1e12
    basis = f"{cost.macs / 1e9:.2f} GMAC/img at {EFFECTIVE_TFLOPS:g} TFLOP/s effective (assumption)"
    net = Rate(NODE_NET_GBIT / 8 * 1e9 / gpus_per_node,
               f"assumption: {NODE_NET_GBIT:g} Gb/s per node shared by {gpus_per_node} ranks")
    return Rates(
        train_rows_s=Rate(flops / (6 * cost.macs), f"3 x forward, {basis}"),
        extract_img_s=Rate(flops / (2 * cost.macs), f"forward, {basis}"),
        loader_img_s=Rate(DECODE_IMG_S_PER_WORKER * max(workers, 1),
                          f"assumption: {DECODE_IMG_S_PER_WORKER:g} img/s per worker x {max(workers, 1)}"),
        kmeans_s_pcd=Rate(KMEANS_S_PER_PCD, "faiss wiki: 1M x 256 -> 20k, 25 iter, 55 s on one P100, "
                          f"x {P100_FP32_TFLOPS:g}/{A100_FP32_TFLOPS:g} (P100/A100 FP32 peak)"),
        pca_flops=Rate(PCA_FP64_FLOPS, "assumption: 2/3 of V100 fp64 peak"),
        net_bytes_s=net, intra_bytes_s=Rate(INTRA_NODE_BYTES_S, "assumption: NVLink"))


def _records(obj) -> Iterator[dict]:
    """Every dict inside a JSON document (results may be nested per backend / per worker count)."""
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _records(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _records(value)


def _number(record: dict, *names: str) -> Optional[float]:
    for name in names:
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _loader_rate(doc, path: Path, workers: int, image_size: int) -> Optional[Rate]:
    """Per-core read + decode + augment time of the bench dataset whose crop is nearest the planned
    size (bench/loader.py's `datasets.<name>.stages`), else the best img/s per worker of any run."""
    datasets = doc.get("datasets") if isinstance(doc, dict) else None
    if isinstance(datasets, dict) and datasets:
        name, data = min(datasets.items(), key=lambda item: abs((item[1].get("crop") or 0) - image_size))
        stages = data.get("stages", {})
        micros = sum(_number(stages, key) or 0 for key in ("read_us", "decode_us", "augment_us"))
        if micros > 0:
            return Rate(1e6 / micros * max(workers, 1),
                        f"{path} [{name}]: {micros:.0f} us/img read+decode+augment per core x {max(workers, 1)}")
        doc = data
    per_worker = [_number(r, "img_per_s", "images_per_s") / max(_number(r, "workers", "num_workers") or 1, 1)
                  for r in _records(doc) if _number(r, "img_per_s", "images_per_s")]
    if not per_worker:
        return None
    best = max(per_worker)
    return Rate(best * max(workers, 1), f"{path}: {best:.0f} img/s per worker x {max(workers, 1)}")


def _kmeans_rate(doc, path: Path) -> Optional[Rate]:
    """bench/kmeans.py: our sharded k-means at one rank (`table`, name 'ours W=1 ...') over the
    config's n x k x d; or any record with `s_per_point_centroid_dim`."""
    config, table = doc.get("config", {}), doc.get("table", [])
    n, k, d = (_number(config, key) for key in ("n", "k", "d"))
    ours = [t for t in table if str(t.get("name", "")).startswith("ours W=1")] or \
        [t for t in table if str(t.get("name", "")).startswith("ours")]
    times = [_number(t, "per_iter_s") for t in ours if _number(t, "per_iter_s")]
    if n and k and d and times:
        return Rate(min(times) / (n * k * d), f"{path}: {min(times):.3g} s/iter at n={n:.0f} k={k:.0f} d={d:.0f}")
    direct = [_number(r, "s_per_point_centroid_dim") for r in _records(doc) if _number(r, "s_per_point_centroid_dim")]
    return Rate(min(direct), str(path)) if direct else None


def _train_rate(doc, path: Path) -> Optional[Rate]:
    """bench/train.py: rows.pipeline.img_per_s_global / world (the real step, loader included)."""
    pipeline = doc.get("rows", {}).get("pipeline", {})
    total, world = _number(pipeline, "img_per_s_global"), _number(doc, "world")
    if total and world:
        return Rate(total / world, f"{path}: {total:.0f} img/s over {world:.0f} ranks ({doc.get('config', '?')})")
    per_gpu = [_number(r, "img_per_s_per_gpu") for r in _records(doc) if _number(r, "img_per_s_per_gpu")]
    return Rate(per_gpu[0], str(path)) if per_gpu else None


def _device_of(doc) -> str:
    device = doc.get("device") or doc.get("config", {}).get("device") if isinstance(doc, dict) else None
    return str(device or "cpu")


def measured_rates(rates: Rates, bench_dir: str | Path, workers: int, image_size: int = 224,
                   device: str = "cuda") -> tuple[Rates, list[str]]:
    """Replace defaults by what bench/results/*.json measured; returns (rates, notes on what was skipped).

    loader.json  (bench/loader.py) decoding runs on CPU cores wherever the plan runs: always used
    kmeans.json  (bench/kmeans.py) and train.json (bench/train.py): used only when measured on
                 `device`; a CPU measurement says nothing about a GPU cluster (and the reverse)
    """
    readers = (("loader", "loader_img_s", lambda doc, p: _loader_rate(doc, p, workers, image_size), False),
               ("kmeans", "kmeans_s_pcd", _kmeans_rate, True), ("train", "train_rows_s", _train_rate, True))
    found, notes = {}, []
    for name, field_name, read, per_device in readers:
        path = Path(bench_dir) / f"{name}.json"
        doc = _read_json(path)
        if not isinstance(doc, dict):
            continue
        if per_device and _device_of(doc) != device:
            notes.append(f"{path} not used: measured on {_device_of(doc)}, planning for {device}")
            continue
        rate = read(doc, path)
        if rate is not None:
            found[field_name] = rate
    if "train_rows_s" in found:  # forward only: a third of forward + backward, as in default_rates
        train = found["train_rows_s"]
        found["extract_img_s"] = Rate(3 * train.value, f"3 x train_rows_s (forward only), {train.source}")
    return replace(rates, **found), notes
