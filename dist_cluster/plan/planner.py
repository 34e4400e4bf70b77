"""Capacity planner: memory per rank, network and storage, and wall time of every stage of a run.

    python -m dist_cluster.plan --images 96e6 --gpus 64                  # the paper's YFCC100M run
    python -m dist_cluster.plan --images 60000 --gpus 2 --arch smallvgg --image-size 28 --k 100 \
        --m 4 --feature-dim 512 --pca-dim 64 --batch 64 --epochs 10 --reassign 2 --json plan.json

Pure arithmetic over the formulas below (`plan(PlanInputs) -> list[StageRow]`), per rank r of W,
n = ceil(N / W) images per rank, D = feature dim, d = PCA dim, S = rotations x m heads:
  EXTRACT  features n x D float32, in RAM, or a local memmap above cluster.memmap_gb (GiB)
  PCA      all_reduce of D x D + D + 1 float64 moments; whitened n x d float32 on the GPU when
           within memmap_gb, else written in place over the features (no second copy)
  LEVEL1   per iteration: E-step n x m x d, all_reduce of m x d + m + 2 float64 over W ranks
  ROUTE    all_to_all of the n x d whitened rows in rounds of route_chunk_mb each way, into one
           n x d receive buffer on the GPU ordered by super-cluster (cluster/route.py)
  LEVEL2   per iteration: E-step n x (k/m) x d, all_reduce of (k/m) x d + k/m + 1 float64
           inside the group owning each super-cluster (W/m ranks, or one rank for W < m)
  RETURN   all_to_all of n int64 labels; RUN/clusters/round_<r>/ written (keys, ids, centroids)
  TRAIN    per step: DDP ring all_reduce of trunk + super-head gradients (float32), features
           routed to the sub-head owners and gradients back (b x D float32 each way), sub-head
           gradient all_reduce inside each head's group; checkpoints
Memory from EXTRACT to RETURN: plan.memory.stage_memory, the sum of the sizes the code allocates
(functions of extract.py and cluster/*.py, checked by bench/memory.py) and of the training state
that stays on the GPU meanwhile (resident_training_bytes); message sizes from the same modules.
A ring all_reduce of B bytes over g ranks moves 2 (g - 1) / g x B per rank; times are bytes over
the per-rank bandwidth plus work over the measured or assumed throughput (plan/costs.py), with
DDP's all_reduce overlapped with backward and the routing collectives not. A collective inside
a rank group that tiles the nodes (e.g. 4 ranks sharing a sub head on 8-GPU nodes) runs at NVLink
speed, one spanning nodes at the network's. Throughputs come from bench/results/{loader,kmeans,
train}.json when those were measured on the planned device (--bench-device, default cuda), else
from documented defaults (plan/costs.py). Estimates, not promises: activations +-50 %, throughputs
as good as their source (every run prints them with their source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from dist_cluster.cluster.pca import moments_elements, params_elements
from dist_cluster.plan.costs import SAVED_COPIES, ArchCost, Rates, arch_cost, default_rates
from dist_cluster.plan.memory import MemoryInputs, stage_memory  # the per-stage peaks (bench/memory.py too)
from dist_cluster.plan.methods import lloyd_cost, pic_costs, ring

GiB = 2 ** 30


@dataclass
class PlanInputs:
    images: int
    gpus: int
    nodes: int = 0  # 0: gpus / 8, rounded up
    image_size: int = 224
    k: int = 320_000
    m: int = 4
    rotations: int = 4
    feature_dim: int = 4096
    pca_dim: int = 4096
    batch: int = 48  # images per rank per step
    epochs: int = 100
    reassign: int = 3
    arch: str = "vgg16_bn"
    sobel: bool = True
    niter: int = 10
    all_rotations: bool = False  # every image in its 4 rotations: 4 x the rows per step
    memmap_gb: float = 16.0  # cluster.memmap_gb (GiB): larger feature arrays go to local disk
    bytes_per_image: float = 110e3  # stored JPEG (YFCC100M 'medium' photos, ~500 px: 80-150 kB)
    key_chars: int = 11  # characters of a sample key (YFCC photo ids); assignment files store them
    workers: int = 10  # loader workers per rank
    bf16: bool = True  # activations in bf16 under autocast
    route_chunk_mb: int = 256  # cluster.route_chunk_mb: one routing round, each way
    device: str = "cuda"  # where PCA, k-means and training run: cuda | cpu (--bench-device)
    kmeans_backend: str = "faiss"  # the E-step kmeans.resolve_backend picks: faiss (GPU build) | torch
    method: str = "kmeans"  # cluster.method: kmeans | sinkhorn | pic
    super_method: str = ""  # cluster.super_method: level 1's method when it differs ('' = method)
    sinkhorn_iters: int = 3  # cluster.sinkhorn_iters: one more pass over the rows each, per iteration
    pic_knn: int = 10  # cluster.pic_knn
    pic_iters: int = 200  # cluster.pic_iters
    pic_nlist: int = 0  # cluster.pic_nlist: IVF cells (0: exact k-NN search)
    pic_nprobe: int = 16  # cluster.pic_nprobe

    def __post_init__(self):
        self.images, self.gpus = int(self.images), int(self.gpus)
        if self.images < 1 or self.gpus < 1:
            raise ValueError(f"--images and --gpus must be >= 1, got {self.images}, {self.gpus}")
        if self.k < self.m or self.k % self.m:
            raise ValueError(f"k={self.k} must be a multiple of m={self.m}")
        if self.super_method not in ("", "kmeans", "sinkhorn") or (self.method == "pic" and self.super_method):
            raise ValueError(f"--super-method {self.super_method} with --method {self.method}: kmeans | "
                             "sinkhorn at level 1 of kmeans | sinkhorn (PIC is flat)")
        if self.method == "pic" and self.m != 1:
            raise ValueError(f"m={self.m} with --method pic: PIC is flat, pass --m 1")
        if self.pic_nlist and not (1 <= self.pic_nprobe <= self.pic_nlist <= self.images):
            raise ValueError(f"--pic-nprobe {self.pic_nprobe} and --pic-nlist {self.pic_nlist}: need "
                             f"1 <= nprobe <= nlist <= images")
        if self.images < self.gpus * self.batch:
            raise ValueError(f"{self.images} images cannot give every one of {self.gpus} ranks a batch of {self.batch}")
        self.nodes = self.nodes or math.ceil(self.gpus / 8)


@dataclass
class StageRow:
    stage: str
    gpu_bytes: float = 0.0  # per rank, accelerator memory resident during the stage
    ram_bytes: float = 0.0  # per rank, host memory
    disk_bytes: float = 0.0  # per rank, local scratch (memmaps)
    net_bytes_step: float = 0.0  # per rank per training step
    net_bytes_round: float = 0.0  # per rank per round
    storage_bytes: float = 0.0  # shared storage written (whole run, all ranks)
    read_bytes_round: float = 0.0  # per rank, shard bytes read per round
    seconds_round: float = 0.0
    notes: list = field(default_factory=list)


def group_bandwidth(p: PlanInputs, r: Rates, group: int, items: int = 1) -> float:
    """Bytes/s per rank of a collective over one of the `items` contiguous rank groups of size
    `group` (distributed.ownership): NVLink when the groups tile the nodes, the network otherwise."""
    per_node = math.ceil(p.gpus / p.nodes)
    inside = group <= per_node and per_node % group == 0 and p.gpus % items == 0 and p.gpus % per_node == 0
    return r.intra_bytes_s.value if inside else r.net_bytes_s.value


@dataclass
class Shape:
    """Derived sizes every stage uses."""
    n: int  # images on the fullest rank
    n_min: int  # images on the emptiest rank (sets the steps per epoch)
    d: int
    sub: int  # k / m sub-clusters per super-cluster
    level2_group: int
    supers_per_rank: int
    heads: int
    head_group: int
    heads_per_rank: int
    rows_per_step: int
    steps: int
    rounds: int
    cost: ArchCost
    act_bytes: int

    @classmethod
    def of(cls, p: PlanInputs, cost: ArchCost) -> "Shape":
        W, S = p.gpus, p.rotations * p.m
        rows = p.batch * (p.rotations if p.all_rotations else 1)
        n_min = p.images // W
        return cls(n=math.ceil(p.images / W), n_min=n_min, d=min(p.pca_dim, p.feature_dim),
                   sub=p.k // p.m, level2_group=math.ceil(W / p.m) if W >= p.m else 1,
                   supers_per_rank=math.ceil(p.m / W) if W < p.m else 1, heads=S,
                   head_group=math.ceil(W / S) if W >= S else 1,
                   heads_per_rank=math.ceil(S / W) if W < S else 1, rows_per_step=rows,
                   steps=n_min // p.batch, rounds=math.ceil(p.epochs / p.reassign),
                   cost=cost, act_bytes=2 if p.bf16 else 4)


def resident_training_bytes(p: PlanInputs, s: Shape) -> float:
    """GPU bytes the training state keeps through EXTRACT and CLUSTER of every round after the
    first: rounds.py (Run.release_training_state) frees the heads, their optimiser and every
    gradient before extracting; what stays is the trunk + super head's weights, DDP's buckets and
    the trunk optimiser's momentum (the super head's momentum goes with the head optimiser)."""
    replicated = s.cost.params + p.feature_dim * s.heads + s.heads
    return replicated * 4 * 3


def memory_inputs(p: PlanInputs, s: Shape) -> MemoryInputs:
    return MemoryInputs(rows=s.n, world=p.gpus, feature_dim=p.feature_dim, pca_dim=s.d, k=p.k, m=p.m,
                        device=p.device, backend=p.kmeans_backend, memmap_gb=p.memmap_gb, method=p.method,
                        super_method=p.super_method,
                        pic_knn=p.pic_knn, pic_nlist=p.pic_nlist, pic_nprobe=p.pic_nprobe,
                        route_chunk_bytes=p.route_chunk_mb << 20, key_chars=p.key_chars,
                        resident_device=resident_training_bytes(p, s) if p.device == "cuda" else 0.0,
                        extract_device=p.batch * s.cost.max_act * s.act_bytes * 2)


def _row(name: str, mem: dict, notes: list, **values) -> StageRow:
    """A stage's row, its memory from plan.memory.stage_memory."""
    m = mem[name]
    return StageRow(name, gpu_bytes=m.device, ram_bytes=m.host, disk_bytes=m.disk,
                    notes=notes + [m.note()], **values)


