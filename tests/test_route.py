"""ROUTE / RETURN with bounded buffers (dist_cluster/cluster/route.py), on 3 gloo ranks: every row
lands once in its super-cluster's owner's buffer, ordered by super-cluster, whatever the round
size; labels come back in each rank's own row order; no round moves more than its budget.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_route.py
"""
import numpy as np
import torch

from dist_cluster.runtime import comm, distributed
from tests.dist_utils import run_ranks

M, SIZES = 4, (11, 0, 17)  # rank 1 has no rows


def _route(rank, world, chunk_rows):
    from dist_cluster.cluster.route import RoutePlan
    n = SIZES[rank]
    gen = np.random.default_rng(rank)
    super_local = torch.from_numpy(gen.integers(0, M, n))
    rows = torch.stack([torch.full((n,), float(rank)), torch.arange(n, dtype=torch.float32)], 1)  # (rank, i)
    owners = distributed.ownership(M, world)
    plan = RoutePlan(super_local, owners, M)
    sent = []
    real = comm.all_to_all_rows_known

    def recording(rows_, send_counts, recv_counts, group=None, out_device=None):
        sent.append((sum(send_counts), sum(recv_counts)))
        return real(rows_, send_counts, recv_counts, group, out_device)
    comm.all_to_all_rows_known = recording
    try:
        buf = plan.send_rows(rows, torch.device("cpu"), chunk_bytes=chunk_rows * 8)
    finally:
        comm.all_to_all_rows_known = real
    # label = a function of the row's identity, computed where the row landed
    labels = plan.return_labels((buf[:, 0] * 1000 + buf[:, 1]).long())
    return dict(super=super_local.numpy(), buf=buf.numpy(), bounds=plan.bounds, labels=labels.numpy(),
                owned=[s for s, o in enumerate(owners) if rank in o], rounds=sent)


def test_rows_land_once_sorted_by_super_and_labels_come_back():
    for chunk_rows in (1, 4, 10_000):  # one row per round and pair ... everything in one round
        results = run_ranks(_route, 3, (chunk_rows,))
        landed = set()
        for rank, r in enumerate(results):
            for s in range(M):
                lo, hi = r["bounds"][s], r["bounds"][s + 1]
                assert hi == lo or s in r["owned"]  # only owners receive a super-cluster's rows
                for src, i in r["buf"][lo:hi].astype(int):
                    assert results[src]["super"][i] == s  # the slice of s holds rows of s only
                    landed.add((src, i))
            expected = rank * 1000 + np.arange(SIZES[rank])
            np.testing.assert_array_equal(r["labels"], expected)  # every row's label, in order
            # a round sends and receives at most the budget (or one row per peer when it is smaller)
            assert r["rounds"] and all(out <= max(chunk_rows, 3) and back <= max(chunk_rows, 3)
                                       for out, back in r["rounds"])
        assert landed == {(src, i) for src in range(3) for i in range(SIZES[src])}
