"""Exact NMI between two labelings whose pairs are spread over ranks, without a global label table.

    nmi, pairs = distributed_nmi(prev_labels, new_labels)   # collective: every rank, its own pairs

Each rank holds (a_i, b_i) pairs for its own images. The contingency table is sparse and, for
large k, far too big to all_reduce densely, so:
  1. each rank counts its distinct (a, b) pairs (np.unique);
  2. pair counts are hash-partitioned over ranks by all_to_all (owner = code % W), so every
     distinct pair is summed on exactly one rank; nothing N-sized lands on one rank;
  3. marginals (k numbers each: not N-sized) are all_reduced; each rank adds its pairs'
     n_ab log(N n_ab / (n_a n_b)) and one scalar all_reduce gives the mutual information.
Always exact: a sampled estimate over-fits the contingency table at large k (it gave 0.98 for two
independent random labelings at k = 320000), which is where the number matters.
NMI = I(a; b) / ((H(a) + H(b)) / 2), the arithmetic normalisation that is sklearn's default,
including its limit cases (both labelings constant: 1.0; I == 0: 0.0).
"""
from __future__ import annotations

import numpy as np
import torch

from dist_cluster.runtime import comm


def _entropy(counts: np.ndarray, total: float) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _sum_pairs(codes: np.ndarray, counts: np.ndarray, group=None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pair codes and their GLOBAL counts, each code on exactly one rank (its hash owner)."""
    world = comm.group_size(group)
    if world > 1:
        owner = codes % world
        order = np.argsort(owner, kind="stable")
        send_counts = np.bincount(owner, minlength=world).tolist()
        rows = torch.from_numpy(np.stack([codes[order], counts[order]], axis=1).astype(np.int64))
        recv, _ = comm.all_to_all_rows(rows.reshape(-1, 2), send_counts, group)
        codes, counts = recv[:, 0].numpy(), recv[:, 1].numpy()
    uniq, inverse = np.unique(codes, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq))


def distributed_nmi(labels_a, labels_b, group=None) -> tuple[float, int]:
    """(NMI, number of pairs) over all ranks' (labels_a[i], labels_b[i]) pairs."""
    a = np.asarray(labels_a, dtype=np.int64).ravel()
    b = np.asarray(labels_b, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"NMI needs paired labels, got {a.shape} and {b.shape}")
    if len(a) and min(a.min(), b.min()) < 0:
        raise ValueError("NMI labels must be >= 0")
    header = torch.tensor([len(a), a.max(initial=-1) + 1, b.max(initial=-1) + 1], dtype=torch.int64)
    n_total = int(comm.all_reduce(header[:1].clone(), group).item())
    sizes = comm.all_reduce(header[1:].clone(), group, op=comm.MAX).tolist()
    if n_total == 0:
        return 1.0, 0
    ka, kb = max(1, sizes[0]), max(1, sizes[1])
    codes, counts = np.unique(a * kb + b, return_counts=True)
    codes, pair_counts = _sum_pairs(codes, counts.astype(np.int64), group)

    marg = torch.from_numpy(np.concatenate([np.bincount(a, minlength=ka), np.bincount(b, minlength=kb)]))
    marg = comm.all_reduce(marg.to(torch.int64), group).numpy().astype(np.float64)
    count_a, count_b = marg[:ka], marg[ka:]
    n = float(n_total)
    h_a, h_b = _entropy(count_a, n), _entropy(count_b, n)
    if (count_a > 0).sum() == 1 and (count_b > 0).sum() == 1:
        return 1.0, n_total
    local_mi = 0.0
    if len(codes):
        ia, ib = codes // kb, codes % kb
        local_mi = float((pair_counts / n * np.log(n * pair_counts / (count_a[ia] * count_b[ib]))).sum())
    mi = float(comm.all_reduce(torch.tensor([local_mi], dtype=torch.float64), group).item())
    mi = max(mi, 0.0)  # rounding can give -1e-17 for independent labelings
    if mi == 0.0 or h_a + h_b == 0:
        return 0.0, n_total
    return mi / ((h_a + h_b) / 2), n_total
