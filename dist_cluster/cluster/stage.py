"""The clustering stage of a round: features -> PCA-whitening -> hierarchical k-means -> labels.

    state = run_clustering(feats, keys, cfg.cluster, round_idx, run_dir, logger, seed, device, prev=prev_state)
    state.keys, state.super, state.sub     # this rank's images only, in the order given
    state.sub_sizes, state.super_sizes     # global sizes ([k], [m]) for balancing

Collective: every rank calls it with its own features (in RAM or a local memmap) and the run's
device, where PCA, k-means and the routed rows are computed. Nothing but k x d / D x D sized numbers
and the routed rows of the level-2 step cross the network; labels stay on the rank that read the
images. A preemption signal is polled for throughout (`poll`), see preemption.py.

Writes RUN/clusters/round_<r>/ for resume and analysis (never read by other ranks during a run):
  centroids_super.npy        [m, d] (rank 0)      pca.npz  mean/projection/eigenvalues (rank 0)
  centroids_sub.<s>.npy      [k_s, d] (first rank of the group owning super-cluster s)
  assignments.rank<i>.npz    keys, super, sub (every rank, its own images)
  sizes.json, sizes.png      global sizes + histogram (rank 0)
sizes.json is written last, after a barrier: its presence marks a complete round.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dist_cluster.cluster.hierarchy import HierResult, hierarchical_kmeans
from dist_cluster.cluster.nmi import distributed_nmi
from dist_cluster.cluster.pca import fit_pca
from dist_cluster.cluster.pic import pic
from dist_cluster.runtime import comm
from dist_cluster.runtime.logger import Timer
from dist_cluster.runtime.preemption import NO_POLL
from dist_cluster.runtime.scratch import private_memmap


@dataclass
class ClusterState:
    keys: np.ndarray  # [n_local] str
    super: np.ndarray  # [n_local] int64
    sub: np.ndarray  # [n_local] int64, global sub-cluster ids (sub // (k // m) == super)
    sub_sizes: np.ndarray  # [k] int64, global
    super_sizes: np.ndarray  # [m] int64, global
    round_idx: int
    k: int
    m: int


# numpy.lib.format.write_array copies an array into a .npz member in blocks of at most this
NPZ_WRITE_BLOCK_BYTES = 16 << 20
# sizes.png (rank 0): matplotlib's figure, its 720 x 280 RGBA canvas and the PNG encoding; measured
# 2.0 MiB (k = 256) to 2.4 MiB (k = 320000) by VmHWM around _plot_sizes
PLOT_BYTES = 5 << 19


def save_buffer_bytes(n: int, key_chars: int, feature_dim: int, pca_dim: int) -> int:
    """Host bytes save_cluster_state adds at its peak: numpy's copy of (a block of) the largest
    array written, the keys or (rank 0) the float64 PCA projection; then rank 0's histogram."""
    return max(min(max(n * key_chars * 4, feature_dim * pca_dim * 8), NPZ_WRITE_BLOCK_BYTES), PLOT_BYTES)


def round_dir(run_dir, round_idx: int) -> Path:
    return Path(run_dir) / "clusters" / f"round_{round_idx}"


def whitened_place(n: int, dim: int, device_type: str, memmap_gb: float, overwrite: bool) -> str:
    """Where the whitened features go (the planner asks the same function):
      "device"    on `device` (the GPU, or RAM on CPU runs) when n x dim float32 fit in memmap_gb; on
                  a GPU run always then, where the k-means reads them fastest;
      "in place"  over the features' own memory, when the caller gives them up (overwrite_features):
                  the paper's 1.5M x 4096 floats per rank then exist once in RAM (or on disk), not twice;
      "memmap"    else, a private local-disk memmap that the k-means streams to the device."""
    fits = n * dim * 4 <= memmap_gb * 2**30
    if fits and (device_type == "cuda" or not overwrite):
        return "device"
    return "in place" if overwrite else "memmap"


