"""The quality benchmark of a run's frozen backbone: RUN/eval.json, RUN/eval.md, RUN/report/.

    python launch/eval.py --run RUN --train data/fmnist/train --test data/fmnist/test
    torchrun --standalone --nproc_per_node 2 launch/eval.py --run-dir RUN --train ... --test ...

Metrics (train split fits, test split scores):
  linear_top1        multinomial logistic regression on the penultimate features as the trunk
                     returns them (pre-ReLU, the features the clustering sees), standardised;
                     linear_top1_relu: the same on ReLU'd features (what the heads see)
  linear_by_layer    the same probe on every conv block output, average-pooled to <= --layer-dims
  knn_top1           weighted kNN, k=20, cosine, T=0.07 (pre-ReLU features, L2-normalised)
  nmi_k<C>, ami_k<C>, hungarian_acc_k<C>
                     k-means (k = C = number of classes, faiss, 5 seeded restarts) on the
                     L2-normalised test features vs the labels (nmi_k10 on 10-class data)
  nmi_clusters_train the run's own last sub-clusters (RUN/clusters/round_<last>/) vs the train labels
Every rank extracts its own shards; rank 0 gathers the rows and computes the metrics (features.py).
Memory on rank 0: n x (D + sum of pooled block dims) x 4 bytes per split, e.g. the full Fashion-MNIST
train split with smallvgg and --layer-dims 10000: 60000 x (512 + 29344) x 4 B = 7.2 GB; bound it
with --max-train N or --layer-dims (0: no per-layer probes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from .. import distributed
from ..manifest import load_manifest
from .features import Split, extract_split, gather_split, load_backbone, read_labels
from .metrics import clustering_scores, knn_top1, nmi
from .probes import kmeans_labels, linear_probe_top1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --run-dir: under torchrun, whose own parser reads `--run` as an abbreviation of its --run-path
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory")
    parser.add_argument("--train", help="labelled train shards (default: the run's data.train)")
    parser.add_argument("--test", help="labelled test shards (default: the run's data.test)")
    parser.add_argument("--checkpoint", help="a checkpoint .pt or an exported *_backbone.pth (default: last.pt)")
    parser.add_argument("--seed", type=int, default=0, help="k-means restarts, subsets, l2 hold-out")
    parser.add_argument("--max-train", type=int, default=0,
                        help="use at most N train images (0: all): each rank reads the first ceil(N/W) of its "
                             "shards, then rank 0 keeps a seeded subset of N (the subset depends on W)")
    parser.add_argument("--max-test", type=int, default=0, help="use at most N test images (0: all)")
    parser.add_argument("--layer-dims", type=int, default=10000,
                        help="per-layer probes: pool each block output to at most this many dims (0: skip)")
    parser.add_argument("--l2", default="1e-4",
                        help="probe L2 penalty; a comma list picks one on a 10%% hold-out of train")
    parser.add_argument("--probe-iters", type=int, default=300, help="L-BFGS iterations per probe")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-t", type=float, default=0.07)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-report", action="store_true", help="skip RUN/report/")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the run's own clusters


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


def cluster_nmi_train(run_dir, train_dir) -> dict:
    """NMI of the run's last sub- and super-clusters with the train labels, joined by key."""
    round_dir = last_complete_round(run_dir)
    if round_dir is None:
        return {"nmi_clusters_train": None, "nmi_clusters_train_note": "no complete RUN/clusters/round_*"}
    if not load_manifest(train_dir).has_labels:
        return {"nmi_clusters_train": None, "nmi_clusters_train_note": f"{train_dir} has no labels"}
    assign = load_assignments(round_dir)
    label_stats: dict = {}
    labels = read_labels(train_dir, assign["keys"].tolist(), label_stats)
    known = np.array([k in labels for k in assign["keys"]], dtype=bool)
    if not known.any():
        return {"nmi_clusters_train": None, "nmi_clusters_train_note": "no clustered key found in the train shards"}
    truth = np.array([labels[k] for k in assign["keys"][known]])
    return {"nmi_clusters_train": nmi(truth, assign["sub"][known]),
            "nmi_super_clusters_train": nmi(truth, assign["super"][known]),
            "clusters_round": int(round_dir.name.split("_")[1]), "clusters_k": int(assign["meta"]["k"]),
            "clusters_images": int(known.sum()), "clusters_unlabelled": int((~known).sum()),
            "clusters_bad_labels": label_stats.get("skipped_bad_label", 0)}


# ---------------------------------------------------------------- metrics on rank 0


def _subset(split: Split, limit: int, seed: int) -> Split:
    if limit <= 0 or len(split.labels) <= limit:
        return split
    return split.take(np.sort(np.random.default_rng(seed).choice(len(split.labels), limit, replace=False)))


