"""Quality benchmark: DeeperCluster vs RotNet vs DeepCluster (vs random init, supervised, raw pixels)
on Fashion-MNIST, same backbone and same compute budget, labels unused except by `supervised`.

    python bench/quality.py                                  # CPU, 2 ranks, 2 epochs each: 25 min here
    python bench/quality.py --epochs 30 --nproc 1 dist.device=cuda data.num_workers=8   # a GPU machine

Each method is `torchrun ... launch/train.py --config configs/fmnist.yaml mode=<m> train.epochs=E`
followed by `torchrun ... launch/eval.py` on the same ranks (linear probe, weighted kNN k=20 T=0.07,
k-means k=10 NMI, and the per-layer probes the Quickstart skips); random init
is the trunk every run starts from, exported untrained (`launch/train.py --export-init`). Raw
pixels: the same probe and k-means on the 784 pixels.
Prints a table, writes bench/results/quality.json (with commands and wall times) and keeps each run
under bench/runs/<method>/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("random", "rotnet", "deepcluster", "deepercluster", "supervised")
KEYS = ("linear_top1", "knn_top1", "nmi_k10", "ami_k10", "hungarian_acc_k10", "nmi_clusters_train")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def train_command(method: str, args) -> list[str]:
    """The command that leaves RUN/export (random) or RUN/checkpoints (the others) for launch/eval.py."""
    run_dir = Path(args.runs) / method
    common = [f"run_dir={run_dir}", f"data.train={args.train}", f"data.test={args.test}", *args.overrides]
    if method == "random":  # the initial trunk of a deepercluster run, exported without training
        return [sys.executable, "launch/train.py", "--config", args.config, "--export-init",
                "mode=deepercluster", *common]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "launch/train.py",
            "--config", args.config, f"mode={method}", f"train.epochs={args.epochs}", *common]


def train_and_eval(method: str, args) -> dict:
    run_dir = Path(args.runs) / method
    log = Path(args.runs) / f"{method}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train_cmd = train_command(method, args)
    # the evaluation on the training's ranks: features extracted and probes fitted in parallel
    # (the same numbers as one process up to float rounding, 1.2x faster here: README, Benchmarks)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    eval_cmd = [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "launch/eval.py", "--run-dir",
                str(run_dir), "--train", args.train,
                "--test", args.test, "--max-train", str(args.max_train), "--layer-dims", str(args.layer_dims),
                "--no-report"]
    train_s = run(train_cmd, log)
    eval_s = run(eval_cmd, log)
    result = json.loads((run_dir / "eval.json").read_text())
    row = {key: result.get(key) for key in KEYS}
    row.update(linear_by_layer=result.get("linear_by_layer"), train_seconds=train_s, eval_seconds=eval_s,
               train_cmd=" ".join(train_cmd), eval_cmd=" ".join(eval_cmd))
    return row


def raw_pixels(args) -> dict:
    """Logistic regression, kNN and k-means (k = 10) on the raw pixels: the floor every method must beat."""
    import torch

    from dist_cluster.evaluation.metrics import clustering_scores, knn_top1
    from dist_cluster.evaluation.probes import kmeans_labels, linear_probe_top1
    from shards.sources import read_idx

    root = Path("/usr/share/datasets/fashion-mnist")
    start = time.perf_counter()
    x_tr = read_idx(root / "train-images-idx3-ubyte.gz", 3).reshape(-1, 784).astype(np.float32) / 255
    y_tr = read_idx(root / "train-labels-idx1-ubyte.gz", 1).astype(np.int64)
    x_te = read_idx(root / "t10k-images-idx3-ubyte.gz", 3).reshape(-1, 784).astype(np.float32) / 255
    y_te = read_idx(root / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int64)
    if args.max_train:
        keep = np.random.default_rng(0).permutation(len(x_tr))[:args.max_train]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    torch.manual_seed(0)
    row = {"linear_top1": linear_probe_top1(x_tr, y_tr, x_te, y_te, 10)["top1"],
           "knn_top1": knn_top1(x_tr, y_tr, x_te, y_te, k=20, temperature=0.07)}
    row.update(clustering_scores(y_te, kmeans_labels(x_te, 10, seed=0), "_k10"))
    row["train_seconds"], row["eval_seconds"] = 0.0, time.perf_counter() - start
    return row


def best_layer(row: dict) -> str:
    """The best per-layer probe as 'accuracy (layer)', or '-'."""
    by_layer = row.get("linear_by_layer") or {}
    if not by_layer:
        return "-"
    name = max(by_layer, key=by_layer.get)
    return f"{by_layer[name]:.4f} ({name})"


def print_table(rows: dict) -> None:
    print("\n| method | linear top-1 | kNN top-1 | NMI k=10 | AMI k=10 | Hungarian acc | NMI own clusters | "
          "best conv layer | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), (int, float)) else "-" for k in KEYS]
        print(f"| {name} | " + " | ".join(cells) + f" | {best_layer(row)} | {row['train_seconds']:.0f} | "
              f"{row['eval_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="2 = configs/fmnist.yaml, the Quickstart run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="configs/fmnist.yaml")
    parser.add_argument("--train", default="data/fmnist/train")
    parser.add_argument("--test", default="data/fmnist/test")
    parser.add_argument("--max-train", type=int, default=0, help="probe on a subset of the train split (0: all 60k)")
    parser.add_argument("--layer-dims", type=int, default=1024, help="per-layer probe width (papers: ~10k)")
    parser.add_argument("--runs", default=str(ROOT / "bench" / "runs"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-pixel baseline (sweeps)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = parser.parse_args()
    rows = {} if args.no_raw else {"raw pixels": raw_pixels(args)}
    if rows:
        print_table(rows)
    for method in args.methods.split(","):
        rows[method] = train_and_eval(method, args)
        print_table(rows)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"epochs": args.epochs, "nproc": args.nproc,
                                              "overrides": args.overrides, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
