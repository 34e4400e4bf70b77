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
    named = {o.split("=")[0]: o.split("=", 1)[1] for o in ablation.VARIANTS[name]}
    assert changed <= set(named), (name, changed)  # a variant may name a shipped value (m1: cluster.m=1)
    assert {k: str(variant[k]).lower() for k in named} == {k: v.lower() for k, v in named.items()}, name


@pytest.mark.parametrize("method,name", [(m, n) for m, names in ablation.BASELINE_VARIANTS.items() for n in names])
def test_baseline_variants_change_something_in_their_mode(method, name):
    assert _flat(method) != _flat(method, ablation.VARIANTS[name])


def test_rows_per_sub_head_variants_trade_the_batch_for_the_heads():
    """(a): images per step x rotations' share / sub heads: m = 1 at batch 64 and m = 2 at batch 256
    give each sub head the rows the other arm has by default (lr scaled with the batch)."""
    def rows_per_head(overrides):
        cfg = load_config(CONFIG, ["mode=deepercluster", *overrides])
        return cfg.data.batch_size * 2 / (cfg.train.rotations * cfg.cluster.m), cfg.train.lr / cfg.data.batch_size
    m1, m2 = rows_per_head(["cluster.m=1"]), rows_per_head(["cluster.m=2"])
    assert rows_per_head(ablation.VARIANTS["m1-rows-of-m2"]) == m2  # 32 rows a head, the same lr per image
    assert rows_per_head(ablation.VARIANTS["m2-rows-of-m1"]) == (m1[0], m2[1])  # 64 rows a head


def test_deltas_are_in_units_of_the_larger_seed_std():
    base = {k: {"mean": 0.5, "std": 0.01} for k in ablation.KEYS}
    base["nmi"]["std"] = 0.0
    entry = {"linear_top1": {"mean": 0.53, "std": 0.0}, "knn_top1": {"mean": 0.49, "std": 0.02},
             "nmi": {"mean": 0.9, "std": 0.0}}
    d = ablation.deltas(entry, base)
    assert d["linear_top1"] == pytest.approx(3.0) and d["knn_top1"] == pytest.approx(-0.5)
    assert d["nmi"] is None  # no std on either side: no delta


def test_the_table_measures_against_the_ablated_method(capsys):
    ref = {m: {k: {"mean": mean, "std": 0.01} for k in ablation.KEYS}
           for m, mean in (("deepercluster", 0.5), ("deepcluster", 0.6), ("rotnet", 0.7))}
    ref = {m: dict(e, seeds=[0, 1]) for m, e in ref.items()}
    rows = [{"method": "deepcluster", "epochs": 10, "seed": seed, "variant": "balance-none",
             "overrides": ["train.balance=none"], "train_seconds": 1.0, **{k: value for k in ablation.KEYS}}
            for seed, value in ((0, 0.605), (1, 0.615))]
    ablation.print_table(rows, ref, "deepcluster")
    out = capsys.readouterr().out
    assert "balance-none (2 seeds)" in out and "0.6100 ± 0.0071" in out and "+1.0, +1.0, +1.0" in out


def test_a_variant_runs_through_the_quality_bench_with_every_option(tmp_path, monkeypatch):
    """run_variant hands bench/quality.py a full set of its options (a hand-built namespace missed
    --transfer once and failed after a 17-minute training): its commands carry the variant's overrides,
    the evaluation reads back eval.json. The processes are stubbed."""
    import json
    from argparse import Namespace

    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        run_dir = tmp_path / "m1" / "deepercluster-s3"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "eval.json").write_text(json.dumps({"num_classes": 10, "linear_top1": 0.5, "knn_top1": 0.4}))
        return 1.0
    # ablation imports bench/quality.py as the top-level module `quality` (not bench.quality): patch that one
    monkeypatch.setattr(ablation.quality, "run", fake_run)
    args = Namespace(epochs=10, nproc=2, config=CONFIG, train="data/fmnist/train", test="data/fmnist/test",
                     layer_dims=0, runs=str(tmp_path), method="deepercluster")
    row = ablation.run_variant("m1", 3, args)
    assert row["variant"] == "m1" and row["seed"] == 3 and row["linear_top1"] == 0.5
    train_cmd, eval_cmd = commands
    assert "cluster.m=1" in train_cmd and "seed=3" in train_cmd and "train.epochs=10" in train_cmd
    assert "--name" not in eval_cmd and eval_cmd[eval_cmd.index("--max-train") + 1] == "0"
