"""Config values that cannot work fail in load_config / validate_against_data, before any work.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_config.py
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_cluster.config import ConfigError, load_config, validate_against_data
from tests.shard_fixtures import make_shards

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")  # smallvgg, feature_dim 64, pca_dim 16, k 16


def _key(key: str) -> str:
    return re.escape(f"config key '{key}'")


@pytest.mark.parametrize("override", [
    "train.log_every_steps=0", "train.epochs=0", "train.epochs=-1", "train.ckpt_every_steps=-1", "train.lr=0",
    "train.momentum=1.0", "train.momentum=-0.1", "train.weight_decay=-1e-5", "train.warmup_epochs=-1",
    "dist.timeout_s=0", "dist.timeout_s=-10", "cluster.niter=0", "cluster.memmap_gb=-1", "data.max_samples=-1",
    "data.shuffle_buffer=-1", "data.min_scale=0", "data.min_scale=1.5", "model.feature_dim=0",
    "cluster.pic_nlist=-1"])
def test_bad_values_name_their_key(override):
    with pytest.raises(ConfigError, match=_key(override.split("=")[0])):
        load_config(SMOKE, [override])


def test_pic_probes_more_cells_than_the_index_has_is_refused():
    with pytest.raises(ConfigError, match=_key("cluster.pic_nprobe") + ".*17 of 16"):
        load_config(SMOKE, ["cluster.method=pic", "cluster.m=1", "cluster.pic_nlist=16", "cluster.pic_nprobe=17"])
    assert load_config(SMOKE, ["cluster.pic_nlist=16", "cluster.pic_nprobe=16"]).cluster.pic_nprobe == 16


def test_boundary_values_are_accepted():
    cfg = load_config(SMOKE, ["train.momentum=0", "train.weight_decay=0", "train.ckpt_every_steps=0",
                              "cluster.memmap_gb=0", "data.max_samples=0", "data.shuffle_buffer=0",
                              "data.min_scale=1", "train.log_every_steps=1", "train.epochs=1", "cluster.niter=1"])
    assert cfg.train.epochs == 1


@pytest.mark.parametrize("overrides, dim", [(["cluster.pca_dim=65"], 64),
                                            (["model.arch=resnet50", "cluster.pca_dim=2049"], 2048),
                                            (["model.arch=vgg16_bn", "cluster.pca_dim=4097"], 4096)])
def test_pca_dim_above_the_feature_dim_fails_before_extraction(overrides, dim):
    with pytest.raises(ConfigError, match=_key("cluster.pca_dim") + f".*{dim}-d features"):
        load_config(SMOKE, overrides)
    at_most = [*overrides[:-1], f"cluster.pca_dim={dim}"]
    assert load_config(SMOKE, at_most).cluster.pca_dim == dim


def test_pca_dim_is_not_checked_without_clustering():
    """RotNet (k = 1) and supervised runs never run the PCA."""
    assert load_config(SMOKE, ["mode=rotnet", "cluster.pca_dim=1000"]).cluster.k == 1
    assert load_config(SMOKE, ["mode=supervised", "cluster.pca_dim=1000"]).mode == "supervised"


# ---------------------------------------------------------------- against data.train


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("ten"), 2, 5, size=8)


def test_k_above_the_manifest_count_fails(ten_images):
    cfg = load_config(SMOKE, [f"data.train={ten_images.root}", "cluster.k=16", "data.max_samples=0"])
    with pytest.raises(ConfigError, match=_key("cluster.k") + ".*k=16 clusters for the 10 images"):
        validate_against_data(cfg)
    capped = load_config(SMOKE, [f"data.train={ten_images.root}", "cluster.k=16", "data.max_samples=4"])
    with pytest.raises(ConfigError, match="at most world size x that many"):
        validate_against_data(capped)
    validate_against_data(load_config(SMOKE, [f"data.train={ten_images.root}", "cluster.k=10"]))
    validate_against_data(load_config(SMOKE, [f"data.train={ten_images.root}", "mode=rotnet"]))


def test_unreadable_data_train_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=_key("data.train") + ".*manifest.json not found"):
        validate_against_data(load_config(SMOKE, [f"data.train={tmp_path}"]))


def test_launch_train_fails_before_any_work(ten_images, tmp_path, monkeypatch, capsys):
    import dist_cluster.run.rounds as rounds
    from launch.train import main
    monkeypatch.setattr(rounds, "train", lambda cfg: pytest.fail("training started"))
    run_dir = tmp_path / "run"
    for bad in ("cluster.k=16", "train.log_every_steps=0"):
        with pytest.raises(SystemExit):
            main(["--config", SMOKE, f"data.train={ten_images.root}", f"run_dir={run_dir}", bad])
        assert bad.split("=")[0] in capsys.readouterr().err
    assert not run_dir.exists() and not torch.distributed.is_initialized()


# ---------------------------------------------------------------- the random-init baseline


def test_export_init_writes_the_seeded_untrained_trunk(tmp_path):
    from dist_cluster.evaluation.features import load_backbone
    from dist_cluster.models import build_trunk
    from launch.train import main
    run_dir = tmp_path / "random"
    main(["--config", SMOKE, "--export-init", f"run_dir={run_dir}", f"data.train={tmp_path / 'no-data'}"])
    assert (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    exported = load_backbone(run_dir).trunk.state_dict()
    cfg = load_config(SMOKE)
    torch.manual_seed(cfg.seed)  # what rounds.Run does right before build_trunk
    reference = build_trunk(cfg.model, cfg.data.image_size).state_dict()
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)


def test_quality_bench_random_row_uses_export_init(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    args = SimpleNamespace(runs=str(tmp_path), train="data/t", test="data/v", overrides=["seed=3"],
                           config="configs/fmnist.yaml", nproc=2, epochs=2)
    random_cmd = quality.train_command("random", args)
    assert "--export-init" in random_cmd and not any(w.startswith("train.epochs") for w in random_cmd)
    assert random_cmd[random_cmd.index("--export-init") + 1:] == [
        "mode=deepercluster", f"run_dir={tmp_path / 'random-s0'}", "data.train=data/t", "data.test=data/v",
        "seed=0", "seed=3"]  # the user's override comes last, so it wins
    assert "train.epochs=2" in quality.train_command("rotnet", args)
    assert "seed=2" in quality.train_command("rotnet", args, seed=2)


def test_quality_bench_summary_and_verdict():
    """Mean, sample std over seeds and the gap closed, checked by hand on made-up rows."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    def row(method, seed, epochs, v):
        return {"method": method, "seed": seed, "epochs": epochs, "linear_top1": v, "knn_top1": v, "nmi": v,
                "train_seconds": 1.0}
    rows = [row("random", 0, 0, 0.5), row("raw pixels", 0, 0, 0.81), row("supervised", 0, 10, 0.9),
            *[row("deepercluster", s, 10, v) for s, v in enumerate((0.80, 0.82, 0.84))],
            *[row("rotnet", s, 10, v) for s, v in enumerate((0.70, 0.71, 0.72))],
            *[row("deepcluster", s, 10, v) for s, v in enumerate((0.79, 0.80, 0.81))]]
    by = {(e["method"], e["epochs"]): e for e in quality.summarize(rows)}
    ours = by[("deepercluster", 10)]["linear_top1"]
    assert ours["mean"] == pytest.approx(0.82) and ours["std"] == pytest.approx(0.02)
    assert ours["gap_closed"] == pytest.approx((0.82 - 0.5) / (0.9 - 0.5))
    lines = quality.verdict(quality.summarize(rows))
    assert any("rotnet" in l and "(ahead" in l for l in lines)
    assert any("deepcluster" in l and "NOT ahead" in l for l in lines)  # lead 0.02 is not > std 0.02
    assert "10 epochs, nmi: DeeperCluster above random and raw pixels" in lines
    lower = [dict(r, nmi=0.9) if r["method"] == "raw pixels" else r for r in rows]
    assert "10 epochs, nmi: DeeperCluster NOT above raw pixels" in quality.verdict(quality.summarize(lower))
    alone = [r for r in rows if r["method"] == "deepercluster"]  # a sweep of one method: no floor to be above
    assert not any("above" in l for l in quality.verdict(quality.summarize(alone)))
    one_seed = [r for r in rows if r["seed"] == 0]
    assert all("no verdict" in l for l in quality.verdict(quality.summarize(one_seed)) if " - " in l)
    # a 5-class evaluation (--transfer) lands in the same columns, every feature preparation kept
    result = {"num_classes": 5, "linear_top1": 0.9, "knn_top1": 0.8, "nmi_k5": 0.6, "ami_k5": 0.5,
              "hungarian_acc_k5": 0.7, "nmi_clusters_train": None, "knn_top1_by_prep": {"center": 0.8, "raw": 0.7},
              "kmeans_by_prep": {"center": {"nmi_k5": 0.6}, "raw": {"nmi_k5": 0.4}}}
    assert quality.eval_row(result) == {"linear_top1": 0.9, "knn_top1": 0.8, "nmi_clusters_train": None,
                                        "nmi": 0.6, "ami": 0.5, "hungarian_acc": 0.7, "knn_top1_center": 0.8,
                                        "knn_top1_raw": 0.7, "nmi_center": 0.6, "nmi_raw": 0.4,
                                        "linear_by_layer": None}
    plan = quality.plan(SimpleNamespace(methods="random,rotnet,deepercluster,supervised", seeds=[0, 1]))
    assert plan == [("random", 0), ("rotnet", 0), ("deepercluster", 0), ("supervised", 0),
                    ("rotnet", 1), ("deepercluster", 1)]


