"""Peak memory per rank of EXTRACT and the clustering stages, from the functions the code sizes its
buffers with: the planner's memory model is the code's own.

    peaks = stage_memory(MemoryInputs(rows=1_500_000, world=64, feature_dim=4096, pca_dim=4096,
                                      k=320_000, m=4))
    peaks["level2"].device, peaks["level2"].host, peaks["level2"].disk   # bytes, fullest rank
    python -m dist_cluster.plan --images 96e6 --gpus 64                   # uses it
    nice -n 5 python bench/memory.py --quick                              # measures it

No size is derived here: each allocation is a function of the module that makes it
(extract.features_bytes / keys_bytes, cluster/stage.whitened_place, cluster/fit_memory and
apply_memory, cluster/kmeans.lloyd_memory and result_bytes, cluster/route.buffer_bytes,
round_bytes and index_bytes). This module only says which of them are alive together in each
stage, as run_clustering runs them:
  every stage   the features (RAM, or a local memmap above memmap_gb), the keys, the whitened rows
                (on the device, in place over the features, or a memmap), what the caller keeps
                resident (plan/planner.py: the training state, which rounds.py replaces after clustering)
  extract       + the per-batch key arrays the key array is concatenated from
  pca           + the larger of fit_pca's phases (moments; eigh on the first rank) and the whitening;
                  from here on the fitted PCA (mean, projection) is kept
  level1        + one Lloyd iteration over the local rows (m centroids)
  route         + level 1's labels; the larger of RoutePlan's sort and a routing round with the
                  receive buffer (route.round_items: on the host its pages fill as rounds land)
  level2        + the receive buffer, one Lloyd iteration (k/m centroids) over one owned
                  super-cluster's slice, the results of the ones done before
  return        + the labels going back (the receive buffer is freed before), or numpy's copy of
                  the keys while the round's files are written
"Device" allocations are host memory on CPU runs. Super-clusters are assumed balanced: a rank
receives as many rows as it has (recv_rows overrides). Not counted: the CUDA context, NCCL's and
gloo's own buffers, allocator fragmentation and cached blocks, memmap pages in the page cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dist_cluster.cluster import extract, route
from dist_cluster.cluster.kmeans import lloyd_memory, result_bytes
from dist_cluster.cluster.pic import pic_memory
from dist_cluster.cluster.sinkhorn import sinkhorn_memory
from dist_cluster.cluster.pca import apply_memory, fit_memory, params_elements
from dist_cluster.cluster.stage import save_buffer_bytes, whitened_place
from dist_cluster.runtime.distributed import ownership

STAGES = ("extract", "pca", "level1", "route", "level2", "return")
PLACES = ("host", "device", "disk")


@dataclass(frozen=True)
class MemoryInputs:
    rows: int  # rows (images) of the fullest rank
    world: int
    feature_dim: int
    pca_dim: int
    k: int
    m: int
    device: str = "cuda"  # where PCA, k-means and the routed rows are computed: cuda | cpu
    backend: str = "faiss"  # the E-step backend kmeans.resolve_backend picks: faiss | torch
    memmap_gb: float = 16.0  # cluster.memmap_gb
    route_chunk_bytes: int = 256 << 20  # cluster.route_chunk_mb << 20
    key_chars: int = 11
    overwrite_features: bool = True  # rounds.py whitens in place over the features
    recv_rows: Optional[int] = None  # rows routed to this rank (None: rows, balanced super-clusters)
    resident_device: float = 0.0  # bytes the caller keeps on the device through these stages
    resident_host: float = 0.0
    extract_device: float = 0.0  # the trunk's forward pass during EXTRACT (plan/planner.py)
    method: str = "kmeans"  # cluster.method: kmeans | sinkhorn (its scores and scalings, cluster/sinkhorn.py) | pic
    super_method: str = ""  # cluster.super_method: level 1's method when it differs ('' = method)
    pic_knn: int = 10  # cluster.pic_knn: PIC's edges per row
    pic_nlist: int = 0  # cluster.pic_nlist: IVF cells (0: the exact search)
    pic_nprobe: int = 16  # cluster.pic_nprobe


@dataclass
class StageMemory:
    stage: str
    host: float = 0.0
    device: float = 0.0  # 0 on CPU runs: their device allocations are in `host`
    disk: float = 0.0
    items: dict = field(default_factory=dict)  # what -> (place, bytes), the largest first

    def note(self, count: int = 3) -> str:
        """The largest allocations, for the planner's notes."""
        top = list(self.items.items())[:count]
        return "memory: " + ", ".join(f"{name} {nbytes / 2**30:.2f} GiB ({place})" for name, (place, nbytes) in top)


