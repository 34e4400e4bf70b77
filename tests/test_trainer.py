"""Trainer pieces: targets, balancing weights, the NaN stop, the lr schedule, config errors."""
import math

import numpy as np
import pytest
import torch

from dist_cluster.config import ConfigError, load_config
from dist_cluster.targets import LabelTable, make_targets
from dist_cluster.trainer import lr_at, reduce_step_stats
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
    try:
        reduce_step_stats(loss, torch.tensor(0.5), 1, 1, 1, 4, world)
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
