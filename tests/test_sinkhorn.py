"""Balanced assignment by Sinkhorn-Knopp (cluster/sinkhorn.py) on 1 to 3 gloo ranks with uneven rows,
against a single-process numpy Sinkhorn-Knopp written from SeLa (Asano et al. 2020, eq. 5: alpha =
r ./ (P beta), beta = c ./ (P^T alpha), r = 1/N, c = 1/K, from beta = 1) on the whole N x K matrix.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_sinkhorn.py
"""
import numpy as np
import pytest
import torch

from tests.dist_utils import run_ranks

SPLITS = [137, 300, 63]  # rows per rank: uneven


def _rows(n=500, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + 2 * rng.standard_normal((6, d))[rng.integers(0, 6, n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _centroids(k=7, d=8, seed=1):
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


def reference_scaling(x, c, epsilon, iters):
    """SeLa's Sinkhorn-Knopp in float64 on the full matrix: (log beta, labels = argmax of Q's rows)."""
    c = c.astype(np.float64)
    unit = c / np.linalg.norm(c, axis=1, keepdims=True)
    scores = x.astype(np.float64) @ unit.T / epsilon
    p = np.exp(scores - scores.max())  # a global constant: absorbed by the scalings
    n, k = p.shape
    beta = np.ones(k)
    for _ in range(iters):
        alpha = (1.0 / n) / (p @ beta)
        beta = (1.0 / k) / (p.T @ alpha)
    q = alpha[:, None] * p * beta[None, :]
    return np.log(beta) - scores.max(), q


def _local(rank, world):
    x = _rows()
    bounds = np.concatenate([[0], np.cumsum(SPLITS[:world] if world > 1 else [len(x)])])
    return x[bounds[rank]:bounds[rank + 1]] if world > 1 else x


def _scaling_on_ranks(rank, world, epsilon, iters):
    from dist_cluster.cluster.sinkhorn import _assign_pass, sinkhorn_scaling
    x = torch.from_numpy(_local(rank, world))
    c = torch.from_numpy(_centroids())
    log_b = sinkhorn_scaling(x, c, epsilon, iters, torch.device("cpu"), chunk_rows=50)
    labels, _ = _assign_pass(x, c, log_b, epsilon, torch.device("cpu"), 50, False)
    return log_b.numpy(), labels.numpy()


@pytest.mark.parametrize("world", [1, 3])
def test_scaling_and_labels_equal_the_single_process_sinkhorn_knopp(world):
    x = _rows()[:sum(SPLITS[:world])] if world > 1 else _rows()
    want_log_b, q = reference_scaling(x, _centroids(), 0.1, 5)
    results = run_ranks(_scaling_on_ranks, world, args=(0.1, 5))
    labels = np.concatenate([r[1] for r in results])
    for log_b, _ in results:  # the same b on every rank, = beta (up to the global constant)
        np.testing.assert_allclose(log_b - log_b.mean(), want_log_b - want_log_b.mean(), atol=1e-9)
    np.testing.assert_array_equal(labels, q.argmax(axis=1))


def test_equipartition_holds_after_enough_iterations():
    """Soft: Q's column sums are 1/K exactly after each column step, its row sums converge to 1/N
    (within 1e-3 relative after 200 iterations); hard: the argmax counts within 5% of N/K here."""
    x, c = _rows(n=2000, seed=3), _centroids(k=5, seed=4)
    _, q = reference_scaling(x, c, 0.05, 200)
    n, k = q.shape
    np.testing.assert_allclose(q.sum(axis=0), 1 / k, rtol=1e-9)
    np.testing.assert_allclose(q.sum(axis=1), 1 / n, rtol=1e-3)
    results = run_ranks(_scaling_on_ranks_big, 2, args=(x, c))
    counts = np.bincount(np.concatenate([r[1] for r in results]), minlength=k)
    assert np.abs(counts - n / k).max() <= 0.05 * n / k, counts
    np.testing.assert_array_equal(np.concatenate([r[1] for r in results]), q.argmax(axis=1))


def _scaling_on_ranks_big(rank, world, x, c):
    from dist_cluster.cluster.sinkhorn import _assign_pass, sinkhorn_scaling
    half = len(x) * 2 // 3
    mine = torch.from_numpy(x[:half] if rank == 0 else x[half:])
    log_b = sinkhorn_scaling(mine, torch.from_numpy(c), 0.05, 200, torch.device("cpu"))
    return log_b.numpy(), _assign_pass(mine, torch.from_numpy(c), log_b, 0.05, torch.device("cpu"), 4096,
                                       False)[0].numpy()


def reference_run(x, init, epsilon, iters, niter):
    """The whole method in numpy: Sinkhorn assignment, then each centroid the mean of its rows."""
    c = init.astype(np.float64).copy()
    for _ in range(niter):
        _, q = reference_scaling(x, c.astype(np.float32), epsilon, iters)
        labels = q.argmax(axis=1)
        for j in range(len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].astype(np.float64).mean(axis=0)
    _, q = reference_scaling(x, c.astype(np.float32), epsilon, iters)
    return c, q.argmax(axis=1)


def _run_on_ranks(rank, world, epsilon, iters, niter):
    from dist_cluster.cluster.sinkhorn import sinkhorn_kmeans
    x = torch.from_numpy(_local(rank, world))
    res = sinkhorn_kmeans(x, 7, niter, 0, torch.device("cpu"), init_centroids=torch.from_numpy(_centroids()),
                          chunk_rows=64, epsilon=epsilon, iters=iters)
    return res.centroids.numpy(), res.assign_local.numpy(), res.sizes.numpy(), res.final_objective


def test_sinkhorn_kmeans_on_3_ranks_equals_the_numpy_method():
    x = _rows()[:sum(SPLITS)]
    want_c, want_labels = reference_run(x, _centroids(), 0.1, 3, 4)
    results = run_ranks(_run_on_ranks, 3, args=(0.1, 3, 4))
    labels = np.concatenate([r[1] for r in results])
    np.testing.assert_array_equal(labels, want_labels)
    for c, _, sizes, objective in results:
        np.testing.assert_allclose(c, want_c, atol=1e-5)
        assert sizes.tolist() == np.bincount(want_labels, minlength=7).tolist()
        assert objective == pytest.approx(((x - want_c[want_labels]) ** 2).sum(), rel=1e-5)


def _hierarchy_on_ranks(rank, world):
    from dist_cluster.cluster.hierarchy import hierarchical_kmeans
    x = torch.from_numpy(_rows(n=1200, seed=5)[rank::world])
    res = hierarchical_kmeans(x, 12, 3, 5, 0, torch.device("cpu"), method="sinkhorn",
                              method_options={"epsilon": 0.05, "iters": 50})
    return res.super_sizes.numpy(), res.sub_sizes.numpy(), res.sub_local.numpy(), res.super_local.numpy()


def test_balanced_at_both_levels_of_the_hierarchy():
    super_sizes, sub_sizes, sub, sup = run_ranks(_hierarchy_on_ranks, 2)[0]
    assert super_sizes.sum() == 1200 and np.abs(super_sizes - 400).max() <= 40, super_sizes
    assert np.abs(sub_sizes - 100).max() <= 30, sub_sizes
    assert np.array_equal(sub // 4, sup)  # sub ids live inside their super-cluster


MIXED = {"sinkhorn-over-kmeans": ("sinkhorn", "kmeans"), "kmeans-over-sinkhorn": ("kmeans", "sinkhorn")}


def _mixed_levels_on_ranks(rank, world):
    """cluster.super_method: level 1 by one method, level 2 by the other; uneven rows per rank."""
    from dist_cluster.cluster.hierarchy import hierarchical_kmeans
    x = _rows(n=480, seed=7)
    mine = torch.from_numpy(x[:300] if rank == 0 else x[300:])
    out = {}
    for name, (super_method, method) in MIXED.items():
        res = hierarchical_kmeans(mine, 12, 3, 4, 2, torch.device("cpu"), init_samples_per_rank=100,
                                  method=method, super_method=super_method,
                                  method_options={"epsilon": 0.05, "iters": 30})
        out[name] = dict(super=res.super_local.numpy(), sub=res.sub_local.numpy(),
                         super_sizes=res.super_sizes.numpy(), level1_init=res.level1.init_centroids.numpy(),
                         level2_init={s: r.init_centroids.numpy() for s, r in res.level2.items()})
    return out


def test_each_level_by_its_own_method_equals_the_single_process_references():
    """Level 1 and level 2 each equal their own single-process reference (SeLa's method above, the
    numpy Lloyd of tests/test_kmeans.py) from the same initial centroids; Sinkhorn's super-clusters
    are equal in size (160 rows each, within 10%), k-means' need not be."""
    from tests.test_kmeans import numpy_lloyd
    x, results = _rows(n=480, seed=7), run_ranks(_mixed_levels_on_ranks, 2)
    for name, (super_method, method) in MIXED.items():
        sup = np.concatenate([r[name]["super"] for r in results])
        sub = np.concatenate([r[name]["sub"] for r in results])
        init1 = results[0][name]["level1_init"]
        want_sup = (reference_run(x, init1, 0.05, 30, 4)[1] if super_method == "sinkhorn"
                    else numpy_lloyd(x, init1, 4, 2)["labels"])
        np.testing.assert_array_equal(sup, want_sup, err_msg=name)
        if super_method == "sinkhorn":
            assert np.abs(np.bincount(sup, minlength=3) - 160).max() <= 16, np.bincount(sup)
        for s in range(3):
            init2 = next(r[name]["level2_init"][s] for r in results if s in r[name]["level2_init"])
            rows = np.flatnonzero(sup == s)
            want = (reference_run(x[rows], init2, 0.05, 30, 4)[1] if method == "sinkhorn"
                    else numpy_lloyd(x[rows], init2, 4, 2 * 1_000_003 + s + 1)["labels"])
            np.testing.assert_array_equal(sub[rows], s * 4 + want, err_msg=f"{name}, super-cluster {s}")


def test_the_config_names_what_does_not_fit():
    from dist_cluster.config import ConfigError, load_config, validate
    for bad, key in ((["cluster.method=spectral"], "cluster.method"),
                     (["cluster.method=sinkhorn", "cluster.sinkhorn_epsilon=0"], "cluster.sinkhorn_epsilon"),
                     (["cluster.super_method=pic"], "cluster.super_method"),
                     (["cluster.method=pic", "cluster.m=1", "cluster.super_method=sinkhorn"],
                      "cluster.super_method")):
        with pytest.raises(ConfigError, match=key):
            validate(load_config("configs/smoke.yaml", bad))


def _round_on_ranks(rank, world, tmp, method, super_method):
    from dist_cluster.cluster.stage import run_clustering
    from dist_cluster.config import ClusterConfig

    class Log:
        def event(self, *args, **kwargs):
            pass
    feats = torch.from_numpy(_rows(n=900, d=16, seed=6)[rank::world] * 3 + 1)  # raw features: PCA first
    keys = [f"k{rank}-{i}" for i in range(len(feats))]
    cfg = ClusterConfig(k=12, m=3, pca_dim=8, niter=4, method=method, super_method=super_method, sinkhorn_iters=30,
                        memmap_dir=str(tmp))
    state = run_clustering(feats, keys, cfg, 0, tmp, Log(), seed=0, device=torch.device("cpu"))
    return state.super_sizes, state.sub_sizes


@pytest.mark.parametrize("method,super_method", [("sinkhorn", ""), ("kmeans", "sinkhorn")])
def test_a_round_clusters_with_cluster_method_sinkhorn(tmp_path, method, super_method):
    """The config keys reach the hierarchy through a round's clustering (PCA-whitening + L2 first)."""
    super_sizes, sub_sizes = run_ranks(_round_on_ranks, 2, args=(tmp_path, method, super_method))[0]
    assert super_sizes.sum() == 900 and np.abs(super_sizes - 300).max() <= 30, super_sizes
    assert (sub_sizes > 0).all() and sub_sizes.sum() == 900
