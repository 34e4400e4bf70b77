"""Power Iteration Clustering (cluster/pic.py) on 1 to 3 gloo ranks with uneven rows and the ring's
pieces cut small, against a dense single-process numpy PIC written from the papers (Lin & Cohen
2010; the simplified form of Douze et al. 2018): the same partition, label for label.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_pic.py
"""
import numpy as np
import pytest
import torch

from tests.dist_utils import run_ranks

SPLITS = {1: [300], 2: [110, 190], 3: [90, 150, 60]}
KNN, SIGMA, ALPHA, ITERS = 5, 0.2, 0.001, 50


def _rows(n=300, d=8, seed=0):
    """L2-normalised rows around 6 directions, like PCA-whitened + L2 features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d)) * 3
    truth = rng.integers(0, 6, n)
    x = centres[truth] + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def reference_pic(x, knn, sigma, alpha, iters, move_single=True):
    """Dense PIC: exact k-NN, W = A + A^T, power iterations, steepest ascent to the local maxima."""
    n = len(x)
    diff = x[:, None, :].astype(np.float64) - x[None, :, :].astype(np.float64)
    d2 = (diff ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :knn]
    a = np.zeros((n, n))
    rows = np.arange(n)[:, None]
    a[rows, nn] = np.exp(-d2[rows, nn] / sigma ** 2)
    w = a + a.T
    v = np.full(n, 1.0 / n)
    for _ in range(iters):
        v = alpha * (w @ v) + (1 - alpha) / n
        v /= v.sum()
    pointer = np.arange(n)
    for i in range(n):
        gain = np.where(w[i] > 0, w[i] * (v - v[i]), 0.0)
        j = int(np.argmax(gain))  # the first maximum: the smaller id
        if gain[j] > 0:
            pointer[i] = j
    root = pointer.copy()
    for i in range(n):
        while root[root[i]] != root[i]:
            root[i] = root[root[i]]
    label_of_root = {r: c for c, r in enumerate(sorted(set(root.tolist())))}
    labels = np.array([label_of_root[r] for r in root])
    if move_single:
        sizes = np.bincount(labels)
        before = labels.copy()
        for i in np.flatnonzero(sizes[before] == 1):
            for j in nn[i]:
                if sizes[before[j]] > 1:
                    labels[i] = before[j]
                    break
        kept = np.flatnonzero(np.bincount(labels, minlength=len(sizes)) > 0)
        labels = np.searchsorted(kept, labels)
    return labels, nn


def _pic_on_ranks(rank, world, move_single):
    from dist_cluster.cluster.pic import pic
    x, _ = _rows()
    bounds = np.concatenate([[0], np.cumsum(SPLITS[world])])
    mine = torch.from_numpy(x[bounds[rank]:bounds[rank + 1]])
    res = pic(mine, KNN, SIGMA, ALPHA, ITERS, move_single=move_single, block_bytes=16 * 8 * 4)
    return res.labels_local.numpy(), res.num_clusters, res.sizes.numpy(), res.knn_ids, res.singletons_moved


@pytest.mark.parametrize("world", [1, 2, 3])
def test_pic_on_ranks_equals_the_dense_reference(world):
    x, truth = _rows()
    want, nn = reference_pic(x, KNN, SIGMA, ALPHA, ITERS)
    results = run_ranks(_pic_on_ranks, world, args=(True,))
    labels = np.concatenate([r[0] for r in results])
    assert np.array_equal(np.concatenate([r[3] for r in results]), nn)  # the k-NN graph
    assert np.array_equal(labels, want)
    for _, num, sizes, _, _ in results:
        assert num == want.max() + 1 and sizes.tolist() == np.bincount(want).tolist()
    from sklearn.metrics import normalized_mutual_info_score
    assert normalized_mutual_info_score(truth, labels) > 0.5  # it finds the blobs' structure


def test_without_the_singleton_step_the_basins_are_the_references():
    x, _ = _rows()
    want, _ = reference_pic(x, KNN, SIGMA, ALPHA, ITERS, move_single=False)
    results = run_ranks(_pic_on_ranks, 2, args=(False,))
    assert np.array_equal(np.concatenate([r[0] for r in results]), want)
    assert results[0][4] == 0


def test_knn_larger_than_the_data_is_refused():
    from dist_cluster.cluster.pic import pic
    with pytest.raises(ValueError, match="knn"):
        pic(torch.randn(5, 3), knn=5)


def _pic_run(rank, world, tmp_path, nlist=0, shards=None):
    from omegaconf import OmegaConf

    from dist_cluster.run.rounds import Run
    from tests.shard_fixtures import make_shards
    from tests.test_rounds import small_run_config
    shards = shards or make_shards(tmp_path / "shards", 2, 96, size=28).root
    cfg = small_run_config("deepercluster", tmp_path / "run", shards, 2)
    OmegaConf.set_readonly(cfg, False)
    cfg.cluster.method, cfg.cluster.m, cfg.cluster.pic_knn, cfg.cluster.pic_iters = "pic", 1, 5, 20
    cfg.cluster.pic_nlist, cfg.cluster.pic_nprobe = nlist, 2
    seen = []

    class Recording(Run):
        def train_round(self, round_idx, table):
            seen.append((round_idx, table.k, self.sub_classes))
            super().train_round(round_idx, table)
    Recording(cfg).run()
    return seen


def test_a_smoke_run_trains_on_pic_clusters(tmp_path):
    """cluster.method=pic through two rounds of a 1-rank run: the heads take the graph's k."""
    seen = run_ranks(_pic_run, 1, args=(tmp_path,))[0]
    assert [r for r, _, _ in seen] == [0, 1] and all(k == sub and k > 1 for _, k, sub in seen), seen


