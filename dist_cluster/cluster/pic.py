"""Power Iteration Clustering (PIC) on a k-nearest-neighbour graph, sharded over the ranks.

    res = pic(x_local, knn=10, sigma=0.2, alpha=0.001, iters=200, device=dev)
    res.labels_local, res.num_clusters, res.sizes

The method (Lin & Cohen, ICML 2010, in the simplified form Douze et al. 2018, "Evaluation of
several clustering algorithms on a large scale image set", found best with k-means on YFCC100M, and
DeepCluster used): on the PCA-whitened, L2-normalised rows,
  GRAPH    each row's `knn` nearest other rows (squared Euclidean distance d; exact, or approximate
           through an inverted file with cluster.pic_nlist > 0: cluster/knn_ivf.py), an edge weight
           exp(-d / sigma^2), made symmetric: W = A + A^T (an edge found both ways counts twice);
  POWER    v = 1/N, then `iters` times v <- alpha W v + (1 - alpha) / N, v <- v / sum(v) (the
           iterations stop early, before v becomes flat: PIC's own stopping);
  BASINS   each row points to the neighbour j maximising W_ij (v_j - v_i) when that is > 0, else to
           itself; rows pointing to themselves are the clusters (numbered in row order), every row
           joins the one its pointers lead to; the number of clusters is not chosen in advance;
  SINGLETONS a cluster of one row joins the cluster of its nearest neighbour (k-NN order) whose
           cluster has more than one row (decided from the sizes before any move), and the cluster
           ids are made contiguous again.
Sharding: rank r holds rows offsets[r]:offsets[r+1] (global ids). The k-NN search passes each rank's
rows around the ring in pieces of at most `block_bytes` (every rank searches its own rows against
every piece: no rank holds more than its rows and one piece); the reverse edges of the symmetric
graph go to their rows' owners by one all_to_all; every value a rank needs of other ranks' rows (v
of its neighbours, pointers, labels) is fetched by id through `Directory` (all_to_all of the ids
once, then of the values): nothing of size N is gathered on any rank.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dist_cluster.cluster.knn_ivf import fold_nearest, ivf_knn_search, ivf_memory, nearest_in_block
from dist_cluster.cluster.rows import num_rows, row_chunks, take_rows
from dist_cluster.runtime import comm

BLOCK_BYTES = 256 << 20  # one piece of rows in flight around the ring (cluster.route_chunk_mb's size)
SEARCH_ELEMENTS = 2 ** 22  # query rows x piece rows of one distance block


@dataclass
class PICResult:
    labels_local: torch.Tensor  # [n_local] int64, cluster ids 0..num_clusters-1
    num_clusters: int
    sizes: torch.Tensor  # [num_clusters] int64, global
    singletons_moved: int
    seconds: dict = field(default_factory=dict)
    knn_ids: np.ndarray = None  # [n_local, knn] global ids of each row's neighbours, nearest first
    search_info: dict = field(default_factory=dict)  # the IVF search's quantizer and cells (knn_ivf.py)


# Host bytes per out-edge (rows x knn) at the peak of symmetric_graph (its sorts and the reverse edges),
# and of power_iterations + basins + move_singletons beyond the graph: measured by bench/pic_memory.py
# (2 gloo ranks x 200k and 400k rows, k-NN = 10: 178-179 and 99, the same at both sizes).
GRAPH_BYTES_PER_EDGE = 180
POWER_BYTES_PER_EDGE = 100


def pic_memory(n: int, knn: int, d: int, rows_max: int, device_type: str,
               block_bytes: int = BLOCK_BYTES, nlist: int = 0, nprobe: int = 16,
               backend: str = "faiss") -> dict[str, dict]:
    """PIC's memory per rank beyond the rows, {phase: {what: (place, bytes)}} for plan/memory.py:
    'search' (knn_search's ring pieces and distance blocks, or with nlist > 0 knn_ivf's items), 'graph',
    'power' (power iterations, basins, singletons) and 'kept' (the k-NN lists and the graph, alive
    from the graph to the labels). n: this rank's rows; rows_max: the fullest rank's."""
    edges = n * knn
    piece = min(max(1, block_bytes // (4 * d)), rows_max)
    chunk = min(n, max(1, SEARCH_ELEMENTS // piece))
    search = {"k-NN lists (float64 distances, ids)": ("host", 16 * edges),
              "ring pieces (sent, received)": ("device", 2 * piece * (4 * d + 8)),
              "piece in float64": ("device", piece * d * 8),
              # the float64 distances, the temporaries of their expression and topk's, two boolean
              # masks (own rows, ties): 4 x 8 + 2 bytes per element, measured by bench/memory.py
              "distance blocks": ("device", chunk * piece * (4 * 8 + 2))}
    if nlist:  # the IVF search: its quantizer, probes, cells and queries in flight instead of the ring
        search = {"k-NN lists (float64 distances, ids)": search["k-NN lists (float64 distances, ids)"],
                  **ivf_memory(n, d, knn, nlist, nprobe, device_type, backend, block_bytes)}
    lists = {"k-NN lists": ("host", 12 * edges)}
    return {"search": search,
            "graph": {**lists, "graph build (sorts, reverse edges)": ("host", GRAPH_BYTES_PER_EDGE * edges)},
            "power": {"power iterations, basins": ("host", POWER_BYTES_PER_EDGE * edges)},
            "kept": {**lists, "graph (CSR, symmetric)": ("host", 8 * n + 32 * edges)}}


def row_offsets(n_local: int, group=None) -> np.ndarray:
    """[W + 1] global id ranges: rank r holds ids offsets[r]:offsets[r + 1]."""
    return np.concatenate([[0], np.cumsum(comm.all_gather_rows_count(n_local, group))]).astype(np.int64)


class Directory:
    """Values of rows held by any rank, fetched by global id: `fetch(request, local)` returns
    local-value arrays of the owners at the ids a `request(ids)` named. Collective."""

    def __init__(self, offsets: np.ndarray, group=None):
        self.offsets, self.group = offsets, group
        self.rank = comm.group_rank(group)

    def request(self, ids: np.ndarray) -> dict:
        unique, inverse = np.unique(ids, return_inverse=True)  # sorted: grouped by owner
        owners = np.searchsorted(self.offsets, unique, side="right") - 1
        send_counts = np.bincount(owners, minlength=len(self.offsets) - 1).tolist()
        asked, recv_counts = comm.all_to_all_rows(torch.from_numpy(unique), send_counts, self.group)
        local = asked.numpy() - self.offsets[self.rank]
        return {"inverse": inverse, "send": send_counts, "recv": recv_counts, "local": local}

    def fetch(self, req: dict, values: np.ndarray) -> np.ndarray:
        answer = torch.from_numpy(np.ascontiguousarray(values[req["local"]]))
        back = comm.all_to_all_rows_known(answer, req["recv"], req["send"], self.group).numpy()
        return back[req["inverse"]]


# ----------------------------------------------------------------------------- the k-NN graph


def knn_search(x_local, knn: int, offsets: np.ndarray, device: torch.device, group=None,
               block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """([n_local, knn] global ids, [n_local, knn] squared distances) of each local row's nearest other
    rows over every rank, nearest first (ties: the smaller id). Collective."""
    world, rank = comm.group_size(group), comm.group_rank(group)
    n, d = num_rows(x_local), int(x_local.shape[1])
    piece_rows = max(1, block_bytes // (4 * d))
    pieces = math.ceil(int(np.diff(offsets).max()) / piece_rows)
    best_d = torch.full((n, knn), math.inf, dtype=torch.float64)
    best_i = torch.full((n, knn), -1, dtype=torch.int64)
    my_ids = torch.arange(offsets[rank], offsets[rank + 1])
    for p in range(pieces):
        lo = min(p * piece_rows, n)
        rows = take_rows(x_local, torch.arange(lo, min(n, lo + piece_rows))).float()
        ids = my_ids[lo:lo + len(rows)]
        for step in range(world):  # the piece of rank (rank + step) % W is here now
            _merge_nearest(x_local, int(offsets[rank]), rows.to(device), ids, best_d, best_i, device)
            if step < world - 1:  # pass it on: to rank - 1, from rank + 1
                send = [len(rows) if r == (rank - 1) % world else 0 for r in range(world)]
                rows, _ = comm.all_to_all_rows(rows, send, group)
                ids, _ = comm.all_to_all_rows(ids, send, group)
    return best_i.numpy(), best_d.float().numpy()


def _merge_nearest(x_local, first_id: int, piece: torch.Tensor, piece_ids: torch.Tensor, best_d, best_i,
                   device) -> None:
    """Fold one piece of rows into every local row's `knn` nearest (in place); local row i is the
    global id first_id + i, the piece's ids ascend. Distances in float64 (near-ties would otherwise
    depend on the rank count); exact ties go to the smaller id."""
    if len(piece) == 0:
        return
    knn, norms, piece64 = best_d.shape[1], (piece.double() ** 2).sum(1), piece.double()
    take = min(knn, len(piece))
    chunk = max(1, SEARCH_ELEMENTS // len(piece))
    for start, queries in row_chunks(x_local, chunk, device):
        q = queries.double()
        dist = ((q ** 2).sum(1, keepdim=True) + norms[None] - 2 * q @ piece64.T).clamp_min(0)
        own = torch.arange(first_id + start, first_id + start + len(q), device=dist.device)
        dist[own[:, None] == piece_ids.to(dist.device)[None]] = math.inf  # a row is not its own neighbour
        near_d, near_at = nearest_in_block(dist, take)
        fold_nearest(best_d, best_i, slice(start, start + len(q)), near_d.cpu(), piece_ids.cpu()[near_at.cpu()])


def symmetric_graph(knn_ids: np.ndarray, knn_d2: np.ndarray, sigma: float, offsets: np.ndarray,
                    group=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W = A + A^T over the local rows as CSR (indptr [n+1], neighbour global ids sorted per row,
    float64 weights): A_ij = exp(-d_ij / sigma^2) for j among i's neighbours; the reverse edges are
    sent to the owners of their rows (one all_to_all). Collective."""
    rank = comm.group_rank(group)
    n, knn = knn_ids.shape
    src = np.repeat(np.arange(n, dtype=np.int64) + offsets[rank], knn)
    dst, weight = knn_ids.reshape(-1), np.exp(-knn_d2.reshape(-1).astype(np.float64) / sigma ** 2)
    order = np.argsort(dst, kind="stable")  # the reverse edge (dst -> src) goes to dst's owner
    owners = np.searchsorted(offsets, dst[order], side="right") - 1
    counts = np.bincount(owners, minlength=len(offsets) - 1).tolist()
    reverse = torch.from_numpy(np.stack([dst[order], src[order]], 1))
    got, _ = comm.all_to_all_rows(reverse, counts, group)
    got_w, _ = comm.all_to_all_rows(torch.from_numpy(weight[order]), counts, group)
    rows = np.concatenate([src, got[:, 0].numpy()]) - offsets[rank]
    cols = np.concatenate([dst, got[:, 1].numpy()])
    weights = np.concatenate([weight, got_w.numpy()])
    order = np.lexsort((cols, rows))  # by row, then neighbour id: duplicates (i, j) side by side
    rows, cols, weights = rows[order], cols[order], weights[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    starts = np.flatnonzero(first)
    weights = np.add.reduceat(weights, starts) if len(starts) else weights[:0]
    rows, cols = rows[starts], cols[starts]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return indptr, cols, weights


# ----------------------------------------------------------------------------- power iterations and basins


def power_iterations(indptr, cols, weights, directory: Directory, n_total: int, alpha: float,
                     iters: int) -> tuple[np.ndarray, dict]:
    """v of the local rows (float64) after `iters` iterations from 1/N, and the neighbours' request
    (reused by `basins`). Collective."""
    req = directory.request(cols)  # the same neighbours every iteration: one id exchange
    row_of_edge = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    v = np.full(len(indptr) - 1, 1.0 / n_total)
    for _ in range(iters):
        wv = np.bincount(row_of_edge, weights=weights * directory.fetch(req, v), minlength=len(v))
        v = alpha * wv + (1 - alpha) / n_total
        v /= float(comm.all_reduce(torch.tensor([v.sum()], dtype=torch.float64), directory.group))
    return v, req


def basins(indptr, cols, weights, v: np.ndarray, req: dict, directory: Directory) -> tuple[np.ndarray, int]:
    """(cluster id of every local row, number of clusters): steepest-ascent pointers followed to the
    local maxima of v, which are numbered in global row order. Collective."""
    first = int(directory.offsets[directory.rank])
    n = len(v)
    row_of_edge = np.repeat(np.arange(n), np.diff(indptr))
    gain = weights * (directory.fetch(req, v) - v[row_of_edge])
    pointer = np.arange(n, dtype=np.int64) + first
    order = np.lexsort((cols, -gain, row_of_edge))  # per row: the largest gain first, ties: the smaller id
    top = order[np.r_[0, np.flatnonzero(np.diff(row_of_edge[order])) + 1]] if len(order) else order
    up = top[gain[top] > 0]
    pointer[row_of_edge[up]] = cols[up]
    while True:  # pointer jumping: every round halves the distance to the roots
        jumped = directory.fetch(directory.request(pointer), pointer)
        moved = int(comm.all_reduce(torch.tensor([int((jumped != pointer).sum())]), directory.group))
        pointer = jumped
        if moved == 0:
            break
    is_root = pointer == np.arange(n) + first
    counts = comm.all_gather_rows_count(int(is_root.sum()), directory.group)
    root_label = np.full(n, -1, dtype=np.int64)
    root_label[is_root] = sum(counts[:directory.rank]) + np.arange(int(is_root.sum()))
    return directory.fetch(directory.request(pointer), root_label), sum(counts)


def move_singletons(labels: np.ndarray, num_clusters: int, knn_ids: np.ndarray,
                    directory: Directory) -> tuple[np.ndarray, int, np.ndarray, int]:
    """A row alone in its cluster joins its nearest neighbour's cluster of more than one row (sizes
    before any move); then ids are made contiguous, in the old order. Returns (labels, clusters,
    global sizes, rows moved). Collective."""
    sizes = comm.all_reduce(torch.from_numpy(np.bincount(labels, minlength=num_clusters)), directory.group).numpy()
    alone = np.flatnonzero(sizes[labels] == 1)
    neighbour_labels = directory.fetch(directory.request(knn_ids[alone].reshape(-1)), labels)
    neighbour_labels = neighbour_labels.reshape(len(alone), knn_ids.shape[1])
    crowded = sizes[neighbour_labels] > 1
    has = crowded.any(axis=1)
    labels = labels.copy()
    labels[alone[has]] = neighbour_labels[has, crowded[has].argmax(axis=1)]  # the nearest such neighbour
    moved = int(comm.all_reduce(torch.tensor([int(has.sum())]), directory.group))
    sizes = comm.all_reduce(torch.from_numpy(np.bincount(labels, minlength=num_clusters)), directory.group).numpy()
    kept = sizes > 0
    new_id = np.cumsum(kept) - 1
    return new_id[labels], int(kept.sum()), sizes[kept], moved


def pic(x_local, knn: int = 10, sigma: float = 0.2, alpha: float = 0.001, iters: int = 200,
        device: torch.device = torch.device("cpu"), group=None, move_single: bool = True,
        block_bytes: int = BLOCK_BYTES, nlist: int = 0, nprobe: int = 16, seed: int = 0,
        backend: str = "auto") -> PICResult:
    """The module doc's PIC over every rank's rows. Collective over `group`. nlist > 0 builds the
    graph from the approximate search (cluster/knn_ivf.py: nlist cells, nprobe probed), else exact."""
    seconds = {}
    offsets = row_offsets(num_rows(x_local), group)
    n_total = int(offsets[-1])
    if not 1 <= knn < n_total:
        raise ValueError(f"PIC's k-NN graph needs 1 <= knn < the {n_total} rows, got knn={knn}")
    directory = Directory(offsets, group)
    start = time.perf_counter()
    if nlist:
        knn_ids, knn_d2, search_info = ivf_knn_search(x_local, knn, offsets, device, nlist, nprobe, seed,
                                                         backend, group, block_bytes)
    else:
        knn_ids, knn_d2 = knn_search(x_local, knn, offsets, device, group, block_bytes)
        search_info = {"share_of_exact": 1.0}
    indptr, cols, weights = symmetric_graph(knn_ids, knn_d2, sigma, offsets, group)
    seconds["graph"] = time.perf_counter() - start
    start = time.perf_counter()
    v, req = power_iterations(indptr, cols, weights, directory, n_total, alpha, iters)
    labels, num_clusters = basins(indptr, cols, weights, v, req, directory)
    seconds["power"] = time.perf_counter() - start
    moved = 0
    if move_single:
        labels, num_clusters, sizes, moved = move_singletons(labels, num_clusters, knn_ids, directory)
    else:
        sizes = comm.all_reduce(torch.from_numpy(np.bincount(labels, minlength=num_clusters)), group).numpy()
    return PICResult(torch.from_numpy(labels), num_clusters, torch.from_numpy(np.asarray(sizes, np.int64)),
                     moved, seconds, knn_ids, search_info)
