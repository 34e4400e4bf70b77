"""Capacity planner: the arithmetic against cases computed by hand, the trunk costs against the real
modules, and the command line.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_plan.py
"""
from __future__ import annotations

import importlib
from dataclasses import replace
import json
import math

import pytest
import torch
import torch.nn as nn

from dist_cluster.config import load_config
from dist_cluster.models import VGG16BN, ResNet50, SmallVGG
from dist_cluster.plan.costs import Rate, Rates, arch_cost, default_rates, measured_rates
from dist_cluster.plan.memory import MemoryInputs, stage_memory
from dist_cluster.plan.cli import main
from dist_cluster.plan.planner import (
    PlanInputs,
    Shape,
    memory_inputs,
    plan,
    predicted_smoke,
    resident_training_bytes,
    ring,
)
from dist_cluster.runtime.distributed import ownership
from dist_cluster.runtime.preemption import NO_POLL

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


def _shape(p: PlanInputs) -> Shape:
    return Shape.of(p, arch_cost(p.arch, p.image_size, p.sobel, p.feature_dim))


def test_small_plan_by_hand():
    """1000 images on 4 ranks: n = 250, D = 16, d = 8, k/m = 4, S = 8 heads (2 per rank)."""
    rows = {r.stage: r for r in plan(small_inputs(), round_rates())}
    assert arch_cost("smallvgg", 28, sobel=False, feature_dim=16).params == SMALL_P

    ex = rows["extract"]  # features, keys (5 characters) and the per-batch key arrays
    assert (ex.ram_bytes, ex.disk_bytes, ex.read_bytes_round) == (250 * 16 * 4 + 2 * 250 * 5 * 4, 0, 250 * 100)
    assert ex.seconds_round == pytest.approx(250 / 25)  # loader-bound: min(50, 25) img/s

    pca = rows["pca"]
    moments = (16 * 16 + 16 + 1) * 8  # 2184 bytes of float64
    assert pca.net_bytes_round == pytest.approx(1.5 * moments + (16 * 8 + 16 + 2 * 8 + 1) * 8)  # 3276 + 1288
    assert pca.seconds_round == pytest.approx((2 * 250 * 256 + 2 * 250 * 128 + 10 * 16 ** 3) / 1e6 + 4564 / 1e9)

    l1 = rows["level1"]
    # 3 iterations x 1.5 x [sums | counts | objective | preemption vote] of float64
    assert l1.net_bytes_round == pytest.approx(3 * 1.5 * (2 * 8 + 2 + 1 + 1) * 8)
    assert l1.seconds_round == pytest.approx(3 * 250 * 2 * 8 * 1e-6 + 720 / 1e9)

    route = rows["route"]
    assert route.net_bytes_round == 250 * 8 * 4
    # memory (plan.memory.stage_memory, by hand in test_stage_memory_by_hand): on the GPU the training
    # state, the whitened rows, the receive buffer and one round (here all of it) each way
    resident = resident_training_bytes(small_inputs(), _shape(small_inputs()))
    assert route.gpu_bytes == resident + 8000 + 8000 + 2 * 8000

    l2 = rows["level2"]  # groups of 2 ranks (4 ranks / m = 2), all_reduce (4*8 + 4 + 1) float64
    assert l2.net_bytes_round == pytest.approx(3 * 1.0 * 37 * 8)
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
    assert (rows["extract"].ram_bytes, rows["extract"].disk_bytes) == (2 * 250 * 5 * 4, 16000)  # the keys in RAM
    # whitened in place over the features (cluster/stage.py whitened_place): no second file
    assert rows["pca"].disk_bytes == 16000 and "whitened" not in stage_memory(
        memory_inputs(small_inputs(memmap_gb=1e-6), _shape(small_inputs())))["pca"].items
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


# ----------------------------------------------------------------------------- memory: the code's own sizes