def clustering_rows(p: PlanInputs, s: Shape, r: Rates) -> list[StageRow]:
    W, D, d = p.gpus, p.feature_dim, s.d
    bw = group_bandwidth(p, r, W)  # world collectives
    bw2 = group_bandwidth(p, r, s.level2_group, p.m)
    mem = stage_memory(memory_inputs(p, s))
    routed = s.n * d * 4
    where = "RAM" if mem["extract"].disk == 0 else "local memmap"
    extract = _row("extract", mem, [f"features {s.n} x {D} float32 in {where}"],
                   read_bytes_round=s.n * p.bytes_per_image,
                   seconds_round=s.n / min(r.extract_img_s.value, r.loader_img_s.value))
    moments = moments_elements(D) * 8
    pca_net = ring(moments, W) + params_elements(D, d) * 8  # all_reduce, then the broadcast received
    pca_flop = 2 * s.n * D * D + 2 * s.n * D * d + 10 * D ** 3
    whitened = mem["pca"].items.get("whitened", ("in place over the features",))[0]
    pca = _row("pca", mem, [f"all_reduce {moments / 1e6:.1f} MB of float64 moments",
                            f"whitened {s.n} x {d}: {whitened}"],
               net_bytes_round=pca_net, seconds_round=pca_flop / r.pca_flops.value + pca_net / bw)
    super_method = p.super_method or p.method
    l1_net, l1_s = lloyd_cost(p, r, s.n, p.m, d, W, bw, vote=1, method=super_method)
    level1 = _row("level1", mem, [f"{p.niter} {super_method} iterations, m={p.m} over {W} ranks"],
                  net_bytes_round=l1_net, seconds_round=l1_s)
    route = _row("route", mem, [f"all_to_all {routed / 1e9:.2f} GB per rank, in rounds of {p.route_chunk_mb} MiB"],
                 net_bytes_round=routed, seconds_round=routed / bw)
    l2_net, l2_s = (x * s.supers_per_rank for x in lloyd_cost(p, r, s.n, s.sub, d, s.level2_group, bw2))
    level2 = _row("level2", mem, [f"k/m={s.sub} per super-cluster, groups of {s.level2_group} rank(s) "
                                  f"({'NVLink' if bw2 == r.intra_bytes_s.value else 'network'}), "
                                  f"{s.supers_per_rank} super-cluster(s) per rank"],
                  net_bytes_round=l2_net, seconds_round=l2_s)
    cluster_files = p.images * (16 + 4 * p.key_chars) + (p.k + p.m) * d * 4 + (D * d + D) * 8
    ret = _row("return", mem, [f"RUN/clusters: {cluster_files / 1e9:.2f} GB per round (keys, labels, centroids)"],
               net_bytes_round=s.n * 8, storage_bytes=cluster_files * s.rounds, seconds_round=s.n * 8 / bw)
    rows = [extract, pca, level1, route, level2, ret]
    if p.method == "pic":
        rows[2:5] = pic_rows(p, s, r, mem, bw)
    if p.k == 1:  # RotNet: no extraction, no clustering
        rows = [StageRow(row.stage, notes=["skipped: k = 1"]) for row in rows]
    return rows


