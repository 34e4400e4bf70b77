"""Structured configuration: dataclasses + YAML + `key=value` overrides (OmegaConf).

    cfg = load_config("configs/fmnist.yaml", ["cluster.k=100", "run_dir=runs/x"])

Unknown keys and wrong types fail here, before any work, with the offending key named.
`validate` adds the cross-field checks a type system cannot express (k >= m, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODES = ("deepercluster", "rotnet", "deepcluster", "supervised")


@dataclass
class DataConfig:
    train: str = "data/fmnist/train"  # shard directory holding manifest.json
    test: str = "data/fmnist/test"
    image_size: int = 28  # side of the crop fed to the network
    resize: int = 32  # extraction: resize shorter side to this, then center crop image_size
    batch_size: int = 64  # per rank
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 2000  # samples held for streaming shuffle, per worker
    min_scale: float = 0.5  # RandomResizedCrop lower scale bound (training)
    max_samples: int = 0  # >0: each rank uses only this many of its samples (smoke runs), a fixed subset
    # a shard with fewer samples than its manifest count (cut tar, over-counting manifest) fails the
    # epoch, naming it; True: read what is there, count the shortfall (truncated_shards, lost_truncated)
    allow_short_shards: bool = False
    decode: str = "cpu"  # cpu: loader workers decode JPEGs | device: workers ship bytes, the run's device decodes
    # images whose header declares more pixels are skipped undecoded (counted: skipped_too_large), so
    # a 389 kB PNG of 20000 x 20000 cannot take 1.2 GB per worker; 0: no limit. 50e6 ~ 7000 x 7000
    max_image_pixels: int = 50_000_000


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: int = 600  # collective timeout: a dead peer fails the run instead of hanging it
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ModelConfig:
    arch: str = "smallvgg"  # smallvgg | vgg16_bn | resnet50
    sobel: bool = True  # fixed grayscale + Sobel input layer (paper default)
    feature_dim: int = 512  # smallvgg: width of the penultimate (feature) layer
    pool_size: int = 1  # smallvgg: side of the average-pooled map under the feature layer (1: global)
    channels_last: bool = True  # NHWC: forward -20% on CPU (bench/train.py), tensor cores on GPU
    compile: bool = False  # torch.compile the DDP-wrapped trunk + super head (GPU only)


@dataclass
class ClusterConfig:
    k: int = 100  # total number of sub-clusters (k = 1: RotNet, no clustering)
    m: int = 4  # number of super-clusters (m = 1: flat DeepCluster)
    pca_dim: int = 64  # whitening dimension d (<= feature dim)
    pca_eps: float = 1e-5  # eigenvalue floor, relative to the largest eigenvalue
    niter: int = 20  # Lloyd iterations per level
    backend: str = "auto"  # auto | faiss | torch (E-step)
    init_samples_per_rank: int = 10000  # bound on the points each rank offers for centroid init
    memmap_gb: float = 4.0  # features larger than this per rank go to a memmap on local disk
    memmap_dir: str = "/tmp"
    route_chunk_mb: int = 256  # level-2 routing: MiB one round sends (and receives) per rank
    # kmeans (Lloyd) | sinkhorn: the same iterations with balanced assignments, every cluster N/k
    # images (SeLa's Sinkhorn-Knopp, cluster/sinkhorn.py), at both levels of the hierarchy | pic:
    # power iteration clustering on a k-NN graph (cluster/pic.py), flat (m = 1), k from the graph
    method: str = "kmeans"
    # level 1 (the m super-clusters) by another method: '' = method; sinkhorn gives m equal
    # super-clusters, so every owner group gets the same level-2 work (k-means' can be lopsided)
    super_method: str = ""
    sinkhorn_epsilon: float = 0.05  # entropy weight: the scores are cosines / epsilon
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations per assignment (SwAV: 3)
    pic_knn: int = 10  # neighbours per row in PIC's graph (Douze et al. 2018)
    pic_sigma: float = 0.2  # Gaussian kernel bandwidth on squared distances of L2-normalised rows
    pic_alpha: float = 0.001  # weight of the walk against the uniform restart
    pic_iters: int = 200  # power iterations (stopped early, before v flattens)
    # 0: exact k-NN search (N^2 d); else an inverted file of this many cells (cluster/knn_ivf.py;
    # about 4 sqrt(N): the paper's 96M images -> 40000) searched in pic_nprobe of them per row
    pic_nlist: int = 0
    pic_nprobe: int = 16


@dataclass
class TrainConfig:
    epochs: int = 10
    reassign: int = 2  # re-cluster every this many epochs
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    warmup_epochs: int = 0
    schedule: str = "constant"  # constant | cosine
    rotations: int = 4  # 4: rotation prediction; 1: none (DeepCluster)
    all_rotations: bool = False  # True: each image in all 4 rotations; False: one random rotation
    # weight: per-sample 1/|cluster| loss weights | resample: the loaders repeat or drop images as the
    # original's sampler draws them (uniform super-cluster, sub-cluster, image), weights 1 | none.
    # RotNet (one cluster: resample draws every image once, = none) and supervised (set to none)
    # ignore it (dist_cluster/train/targets.py)
    balance: str = "weight"
    # own_rows: each sub head learns from the mean loss over its own rows (the original's per-group
    # DDP); global_batch: from its rows' share of the global mean, ~1/S of that (the code before
    # 2026-11-30; only for the ablation, bench/ablation.py)
    sub_grad: str = "own_rows"
    # the heads' initial weights: normal, N(0, 0.01) and zero bias (DeepCluster's top layer) | default,
    # nn.Linear's own U(+-1/sqrt(D)) (the original DeeperCluster's heads)
    head_init: str = "normal"
    bf16: bool = True  # autocast on GPU only
    ckpt_every_steps: int = 200
    # True: a save stalls training only to copy the state to host memory, a thread writes the files
    # (checkpoint/store.py: the protocol); False: written inline, training waits (same files, same log)
    async_checkpoint: bool = True
    log_every_steps: int = 20


@dataclass
class Config:
    mode: str = "deepercluster"  # deepercluster | rotnet | deepcluster | supervised (upper bound)
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Keys a resume may change. rounds.train compares every other key with the config stored in the
# run_dir's checkpoint and refuses the run, naming each differing key with both values; the changes
# below are logged as `config_change` events in RUN/metrics.jsonl. Each changes how the run is
# operated, not what it computes. Not here, on purpose: data.num_workers (each rank's shards are
# split between its workers and batches are made inside a worker: the count decides which images
# share a batch, and the steps per epoch), data.shuffle_buffer (the sample order), train.bf16.
RESUMABLE_KEYS = {
    "train.epochs": "extends a run (or ends it sooner, not before what is done): the rounds still to come; "
                    "a cosine schedule or warm-up then spreads over the new total",
    "train.log_every_steps": "logging only",
    "train.ckpt_every_steps": "when to save (a save draws no random number)",
    "train.async_checkpoint": "whether a save is written in a background thread or inline: the same files",
    "dist.timeout_s": "how long a dead peer is waited for",
    # checkpoints are device-free (state_dicts mapped to the run's device, the CPU RNG stream restored
    # on either) and `auto` already resolves per machine, so refusing an explicit change would not stop
    # a device change; float rounding may differ, the algorithm does not. The world size is checked
    # on its own (checkpoint.load): it fixes each rank's shards and heads.
    "dist.backend": "gloo | nccl: the transport of the same sums",
    "dist.device": "cpu | cuda, see above",
    "model.compile": "fused kernels of the same graph (GPU only)",
    "run_dir": "a moved run directory",
    "data.test": "read by evaluation only",
    "cluster.memmap_gb": "where features wait for clustering: RAM or a float32 memmap, the same values",
    "cluster.memmap_dir": "the memmap's local disk (differs from job to job under SLURM)",
    "cluster.route_chunk_mb": "a memory bound: each routed row lands in the same place whatever the "
                              "round size (tests/test_route.py)",
}


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key."""


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    """Schema <- YAML file <- `key=value` overrides; then apply the mode and validate."""
    cfg = OmegaConf.structured(Config)
    try:
        if path:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        raise ConfigError(f"config key {key!r}: {str(err).splitlines()[0]}") from None
    apply_mode(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def apply_mode(cfg: DictConfig) -> None:
    """The baselines are modes of the same code: RotNet is k = 1, DeepCluster is m = 1 without rotation,
    supervised predicts the shards' labels (k is then the number of classes in the manifest)."""
    if cfg.mode == "rotnet":
        cfg.cluster.k, cfg.cluster.m = 1, 1
        cfg.train.rotations = 4
    elif cfg.mode == "deepcluster":
        cfg.cluster.m = 1
        cfg.train.rotations = 1
    elif cfg.mode == "supervised":  # the upper bound: the shards' labels replace the clusters
        cfg.cluster.m = 1
        cfg.train.rotations = 1
        cfg.train.balance = "none"


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {why}")


def validate(cfg: DictConfig) -> None:
    c, t, d = cfg.cluster, cfg.train, cfg.data
    _check(cfg.mode in MODES, "mode", f"must be one of {MODES}, got {cfg.mode!r}")
    _check(c.k >= 1 and c.m >= 1, "cluster.k", "k and m must be >= 1")
    _check(c.k >= c.m, "cluster.k", f"k={c.k} must be >= m={c.m} (each super-cluster needs a sub-cluster)")
    _check(c.k % c.m == 0, "cluster.k", f"k={c.k} must be a multiple of m={c.m} (k/m sub-clusters each)")
    _check(c.pca_dim >= 1, "cluster.pca_dim", "must be >= 1")
    _check(c.backend in ("auto", "faiss", "torch"), "cluster.backend", "auto | faiss | torch")
    _check(c.route_chunk_mb >= 1, "cluster.route_chunk_mb", "must be >= 1")
    _check(c.method in ("kmeans", "sinkhorn", "pic"), "cluster.method", f"kmeans | sinkhorn | pic, got {c.method!r}")
    _check(c.super_method in ("", "kmeans", "sinkhorn"), "cluster.super_method",
           f"'' (= cluster.method) | kmeans | sinkhorn, got {c.super_method!r}")
    _check(c.method != "pic" or not c.super_method, "cluster.super_method",
           f"{c.super_method!r} with cluster.method=pic: PIC is flat, there is no super level")
    _check(c.method != "pic" or c.m == 1, "cluster.m",
           f"m={c.m} with cluster.method=pic: PIC finds its own number of clusters, flat (set cluster.m=1)")
    _check(c.pic_knn >= 1 and c.pic_sigma > 0 and 0 < c.pic_alpha <= 1 and c.pic_iters >= 1, "cluster.pic_knn",
           f"pic_knn >= 1, pic_sigma > 0, 0 < pic_alpha <= 1, pic_iters >= 1; got {c.pic_knn}, {c.pic_sigma}, "
           f"{c.pic_alpha}, {c.pic_iters}")
    _check(c.pic_nlist >= 0, "cluster.pic_nlist", f"IVF cells, or 0 for the exact k-NN search; got {c.pic_nlist}")
    _check(c.pic_nlist == 0 or 1 <= c.pic_nprobe <= c.pic_nlist, "cluster.pic_nprobe",
           f"1 <= pic_nprobe <= pic_nlist (the cells a row searches), got {c.pic_nprobe} of {c.pic_nlist}")
    _check(c.sinkhorn_epsilon > 0 and c.sinkhorn_iters >= 1, "cluster.sinkhorn_epsilon",
           f"epsilon > 0 and sinkhorn_iters >= 1, got {c.sinkhorn_epsilon}, {c.sinkhorn_iters}")
    _check(t.rotations in (1, 4), "train.rotations", "must be 1 or 4")
    _check(t.rotations > 1 or c.k > 1, "train.rotations", "no rotation and k=1 leaves nothing to predict")
    _check(t.reassign >= 1, "train.reassign", "must be >= 1")
    _check(t.sub_grad in ("own_rows", "global_batch"), "train.sub_grad", f"own_rows | global_batch, got {t.sub_grad!r}")
    _check(t.balance in ("weight", "resample", "none"), "train.balance", f"weight | resample | none, got {t.balance!r}")
    _check(t.head_init in ("normal", "default"), "train.head_init", f"normal | default, got {t.head_init!r}")
    _check(t.schedule in ("constant", "cosine"), "train.schedule", "constant | cosine")
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.decode in ("cpu", "device"), "data.decode", f"cpu | device, got {d.decode!r}")
    _check(d.image_size <= d.resize, "data.image_size", f"crop {d.image_size} larger than resize {d.resize}")
    _check(cfg.dist.backend in ("auto", "gloo", "nccl"), "dist.backend", "auto | gloo | nccl")
    _check(cfg.model.arch in ("smallvgg", "vgg16_bn", "resnet50"), "model.arch", "smallvgg | vgg16_bn | resnet50")
    _check(cfg.model.pool_size >= 1, "model.pool_size", "must be >= 1")
    _validate_ranges(cfg)