def _merge(*parts: dict) -> dict:
    out = {}
    for part in parts:
        for name, (place, nbytes) in part.items():
            old = out.get(name, (place, 0))[1]
            out[name] = (place, old + nbytes)
    return out


def _peak(items: dict, phases: list[dict], device: str) -> tuple[dict, dict]:
    """(bytes per place, items) of the stage: `items` throughout, plus the phase with the most
    bytes in each place (host and device peaks may come from different phases)."""
    def totals(part):
        sums = dict.fromkeys(PLACES, 0.0)
        for place, nbytes in part.values():
            sums["host" if place == "device" and device == "cpu" else place] += nbytes
        return sums
    base = totals(items)
    biggest = {p: max((totals(ph)[p] for ph in phases), default=0.0) for p in PLACES}
    shown = _merge(items, max(phases, key=lambda ph: sum(totals(ph).values()), default={}))
    return {p: base[p] + biggest[p] for p in PLACES}, shown


def _stage(name: str, items: dict, phases: list[dict], device: str) -> StageMemory:
    sums, shown = _peak(items, phases, device)
    ordered = dict(sorted(shown.items(), key=lambda kv: -kv[1][1]))
    return StageMemory(name, sums["host"], sums["device"], sums["disk"], ordered)


def _kept(mi: MemoryInputs) -> dict:
    """Alive through every stage: features, keys, whitened rows, what the caller keeps resident."""
    n, D, d = mi.rows, mi.feature_dim, min(mi.pca_dim, mi.feature_dim)
    in_ram = extract.features_in_ram(n, D, mi.memmap_gb)
    items = {"features": ("host" if in_ram else "disk", extract.features_bytes(n, D)),
             "keys": ("host", extract.keys_bytes(n, mi.key_chars)[0]),
             "resident (caller)": ("device", mi.resident_device), "resident host (caller)": ("host", mi.resident_host)}
    place = whitened_place(n, d, mi.device, mi.memmap_gb, mi.overwrite_features)
    if place != "in place":
        items["whitened"] = ("device" if place == "device" else "disk", n * d * 4)
    return items


def _white_on_device(mi: MemoryInputs) -> bool:
    """Whether the k-means reads the whitened rows where it computes (else chunk copies)."""
    d = min(mi.pca_dim, mi.feature_dim)
    return mi.device == "cpu" or whitened_place(mi.rows, d, mi.device, mi.memmap_gb,
                                                mi.overwrite_features) == "device"


