"""The evaluation's probes as tasks: their assignment to ranks and the merge into eval.json's layout.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_eval_tasks.py
"""
from dist_cluster.evaluation.tasks import FEATS, Task, assign, merge, needs_of, probe_tasks


def test_every_task_once_and_the_ranks_balanced():
    tasks = probe_tasks(256, {"conv1": 800, "conv2": 1024, "conv3": 512, "conv4": 1024, "conv5": 1024}, 60000, 10000)
    assert [t.name for t in tasks] == ["linear", "linear_relu", "knn", "kmeans", "layer:conv1", "layer:conv2",
                                       "layer:conv3", "layer:conv4", "layer:conv5"]
    assert {t.needs for t in tasks} == {FEATS, "conv1", "conv2", "conv3", "conv4", "conv5"}
    assert set(assign(tasks, 1).values()) == {0}
    owners = assign(tasks, 2)
    load = [sum(t.cost for t in tasks if owners[t.name] == r) for r in (0, 1)]
    assert sorted(owners) == sorted(t.name for t in tasks)
    # longest-first greedy: no rank above the other by more than the cheapest task it holds
    assert abs(load[0] - load[1]) <= max(t.cost for t in tasks if t.name in ("kmeans", "knn", "linear"))
    assert needs_of(tasks, owners, 0) | needs_of(tasks, owners, 1) == {t.needs for t in tasks}


def test_assign_longest_first_to_the_least_loaded_rank():
    tasks = [Task(n, FEATS, 1, c) for n, c in (("a", 10), ("b", 8), ("c", 3), ("d", 3), ("e", 2))]
    assert assign(tasks, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert assign(tasks, 5) == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}


def test_merge_gives_eval_json_layout():
    rank0 = {"layer:conv10": {"top1": 0.7, "l2": 1e-4, "val": {}, "iterations": 40},
             "linear": {"top1": 0.86, "l2": 1e-4, "val": {}, "iterations": 30},
             "knn": {"center": 0.85, "raw": 0.8}}
    rank1 = {"layer:conv2": {"top1": 0.9, "l2": 1e-4, "val": {}, "iterations": 50},
             "linear_relu": {"top1": 0.84, "l2": 1e-4, "val": {}, "iterations": 31},
             "kmeans": {"center": {"nmi_k10": 0.5, "ami_k10": 0.49, "hungarian_acc_k10": 0.6},
                        "raw": {"nmi_k10": 0.4, "ami_k10": 0.39, "hungarian_acc_k10": 0.5}}}
    out = merge([rank0, rank1], 10, ("center", "raw"))
    assert out["linear_top1"] == 0.86 and out["linear_top1_relu"] == 0.84 and out["knn_top1"] == 0.85
    assert out["nmi_k10"] == 0.5 and out["kmeans_k"] == 10 and out["linear_l2"] == 1e-4
    assert out["feature_prep"] == "center" and out["knn_top1_by_prep"] == {"center": 0.85, "raw": 0.8}
    assert out["kmeans_by_prep"]["raw"]["nmi_k10"] == 0.4
    assert merge([rank0, rank1], 10, ("raw", "center"))["knn_top1"] == 0.8  # the first is the headline
    assert list(out["linear_by_layer"].items()) == [("conv2", 0.9), ("conv10", 0.7)]  # block order
    assert out["probe_iterations"] == {"layer:conv10": 40, "linear": 30, "layer:conv2": 50, "linear_relu": 31}
