"""The GPU path, proven on one GPU: NCCL (world size 1, every collective really runs through it),
CUDA placement of every stage, CUDA results equal to the CPU ones, bf16, channels_last, host syncs.

    python -m pytest -m gpu -q tests/test_gpu.py      # on a machine with CUDA (scripts/gpu_check.sh)

Deselected by default (setup.cfg addopts); without CUDA every test here skips with that reason.
DIST_CLUSTER_GPU_TESTS_DEVICE=cpu rehearses them on CPU (gloo at world size 1; the "cuda" fixture is
the CPU): the code paths and the assertions run, except the CUDA-only ones (`needs_cuda`: sync
counting, pinned memory, CUDA RNG, torch's SyncBatchNorm). tests/test_gpu_check.py runs that in CI,
so a test here that would break on its first GPU run (a config it builds by hand, say) breaks there.
comm.py runs its collectives whenever a process group exists, world size 1 included, so a CPU
tensor handed to NCCL, or a result left on the wrong device, fails here as it would on 64 GPUs.
"""
import os
import warnings

import numpy as np
import pytest
import torch

REHEARSAL = os.environ.get("DIST_CLUSTER_GPU_TESTS_DEVICE") == "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (REHEARSAL or torch.cuda.is_available()),
                                                  reason="needs CUDA (run on a GPU machine)")]
needs_cuda = pytest.mark.skipif(REHEARSAL, reason="needs real cuda (not part of the CPU rehearsal)")

CPU = torch.device("cpu")


def _ddp(module, device):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[device] if device.type == "cuda" else None)


@pytest.fixture(scope="module")
def cuda():
    """One NCCL process group of world size 1 for the whole module (gloo on CPU in the rehearsal)."""
    from dist_cluster.runtime import distributed
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    backend, device = ("gloo", "cpu") if REHEARSAL else ("nccl", "cuda")
    env = distributed.init(backend=backend, device=device, timeout_s=120)
    assert env.backend == backend and env.device.type == device
    yield env.device
    distributed.shutdown()


def test_comm_collectives_place_tensors_for_nccl(cuda):
    from dist_cluster.runtime import comm
    t = torch.tensor([3.0])  # a CPU tensor: NCCL alone would reject it
    assert comm.all_reduce(t) is t and t.item() == 3.0
    assert comm.all_reduce(torch.tensor([2.0], device=cuda), op=comm.MAX).device == cuda
    started = comm.all_reduce_async(torch.tensor([5.0]))  # CPU in, through CUDA, back at wait()
    assert started.wait().item() == 5.0 and started.tensor.device == CPU
    assert comm.broadcast(torch.arange(3.0)).tolist() == [0.0, 1.0, 2.0]
    counts = comm.exchange_counts(torch.tensor([4]))
    assert counts.tolist() == [4] and counts.device == CPU
    rows, recv = comm.all_to_all_rows(torch.randn(4, 3), [4], out_device=cuda)
    assert rows.device == cuda and recv == [4]
    x = torch.randn(5, 2, device=cuda, requires_grad=True)
    comm.all_to_all_autograd(x, [5], [5]).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert comm.all_gather_object("a") == ["a"] and comm.gather(torch.ones(2))[0].device == CPU
    comm.barrier()


def test_pca_on_cuda_from_host_features_equals_cpu(cuda):
    from dist_cluster.cluster.pca import fit_pca
    x = torch.randn(3000, 32, dtype=torch.float64).float() @ torch.randn(32, 32)
    gpu, ref = fit_pca(x, 8, 1e-5, cuda), fit_pca(x, 8, 1e-5, CPU)
    torch.testing.assert_close(gpu.projection, ref.projection, rtol=1e-6, atol=1e-8)
    y = gpu.apply(x, cuda)
    assert y.device == cuda
    torch.testing.assert_close(y.cpu(), ref.apply(x, CPU), rtol=1e-4, atol=1e-5)