def pic_rows(p: PlanInputs, s: Shape, r: Rates, mem: dict, bw: float) -> list[StageRow]:
    """level1, route, level2 of cluster.method=pic: the k-NN graph, nothing routed, the power iterations."""
    (g_net, g_s), (p_net, p_s) = pic_costs(p, r, s.n, s.d, bw)
    search = (f"IVF {p.pic_knn}-NN graph ({p.pic_nlist} cells, {p.pic_nprobe} probed)" if p.pic_nlist
              else f"brute-force {p.pic_knn}-NN graph")
    moved = ("every row to its cell's rank, then to the ranks of its probed cells" if p.pic_nlist
             else "every rank's rows passed round the ring once")
    level1 = _row("level1", mem, [f"{search} of {p.images} rows, {moved}"], net_bytes_round=g_net, seconds_round=g_s)
    route = StageRow("route", gpu_bytes=mem["route"].device, ram_bytes=mem["route"].host,
                     disk_bytes=mem["route"].disk, notes=["nothing routed: PIC is flat"])
    level2 = _row("level2", mem, [f"{p.pic_iters} power iterations (numpy, host), basins"],
                  net_bytes_round=p_net, seconds_round=p_s)
    return [level1, route, level2]


def train_row(p: PlanInputs, s: Shape, r: Rates) -> StageRow:
    D, W = p.feature_dim, p.gpus
    bw, bw_head = group_bandwidth(p, r, W), group_bandwidth(p, r, s.head_group, s.heads)
    replicated = s.cost.params + D * s.heads + s.heads  # trunk + super head (DDP)
    head = (D * s.sub + s.sub) if s.sub > 1 else 0  # one sub head (none when k == m)
    gpu = (replicated * 4 * 3 + s.cost.params * 4  # weights, grads, momentum; DDP buckets
           + s.heads_per_rank * head * 4 * 3  # weights, grads, momentum (grads reduced in place)
           + s.rows_per_step * s.cost.act_elems * s.act_bytes * SAVED_COPIES
           + (s.rows_per_step * s.sub * 4 * 2 if head else 0))  # sub logits and their gradient
    ddp = ring(replicated * 4, W)
    routing = (2 * s.rows_per_step * D * 4 + s.rows_per_step * 2 * 8) if head else 0
    head_sync = s.heads_per_rank * ring(head * 4, s.head_group)
    compute = s.rows_per_step / r.train_rows_s.value
    step_seconds = max(compute, ddp / bw) + routing / bw + head_sync / bw_head
    # one copy of each parameter and its momentum per save: a sub head by its group's first owner
    checkpoint = replicated * 4 * 2 + s.heads * head * 4 * 2
    return StageRow("train", gpu_bytes=gpu, ram_bytes=s.n * (16 + 4 * p.key_chars),
                    net_bytes_step=ddp + routing + head_sync,
                    net_bytes_round=(ddp + routing + head_sync) * s.steps * p.reassign,
                    storage_bytes=checkpoint + replicated * 4 * 2 * s.rounds,
                    read_bytes_round=s.n * p.bytes_per_image * p.reassign,
                    seconds_round=step_seconds * s.steps * p.reassign,
                    notes=[f"{s.steps} steps/epoch of {s.rows_per_step} rows, {step_seconds:.3f} s/step "
                           f"({compute:.3f} compute)", f"{s.heads_per_rank} sub head(s) of {head / 1e6:.1f} M "
                           f"params per rank, groups of {s.head_group} "
                           f"({'NVLink' if bw_head == r.intra_bytes_s.value else 'network'})",
                           f"checkpoint {checkpoint / 1e9:.1f} GB per save: one copy of each parameter and its "
                           f"momentum (each sub head written by the first rank of its group)"])


