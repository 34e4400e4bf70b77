"""PIC's approximate k-NN search (cluster/knn_ivf.py) on 1 to 3 gloo ranks with uneven rows and the
ring's pieces cut small, against references written from the inverted file's definition (Jegou et
al. 2011): all cells probed is the exact search (numpy, float64, ties to the smaller id); fewer cells
probed is what faiss's own IndexIVFFlat finds with the same coarse centroids.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_knn_ivf.py
"""
import math

import numpy as np
import pytest
import torch

from tests.dist_utils import run_ranks
from tests.test_pic import ALPHA, ITERS, KNN, SIGMA, SPLITS, _rows, reference_pic

NLIST = 12


def _mine(x, rank, world):
    bounds = np.concatenate([[0], np.cumsum(SPLITS[world])])
    return torch.from_numpy(x[bounds[rank]:bounds[rank + 1]])


def _ivf_on_ranks(rank, world, x, nprobe):
    from dist_cluster.cluster.kmeans import kmeans
    from dist_cluster.cluster.knn_ivf import QUANTIZER_ITERS, ivf_knn_search
    from dist_cluster.cluster.pic import row_offsets
    mine = _mine(x, rank, world)
    ids, d2, info = ivf_knn_search(mine, KNN, row_offsets(len(mine)), torch.device("cpu"), NLIST, nprobe, seed=3,
                                   block_bytes=16 * 8 * 4)
    # the same call the search makes: the coarse centroids the faiss reference is given
    centroids = kmeans(mine, NLIST, QUANTIZER_ITERS, 3, torch.device("cpu")).centroids.numpy()
    return ids, d2, info, centroids


def _exact(x):
    d2 = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :KNN]
    return nn, np.take_along_axis(d2, nn, 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_probing_every_cell_is_the_exact_search(world):
    x, _ = _rows()
    results = run_ranks(_ivf_on_ranks, world, args=(x, NLIST))
    want_ids, want_d2 = _exact(x)
    assert np.array_equal(np.concatenate([r[0] for r in results]), want_ids)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), want_d2, rtol=1e-5, atol=1e-6)
    assert results[0][2]["share_of_exact"] == pytest.approx(1.0, abs=1e-3)  # every pair but the diagonal


def _faiss_ivf(x, centroids, nprobe):
    import faiss
    quantizer = faiss.IndexFlatL2(x.shape[1])
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], len(centroids))
    index.is_trained = True  # the cells are the given centroids: nothing to train
    index.add(x)
    index.nprobe = nprobe
    _, ids = index.search(x, KNN + 1)
    return np.array([[j for j in row if j != i][:KNN] for i, row in enumerate(ids)])


@pytest.mark.parametrize("world", [2, 3])
def test_probing_a_few_cells_finds_what_faiss_ivf_finds(world):
    x, _ = _rows()
    nprobe = 3
    results = run_ranks(_ivf_on_ranks, world, args=(x, nprobe))
    got = np.concatenate([r[0] for r in results])
    centroids = results[0][3]
    assert all(np.array_equal(r[3], centroids) for r in results)
    want = _faiss_ivf(x, centroids, nprobe)
    # faiss ranks in float32 and may put a border row in the other of two near-equidistant cells
    agree = np.mean([len(set(a) & set(b)) / KNN for a, b in zip(got, want)])
    assert agree > 0.99, agree
    recall = np.mean([len(set(a) & set(b)) / KNN for a, b in zip(got, _exact(x)[0])])
    assert 0.7 < recall < 1.0, recall  # approximate, and not the exact search by accident
    assert 0 < results[0][2]["share_of_exact"] < 0.6


def _pic_ivf_on_ranks(rank, world, x):
    from dist_cluster.cluster.pic import pic
    res = pic(_mine(x, rank, world), KNN, SIGMA, ALPHA, ITERS, block_bytes=16 * 8 * 4, nlist=NLIST, nprobe=NLIST)
    return res.labels_local.numpy(), res.search_info


def test_pic_through_the_index_probing_every_cell_is_the_dense_reference():
    x, _ = _rows()
    want, _ = reference_pic(x, KNN, SIGMA, ALPHA, ITERS)
    results = run_ranks(_pic_ivf_on_ranks, 2, args=(x,))
    assert np.array_equal(np.concatenate([r[0] for r in results]), want)
    assert results[0][1]["cell_rows_min"] >= 1


def test_more_probes_than_cells_is_refused():
    from dist_cluster.cluster.knn_ivf import ivf_knn_search
    with pytest.raises(ValueError, match="pic_nprobe"):
        ivf_knn_search(torch.randn(50, 4), 3, np.array([0, 50]), torch.device("cpu"), nlist=4, nprobe=5)