def _validate_ranges(cfg: DictConfig) -> None:
    """Values that pass the types but fail later: a ZeroDivisionError at the first log, an untrained
    backbone exported with rc 0, a PCA or k-means refused after the whole extraction."""
    t, d, c = cfg.train, cfg.data, cfg.cluster
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs} (a random-init backbone: "
                                           f"launch/train.py --export-init)")
    _check(t.log_every_steps >= 1, "train.log_every_steps", f"must be >= 1, got {t.log_every_steps}")
    _check(t.ckpt_every_steps >= 0, "train.ckpt_every_steps",
           f"must be >= 0 (0: epoch ends only), got {t.ckpt_every_steps}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {t.warmup_epochs}")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", f"must be > 0, got {cfg.dist.timeout_s}")
    _check(c.niter >= 1, "cluster.niter", f"must be >= 1, got {c.niter}")
    _check(c.memmap_gb >= 0, "cluster.memmap_gb", f"must be >= 0 (0: always a memmap), got {c.memmap_gb}")
    _check(d.max_image_pixels >= 0, "data.max_image_pixels", f"must be >= 0 (0: no limit), got {d.max_image_pixels}")
    _check(d.max_samples >= 0, "data.max_samples", f"must be >= 0 (0: all), got {d.max_samples}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0 (0 or 1: no buffer), got {d.shuffle_buffer}")
    _check(0 < d.min_scale <= 1, "data.min_scale", f"must be in (0, 1], got {d.min_scale}")
    _check(cfg.model.feature_dim >= 1, "model.feature_dim", f"must be >= 1, got {cfg.model.feature_dim}")
    if clusters_needed(cfg):
        dim = feature_dim(cfg.model, d.image_size)
        _check(c.pca_dim <= dim, "cluster.pca_dim",
               f"{c.pca_dim} is larger than the {dim}-d features of model.arch={cfg.model.arch}")


