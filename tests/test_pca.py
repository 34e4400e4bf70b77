"""PCA-whitening: distributed fit == numpy on the concatenated data; bit-identical on every rank.

    python -m pytest -q tests/test_pca.py
"""
import numpy as np
import pytest
import torch

from dist_cluster.cluster.pca import fit_pca
from tests.dist_utils import run_ranks

CPU = torch.device("cpu")

D, DIM, EPS = 12, 5, 1e-5


def make_features(n=240, d=D, seed=0):
    """Correlated features with distinct variances (so eigenvectors are unique up to sign) and an offset."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, d)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * scales @ mix + 5.0).astype(np.float32)


def numpy_pca(x, dim, eps):
    """Reference: mean, projection = top eigenvectors / sqrt(floored eigenvalues)."""
    x = x.astype(np.float64)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    values, vectors = values[::-1], vectors[:, ::-1]
    floor = eps * values[0]
    return x.mean(0), vectors[:, :dim] / np.sqrt(np.maximum(values[:dim], floor)), values[:dim]


def assert_same_up_to_sign(proj, ref, tol=1e-6):
    signs = np.sign((proj * ref).sum(0))
    np.testing.assert_allclose(proj * signs, ref, rtol=tol, atol=tol)


def whiten_reference(x, mean, proj):
    y = (x.astype(np.float64) - mean) @ proj
    return y / np.linalg.norm(y, axis=1, keepdims=True)


# ---------------------------------------------------------------- one process


def test_single_process_matches_numpy_and_whitens():
    x = make_features()
    pca = fit_pca(torch.from_numpy(x), DIM, EPS, CPU)
    mean, proj, values = numpy_pca(x, DIM, EPS)
    np.testing.assert_allclose(pca.mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(pca.eigenvalues.numpy(), values, rtol=1e-8)
    assert_same_up_to_sign(pca.projection.numpy(), proj)
    # whitened (before normalisation): covariance = identity on the kept components
    centred = (x.astype(np.float64) - pca.mean.numpy()) @ pca.projection.numpy()
    np.testing.assert_allclose(np.cov(centred, rowvar=False), np.eye(DIM), atol=1e-8)
    y = pca.apply(torch.from_numpy(x), CPU).numpy()
    assert y.dtype == np.float32 and y.shape == (len(x), DIM)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    ref = whiten_reference(x, mean, proj)
    signs = np.sign((pca.projection.numpy() * proj).sum(0))
    np.testing.assert_allclose(y * signs, ref, atol=1e-5)


def test_dim_equal_to_d_and_reconstruction():
    x = make_features(n=100)
    pca = fit_pca(torch.from_numpy(x), D, EPS, CPU)
    white = (x.astype(np.float64) - pca.mean.numpy()) @ pca.projection.numpy()
    back = white @ np.linalg.pinv(pca.projection.numpy()) + pca.mean.numpy()  # full rank: lossless
    np.testing.assert_allclose(back, x, atol=1e-4)


def test_memmap_input_and_output_match_tensor(tmp_path):
    x = make_features(n=300)
    src = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    src[:] = x
    pca_t = fit_pca(torch.from_numpy(x), DIM, EPS, CPU)
    pca_m = fit_pca(src, DIM, EPS, CPU, chunk_rows=64)  # several chunks
    np.testing.assert_allclose(pca_m.projection.numpy(), pca_t.projection.numpy(), rtol=1e-9, atol=1e-12)
    out = np.memmap(tmp_path / "y.f32", dtype=np.float32, mode="w+", shape=(len(x), DIM))
    got = pca_m.apply(src, CPU, out=out, chunk_rows=70)
    assert got is out
    np.testing.assert_allclose(np.asarray(out), pca_t.apply(torch.from_numpy(x), CPU).numpy(), atol=1e-5)


def test_eigenvalue_floor_on_rank_deficient_data():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 3)) @ rng.standard_normal((3, 8))).astype(np.float32)  # rank 3 in 8 dims
    pca = fit_pca(torch.from_numpy(x), 6, 1e-3, CPU)
    assert pca.n_floored == 3
    y = pca.apply(torch.from_numpy(x), CPU)
    assert torch.isfinite(y).all() and pca.explained_variance == pytest.approx(1.0, abs=1e-6)


def test_constant_features_give_zero_rows_not_nan():
    pca = fit_pca(torch.ones(10, 4), 2, 1e-5, CPU)
    y = pca.apply(torch.ones(3, 4), CPU)
    assert torch.isfinite(y).all()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"dim=13 .*D=12"):
        fit_pca(torch.zeros(10, D), 13, EPS, CPU)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_pca(torch.zeros(1, D), 3, EPS, CPU)
    pca = fit_pca(torch.from_numpy(make_features(n=20)), 3, EPS, CPU)
    with pytest.raises(ValueError, match="12-dim"):
        pca.apply(torch.zeros(4, 7), CPU)


# ---------------------------------------------------------------- two ranks


def _fit_on_ranks(rank, world, x, splits):
    """Fit on this rank's slice for each split; return everything the parent compares."""
    out = []
    for split in splits:
        lo, hi = split[rank], split[rank + 1]
        pca = fit_pca(torch.from_numpy(x[lo:hi]), DIM, EPS, CPU)
        out.append(dict(mean=pca.mean.numpy(), proj=pca.projection.numpy(), count=pca.count,
                        y=pca.apply(torch.from_numpy(x[lo:hi]), CPU).numpy()))
    return out


@pytest.fixture(scope="module")
def two_rank_fits():
    x = make_features()
    splits = [(0, 150, 240), (0, 240, 240)]  # uneven shards, then rank 1 with no rows at all
    return x, run_ranks(_fit_on_ranks, 2, args=(x, splits))


def test_two_ranks_equal_numpy_on_concatenation(two_rank_fits):
    x, results = two_rank_fits
    mean, proj, _ = numpy_pca(x, DIM, EPS)
    for per_rank in results:
        for fit in per_rank:
            assert fit["count"] == len(x)
            np.testing.assert_allclose(fit["mean"], mean, rtol=1e-10)
            assert_same_up_to_sign(fit["proj"], proj)
    # whitened rows of each shard, put back together, equal the one-process whitening
    y = np.concatenate([results[0][0]["y"], results[1][0]["y"]])
    signs = np.sign((results[0][0]["proj"] * proj).sum(0))
    np.testing.assert_allclose(y * signs, whiten_reference(x, mean, proj), atol=1e-5)


def test_two_ranks_bit_identical_and_empty_rank(two_rank_fits):
    _, results = two_rank_fits
    for split in range(2):
        assert np.array_equal(results[0][split]["proj"], results[1][split]["proj"])
        assert np.array_equal(results[0][split]["mean"], results[1][split]["mean"])
    assert results[1][1]["y"].shape == (0, DIM)  # the rank without rows still took part
    np.testing.assert_allclose(results[0][1]["proj"], results[0][0]["proj"], rtol=1e-8, atol=1e-10)
