"""The linear probe's two solvers side by side on the same features of one trained run.

    python bench/probe_solvers.py --run runs/fmnist                     # extracts once, caches under /tmp
    python bench/probe_solvers.py --run runs/fmnist --threads 1 --probes linear,conv2

For every probe of the evaluation (penultimate pre-ReLU and ReLU'd, every conv block pooled to
--layer-dims), fits `lbfgs` (L-BFGS on W, the solver until 2026-11-30) then `whitened` (the same
objective after W = U L^-1) on all train images and scores the test split; prints seconds,
L-BFGS iterations, final objective and top-1 of each, and the largest accuracy difference. Writes
bench/results/probe_solvers.json. The two fits of a probe run back to back, so a shared machine's
load hits both alike: read the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cached_features(args) -> dict:
    """{probe name: (train x, test x)} plus labels, from the cache or extracted once (one process)."""
    from dist_cluster.evaluation.features import extract_split, load_backbone
    cache = Path(args.cache)
    if not cache.exists():
        backbone = load_backbone(args.run)
        arrays = {}
        for split, shard_dir in (("train", args.train), ("test", args.test)):
            start = time.perf_counter()
            s = extract_split(backbone.trunk, shard_dir, backbone.cfg.data, torch.device("cpu"), num_workers=2,
                              layer_dims=args.layer_dims, desc=split)
            s = s.take(np.argsort(s.keys, kind="stable"))
            print(f"extracted {split}: {len(s.labels)} images in {time.perf_counter() - start:.0f} s", flush=True)
            arrays |= {f"{split}/labels": s.labels, f"{split}/linear": s.feats,
                       **{f"{split}/{name}": x for name, x in s.blocks.items()}}
        np.savez(cache, **arrays)
    with np.load(cache) as data:
        return {key: data[key] for key in data.files}


def probe_inputs(arrays: dict, name: str):
    if name == "linear_relu":
        return np.maximum(arrays["train/linear"], 0), np.maximum(arrays["test/linear"], 0)
    return arrays[f"train/{name}"], arrays[f"test/{name}"]


def fit_both(arrays: dict, name: str, args) -> dict:
    from dist_cluster.evaluation.probes import fit_linear_probe
    x_train, x_test = probe_inputs(arrays, name)
    y_train, y_test = arrays["train/labels"], arrays["test/labels"]
    row = {"dims": int(x_train.shape[1])}
    for solver in ("lbfgs", "whitened"):
        start = time.perf_counter()
        probe = fit_linear_probe(x_train, y_train, 10, l2=args.l2, max_iter=args.max_iter, solver=solver)
        row[solver] = {"seconds": time.perf_counter() - start, "iterations": probe.iterations,
                       "objective": probe.loss, "top1": probe.accuracy(x_test, y_test)}
        print(f"{name} ({row['dims']} dims) {solver}: {row[solver]}", flush=True)
    return row


def print_table(rows: dict) -> None:
    print("\n| probe | dims | lbfgs s | whitened s | speed-up | lbfgs iters | whitened iters | lbfgs objective | "
          "whitened objective | lbfgs top-1 | whitened top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        a, b = r["lbfgs"], r["whitened"]
        print(f"| {name} | {r['dims']} | {a['seconds']:.1f} | {b['seconds']:.1f} | {a['seconds'] / b['seconds']:.1f}x | "
              f"{a['iterations']} | {b['iterations']} | {a['objective']:.5f} | {b['objective']:.5f} | "
              f"{a['top1']:.4f} | {b['top1']:.4f} |")
    total = [sum(r[s]["seconds"] for r in rows.values()) for s in ("lbfgs", "whitened")]
    worst = max(abs(r["lbfgs"]["top1"] - r["whitened"]["top1"]) for r in rows.values())
    print(f"total: lbfgs {total[0]:.0f} s, whitened {total[1]:.0f} s ({total[0] / total[1]:.1f}x); "
          f"largest top-1 difference {worst:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--train", default="data/fmnist/train")
    parser.add_argument("--test", default="data/fmnist/test")
    parser.add_argument("--layer-dims", type=int, default=1024)
    parser.add_argument("--probes", help="comma list (default: linear, linear_relu and every block)")
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache", default="/tmp/dist_cluster_probe_features.npz")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "probe_solvers.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays = cached_features(args)
    blocks = sorted({k.split("/", 1)[1] for k in arrays} - {"labels", "linear"})
    names = args.probes.split(",") if args.probes else ["linear", "linear_relu", *blocks]
    rows = {}
    for name in names:
        rows[name] = fit_both(arrays, name, args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"run": args.run, "threads": torch.get_num_threads(), "rows": rows},
                                             indent=1))
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
