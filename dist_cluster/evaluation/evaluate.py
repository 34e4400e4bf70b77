"""The quality benchmark of a run's frozen backbone: RUN/eval.json, RUN/eval.md, RUN/report/.

    python launch/eval.py --run RUN --train data/fmnist/train --test data/fmnist/test
    torchrun --standalone --nproc_per_node 2 launch/eval.py --run-dir RUN --train ... --test ...
    python launch/eval.py --run RUN --train OTHER/train --test OTHER/test [--name NAME]   # RUN/eval-<name>.json

Metrics (train split fits, test split scores):
  linear_top1        multinomial logistic regression on the penultimate features as the trunk
                     returns them (pre-ReLU, the features the clustering sees), standardised;
                     linear_top1_relu: the same on ReLU'd features (what the heads see)
  linear_by_layer    the same probe on every conv block output, average-pooled to <= --layer-dims
  knn_top1           weighted kNN, k=20, cosine, T=0.07 on the pre-ReLU features centred with the
                     train split's mean (--feature-prep; prep.py), then L2-normalised
  nmi_k<C>, ami_k<C>, hungarian_acc_k<C>
                     k-means (k = C = number of classes, faiss, 5 seeded restarts) on the test
                     features prepared the same way, L2-normalised, vs the labels (nmi_k10 on
                     10-class data); knn_top1_by_prep, kmeans_by_prep: every --feature-prep
  nmi_clusters_train the run's own last sub-clusters (RUN/clusters/round_<last>/) vs the train labels
Where they go: RUN/eval.json for the run's own data, RUN/eval-<name>.json for any other train/test
pair, never one over another (evalsets.py).
Every rank extracts its own shards; the probes are independent tasks spread over the ranks
(tasks.py), and each task's rows go to the rank that fits it (features.share_split); rank 0 writes
the results. Each stage prints one line with its time. Memory: a rank holds n x (the dims its tasks
need) x 4 bytes per split, e.g. the full Fashion-MNIST train split with smallvgg and --layer-dims
10000 in one process: 60000 x (512 + 29344) x 4 B = 7.2 GB; bound it with --max-train N,
--layer-dims (0: no per-layer probes) or more ranks.
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

from dist_cluster.cluster.stage import last_complete_round, load_assignments
from dist_cluster.data.manifest import load_manifest
from dist_cluster.evaluation import prep as feature_prep
from dist_cluster.evaluation import tasks as probe_tasks
from dist_cluster.evaluation.evalsets import check_free, is_own_data, manifest_set_name, result_stem
from dist_cluster.evaluation.features import (Split, extract_split, load_backbone, read_labels, reading_ranks,
                                              share_split)
from dist_cluster.evaluation.metrics import nmi
from dist_cluster.evaluation.stages import Stage, say
from dist_cluster.runtime import comm, distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --run-dir: under torchrun, whose own parser reads `--run` as an abbreviation of its --run-path
    parser.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory")
    parser.add_argument("--train", help="labelled train shards (default: the run's data.train)")
    parser.add_argument("--test", help="labelled test shards (default: the run's data.test)")
    parser.add_argument("--name", help="write RUN/eval-NAME.json (default: eval.json for the run's own data, "
                                       "else a name from the shards' manifests)")
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
    parser.add_argument("--probe-iters", type=int, default=300, help="L-BFGS iterations per probe (at most)")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-t", type=float, default=0.07)
    parser.add_argument("--feature-prep", default="center,whiten,raw",
                        help="kNN and k-means features, with the train split's statistics: comma list of "
                             "center | whiten | raw (the protocol before 2026-12-04); the first is the headline")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-report", action="store_true", help="skip RUN/report/")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the run's own clusters


def cluster_nmi_train(run_dir, train_dir, labels: Optional[dict] = None) -> dict:
    """NMI of the run's last sub- and super-clusters with the train labels, joined by key.

    labels: {key: class} of the whole train split when the caller has them (the extraction read
    them), else they are read from the shards' .cls members."""
    round_dir = last_complete_round(run_dir)
    if round_dir is None:
        return {"nmi_clusters_train": None, "nmi_clusters_train_note": "no complete RUN/clusters/round_*"}
    if not load_manifest(train_dir).has_labels:
        return {"nmi_clusters_train": None, "nmi_clusters_train_note": f"{train_dir} has no labels"}
    assign = load_assignments(round_dir)
    label_stats: dict = {}  # labels read by the extraction were range-checked there already
    if labels is None:
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
             f"evaluation set `{results.get('eval_set')}`: train `{results['train']}`, test `{results['test']}`", "",
             f"train {results['n_train']} images, test {results['n_test']} images, "
             f"{results['num_classes']} classes, seed {results['seed']}", "",
             "| metric | value |", "| --- | --- |"] + [f"| {name} | {fmt(v)} |" for name, v in rows]
    path.write_text("\n".join(lines) + "\n")


