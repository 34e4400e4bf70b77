"""Ablation of DeeperCluster on Fashion-MNIST: one knob at a time, against the verdict's DeeperCluster
(bench/quality.py, mean ± std over its seeds at the same epochs), to show what moves it against
DeepCluster and RotNet.

    python bench/ablation.py                                   # 2 epochs, seed 0, every variant: ~50 min here
    python bench/ablation.py --epochs 10 --variants resample,m1 --seed 1
    python bench/ablation.py --method deepcluster --variants resample,balance-none   # the same knob on a baseline
    python bench/ablation.py --epochs 10 --seeds 0,1,2 --variants m1,m1-rows-of-m2,m2-rows-of-m1,original,original-m1
    python bench/ablation.py --epochs 10 --seeds 0,1,2 --method deepcluster --variants original   # (and rotnet)

Each variant is `bench/quality.py`'s DeeperCluster run (same config, same evaluation: linear probe and
kNN on all 60k train images, k-means k=10 NMI on the test split) with the variant's overrides added,
kept under bench/runs/ablation/<variant>/. The baseline rows come from bench/results/quality.json (run
the verdict first; its 2-epoch rows are its round copies after epoch 2, the trunk a 2-epoch run ends
with). With --seeds, every variant runs once per seed and its row is the mean ± std. "delta / std":
the variant's minus the baseline's mean, in units of the larger of their seed stds (|x| > 1: outside
the seed-to-seed spread). Writes bench/results/ablation.json after every run; --resume continues it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/quality.py: the same training and evaluation commands)

# variant -> overrides; each changes one thing of configs/fmnist.yaml (k=100, m=1 since 2026-12-05,
# reassign=1, balance=weight, one random rotation per image, sub heads learning from their own rows'
# mean). Variants that were measured against m = 2 (the default before 2026-12-05) name it, so they
# keep measuring the same thing.
VARIANTS = {
    "resample": ["train.balance=resample"],          # the original's sampler instead of loss weights
    "balance-none": ["train.balance=none"],          # no balancing: big clusters dominate
    "sub-grad-global": ["train.sub_grad=global_batch"],  # the pre-fix 1/S sub-head gradient
    "k20": ["cluster.k=20"],
    "k400": ["cluster.k=400"],
    "m1": ["cluster.m=1"],                           # no hierarchy: rotation head x one sub head of k
    "m2": ["cluster.m=2"],                           # 2 super-clusters of 50 (the default until 2026-12-05)
    "m4": ["cluster.m=4"],                           # 4 super-clusters of 25
    "reassign2": ["train.reassign=2"],               # re-cluster every 2 epochs
    # all 4 rotations of every image, the same rows per step (a quarter of the images): 4 x the steps,
    # so 4 x the compute of an epoch; compare it with the verdict's longer runs
    "all-rotations": ["train.all_rotations=true", "data.batch_size=32"],
    # rows per sub head per step (256 images a step on 2 ranks: 64 a head at m = 1, 32 at m = 2), the
    # learning rate scaled with the batch: m = 1 at m = 2's rows, and m = 2 at m = 1's rows
    "m1-rows-of-m2": ["cluster.m=1", "data.batch_size=64", "train.lr=0.025"],
    "m2-rows-of-m1": ["cluster.m=2", "data.batch_size=256", "train.lr=0.1"],
    # the original's recipe (main.py defaults): uniform sampling over clusters, re-clustering every 3
    # epochs, nn.Linear's head init, lr 0.1 (its super head is kept across rounds when m = 1: always here)
    "original": ["train.balance=resample", "train.reassign=3", "train.head_init=default", "train.lr=0.1",
                 "cluster.m=2"],
    "original-m1": ["train.balance=resample", "train.reassign=3", "train.head_init=default", "train.lr=0.1",
                    "cluster.m=1"],
    # the other pseudo-labelling methods (issue 24): balanced assignments at both levels, and PIC
    # (flat, its own number of clusters from the k-NN graph); both at the shipped m = 1
    "sinkhorn": ["cluster.method=sinkhorn", "cluster.m=1"],
    "pic": ["cluster.method=pic", "cluster.m=1"],
}
# the baselines: the knobs they have, to tell a DeeperCluster effect from a shared one
BASELINE_VARIANTS = {"deepcluster": ("resample", "balance-none", "k20", "k400", "reassign2", "original"),
                     "rotnet": ("original",)}
KEYS = quality.VERDICT_KEYS


def baseline(path: Path, epochs: int, method: str) -> dict:
    """{method: summary entry} at `epochs` from the verdict's quality.json."""
    if not path.exists():
        raise SystemExit(f"{path} not found: run the verdict first (bench/quality.py --epochs 10 --also-epochs 2 ...)")
    summary = json.loads(path.read_text())["summary"]
    found = {e["method"]: e for e in summary if e["epochs"] == epochs}
    if method not in found:
        raise SystemExit(f"{path} has no {method} row at {epochs} epochs")
    return found


