"""Quality benchmark: DeeperCluster vs RotNet vs DeepCluster (vs random init, supervised, raw pixels)
on Fashion-MNIST, same backbone and same compute budget, labels unused except by `supervised`.

    python bench/quality.py                                  # CPU, 2 ranks, 2 epochs each: 25 min here
    python bench/quality.py --epochs 10 --also-epochs 2 --seeds 0,1,2 --layer-dims 0 --no-raw   # the verdict
    python bench/quality.py --epochs 30 --nproc 1 dist.device=cuda data.num_workers=8   # a GPU machine
    python bench/quality.py --transfer 0,2,4,6,8 --epochs 10 --seeds 0,1,2   # pre-train on 5 classes, evaluate
                                                                             # on the other 5 (never seen)

Each method is `torchrun ... launch/train.py --config configs/fmnist.yaml mode=<m> train.epochs=E`
followed by `torchrun ... launch/eval.py` on the same ranks (linear probe, weighted kNN k=20 T=0.07,
k-means k=10 NMI, and the per-layer probes the Quickstart skips); random init
is the trunk every run starts from, exported untrained (`launch/train.py --export-init`). Raw
pixels: the same probe, kNN and k-means on the 784 pixels. kNN and k-means see the features
centred with the train split's mean (the headline), whitened, and raw (the protocol before
2026-12-04): `<metric>_<prep>` in the rows (dist_cluster/evaluation/prep.py).
--transfer A: pre-training sees only the Fashion-MNIST classes A (shards built under data/), the
evaluation only the other classes (their own train and test splits): features for images of kinds
the training never saw, next to random init and raw pixels on the same protocol.
--seeds repeats every method but random init and supervised; --also-epochs evaluates each run's
trunk at earlier epochs too (its round copies: the constant schedule makes it the trunk of a shorter run).
Prints a table per run and the mean ± std over seeds with the fraction of the random-to-supervised gap
closed, and the verdict (DeeperCluster ahead of DeepCluster and RotNet by more than one std);
writes bench/results/quality.json (settings, summary, rows with commands and wall times) after every
run (--resume continues it) and keeps each run under bench/runs/<method>-s<seed>/.
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
# nmi, ami, hungarian_acc: k-means with k = the evaluation set's classes (eval.json's nmi_k<C>)
KEYS = ("linear_top1", "knn_top1", "nmi", "ami", "hungarian_acc", "nmi_clusters_train")
PREPS = ("center", "whiten", "raw")  # kNN / k-means feature preparations; the first is the headline
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def train_command(method: str, args, seed: int = 0) -> list[str]:
    """The command that leaves RUN/export (random) or RUN/checkpoints (the others) for launch/eval.py."""
    run_dir = Path(args.runs) / run_name(method, seed)
    common = [f"run_dir={run_dir}", f"data.train={getattr(args, 'pretrain', None) or args.train}",
              f"data.test={args.test}", f"seed={seed}", *args.overrides]
    if method == "random":  # the initial trunk of a deepercluster run, exported without training
        return [sys.executable, "launch/train.py", "--config", args.config, "--export-init",
                "mode=deepercluster", *common]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "launch/train.py",
            "--config", args.config, f"mode={method}", f"train.epochs={args.epochs}", *common]


def round_copy(run_dir: Path, epochs: int) -> Path:
    """RUN/checkpoints/round_<r>.pt, the trunk after `epochs` epochs (the rounds are `reassign` epochs long;
    with the constant schedule nothing before it depends on the run's total, so it is the trunk a run of
    `epochs` epochs ends with)."""
    from omegaconf import OmegaConf
    train = OmegaConf.load(run_dir / "config.yaml").train
    if epochs % train.reassign or train.get("schedule", "constant") != "constant" or train.get("warmup_epochs", 0):
        raise SystemExit(f"--also-epochs {epochs}: needs a constant schedule and a multiple of "
                         f"train.reassign={train.reassign}")
    return run_dir / "checkpoints" / f"round_{epochs // train.reassign - 1}.pt"


def evaluate(run_dir: Path, args, log: Path, checkpoint: Path | None = None, name: str | None = None):
    """launch/eval.py on the training's ranks: (its results, wall seconds, command)."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "launch/eval.py", "--run-dir",
           str(run_dir), "--train", args.train, "--test", args.test, "--max-train", str(args.max_train),
           "--layer-dims", str(args.layer_dims), "--no-report", "--feature-prep", ",".join(PREPS)]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    # eval.py writes eval.json only for the run's own data and names other sets from their manifests
    # (--transfer evaluates on classes the run never saw): name the file so it is the one read back
    name = name or ("transfer" if args.transfer else None)
    if name:
        cmd += ["--name", name]
    seconds = run(cmd, log)
    result = json.loads((run_dir / (f"eval-{name}.json" if name else "eval.json")).read_text())
    return result, seconds, cmd