def plan(inputs: PlanInputs, rates: Optional[Rates] = None) -> list[StageRow]:
    """One row per stage: extract, pca, level1, route, level2, return, train (per round)."""
    cost = arch_cost(inputs.arch, inputs.image_size, inputs.sobel, inputs.feature_dim)
    if cost.feature_dim != inputs.feature_dim:
        raise ValueError(f"{inputs.arch} has {cost.feature_dim}-d features, not --feature-dim {inputs.feature_dim}")
    rates = rates or default_rates(cost, math.ceil(inputs.gpus / inputs.nodes), inputs.workers)
    shape = Shape.of(inputs, cost)
    return clustering_rows(inputs, shape, rates) + [train_row(inputs, shape, rates)]


def summary(inputs: PlanInputs, rows: list[StageRow]) -> dict:
    """Totals of a plan: run time, peaks per rank and node, shared storage."""
    s = Shape.of(inputs, arch_cost(inputs.arch, inputs.image_size, inputs.sobel, inputs.feature_dim))
    per_node = math.ceil(inputs.gpus / inputs.nodes)
    cluster_s = sum(r.seconds_round for r in rows if r.stage != "train")
    train = rows[-1]
    epoch_s = train.seconds_round / inputs.reassign
    step_s = train.seconds_round / max(s.steps * inputs.reassign, 1)
    round_s = max(cluster_s + train.seconds_round, 1e-12)
    return {"rounds": s.rounds, "steps_per_epoch": s.steps, "images_per_rank": s.n,
            "seconds_total": s.rounds * cluster_s + inputs.epochs * epoch_s,
            "seconds_cluster_per_round": cluster_s, "seconds_per_epoch": epoch_s,
            # share of a round's wall time: PCA..RETURN, and with EXTRACT
            "cluster_share": (cluster_s - rows[0].seconds_round) / round_s,
            "extract_cluster_share": cluster_s / round_s,
            "peak_gpu_bytes_per_rank": max(r.gpu_bytes for r in rows),
            "peak_gpu_stage": max(rows, key=lambda r: r.gpu_bytes).stage,
            "peak_ram_bytes_per_rank": max(r.ram_bytes for r in rows),
            "peak_ram_bytes_per_node": max(r.ram_bytes for r in rows) * per_node,
            "peak_disk_bytes_per_node": max(r.disk_bytes for r in rows) * per_node,
            "shards_bytes": inputs.images * inputs.bytes_per_image,
            "storage_bytes_total": inputs.images * inputs.bytes_per_image + sum(r.storage_bytes for r in rows),
            # every step reads a fresh batch of images on every rank
            "read_bytes_s_train": inputs.gpus * inputs.batch * inputs.bytes_per_image / max(step_s, 1e-12)}


