"""Frozen-feature probes: a multinomial logistic regression (linear probe) and k-means on features.

    probe = fit_linear_probe(train_x, train_y, num_classes, l2=1e-4)
    top1 = probe.accuracy(test_x, test_y)
    result = linear_probe_top1(train_x, train_y, test_x, test_y, num_classes, l2s=(1e-5, 1e-4, 1e-3))
    clusters = kmeans_labels(test_x, k=10, seed=0)

The linear probe standardises every feature with the train mean / std, then minimises
mean cross-entropy + l2 / 2 * ||W||^2 (bias not penalised) by full-batch L-BFGS from zero: a convex
problem with a unique optimum, so the result is deterministic and needs no learning rate. This is
sklearn's LogisticRegression(C) with l2 = 1 / (C * n_train); it runs on the GPU when there is one.
At the default l2 = 1e-4 on Fashion-MNIST features every probe stops at the 300-iteration cap, short
of the optimum, so the iteration cap is part of the protocol. L-BFGS after whitening the features
(the same objective) reached a lower objective in the same 300 iterations but was no faster and moved
top-1 by up to 0.0019 (measured 2026-11-30, bench/probe_solvers.py in commit 3402947); not kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _tensor(x, device, dtype) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=dtype)


@dataclass
class LinearProbe:
    mean: torch.Tensor  # [D] train mean
    std: torch.Tensor  # [D] train std (1 where a feature is constant)
    weight: torch.Tensor  # [C, D] on standardised features
    bias: torch.Tensor  # [C]
    iterations: int
    loss: float

    @torch.no_grad()
    def predict(self, x, chunk: int = 8192) -> np.ndarray:
        dev, dtype = self.weight.device, self.weight.dtype
        out = []
        for start in range(0, len(x), chunk):
            xs = (_tensor(x[start:start + chunk], dev, dtype) - self.mean) / self.std
            out.append((xs @ self.weight.T + self.bias).argmax(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def accuracy(self, x, labels) -> float:
        return float((self.predict(x) == np.asarray(labels)).mean())


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the columns; constant columns (dead units) get std 1 instead of a division by 0."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def fit_linear_probe(train_x, train_y, num_classes: int, l2: float = 1e-4, max_iter: int = 300,
                     device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                     on_eval: Optional[Callable[[], None]] = None) -> LinearProbe:
    """Multinomial logistic regression on standardised features by full-batch L-BFGS (module doc).

    on_eval: called after every function evaluation (the evaluation's progress bars)."""
    device = device or torch.device("cpu")
    x = _tensor(train_x, device, dtype)
    y = _tensor(train_y, device, torch.long)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"linear probe: features {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"linear probe: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    mean, std = standardizer(x)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective():
        return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        if on_eval is not None:
            on_eval()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    iterations = int(opt.state[weight].get("n_iter", 0))  # LBFGS keeps its state under the first param
    return LinearProbe(mean, std, weight.detach(), bias.detach(), iterations, final)


def _holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def select_l2(train_x, train_y, num_classes: int, l2s: Sequence[float], seed: int = 0,
              val_fraction: float = 0.1, **fit_kwargs) -> tuple[float, dict]:
    """The l2 with the best accuracy on a seeded hold-out of the train split (never the test split)."""
    fit_idx, val_idx = _holdout_split(len(train_y), val_fraction, seed)
    train_y = np.asarray(train_y)
    scores = {}
    for l2 in l2s:
        probe = fit_linear_probe(train_x[fit_idx], train_y[fit_idx], num_classes, l2=l2, **fit_kwargs)
        scores[float(l2)] = probe.accuracy(train_x[val_idx], train_y[val_idx])
    best = max(scores, key=lambda v: (scores[v], v))  # ties: the stronger regularisation
    return best, scores


def linear_probe_top1(train_x, train_y, test_x, test_y, num_classes: int, l2s: Sequence[float] = (1e-4,),
                      seed: int = 0, **fit_kwargs) -> dict:
    """{top1, l2, val (per l2, when several), iterations}: l2 chosen on a hold-out, refit on all of train."""
    l2s = list(l2s)
    val = {}
    l2 = float(l2s[0])
    if len(l2s) > 1:
        l2, val = select_l2(train_x, train_y, num_classes, l2s, seed=seed, **fit_kwargs)
    probe = fit_linear_probe(train_x, train_y, num_classes, l2=l2, **fit_kwargs)
    return {"top1": probe.accuracy(test_x, test_y), "l2": l2, "val": val, "iterations": probe.iterations}


# ---------------------------------------------------------------- k-means on features


def kmeans_labels(x, k: int, seed: int = 0, n_init: int = 5, niter: int = 50) -> np.ndarray:
    """Cluster ids of the L2-normalised rows of x: faiss k-means, best of n_init seeded restarts."""
    import faiss

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"k-means with k={k} needs at least k rows, got features of shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=n_init, seed=seed, verbose=False,
                      max_points_per_centroid=1 << 30)  # all points: no silent subsampling
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.ravel().astype(np.int64)
