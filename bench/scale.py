"""A one-machine scale rehearsal: N images served over HTTP -> shards -> extraction -> one clustering.

    python bench/scale.py --out bench/results/scale-1m.json   # 1M images, k = 20480, m = 4, 2 ranks:
                                             # 21 min on 2 quiet cores (docs/scale.md)
    python bench/scale.py --n 20000 --k 400 --m 4     # 20k images: under a minute
    python bench/scale.py --quick            # 1000 images, k = 64: about a minute (the tests run it)

1. SERVE   a ThreadingHTTPServer on 127.0.0.1 (nothing leaves the loopback address) answers
           /img/<i>.jpg for i < N only, each image made on request from a seeded generator:
           Fashion-MNIST image i mod 60000, a random crop (scale 0.5-1), a random side (32-64 px),
           a random colour tint, JPEG quality 70-95: no two alike. It stops with the build, or at
           --max-seconds, whichever comes first.
2. META    a YFCC100M-format metadata file of N lines (line, photo id, download URL, marker 0).
3. BUILD   `python shards/build.py yfcc META --layout url --out DIR` (fetch, decode, shard): img/s,
           skipped counts, shards, disk used.
4. EXTRACT + CLUSTER on W gloo ranks: run/rounds.Run.cluster(0), what a round runs: the loader over
           the shards, the trunk (configs/fmnist.yaml's small VGG, untrained: the speed and memory do
           not depend on the weights), PCA to --pca-dim, hierarchical k-means (k, m), the round's
           files. Per stage: seconds, img/s, and the peak resident memory per rank (bench/memory.py's
           meter: VmHWM reset at every stage) against plan/memory.stage_memory for the same shape.
Writes bench/results/scale.json (machine, date, commit, load average, every number).
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.memory import MMAP_THRESHOLD, Meter, _instrument  # noqa: E402
from bench.ranks import run_ranks  # noqa: E402
from bench.record import write_record  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
PHOTO_ID0 = 10 ** 9  # photo ids of 10 digits, as YFCC's
STAGES = ("extract", "pca", "level1", "route", "level2", "return")


# ----------------------------------------------------------------------------- 1. the server


def make_image(index: int, pixels: np.ndarray) -> bytes:
    """JPEG bytes of image `index`: a crop of Fashion-MNIST image index mod 60000, resized, tinted."""
    from PIL import Image
    rng = np.random.default_rng([7, index])
    gray = pixels[index % len(pixels)]
    side = int(28 * np.sqrt(rng.uniform(0.5, 1.0)))
    top, left = rng.integers(0, 28 - side + 1, 2)
    crop = Image.fromarray(gray[top:top + side, left:left + side]).resize((int(rng.integers(32, 65)),) * 2)
    tint = rng.uniform(0.4, 1.0, 3)
    rgb = (np.asarray(crop, np.float32)[..., None] * tint + rng.uniform(0, 60, 3)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.getvalue()


class Backlogged(http.server.ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: the build's fetch threads (16 per worker) overflow it,
    # the kernel drops their SYNs, and each retries after a 1 s timeout. That capped the rehearsal of
    # 2026-12-06 at 119 img/s; with room for every connection the same build fetches ~420 img/s.
    request_queue_size = 1024


class Server:
    """Images 0..n-1 on 127.0.0.1, made on request; stops at stop() or after `max_seconds`."""

    def __init__(self, n: int, max_seconds: float):
        from shards.sources import FMNIST_DIR, read_idx
        pixels = read_idx(Path(FMNIST_DIR) / "train-images-idx3-ubyte.gz", 3)
        self.served = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N802 - http.server's name
                name = handler.path.rsplit("/", 1)[-1]
                index = int(name[:-4]) if name.endswith(".jpg") and name[:-4].isdigit() else -1
                if not 0 <= index < n:
                    handler.send_error(404)
                    return
                body = make_image(index, pixels)
                handler.send_response(200)
                handler.send_header("Content-Type", "image/jpeg")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
                self.served += 1

            def log_message(handler, *args):
                pass

        self.httpd = Backlogged(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/img"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.timer = threading.Timer(max_seconds, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def write_metadata(path: Path, n: int, url: str) -> None:
    """N lines of the YFCC100M metadata format: 25 tab-separated columns (shards/yfcc.py's indices)."""
    with open(path, "w") as out:
        for i in range(n):
            cols = [""] * 25
            cols[0], cols[1], cols[16], cols[24] = str(i), str(PHOTO_ID0 + i), f"{url}/{i}.jpg", "0"
            out.write("\t".join(cols) + "\n")


def build_shards(args, meta: Path, out: Path) -> dict:
    cmd = [sys.executable, "shards/build.py", "yfcc", str(meta), "--layout", "url", "--out", str(out),
           "--workers", str(args.build_workers), "--fetch-workers", str(args.fetch_workers),
           "--shard-size", str(args.shard_size), "--fetch-retries", "1", "--fetch-timeout", "20"]
    env = {**os.environ, "no_proxy": "127.0.0.1,localhost"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.max_seconds)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"shards/build.py failed ({done.returncode}): {done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    written = sum(s["num_samples"] for s in manifest["shards"])
    return {"seconds": seconds, "img_per_s": written / seconds, "written": written,
            "skipped": manifest.get("skipped", {}), "shards": len(manifest["shards"]),
            "disk_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            "last_line": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


# ----------------------------------------------------------------------------- 4. a round's EXTRACT + CLUSTER


def round_config(args, shards: Path, run_dir: Path):
    from dist_cluster.config import load_config
    return load_config(str(ROOT / "configs" / "fmnist.yaml"), [
        f"run_dir={run_dir}", f"data.train={shards}", "data.resize=32", "data.image_size=28", "data.num_workers=1",
        "data.batch_size=256", f"cluster.k={args.k}", f"cluster.m={args.m}", f"cluster.pca_dim={args.pca_dim}",
        f"cluster.niter={args.niter}", f"cluster.memmap_dir={run_dir}", "train.async_checkpoint=false"])


def _rank_main(rank, world, port, args, shards, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    from dist_cluster.run.rounds import Run
    from dist_cluster.runtime import distributed
    env = distributed.init(backend="gloo", device="cpu")
    try:
        run = Run(round_config(args, shards, run_dir))
        meter = Meter(env.device)
        seen = _instrument(meter)
        meter.start()
        meter.mark("extract")
        start = time.perf_counter()
        state = run.cluster(0, None)
        meter.mark(None)
        events = {e["stage"]: e for e in _events(run_dir)}
        return dict(host=meter.host, seconds=time.perf_counter() - start, rows=int(len(state.sub)),
                    recv_rows=seen.get("recv_rows"), extract=events.get("extract", {}),
                    empty=int((state.sub_sizes == 0).sum()))
    finally:
        distributed.shutdown()


def _events(run_dir: Path) -> list[dict]:
    """Round 0's events (rank 0 writes them; read by every rank after the collective round)."""
    from dist_cluster.runtime.logger import read_metrics
    return [e for e in read_metrics(run_dir) if e.get("round") == 0]


def planned(args, rows_per_rank: int, world: int) -> dict:
    from dist_cluster.cluster.kmeans import resolve_backend
    from dist_cluster.plan.memory import MemoryInputs, stage_memory
    import torch
    backend = resolve_backend("auto", torch.device("cpu"))
    stages = stage_memory(MemoryInputs(rows=rows_per_rank, world=world, feature_dim=256, pca_dim=args.pca_dim,
                                       k=args.k, m=args.m, device="cpu", backend=backend, memmap_gb=4.0,
                                       route_chunk_bytes=256 << 20, key_chars=10))
    return {name: s.host for name, s in stages.items()}


def cluster_round(args, shards: Path, run_dir: Path) -> dict:
    from dist_cluster.runtime.distributed import free_port
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # freed tensors leave the RSS (bench/memory.py)
    per_rank = run_ranks(_rank_main, args.world, (args.world, free_port(), args, shards, run_dir),
                         timeout_s=args.max_seconds)
    rows_max = max(r["rows"] for r in per_rank)
    plan = planned(args, rows_max, args.world)
    stages = []
    for name in STAGES:
        measured = [r["host"].get(name) for r in per_rank]
        peak = max(v for v in measured if v is not None) if any(v is not None for v in measured) else None
        stages.append(dict(stage=name, measured_peak_bytes=peak, planned_peak_bytes=plan[name],
                           ratio=None if peak is None else peak / plan[name], measured_per_rank=measured))
    extract = per_rank[0]["extract"]
    return {"seconds": max(r["seconds"] for r in per_rank), "rows_per_rank": [r["rows"] for r in per_rank],
            "extract_seconds": extract.get("seconds"), "extract_img_per_s": extract.get("img_per_s"),
            "data_stats": extract.get("data_stats"), "stages": stages,
            "clustering_seconds": max(r["seconds"] for r in per_rank) - (extract.get("seconds") or 0.0),
            "empty_sub_clusters": per_rank[0]["empty"]}


# ----------------------------------------------------------------------------- the bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="images served")
    p.add_argument("--k", type=int, default=20480)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--fetch-workers", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=3 * 3600.0, help="the server and each stage stop by then")
    p.add_argument("--work", default=str(ROOT / "bench" / "runs" / "scale"))
    p.add_argument("--keep", action="store_true", help="keep the shards and the run (default: removed at the end)")
    p.add_argument("--quick", action="store_true", help="1000 images, k = 64, m = 4, 3 iterations")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.k, args.niter, args.shard_size, args.pca_dim = 1000, 64, 3, 125, 16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
    server = Server(args.n, args.max_seconds)
    try:
        start = time.perf_counter()
        write_metadata(work / "meta.tsv", args.n, server.url)
        result["metadata_seconds"] = time.perf_counter() - start
        result["build"] = build_shards(args, work / "meta.tsv", work / "shards")
        result["build"]["served"] = server.served
    finally:
        server.stop()
    print(f"build: {result['build']['written']} images in {result['build']['seconds']:.0f} s "
          f"({result['build']['img_per_s']:.0f} img/s), skipped {result['build']['skipped']}, "
          f"{result['build']['shards']} shards, {result['build']['disk_bytes'] / 2**20:.0f} MiB", flush=True)
    result["round"] = cluster_round(args, work / "shards", work / "run")
    r = result["round"]
    print(f"extract: {r['extract_seconds']:.0f} s ({r['extract_img_per_s']:.0f} img/s on {args.world} ranks); "
          f"PCA + k-means (k={args.k}, m={args.m}) + files: {r['clustering_seconds']:.0f} s")
    print("| stage | measured peak MiB / rank | planned MiB | measured / planned |")
    print("|---|---|---|---|")
    for s in r["stages"]:
        peak = "-" if s["measured_peak_bytes"] is None else f"{s['measured_peak_bytes'] / 2**20:.0f}"
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}"
        print(f"| {s['stage']} | {peak} | {s['planned_peak_bytes'] / 2**20:.0f} | {ratio} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return write_record(args.out, result)


if __name__ == "__main__":
    main()
