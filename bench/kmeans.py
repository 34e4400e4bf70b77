"""Our sharded k-means (1 and 2 ranks) against faiss.Kmeans in one process: same data, same
initial centroids, same total number of threads. Prints a table, writes bench/results/kmeans.json.

    python bench/kmeans.py                          # 200k x 256, k=2000, 10 iterations, CPU
    python bench/kmeans.py --quick                  # 20k x 64, k=200, 10 iterations
    python bench/kmeans.py --device cuda            # 1M x 256, k=20k, 25 iterations, torch E-step on GPU
    python bench/kmeans.py --device cuda --tf32     # the same with TF32 distance products (tensor cores)

GPU goal (issue: the faiss wiki's 1M x 256 -> 20k benchmark took 55 s on one P100): the 25
iterations in at most 3 s on one H200. On a machine without faiss the faiss row is left out.
    python bench/kmeans.py --n 100000 --ranks 1,2 --threads 2

Threads: faiss gets --threads OpenMP threads; our W ranks get --threads // W each (torch and
faiss inside a rank use the same count). faiss.Kmeans is told max_points_per_centroid=10**9,
otherwise it would silently train on a k * 256 subsample. Its per-iteration time is the difference
of its cumulative iteration_stats "time"; ours is kmeans().iteration_seconds (E-step + all_reduce
M-step + empty-cluster re-split). Objective = sum of squared distances at the last E-step (faiss's obj).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranks import run_ranks  # noqa: E402

BLOCK = 8192  # data are generated in seeded blocks so any rank can build its own rows alone


def make_rows(start: int, stop: int, d: int, seed: int, modes: int) -> np.ndarray:
    """Rows [start, stop) of a Gaussian mixture, identical whoever generates them."""
    centers = np.random.default_rng([seed, 0]).standard_normal((modes, d)).astype(np.float32) * 2
    out = np.empty((stop - start, d), dtype=np.float32)
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else 0):
        rng = np.random.default_rng([seed, 1, block])
        rows = centers[rng.integers(0, modes, BLOCK)] + rng.standard_normal((BLOCK, d), dtype=np.float32)
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        out[lo - start:hi - start] = rows[lo - block * BLOCK:hi - block * BLOCK]
    return out


def _rank_main(rank, world, port, args, init):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = max(1, args.threads // world)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    from dist_cluster.cluster.kmeans import kmeans, resolve_backend
    from dist_cluster.runtime import distributed
    try:
        env = distributed.init(backend="auto", device=args.device)
        lo, hi = rank * args.n // world, (rank + 1) * args.n // world
        x = torch.from_numpy(make_rows(lo, hi, args.d, args.seed, args.modes)).to(env.device)
        if args.tf32:  # float32 products on TF32 tensor cores (10-bit mantissa): near-ties may flip
            torch.backends.cuda.matmul.allow_tf32 = True
        start = time.perf_counter()
        res = kmeans(x, args.k, args.niter, args.seed, env.device, backend=args.backend,
                     init_centroids=torch.from_numpy(init))
        total = time.perf_counter() - start
        return dict(iteration_seconds=res.iteration_seconds, objective=res.objective, total_s=total,
                    backend=resolve_backend(args.backend, env.device), device=str(env.device),
                    threads_per_rank=threads)
    finally:
        distributed.shutdown()


def run_ours(world: int, args, init: np.ndarray) -> dict:
    from dist_cluster.runtime.distributed import free_port
    return run_ranks(_rank_main, world, (world, free_port(), args, init))[0]


def run_faiss(x: np.ndarray, init: np.ndarray, args) -> dict:
    import faiss
    faiss.omp_set_num_threads(args.threads)
    gpu = args.device == "cuda" and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(args.d, args.k, niter=args.niter, seed=args.seed, max_points_per_centroid=10**9,
                      gpu=gpu, verbose=False)
    start = time.perf_counter()
    km.train(x, init_centroids=init)
    total = time.perf_counter() - start
    cumulative = [s["time"] for s in km.iteration_stats]
    return dict(iteration_seconds=np.diff([0.0] + cumulative).tolist(), objective=km.obj.tolist(), total_s=total,
                backend="faiss-gpu" if gpu else "faiss", threads=args.threads)


def summarise(name: str, run: dict, ref: dict | None) -> dict:
    per_iter = statistics.median(run["iteration_seconds"])
    row = dict(name=name, per_iter_s=per_iter, total_s=run["total_s"], final_objective=run["objective"][-1])
    if ref is not None:
        row["time_ratio_vs_faiss"] = per_iter / statistics.median(ref["iteration_seconds"])
        row["objective_ratio_vs_faiss"] = run["objective"][-1] / ref["objective"][-1]
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<22}{'s/iter':>10}{'total s':>10}{'objective':>16}{'t/faiss':>9}{'obj/faiss':>11}")
    for r in rows:
        ratio_t = f"{r['time_ratio_vs_faiss']:.3f}" if "time_ratio_vs_faiss" in r else "-"
        ratio_o = f"{r['objective_ratio_vs_faiss']:.6f}" if "objective_ratio_vs_faiss" in r else "-"
        print(f"{r['name']:<22}{r['per_iter_s']:>10.3f}{r['total_s']:>10.2f}{r['final_objective']:>16.6g}"
              f"{ratio_t:>9}{ratio_o:>11}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="rows (default 200k CPU, 1M cuda, 20k quick)")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--niter", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto")
    p.add_argument("--ranks", default=None, help="comma list of world sizes (default 1,2 on CPU, 1 on cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="total threads, split over ranks")
    p.add_argument("--faiss", choices=["auto", "on", "off"], default="auto",
                   help="auto: on for CPU, on for cuda only when faiss has GPUs")
    p.add_argument("--modes", type=int, default=500, help="Gaussian mixture components of the data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="cuda: TF32 matmuls in the torch E-step")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kmeans.json"))
    args = p.parse_args()
    big = args.device == "cuda"
    defaults = dict(n=20_000, d=64, k=200, niter=10) if args.quick else \
        dict(n=1_000_000, d=256, k=20_000, niter=25) if big else dict(n=200_000, d=256, k=2000, niter=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.ranks is None:
        args.ranks = "1" if big else "1,2"
    if big and args.backend == "auto":
        args.backend = "torch"
    return args


def main():
    args = parse_args()
    worlds = [int(w) for w in args.ranks.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {args.ranks} needs that many GPUs, found {torch.cuda.device_count()}")
    print(f"data {args.n} x {args.d}, k={args.k}, {args.niter} iterations, {args.threads} threads, "
          f"device {args.device}, backend {args.backend}", flush=True)
    x = make_rows(0, args.n, args.d, args.seed, args.modes)
    init = x[np.random.default_rng([args.seed, 2]).choice(args.n, args.k, replace=False)].copy()
    try:
        import faiss
    except ImportError:  # the GPU check machine has none: our torch backend is measured alone
        faiss = None
        if args.faiss == "on":
            raise SystemExit("--faiss on, but faiss is not installed") from None
    use_faiss = faiss is not None and (args.faiss == "on" or (
        args.faiss == "auto" and (args.device == "cpu" or faiss.get_num_gpus() > 0)))
    runs, rows, ref = {}, [], None
    if use_faiss:
        ref = runs["faiss"] = run_faiss(x, init, args)
        rows.append(summarise(f"faiss.Kmeans ({ref['backend']})", ref, None))
        print_table(rows[-1:])
    del x
    for world in worlds:
        run = runs[f"ours_w{world}"] = run_ours(world, args, init)
        rows.append(summarise(f"ours W={world} ({run['backend']})", run, ref))
        print_table(rows[-1:])
    print()
    print_table(rows)
    if args.device == "cuda":
        total = max(r["total_s"] for r in rows if r["name"].startswith("ours"))
        print(f"{args.niter} iterations of {args.n} x {args.d} -> k={args.k}: {total:.2f} s (goal <= 3 s): "
              f"{'met' if total <= 3 else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps(dict(config=config, table=rows, runs=runs), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