def test_stage_memory_by_hand():
    """1000 rows of D = 16 on a CPU rank of 2, d = 8, k = 8, m = 4, torch E-step, 5-character keys:
    every figure below is the sum of what the code allocates (plan.memory's docstring)."""
    st = stage_memory(MemoryInputs(rows=1000, world=2, feature_dim=16, pca_dim=8, k=8, m=4, device="cpu",
                                   backend="torch", memmap_gb=1.0, key_chars=5))
    kept = 64000 + 20000  # features, keys; whitened in place (CPU run, overwrite_features)
    assert st["extract"].host == kept + 20000  # + the per-batch key arrays
    moments, chunk64 = 273 * 8, 1000 * 16 * 8  # fit_pca's first phase beats eigh (4 x 256 x 8 + params)
    assert st["pca"].host == kept + moments + chunk64
    kept += 161 * 8  # the fitted PCA (projection, mean, eigenvalues, floored, kept)
    lloyd1 = 2 * 128 + 8000 + 38 * 8 + 128 + 16000 + 12000 + 16 + 1000 * 15 * 4  # torch block: 1000 x (4 + 8 + 3)
    assert st["level1"].host == kept + lloyd1
    kept += 256 + 8000 + 8000  # level 1's result (centroids x 2, labels) and sub_local's clone
    assert st["route"].host == kept + 32000 + 16000 + 32000  # receive buffer, order + index, one round
    done = 2 * 2 * 8 * 4 + 500 * 8  # two owned super-clusters of 500 rows, 2 sub-clusters each: one done
    lloyd2 = 2 * 64 + 4000 + 20 * 8 + 64 + 8000 + 6000 + 8 + 500 * 13 * 4
    assert st["level2"].host == kept + 32000 + 16000 + 8000 + done + lloyd2
    # rank 0's sizes.png (stage.PLOT_BYTES) beats the labels going back (8 x 4000: gathered, sent, placed)
    assert st["return"].host == kept + 2 * done + 16000 + max(8 * 4000, 5 << 19)
    assert all(s.device == 0 and s.disk == 0 for s in st.values())


def test_sinkhorn_level_memory_and_cost_by_hand():
    """cluster.method=sinkhorn: level 1 holds the scores of one chunk, the float64 unit centroids and
    the chunk in float64 instead of the E-step's blocks; a level costs 1 + sinkhorn_iters passes and
    two all_reduces of k numbers more per iteration (cluster/sinkhorn.py)."""
    from dist_cluster.cluster.sinkhorn import messages_per_iteration
    from dist_cluster.plan.planner import lloyd_cost
    kmeans = stage_memory(MemoryInputs(rows=1000, world=2, feature_dim=16, pca_dim=8, k=8, m=4, device="cpu",
                                       backend="torch", memmap_gb=1.0, key_chars=5))
    balanced = stage_memory(MemoryInputs(rows=1000, world=2, feature_dim=16, pca_dim=8, k=8, m=4, device="cpu",
                                         backend="torch", memmap_gb=1.0, key_chars=5, method="sinkhorn"))
    lloyd1 = 2 * 128 + 8000 + 38 * 8 + 128 + 16000 + 12000 + 16 + 1000 * 15 * 4
    # centroids (x2: initial), unit (float64), labels, message, chunk sums, scores + exp, 4 column stats, chunk64
    sink1 = 2 * 128 + 4 * 8 * 8 + 8000 + 37 * 8 + 128 + 2 * 1000 * 4 * 8 + 4 * 4 * 8 + 1000 * 8 * 8
    assert balanced["level1"].host - kmeans["level1"].host == sink1 - lloyd1
    assert messages_per_iteration(8, 4, 3) == [8] * 6 + [8 * 4 + 8 + 1]
    p = small_inputs()
    rates = default_rates(arch_cost(p.arch, p.image_size, p.sobel, p.feature_dim), 8, p.workers)
    net_k, s_k = lloyd_cost(p, rates, 1000, 16, 8, 4, 1e9, vote=1)
    p.method, p.sinkhorn_iters = "sinkhorn", 3
    net_s, s_s = lloyd_cost(p, rates, 1000, 16, 8, 4, 1e9, vote=1)
    assert net_s - net_k == pytest.approx(p.niter * 6 * 2 * 3 / 4 * 16 * 8)  # 6 rings of 16 float64 over 4 ranks
    compute = p.niter * 1000 * 16 * 8 * rates.kmeans_s_pcd.value
    assert s_s - s_k == pytest.approx(3 * compute + (net_s - net_k) / 1e9)


def test_super_method_costs_level_1_by_its_method_and_level_2_by_the_other():
    """cluster.super_method=sinkhorn over kmeans: the level1 row is the all-sinkhorn plan's, the
    level2 row the all-kmeans plan's (memory, traffic and seconds); the reverse likewise."""
    def rows(**kw):
        return {r.stage: r for r in plan(small_inputs(**kw), round_rates())}
    kmeans, sinkhorn = rows(method="kmeans"), rows(method="sinkhorn")
    for super_method, method, level1, level2 in (("sinkhorn", "kmeans", sinkhorn, kmeans),
                                                 ("kmeans", "sinkhorn", kmeans, sinkhorn)):
        mixed = rows(method=method, super_method=super_method)
        for stage, want in (("level1", level1), ("level2", level2)):
            got = mixed[stage]
            assert (got.ram_bytes, got.gpu_bytes, got.net_bytes_round, got.seconds_round) == (
                want[stage].ram_bytes, want[stage].gpu_bytes, want[stage].net_bytes_round,
                want[stage].seconds_round), (super_method, stage)
    assert sinkhorn["level1"].seconds_round > kmeans["level1"].seconds_round  # the rows differ at all
    with pytest.raises(ValueError, match="super-method"):
        rows(method="pic", m=1, super_method="sinkhorn")


