"""Evaluation metrics as pure functions on arrays: weighted kNN, NMI, AMI, Hungarian accuracy.

    pred = knn_predict(train_x, train_y, test_x, k=20, temperature=0.07)   # DINO / InstDisc protocol
    top1(pred, test_y), nmi(test_y, clusters), ami(test_y, clusters), hungarian_accuracy(test_y, clusters)

NMI and AMI follow sklearn's definitions (arithmetic normalisation, natural log, the same limit
cases), computed here from the contingency table so the tests can check them against sklearn.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln


def top1(pred, labels) -> float:
    """Fraction of predictions equal to the labels."""
    pred, labels = np.asarray(pred).ravel(), np.asarray(labels).ravel()
    if pred.shape != labels.shape or len(labels) == 0:
        raise ValueError(f"top1 needs two non-empty arrays of the same length, got {pred.shape}, {labels.shape}")
    return float((pred == labels).mean())


# ---------------------------------------------------------------- weighted kNN


def _as_tensor(x, device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return x.to(device)


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, k: int = 20, temperature: float = 0.07,
                num_classes: Optional[int] = None, chunk: int = 1024,
                device: Optional[torch.device] = None) -> np.ndarray:
    """Class of every test row by a weighted vote of its k nearest train rows (cosine similarity).

    Rows are L2-normalised; neighbour j votes for its class with weight exp(sim_j / temperature).
    Test rows go through in chunks of `chunk`, so memory is chunk x n_train, never n_test x n_train.
    """
    device = device or torch.device("cpu")
    train = F.normalize(_as_tensor(train_feats, device).float(), dim=1)
    labels = _as_tensor(train_labels, device).long()
    test = F.normalize(_as_tensor(test_feats, device).float(), dim=1)
    if train.shape[0] != labels.shape[0] or train.shape[1] != test.shape[1]:
        raise ValueError(f"knn: train {tuple(train.shape)}, labels {tuple(labels.shape)}, test {tuple(test.shape)}")
    if labels.numel() == 0 or labels.min() < 0:
        raise ValueError("knn needs a non-empty train set with labels >= 0")
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        out.append(votes.argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def knn_top1(train_feats, train_labels, test_feats, test_labels, **kwargs) -> float:
    return top1(knn_predict(train_feats, train_labels, test_feats, **kwargs), test_labels)


# ---------------------------------------------------------------- information-theoretic scores


def contingency(labels_a, labels_b) -> np.ndarray:
    """[distinct a, distinct b] table of pair counts (float64); label values are arbitrary."""
    a, b = np.asarray(labels_a).ravel(), np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings of different lengths: {a.shape} vs {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max(initial=-1) + 1, ib.max(initial=-1) + 1))
    np.add.at(table, (ia, ib), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_info(table: np.ndarray) -> float:
    n = table.sum()
    rows, cols = table.sum(1, keepdims=True), table.sum(0, keepdims=True)
    nz = table > 0
    mi = (table[nz] / n * np.log(n * table[nz] / (rows @ cols)[nz])).sum()
    return max(float(mi), 0.0)  # rounding can give -1e-17 for independent labelings


def _trivial(table: np.ndarray) -> bool:
    """Both labelings put everything in one cluster (or there is no data): a perfect match."""
    return table.shape[0] == table.shape[1] and table.shape[0] <= 1


def nmi(labels_true, labels_pred) -> float:
    """I(a; b) / mean(H(a), H(b)): sklearn's normalized_mutual_info_score (arithmetic)."""
    table = contingency(labels_true, labels_pred)
    if _trivial(table):
        return 1.0
    mi = _mutual_info(table)
    if mi == 0.0:
        return 0.0
    return mi / ((_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2)


def expected_mutual_info(table: np.ndarray) -> float:
    """E[I] over labelings with the same cluster sizes (hypergeometric model, Vinh et al. 2010)."""
    n = int(table.sum())
    rows, cols = table.sum(1).astype(np.int64), table.sum(0).astype(np.int64)
    # log of a!b!(N-a)!(N-b)!/N! once per (row, col); the n_ij-dependent factorials per term
    log_n_fact = gammaln(n + 1)
    emi = 0.0
    for a in rows:
        for b in cols:
            nij = np.arange(max(1, a + b - n), min(a, b) + 1, dtype=np.float64)
            if nij.size == 0:
                continue
            log_p = (gammaln(a + 1) + gammaln(b + 1) + gammaln(n - a + 1) + gammaln(n - b + 1) - log_n_fact
                     - gammaln(nij + 1) - gammaln(a - nij + 1) - gammaln(b - nij + 1) - gammaln(n - a - b + nij + 1))
            emi += float((nij / n * np.log(n * nij / (a * b)) * np.exp(log_p)).sum())
    return emi


def ami(labels_true, labels_pred) -> float:
    """(I - E[I]) / (mean(H(a), H(b)) - E[I]): sklearn's adjusted_mutual_info_score (arithmetic)."""
    table = contingency(labels_true, labels_pred)
    if _trivial(table):
        return 1.0
    mi, emi = _mutual_info(table), expected_mutual_info(table)
    denominator = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2 - emi
    eps = np.finfo(np.float64).eps  # same guard as sklearn against a zero denominator
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return float((mi - emi) / denominator)


def hungarian_accuracy(labels_true, labels_pred) -> float:
    """Accuracy of the best one-to-one map from clusters to classes (linear_sum_assignment).

    With more clusters than classes the unmatched clusters count as wrong (no many-to-one map).
    """
    table = contingency(labels_pred, labels_true)
    if table.size == 0:
        raise ValueError("hungarian_accuracy needs non-empty labelings")
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def clustering_scores(labels_true, labels_pred, suffix: str = "") -> dict:
    """{nmi, ami, hungarian_acc}{suffix} of one clustering against the labels."""
    return {f"nmi{suffix}": nmi(labels_true, labels_pred), f"ami{suffix}": ami(labels_true, labels_pred),
            f"hungarian_acc{suffix}": hungarian_accuracy(labels_true, labels_pred)}