def test_torch_kmeans_on_cuda_equals_cpu_on_the_same_data(cuda):
    from dist_cluster.cluster.kmeans import kmeans
    gen = np.random.default_rng(0)
    x = torch.from_numpy((gen.standard_normal((20, 16)) * 4)[gen.integers(0, 20, 5000)]
                         + gen.standard_normal((5000, 16))).float()
    init = x[torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:20]]
    gpu = kmeans(x, 20, 10, 0, cuda, backend="torch", init_centroids=init)  # rows stream from host RAM
    ref = kmeans(x, 20, 10, 0, CPU, backend="torch", init_centroids=init)
    assert (gpu.assign_local == ref.assign_local).float().mean() > 0.999
    torch.testing.assert_close(gpu.centroids, ref.centroids, rtol=1e-4, atol=1e-4)
    assert abs(gpu.final_objective / ref.final_objective - 1) < 1e-5


def test_hierarchical_clustering_on_cuda_from_a_memmap(cuda, tmp_path):
    from dist_cluster.cluster.hierarchy import hierarchical_kmeans
    gen = np.random.default_rng(1)
    x = (gen.standard_normal((12, 8)) * 5)[gen.integers(0, 12, 2400)] + gen.standard_normal((2400, 8))
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    gpu = hierarchical_kmeans(mm, 12, 3, 8, 0, cuda, backend="torch")
    ref = hierarchical_kmeans(torch.from_numpy(x).float(), 12, 3, 8, 0, CPU, backend="torch")
    assert (gpu.super_local == ref.super_local).float().mean() > 0.999
    assert (gpu.sub_local == ref.sub_local).float().mean() > 0.99
    assert gpu.sub_local.device == CPU  # labels come back to the host, where the label table lives


def test_run_clustering_and_nmi_through_nccl(cuda, tmp_path):
    from sklearn.metrics import normalized_mutual_info_score

    from dist_cluster.cluster.nmi import distributed_nmi
    from dist_cluster.cluster.stage import run_clustering
    from dist_cluster.config import ClusterConfig

    class Log:
        def event(self, *args, **kwargs):
            pass
    feats = torch.randn(900, 24)
    keys = [f"k{i}" for i in range(900)]
    cfg = ClusterConfig(k=30, m=3, pca_dim=8, niter=5, memmap_dir=str(tmp_path), backend="torch")
    first = run_clustering(feats, keys, cfg, 0, tmp_path, Log(), seed=0, device=cuda)
    second = run_clustering(feats * 1.1, keys, cfg, 1, tmp_path, Log(), seed=1, device=cuda, prev=first)
    nmi, pairs = distributed_nmi(first.sub, second.sub)
    assert pairs == 900 and abs(nmi - normalized_mutual_info_score(first.sub, second.sub)) < 1e-9
    assert (tmp_path / "clusters" / "round_1" / "sizes.json").exists()


def _case_on_cuda(case, device):
    """tests/test_heads.py's distributed step, on CUDA: trainer.train_step through NCCL."""
    from dist_cluster.train.heads import RoutedHeads, TrunkAndSuperHead
    from dist_cluster.train.targets import Targets
    from dist_cluster.train.trainer import PendingStats, sgd, train_step
    from tests import test_heads as th
    num_super, sub_classes, sizes, weighted, seed, skip = case
    x, sup, sub, w_super, w_sub = th._case_data(*case[:5], skip)
    module = TrunkAndSuperHead(th._trunk(seed), num_super, seed=seed).to(device)
    model = _ddp(module, device)
    heads = RoutedHeads(th.FEAT_DIM, num_super, sub_classes, device, seed=seed)
    trunk_opt = sgd(module.trunk.parameters(), th.CFG.train)
    head_opt = sgd(list(module.super_head.parameters()) + list(heads.parameters()), th.CFG.train)
    targets = Targets(*(t.to(device) for t in (x, sup, sub, w_super, w_sub)))
    stats = PendingStats(train_step(model, heads, targets, trunk_opt, head_opt, 0.0, th.CFG, device)).result(1)
    return stats, module, heads