def test_plan_rows_take_their_memory_from_stage_memory():
    p = small_inputs()
    mem = stage_memory(memory_inputs(p, _shape(p)))
    for row in plan(p, round_rates())[:-1]:
        m = mem[row.stage]
        assert (row.gpu_bytes, row.ram_bytes, row.disk_bytes) == (m.device, m.host, m.disk)


def test_paper_run_fits_32_gb_ram_and_40_gb_gpus(tmp_path):
    """Issue 12: host RAM <= 32 GB and GPU memory <= 40 GB per rank for the paper's run."""
    result = main(["--images", "96e6", "--gpus", "64", "--bench", str(tmp_path / "none")])
    assert result["summary"]["peak_ram_bytes_per_rank"] <= 32e9
    assert result["summary"]["peak_gpu_bytes_per_rank"] <= 40e9


def _routed_buffers(rank, world, d, chunks):
    """RoutePlan on balanced labels, per round size: what it allocated and sent, what the
    planner's functions say."""
    from dist_cluster.cluster import route
    from dist_cluster.runtime import comm, distributed
    n, m, out = 400, 4, []
    super_local = torch.arange(n) % m
    for chunk_bytes in chunks:
        plan_ = route.RoutePlan(super_local, distributed.ownership(m, world), m)
        sent, real = [], comm.all_to_all_rows_known

        def recording(rows_, send_counts, recv_counts, group=None, out_device=None):
            sent.append((rows_.nbytes, sum(recv_counts) * d * 4))
            return real(rows_, send_counts, recv_counts, group, out_device)
        comm.all_to_all_rows_known = recording
        try:
            buf = plan_.send_rows(torch.randn(n, d), torch.device("cpu"), chunk_bytes)
        finally:
            comm.all_to_all_rows_known = real
        n_recv = int(plan_.recv_total.sum())
        out.append(dict(nbytes=buf.nbytes, n_recv=n_recv, planned=route.buffer_bytes(n_recv, d), rounds=sent,
                        round_bound=route.round_bytes(n, n_recv, d, chunk_bytes, world)))
    return out


def test_route_buffer_is_what_routeplan_allocates():
    """The planner's receive buffer and routing rounds are route.py's own, on 2 gloo ranks, with one
    round (1 MiB) and with rounds of 100 rows."""
    from dist_cluster.cluster import route
    from tests.dist_utils import run_ranks
    d, chunks = 16, (1 << 20, 100 * 16 * 4)
    for per_rank in run_ranks(_routed_buffers, 2, (d, chunks)):
        for r in per_rank:
            assert r["nbytes"] == r["planned"] and r["n_recv"] == 400  # balanced labels: n rows each
            send_max, recv_max = r["round_bound"]
            assert all(out <= send_max and back <= recv_max for out, back in r["rounds"])
            assert max(out for out, _ in r["rounds"]) == send_max  # the bound is reached, not loose
        assert len(per_rank[1]["rounds"]) == 4  # 400 rows, 100 a round
    for chunk_bytes in chunks:
        mem = stage_memory(MemoryInputs(rows=400, world=2, feature_dim=d, pca_dim=d, k=8, m=4, device="cuda",
                                        route_chunk_bytes=chunk_bytes))
        assert mem["route"].items["receive buffer"] == ("device", route.buffer_bytes(400, d))


def test_messages_have_the_planned_sizes():
    """The M-step and PCA messages, and the fitted PCA, are the sizes the planner adds up."""
    km = importlib.import_module("dist_cluster.cluster.kmeans")  # the package exports a function of that name
    pca = importlib.import_module("dist_cluster.cluster.pca")
    x = torch.randn(300, 12)
    assigner = km.TorchAssigner(torch.device("cpu"))
    assigner.set_centroids(x[:5])
    labels, message = km._pass(x, assigner, 5, torch.device("cpu"), 64, with_sums=True, extra=1)
    assert message.numel() == km.message_elements(5, 12, True, 1) and labels.nbytes == 300 * 8
    assert pca._moments(x, None, torch.device("cpu"), NO_POLL).numel() == pca.moments_elements(12)
    fitted = pca.fit_pca(x, 6, 1e-5, torch.device("cpu"))
    assert fitted.projection.untyped_storage().nbytes() == pca.params_elements(12, 6) * 8  # views of one buffer


