"""train.balance=resample: the original's sampler realised in the stream.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_resample.py

The reference for the expected counts is a simulation of the original's draws (facebookresearch/
DeeperCluster, src/trainer.py: one super-class per group of GPUs, all groups with the same batch,
DistUnifTargSampler inside a group: uniform over its non-empty sub-cluster labels, then an image of
the label), written here in numpy from that description, not from expected_counts.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from dist_cluster.config import ConfigError, load_config
from dist_cluster.data.loader import ShardLoader, assign_shards, reduce_stats, steps_per_epoch
from dist_cluster.data.manifest import load_manifest
from dist_cluster.data.resample import draw_count, expected_counts
from dist_cluster.data.transforms import train_transform
from dist_cluster.train.targets import LabelTable, make_targets
from tests.dist_utils import run_ranks
from tests.shard_fixtures import make_shards

BATCH = 4

# k = 16, m = 4 (4 sub-clusters each, global ids: sub // 4 == super). Super 0: an empty sub-cluster
# and a singleton; super 1: one non-empty sub-cluster; super 2: empty; super 3: all four non-empty.
SUB_SIZES = np.array([5, 0, 2, 1, 0, 0, 7, 0, 0, 0, 0, 0, 3, 4, 1, 6])
K, M = 16, 4


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """8 shards x 12 images (2 ranks x 2 workers, batches of 4: every count divides)."""
    return make_shards(tmp_path_factory.mktemp("resample"), 8, 12, size=16)


def _labelling(sizes):
    """Sub-cluster id of each image, images of a cluster consecutive."""
    return np.repeat(np.arange(len(sizes)), sizes)


def _original_sampler_draws(sizes, m, draws, rng):
    """Image index of each draw: a super-cluster uniformly among the non-empty ones (the groups of
    GPUs, same batch size each), a non-empty sub-cluster of it uniformly (the sampler's labels are
    the unique labels present), an image of that sub-cluster uniformly (with replacement)."""
    sub = _labelling(sizes)
    members = {c: np.flatnonzero(sub == c) for c in np.unique(sub)}
    labels_of = {}
    for c in members:
        labels_of.setdefault(c // (len(sizes) // m), []).append(c)
    supers = sorted(labels_of)
    s = np.array(supers)[rng.integers(0, len(supers), draws)]
    out = np.empty(draws, dtype=np.int64)
    for value in supers:
        where = np.flatnonzero(s == value)
        labels = np.array(labels_of[value])[rng.integers(0, len(labels_of[value]), len(where))]
        out[where] = [members[c][rng.integers(0, len(members[c]))] for c in labels]
    return out


def test_expected_counts_match_the_original_sampler():
    sub = _labelling(SUB_SIZES)
    n = len(sub)
    expected = expected_counts(sub, SUB_SIZES, M)
    assert expected.sum() == pytest.approx(n)  # an epoch of N draws
    draws = 200_000
    observed = np.bincount(_original_sampler_draws(SUB_SIZES, M, draws, np.random.default_rng(0)), minlength=n)
    chi2 = scipy_stats.chisquare(observed, expected / n * draws)
    assert chi2.pvalue > 1e-3, (observed / draws * n, expected)
    # worked by hand: 3 non-empty supers; the singleton of super 0 (3 non-empty subs) gets N / 9
    assert expected[sub == 3][0] == pytest.approx(n / 9)
    assert expected[sub == 6] == pytest.approx(n / (3 * 1 * 7))  # super 1: its one sub-cluster


def test_draw_count_is_stochastic_rounding():
    for expected in (0.0, 0.3, 1.0, 2.75, 11.5):
        counts = np.array([draw_count(expected, 0, epoch, "key", 0) for epoch in range(4000)])
        assert set(counts) <= {math.floor(expected), math.ceil(expected)}
        assert counts.mean() == pytest.approx(expected, abs=0.03)
    assert draw_count(2.5, 0, 3, "a", 1) == draw_count(2.5, 0, 3, "a", 1)  # a pure function
    draws = {draw_count(0.5, 0, 0, "a", p) for p in range(40)}
    assert draws == {0, 1}  # a new pass redraws


def _loader(fx, counts, epoch=0, rank=0, world=1, workers=0, skip=0, transform=None, buffer=10):
    return ShardLoader(fx.root, rank, world, BATCH, workers, transform, seed=3, epoch=epoch, shuffle=True,
                       equal_steps=True, skip_batches=skip, shuffle_buffer=buffer, repeat_counts=counts)


def _keys(loader):
    return [k for _, keys, _ in loader for k in keys]


def test_integral_counts_are_exact_when_they_fill_the_epoch(fx):
    # one pass of 2 x half the keys = the rank's 96 samples: no refill, no cut
    counts = {key: 2.0 * (i % 2) for i, key in enumerate(fx.keys)}
    loader = _loader(fx, counts)
    got = _keys(loader)
    assert len(got) == len(loader) * BATCH == 96
    assert {key: got.count(key) for key in set(got)} == {key: 2 for key, c in counts.items() if c}
    assert loader.stats["repeated"] == 48 and loader.stats["dropped"] == 48 and loader.stats["refilled"] == 0


def test_mean_count_over_epochs_approaches_the_expected_count(fx):
    rng = np.random.default_rng(1)
    values = rng.choice([0.25, 0.5, 1.0, 1.5, 2.25], len(fx.keys))
    values *= len(fx.keys) / values.sum()  # a pass gives the epoch's samples in expectation
    counts = dict(zip(fx.keys, values.tolist()))
    epochs = 150
    totals = dict.fromkeys(fx.keys, 0)
    for epoch in range(epochs):
        for key in _keys(_loader(fx, counts, epoch=epoch, buffer=0)):
            totals[key] += 1
    mean = np.array([totals[key] / epochs for key in fx.keys])
    # per epoch: floor/ceil of e (var <= 1/4), then the cut/refill of a few samples at the end
    assert np.abs(mean - values).max() < 0.25, np.c_[values, mean]
    assert np.corrcoef(mean, values)[0, 1] > 0.97


def test_copies_get_their_own_augmentation(fx):
    counts = {key: 3.0 if i == 0 else 0.0 for i, key in enumerate(fx.keys)}  # one image, 3 copies a pass
    loader = ShardLoader(fx.root, 0, 1, 3, 0, train_transform(12, 0.3), seed=0, epoch=0, shuffle=True,
                         equal_steps=True, shuffle_buffer=0, repeat_counts=counts)
    images, keys, _ = next(iter(loader))
    assert set(keys) == {fx.keys[0]}
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_tail_of_the_epoch(fx, workers):
    rng = np.random.default_rng(2)
    counts = dict(zip(fx.keys, rng.choice([0.2, 0.7, 1.3, 2.6], len(fx.keys)).tolist()))
    transform = train_transform(12, 0.5)
    full = _loader(fx, counts, epoch=4, workers=workers, transform=transform)
    batches = list(full)
    assert len(batches) == len(full) == 24
    for skip in (1, 7, len(batches) - 1):
        tail = list(_loader(fx, counts, epoch=4, workers=workers, skip=skip, transform=transform))
        assert [keys for _, keys, _ in tail] == [keys for _, keys, _ in batches[skip:]]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, batches[skip:]))  # augmentations too


def test_extraction_never_resamples(fx):
    with pytest.raises(ValueError, match="training loaders"):
        ShardLoader(fx.root, 0, 1, BATCH, 0, equal_steps=False, repeat_counts={})


def test_keys_without_a_count_are_dropped_and_a_pass_of_none_fails(fx):
    counts = {key: 1.0 for key in fx.keys[:48]}  # half the rank's keys
    loader = _loader(fx, counts)
    got = _keys(loader)
    assert len(got) == 96 and set(got) <= set(counts) and loader.stats["unlabelled"] >= 48
    with pytest.raises(RuntimeError, match="has a cluster label"):
        _keys(_loader(fx, {"nobody": 1.0}))


def _rank_epoch(rank, world, root, keys, shard_of):
    """Rank-local table from global sizes (as rounds.Run builds it), one resampled epoch."""
    manifest = load_manifest(root)
    mine = {s.name for s in assign_shards(manifest, rank, world, 2)}
    rng = np.random.default_rng(5)
    # skewed labels (the first 60 images in 3 big clusters, the rest spread over 13): the ranks'
    # expected totals differ, one rank's workers run out and refill, the other's are cut
    sub = np.where(np.arange(len(keys)) < 60, rng.integers(0, 3, len(keys)), rng.integers(3, K, len(keys)))
    sizes = np.bincount(sub, minlength=K)
    local = np.array([manifest.shards[shard_of[k]].name in mine for k in keys])
    table = LabelTable(np.array(keys)[local], sub[local] // (K // M), sub[local], None, sizes, K, M, "resample")
    loader = ShardLoader(root, rank, world, BATCH, 2, None, seed=0, epoch=1, shuffle=True, equal_steps=True,
                         shuffle_buffer=10, repeat_counts=table.repeat_counts)
    batches = sum(1 for _ in loader)
    return batches, len(loader), sum(table.repeat_counts.values()), reduce_stats(loader.stats)


def test_every_rank_takes_the_same_steps(fx):
    results = run_ranks(_rank_epoch, 2, args=(str(fx.root), fx.keys, fx.shard_of), daemon=False)
    steps = steps_per_epoch(fx.manifest, 2, BATCH, 2)
    assert [r[0] for r in results] == [r[1] for r in results] == [steps, steps]
    low, high = sorted(r[2] for r in results)
    assert low < 48 < high  # expected draws per rank vs its 48 images: refilled on one, cut on the other
    assert results[0][3] == results[1][3] and results[0][3]["repeated"] > 0 and results[0][3]["dropped"] > 0


def test_config_accepts_resample_and_weights_are_one():
    assert load_config(None, ["train.balance=resample"]).train.balance == "resample"
    with pytest.raises(ConfigError, match="train.balance"):
        load_config(None, ["train.balance=uniform"])
    keys = np.array(["a", "b", "c", "d"])
    sub = np.array([0, 1, 2, 2])
    table = LabelTable(keys, sub // 2, sub, np.array([2, 2]), np.array([1, 1, 2, 0]), 4, 2, "resample")
    t = make_targets(torch.zeros(4, 3, 4, 4), list(keys), table, 4, False, torch.Generator().manual_seed(0))
    assert (t.super_weight == 1).all() and (t.sub_weight == 1).all()
    # N = 4, 2 non-empty supers; super 0: 2 singletons -> 4 / (2 * 2 * 1) = 1; super 1: one cluster of 2
    assert table.repeat_counts == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    assert LabelTable(keys, sub // 2, sub, None, np.array([1, 1, 2, 0]), 4, 2, "weight").repeat_counts is None
    assert LabelTable.rotnet().repeat_counts is None and LabelTable.supervised(10).repeat_counts is None