def train_and_eval(method: str, args, seed: int) -> list[dict]:
    """One training run of args.epochs epochs, evaluated at its end and at each of args.also_epochs."""
    run_dir = Path(args.runs) / run_name(method, seed)
    log = Path(args.runs) / f"{run_name(method, seed)}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train_cmd = train_command(method, args, seed)
    train_s = run(train_cmd, log)
    ends = [None] if method == "random" else [*[e for e in args.also_epochs if e < args.epochs], args.epochs]
    rows = []
    for epochs in ends:
        copy = round_copy(run_dir, epochs) if epochs not in (None, args.epochs) else None
        result, eval_s, eval_cmd = evaluate(run_dir, args, log, copy, copy and f"e{epochs}")
        row = {"method": method, "seed": seed, "epochs": epochs or 0, **eval_row(result)}
        if copy is not None:  # the run's last clusters are not this trunk's
            row["nmi_clusters_train"] = None
        row.update(train_seconds=train_s if copy is None else 0.0,
                   eval_seconds=eval_s, train_cmd=" ".join(train_cmd), eval_cmd=" ".join(eval_cmd))
        rows.append(row)
    return rows


def eval_row(result: dict) -> dict:
    """A row's metrics from eval.json: KEYS, and knn_top1_<prep> / nmi_<prep> for every preparation."""
    k = result["num_classes"]
    row = {key: result.get(key) for key in ("linear_top1", "knn_top1", "nmi_clusters_train")}
    row.update({key: result.get(f"{key}_k{k}") for key in ("nmi", "ami", "hungarian_acc")})
    row.update(by_prep(result.get("knn_top1_by_prep") or {}, result.get("kmeans_by_prep") or {}, k))
    row["linear_by_layer"] = result.get("linear_by_layer")
    return row


def by_prep(knn: dict, kmeans: dict, k: int) -> dict:
    """knn_top1_<prep> and nmi_<prep> for every feature preparation evaluated."""
    out = {f"knn_top1_{p}": v for p, v in knn.items()}
    out.update({f"nmi_{p}": v.get(f"nmi_k{k}") for p, v in kmeans.items()})
    return out


