"""The evaluation's probes as independent tasks, spread over the ranks that extracted the features.

    tasks = probe_tasks(feature_dim, layer_dims={"conv1": 800, ...}, n_train, n_test)
    owners = assign(tasks, world)                # {task name: rank}, longest tasks first
    results = run_tasks(mine, train, test, num_classes, settings)   # this rank's share

Tasks: `linear` (pre-ReLU penultimate), `linear_relu`, `knn` and `kmeans` need the penultimate
features (kNN and k-means once per feature preparation of prep.py, with the train split's
statistics; the first is the headline number); `layer:<block>` needs that block's pooled output only. With one process every task runs
there (on all its threads); under torchrun each rank fits its share on its own core(s), and only the
rows its tasks need are sent to it (features.share_split). Each task prints one line with its result
and time; the linear probes show a progress bar of L-BFGS function evaluations on rank 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dist_cluster.evaluation import prep as feature_prep
from dist_cluster.evaluation.metrics import clustering_scores, knn_top1
from dist_cluster.evaluation.probes import kmeans_labels, linear_probe_top1
from dist_cluster.evaluation.stages import Stage, count_bar

FEATS = "feats"  # what a task on the penultimate features needs (else: a block name)


@dataclass(frozen=True)
class Task:
    name: str  # linear, linear_relu, knn, kmeans, layer:<block>
    needs: str  # FEATS or a block name
    dims: int  # feature dims the probe sees
    cost: float  # relative wall time, for the assignment only


def _probe_cost(dims: int, n_train: int) -> float:
    # L-BFGS: up to 300 iterations of two passes over the n x D rows; the cap is reached on
    # Fashion-MNIST, so the cost is about proportional to n x D
    return float(n_train * dims)


def probe_tasks(feature_dim: int, layer_dims: dict, n_train: int, n_test: int, preps: int = 1) -> list[Task]:
    """Every task of one evaluation, with its estimated cost (`preps` feature preparations each for
    kNN and k-means)."""
    d = feature_dim
    tasks = [Task("linear", FEATS, d, _probe_cost(d, n_train)), Task("linear_relu", FEATS, d, _probe_cost(d, n_train)),
             # kNN: one n_test x n_train x D product, ~1/10 of a probe of the same D as measured;
             # k-means on the test split: ~1/10 of the kNN
             Task("knn", FEATS, d, preps * n_train * n_test * d / 1e5),
             Task("kmeans", FEATS, d, preps * n_test * d / 10.0)]
    tasks += [Task(f"layer:{name}", name, dims, _probe_cost(dims, n_train)) for name, dims in layer_dims.items()]
    return tasks


def assign(tasks: Sequence[Task], world: int) -> dict:
    """{task name: rank}: longest tasks first, each to the least loaded rank (ties: the lowest rank)."""
    load = [0.0] * world
    owners = {}
    for task in sorted(tasks, key=lambda t: (-t.cost, t.name)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[task.name] = rank
        load[rank] += task.cost
    return owners


def needs_of(tasks: Sequence[Task], owners: dict, rank: int) -> set:
    """What `rank` must hold: FEATS and / or block names."""
    return {t.needs for t in tasks if owners[t.name] == rank}


@dataclass
class Settings:
    l2s: list
    seed: int
    max_iter: int
    knn_k: int
    knn_t: float
    device: torch.device
    preps: tuple = ("center",)  # kNN / k-means feature preparations (prep.py); the first is the headline


def _linear(name: str, x_train, y_train, x_test, y_test, num_classes: int, s: Settings) -> dict:
    bar = count_bar(f"linear probe {name}", total=s.max_iter * len(s.l2s) + (s.max_iter if len(s.l2s) > 1 else 0))
    try:
        return linear_probe_top1(x_train, y_train, x_test, y_test, num_classes, l2s=s.l2s, seed=s.seed,
                                 max_iter=s.max_iter, device=s.device,
                                 on_eval=None if bar is None else (lambda: bar.update(1)))
    finally:
        if bar is not None:
            bar.close()


def run_task(task: Task, train, test, num_classes: int, s: Settings, seconds: dict) -> dict:
    """One task's results (the keys eval.json has for it); prints its line, records its seconds."""
    with Stage(_title(task, train), seconds, key=task.name) as st:
        if task.name in ("linear", "linear_relu") or task.name.startswith("layer:"):
            x_train, x_test = _inputs(task, train, test)
            out = _linear(task.name, x_train, train.labels, x_test, test.labels, num_classes, s)
            st.detail = f"top-1 {out['top1']:.4f}, l2 {out['l2']:g}, {out['iterations']} L-BFGS iterations,"
            return {task.name: out}
        scores = {}
        for prep in s.preps:  # the statistics of the train split only, for both splits
            mean, projection = feature_prep.fit(train.feats, prep)
            test_x = feature_prep.apply(test.feats, mean, projection)
            if task.name == "knn":
                scores[prep] = knn_top1(feature_prep.apply(train.feats, mean, projection), train.labels, test_x,
                                        test.labels, k=s.knn_k, temperature=s.knn_t, num_classes=num_classes,
                                        device=s.device)
            else:
                clusters = kmeans_labels(test_x, num_classes, seed=s.seed)
                scores[prep] = clustering_scores(test.labels, clusters, suffix=f"_k{num_classes}")
        shown = {p: v if task.name == "knn" else v[f"nmi_k{num_classes}"] for p, v in scores.items()}
        st.detail = ("top-1 " if task.name == "knn" else "NMI ") + ", ".join(f"{p} {v:.4f}" for p, v in shown.items())
        return {task.name: scores}


