"""How the kNN and k-means of the evaluation see the features: prepared with the train split's
statistics only, the same for every method, random init and raw pixels.

    train_x, test_x = prepare(train_feats, test_feats, "center")   # then L2 inside kNN / k-means

    raw     as the trunk returns them (L2-normalised later): the protocol before 2026-12-04, kept for
            comparison. A common offset of the features (BatchNorm statistics of another dataset,
            pre-ReLU biases) then dominates every cosine.
    center  minus the train mean (DINO's kNN on features its loss centres; the default)
    whiten  centred, rotated onto the train covariance's eigenvectors and divided by the square root
            of each eigenvalue (DeepCluster's PCA-whitening, all dimensions kept; eigenvalues below
            `eps` x the largest are raised to it, so dead units add no noise)

The probe standardises with the train statistics itself (probes.py); only kNN and k-means need this.
"""
from __future__ import annotations

import numpy as np

PREPS = ("center", "whiten", "raw")


def fit(train: np.ndarray, prep: str, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], projection [D, D]) of `prep` from the train rows (float64 moments)."""
    if prep not in PREPS:
        raise ValueError(f"feature preparation {prep!r}: one of {PREPS}")
    x = np.asarray(train, dtype=np.float64)
    dim = x.shape[1]
    if prep == "raw" or len(x) == 0:
        return np.zeros(dim), np.eye(dim)
    mean = x.mean(0)
    if prep == "center":
        return mean, np.eye(dim)
    centred = x - mean
    cov = centred.T @ centred / max(len(x) - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    floor = max(float(values.max()), 0.0) * eps
    return mean, vectors / np.sqrt(np.maximum(values, floor) + 1e-12)


def apply(x: np.ndarray, mean: np.ndarray, projection: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(x - mean) @ projection as float32, in chunks of rows."""
    x = np.asarray(x)
    out = np.empty((len(x), projection.shape[1]), np.float32)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = (x[start:start + chunk].astype(np.float64) - mean) @ projection
    return out


def prepare(train: np.ndarray, test: np.ndarray, prep: str) -> tuple[np.ndarray, np.ndarray]:
    """Both splits prepared with the statistics of `train` alone."""
    if prep == "raw":
        return np.asarray(train, np.float32), np.asarray(test, np.float32)
    mean, projection = fit(train, prep)
    return apply(train, mean, projection), apply(test, mean, projection)
