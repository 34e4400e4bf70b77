"""The report and launch/eval.py on a small synthetic run directory (real Fashion-MNIST shards,
a freshly initialised smallvgg checkpoint, fake metrics and cluster assignments).

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_report.py
"""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from dist_cluster.config import load_config, save_config
from dist_cluster.evaluation.cam import grad_cam
from dist_cluster.evaluation.features import extract_split, load_backbone
from dist_cluster.evaluation.report import write_report
from dist_cluster.models import SmallVGG, build_trunk
from dist_cluster.models.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
K, M = 10, 2


class TrunkAndHead(nn.Module):
    """What the trainer checkpoints: a module with .trunk and .super_head (rotations x m classes)."""

    def __init__(self, trunk, num_super):
        super().__init__()
        self.trunk, self.super_head = trunk, nn.Linear(trunk.feature_dim, num_super)


def _build_shards(split, limit, out):
    subprocess.run([sys.executable, str(ROOT / "shards/build.py"), "fmnist", "--split", split, "--limit", str(limit),
                    "--shard-size", "50", "--out", str(out)], check=True, capture_output=True)


def _tar_labels(shard_dir):
    """Labels straight from the tars with tarfile (independent of the code under test)."""
    labels = {}
    for path in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    labels[member.name.split(".")[0]] = int(tar.extractfile(member).read())
    return labels


