"""Hierarchical against flat k-means at large k: what the super-cluster level buys.

    python bench/hierarchy.py --data fmnist --run runs/fmnist     # 1M rows of real features, d = 64, k = 20480
    python bench/hierarchy.py --data synthetic --dims 64,256       # a Gaussian mixture (bench/kmeans.make_rows)
    python bench/hierarchy.py --quick                              # 20k x 16, k = 256: seconds (the tests run it)

Rows: --data fmnist streams Fashion-MNIST's 60k train images through the training augmentation
(random resized crop, flip: no two rows alike) N times over, through the trunk of a trained run
(--run, e.g. the Quickstart's), then PCA-whitens and L2-normalises them to d dims as a round does
(cluster/pca.py); built once into bench/runs/hierarchy/ (a .npy memmap). --data synthetic: N rows of
a mixture of 4 k Gaussian modes (make_rows), d dims. Every variant clusters the same rows, each rank
its contiguous share, with the same seed, the same --niter Lloyd iterations at each level and the
same --threads in total (split over the ranks):
  flat     m = 1: one k-means with k centroids over all rows (DeepCluster)
  m = 4, 16, 64: m super-clusters, then k/m inside each on its owners (cluster/hierarchy.py)
k must be a multiple of the largest m: the default 20480 = 320 x 64 (the issue's "k = 20 000").
Columns: wall time, seconds per Lloyd iteration (level 1 + level 2 of the busiest rank / niter),
peak resident memory per rank above the loaded rows (VmHWM, reset before clustering), the flat
objective of the final assignment (sum over rows of the squared distance to the assigned centroid,
recomputed here in numpy from the rows, labels and centroids, and checked against the code's own),
its ratio to flat, the share of the k ids left empty or clamped, NMI of the assignment with the flat
one (sklearn), and the cost model (m + k/m) / k of an iteration against flat. Writes
bench/results/hierarchy.json (machine, date, commit, load average, settings, rows).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kmeans import make_rows  # noqa: E402
from bench.ranks import run_ranks  # noqa: E402
from bench.record import write_record  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hierarchy.json"
CACHE = ROOT / "bench" / "runs" / "hierarchy"


# ----------------------------------------------------------------------------- rows


def fmnist_features(path: Path, n: int, dim: int, run_dir: str, threads: int, batch: int = 512) -> Path:
    """n rows: augmented Fashion-MNIST through the run's trunk, PCA-whitened + L2 to `dim`; cached."""
    if path.exists():
        return path
    from dist_cluster.cluster.pca import fit_pca
    from dist_cluster.data.transforms import train_transform
    from dist_cluster.evaluation.features import load_backbone
    from shards.sources import FMNIST_DIR, read_idx
    torch.set_num_threads(threads)
    backbone = load_backbone(run_dir)
    cfg = backbone.cfg
    images = torch.from_numpy(read_idx(Path(FMNIST_DIR) / "train-images-idx3-ubyte.gz", 3))
    transform = train_transform(cfg.data.image_size, cfg.data.min_scale)
    torch.manual_seed(0)
    raw = np.empty((n, backbone.trunk.feature_dim), np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch):
            idx = torch.arange(lo, min(n, lo + batch)) % len(images)
            rgb = images[idx].unsqueeze(1).expand(-1, 3, -1, -1)
            x = transform.finish_batch(torch.stack([transform.per_sample(img) for img in rgb]))
            raw[lo:lo + len(idx)] = backbone.trunk(x.contiguous(memory_format=torch.channels_last)).float().numpy()
            if lo % (50 * batch) == 0:
                print(f"features {lo}/{n} ({(lo + 1) / (time.perf_counter() - start):.0f} img/s)", flush=True)
    pca = fit_pca(torch.from_numpy(raw), dim, 1e-5, torch.device("cpu"))
    out = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=np.float32, shape=(n, dim))
    for lo in range(0, n, 1 << 16):
        out[lo:lo + (1 << 16)] = pca.apply(torch.from_numpy(raw[lo:lo + (1 << 16)]), torch.device("cpu")).numpy()
    out.flush()
    os.replace(str(path) + ".tmp", path)
    return path


