"""bench/ablation.py: every variant is a valid config that changes what it says, and the table's
deltas are in units of the baseline's seed std.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_bench_ablation.py
"""
import pytest

from bench import ablation
from dist_cluster.config import flatten, load_config
from omegaconf import OmegaConf

CONFIG = "configs/fmnist.yaml"


def _flat(mode, overrides=()):
    return flatten(OmegaConf.to_container(load_config(CONFIG, [f"mode={mode}", *overrides]), resolve=True))


@pytest.mark.parametrize("name", list(ablation.VARIANTS))
def test_each_variant_loads_and_changes_only_its_keys(name):
    base, variant = _flat("deepercluster"), _flat("deepercluster", ablation.VARIANTS[name])
    changed = {k for k in base if base[k] != variant[k]}
    assert changed == {o.split("=")[0] for o in ablation.VARIANTS[name]}, (name, changed)


@pytest.mark.parametrize("name", ablation.DEEPCLUSTER_VARIANTS)
def test_deepcluster_variants_change_something_in_deepcluster_mode(name):
    assert _flat("deepcluster") != _flat("deepcluster", ablation.VARIANTS[name])


def test_deltas_are_in_baseline_std_units():
    base = {k: {"mean": 0.5, "std": 0.01} for k in ablation.KEYS}
    base["nmi_k10"]["std"] = 0.0  # one seed: no std, no delta
    row = {"linear_top1": 0.53, "knn_top1": 0.49, "nmi_k10": 0.9}
    d = ablation.deltas(row, base)
    assert d["linear_top1"] == pytest.approx(3.0) and d["knn_top1"] == pytest.approx(-1.0)
    assert d["nmi_k10"] is None


def test_the_table_measures_against_the_ablated_method(capsys):
    ref = {m: {k: {"mean": mean, "std": 0.01} for k in ablation.KEYS}
           for m, mean in (("deepercluster", 0.5), ("deepcluster", 0.6), ("rotnet", 0.7))}
    ref = {m: dict(e, seeds=[0, 1]) for m, e in ref.items()}
    row = {"variant": "balance-none", "overrides": ["train.balance=none"], "train_seconds": 1.0,
           **{k: 0.61 for k in ablation.KEYS}}
    ablation.print_table([row], ref, "deepcluster")
    assert "+1.0, +1.0, +1.0" in capsys.readouterr().out
