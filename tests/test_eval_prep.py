"""The evaluation's feature preparation (dist_cluster/evaluation/prep.py) against sklearn, fitted on
the train split alone: `center` is StandardScaler(with_std=False); `whiten` gives the cosines of
PCA(whiten=True) (all components: sign and order of the components do not change a cosine), which
is what kNN and k-means see after the L2 normalisation.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_eval_prep.py
"""
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from dist_cluster.evaluation import prep
from dist_cluster.evaluation.metrics import knn_top1


def _data(offset=5.0):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) * np.linspace(3, 0.1, 16)  # anisotropic
    train = rng.standard_normal((2000, 16)) @ mix + offset
    test = rng.standard_normal((300, 16)) @ mix + offset
    return train.astype(np.float32), test.astype(np.float32)


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_center_is_the_train_mean_removed():
    train, test = _data()
    scaler = StandardScaler(with_std=False).fit(train)
    got_train, got_test = prep.prepare(train, test, "center")
    np.testing.assert_allclose(got_test, scaler.transform(test), atol=1e-4)
    np.testing.assert_allclose(got_train, scaler.transform(train), atol=1e-4)


def test_whiten_gives_the_cosines_of_sklearn_pca_whitening():
    train, test = _data()
    pca = PCA(whiten=True).fit(train.astype(np.float64))
    got_train, got_test = prep.prepare(train, test, "whiten")
    np.testing.assert_allclose(_cosines(got_test, got_train), _cosines(pca.transform(test), pca.transform(train)),
                               atol=1e-4)
    assert abs(np.cov(got_train.T) - np.eye(16)).max() < 1e-3  # white on train


def test_raw_is_untouched_and_unknown_preps_are_refused():
    train, test = _data()
    got_train, got_test = prep.prepare(train, test, "raw")
    assert np.array_equal(got_train, train) and np.array_equal(got_test, test)
    with pytest.raises(ValueError, match="center"):
        prep.fit(train, "standardise")


def test_an_offset_dominates_raw_cosines_not_centred_ones():
    """Why the protocol changed: under a common offset (BatchNorm statistics of another dataset) the
    cosine no longer sees the offset's direction; where the classes differ along it, the raw kNN falls
    towards chance. Centring removes any common offset exactly."""
    rng = np.random.default_rng(1)
    along = np.ones(32) / np.sqrt(32)
    labels = rng.integers(0, 5, 3000)
    x = (np.outer(3.0 * labels, along) + rng.standard_normal((3000, 32)) * 0.5).astype(np.float32)
    train, test, y_train, y_test = x[:2500], x[2500:], labels[:2500], labels[2500:]

    def knn(a, b, how):
        prepared_train, prepared_test = prep.prepare(a, b, how)
        return knn_top1(prepared_train, y_train, prepared_test, y_test)
    shifted = (train + 40.0 * along, test + 40.0 * along)
    assert knn(*shifted, "center") == pytest.approx(knn(train, test, "center"), abs=1e-9)
    assert knn(*shifted, "raw") < knn(*shifted, "center") - 0.1