def fmnist_pixels(split: str, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """The 784 pixels in [0, 1] and the labels (relabelled 0..n-1 when `classes` keeps a subset)."""
    from shards.sources import read_idx
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz", 3).reshape(-1, 784).astype(np.float32) / 255
    y = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", 1).astype(np.int64)
    if classes is not None:  # sorted ids, as transfer_sets makes them
        keep = np.isin(y, classes)
        x, y = x[keep], np.searchsorted(np.asarray(classes), y[keep])
    return x, y


def raw_pixels(args) -> dict:
    """Logistic regression, kNN and k-means (k = classes) on the raw pixels of the evaluation set,
    with the same feature preparations: the floor every method must beat."""
    import torch

    from dist_cluster.evaluation import prep
    from dist_cluster.evaluation.metrics import clustering_scores, knn_top1
    from dist_cluster.evaluation.probes import kmeans_labels, linear_probe_top1

    start = time.perf_counter()
    x_tr, y_tr = fmnist_pixels("train", args.eval_classes)
    x_te, y_te = fmnist_pixels("test", args.eval_classes)
    if args.max_train:
        keep = np.random.default_rng(0).permutation(len(x_tr))[:args.max_train]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    torch.manual_seed(0)
    classes = int(y_tr.max()) + 1
    knn, kmeans = {}, {}
    for how in PREPS:
        train, test = prep.prepare(x_tr, x_te, how)
        knn[how] = knn_top1(train, y_tr, test, y_te, k=20, temperature=0.07)
        kmeans[how] = clustering_scores(y_te, kmeans_labels(test, classes, seed=0), f"_k{classes}")
    result = {"num_classes": classes, "linear_top1": linear_probe_top1(x_tr, y_tr, x_te, y_te, classes)["top1"],
              "knn_top1": knn[PREPS[0]], **kmeans[PREPS[0]], "knn_top1_by_prep": knn, "kmeans_by_prep": kmeans}
    row = eval_row(result)
    row["train_seconds"], row["eval_seconds"] = 0.0, time.perf_counter() - start
    return row


def transfer_sets(args) -> None:
    """--transfer A: shards of the classes A (pre-training) and of the others (evaluation), built once."""
    args.eval_classes = None
    if not args.transfer:
        return
    train_classes = sorted(int(c) for c in args.transfer.split(","))
    args.eval_classes = [c for c in range(10) if c not in train_classes]
    root = Path(args.data_root)
    sets = {"pretrain": (train_classes, ("train",)), "eval": (args.eval_classes, ("train", "test"))}
    for role, (classes, splits) in sets.items():
        name = "fmnist-c" + "".join(map(str, classes))
        for split in splits:
            out = root / name / split
            if not (out / "manifest.json").exists():
                run([sys.executable, "shards/build.py", "fmnist", "--split", split, "--classes",
                     ",".join(map(str, classes)), "--out", str(out), "--workers", "2"], Path(args.runs) / "build.log")
        if role == "pretrain":
            args.pretrain = str(root / name / "train")
        else:
            args.train, args.test = str(root / name / "train"), str(root / name / "test")


def best_layer(row: dict) -> str:
    """The best per-layer probe as 'accuracy (layer)', or '-'."""
    by_layer = row.get("linear_by_layer") or {}
    if not by_layer:
        return "-"
    name = max(by_layer, key=by_layer.get)
    return f"{by_layer[name]:.4f} ({name})"


RAW_KEYS = ("knn_top1_raw", "nmi_raw")  # the protocol before 2026-12-04, for comparison


def print_table(rows: list[dict]) -> None:
    print("\n| method | epochs | seed | linear top-1 | kNN top-1 | NMI | AMI | Hungarian acc | NMI own clusters | "
          "kNN raw | NMI raw | best conv layer | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), (int, float)) else "-" for k in KEYS + RAW_KEYS]
        print(f"| {row['method']} | {row['epochs']} | {row['seed']} | " + " | ".join(cells) +
              f" | {best_layer(row)} | {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} |")


VERDICT_KEYS = ("linear_top1", "knn_top1", "nmi")
SIGNALS = ("deepercluster", "deepcluster", "rotnet")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std (ddof 1) over seeds per (method, epochs), and the fraction of the gap from
    random init to supervised (at the same epochs) that the mean closes."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["epochs"]), []).append(row)
    random = groups.get(("random", 0), [None])[0]
    summary = []
    for (method, epochs), members in groups.items():
        entry = {"method": method, "epochs": epochs, "seeds": [r["seed"] for r in members],
                 "train_seconds": float(np.mean([r["train_seconds"] for r in members]))}
        for key in VERDICT_KEYS + RAW_KEYS:
            if any(r.get(key) is None for r in members):
                continue
            values = np.array([r[key] for r in members], dtype=np.float64)
            entry[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            top = groups.get(("supervised", epochs))
            if random and top and key in VERDICT_KEYS:
                top_mean = float(np.mean([r[key] for r in top]))
                entry[key]["gap_closed"] = (entry[key]["mean"] - random[key]) / (top_mean - random[key])
        summary.append(entry)
    return summary


def verdict(summary: list[dict]) -> list[str]:
    """The issue's goal at each epoch count: DeeperCluster's mean ahead of each single-signal baseline's by
    more than the larger of their two stds on every metric, and >= 60% of the random-to-supervised gap
    closed on linear and kNN."""
    by = {(e["method"], e["epochs"]): e for e in summary}
    lines = []
    for epochs in sorted({e["epochs"] for e in summary if e["method"] == "deepercluster"}):
        ours = by[("deepercluster", epochs)]
        for base in ("deepcluster", "rotnet"):
            if (base, epochs) not in by:
                continue
            other = by[(base, epochs)]
            seeds = min(len(ours["seeds"]), len(other["seeds"]))
            for key in VERDICT_KEYS:
                lead = ours[key]["mean"] - other[key]["mean"]
                noise = max(ours[key]["std"], other[key]["std"])
                judged = (f"{'ahead' if lead > noise else 'NOT ahead'} by > 1 std = {noise:.4f}" if seeds > 1
                          else "one seed: no std, no verdict")
                lines.append(f"{epochs} epochs, {key}: DeeperCluster - {base} = {lead:+.4f} ({judged})")
        for key in ("linear_top1", "knn_top1"):
            gap = ours[key].get("gap_closed")
            if gap is not None:
                lines.append(f"{epochs} epochs, {key}: DeeperCluster closes {gap:.0%} of the random-to-supervised "
                             f"gap ({'>=' if gap >= 0.6 else '<'} 60%)")
        floors = [by[(m, 0)] for m in ("random", "raw pixels") if (m, 0) in by]
        for key in VERDICT_KEYS if floors else ():  # a sweep without random init or raw pixels: no floor
            below = [f["method"] for f in floors if key in f and ours[key]["mean"] <= f[key]["mean"]]
            lines.append(f"{epochs} epochs, {key}: DeeperCluster " + (f"NOT above {', '.join(below)}" if below else
                         f"above {' and '.join(f['method'] for f in floors)}"))
    return lines


def print_summary(summary: list[dict]) -> None:
    print("\n| method | epochs | seeds | linear top-1 | kNN top-1 | NMI | gap closed (linear / kNN) | kNN raw | "
          "NMI raw | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in sorted(summary, key=lambda e: (e["epochs"], e["method"])):
        cells = [f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" if k in e else "-" for k in VERDICT_KEYS + RAW_KEYS]
        gaps = " / ".join(f"{e[k]['gap_closed']:.0%}" if "gap_closed" in e[k] else "-"
                          for k in ("linear_top1", "knn_top1"))
        print(f"| {e['method']} | {e['epochs']} | {len(e['seeds'])} | " + " | ".join(cells[:3]) + f" | {gaps} | "
              + " | ".join(cells[3:]) + f" | {e['train_seconds']:.0f} |")
    for line in verdict(summary):
        print(line)


def plan(args) -> list[tuple[str, int]]:
    """(method, seed) in run order: random init and supervised once (first seed), the rest seed after seed,
    so that a cut-short bench has whole seeds."""
    methods = args.methods.split(",")
    once = [m for m in ("random", "supervised") if m in methods]
    per_seed = [m for m in methods if m not in once]
    order = [(m, args.seeds[0]) for m in once if m == "random"]
    for i, seed in enumerate(args.seeds):
        order += [(m, seed) for m in per_seed]
        if i == 0:
            order += [(m, seed) for m in once if m == "supervised"]
    return order


def parse_args(argv=None) -> argparse.Namespace:
    """The bench's options (bench/ablation.py builds its runs' options here too, so every option has
    its default there)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="2 = configs/fmnist.yaml, the Quickstart run")
    parser.add_argument("--also-epochs", default="", help="also evaluate each run's trunk after these epochs "
                        "(comma list; from its round copies)")
    parser.add_argument("--seeds", default="0", help="comma list; random init and supervised use the first")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default="configs/fmnist.yaml")
    parser.add_argument("--train", default="data/fmnist/train")
    parser.add_argument("--test", default="data/fmnist/test")
    parser.add_argument("--max-train", type=int, default=0, help="probe on a subset of the train split (0: all 60k)")
    parser.add_argument("--layer-dims", type=int, default=1024, help="per-layer probe width (papers: ~10k; 0: none)")
    parser.add_argument("--runs", default=str(ROOT / "bench" / "runs"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-pixel baseline (sweeps)")
    parser.add_argument("--transfer", default="", help="pre-train on these Fashion-MNIST class ids only, evaluate "
                        "on the others (e.g. 0,2,4,6,8)")
    parser.add_argument("--data-root", default=str(ROOT / "data"), help="where --transfer builds its shards")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out (same settings)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.also_epochs = [int(e) for e in args.also_epochs.split(",") if e]
    return args


def main() -> None:
    args = parse_args()
    settings = {"epochs": args.epochs, "nproc": args.nproc, "overrides": args.overrides,
                "max_train": args.max_train, "layer_dims": args.layer_dims, "transfer": args.transfer}
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    transfer_sets(args)
    out = Path(args.out)
    rows: list[dict] = []
    if args.resume and out.exists():
        stored = json.loads(out.read_text())
        if stored.get("settings") != settings:
            raise SystemExit(f"--resume: {out} was written with {stored.get('settings')}, not {settings}")
        rows = stored["rows"]
    if not args.no_raw and not any(r["method"] == "raw pixels" for r in rows):
        rows.append({"method": "raw pixels", "seed": 0, "epochs": 0, **raw_pixels(args)})
    done = {(r["method"], r["seed"]) for r in rows}
    for method, seed in plan(args):
        if (method, seed) not in done:
            rows += train_and_eval(method, args, seed)
        print_table(rows)
        summary = summarize(rows)
        print_summary(summary)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": settings, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