def _extract_both(backbone, args, env, seconds: dict) -> tuple[Split, Split]:
    """This rank's rows of both splits, one stage line each (images, img/s over all ranks)."""
    common = dict(cfg_data=backbone.cfg.data, device=env.device, rank=env.rank, world=env.world_size,
                  batch_size=args.batch_size, num_workers=args.workers, layer_dims=args.layer_dims,
                  channels_last=bool(backbone.cfg.model.get("channels_last", False)))
    out = []
    for name, shard_dir, limit in (("train", args.train, args.max_train), ("test", args.test, args.max_test)):
        with Stage(f"extract {name}", seconds, key=f"extract_{name}") as st:
            readers = reading_ranks(shard_dir, env.world_size)
            per_rank = -(-limit // readers) if limit > 0 else 0  # ceil(limit / readers)
            split = extract_split(backbone.trunk, shard_dir, max_samples=per_rank, desc=name, **common)
            total = sum(comm.all_gather_object(len(split.labels)))  # also waits for the slowest rank
            st.detail = (f"{total} images on {readers} of {env.world_size} rank(s), "
                         f"{total / max(time.perf_counter() - st.start, 1e-9):.0f} img/s,")
        out.append(split)
    seconds["extract"] = seconds["extract_train"] + seconds["extract_test"]
    return out[0], out[1]


def _plan(train: Split, test: Split, args, env) -> tuple[list, dict]:
    """(every probe task, {task: rank}): the same on every rank (agreed block dims and row counts)."""
    mine = ({name: x.shape[1] for name, x in train.blocks.items()}, train.feats.shape[1], len(train.labels),
            len(test.labels))
    every = comm.all_gather_object(mine)
    layer_dims = dict(sorted({name: d for blocks, _, _, _ in every for name, d in blocks.items()}.items()))
    n_train, n_test = sum(e[2] for e in every), sum(e[3] for e in every)
    n_train = min(n_train, args.max_train) if args.max_train > 0 else n_train
    n_test = min(n_test, args.max_test) if args.max_test > 0 else n_test
    tasks = probe_tasks.probe_tasks(max(e[1] for e in every), layer_dims, n_train, n_test, len(args.preps))
    return tasks, probe_tasks.assign(tasks, env.world_size)


def _share(train: Split, test: Split, tasks: list, owners: dict, seconds: dict) -> tuple[Split, Split]:
    """Both splits, rows sorted by key, each part on the ranks whose tasks need it."""
    feats_to = [r for r in set(owners.values()) if probe_tasks.FEATS in probe_tasks.needs_of(tasks, owners, r)]
    block_to = {t.needs: owners[t.name] for t in tasks if t.needs != probe_tasks.FEATS}
    with Stage("send each probe its rows", seconds, key="share") as st:
        train, test = share_split(train, feats_to, block_to), share_split(test, feats_to, block_to)
        st.detail = f"{len(train.labels)} train and {len(test.labels)} test images,"
    return train, test


def _run_probes(tasks: list, owners: dict, train: Split, test: Split, num_classes: int, args, env) -> Optional[dict]:
    """This rank's tasks; on rank 0 the merged results of all ranks (their seconds included), else None."""
    l2s = [float(v) for v in str(args.l2).split(",")]
    settings = probe_tasks.Settings(l2s=l2s, seed=args.seed, max_iter=args.probe_iters,
                                    knn_k=args.knn_k, knn_t=args.knn_t, device=env.device, preps=args.preps)
    mine = [t for t in tasks if owners[t.name] == env.rank]
    start = time.perf_counter()
    results, seconds = probe_tasks.run_tasks(mine, train, test, num_classes, settings)
    parts = comm.gather_object((results, seconds, time.perf_counter() - start), 0)
    if parts is None or not env.is_main:
        return None
    merged = probe_tasks.merge([p[0] for p in parts], num_classes, args.preps)
    merged["seconds"] = {name: t for p in parts for name, t in p[1].items()}
    merged["seconds"]["linear_by_layer"] = sum(t for n, t in merged["seconds"].items() if n.startswith("layer:"))
    merged["seconds"]["probes"] = max(p[2] for p in parts)  # wall time of the probe phase
    merged["probe_ranks"] = owners
    merged["layer_dims"] = {t.needs: t.dims for t in tasks if t.needs != probe_tasks.FEATS}
    return merged


def evaluate(args) -> Optional[dict]:
    """Run inside a distributed session; returns the results on rank 0, None elsewhere."""
    env = distributed.env()
    args.preps = _preps(args.feature_prep)
    total = time.perf_counter()
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.run, args.checkpoint)
    backbone.trunk.to(env.device)
    args.train = args.train or backbone.cfg.data.train
    args.test = args.test or backbone.cfg.data.test
    run_dir = Path(args.run)
    stem = result_stem(run_dir, backbone.cfg.data, args.train, args.test, args.name)
    check_free(run_dir / f"{stem}.json", args.train, args.test)  # before minutes of work, on every rank
    seconds: dict = {}
    train, test = _extract_both(backbone, args, env, seconds)
    tasks, owners = _plan(train, test, args, env)
    train, test = _share(train, test, tasks, owners, seconds)
    # the whole train split's labels, for the run's own clusters (saves a pass over the shards)
    all_labels = None if args.max_train > 0 else {k: int(v) for k, v in zip(train.keys, train.labels) if v >= 0}
    train, test = _subset(train, args.max_train, args.seed), _subset(test, args.max_test, args.seed + 1)
    num_classes = _num_classes(args.train, train, test)
    results = _run_probes(tasks, owners, train, test, num_classes, args, env)
    if results is None:
        return None  # rank 0 writes; the other ranks are done
    seconds.update(results.pop("seconds"))
    with Stage("NMI of the run's own clusters", seconds, key="cluster_nmi"):
        if Path(args.train).resolve() == Path(backbone.cfg.data.train).resolve():
            results.update(cluster_nmi_train(args.run, args.train, all_labels))
        else:  # the run clustered its own train images, not these
            results.update(nmi_clusters_train=None, nmi_clusters_train_note="not the run's train data")
    results.update(checkpoint=backbone.source, train=str(args.train), test=str(args.test),
                   train_dir=str(Path(args.train).resolve()), test_dir=str(Path(args.test).resolve()),
                   eval_set=args.name or manifest_set_name(args.train, args.test),
                   own_data=is_own_data(backbone.cfg.data, args.train, args.test), n_train=len(train.labels),
                   n_test=len(test.labels), num_classes=num_classes, seed=args.seed, knn_k=args.knn_k,
                   knn_t=args.knn_t, world_size=env.world_size, probe_iters=args.probe_iters,
                   max_layer_dims=args.layer_dims, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                   features="penultimate trunk output, pre-ReLU (linear_top1_relu: ReLU'd); kNN and k-means "
                            f"on it prepared by {args.preps[0]} (train statistics), then L2-normalised")
    _write(run_dir, stem, results, seconds)
    if not args.no_report:
        from dist_cluster.evaluation.report import write_report
        with Stage("report", seconds, key="report") as st:
            st.detail = f"{write_report(args.run, backbone.cfg.data.train, backbone=backbone, seed=args.seed)}"
    seconds["total"] = time.perf_counter() - total
    _write(run_dir, stem, results, seconds)  # again, with the report's and the total time
    k = num_classes
    say(f"wrote {run_dir / (stem + '.json')}: linear_top1 {results['linear_top1']:.4f}, "
        f"knn_top1 {results['knn_top1']:.4f}, nmi_k{k} {results[f'nmi_k{k}']:.4f}")
    say(f"total {seconds['total']:.1f} s: extract {seconds['extract']:.1f}, probes {seconds['probes']:.1f} "
        f"({env.world_size} rank(s)), report {seconds.get('report', 0.0):.1f}")
    return results


def _preps(text: str) -> tuple:
    preps = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [p for p in preps if p not in feature_prep.PREPS]
    if not preps or bad:
        raise SystemExit(f"--feature-prep {text!r}: a comma list of {', '.join(feature_prep.PREPS)}")
    return preps


def _write(run_dir: Path, stem: str, results: dict, seconds: dict) -> None:
    results["seconds"] = dict(seconds)
    (run_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    write_markdown(run_dir / f"{stem}.md", results)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    with distributed.session(SimpleNamespace(backend="auto", timeout_s=1800, device=args.device)):
        return evaluate(args)