def test_train_step_on_cuda_matches_the_original(cuda):
    from tests import test_heads as th
    case = (4, 3, [40], True, 3, -1)
    stats, module, heads = _case_on_cuda(case, cuda)
    ref = th._reference(case)
    assert abs(stats.loss_sub - ref["loss_sub"]) < 1e-4 and abs(stats.loss_super - ref["loss_super"]) < 1e-4
    for got, want in zip(module.trunk.parameters(), ref["trunk"]):
        torch.testing.assert_close(got.grad.cpu(), want, rtol=1e-3, atol=1e-5)
    for s in range(4):
        torch.testing.assert_close(heads.heads[str(s)].weight.grad.cpu(), ref["heads"][s][0], rtol=1e-3, atol=1e-5)


def _head_grads_through_nccl(device, overlap):
    """One loss + backward + sync_grads with every owned head's reduce forced through NCCL (world 1
    has no shared head otherwise); returns the head gradients and the host syncs counted by CUDA in
    backward + sync_grads (the hooks' launches and the waits)."""
    from dist_cluster.train.heads import RoutedHeads
    heads = RoutedHeads(8, 2, 5, device, seed=0, overlap=overlap)
    heads._grads.shared = set(heads.owned)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 8, generator=gen).to(device).requires_grad_()
    sup, sub = torch.tensor([0, 1, 1, 0, 1, 1], device=device), torch.randint(5, (6,), generator=gen).to(device)
    w = torch.ones(6, device=device)
    loss, _ = heads.loss(feats, sup, sub, w, w.sum(), torch.stack([(sup == s).sum() for s in (0, 1)]).double())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.backward()
        heads.sync_grads()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(x.message) for x in caught if "synchroniz" in str(x.message).lower()]
    return [p.grad.cpu() for p in heads.parameters()], syncs


@needs_cuda
def test_head_reduces_during_backward_through_nccl_without_host_syncs(cuda):
    overlapped, syncs = _head_grads_through_nccl(cuda, True)
    blocking, _ = _head_grads_through_nccl(cuda, False)
    assert syncs == []
    for a, b in zip(overlapped, blocking):
        torch.testing.assert_close(a, b)


def _smallvgg_run(device, bf16=True, channels_last=True):
    from omegaconf import OmegaConf

    from dist_cluster.models import initial_trunk
    from dist_cluster.runtime.syncbn import convert_sync_batchnorm
    from dist_cluster.train.heads import RoutedHeads, TrunkAndSuperHead
    from dist_cluster.train.trainer import sgd
    cfg = OmegaConf.create({"train": {"bf16": bf16, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5},
                            "model": {"arch": "smallvgg", "sobel": True, "feature_dim": 64, "pool_size": 3,
                                      "channels_last": channels_last}})
    module = convert_sync_batchnorm(TrunkAndSuperHead(initial_trunk(cfg.model, 28, 0), 8), device).to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = _ddp(module, device)
    heads = RoutedHeads(64, 8, 5, device, seed=0)
    opts = (sgd(module.trunk.parameters(), cfg.train),
            sgd(list(module.super_head.parameters()) + list(heads.parameters()), cfg.train))
    return cfg, module, model, heads, opts


def _table():
    from dist_cluster.train.targets import LabelTable
    keys = np.array([f"k{i}" for i in range(64)])
    sup = np.arange(64) % 2
    sub = sup * 5 + np.arange(64) % 5
    return keys.tolist(), LabelTable(keys, sup, sub, np.bincount(sup), np.bincount(sub, minlength=10), 10, 2,
                                     "weight")


@needs_cuda
def test_one_training_step_blocks_the_host_once(cuda):
    """Issue target: at most one blocking sync per step (it was about 25), counted by CUDA itself."""
    from dist_cluster.train.targets import make_targets
    from dist_cluster.train.trainer import PendingStats, train_step
    cfg, module, model, heads, (trunk_opt, head_opt) = _smallvgg_run(cuda)
    keys, table = _table()
    images = torch.randn(64, 3, 28, 28, device=cuda)
    pending = None
    for step in range(3):  # the last step is counted, after warm-up allocations
        gen = torch.Generator().manual_seed(step)
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            targets = make_targets(images, keys, table, 4, False, gen, device=cuda, channels_last=True)
            vector = train_step(model, heads, targets, trunk_opt, head_opt, 0.01, cfg, cuda)
            done = PendingStats(vector, step=step)
            if pending is not None:
                pending.result(1)
            pending = done
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, syncs
    assert np.isfinite(pending.result(1).loss_sub)