def clusters_needed(cfg: DictConfig) -> bool:
    """RotNet (k = 1) and supervised runs never extract or cluster (like rounds.Run.clusters_needed)."""
    return cfg.cluster.k > 1 and cfg.mode != "supervised"


def feature_dim(cfg_model: DictConfig, image_size: int) -> int:
    """Width of the trunk's features: model.feature_dim for smallvgg, fixed by the other archs."""
    from dist_cluster.plan.costs import arch_cost  # no torch: the planner's own description of the trunks
    return arch_cost(cfg_model.arch, image_size, bool(cfg_model.sobel), int(cfg_model.feature_dim),
                     int(cfg_model.pool_size)).feature_dim


def validate_against_data(cfg: DictConfig) -> None:
    """Checks that need data.train (its manifest, its shards on disk), run before any work
    (launch/train.py, slurm.Trainer); load_config itself never reads the data, so that configs load
    where the data is not mounted."""
    from dist_cluster.data.manifest import load_manifest
    try:
        manifest = load_manifest(cfg.data.train)
        manifest.check_files(cfg.data.train)  # a missing shard stops the run now, not mid-epoch
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'data.train': {err}") from None
    if cfg.mode == "supervised":
        _check(manifest.has_labels, "mode", f"supervised needs labelled shards; {cfg.data.train} has none")
    if clusters_needed(cfg):
        # the manifest count is an upper bound: with data.max_samples > 0 only world x max_samples
        # images are used, and the world size is not known here
        capped = f" (data.max_samples={cfg.data.max_samples}: at most world size x that many are used)" \
            if cfg.data.max_samples > 0 else ""
        _check(cfg.cluster.k <= manifest.num_samples, "cluster.k",
               f"k={cfg.cluster.k} clusters for the {manifest.num_samples} images of {cfg.data.train}{capped}")
        _check(cfg.cluster.method != "pic" or cfg.cluster.pic_knn < manifest.num_samples, "cluster.pic_knn",
               f"{cfg.cluster.pic_knn} neighbours for the {manifest.num_samples} images of {cfg.data.train}{capped}")
        _check(cfg.cluster.method != "pic" or cfg.cluster.pic_nlist <= manifest.num_samples, "cluster.pic_nlist",
               f"{cfg.cluster.pic_nlist} IVF cells for the {manifest.num_samples} images of {cfg.data.train}{capped}")


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