def test_a_two_rank_run_trains_on_pic_clusters_from_the_ivf_graph(tmp_path):
    """cluster.pic_nlist > 0: the graph from the inverted file (cluster/knn_ivf.py), 8 cells, 2 probed."""
    from tests.shard_fixtures import make_shards
    shards = make_shards(tmp_path / "shards", 2, 96, size=28).root  # made once, before the ranks start
    seen = run_ranks(_pic_run, 2, args=(tmp_path, 8, shards))
    assert seen[0] == seen[1] and [r for r, _, _ in seen[0]] == [0, 1]
    assert all(k == sub and k > 1 for _, k, sub in seen[0]), seen


def test_pic_memory_bench_quick(tmp_path):
    """bench/pic_memory.py runs, and its graph and power peaks match pic_memory's to 25% at 50k rows
    per rank (its full run: 0.99 at 200k and 400k)."""
    from bench import pic_memory
    doc = pic_memory.main(["--rows", "50000", "--knn", "10", "--iters", "2", "--out", str(tmp_path / "pic.json")])
    row = doc["rows"][0]
    for phase in ("graph", "power"):
        assert 0.75 < row[phase]["ratio"] < 1.25, (phase, row[phase])


def _knn_on_ranks(rank, world, x):
    from dist_cluster.cluster.pic import knn_search, row_offsets
    bounds = np.concatenate([[0], np.cumsum(SPLITS[world])])
    mine = torch.from_numpy(x[bounds[rank]:bounds[rank + 1]])
    return knn_search(mine, KNN, row_offsets(len(mine)), torch.device("cpu"), block_bytes=16 * 4 * 4)[0]


@pytest.mark.parametrize("world", [1, 3])
def test_knn_ties_go_to_the_smaller_id_on_any_rank_count(world):
    """Rows of small integers: distances are exact and tied everywhere (duplicates too); every rank
    count gives the neighbours a stable sort of the exact distances gives (ties: the smaller id)."""
    x = np.random.default_rng(1).integers(0, 3, (300, 4)).astype(np.float32)
    d2 = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    want = np.argsort(d2, axis=1, kind="stable")[:, :KNN]
    got = np.concatenate(run_ranks(_knn_on_ranks, world, args=(x,)))
    assert np.array_equal(got, want)