def synthetic_rows(path: Path, n: int, dim: int, k: int) -> Path:
    if not path.exists():
        out = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=np.float32, shape=(n, dim))
        for lo in range(0, n, 1 << 17):
            out[lo:min(n, lo + (1 << 17))] = make_rows(lo, min(n, lo + (1 << 17)), dim, 0, 4 * k)
        out.flush()
        os.replace(str(path) + ".tmp", path)
    return path


# ----------------------------------------------------------------------------- one variant on W ranks


def _hwm_kib() -> int:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _rank_main(rank, world, port, args, rows_path, m, out_dir):
    threads = max(1, args.threads // world)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    from dist_cluster.cluster.hierarchy import hierarchical_kmeans
    from dist_cluster.runtime import distributed
    env = distributed.init(backend="gloo", device="cpu")
    try:
        rows = np.load(rows_path, mmap_mode="r")
        lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world
        x = torch.from_numpy(np.array(rows[lo:hi]))  # a writable copy in RAM
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (the loaded rows included)
        base = _hwm_kib()
        start = time.perf_counter()
        res = hierarchical_kmeans(x, args.k, m, args.niter, 0, env.device, backend=args.backend)
        wall = time.perf_counter() - start
        lloyd = res.seconds["level1"] + res.seconds["level2"]
        np.save(out_dir / f"labels.rank{rank}.npy", res.sub_local.numpy())
        torch.save({s: c for s, c in res.centroids_sub.items()}, out_dir / f"centroids.rank{rank}.pt")
        return dict(wall_s=wall, lloyd_s=lloyd, seconds=res.seconds, peak_mib=(_hwm_kib() - base) / 1024,
                    objective=res.objective_level2, empty_resplit=res.empty_resplit,
                    sub_sizes=res.sub_sizes.tolist(), clamped=res.clamped, threads=threads)
    finally:
        distributed.shutdown()


def centroid_table(out_dir: Path, world: int, k: int, m: int, dim: int) -> np.ndarray:
    """[k, d] centroids by global sub id (NaN where a super-cluster used fewer than k/m)."""
    table = np.full((k, dim), np.nan, np.float32)
    for rank in range(world):
        for s, c in torch.load(out_dir / f"centroids.rank{rank}.pt").items():
            table[s * (k // m):s * (k // m) + len(c)] = c.numpy()
    return table


def flat_objective(rows: np.ndarray, labels: np.ndarray, centroids: np.ndarray, chunk: int = 1 << 16) -> float:
    """Sum over rows of the squared distance to the assigned centroid (float64), in row chunks."""
    total = 0.0
    for lo in range(0, len(rows), chunk):
        diff = np.asarray(rows[lo:lo + chunk], np.float64) - centroids[labels[lo:lo + chunk]]
        total += float((diff * diff).sum())
    return total


def run_variant(args, rows_path: Path, world: int, m: int) -> tuple[dict, np.ndarray]:
    from dist_cluster.runtime.distributed import free_port
    with tempfile.TemporaryDirectory(prefix="bench-hier-") as tmp:
        out_dir = Path(tmp)
        per_rank = run_ranks(_rank_main, world, (world, free_port(), args, str(rows_path), m, out_dir),
                             timeout_s=args.timeout)
        labels = np.concatenate([np.load(out_dir / f"labels.rank{r}.npy") for r in range(world)])
        rows = np.load(rows_path, mmap_mode="r")
        centroids = centroid_table(out_dir, world, args.k, m, rows.shape[1])
    objective = flat_objective(rows, labels, centroids)
    sizes = np.asarray(per_rank[0]["sub_sizes"])
    row = dict(variant="flat" if m == 1 else f"m={m}", m=m, world=world, n=len(rows), dim=rows.shape[1],
               k=args.k, niter=args.niter, wall_s=max(r["wall_s"] for r in per_rank),
               s_per_iter=max(r["lloyd_s"] for r in per_rank) / args.niter,
               seconds_by_stage={s: max(r["seconds"][s] for r in per_rank) for s in per_rank[0]["seconds"]},
               peak_mib_per_rank=[r["peak_mib"] for r in per_rank], objective=objective,
               objective_code=per_rank[0]["objective"], empty_or_clamped=float((sizes == 0).mean()),
               empty_resplit=per_rank[0]["empty_resplit"], threads_per_rank=per_rank[0]["threads"],
               cost_model=(m + args.k / m) / args.k if m > 1 else 1.0)
    return row, labels


def cached_variant(args, rows_path: Path, world: int, m: int) -> tuple[dict, np.ndarray]:
    """run_variant, with its row and labels kept beside the features: an interrupted bench resumes."""
    stem = rows_path.with_suffix("").name + f"-k{args.k}-it{args.niter}-t{args.threads}-W{world}-m{m}"
    row_path, labels_path = CACHE / f"{stem}.json", CACHE / f"{stem}.labels.npy"
    if args.resume and row_path.exists() and labels_path.exists():
        print(f"reusing {row_path.name}", flush=True)
        return json.loads(row_path.read_text()), np.load(labels_path)
    row, labels = run_variant(args, rows_path, world, m)
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    row["load_average"] = os.getloadavg()
    np.save(labels_path, labels)
    row_path.write_text(json.dumps(row))
    return row, labels


def compare(rows: list[dict], labels: dict) -> None:
    """Ratios and NMI against the flat run of the same (world, dim)."""
    from sklearn.metrics import normalized_mutual_info_score
    for row in rows:
        flat = next((r for r in rows if r["m"] == 1 and r["world"] == row["world"] and r["dim"] == row["dim"]), None)
        if flat is None:
            continue
        row["objective_vs_flat"] = row["objective"] / flat["objective"]
        row["iter_time_vs_flat"] = row["s_per_iter"] / flat["s_per_iter"]
        key, flat_key = (row["world"], row["dim"], row["m"]), (flat["world"], flat["dim"], 1)
        row["nmi_vs_flat"] = float(normalized_mutual_info_score(labels[flat_key], labels[key]))


def print_table(rows: list[dict]) -> None:
    print("\n| d | W | variant | wall s | s / iteration | vs flat | (m + k/m) / k | peak MiB / rank | objective "
          "| vs flat | empty or clamped | NMI vs flat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        get = lambda key, f: f.format(r[key]) if key in r else "-"  # noqa: E731
        print(f"| {r['dim']} | {r['world']} | {r['variant']} | {r['wall_s']:.1f} | {r['s_per_iter']:.3f} | "
              f"{get('iter_time_vs_flat', '{:.3f}')} | {r['cost_model']:.3f} | "
              f"{max(r['peak_mib_per_rank']):.0f} | {r['objective']:.6g} | {get('objective_vs_flat', '{:.4f}')} | "
              f"{r['empty_or_clamped']:.2%} | {get('nmi_vs_flat', '{:.4f}')} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("fmnist", "synthetic"), default="synthetic")
    p.add_argument("--run", default=str(ROOT / "runs" / "fmnist"), help="--data fmnist: the trained run's directory")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dims", default="64")
    p.add_argument("--k", type=int, default=20480)
    p.add_argument("--ms", default="1,4,16,64", help="1 = flat")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="in total, split over the ranks")
    p.add_argument("--backend", default="auto", help="k-means E-step: auto | faiss | torch")
    p.add_argument("--quick", action="store_true", help="20k x 16, k = 256, m = 1,4,16,64: seconds")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--resume", action="store_true", help="reuse variants measured before with the same settings")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dims, args.k, args.niter = 20000, "16", 256, 5
    bad = [m for m in map(int, args.ms.split(",")) if args.k % m]
    if bad:
        p.error(f"k={args.k} is not a multiple of m in {bad}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    rows, labels = [], {}
    for dim in map(int, args.dims.split(",")):
        name = f"{args.data}-{args.n}x{dim}" + (f"-k{args.k}" if args.data == "synthetic" else "")
        path = CACHE / f"{name}.npy"
        path = (fmnist_features(path, args.n, dim, args.run, args.threads) if args.data == "fmnist"
                else synthetic_rows(path, args.n, dim, args.k))
        for world in map(int, args.worlds.split(",")):
            for m in map(int, args.ms.split(",")):
                row, labels[(world, dim, m)] = cached_variant(args, path, world, m)
                rows.append(row)
                print(f"d={dim} W={world} {row['variant']}: {row['wall_s']:.1f} s, "
                      f"{row['s_per_iter']:.3f} s/iteration", flush=True)
    compare(rows, labels)
    print_table(rows)
    return write_record(args.out, {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "out"}})


if __name__ == "__main__":
    main()
