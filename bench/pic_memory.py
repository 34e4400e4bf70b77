"""Peak host memory of PIC's graph build and power iterations at sizes the k-NN search cannot reach here.

    python bench/pic_memory.py                        # 2 gloo ranks x 200k, 400k rows, k-NN = 10
    python bench/pic_memory.py --rows 50000 --knn 5   # (seconds; the tests run a small one)

bench/memory.py --method pic measures every stage of a PIC round, but its brute-force k-NN search
is quadratic in the rows (20k rows per rank take ~9 min on 2 cores), and below ~150k rows per rank
the search's fixed distance blocks (~270 MB) hide the graph build. This bench skips the search:
each rank draws `knn` random neighbour ids over all ranks' rows (uniform, so the reverse edges
spread over the ranks as a real graph's do) and random distances, then runs what cluster/pic.py
runs after the search: symmetric_graph, then power_iterations + basins, then move_singletons. The
peak resident set (VmHWM, reset at each phase after a gc and malloc_trim, glibc's mmap threshold
at 64 KiB as in bench/memory.py) above the phase's starting RSS is compared with
cluster/pic.pic_memory's 'graph' and 'power' items. Writes bench/results/pic_memory.json.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks

from bench.record import write_record  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pic_memory.json"


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset() -> int:
    """RSS after a gc and malloc_trim, with the peak reset to it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _rank_main(rank: int, world: int, port: int, rows: int, knn: int, iters: int, out_dir: str) -> None:
    import torch.distributed as dist

    from dist_cluster.cluster import pic
    from dist_cluster.runtime import comm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = np.random.default_rng(rank)
    offsets = pic.row_offsets(rows)
    total = int(offsets[-1])
    knn_ids = rng.integers(0, total, size=(rows, knn)).astype(np.int64)
    knn_d2 = rng.random((rows, knn)).astype(np.float32)
    directory = pic.Directory(offsets)
    peaks, seconds = {}, {}
    comm.barrier()
    base, start = _reset(), time.perf_counter()
    indptr, cols, weights = pic.symmetric_graph(knn_ids, knn_d2, 0.2, offsets)
    peaks["graph"], seconds["graph"] = _status_bytes("VmHWM") - base, time.perf_counter() - start
    comm.barrier()
    base, start = _reset(), time.perf_counter()
    v, req = pic.power_iterations(indptr, cols, weights, directory, total, 0.001, iters)
    labels, clusters = pic.basins(indptr, cols, weights, v, req, directory)
    pic.move_singletons(labels, clusters, knn_ids, directory)
    peaks["power"], seconds["power"] = _status_bytes("VmHWM") - base, time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"peaks": peaks, "seconds": seconds,
                                                             "edges_stored": len(cols)}))
    dist.destroy_process_group()


def measure(rows: int, knn: int, world: int, iters: int) -> dict:
    """One (rows, knn) point: the fullest rank's peaks against pic_memory's."""
    import tempfile

    import torch.multiprocessing as mp

    from dist_cluster.cluster.pic import pic_memory
    from dist_cluster.runtime.distributed import free_port
    with tempfile.TemporaryDirectory(prefix="bench-pic-") as tmp:
        mp.spawn(_rank_main, args=(world, free_port(), rows, knn, iters, tmp), nprocs=world)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    planned = pic_memory(rows, knn, 64, rows, "cpu")
    plan = {"graph": planned["graph"]["graph build (sorts, reverse edges)"][1],
            "power": planned["power"]["power iterations, basins"][1]}
    row = {"rows_per_rank": rows, "knn": knn, "world": world, "power_iters": iters}
    for phase in ("graph", "power"):
        measured = max(r["peaks"][phase] for r in ranks)
        row[phase] = {"measured_bytes": measured, "planned_bytes": plan[phase], "ratio": measured / plan[phase],
                      "bytes_per_edge": measured / (rows * knn),
                      "seconds": max(r["seconds"][phase] for r in ranks)}
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="200000,400000", help="rows per rank, comma list")
    p.add_argument("--knn", type=int, default=10)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="power iterations (memory does not grow with them)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    rows = [measure(int(n), args.knn, args.world, args.iters) for n in args.rows.split(",")]
    print("\n| rows / rank | k-NN | phase | measured MB | planned MB | ratio | bytes / edge | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for phase in ("graph", "power"):
            x = r[phase]
            print(f"| {r['rows_per_rank']} | {r['knn']} | {phase} | {x['measured_bytes'] / 1e6:.0f} | "
                  f"{x['planned_bytes'] / 1e6:.0f} | {x['ratio']:.3f} | {x['bytes_per_edge']:.0f} | "
                  f"{x['seconds']:.1f} |")
    return write_record(args.out, {"rows": rows, "settings": vars(args)})


if __name__ == "__main__":
    main()