def _whitened_buffer(n: int, dim: int, device: torch.device, cfg, round_idx: int):
    """The whitened features' buffer when not in place: on `device` when they fit in memmap_gb, else
    a local memmap that the k-means streams to the device chunk by chunk: private and already
    unlinked (scratch.private_memmap), its space freed when the buffer is released.
    Returns (buffer, memmap path for logs or None)."""
    if n * dim * 4 <= cfg.memmap_gb * 2**30:
        return torch.empty(n, dim, dtype=torch.float32, device=device), None
    array = private_memmap(cfg.memmap_dir, f"white.round{round_idx}.rank{comm.group_rank()}.f32", (n, dim))
    return array, getattr(array, "filename", None) or cfg.memmap_dir


def _whiten_in_place(features, dim: int):
    """A [n, dim] view over the features' own memory, for whitening in place (PCA.apply reads each
    chunk before writing it, and writes row i at or before where row i was read), or None when the
    features are not a contiguous float32 CPU tensor (extract.py's are)."""
    n = int(features.shape[0])
    usable = (isinstance(features, torch.Tensor) and features.device.type == "cpu" and features.is_contiguous()
              and features.dtype == torch.float32 and dim <= features.shape[1])
    return features.view(-1)[: n * dim].view(n, dim) if usable else None


def _as_str_keys(keys) -> np.ndarray:
    keys = np.asarray(keys)
    return keys.astype(str) if keys.dtype.kind not in "U" else keys


def method_options(c) -> dict:
    """The clustering method's own settings from the cluster config (none for kmeans)."""
    if "sinkhorn" in (c.method, c.super_method):
        return {"epsilon": c.sinkhorn_epsilon, "iters": c.sinkhorn_iters}
    return {}


def run_clustering(features_local, keys_local, cfg_cluster, round_idx: int, run_dir, logger, seed: int,
                   device: torch.device, prev: Optional[ClusterState] = None, poll=NO_POLL,
                   overwrite_features: bool = False) -> ClusterState:
    """PCA -> level 1 -> route -> level 2 -> return, metrics events, round files. Collective.
    overwrite_features=True lets the whitening reuse the features' memory (they are garbage after)."""
    c = cfg_cluster
    keys = _as_str_keys(keys_local)
    if features_local.ndim != 2 or len(keys) != features_local.shape[0]:
        raise ValueError(f"{len(keys)} keys for features of shape {tuple(features_local.shape)}: "
                         "need one key per feature row")
    with Timer() as total:
        if c.k == 1:  # RotNet: one cluster, nothing to fit
            res = hierarchical_kmeans(torch.zeros(len(keys), 1), 1, 1, 0, seed, device)
            pca = None
        else:
            pca, res = _pca_and_kmeans(features_local, c, round_idx, logger, seed, device, poll, overwrite_features)
    state = ClusterState(keys=keys, super=res.super_local.numpy(), sub=res.sub_local.numpy(),
                         sub_sizes=res.sub_sizes.numpy(), super_sizes=res.super_sizes.numpy(),
                         round_idx=round_idx, k=len(res.sub_sizes), m=len(res.super_sizes))  # pic: its own k
    nmi = _nmi_with_prev(state, prev, c, seed)
    _log_summary(logger, res, state, nmi, round_idx, total.seconds)
    save_cluster_state(run_dir, state, res, pca)
    return state


def _pca_and_kmeans(features_local, c, round_idx: int, logger, seed: int, device: torch.device, poll,
                    overwrite: bool):
    with Timer() as timer:
        pca = fit_pca(features_local, c.pca_dim, c.pca_eps, device, poll=poll)
        n = int(features_local.shape[0])
        place = whitened_place(n, c.pca_dim, device.type, c.memmap_gb, overwrite)
        buf = _whiten_in_place(features_local, c.pca_dim) if place == "in place" else None
        memmap_path = None
        if buf is None:
            buf, memmap_path = _whitened_buffer(n, c.pca_dim, device, c, round_idx)
        x = pca.apply(features_local, device, out=buf, poll=poll)
    logger.event("pca", round=round_idx, seconds=timer.seconds, n=pca.count, dim=pca.dim,
                 explained_variance=pca.explained_variance, floored=pca.n_floored,
                 memmap=str(memmap_path or ""))

    def log_iteration(level, super, iteration, objective, seconds):
        logger.event("kmeans", round=round_idx, level=level, super=super, iteration=iteration,
                     objective=objective, seconds=seconds)
    try:
        if c.method == "pic":
            return pca, _pic_round(x, c, device, logger, round_idx, seed)
        res = hierarchical_kmeans(x, c.k, c.m, c.niter, seed, device, c.backend, log=log_iteration,
                                  init_samples_per_rank=c.init_samples_per_rank, poll=poll,
                                  route_chunk_bytes=c.route_chunk_mb << 20, method=c.method,
                                  method_options=method_options(c), super_method=c.super_method)
    finally:
        del x, buf  # a memmap's disk space is freed here (its file is already unlinked)
    return pca, res


