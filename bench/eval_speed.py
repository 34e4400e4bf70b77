"""Evaluation options side by side on one trained run: 1 process or 2 ranks, per-layer probes on or off.

    python bench/eval_speed.py --run runs/fmnist                       # the variants below, in turn
    python bench/eval_speed.py --run runs/fmnist --variants 2r,2r-layers

Each variant is one `launch/eval.py` (under `torchrun --nproc_per_node 2` for the 2-rank ones) with
`--name speed-<variant>`, so it writes RUN/eval-speed-<variant>.json and never the run's eval.json;
all fit the probes on all train images. Prints wall time, the stage times, the probes' accuracies
and the ratio to the run's training time (the stage times in RUN/metrics.jsonl); writes
bench/results/eval_speed.json. Run on an otherwise idle machine for absolute numbers; on a shared
one, compare the variants of one invocation with each other.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (ranks, --layer-dims)
VARIANTS = {
    "1p-layers": (1, 1024),  # the Quickstart's evaluation until 2026-11-30 (one forward pass now, not two)
    "2r-layers": (2, 1024),  # bench/quality.py's protocol, on 2 ranks
    "1p": (1, 0),  # no per-layer probes
    "2r": (2, 0),  # the Quickstart's evaluation
}
KEYS = ("linear_top1", "linear_top1_relu", "knn_top1", "nmi_k10")


def command(run: str, variant: str, args) -> list[str]:
    ranks, layer_dims = VARIANTS[variant]
    launcher = [sys.executable]
    if ranks > 1:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(ranks)]
    return launcher + ["launch/eval.py", "--run-dir", run, "--train", args.train, "--test", args.test,
                       "--max-train", "0", "--layer-dims", str(layer_dims), "--name", f"speed-{variant}"] + (["--no-report"] if args.no_report else [])


def run_variant(run: str, variant: str, args) -> dict:
    cmd = command(run, variant, args)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    result = json.loads((Path(run) / f"eval-speed-{variant}.json").read_text())
    return {"cmd": " ".join(cmd), "wall": wall, "seconds": result["seconds"],
            "linear_by_layer": result.get("linear_by_layer", {}), **{k: result.get(k) for k in KEYS}}


def train_seconds(run: str) -> float:
    from dist_cluster.evaluation.compare import load_run, train_seconds as stage_sum
    return stage_sum(load_run(run).events) or float("nan")


def print_table(rows: dict, train_s: float) -> None:
    print(f"\ntraining: {train_s:.0f} s (stage times in metrics.jsonl)")
    print("| variant | eval wall s | / training | extract s | probes s | report s | linear | ReLU'd | kNN | NMI | "
          "per-layer probes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        s = r["seconds"]
        layers = ", ".join(f"{k} {v:.4f}" for k, v in r["linear_by_layer"].items()) or "-"
        print(f"| {name} | {r['wall']:.0f} | {r['wall'] / train_s:.2f} | {s['extract']:.0f} | {s['probes']:.0f} | "
              f"{s.get('report', 0):.0f} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS) + f" | {layers} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--train", default="data/fmnist/train")
    parser.add_argument("--test", default="data/fmnist/test")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = parser.parse_args()
    train_s = train_seconds(args.run)
    rows = {}
    for variant in args.variants.split(","):
        rows[variant] = run_variant(args.run, variant, args)
        print_table(rows, train_s)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"run": args.run, "train_seconds": train_s, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
