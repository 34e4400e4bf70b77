"""PIC's k-NN graph, exact against the inverted file (cluster/knn_ivf.py): time, recall, and the partition PIC reads.

    python bench/pic_knn.py                        # 60k Fashion-MNIST rows, 64-d, 2 ranks: exact, nprobe 4/16/64
    python bench/pic_knn.py --n 20000 --nprobe 8   # (a minute)
    python bench/pic_knn.py --quick                # 3000 rows: seconds (the tests run it)

The rows are what a round clusters: Fashion-MNIST train images (pixels, the real data this project
has; a trained trunk's features are not kept between sessions), PCA-whitened to --dim and
L2-normalised, split evenly over --world gloo ranks. Each variant runs cluster/pic.pic (k-NN 10,
the config's sigma, alpha and iterations) on the ranks: the exact search, then the inverted file of
--nlist cells (default 4 sqrt(N)) probed in each --nprobe of them. Columns: the graph's seconds
(quantizer + search), the share of the exact search's distances computed, cells searched (one
Python step each: the per-cell overhead), recall@10 against the exact neighbours, PIC's cluster
count and the NMI of its partition with the exact graph's partition and with the classes; and the
seconds of one cell's step beyond its distances (the planner's PIC_CELL_STEP_S), timed alone.
Writes bench/results/pic_knn.json (machine, date, commit, load average, every number).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranks import run_ranks  # noqa: E402
from bench.record import write_record  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pic_knn.json"


def whitened_rows(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n x dim float32 PCA-whitened, L2-normalised Fashion-MNIST train pixels, their classes)."""
    from shards.sources import FMNIST_DIR, read_idx
    pixels = read_idx(Path(FMNIST_DIR) / "train-images-idx3-ubyte.gz", 3)[:n].reshape(n, -1).astype(np.float64)
    labels = read_idx(Path(FMNIST_DIR) / "train-labels-idx1-ubyte.gz", 1)[:n].astype(np.int64)
    centred = pixels - pixels.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred / n)
    top = np.argsort(values)[::-1][:dim]
    x = centred @ vectors[:, top] / np.sqrt(values[top] + 1e-5)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _rank(rank: int, world: int, port: int, x: np.ndarray, nlist: int, nprobe: int) -> dict:
    import torch
    import torch.distributed as dist

    from dist_cluster.cluster.pic import pic
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bounds = np.linspace(0, len(x), world + 1).astype(int)
        start = time.perf_counter()
        res = pic(torch.from_numpy(x[bounds[rank]:bounds[rank + 1]]), knn=10, nlist=nlist, nprobe=nprobe)
        return {"labels": res.labels_local.numpy(), "knn": res.knn_ids, "clusters": res.num_clusters,
                "seconds": {**res.seconds, "total": time.perf_counter() - start}, "search": res.search_info}
    finally:
        dist.destroy_process_group()


def run_variant(x: np.ndarray, world: int, nlist: int, nprobe: int) -> dict:
    from dist_cluster.runtime.distributed import free_port
    ranks = run_ranks(_rank, world, (world, free_port(), x, nlist, nprobe))
    return {"nlist": nlist, "nprobe": nprobe, "labels": np.concatenate([r["labels"] for r in ranks]),
            "knn": np.concatenate([r["knn"] for r in ranks]), "clusters": ranks[0]["clusters"],
            "graph_s": max(r["seconds"]["graph"] for r in ranks), "power_s": max(r["seconds"]["power"] for r in ranks),
            "search": ranks[0]["search"]}


def cell_step_seconds(cells: int = 3000, d: int = 64) -> float:
    """Seconds of one cell's step of CellStore.search beyond its distances: `cells` cells of one row,
    each asked by one query (one process, one thread): the gather, the float64 block, the top-k."""
    import torch

    from dist_cluster.cluster.knn_ivf import CellStore
    torch.set_num_threads(1)
    ids = torch.arange(cells)
    store = CellStore(torch.randn(cells, d), ids, ids.clone(), cells, torch.device("cpu"))
    queries, query_ids = torch.randn(cells, d), ids + cells
    store.search(queries[:10], query_ids[:10], ids[:10], 10)  # warm-up
    start = time.perf_counter()
    store.search(queries, query_ids, ids.clone(), 10)
    return (time.perf_counter() - start) / cells


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--nlist", type=int, default=0, help="IVF cells (0: 4 sqrt(N))")
    parser.add_argument("--nprobe", default="4,16,64")
    parser.add_argument("--quick", action="store_true", help="3000 rows, nprobe 4")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.nprobe = 3000, "4"
    from sklearn.metrics import normalized_mutual_info_score as nmi
    x, classes = whitened_rows(args.n, args.dim)
    nlist = args.nlist or int(4 * math.sqrt(args.n))
    variants = [run_variant(x, args.world, 0, 0)] + [run_variant(x, args.world, nlist, int(p))
                                                     for p in args.nprobe.split(",")]
    exact = variants[0]
    rows = []
    for v in variants:
        rows.append({"search": "exact" if not v["nlist"] else f"IVF {v['nlist']} cells, nprobe {v['nprobe']}",
                     "nlist": v["nlist"], "nprobe": v["nprobe"], "graph_s": round(v["graph_s"], 2),
                     "power_s": round(v["power_s"], 2), "graph_vs_exact": round(v["graph_s"] / exact["graph_s"], 4),
                     "share_of_exact": round(v["search"]["share_of_exact"], 5),
                     "cells_searched": v["search"].get("cells_searched", 0),
                     "recall_at_10": round(recall(v["knn"], exact["knn"]), 4), "clusters": v["clusters"],
                     "nmi_vs_exact_partition": round(nmi(exact["labels"], v["labels"]), 4),
                     "nmi_vs_classes": round(nmi(classes, v["labels"]), 4)})
    step_s = cell_step_seconds()
    print(f"\nPIC's k-NN graph, {args.n} x {args.dim} whitened Fashion-MNIST rows, {args.world} gloo ranks, k-NN 10\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\none cell's step of the IVF search beyond its distances: {step_s * 1e6:.0f} us "
          "(plan/methods.PIC_CELL_STEP_S)")
    return write_record(args.out, {"settings": vars(args) | {"nlist": nlist}, "rows": rows,
                                   "cell_step_seconds": step_s})


if __name__ == "__main__":
    main()
