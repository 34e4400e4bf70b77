"""What one clustering of a round costs per rank, by cluster.method: (bytes a rank sends, seconds).

    lloyd_cost(p, rates, n, k, d, group, bw)     # kmeans | sinkhorn: niter Lloyd iterations of one level
    pic_costs(p, rates, n, d, bw)                # pic: (k-NN graph, power iterations), flat over all ranks

`p` is a plan.planner.PlanInputs (niter, method, sinkhorn_iters, images, gpus, pic_knn, pic_iters);
the rates are plan/costs.Rates. Estimates, like the rest of the planner.
"""
from __future__ import annotations

from dist_cluster.cluster.kmeans import message_elements

# Host seconds per stored edge (about 2 x knn per row) and power iteration: the gather of the
# neighbours' v and the bincount of w * v (cluster/pic.power_iterations), numpy on one core: 8e-9
# measured on one rank, 400k rows, k-NN 10, 8M stored edges (2026-12-04, this 2-core VM), rounded up.
PIC_EDGE_S = 1.0e-8


def ring(nbytes: float, group: int) -> float:
    """Bytes one rank sends in a ring all_reduce of `nbytes` over `group` ranks."""
    return 2 * (group - 1) / group * nbytes if group > 1 else 0.0


def lloyd_cost(p, r, n: int, k: int, d: int, group: int, bw: float, vote: int = 0) -> tuple[float, float]:
    """The niter iterations of one clustering of n rows over `group` ranks: the E-step pass and the
    M-step all_reduce (+ the preemption vote at level 1); sinkhorn adds sinkhorn_iters passes and two
    all_reduces of k numbers per iteration (cluster/sinkhorn.py), its passes costed at the E-step's
    rate per point x centroid x dimension (an approximation)."""
    sinkhorn = p.method == "sinkhorn"
    messages = [message_elements(k, d, True, vote)] + ([k] * 2 * p.sinkhorn_iters if sinkhorn else [])
    passes = 1 + (p.sinkhorn_iters if sinkhorn else 0)
    net = p.niter * sum(ring(e * 8, group) for e in messages)
    return net, p.niter * passes * n * k * d * r.kmeans_s_pcd.value + net / bw


def pic_costs(p, r, n: int, d: int, bw: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """cluster.method=pic (cluster/pic.py) on the fullest rank's n rows: ((bytes, s) of the k-NN graph,
    (bytes, s) of the power iterations and basins).
    Graph: the brute-force search compares each local row with every row of every rank, costed at the
    E-step's rate per point x centroid x dimension; the ring passes every rank's rows (float32 + id)
    round once; the reverse edges (two int64 ids and a float64 weight) go to their owners.
    Power: each iteration fetches one float64 per distinct neighbour on another rank (at most 2 x knn
    per row) and runs a pass over the stored edges; basins take about as many fetches again."""
    edges = 2 * n * p.pic_knn
    remote = (p.gpus - 1) / p.gpus if p.gpus > 1 else 0.0
    graph_net = (p.gpus - 1) * n * (4 * d + 8) + 24 * n * p.pic_knn * remote
    graph_s = n * p.images * d * r.kmeans_s_pcd.value + graph_net / bw
    power_net = 2 * p.pic_iters * edges * 8 * remote  # ids once, then values; the basins about as much again
    power_s = p.pic_iters * edges * PIC_EDGE_S + power_net / bw
    return (graph_net, graph_s), (power_net, power_s)
