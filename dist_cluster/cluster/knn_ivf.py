"""Approximate k-NN for PIC's graph: an inverted file (IVF) whose cells are spread over the ranks.

    ids, d2, info = ivf_knn_search(x_local, knn=10, offsets=offsets, device=dev, nlist=4096, nprobe=16)

The exact search (pic.knn_search) compares every row with every row, N^2 d: at the paper's 96M images
that is the whole round (docs/scale.md). The inverted file (Jegou, Douze, Schmid 2011; faiss's
IndexIVFFlat, the index Douze et al. 2018 built their k-NN graphs with) compares a row only with
the rows of the few cells around it:
  QUANTIZER  nlist centroids by the distributed k-means (cluster/kmeans.py), identical on every
             rank; a row's cell is its nearest centroid (the k-means assignment);
  CELLS      cell c lives on rank c mod W: every row goes to its cell's rank (all_to_all, in
             chunks of at most `block_bytes`), where the cells' rows are grouped by cell;
  PROBES     a row, as a query, visits the cells of its nprobe nearest centroids: for each probe
             slot and chunk of queries, one all_to_all takes each query to the rank of that cell,
             which compares it, exactly and in float64, with the cell's rows (one block per cell),
             and one all_to_all brings its `knn` nearest back, folded in (ties: the smaller id).
nprobe = nlist is the exact search: the same neighbours in the same order. With nprobe < nlist a
neighbour across a cell border no probe reaches is missed (recall: bench/pic_knn.py), and a row
whose probed cells hold fewer than `knn` other rows keeps what was found: its missing entries point
to itself at distance inf (edge weight 0, which neither the graph nor the singleton step uses).
Cost per query: about nprobe / nlist of the exact search, plus the quantizer's k-means and one
Python step per (chunk, probe slot, cell present).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from dist_cluster.cluster.kmeans import kmeans, lloyd_memory, result_bytes
from dist_cluster.cluster.rows import num_rows, row_chunks, take_rows
from dist_cluster.runtime import comm

BLOCK_ELEMENTS = 2 ** 22  # queries x cell rows of one float64 distance block (a crowded cell is split)
QUANTIZER_ITERS = 10  # Lloyd iterations of the coarse quantizer (faiss trains its IVF quantizers with 10 too)


def ivf_memory(n: int, d: int, knn: int, nlist: int, nprobe: int, device_type: str, backend: str,
               block_bytes: int) -> dict:
    """The inverted file's bytes per rank beyond the k-NN lists: the quantizer's Lloyd iteration
    (kmeans.lloyd_memory) and its result, the probes (int64), the cells' rows this rank holds
    (float32 + id + cell: n rows when the cells balance), and one chunk of queries in flight
    (sent, received, the answers). {what: (place, bytes)}; a cell's distance block is small."""
    quantizer = {f"quantizer: {what}": where for what, where in
                 lloyd_memory(n, nlist, d, device_type, backend, device_type == "cpu").items()}
    chunk = min(n, max(1, block_bytes // (4 * d)))
    return {**quantizer, "quantizer result": ("host", result_bytes(n, nlist, d)),
            "probes": ("host", 8 * n * nprobe), "rows of this rank's cells": ("host", n * (4 * d + 16)),
            # sent and received (rows, id, cell), the answers both ways (float64 distance + int64 id)
            "queries in flight": ("host", 2 * chunk * (4 * d + 16) + 2 * chunk * knn * 16)}


def nearest_cells(x_local, centroids: torch.Tensor, nprobe: int, device: torch.device) -> torch.Tensor:
    """[n, nprobe] int64 (CPU): each row's nprobe nearest centroids, nearest first."""
    c = centroids.to(device)
    norms = (c ** 2).sum(1)
    chunk = max(1, 2 ** 22 // len(c))
    out = [torch.topk(norms[None] - 2 * rows @ c.T, nprobe, dim=1, largest=False).indices.cpu()
           for _, rows in row_chunks(x_local, chunk, device)]
    return torch.cat(out) if out else torch.zeros(0, nprobe, dtype=torch.int64)


def nearest_in_block(dist: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([q, take] distances, [q, take] columns) of each row's `take` smallest, in no order, ties to
    the smaller column: topk (linear in the block), and a stable sort for the rare rows whose largest
    kept value is shared by a column topk left out."""
    near_d, near_at = torch.topk(dist, take, dim=1, largest=False)
    tied = (dist <= near_d.max(1, keepdim=True).values).sum(1) > take
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        order = torch.argsort(dist[rows], dim=1, stable=True)[:, :take]
        near_d[rows], near_at[rows] = dist[rows].gather(1, order), order
    return near_d, near_at


def fold_nearest(best_d: torch.Tensor, best_i: torch.Tensor, rows, new_d: torch.Tensor,
                 new_i: torch.Tensor) -> None:
    """Fold candidates into the kept `knn` nearest of `rows` (in place): order by (distance, id)."""
    knn = best_d.shape[1]
    cand_d, cand_i = torch.cat([best_d[rows], new_d], 1), torch.cat([best_i[rows], new_i], 1)
    order = torch.argsort(cand_i, dim=1, stable=True)  # ties go to the smaller id
    cand_d, cand_i = cand_d.gather(1, order), cand_i.gather(1, order)
    keep = torch.argsort(cand_d, dim=1, stable=True)[:, :knn]
    best_d[rows], best_i[rows] = cand_d.gather(1, keep), cand_i.gather(1, keep)


def _to_owners(tensors: list[torch.Tensor], cells: torch.Tensor, world: int, group):
    """Send row i of every tensor to rank cells[i] mod W; returns (received tensors, the send order,
    send counts, receive counts)."""
    owners = cells % world
    order = torch.argsort(owners, stable=True)
    send = torch.bincount(owners, minlength=world).tolist()
    got, recv = comm.all_to_all_rows(tensors[0][order], send, group)
    rest = [comm.all_to_all_rows_known(t[order], send, recv, group) for t in tensors[1:]]
    return [got, *rest], order, send, recv


class CellStore:
    """The rows of this rank's cells (c mod W == rank), grouped by cell, ids ascending in a cell."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, cells: torch.Tensor, nlist: int, device):
        order = np.lexsort((ids.numpy(), cells.numpy()))
        self.rows, self.ids, self.device = rows[order], ids[order], device  # host float32: blocks go over one by one
        self.indptr = torch.zeros(nlist + 1, dtype=torch.int64)
        self.indptr[1:] = torch.cumsum(torch.bincount(cells, minlength=nlist), 0)

    def search(self, queries: torch.Tensor, query_ids: torch.Tensor, cells: torch.Tensor,
               knn: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """([q, knn] distances, [q, knn] ids; inf / -1 where a cell had fewer rows), distances
        computed, cells searched: each query against its cell's rows, itself excluded."""
        out_d = torch.full((len(queries), knn), math.inf, dtype=torch.float64)
        out_i = torch.full((len(queries), knn), -1, dtype=torch.int64)
        order = torch.argsort(cells, stable=True)
        present, counts = torch.unique_consecutive(cells[order], return_counts=True)
        computed = visits = 0
        for cell, asking in zip(present.tolist(), torch.split(order, counts.tolist())):
            lo, hi = int(self.indptr[cell]), int(self.indptr[cell + 1])
            if hi == lo:
                continue
            p, ids, take = self.rows[lo:hi].to(self.device).double(), self.ids[lo:hi], min(knn, hi - lo)
            norms = (p ** 2).sum(1)
            for at in torch.split(asking, max(1, BLOCK_ELEMENTS // (hi - lo))):  # a crowded cell: bounded blocks
                q = queries[at].to(self.device).double()
                d2 = ((q ** 2).sum(1, keepdim=True) + norms[None] - 2 * q @ p.T).clamp_min(0)
                d2[query_ids[at].to(d2.device)[:, None] == ids.to(d2.device)[None]] = math.inf
                near_d, near_at = nearest_in_block(d2, take)
                out_d[at, :take], out_i[at, :take] = near_d.cpu(), ids[near_at.cpu()]
            computed, visits = computed + len(asking) * (hi - lo), visits + 1
        return out_d, out_i, computed, visits


def _chunks(n: int, chunk_rows: int, group) -> int:
    """Chunks of queries every rank runs (collective: the fullest rank's count)."""
    count = torch.tensor([math.ceil(n / chunk_rows)], dtype=torch.int64)
    return int(comm.all_reduce(count, group, op=dist.ReduceOp.MAX))


def build_cells(x_local, row_cells: torch.Tensor, first_id: int, nlist: int, chunk_rows: int, device,
                group) -> CellStore:
    """Every rank's rows to the ranks of their cells, chunk by chunk. Collective."""
    world, n = comm.group_size(group), num_rows(x_local)
    parts = []
    for c in range(_chunks(n, chunk_rows, group)):
        index = torch.arange(min(n, c * chunk_rows), min(n, (c + 1) * chunk_rows))
        got, *_ = _to_owners([take_rows(x_local, index).cpu(), index + first_id, row_cells[index]],
                             row_cells[index], world, group)
        parts.append(got)
    return CellStore(*[torch.cat([p[i] for p in parts]) for i in range(3)], nlist, device)


def ivf_knn_search(x_local, knn: int, offsets: np.ndarray, device: torch.device, nlist: int, nprobe: int,
                   seed: int = 0, backend: str = "auto", group=None,
                   block_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray, dict]:
    """([n_local, knn] global ids, [n_local, knn] squared distances, info) of each local row's
    nearest other rows found through the inverted file, nearest first; info: the quantizer's
    objective, the cells' sizes, the share of the exact search's distances computed, cells searched
    and rows left short of `knn` neighbours. Collective."""
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"PIC's IVF search needs 1 <= pic_nprobe <= pic_nlist, got nprobe={nprobe}, nlist={nlist}")
    world, rank = comm.group_size(group), comm.group_rank(group)
    n, d = num_rows(x_local), int(x_local.shape[1])
    quant = kmeans(x_local, nlist, QUANTIZER_ITERS, seed, device, backend, group)
    probes = nearest_cells(x_local, quant.centroids, nprobe, device)
    chunk_rows = max(1, block_bytes // (4 * d))
    store = build_cells(x_local, quant.assign_local, int(offsets[rank]), nlist, chunk_rows, device, group)
    best_d = torch.full((n, knn), math.inf, dtype=torch.float64)
    best_i = torch.full((n, knn), -1, dtype=torch.int64)
    counts = np.zeros(2)  # distances computed, cells searched
    for c in range(_chunks(n, chunk_rows, group)):
        index = torch.arange(min(n, c * chunk_rows), min(n, (c + 1) * chunk_rows))
        rows, ids = take_rows(x_local, index).cpu(), index + int(offsets[rank])
        for slot in range(nprobe):
            cells = probes[index, slot]
            (q, q_ids, q_cells), order, send, recv = _to_owners([rows, ids, cells], cells, world, group)
            ans_d, ans_i, computed, visits = store.search(q, q_ids, q_cells, knn)
            counts += (computed, visits)
            back_d = comm.all_to_all_rows_known(ans_d, recv, send, group)
            back_i = comm.all_to_all_rows_known(ans_i, recv, send, group)
            fold_nearest(best_d, best_i, index[order], back_d, back_i)
    short = best_i < 0  # probed cells with fewer than knn other rows: self at distance inf, weight 0
    best_i[short] = (torch.arange(n) + int(offsets[rank]))[:, None].expand(-1, knn)[short]
    totals = comm.all_reduce(torch.tensor([*counts, float(short.any(1).sum())], dtype=torch.float64), group)
    computed, visits, rows_short = totals.tolist()
    sizes, n_total = quant.sizes.numpy(), float(offsets[-1])
    info = {"quantizer_objective": quant.mean_objective, "cell_rows_min": int(sizes.min()),
            "cell_rows_max": int(sizes.max()), "share_of_exact": computed / max(1.0, n_total * n_total),
            "cells_searched": int(visits), "rows_short": int(rows_short)}
    return best_i.numpy(), best_d.float().numpy(), info