def predicted_smoke(cfg, world: int, num_samples: int) -> dict:
    """What a run of `cfg` on `world` ranks over `num_samples` images should show, for the lead's
    comparison with a measured smoke run (RUN/metrics.jsonl, RUN/checkpoints, RUN/clusters):
    exact sizes (centroid arrays: add numpy's 128-byte .npy header) and plan estimates."""
    c, d_cfg, t, m_cfg = cfg.cluster, cfg.data, cfg.train, cfg.model
    # data.max_samples caps each rank's share (smoke runs)
    images = min(num_samples, d_cfg.max_samples * world) if d_cfg.max_samples > 0 else num_samples
    cost = arch_cost(m_cfg.arch, d_cfg.image_size, bool(m_cfg.sobel), int(m_cfg.feature_dim), int(m_cfg.pool_size))
    inputs = PlanInputs(images=images, gpus=world, nodes=1, image_size=d_cfg.image_size, k=c.k, m=c.m,
                        rotations=t.rotations, feature_dim=cost.feature_dim, pca_dim=c.pca_dim,
                        batch=d_cfg.batch_size, epochs=t.epochs, reassign=t.reassign, arch=m_cfg.arch,
                        sobel=bool(m_cfg.sobel), niter=c.niter, all_rotations=bool(t.all_rotations),
                        method=c.method, super_method=c.super_method, sinkhorn_iters=c.sinkhorn_iters,
                        pic_knn=c.pic_knn, pic_iters=c.pic_iters, pic_nlist=c.pic_nlist, pic_nprobe=c.pic_nprobe,
                        memmap_gb=c.memmap_gb, workers=d_cfg.num_workers, bf16=False)
    rows = {r.stage: r for r in plan(inputs)}
    s = Shape.of(inputs, cost)
    cap = OmegaConf.select(cfg, "train.max_steps_per_epoch", default=0) or 0  # a key smoke configs may set
    steps = min(s.steps, cap) if cap > 0 else s.steps
    return {"rounds": s.rounds, "steps_per_epoch": steps, "images_per_rank_max": s.n,
            "trunk_params": cost.params, "super_head_params": cost.feature_dim * s.heads + s.heads,
            "sub_head_params": cost.feature_dim * s.sub + s.sub if s.sub > 1 else 0,
            "features_bytes_per_rank": s.n * cost.feature_dim * 4,
            "centroids_super_bytes": c.m * s.d * 4, "centroids_sub_bytes_each": s.sub * s.d * 4,
            "pca_net_bytes_per_rank": rows["pca"].net_bytes_round,
            "level1_net_bytes_per_rank": rows["level1"].net_bytes_round,
            "level2_net_bytes_per_rank": rows["level2"].net_bytes_round,
            "route_bytes_per_rank": rows["route"].net_bytes_round,
            "return_net_bytes_per_rank": rows["return"].net_bytes_round,
            "cluster_net_bytes_per_rank_round": sum(r.net_bytes_round for name, r in rows.items() if name != "train"),
            "train_net_bytes_per_step": rows["train"].net_bytes_step,
            "checkpoint_replicated_bytes": (cost.params + cost.feature_dim * s.heads + s.heads) * 4 * 2}