def _pic_round(x, c, device: torch.device, logger, round_idx: int, seed: int) -> HierResult:
    """cluster.method=pic over the whitened rows, as the hierarchy's result of one super-cluster (the
    summary's seconds_level1: the k-NN graph, seconds_level2: power iterations and basins)."""
    res = pic(x, c.pic_knn, c.pic_sigma, c.pic_alpha, c.pic_iters, device, block_bytes=c.route_chunk_mb << 20,
              nlist=c.pic_nlist, nprobe=c.pic_nprobe, seed=seed, backend=c.backend)
    logger.event("pic", round=round_idx, clusters=res.num_clusters, singletons_moved=res.singletons_moved,
                 seconds=res.seconds, search=res.search_info)
    world, n = comm.group_size(), int(res.sizes.sum())
    return HierResult(super_local=torch.zeros_like(res.labels_local), sub_local=res.labels_local,
                      centroids_super=torch.zeros(1, int(x.shape[1])), centroids_sub={},
                      sub_sizes=res.sizes, super_sizes=torch.tensor([n]),
                      seconds={"level1": res.seconds["graph"], "route": 0.0, "level2": res.seconds["power"],
                               "return": 0.0},
                      owners=[list(range(world))])


def _nmi_with_prev(state: ClusterState, prev: Optional[ClusterState], c, seed: int) -> dict:
    """NMI between the previous and this round's sub-clusters, over images present in both."""
    have_prev = torch.tensor([0 if prev is None else 1], dtype=torch.int64)
    if comm.all_reduce(have_prev, op=comm.MIN).item() == 0:
        return {"nmi_prev": None}  # first round (or a rank without history): skipped everywhere
    _, i_prev, i_new = np.intersect1d(prev.keys, state.keys, return_indices=True)
    unmatched = torch.tensor([len(state.keys) - len(i_new)], dtype=torch.int64)
    nmi, pairs = distributed_nmi(prev.sub[i_prev], state.sub[i_new])
    return {"nmi_prev": nmi, "nmi_pairs": pairs,
            "nmi_unmatched": int(comm.all_reduce(unmatched).item())}


def _stats(sizes: np.ndarray, prefix: str) -> dict:
    return {f"{prefix}_min": int(sizes.min()), f"{prefix}_median": float(np.median(sizes)),
            f"{prefix}_max": int(sizes.max()), f"{prefix}_empty": int((sizes == 0).sum())}


def _log_summary(logger, res: HierResult, state: ClusterState, nmi: dict, round_idx: int, seconds: float):
    names = ["level1", "route", "level2", "return"]
    # the slowest rank sets the stage time, so report the max over ranks
    walls = comm.all_reduce(torch.tensor([res.seconds[n] for n in names] + [seconds], dtype=torch.float64),
                            op=comm.MAX).tolist()
    n = int(state.super_sizes.sum())
    logger.event("kmeans", round=round_idx, summary=True, k=state.k, m=state.m, n=n,
                 world=comm.group_size(), **{f"seconds_{name}": v for name, v in zip(names + ["total"], walls)},
                 **_stats(state.sub_sizes, "size"), **_stats(state.super_sizes, "super_size"),
                 empty_resplit=res.empty_resplit, clamped=len(res.clamped),
                 objective_level1=res.objective_level1 / max(1, n), objective_level2=res.objective_level2 / max(1, n),
                 **nmi)


# ---------------------------------------------------------------- files