def variant_args(name: str, args) -> argparse.Namespace:
    """bench/quality.py's options for the variant's runs: its parser's defaults (all 60k probed, no
    transfer) but for what the ablation sets."""
    return quality.parse_args(["--epochs", str(args.epochs), "--nproc", str(args.nproc), "--config", args.config,
                               "--train", args.train, "--test", args.test, "--layer-dims", str(args.layer_dims),
                               "--runs", str(Path(args.runs) / name), *VARIANTS[name]])


def run_variant(name: str, seed: int, args) -> dict:
    """One run of the method with the variant's overrides, evaluated like the verdict's runs."""
    row = quality.train_and_eval(args.method, variant_args(name, args), seed)[0]
    row.update(variant=name, overrides=VARIANTS[name])
    return row


def variant_summary(rows: list[dict], name: str) -> dict:
    """Mean ± std over the variant's seeds (quality.summarize's entry) and its wall time."""
    entry = quality.summarize([r for r in rows if r["variant"] == name])[0]
    return {**entry, "variant": name, "overrides": VARIANTS[name]}


def deltas(entry: dict, base: dict) -> dict:
    """(variant mean - baseline mean) / the larger of the two seed stds (None when both are 0)."""
    out = {}
    for key in KEYS:
        std = max(base[key]["std"], entry[key]["std"])
        out[key] = (entry[key]["mean"] - base[key]["mean"]) / std if std > 0 else None
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def print_table(rows: list[dict], ref: dict, method: str) -> None:
    print("\n| variant | overrides | linear top-1 | kNN top-1 | NMI k=10 | delta / std (linear, kNN, NMI) | train s |")
    print("|---|---|---|---|---|---|---|")
    for name in ("deepercluster", "deepcluster", "rotnet"):
        if name in ref:
            e = ref[name]
            cells = " | ".join(f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" for k in KEYS)
            print(f"| {name} (verdict, {len(e['seeds'])} seeds) | - | {cells} | - | - |")
    for name in dict.fromkeys(r["variant"] for r in rows):
        e = variant_summary(rows, name)
        d = deltas(e, ref[method])
        cells = " | ".join(f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" for k in KEYS)
        print(f"| {name} ({len(e['seeds'])} seeds) | {' '.join(e['overrides'])} | {cells} | "
              f"{', '.join(fmt(d[k]) for k in KEYS)} | {e['train_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0", help="comma list: every variant once per seed")
    parser.add_argument("--method", default="deepercluster", choices=("deepercluster", "deepcluster", "rotnet"))
    parser.add_argument("--layer-dims", type=int, default=0, help="per-layer probes (bench/quality.py --layer-dims)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="configs/fmnist.yaml")
    parser.add_argument("--train", default=str(ROOT / "data" / "fmnist" / "train"))
    parser.add_argument("--test", default=str(ROOT / "data" / "fmnist" / "test"))
    parser.add_argument("--runs", default=str(ROOT / "bench" / "runs" / "ablation"))
    parser.add_argument("--baseline", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("--out", default=None, help="default: bench/results/ablation[-<method>].json")
    parser.add_argument("--resume", action="store_true", help="keep the variants already in --out")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    own = BASELINE_VARIANTS.get(args.method)
    if own is not None and args.variants == ",".join(VARIANTS):
        names = list(own)
    moot = [n for n in names if own is not None and n not in own]
    if moot:
        raise SystemExit(f"{moot}: not a knob of {args.method} (no super-clusters, sub heads, clusters or "
                         f"rotations); its variants: {', '.join(own)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    settings = {"epochs": args.epochs, "nproc": args.nproc, "config": args.config, "layer_dims": args.layer_dims}
    if args.method != "deepercluster":
        settings["method"] = args.method
    suffix = "" if args.method == "deepercluster" else f"-{args.method}"
    out = Path(args.out or ROOT / "bench" / "results" / f"ablation{suffix}.json")
    baseline(Path(args.baseline), args.epochs, args.method)  # a missing verdict fails now, not after a run
    rows: list[dict] = []
    if args.resume and out.exists():
        stored = json.loads(out.read_text())
        if stored["settings"] != settings:
            raise SystemExit(f"--resume: {out} was written with {stored['settings']}, not {settings}")
        rows = stored["rows"]
    for seed in seeds:  # seed after seed: a cut-short bench has every variant at the first seeds
        for name in names:
            if not any(r["variant"] == name and r["seed"] == seed for r in rows):
                rows.append(run_variant(name, seed, args))
            ref = baseline(Path(args.baseline), args.epochs, args.method)  # re-read: the verdict may add seeds
            print_table(rows, ref, args.method)
            out.parent.mkdir(parents=True, exist_ok=True)
            summary = [variant_summary(rows, n) for n in dict.fromkeys(r["variant"] for r in rows)]
            out.write_text(json.dumps({"settings": settings, "baseline": ref, "summary": summary, "rows": rows},
                                      indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