def _write_clusters(run, labels, rng):
    """Two rounds over 2 'ranks'; round 1 = a relabelling of the classes with 20% noise."""
    keys = np.array(sorted(labels))
    truth = np.array([labels[k] for k in keys])
    sub = (truth * 3 + 1) % K
    noisy = rng.random(len(sub)) < 0.2
    sub[noisy] = rng.integers(0, K, noisy.sum())
    for r in (0, 1):
        out = run / "clusters" / f"round_{r}"
        out.mkdir(parents=True)
        half = len(keys) // 2
        for rank, part in enumerate((slice(0, half), slice(half, None))):
            np.savez(out / f"assignments.rank{rank}.npz", keys=keys[part], super=sub[part] // (K // M), sub=sub[part])
        (out / "sizes.json").write_text(json.dumps({
            "round": r, "k": K, "m": M, "world_size": 2, "n": len(keys),
            "sub_sizes": np.bincount(sub, minlength=K).tolist(),
            "super_sizes": np.bincount(sub // (K // M), minlength=M).tolist()}))
    return truth, sub


def _write_metrics(run):
    events, step = [], 0
    for r in (0, 1):
        events += [{"stage": "extract", "round": r, "seconds": 1.5}, {"stage": "pca", "round": r, "seconds": 0.2},
                   {"stage": "kmeans", "round": r, "level": 1, "iteration": 0, "objective": 0.4, "seconds": 0.01},
                   {"stage": "kmeans", "round": r, "summary": True, "seconds_total": 0.7, "size_min": 3,
                    "size_median": 20.0, "size_max": 40, "nmi_prev": None if r == 0 else 0.6}]
        for i in range(5):
            step += 2
            events.append({"stage": "train", "step": step, "round": r, "loss_super": 2 - 0.1 * step,
                           "loss_sub": 1.5, "acc_super": 0.1 * i, "acc_sub": 0.2})
        events.append({"stage": "epoch", "round": r, "seconds": 3.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalrun")
    train, test, run = base / "train", base / "test", base / "run"
    _build_shards("train", 200, train)
    _build_shards("test", 100, test)
    cfg = load_config(None, ["model.feature_dim=32", "cluster.pca_dim=32", "data.resize=28", f"cluster.k={K}",
                             f"cluster.m={M}", f"data.train={train}", f"data.test={test}", f"run_dir={run}"])
    save_config(cfg, run)
    torch.manual_seed(0)
    module = TrunkAndHead(build_trunk(cfg.model, cfg.data.image_size), 4 * M)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": module.state_dict(), "config": OmegaConf.to_yaml(cfg), "global_step": 20, "world_size": 2},
               run / "checkpoints" / "last.pt")
    labels = _tar_labels(train)
    truth, sub = _write_clusters(run, labels, np.random.default_rng(0))
    _write_metrics(run)
    return dict(run=run, train=train, test=test, cfg=cfg, module=module, truth=truth, sub=sub)


def _pngs_ok(index: Path) -> list:
    names = re.findall(r'src="([^"]+)"', index.read_text())
    for name in names:
        path = index.parent / name
        assert path.stat().st_size > 200, name
        with Image.open(path) as image:
            assert image.width > 10 and image.height > 10
    return names


def test_report_renders(synthetic_run):
    run = synthetic_run["run"]
    index = write_report(run, synthetic_run["train"], seed=0)
    names = _pngs_ok(index)
    assert {"curves.png", "clustering.png", "stages.png", "sizes.png"} <= set(names)
    galleries = [n for n in names if n.startswith("gallery_")]
    assert len(galleries) == K  # 3 largest + 3 smallest + random ones, up to 12; K = 10 non-empty clusters
    assert len([n for n in names if n.startswith("cam_")]) == 8
    text = index.read_text()
    for heading in ("Training", "Clusters (round 1)", "Galleries", "Class activation maps"):
        assert heading in text
    # gallery captions state sizes that match the assignments
    sizes = np.bincount(synthetic_run["sub"], minlength=K)
    for c, size in re.findall(r"sub-cluster (\d+) \(super \d+\), (\d+) images", text):
        assert sizes[int(c)] == int(size)


def test_report_of_an_empty_run_explains_what_is_missing(tmp_path):
    index = write_report(tmp_path, None)
    text = index.read_text()
    assert "no RUN/eval.json" in text and "no complete RUN/clusters" in text and "no backbone" in text
    assert _pngs_ok(index) == []


def _manual_cam(trunk, head, images, targets):
    """Reference: the last block output as a leaf, then the trunk's tail written out by hand."""
    act = trunk.forward_blocks(images)[-1].detach().requires_grad_(True)
    logits = head(F.relu(trunk.bn(trunk.fc(torch.flatten(trunk.pool(act), 1)))))
    targets = logits.argmax(1) if targets is None else targets
    grad, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), act)
    # global average pooling: the gradient is the same at every position (CAM == Grad-CAM here)
    assert torch.allclose(grad, grad[:, :, :1, :1].expand_as(grad), atol=1e-7)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)).detach(), logits.argmax(1)


def test_grad_cam_equals_manual_computation():
    torch.manual_seed(1)
    trunk, head = SmallVGG(feature_dim=24, sobel=True).eval(), nn.Linear(24, 8)
    images = torch.randn(4, 3, 28, 28)
    for targets in (None, torch.tensor([0, 5, 2, 7])):
        cams, explained, predicted = grad_cam(trunk, head, images, targets)
        ref, ref_pred = _manual_cam(trunk, head, images, targets)
        assert torch.equal(predicted, ref_pred)
        assert torch.equal(explained, ref_pred if targets is None else targets)
        assert torch.allclose(cams, ref, atol=1e-5)
        assert cams.shape == (4, 28, 28) and float(cams.max()) == pytest.approx(1.0)
    assert all(p.grad is None for p in trunk.parameters())


def test_export_and_checkpoint_give_the_same_features(synthetic_run):
    run, cfg = synthetic_run["run"], synthetic_run["cfg"]
    from_ckpt = load_backbone(run)
    path = export_backbone(synthetic_run["module"].trunk, "smallvgg", run / "export")
    from_export = load_backbone(run, str(path))
    assert from_export.super_head is None and from_ckpt.super_head is not None
    assert torch.equal(from_ckpt.super_head.weight, synthetic_run["module"].super_head.weight)
    a, b = (extract_split(bb.trunk, synthetic_run["test"], cfg.data, torch.device("cpu"), num_workers=0)
            for bb in (from_ckpt, from_export))
    assert len(a.labels) == 100 and np.array_equal(a.keys, b.keys)
    assert np.allclose(a.feats, b.feats, atol=1e-6)


def test_eval_cli_writes_eval_json(synthetic_run):
    from sklearn.metrics import normalized_mutual_info_score
    run = synthetic_run["run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--run", str(run), "--train", str(synthetic_run["train"]),
                    "--test", str(synthetic_run["test"]), "--workers", "0", "--layer-dims", "1000",
                    "--probe-iters", "100"], check=True, env=env, cwd=str(ROOT), capture_output=True)
    results = json.loads((run / "eval.json").read_text())
    for key in ("linear_top1", "linear_top1_relu", "knn_top1", "nmi_k10", "ami_k10", "hungarian_acc_k10",
                "nmi_clusters_train"):
        assert 0.0 <= results[key] <= 1.0, key
    assert sorted(results["linear_by_layer"]) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert all(0.0 <= v <= 1.0 for v in results["linear_by_layer"].values())
    assert all(d <= 1000 for d in results["layer_dims"].values())
    assert results["n_train"] == 200 and results["n_test"] == 100 and results["num_classes"] == 10
    # the run's own clusters vs the train labels, joined by key
    expected = normalized_mutual_info_score(synthetic_run["truth"], synthetic_run["sub"])
    assert results["nmi_clusters_train"] == pytest.approx(expected, abs=1e-9)
    assert results["clusters_round"] == 1 and results["clusters_images"] == 200
    assert "| linear_top1" in (run / "eval.md").read_text()
    _pngs_ok(run / "report" / "index.html")


def _eval_cli(run, train, test, *extra, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch/eval.py"), "--run", str(run), "--train", str(train),
                           "--test", str(test), "--workers", "0", "--probe-iters", "50", *extra],
                          check=check, env=env, cwd=str(ROOT), capture_output=True, text=True)