def _atomic(path: Path, write) -> None:
    """Write through a temporary name and rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_cluster_state(run_dir, state: ClusterState, res: HierResult, pca=None) -> Path:
    """Collective: each rank writes its own files; rank 0 writes sizes.json last."""
    out = round_dir(run_dir, state.round_idx)
    out.mkdir(parents=True, exist_ok=True)
    rank = comm.group_rank()
    if rank == 0:
        _atomic(out / "centroids_super.npy", lambda f: np.save(f, res.centroids_super.numpy()))
        if pca is not None:
            _atomic(out / "pca.npz", lambda f: np.savez(f, **pca.state_dict()))
    for s, centroids in res.centroids_sub.items():
        if res.owners[s][0] == rank:
            _atomic(out / f"centroids_sub.{s}.npy", lambda f: np.save(f, centroids.numpy()))
    _atomic(out / f"assignments.rank{rank}.npz",
            lambda f: np.savez(f, keys=state.keys, super=state.super, sub=state.sub))
    comm.barrier()
    if rank == 0:
        _plot_sizes(out / "sizes.png", state)
        meta = {"round": state.round_idx, "k": state.k, "m": state.m, "world_size": comm.group_size(),
                "n": int(state.super_sizes.sum()), "sub_sizes": state.sub_sizes.tolist(),
                "super_sizes": state.super_sizes.tolist(), "clamped": res.clamped,
                "empty_resplit": res.empty_resplit}
        _atomic(out / "sizes.json", lambda f: f.write(json.dumps(meta).encode()))
    comm.barrier()  # when any rank returns, the round's files are complete
    return out


def _plot_sizes(path: Path, state: ClusterState) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    fig = Figure(figsize=(9, 3.5))
    ax_sub, ax_super = fig.subplots(1, 2)
    ax_sub.hist(state.sub_sizes, bins=50, log=True)
    ax_sub.set(title=f"round {state.round_idx}: {state.k} sub-clusters", xlabel="images", ylabel="clusters")
    ax_super.bar(np.arange(state.m), state.super_sizes)
    ax_super.set(title=f"{state.m} super-clusters", xlabel="super-cluster", ylabel="images")
    fig.tight_layout()
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=80))


def load_cluster_state(run_dir, round_idx: int, rank: int) -> ClusterState:
    """This rank's labels of a completed round (resume). Needs the same world size as when written."""
    out = round_dir(run_dir, round_idx)
    meta_path = out / "sizes.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"round {round_idx} has no complete clustering: {meta_path} is missing")
    meta = json.loads(meta_path.read_text())
    if not 0 <= rank < meta["world_size"]:
        raise ValueError(f"rank {rank} asked for round {round_idx}, clustered with world size "
                         f"{meta['world_size']}: resume with the same number of ranks")
    with np.load(out / f"assignments.rank{rank}.npz", allow_pickle=False) as data:
        keys, sup, sub = data["keys"], data["super"], data["sub"]
    return ClusterState(keys=keys, super=sup, sub=sub, sub_sizes=np.asarray(meta["sub_sizes"], dtype=np.int64),
                        super_sizes=np.asarray(meta["super_sizes"], dtype=np.int64),
                        round_idx=round_idx, k=meta["k"], m=meta["m"])


# ----------------------------------------------------------------------------- readers (evaluation, report)


def last_complete_round(run_dir) -> Optional[Path]:
    """RUN/clusters/round_<r>/ of the largest r whose sizes.json (written last) exists."""
    rounds = [p for p in (Path(run_dir) / "clusters").glob("round_*") if (p / "sizes.json").exists()]
    return max(rounds, key=lambda p: int(p.name.split("_")[1]), default=None)


def load_assignments(round_dir: Path) -> dict:
    """keys, super, sub of every rank's assignments.rank<i>.npz, concatenated; checks none is missing."""
    meta = json.loads((round_dir / "sizes.json").read_text())
    parts = [round_dir / f"assignments.rank{r}.npz" for r in range(meta.get("world_size", 1))]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{round_dir}: {missing} missing for a round clustered by {meta['world_size']} ranks")
    out = {"keys": [], "super": [], "sub": []}
    for path in parts:
        with np.load(path, allow_pickle=False) as data:
            for name in out:
                out[name].append(data[name])
    return {name: np.concatenate(v) for name, v in out.items()} | {"meta": meta}
