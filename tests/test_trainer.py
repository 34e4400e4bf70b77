"""Trainer pieces: targets, balancing weights, the NaN stop, the lr schedule, config errors."""
import math

import numpy as np
import pytest
import torch

from dist_cluster.config import ConfigError, load_config
from dist_cluster.train.targets import LabelTable, make_targets
from dist_cluster.train.trainer import PendingStats, lr_at, step_stats_vector
from tests.dist_utils import run_ranks


def _table(balance="weight"):
    keys = np.array(["a", "b", "c", "d"])
    sup, sub = np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2])  # k=4, m=2: sub // 2 == super
    return LabelTable(keys, sup, sub, np.array([30, 10]), np.array([20, 10, 10, 0]), 4, 2, balance)


def test_targets_and_weights_follow_the_definition():
    table = _table()
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    t = make_targets(images, ["a", "b", "c", "d"], table, 4, False, torch.Generator().manual_seed(0))
    rot = t.super_class // 2
    assert t.super_class.tolist() == (rot * 2 + torch.tensor([0, 0, 1, 1])).tolist()
    assert t.sub_local.tolist() == [0, 1, 0, 0]
    for i in range(4):  # the image is rotated by its label
        np.testing.assert_array_equal(t.images[i].numpy(), np.rot90(images[i].numpy(), int(rot[i]), axes=(1, 2)))
    # weights proportional to 1/|cluster|: a super-cluster of 10 weighs 3x one of 30
    assert t.super_weight[2] / t.super_weight[0] == pytest.approx(3.0)
    assert t.sub_weight[0] / t.sub_weight[1] == pytest.approx(0.5)
    assert table.sub_w[3] == 0  # the empty cluster


def test_all_rotations_quadruples_the_batch():
    t = make_targets(torch.zeros(2, 3, 4, 4), ["a", "c"], _table("none"), 4, True, torch.Generator())
    assert len(t.super_class) == 8 and sorted((t.super_class // 2).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (t.super_weight == 1).all()


def test_unknown_key_is_a_clear_error():
    with pytest.raises(KeyError, match="no cluster label on this rank"):
        _table().lookup(["zzz"])


def _nan_on_rank1(rank, world):
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    vector = step_stats_vector(loss, torch.tensor(0.5), torch.tensor(1), torch.tensor(1), 1, 4, torch.device("cpu"))
    try:
        PendingStats(vector, step=3).result(world)
    except FloatingPointError as err:
        return str(err)
    return "no error"


def test_nonfinite_loss_stops_every_rank():
    messages = run_ranks(_nan_on_rank1, 2)
    assert all("non-finite loss on 1 rank" in m for m in messages)


def test_cosine_schedule_with_warmup():
    cfg = load_config(None, ["train.schedule=cosine", "train.warmup_epochs=1", "train.lr=0.1"]).train
    assert lr_at(0, 100, cfg, 10) == pytest.approx(0.01)
    assert lr_at(10, 100, cfg, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, cfg, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("override, key", [("cluster.kk=3", "cluster.kk"), ("cluster.k=abc", "cluster.k"),
                                           ("cluster.k=10", "cluster.k"), ("mode=foo", "mode"),
                                           ("train.rotations=3", "train.rotations"),
                                           ("model.pool_size=0", "model.pool_size")])
def test_config_errors_name_the_key(override, key):
    overrides = [override, "cluster.m=4"] if override == "cluster.k=10" else [override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_modes_set_the_baselines():
    rot = load_config(None, ["mode=rotnet"])
    assert (rot.cluster.k, rot.cluster.m, rot.train.rotations) == (1, 1, 4)
    dc = load_config(None, ["mode=deepcluster", "cluster.k=50"])
    assert (dc.cluster.k, dc.cluster.m, dc.train.rotations) == (50, 1, 1)


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")


def _count_host_reads_in_one_step(rank, world):
    """Wrap every Tensor method that reads a value on the host and count the calls in train_step.

    On a GPU each such read waits for all queued work (the GPU test counts them with
    torch.cuda.set_sync_debug_mode); here the same code runs on CPU, so the count is the proxy."""
    counts = {name: 0 for name in HOST_READS}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    import tests.test_heads as th
    real_step = th.train_step

    def step_only(*args, **kwargs):  # count inside train_step, not the stats read that follows it
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        try:
            return real_step(*args, **kwargs)
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    th.train_step = step_only
    try:
        th._distributed_step(rank, world, th.CASES_W4[1])  # W > S: heads shared by groups of 2 ranks
    finally:
        th.train_step = real_step
    return counts


def test_one_step_reads_the_host_once():
    """Issue target: at most one blocking sync per step (the routing's counts); it was about 25."""
    for counts in run_ranks(_count_host_reads_in_one_step, 4):
        assert sum(counts.values()) <= 1, counts
        assert counts["tolist"] == 1, counts  # the count matrix of the all_to_all


def _draws_after_run_seeding(rank, world):
    """What rounds.Run does around model construction: the same init everywhere, then per-rank
    streams (dropout masks must differ between ranks, CUDA ones included)."""
    from dist_cluster.checkpoint import store
    from dist_cluster.models import initial_trunk
    from dist_cluster.train.trainer import seed_this_rank
    cfg = load_config(None, ["model.feature_dim=8", "cluster.pca_dim=8"])
    trunk = initial_trunk(cfg.model, 28, cfg.seed)
    seed_this_rank(cfg.seed, rank)
    mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
    state = store.rng_state(torch.device("cpu"))
    after = torch.rand(4)
    store.set_rng_state(state, torch.device("cpu"))
    again = torch.rand(4)
    return trunk.state_dict()["blocks.0.0.weight"].numpy(), mask.numpy(), torch.equal(after, again), sorted(state)


def test_ranks_share_the_init_but_not_their_random_streams():
    (w0, m0, same0, keys), (w1, m1, same1, _) = run_ranks(_draws_after_run_seeding, 2)
    assert np.array_equal(w0, w1)  # DDP's broadcast would hide a mismatch; the init agrees anyway
    assert not np.array_equal(m0, m1)  # used to be identical on every rank
    assert same0 and same1 and keys == ["rng"]  # CPU runs save the CPU state only