def test_another_dataset_gets_its_own_file_never_eval_json(synthetic_run, tmp_path):
    """A transfer evaluation writes RUN/eval-<name>.json; the run's own eval.json stays as it was, the
    report lists both, and an eval-<name>.json of another pair is refused before any work."""
    run = synthetic_run["run"]
    own = run / "eval.json"
    if not own.exists():
        _eval_cli(run, synthetic_run["train"], synthetic_run["test"], "--layer-dims", "0", "--no-report")
    before = own.read_bytes()
    other = {}
    for split, limit in (("train", 120), ("test", 60)):
        other[split] = tmp_path / f"other-{split}"
        subprocess.run([sys.executable, str(ROOT / "shards/build.py"), "fmnist", "--split", split, "--limit",
                        str(limit), "--shard-size", "30", "--name", f"other-{split}", "--out", str(other[split])],
                       check=True, capture_output=True)
    proc = _eval_cli(run, other["train"], other["test"], "--layer-dims", "0")
    assert own.read_bytes() == before
    results = json.loads((run / "eval-other.json").read_text())
    assert results["eval_set"] == "other" and results["own_data"] is False
    assert results["n_train"] == 120 and results["n_test"] == 60
    for stage in ("extract train", "extract test", "linear probe", "kNN", "k-means", "report", "total"):
        assert f"] {stage}" in proc.stdout, stage  # one line per stage, with its time
    assert re.search(r"\] linear probe penultimate, pre-ReLU \(32 dims, 120 train images\): top-1 [0-9.]+, "
                     r"l2 0.0001, \d+ L-BFGS iterations, \([0-9.]+ s\)", proc.stdout)
    page = (run / "report" / "index.html").read_text()
    assert "<th>eval.json</th><th>eval-other.json</th>" in page
    swapped = _eval_cli(run, other["test"], other["train"], "--layer-dims", "0", check=False)
    assert swapped.returncode != 0 and "--name" in swapped.stderr and "extract" not in swapped.stdout
    named = _eval_cli(run, other["test"], other["train"], "--layer-dims", "0", "--no-report", "--name", "swapped")
    assert named.returncode == 0 and json.loads((run / "eval-swapped.json").read_text())["n_train"] == 60
    assert json.loads((run / "eval-other.json").read_text()) == results


@pytest.mark.slow
def test_eval_under_torchrun_two_ranks_equals_one_process(synthetic_run, tmp_path):
    """torchrun, 2 ranks splitting the extraction: the same numbers as one process (rows sorted by key)."""
    run = synthetic_run["run"]
    common = ["--train", str(synthetic_run["train"]), "--test", str(synthetic_run["test"]), "--workers", "1",
              "--layer-dims", "1000", "--probe-iters", "100", "--no-report"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    results = []
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]):
        subprocess.run(launcher + [str(ROOT / "launch/eval.py"), "--run-dir", str(run)] + common,
                       check=True, env=env, cwd=str(ROOT), capture_output=True)
        results.append(json.loads((run / "eval.json").read_text()))
    one, two = results
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("linear_top1", "linear_top1_relu", "knn_top1", "nmi_k10", "ami_k10", "hungarian_acc_k10",
                "nmi_clusters_train", "linear_by_layer", "n_train", "n_test"):
        assert one[key] == two[key], key


def test_a_one_shard_set_evaluates_on_two_ranks(synthetic_run, tmp_path):
    """A small labelled test set built as one shard (fewer shards than ranks): under torchrun rank 0
    reads it alone, every rank still fits its probes, and the numbers are one process's."""
    run = synthetic_run["run"]
    test = tmp_path / "tiny-test"
    subprocess.run([sys.executable, str(ROOT / "shards/build.py"), "fmnist", "--split", "test", "--limit", "60",
                    "--shard-size", "1000", "--name", "tiny-test", "--out", str(test)], check=True, capture_output=True)
    assert len(json.loads((test / "manifest.json").read_text())["shards"]) == 1
    common = ["--train", str(synthetic_run["train"]), "--test", str(test), "--name", "tiny", "--workers", "1",
              "--layer-dims", "0", "--probe-iters", "50", "--no-report"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    results = []
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", "2"]):
        if results:
            (run / "eval-tiny.json").unlink()
        proc = subprocess.run(launcher + [str(ROOT / "launch/eval.py"), "--run-dir", str(run)] + common, env=env,
                              cwd=str(ROOT), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(json.loads((run / "eval-tiny.json").read_text()))
    one, two = results
    assert two["world_size"] == 2 and two["n_test"] == 60 == one["n_test"]
    for key in ("linear_top1", "knn_top1", "nmi_k10", "knn_top1_by_prep"):
        assert one[key] == two[key], key