def test_ivf_cost_and_memory_by_hand():
    """The planner's IVF search (plan/methods.py): the quantizer's Lloyd iterations and probes, each
    row against its nprobe cells, one step per (chunk, slot, cell of the rank); rows to their cells'
    ranks once, to their probed cells' ranks nprobe times, the answers back; the memory items of
    cluster/knn_ivf.ivf_memory instead of the exact search's distance blocks."""
    from dist_cluster.cluster.knn_ivf import QUANTIZER_ITERS
    from dist_cluster.cluster.kmeans import message_elements
    from dist_cluster.plan.costs import arch_cost, default_rates
    from dist_cluster.plan.memory import MemoryInputs, stage_memory
    from dist_cluster.plan.methods import PIC_CELL_STEP_S, pic_costs, ring
    from tests.test_plan import small_inputs
    n, d, nlist, nprobe = 1000, 8, 40, 4
    p = small_inputs(method="pic", m=1, k=16, pic_nlist=nlist, pic_nprobe=nprobe)
    rates = default_rates(arch_cost(p.arch, p.image_size, p.sobel, p.feature_dim), 8, p.workers)
    (g_net, g_s), _ = pic_costs(p, rates, n, d, 1e9)
    remote = (p.gpus - 1) / p.gpus
    search_net = ((1 + nprobe) * n * (4 * d + 16) + nprobe * n * p.pic_knn * 16) * remote + \
        QUANTIZER_ITERS * ring(message_elements(nlist, d, True) * 8, p.gpus)
    assert g_net == pytest.approx(search_net + 24 * n * p.pic_knn * remote)
    pcd = (QUANTIZER_ITERS + 1) * n * nlist * d + n * nprobe * (p.images / nlist) * d
    steps = 1 * nprobe * math.ceil(nlist / p.gpus)  # one chunk of queries here
    assert g_s == pytest.approx(pcd * rates.kmeans_s_pcd.value + steps * PIC_CELL_STEP_S + g_net / 1e9)
    exact = pic_costs(small_inputs(method="pic", m=1, k=16), rates, n, d, 1e9)[0][1]
    assert g_s > exact  # at 1000 rows the cells' steps and the quantizer cost more than they save
    big = dict(images=96_000_000, gpus=64, method="pic", m=1, k=16)
    n_big, at_scale = 96_000_000 // 64, small_inputs(**big, pic_nlist=40000, pic_nprobe=16)
    assert pic_costs(small_inputs(**big), rates, n_big, 256, 1e10)[0][1] > \
        50 * pic_costs(at_scale, rates, n_big, 256, 1e10)[0][1]  # the paper's scale: ~200x fewer distances

    from dist_cluster.cluster.pic import pic_memory
    ivf, brute = (pic_memory(n, 10, d, n, "cpu", 1 << 20, nl, nprobe, "torch")["search"] for nl in (nlist, 0))
    assert "distance blocks" in brute and "distance blocks" not in ivf
    assert ivf["probes"] == ("host", 8 * n * nprobe)
    assert ivf["rows of this rank's cells"] == ("host", n * (4 * d + 16))
    level1 = stage_memory(MemoryInputs(rows=n, world=2, feature_dim=16, pca_dim=d, k=8, m=1, device="cpu",
                                       backend="torch", memmap_gb=1.0, key_chars=5, route_chunk_bytes=1 << 20,
                                       method="pic", pic_knn=10, pic_nlist=nlist, pic_nprobe=nprobe))["level1"]
    assert level1.host >= sum(b for _, b in ivf.values())  # the planner's stage holds the search's items
    with pytest.raises(ValueError, match="nprobe"):
        small_inputs(method="pic", m=1, k=16, pic_nlist=4, pic_nprobe=5)


def test_pic_knn_bench_quick(tmp_path):
    from bench import pic_knn
    rows = pic_knn.main(["--quick", "--out", str(tmp_path / "pic_knn.json")])["rows"]
    exact, ivf = rows
    assert exact["recall_at_10"] == 1.0 and exact["nmi_vs_exact_partition"] == 1.0
    assert ivf["share_of_exact"] < 0.1 and 0.5 < ivf["recall_at_10"] < 1.0
    assert ivf["clusters"] > 1 and ivf["nmi_vs_classes"] > 0.3


def test_a_crowded_cell_is_searched_in_bounded_blocks(monkeypatch):
    """CellStore.search splits a cell's queries so no block passes BLOCK_ELEMENTS: same answer as one block."""
    from dist_cluster.cluster import knn_ivf
    gen = torch.Generator().manual_seed(0)
    rows, queries = torch.randn(200, 6, generator=gen), torch.randn(90, 6, generator=gen)
    cells = torch.randint(0, 3, (200,), generator=gen)
    store = knn_ivf.CellStore(rows, torch.arange(200), cells, 3, torch.device("cpu"))
    asked = torch.randint(0, 3, (90,), generator=gen)
    whole = store.search(queries, torch.arange(90) + 200, asked, KNN)
    monkeypatch.setattr(knn_ivf, "BLOCK_ELEMENTS", 150)  # 1-2 queries per block
    split = store.search(queries, torch.arange(90) + 200, asked, KNN)
    assert torch.equal(whole[1], split[1]) and whole[2:] == split[2:]
    torch.testing.assert_close(whole[0], split[0], rtol=1e-12, atol=1e-12)  # the block shape moves the last bit
    d2 = ((queries[:, None].double() - rows[None].double()) ** 2).sum(-1)
    d2[asked[:, None] != cells[None]] = math.inf
    want = torch.argsort(d2, dim=1, stable=True)[:, :KNN]
    assert torch.equal(torch.sort(whole[1], 1).values, torch.sort(want, 1).values)
