"""What one clustering of a round costs per rank, by cluster.method: (bytes a rank sends, seconds).

    lloyd_cost(p, rates, n, k, d, group, bw)     # kmeans | sinkhorn: niter Lloyd iterations of one level
    pic_costs(p, rates, n, d, bw)                # pic: (k-NN graph, power iterations), flat over all ranks

`p` is a plan.planner.PlanInputs (niter, method, sinkhorn_iters, images, gpus, pic_knn, pic_iters);
the rates are plan/costs.Rates. Estimates, like the rest of the planner.
"""
from __future__ import annotations

import math

from dist_cluster.cluster.kmeans import message_elements
from dist_cluster.cluster.knn_ivf import QUANTIZER_ITERS

# Host seconds per stored edge (about 2 x knn per row) and power iteration: the gather of the
# neighbours' v and the bincount of w * v (cluster/pic.power_iterations), numpy on one core: 8e-9
# measured on one rank, 400k rows, k-NN 10, 8M stored edges (2026-12-04, this 2-core VM), rounded up.
PIC_EDGE_S = 1.0e-8
# Seconds of one cell's step of the IVF search beyond its distances (cluster/knn_ivf.CellStore.search:
# a gather of the cell's queries, a float64 block, a top-k): 47-62 us timed alone by bench/pic_knn.py
# on one CPU thread (2026-12-06, this 2-core VM, under load), rounded up. On a GPU each step launches
# about ten kernels: not measured.
PIC_CELL_STEP_S = 7.0e-5


def ring(nbytes: float, group: int) -> float:
    """Bytes one rank sends in a ring all_reduce of `nbytes` over `group` ranks."""
    return 2 * (group - 1) / group * nbytes if group > 1 else 0.0


def lloyd_cost(p, r, n: int, k: int, d: int, group: int, bw: float, vote: int = 0,
               method: str = "") -> tuple[float, float]:
    """The niter iterations of one clustering of n rows over `group` ranks by `method` (default:
    p.method): the E-step pass and the M-step all_reduce (+ the preemption vote at level 1); sinkhorn
    adds sinkhorn_iters passes and two all_reduces of k numbers per iteration (cluster/sinkhorn.py), its
    passes costed at the E-step's rate per point x centroid x dimension (an approximation)."""
    sinkhorn = (method or p.method) == "sinkhorn"
    messages = [message_elements(k, d, True, vote)] + ([k] * 2 * p.sinkhorn_iters if sinkhorn else [])
    passes = 1 + (p.sinkhorn_iters if sinkhorn else 0)
    net = p.niter * sum(ring(e * 8, group) for e in messages)
    return net, p.niter * passes * n * k * d * r.kmeans_s_pcd.value + net / bw


def pic_search_seconds(p, r, n: int, d: int) -> float:
    """Compute seconds of the k-NN search on the fullest rank's n rows. Exact: every local row against
    all N rows. IVF (pic_nlist > 0, cluster/knn_ivf.py): the quantizer's Lloyd iterations and the
    probes (n x nlist each), each row against the rows of its nprobe cells (N / nlist each on
    average: cells of uneven sizes cost more), and one Python step per (query chunk, probe slot,
    cell of this rank); all at the E-step's rate per point x centroid x dimension (the IVF blocks
    run in float64: slower on GPUs, an approximation)."""
    if not p.pic_nlist:
        return n * p.images * d * r.kmeans_s_pcd.value
    chunk_rows = max(1, (p.route_chunk_mb << 20) // (4 * d))
    steps = math.ceil(n / chunk_rows) * p.pic_nprobe * min(math.ceil(p.pic_nlist / p.gpus), chunk_rows)
    pcd = (QUANTIZER_ITERS + 1) * n * p.pic_nlist * d + n * p.pic_nprobe * (p.images / p.pic_nlist) * d
    return pcd * r.kmeans_s_pcd.value + steps * PIC_CELL_STEP_S


def pic_search_bytes(p, n: int, d: int) -> float:
    """Bytes a rank sends for the k-NN search. Exact: every rank's rows (float32 + id) round the ring
    once. IVF: its rows to their cells' ranks once, each row to the rank of each of its nprobe cells
    (float32, id, cell) and the answers back (knn float64 distances + int64 ids), the quantizer's
    M-step all_reduces."""
    remote = (p.gpus - 1) / p.gpus if p.gpus > 1 else 0.0
    if not p.pic_nlist:
        return (p.gpus - 1) * n * (4 * d + 8)
    routed = (1 + p.pic_nprobe) * n * (4 * d + 16) + p.pic_nprobe * n * p.pic_knn * 16
    return routed * remote + QUANTIZER_ITERS * ring(message_elements(p.pic_nlist, d, True) * 8, p.gpus)


def pic_costs(p, r, n: int, d: int, bw: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """cluster.method=pic (cluster/pic.py) on the fullest rank's n rows: ((bytes, s) of the k-NN graph,
    (bytes, s) of the power iterations and basins).
    Graph: the search (pic_search_seconds, pic_search_bytes: exact, or the inverted file); the
    reverse edges (two int64 ids and a float64 weight) go to their owners.
    Power: each iteration fetches one float64 per distinct neighbour on another rank (at most 2 x knn
    per row) and runs a pass over the stored edges; basins take about as many fetches again."""
    edges = 2 * n * p.pic_knn
    remote = (p.gpus - 1) / p.gpus if p.gpus > 1 else 0.0
    graph_net = pic_search_bytes(p, n, d) + 24 * n * p.pic_knn * remote
    graph_s = pic_search_seconds(p, r, n, d) + graph_net / bw
    power_net = 2 * p.pic_iters * edges * 8 * remote  # ids once, then values; the basins about as much again
    power_s = p.pic_iters * edges * PIC_EDGE_S + power_net / bw
    return (graph_net, graph_s), (power_net, power_s)
