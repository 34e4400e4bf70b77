"""Evaluation metrics and probes against independent references (numpy loops, sklearn, brute force),
and the distributed extraction (2 gloo ranks) against one process. sklearn is imported inside the
tests so that the spawned ranks, which import this module, start faster.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_eval_metrics.py
"""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_cluster.evaluation.features import (
    extract_split,
    gather_rows,
    gather_split,
    pool_side,
    read_labels,
    read_members,
    share_split,
)
from dist_cluster.evaluation.metrics import ami, hungarian_accuracy, knn_predict, nmi, top1
from dist_cluster.evaluation.probes import fit_linear_probe, kmeans_labels, linear_probe_top1
from dist_cluster.models import SmallVGG
from tests.dist_utils import run_ranks
from tests.shard_fixtures import make_shards

# ---------------------------------------------------------------- kNN


def knn_reference(train, train_y, test, k, temperature, num_classes):
    """One test row at a time, in float64: cosine similarities, top k, exp(sim / T) votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for row in test:
        sims = train @ row
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        preds.append(votes.argmax())
    return np.array(preds)


@pytest.mark.parametrize("k,chunk", [(20, 1024), (20, 7), (5, 3), (500, 16)])
def test_knn_matches_reference(k, chunk):
    rng = np.random.default_rng(k + chunk)
    centres = rng.normal(size=(4, 12))
    train_y, test_y = rng.integers(0, 4, 120), rng.integers(0, 4, 45)
    train = centres[train_y] + rng.normal(scale=1.5, size=(120, 12))
    test = centres[test_y] + rng.normal(scale=1.5, size=(45, 12))
    expected = knn_reference(train, train_y, test, min(k, 120), 0.07, 4)
    got = knn_predict(train.astype(np.float32), train_y, test.astype(np.float32), k=k, temperature=0.07, chunk=chunk)
    assert np.array_equal(got, expected)
    assert 0.3 < top1(got, test_y) <= 1.0


def test_knn_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        knn_predict(np.ones((5, 3)), np.zeros(4, dtype=int), np.ones((2, 3)))


# ---------------------------------------------------------------- linear probe


def test_linear_probe_matches_sklearn_logistic_regression():
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    x, y = make_classification(n_samples=400, n_features=20, n_informative=8, n_redundant=4, n_classes=3,
                               class_sep=0.8, random_state=0)
    x[:, 5] = 3.0  # a constant (dead) feature: standardisation must not divide by zero
    x_train, y_train, x_test, y_test = x[:300], y[:300], x[300:], y[300:]
    C = 1.0
    scaler = StandardScaler().fit(x_train)
    ref = LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(scaler.transform(x_train), y_train)
    calls = []
    probe = fit_linear_probe(x_train, y_train, 3, l2=1.0 / (C * len(y_train)), max_iter=1000, dtype=torch.float64,
                             on_eval=lambda: calls.append(1))
    assert len(calls) >= probe.iterations > 5  # the progress callback sees every function evaluation
    # same convex objective: same optimum (sklearn's coef lives on the same standardised features)
    assert np.allclose(probe.weight.numpy() - probe.weight.numpy().mean(0), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
    ref_acc = ref.score(scaler.transform(x_test), y_test)
    assert abs(probe.accuracy(x_test, y_test) - ref_acc) <= 0.01
    assert np.mean(probe.predict(x_test) == ref.predict(scaler.transform(x_test))) >= 0.99
    assert 0.6 < ref_acc <= 1.0  # separable-ish: a real problem, not chance or trivial


def test_l2_selected_on_train_holdout():
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=300, n_features=30, n_informative=5, n_classes=3, random_state=1)
    result = linear_probe_top1(x[:200], y[:200], x[200:], y[200:], 3, l2s=(1e-4, 1e-1, 10.0), seed=0)
    assert set(result["val"]) == {1e-4, 1e-1, 10.0}
    assert result["l2"] == max(result["val"], key=lambda v: (result["val"][v], v))
    probe = fit_linear_probe(x[:200], y[:200], 3, l2=result["l2"])
    assert result["top1"] == probe.accuracy(x[200:], y[200:])


# ---------------------------------------------------------------- clustering scores


def _labelings():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 300)
    yield a, rng.integers(0, 7, 300)  # independent
    yield a, np.where(rng.random(300) < 0.7, a, rng.integers(0, 5, 300))  # correlated
    yield a * 7 + 3, (a + 1) % 5  # a relabelling: arbitrary values
    yield np.zeros(50, int), np.zeros(50, int)  # both constant
    yield np.zeros(50, int), rng.integers(0, 3, 50)  # one constant
    yield rng.integers(0, 40, 60), rng.integers(0, 40, 60)  # many small clusters
    yield np.array([1]), np.array([2])


def test_nmi_and_ami_equal_sklearn():
    from sklearn import metrics as skm
    for a, b in _labelings():
        assert nmi(a, b) == pytest.approx(skm.normalized_mutual_info_score(a, b), abs=1e-10)
        assert ami(a, b) == pytest.approx(skm.adjusted_mutual_info_score(a, b), abs=1e-8)


def test_hungarian_accuracy():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, 200)
    perm = rng.permutation(6)
    assert hungarian_accuracy(labels, perm[labels] + 10) == 1.0
    # noisy clusters: the best of all 4! one-to-one maps, by brute force
    labels = rng.integers(0, 4, 150)
    clusters = np.where(rng.random(150) < 0.6, (labels + 2) % 4, rng.integers(0, 4, 150))
    best = max(np.mean(np.array(p)[clusters] == labels) for p in itertools.permutations(range(4)))
    assert hungarian_accuracy(labels, clusters) == pytest.approx(best)
    # more clusters than classes: unmatched clusters count as wrong
    assert hungarian_accuracy([0, 0, 1, 1], [0, 1, 2, 3]) == 0.5


def test_kmeans_labels_recover_blobs_and_are_seeded():
    from sklearn.datasets import make_blobs
    from sklearn.metrics import normalized_mutual_info_score
    x, y = make_blobs(n_samples=600, centers=5, n_features=16, cluster_std=0.5, random_state=0)
    x = x + 20 * np.sign(x)  # keep the blobs apart in angle too (k-means runs on L2-normalised rows)
    labels = kmeans_labels(x, 5, seed=0)
    assert normalized_mutual_info_score(y, labels) == pytest.approx(1.0)
    assert np.array_equal(labels, kmeans_labels(x, 5, seed=0))


# ---------------------------------------------------------------- features


def test_pool_side():
    assert pool_side(32, 28, 28, 10000) == (17, 17)  # 32 * 17^2 = 9248 <= 10000
    assert pool_side(256, 3, 3, 10000) == (3, 3)  # never upsample
    assert pool_side(20000, 7, 7, 10000) == (1, 1)  # at least global pooling


def test_read_members_and_labels(tmp_path):
    shards = make_shards(tmp_path, num_shards=3, per_shard=5)
    wanted = [shards.keys[1], shards.keys[12]]
    members = read_members(tmp_path, wanted, ("png",))
    assert sorted(members) == sorted(wanted)
    assert read_labels(tmp_path) == shards.labels


def _small_trunk():
    torch.manual_seed(0)
    return SmallVGG(feature_dim=16, sobel=True, widths=(8, "M", 16)).eval()


def _extract_on_ranks(rank, world, root):
    split = extract_split(_small_trunk(), root, SimpleNamespace(resize=28, image_size=28), torch.device("cpu"),
                          rank=rank, world=world, batch_size=8, num_workers=0, layer_dims=300)
    sizes = len(split.labels)
    gathered = gather_split(split)
    ragged = gather_rows(np.arange(rank * 3 + 2, dtype=np.float64)[:, None].repeat(2, 1), dst=0)
    if gathered is None:
        return sizes, None
    return sizes, (gathered.feats, gathered.labels, gathered.keys, gathered.blocks, ragged)


def test_two_rank_extraction_equals_one_process(tmp_path):
    shards = make_shards(tmp_path, num_shards=3, per_shard=[7, 5, 6])
    (n0, got), (n1, none) = run_ranks(_extract_on_ranks, 2, args=(str(tmp_path),))
    assert none is None and n0 + n1 == 18 and min(n0, n1) > 0
    feats, labels, keys, blocks, ragged = got
    ref = extract_split(_small_trunk(), tmp_path, SimpleNamespace(resize=28, image_size=28), torch.device("cpu"),
                        batch_size=5, num_workers=0, layer_dims=300)
    order = np.argsort(ref.keys)
    assert keys.tolist() == sorted(shards.keys)
    assert labels.tolist() == [shards.labels[k] for k in keys]
    assert np.allclose(feats, ref.feats[order], atol=1e-5)
    assert sorted(blocks) == ["conv1", "conv2"] and all(x.shape[1] <= 300 for x in blocks.values())
    assert all(np.allclose(blocks[n], ref.blocks[n][order], atol=1e-5) for n in blocks)
    expected = np.concatenate([np.arange(2.0), np.arange(5.0)])[:, None].repeat(2, 1)
    assert np.array_equal(ragged, expected)


def _share_on_ranks(rank, world, root):
    split = extract_split(_small_trunk(), root, SimpleNamespace(resize=28, image_size=28), torch.device("cpu"),
                          rank=rank, world=world, batch_size=8, num_workers=0, layer_dims=300)
    shared = share_split(split, feats_to=[1], block_to={"conv1": 0, "conv2": 1})
    return shared.feats, shared.labels, shared.keys, shared.blocks


def test_share_split_sends_each_part_only_where_needed(tmp_path):
    """Under torchrun each rank fits its own probes: it gets every row of what they need, nothing else."""
    shards = make_shards(tmp_path, num_shards=3, per_shard=[7, 5, 6])
    ranks = run_ranks(_share_on_ranks, 2, args=(str(tmp_path),))
    ref = extract_split(_small_trunk(), tmp_path, SimpleNamespace(resize=28, image_size=28), torch.device("cpu"),
                        batch_size=5, num_workers=0, layer_dims=300)
    order = np.argsort(ref.keys)
    for feats, labels, keys, blocks in ranks:
        assert keys.tolist() == sorted(shards.keys)
        assert labels.tolist() == [shards.labels[k] for k in keys]
    (feats0, _, _, blocks0), (feats1, _, _, blocks1) = ranks
    assert feats0.shape == (18, 0) and sorted(blocks0) == ["conv1"] and sorted(blocks1) == ["conv2"]
    assert np.allclose(feats1, ref.feats[order], atol=1e-5)
    assert np.allclose(blocks0["conv1"], ref.blocks["conv1"][order], atol=1e-5)
    assert np.allclose(blocks1["conv2"], ref.blocks["conv2"][order], atol=1e-5)


def test_channels_last_extraction_gives_the_same_rows(tmp_path):
    """The evaluation extracts as the run trained (model.channels_last): the same features and blocks."""
    make_shards(tmp_path, num_shards=2, per_shard=6)
    nchw, nhwc = (extract_split(_small_trunk(), tmp_path, SimpleNamespace(resize=28, image_size=28),
                                torch.device("cpu"), batch_size=5, num_workers=0, layer_dims=300, channels_last=cl)
                  for cl in (False, True))
    assert np.array_equal(nchw.keys, nhwc.keys) and np.allclose(nchw.feats, nhwc.feats, atol=1e-5)
    assert all(np.allclose(nchw.blocks[n], nhwc.blocks[n], atol=1e-5) for n in nchw.blocks)