def test_bench_memory_dry_run_schema(tmp_path):
    """bench/memory.py --dry-run: the planned figures in the JSON the real run writes."""
    from bench import memory
    doc = memory.main(["--dry-run", "--out", str(tmp_path / "memory.json")])
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(doc["rows"]))
    keys = {"stage", "rows_per_rank", "world", "dim", "measured_peak_bytes", "planned_peak_bytes"}
    assert len(saved["rows"]) == 2 * 2 * 3 * len(memory.STAGES) and all(keys <= set(r) for r in saved["rows"])
    assert all(r["planned_peak_bytes"] > 0 and r["measured_peak_bytes"] is None for r in saved["rows"])
    assert {"date", "host", "device", "measures"} <= set(saved)


def test_bench_memory_tiny_run(tmp_path):
    """bench/memory.py on 2 gloo ranks at a tiny size: every stage is marked and measured (the
    stage marks wrap run_clustering's entry points: a renamed one shows up here)."""
    from bench import memory
    doc = memory.main(["--worlds", "2", "--dims", "16", "--rows", "3000", "--k", "8", "--warmup-rows", "512",
                       "--out", str(tmp_path / "memory.json")])
    assert [r["stage"] for r in doc["rows"]] == list(memory.STAGES)
    assert all(r["measured_peak_bytes"] > 0 and r["recv_rows_max"] > 0 for r in doc["rows"])


def test_pic_memory_and_cost_by_hand():
    """cluster.method=pic: level 1 is the k-NN search (its distance blocks) or the graph build,
    whichever is larger, level 2 the power iterations over the kept graph; nothing is routed; the
    graph costs one pass of every rank's rows round the ring and a search against all N rows."""
    from dist_cluster.cluster.pic import GRAPH_BYTES_PER_EDGE, POWER_BYTES_PER_EDGE, SEARCH_ELEMENTS
    from dist_cluster.plan.methods import PIC_EDGE_S, pic_costs
    knn, d = 10, 8

    def stages(n):
        return stage_memory(MemoryInputs(rows=n, world=2, feature_dim=16, pca_dim=d, k=8, m=1, device="cpu",
                                         backend="torch", memmap_gb=1.0, key_chars=5, route_chunk_bytes=1 << 20,
                                         method="pic", pic_knn=knn))
    for n in (5000, 1_000_000):
        st, edges = stages(n), n * knn
        piece = min((1 << 20) // (4 * d), n)  # rows of one ring piece
        search = 16 * edges + 2 * piece * (4 * d + 8) + piece * d * 8 + \
            min(n, SEARCH_ELEMENTS // piece) * piece * (4 * 8 + 2)  # float64 blocks x 4, 2 masks
        graph = 12 * edges + GRAPH_BYTES_PER_EDGE * edges
        kept_graph = 12 * edges + 8 * n + 32 * edges  # k-NN lists and the CSR graph
        assert (graph > search) == (n == 1_000_000)  # the search's blocks are the peak of small runs
        assert st["level1"].host - st["route"].host == max(search, graph) - kept_graph
        assert st["level2"].host - st["route"].host == POWER_BYTES_PER_EDGE * edges
        assert st["route"].items["graph (CSR, symmetric)"] == ("host", 8 * n + 32 * edges)
        assert "receive buffer" not in st["route"].items
    p = small_inputs()
    p.method, p.m, p.k = "pic", 1, 16
    rates = default_rates(arch_cost(p.arch, p.image_size, p.sobel, p.feature_dim), 8, p.workers)
    (g_net, g_s), (p_net, p_s) = pic_costs(p, rates, 1000, 8, 1e9)
    remote = (p.gpus - 1) / p.gpus
    assert g_net == pytest.approx((p.gpus - 1) * 1000 * 40 + 24 * 1000 * p.pic_knn * remote)
    assert g_s == pytest.approx(1000 * p.images * 8 * rates.kmeans_s_pcd.value + g_net / 1e9)
    assert p_net == pytest.approx(2 * p.pic_iters * 2 * 1000 * p.pic_knn * 8 * remote)
    assert p_s == pytest.approx(p.pic_iters * 2 * 1000 * p.pic_knn * PIC_EDGE_S + p_net / 1e9)
    with pytest.raises(ValueError, match="PIC is flat"):
        replace(p, m=2)