def test_quality_bench_reads_back_the_file_eval_writes(tmp_path, monkeypatch):
    """--transfer evaluates on data the run never saw, which eval.py writes as eval-<name>.json, not
    eval.json: the bench must name it and read that file (a 10-epoch transfer sweep died on this)."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    written = []

    def fake_run(cmd, log):
        name = cmd[cmd.index("--name") + 1] if "--name" in cmd else None
        (tmp_path / (f"eval-{name}.json" if name else "eval.json")).write_text(json.dumps({"seen": name}))
        written.append(name)
        return 1.0

    monkeypatch.setattr(quality, "run", fake_run)
    base = dict(nproc=2, train="t", test="v", max_train=0, layer_dims=0)
    result, _, _ = quality.evaluate(tmp_path, SimpleNamespace(**base, transfer="0,2,4,6,8"), tmp_path / "log")
    assert result == {"seen": "transfer"}
    result, _, _ = quality.evaluate(tmp_path, SimpleNamespace(**base, transfer=""), tmp_path / "log")
    assert result == {"seen": None}
    result, _, _ = quality.evaluate(tmp_path, SimpleNamespace(**base, transfer=""), tmp_path / "log",
                                    tmp_path / "round_1.pt", "e2")
    assert result == {"seen": "e2"} and written == ["transfer", None, "e2"]