# ---------------------------------------------------------------- resuming a run_dir


def flatten(node, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (dicts only; lists stay values)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved, cfg: DictConfig, progress: Optional[dict] = None,
                   source: str = "the checkpoint") -> list[tuple[str, object, object]]:
    """Check cfg against `saved` (the config, a YAML string, a run_dir's checkpoint was written with)
    and `progress` (where that checkpoint stands). Raises ConfigError naming every key that may not
    change, with both values; returns the allowed changes as (key, old, new)."""
    old = flatten(OmegaConf.to_container(OmegaConf.create(saved) if isinstance(saved, str) else saved, resolve=True))
    new = flatten(OmegaConf.to_container(cfg, resolve=True))
    # a key on one side only comes from another version of this schema: nothing to compare it with
    changed = [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    refused = [f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise ConfigError(
            f"run_dir {cfg.run_dir} holds a run with another configuration ({source}); these keys change "
            "results and cannot change on resume:\n" + "\n".join(refused) + "\nOnly " + ", ".join(RESUMABLE_KEYS) +
            " may (dist_cluster/config.py, RESUMABLE_KEYS). Use another run_dir for another configuration.")
    if progress is not None:
        _check_epochs(cfg.train, progress)
    return [c for c in changed if c[0] in RESUMABLE_KEYS]


def _check_epochs(t: DictConfig, progress: dict) -> None:
    """train.epochs may move, but not below what is done, nor past a round that ended early."""
    started = progress["epoch"] + (1 if progress["phase"] == "train" and progress["step"] > 0 else 0)
    _check(t.epochs >= started, "train.epochs",
           f"{t.epochs} is below the {started} epochs this run has already started")
    cut = progress["phase"] == "cluster" and progress["epoch"] < progress["round"] * t.reassign
    _check(not cut or t.epochs <= progress["epoch"], "train.epochs",
           f"{t.epochs} cannot extend this run: its last round ended early, after epoch {progress['epoch']} "
           f"(train.epochs was not a multiple of train.reassign={t.reassign}); the next round would skip "
           f"epochs. Start a new run_dir (initialised from RUN/export/) instead")