def _level2_shape(mi: MemoryInputs) -> tuple[int, int, int]:
    """(super-clusters this rank owns, rows of each, sub-clusters of each) for balanced sizes."""
    owned = max(sum(r in o for o in ownership(mi.m, mi.world)) for r in range(mi.world))
    recv = mi.rows if mi.recv_rows is None else mi.recv_rows
    rows_each = -(-recv // owned)
    total_each = mi.rows * mi.world // mi.m  # rows of one super-cluster over all ranks
    return owned, rows_each, max(1, min(mi.k // mi.m, total_each))


def _extract_pca(mi: MemoryInputs, kept: dict) -> dict[str, StageMemory]:
    n, D, d, dev = mi.rows, mi.feature_dim, min(mi.pca_dim, mi.feature_dim), mi.device
    feats_on_dev = dev == "cpu"  # the features are host memory (RAM or a memmap)
    out_on_dev = dev == "cpu" or ("whitened" in kept and kept["whitened"][0] == "device")
    key_arrays = {"key arrays": ("host", extract.keys_bytes(n, mi.key_chars)[1]),
                  "trunk forward": ("device", mi.extract_device)}
    phases = fit_memory(n, D, d, dev, feats_on_dev) + [apply_memory(n, D, d, dev, feats_on_dev, out_on_dev)]
    return {"extract": _stage("extract", kept, [key_arrays], dev), "pca": _stage("pca", kept, phases, dev)}


def _route(mi: MemoryInputs, kept: dict, recv: int, index: int) -> StageMemory:
    """RoutePlan's sort, or a routing round landing in the receive buffer."""
    n, d, dev = mi.rows, min(mi.pca_dim, mi.feature_dim), mi.device
    sort_peak = route.index_bytes(n, recv)[0]
    send, got = route.round_bytes(n, recv, d, mi.route_chunk_bytes, mi.world)
    rounds = {"receive buffer": ("device", route.buffer_bytes(recv, d)), "route index": ("host", index),
              **route.round_items(send, got, eager=dev == "cuda")}
    if dev == "cuda" and not _white_on_device(mi):
        rounds["round sent (host)"] = ("host", send)  # gathered from host rows, then copied over
    return _stage("route", kept, [{"route sort": ("host", sort_peak)}, rounds], dev)


def _level2_return(mi: MemoryInputs, kept: dict, recv: int, index: int) -> dict[str, StageMemory]:
    """Level 2 over each owned super-cluster's slice of the receive buffer, then the labels back."""
    n, D, d, dev = mi.rows, mi.feature_dim, min(mi.pca_dim, mi.feature_dim), mi.device
    owned, rows_each, sub = _level2_shape(mi)
    result = result_bytes(rows_each, sub, d)
    level2 = {"receive buffer": ("device", route.buffer_bytes(recv, d)), "route index": ("host", index),
              "level-2 labels": ("host", recv * 8), "level-2 results": ("host", (owned - 1) * result)}
    lloyd = _lloyd(mi, rows_each, sub, d, True)  # the slices are on the device
    back = {"labels back": ("host", 8 * (2 * recv + 2 * n))}  # gathered, received, placed
    files = {"files written": ("host", save_buffer_bytes(n, mi.key_chars, D, d))}
    done = {"level-2 results": ("host", owned * result), "route index": ("host", index)}
    return {"level2": _stage("level2", _merge(kept, level2), [lloyd], dev),
            "return": _stage("return", _merge(kept, done), [back, files], dev)}


def _lloyd(mi: MemoryInputs, n: int, k: int, d: int, rows_on_device: bool, method: str = "") -> dict:
    """One iteration of the level's clustering method (default: mi.method) at its peak (kmeans.py or
    sinkhorn.py)."""
    if (method or mi.method) == "sinkhorn":
        return sinkhorn_memory(n, k, d, mi.device, rows_on_device)
    return lloyd_memory(n, k, d, mi.device, mi.backend, rows_on_device)


def _pic_stages(mi: MemoryInputs, kept: dict) -> dict[str, StageMemory]:
    """cluster.method=pic (cluster/pic.py): level1 is the k-NN graph, level2 the power iterations;
    nothing is routed."""
    n, D, d = mi.rows, mi.feature_dim, min(mi.pca_dim, mi.feature_dim)
    phases = pic_memory(n, mi.pic_knn, d, n, mi.device, mi.route_chunk_bytes, mi.pic_nlist, mi.pic_nprobe,
                        mi.backend)
    graph = _merge(kept, phases["kept"])
    labels = {"labels": ("host", result_bytes(n, 1, d))}
    files = {"files written": ("host", save_buffer_bytes(n, mi.key_chars, D, d))}
    return {"level1": _stage("level1", kept, [phases["search"], phases["graph"]], mi.device),
            "route": _stage("route", graph, [], mi.device),
            "level2": _stage("level2", graph, [phases["power"]], mi.device),
            "return": _stage("return", _merge(kept, labels), [files], mi.device)}


def stage_memory(mi: MemoryInputs) -> dict[str, StageMemory]:
    """Peak bytes per rank of each stage in STAGES (see the module docstring)."""
    n, D, d = mi.rows, mi.feature_dim, min(mi.pca_dim, mi.feature_dim)
    recv = n if mi.recv_rows is None else mi.recv_rows
    kept = _kept(mi)
    stages = _extract_pca(mi, kept)
    kept = _merge(kept, {"pca": ("host", params_elements(D, d) * 8)})
    if mi.method == "pic":
        return {**stages, **_pic_stages(mi, kept)}
    lloyd = _lloyd(mi, n, mi.m, d, _white_on_device(mi), mi.super_method)
    stages["level1"] = _stage("level1", kept, [lloyd], mi.device)
    kept = _merge(kept, {"level-1 labels": ("host", result_bytes(n, mi.m, d) + n * 8)})  # + sub_local's clone
    index = route.index_bytes(n, recv)[1]
    stages["route"] = _route(mi, kept, recv, index)
    stages.update(_level2_return(mi, kept, recv, index))
    return stages
