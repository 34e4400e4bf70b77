"""The round loop's classifiers: re-initialised after every re-clustering (DeeperCluster,
DeepCluster), carried over from round to round where the targets never change (RotNet and
supervised, as in the original's RotNet mode; DeeperCluster's super head when m = 1, whose classes
are the rotations alone, as the original's main.py), also across a resume at a round boundary.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_rounds.py
"""
import pytest
import torch

from tests.dist_utils import run_ranks
from tests.shard_fixtures import make_shards


def small_run_config(mode, run_dir, shards, epochs, ckpt_every_steps=0):
    """A 1-rank run of a few seconds on tests/shard_fixtures shards: 2 rounds of 1 epoch each
    (mode "deepercluster-m1": DeeperCluster with one super-cluster)."""
    from dist_cluster.config import load_config
    m = 1 if mode == "deepercluster-m1" else 2
    mode = mode.removesuffix("-m1")
    return load_config(None, [f"mode={mode}", f"run_dir={run_dir}", f"data.train={shards}", "data.batch_size=32",
                              "data.num_workers=0", "data.max_samples=96", "data.image_size=28", "data.resize=28",
                              "model.sobel=false", "model.feature_dim=16", "cluster.k=8", f"cluster.m={m}",
                              "cluster.pca_dim=8", "cluster.niter=3", f"train.epochs={epochs}", "train.reassign=1",
                              f"train.ckpt_every_steps={ckpt_every_steps}", "train.log_every_steps=1"])


def _heads_at_round_edges(rank, world, mode, run_dir, shards, epochs_per_run):
    """Super-head weights at the start and end of every round, over one or more runs of run_dir."""
    from dist_cluster.run.rounds import Run
    seen = []

    class Recording(Run):
        def train_round(self, round_idx, table):
            start = self.super_state()
            super().train_round(round_idx, table)
            seen.append((round_idx, start, self.super_state()))

        def super_state(self):
            """The super head's weight and its momentum (zeros before its first step)."""
            weight = self.module.super_head.weight
            momentum = self.head_opt.state.get(weight, {}).get("momentum_buffer")
            return torch.cat([weight.detach().flatten(), torch.zeros(weight.numel()) if momentum is None
                              else momentum.detach().flatten()]).clone()

    for epochs in epochs_per_run:
        Recording(small_run_config(mode, run_dir, shards, epochs)).run()
    return seen


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), 2, 96, size=28).root


def _both_ways(rank, world, mode, tmp, shards):
    """Two rounds in one run, and the same two rounds over two runs (resumed at the boundary)."""
    return [_heads_at_round_edges(rank, world, mode, tmp / name, shards, epochs)
            for name, epochs in (("one_run", (2,)), ("resumed", (1, 2)))]


@pytest.mark.parametrize("mode", ["rotnet", "supervised", "deepercluster", "deepercluster-m1"])
def test_classifier_carries_over_only_when_targets_are_fixed(mode, shards, tmp_path):
    one_run, resumed = run_ranks(_both_ways, 1, (mode, tmp_path, shards))[0]
    for (r0, start0, end0), (r1, start1, end1) in (one_run, resumed):
        assert (r0, r1) == (0, 1) and not torch.equal(start0, end0)  # round 0 trained its head
        if mode == "deepercluster":  # new clusters, new head: not the one round 0 left
            assert not torch.equal(start1, end0)
        else:  # weights and momentum as round 0 left them
            assert torch.equal(start1, end0)
    for (_, a_start, a_end), (_, b_start, b_end) in zip(one_run, resumed):  # a resume changes nothing
        assert torch.equal(a_start, b_start) and torch.equal(a_end, b_end)


def _state_while_clustering(rank, world, run_dir, shards):
    """What the run holds on entering CLUSTER in round 1: no heads, no head optimiser, no gradient."""
    from dist_cluster.run import rounds
    seen = []
    real = rounds.run_clustering

    def recording(*args, **kwargs):
        run = recording.run
        seen.append((run.heads is None, run.head_opt is None,
                     sum(p.grad is not None for p in run.module.parameters())))
        return real(*args, **kwargs)

    rounds.run_clustering = recording
    try:
        recording.run = rounds.Run(small_run_config("deepercluster", run_dir, shards, 2))
        recording.run.run()
    finally:
        rounds.run_clustering = real
    return seen


def test_training_state_is_released_before_the_clustering(shards, tmp_path):
    """The heads and gradients of round 0 are gone while round 1 clusters (the planner's
    resident_training_bytes counts only trunk weights, DDP buckets and momentum)."""
    seen = run_ranks(_state_while_clustering, 1, (tmp_path / "run", shards))[0]
    assert seen == [(True, True, 0), (True, True, 0)]