@needs_cuda
def test_syncbn_on_cuda_is_torchs_and_matches_batchnorm(cuda):
    from torch import nn

    from dist_cluster.runtime.syncbn import convert_sync_batchnorm
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), cuda).to(cuda)
    assert isinstance(bn[0], nn.SyncBatchNorm)
    ref = nn.BatchNorm2d(4).to(cuda)
    x = torch.randn(8, 4, 5, 5, device=cuda)
    torch.testing.assert_close(bn(x), ref(x))


def test_bf16_autocast_and_channels_last_agree_with_fp32(cuda):
    from dist_cluster.runtime.distributed import autocast_for
    _, module, _, _, _ = _smallvgg_run(cuda, channels_last=True)
    _, plain, _, _, _ = _smallvgg_run(cuda, channels_last=False)
    plain.load_state_dict(module.state_dict())
    module.eval(), plain.eval()
    x = torch.randn(16, 3, 28, 28, device=cuda)
    with torch.no_grad():
        ref = plain.trunk(x)
        cl = module.trunk(x.contiguous(memory_format=torch.channels_last))
        with autocast_for(cuda, True):
            low = module.trunk(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-3, atol=1e-3)
    assert low.dtype == torch.bfloat16 or low.dtype == torch.float32
    assert (low.float() - ref).norm() / ref.norm() < 0.05


@needs_cuda
def test_cuda_rng_is_checkpointed_and_per_rank(cuda):
    from dist_cluster.checkpoint import store
    from dist_cluster.train.trainer import seed_this_rank
    seed_this_rank(0, 0)
    a = torch.rand(4, device=cuda)
    seed_this_rank(0, 1)
    b = torch.rand(4, device=cuda)
    assert not torch.equal(a, b)  # rank 0 and rank 1 draw different dropout masks
    state = store.rng_state(cuda)
    assert "cuda_rng" in state
    first = torch.rand(4, device=cuda)
    store.set_rng_state(state, cuda)
    assert torch.equal(first, torch.rand(4, device=cuda))


@needs_cuda
def test_checkpoint_host_copy_and_background_save_on_cuda(cuda, tmp_path):
    """writer.snapshot: pinned host copies, complete when it returns (a kernel writing the
    original right after cannot reach the copy); a background save of CUDA state, published over
    NCCL, loads back onto the device."""
    from dist_cluster.checkpoint import store
    from dist_cluster.checkpoint.writer import CheckpointWriter, snapshot
    live = {"w": torch.randn(4096, 1024, device=cuda), "m": [torch.arange(5.0, device=cuda)], "step": 3}
    host = snapshot(live)
    expected = live["w"].cpu()
    live["w"].mul_(0)  # training goes on, asynchronously on the GPU
    assert host["w"].device == CPU and host["w"].is_pinned() and torch.equal(host["w"], expected)
    assert host["m"][0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and host["step"] == 3
    writer = CheckpointWriter(tmp_path)
    writer.save({"model": {"w": live["w"]}, "config": ""}, {"h": live["m"][0]}, 7)
    writer.wait()
    loaded = store.load(tmp_path, map_location=cuda)
    assert loaded.shared["model"]["w"].device == cuda and torch.equal(loaded.shared["model"]["w"], live["w"])


def test_loader_and_targets_follow_the_run_device(cuda, tmp_path):
    from dist_cluster.config import DataConfig
    from dist_cluster.data.loader import make_loader
    from dist_cluster.data.transforms import train_transform
    from tests.shard_fixtures import make_shards
    shards = make_shards(tmp_path, 2, 8, size=16)
    cfg = DataConfig(batch_size=4, num_workers=0, shuffle_buffer=4)  # every key the loader reads
    on_gpu = next(iter(make_loader(cfg, str(shards.root), 0, 1, train_transform(16, 0.5), 0, 0, True, cuda)))
    on_cpu = next(iter(make_loader(cfg, str(shards.root), 0, 1, train_transform(16, 0.5), 0, 0, True, CPU)))
    assert on_gpu[0].device == cuda and on_cpu[0].device == CPU
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=1e-5, atol=1e-5)