def _num_classes(train_dir, train: Split, test: Split) -> int:
    for name, split in (("train", train), ("test", test)):
        if len(split.labels) == 0 or split.labels.min() < 0:
            raise ValueError(f"the {name} split has no labels (or no readable sample): the probes need labels")
    classes = load_manifest(train_dir).classes
    return max(len(classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)


def probe_metrics(train: Split, test: Split, num_classes: int, args, device: torch.device) -> dict:
    """linear (pre-ReLU, ReLU'd, per layer), kNN and k-means scores of the gathered splits."""
    l2s = [float(v) for v in str(args.l2).split(",")]
    fit = dict(num_classes=num_classes, l2s=l2s, seed=args.seed, max_iter=args.probe_iters, device=device)
    out, seconds = {}, {}
    tick = time.perf_counter()
    linear = linear_probe_top1(train.feats, train.labels, test.feats, test.labels, **fit)
    out.update(linear_top1=linear["top1"], linear_l2=linear["l2"], linear_val=linear["val"])
    relu = linear_probe_top1(np.maximum(train.feats, 0), train.labels, np.maximum(test.feats, 0), test.labels, **fit)
    out["linear_top1_relu"] = relu["top1"]
    seconds["linear"] = time.perf_counter() - tick
    tick = time.perf_counter()
    out["linear_by_layer"] = {name: linear_probe_top1(x, train.labels, test.blocks[name], test.labels, **fit)["top1"]
                              for name, x in train.blocks.items()}
    out["layer_dims"] = {name: int(x.shape[1]) for name, x in train.blocks.items()}
    seconds["linear_by_layer"] = time.perf_counter() - tick
    tick = time.perf_counter()
    out["knn_top1"] = knn_top1(train.feats, train.labels, test.feats, test.labels, k=args.knn_k,
                               temperature=args.knn_t, num_classes=num_classes, device=device)
    seconds["knn"] = time.perf_counter() - tick
    tick = time.perf_counter()
    clusters = kmeans_labels(test.feats, num_classes, seed=args.seed)
    out.update(clustering_scores(test.labels, clusters, suffix=f"_k{num_classes}"), kmeans_k=num_classes)
    seconds["kmeans"] = time.perf_counter() - tick
    out["seconds"] = seconds
    return out


def write_markdown(path: Path, results: dict) -> None:
    """RUN/eval.md: the numbers of eval.json as a table."""
    k = results.get("kmeans_k", 10)
    rows = [("linear_top1 (pre-ReLU penultimate, standardised)", results["linear_top1"]),
            ("linear_top1_relu (ReLU'd penultimate)", results["linear_top1_relu"]),
            (f"knn_top1 (k={results['knn_k']}, cosine, T={results['knn_t']})", results["knn_top1"]),
            (f"nmi_k{k} (k-means on test features)", results[f"nmi_k{k}"]),
            (f"ami_k{k}", results[f"ami_k{k}"]), (f"hungarian_acc_k{k}", results[f"hungarian_acc_k{k}"]),
            ("nmi_clusters_train (run's last sub-clusters)", results.get("nmi_clusters_train"))]
    rows += [(f"linear_by_layer[{name}] ({results['layer_dims'][name]} dims)", v)
             for name, v in results["linear_by_layer"].items()]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# Evaluation of `{results['checkpoint']}`", "",
             f"train {results['n_train']} images, test {results['n_test']} images, "
             f"{results['num_classes']} classes, seed {results['seed']}", "",
             "| metric | value |", "| --- | --- |"] + [f"| {name} | {fmt(v)} |" for name, v in rows]
    path.write_text("\n".join(lines) + "\n")


def _extract_both(backbone, args, env) -> tuple[Optional[Split], Optional[Split]]:
    common = dict(cfg_data=backbone.cfg.data, device=env.device, rank=env.rank, world=env.world_size,
                  batch_size=args.batch_size, num_workers=args.workers, layer_dims=args.layer_dims)
    per_rank = lambda n: -(-n // env.world_size) if n > 0 else 0  # noqa: E731 - ceil(n / W) per rank
    train = extract_split(backbone.trunk, args.train, max_samples=per_rank(args.max_train), desc="train", **common)
    test = extract_split(backbone.trunk, args.test, max_samples=per_rank(args.max_test), desc="test", **common)
    return gather_split(train), gather_split(test)


def evaluate(args) -> Optional[dict]:
    """Run inside a distributed session; returns the results on rank 0, None elsewhere."""
    env = distributed.env()
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.run, args.checkpoint)
    backbone.trunk.to(env.device)
    args.train = args.train or backbone.cfg.data.train
    args.test = args.test or backbone.cfg.data.test
    start = time.perf_counter()
    train, test = _extract_both(backbone, args, env)
    if not env.is_main:
        return None  # rank 0 alone fits the probes; the other ranks are done
    extract_seconds = time.perf_counter() - start
    train, test = _subset(train, args.max_train, args.seed), _subset(test, args.max_test, args.seed + 1)
    num_classes = _num_classes(args.train, train, test)
    results = probe_metrics(train, test, num_classes, args, env.device)
    results.update(cluster_nmi_train(args.run, args.train))
    results.update(checkpoint=backbone.source, train=str(args.train), test=str(args.test), n_train=len(train.labels),
                   n_test=len(test.labels), num_classes=num_classes, seed=args.seed, knn_k=args.knn_k,
                   knn_t=args.knn_t, world_size=env.world_size, probe_iters=args.probe_iters,
                   features="penultimate trunk output, pre-ReLU (linear_top1_relu: ReLU'd)")
    results["seconds"]["extract"] = extract_seconds
    run_dir = Path(args.run)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    write_markdown(run_dir / "eval.md", results)
    distributed.print0(f"wrote {run_dir / 'eval.json'}: linear_top1 {results['linear_top1']:.4f}, "
                       f"knn_top1 {results['knn_top1']:.4f}, nmi_k{num_classes} {results[f'nmi_k{num_classes}']:.4f}")
    if not args.no_report:
        from .report import write_report
        path = write_report(args.run, args.train, backbone=backbone, seed=args.seed)
        distributed.print0(f"wrote {path}")
    return results


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    with distributed.session(SimpleNamespace(backend="auto", timeout_s=1800, device=args.device)):
        return evaluate(args)