def _inputs(task: Task, train, test):
    if task.name == "linear":
        return train.feats, test.feats
    if task.name == "linear_relu":
        return np.maximum(train.feats, 0), np.maximum(test.feats, 0)
    return train.blocks[task.needs], test.blocks[task.needs]


def _title(task: Task, train) -> str:
    n = len(train.labels)
    if task.name == "knn":
        return f"kNN on the penultimate features ({n} train images)"
    if task.name == "kmeans":
        return "k-means on the test features (5 restarts)"
    x = train.feats if task.needs == FEATS else train.blocks[task.needs]
    what = {"linear": "penultimate, pre-ReLU", "linear_relu": "penultimate, ReLU'd"}.get(task.name, task.needs)
    return f"linear probe {what} ({x.shape[1]} dims, {n} train images)"


def run_tasks(tasks: Sequence[Task], train, test, num_classes: int, s: Settings) -> tuple[dict, dict]:
    """(results by task name, seconds by task name) of the given tasks, in order."""
    results, seconds = {}, {}
    for task in tasks:
        results.update(run_task(task, train, test, num_classes, s, seconds))
    return results, seconds


def merge(parts: Sequence[dict], num_classes: int, preps: Sequence[str] = ("center",)) -> dict:
    """eval.json's probe keys from every rank's task results (the layout docs/quality.md's tables read):
    knn_top1 and the k-means scores of the first preparation, every preparation's in *_by_prep."""
    done = {name: value for part in parts for name, value in part.items()}
    out = {}
    if "linear" in done:
        out.update(linear_top1=done["linear"]["top1"], linear_l2=done["linear"]["l2"], linear_val=done["linear"]["val"])
    if "linear_relu" in done:
        out["linear_top1_relu"] = done["linear_relu"]["top1"]
    if "knn" in done:
        out.update(knn_top1=done["knn"][preps[0]], knn_top1_by_prep=done["knn"])
    if "kmeans" in done:
        out.update(done["kmeans"][preps[0]], kmeans_k=num_classes, kmeans_by_prep=done["kmeans"])
    out["feature_prep"] = preps[0]
    layers = sorted((n for n in done if n.startswith("layer:")), key=lambda n: _block_order(n))
    out["linear_by_layer"] = {n.split(":", 1)[1]: done[n]["top1"] for n in layers}
    out["probe_iterations"] = {n: done[n]["iterations"] for n in done if isinstance(done[n], dict)
                               and "iterations" in done[n]}
    return out


def _block_order(name: str):
    """conv2 before conv10: digits compared as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
