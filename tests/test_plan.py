"""Capacity planner: the arithmetic against cases computed by hand, the trunk costs against the real
modules, and the command line.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_plan.py
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from dist_cluster.config import load_config
from dist_cluster.distributed import ownership
from dist_cluster.models import ResNet50, SmallVGG, VGG16BN
from dist_cluster.plan import PlanInputs, Shape, main, plan, predicted_smoke, ring
from dist_cluster.plan_costs import Rate, Rates, arch_cost, measured_rates, default_rates

SMALL_P = 983_360  # SmallVGG(feature_dim=16, sobel=False): checked against torch below


def small_inputs(**changes) -> PlanInputs:
    values = dict(images=1000, gpus=4, nodes=1, image_size=28, k=8, m=2, rotations=4, feature_dim=16,
                  pca_dim=8, batch=10, epochs=2, reassign=1, arch="smallvgg", sobel=False, niter=3,
                  memmap_gb=1.0, bytes_per_image=100, key_chars=5, workers=1, bf16=False)
    values.update(changes)
    return PlanInputs(**values)


def round_rates(**changes) -> Rates:
    values = dict(train_rows_s=100.0, extract_img_s=50.0, loader_img_s=25.0, kmeans_s_pcd=1e-6,
                  pca_flops=1e6, net_bytes_s=1e8, intra_bytes_s=1e9)
    values.update(changes)
    return Rates(**{k: Rate(v, "test") for k, v in values.items()})


def test_small_plan_by_hand():
    """1000 images on 4 ranks: n = 250, D = 16, d = 8, k/m = 4, S = 8 heads (2 per rank)."""
    rows = {r.stage: r for r in plan(small_inputs(), round_rates())}
    assert arch_cost("smallvgg", 28, sobel=False, feature_dim=16).params == SMALL_P

    ex = rows["extract"]
    assert (ex.ram_bytes, ex.disk_bytes, ex.read_bytes_round) == (250 * 16 * 4, 0, 250 * 100)
    assert ex.seconds_round == pytest.approx(250 / 25)  # loader-bound: min(50, 25) img/s

    pca = rows["pca"]
    moments = (16 * 16 + 16 + 1) * 8  # 2184 bytes of float64
    assert pca.net_bytes_round == pytest.approx(1.5 * moments + (16 * 8 + 16 + 2 * 8 + 1) * 8)  # 3276 + 1288
    assert pca.gpu_bytes == moments + 256 * 8 + 128 * 8 + 250 * 8 * 4  # + eigh, projection, whitened
    assert pca.seconds_round == pytest.approx((2 * 250 * 256 + 2 * 250 * 128 + 10 * 16 ** 3) / 1e6 + 4564 / 1e9)

    l1 = rows["level1"]
    assert l1.net_bytes_round == pytest.approx(3 * 1.5 * (2 * 8 + 2 + 1) * 8)  # 3 iterations x 228
    assert l1.gpu_bytes == 8000 + 2 * 8 * 4 + 152 + 250 * 2 * 4  # whitened, centroids, sums, E-step tile
    assert l1.seconds_round == pytest.approx(3 * 250 * 2 * 8 * 1e-6 + 684 / 1e9)

    route = rows["route"]
    # routed rows: one receive buffer on the GPU; in flight one round (here all of it) each way
    assert (route.net_bytes_round, route.ram_bytes) == (250 * 8 * 4, 16000 + 2 * 8000)
    assert route.gpu_bytes == 8000 + 8000 + 2 * 8000

    l2 = rows["level2"]  # groups of 2 ranks (4 ranks / m = 2), all_reduce (4*8 + 4 + 1) float64
    assert l2.net_bytes_round == pytest.approx(3 * 1.0 * 37 * 8)
    assert l2.gpu_bytes == 8000 + 8000 + 4 * 8 * 4 + 37 * 8 + 250 * 4 * 4  # + the routed rows
    assert l2.ram_bytes == 16000  # the features only: no host copy of the routed rows
    assert l2.seconds_round == pytest.approx(3 * 250 * 4 * 8 * 1e-6 + 888 / 1e9)

    ret = rows["return"]
    files = 1000 * (16 + 4 * 5) + (8 + 2) * 8 * 4 + (16 * 8 + 16) * 8  # keys+labels, centroids, pca
    assert (ret.net_bytes_round, ret.storage_bytes) == (250 * 8, files * 2)

    tr = rows["train"]  # 25 steps of 10 rows; heads 2 per rank, groups of one rank: no head sync
    replicated, head = SMALL_P + 16 * 8 + 8, 16 * 4 + 4
    step_net = 1.5 * replicated * 4 + (2 * 10 * 16 * 4 + 10 * 2 * 8)
    assert tr.net_bytes_step == pytest.approx(step_net)
    assert tr.net_bytes_round == pytest.approx(step_net * 25)
    acts = 32 * 28 ** 2 + 64 * 14 ** 2 + 128 * 7 ** 2 + 2 * 256 * 3 ** 2 + 16
    assert tr.gpu_bytes == pytest.approx(replicated * 12 + SMALL_P * 4 + 2 * head * 12 + 10 * acts * 4 * 2
                                         + 10 * 4 * 4 * 2)
    assert tr.storage_bytes == replicated * 8 + 8 * head * 8 + replicated * 8 * 2
    assert tr.seconds_round == pytest.approx(25 * (max(10 / 100, 1.5 * replicated * 4 / 1e9) + 1440 / 1e9))


def test_memmap_switch_and_network_bound_step():
    """Features above memmap_gb go to local disk; a slow network makes DDP the bound of a step."""
    rows = {r.stage: r for r in plan(small_inputs(memmap_gb=1e-6), round_rates(intra_bytes_s=1e6))}
    assert (rows["extract"].ram_bytes, rows["extract"].disk_bytes) == (0, 16000)
    # whitened in place over the features (cluster/stage.py): no second file
    assert (rows["pca"].gpu_bytes, rows["pca"].disk_bytes) == (2184 + 2048 + 1024, 16000)
    replicated = SMALL_P + 136
    assert rows["train"].seconds_round == pytest.approx(25 * (1.5 * replicated * 4 / 1e6 + 1440 / 1e6))


def test_groups_follow_distributed_ownership():
    """Level-2 groups and head groups in the planner are the ones distributed.ownership makes."""
    for world in (1, 2, 3, 4, 6, 8, 16, 64):
        for m in (1, 2, 4, 8):
            p = PlanInputs(images=10_000, gpus=world, k=8 * m, m=m, batch=4, arch="smallvgg",
                           feature_dim=512, pca_dim=64, image_size=32)
            s = Shape.of(p, arch_cost("smallvgg", 32, True, 512))
            owners = ownership(m, world)
            assert s.level2_group == max(map(len, owners))
            assert s.supers_per_rank == max(sum(r in o for o in owners) for r in range(world))
            heads = ownership(4 * m, world)
            assert s.head_group == max(map(len, heads))
            assert s.heads_per_rank == max(sum(r in o for o in heads) for r in range(world))


def test_ring_allreduce_volume():
    assert ring(1000, 1) == 0 and ring(1000, 2) == 1000 and ring(1000, 4) == 1500
    assert ring(1000, 64) == pytest.approx(2 * 63 / 64 * 1000)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _count(module: nn.Module, size: int) -> tuple[float, float]:
    """(MACs, conv/linear output elements) per image, counted by hooks on a meta-device forward."""
    totals = [0.0, 0.0]

    def hook(layer, inputs, out):
        per_image = out.numel() / out.shape[0]
        if isinstance(layer, nn.Conv2d):
            totals[0] += per_image * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            totals[0] += per_image * layer.in_features
        totals[1] += per_image
    for layer in module.modules():
        # the fixed Sobel filters are functional convs, not nn.Conv2d: not counted, as in the planner
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_hook(hook)
    module(torch.empty(2, 3, size, size, device="meta"))
    return totals[0], totals[1]


@pytest.mark.parametrize("arch,sobel,size,dim,pool", [
    ("vgg16_bn", True, 224, 4096, 1), ("vgg16_bn", False, 64, 4096, 1), ("smallvgg", True, 28, 64, 1),
    ("smallvgg", False, 28, 16, 1), ("smallvgg", False, 28, 16, 3), ("resnet50", True, 224, 2048, 1),
    ("resnet50", False, 224, 2048, 1)])
def test_arch_costs_match_the_modules(arch, sobel, size, dim, pool):
    with torch.device("meta"):
        module = {"vgg16_bn": lambda: VGG16BN(sobel=sobel), "resnet50": lambda: ResNet50(sobel=sobel),
                  "smallvgg": lambda: SmallVGG(feature_dim=dim, sobel=sobel, pool_size=pool)}[arch]()
    cost = arch_cost(arch, size, sobel, dim, pool)
    assert cost.params == _trainable(module)
    assert cost.feature_dim == module.feature_dim
    if arch != "resnet50":  # ResNet-50 MACs and activations are the documented figures
        macs, acts = _count(module.eval(), size)
        assert cost.macs == pytest.approx(macs) and cost.act_elems == pytest.approx(acts)


def test_vgg16_macs_match_torchvision_docs():
    """torchvision documents 15.47 GFLOPS (multiply-adds) for VGG-16 at 224 px, RGB input."""
    assert arch_cost("vgg16_bn", 224, sobel=False).macs == pytest.approx(15.47e9, rel=0.005)


def test_measured_rates_replace_defaults(tmp_path):
    """The formats bench/loader.py, bench/kmeans.py and bench/train.py write."""
    defaults = default_rates(arch_cost("vgg16_bn", 224, True), gpus_per_node=8, workers=4)
    (tmp_path / "loader.json").write_text(json.dumps({"datasets": {
        "fmnist-28px-png": {"crop": 28, "stages": {"read_us": 100.0, "decode_us": 100.0, "augment_us": 100.0}},
        "photos-256px-jpeg": {"crop": 224, "stages": {"read_us": 200.0, "decode_us": 500.0, "augment_us": 300.0},
                              "runs": [{"workers": 1, "images_per_s": 400.0}]}}}))
    (tmp_path / "kmeans.json").write_text(json.dumps({"config": {"n": 2000, "k": 10, "d": 8, "device": "cuda"},
        "table": [{"name": "faiss.Kmeans (faiss)", "per_iter_s": 0.001},
                  {"name": "ours W=1 (faiss)", "per_iter_s": 0.032},
                  {"name": "ours W=2 (faiss)", "per_iter_s": 0.02}]}))
    (tmp_path / "train.json").write_text(json.dumps({"world": 2, "device": "cuda", "config": "yfcc_vgg16.yaml",
        "rows": {"pipeline": {"img_per_s_global": 600.0}, "model_only": {"img_per_s_global": 700.0}}}))
    rates, notes = measured_rates(defaults, tmp_path, workers=4, image_size=224, device="cuda")
    assert rates.loader_img_s.value == pytest.approx(1e6 / 1000 * 4)  # the 224-px dataset's stages
    assert rates.kmeans_s_pcd.value == pytest.approx(0.032 / (2000 * 10 * 8))  # ours, one rank
    assert rates.train_rows_s.value == pytest.approx(300.0) and rates.extract_img_s.value == pytest.approx(900.0)
    assert "photos-256px-jpeg" in rates.loader_img_s.source and rates.pca_flops == defaults.pca_flops
    assert notes == []
    small, _ = measured_rates(defaults, tmp_path, workers=2, image_size=28, device="cuda")
    assert small.loader_img_s.value == pytest.approx(1e6 / 300 * 2)
    on_cpu, notes = measured_rates(defaults, tmp_path, workers=4, image_size=224, device="cpu")
    assert (on_cpu.kmeans_s_pcd, on_cpu.train_rows_s) == (defaults.kmeans_s_pcd, defaults.train_rows_s)
    assert len(notes) == 2 and all("measured on cuda, planning for cpu" in n for n in notes)
    assert measured_rates(defaults, tmp_path / "missing", workers=4) == (defaults, [])


def test_paper_run_numbers(tmp_path, capsys):
    """96M images, 64 GPUs, k=320000, m=4 x 4 rotations: sizes computed by hand."""
    result = main(["--images", "96e6", "--gpus", "64", "--bench", str(tmp_path / "none"),
                   "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())["summary"] == result["summary"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["extract", "pca", "level1", "route", "level2", "return", "train"]
    n = 96_000_000 // 64  # 1.5M images per rank
    assert stages["extract"]["disk_bytes"] == n * 4096 * 4  # 24.6 GB > 16 GiB: memmap
    assert stages["pca"]["net_bytes_round"] == pytest.approx(2 * 63 / 64 * (4096 ** 2 + 4097) * 8
                                                             + (4096 * 4096 + 4096 + 8193) * 8)
    assert stages["route"]["net_bytes_round"] == n * 4096 * 4
    sums = (80_000 * 4096 + 80_001) * 8  # level 2: groups of 16 ranks
    assert stages["level2"]["net_bytes_round"] == pytest.approx(10 * 2 * 15 / 16 * sums)
    assert result["summary"]["rounds"] == math.ceil(100 / 3) and result["summary"]["steps_per_epoch"] == n // 48
    assert "level2" in out and "faiss wiki" in out and "groups of 4 (NVLink)" in out


def test_predicted_smoke_hook():
    cfg = load_config("configs/smoke.yaml", ["data.max_samples=0"])
    c, dim, world = cfg.cluster, cfg.model.feature_dim, 2
    pred = predicted_smoke(cfg, world=world, num_samples=640)
    assert pred["rounds"] == math.ceil(cfg.train.epochs / cfg.train.reassign)
    assert pred["steps_per_epoch"] == (640 // world) // cfg.data.batch_size
    trunk = SmallVGG(feature_dim=dim, sobel=cfg.model.sobel) if cfg.model.arch == "smallvgg" else None
    if trunk is not None:
        assert pred["trunk_params"] == _trainable(trunk)
    d, heads = min(c.pca_dim, dim), cfg.train.rotations * c.m
    assert pred["centroids_super_bytes"] == c.m * d * 4 and pred["centroids_sub_bytes_each"] == c.k // c.m * d * 4
    assert pred["features_bytes_per_rank"] == 320 * dim * 4
    assert pred["super_head_params"] == dim * heads + heads
    capped = predicted_smoke(load_config("configs/smoke.yaml", ["data.max_samples=100"]), world, 640)
    assert capped["images_per_rank_max"] == 100  # data.max_samples caps each rank's share


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of m"):
        small_inputs(k=9)
    with pytest.raises(ValueError, match="batch"):
        small_inputs(images=30)
    with pytest.raises(ValueError, match="4096-d"):
        plan(PlanInputs(images=1000, gpus=2, arch="vgg16_bn", feature_dim=512, batch=4))
