"""Peak memory per rank of EXTRACT + CLUSTER, measured on W gloo ranks, against the planner's figure.

    nice -n 5 python bench/memory.py --quick       # W=2, d=256, 20k/40k/80k rows per rank (~1 min, 2 cores)
    python bench/memory.py                         # W=2,4 x d=256,1024 x 20k/40k/80k rows per rank
    python bench/memory.py --dry-run               # the planned figures only, same JSON schema
    python bench/memory.py --device cuda --worlds 1 --backend torch   # peak CUDA memory (not run yet)
    python bench/memory.py --quick --method sinkhorn                  # the balanced assignment's buffers
    python bench/memory.py --quick --super-method sinkhorn            # Sinkhorn at level 1, k-means at 2
    python bench/memory.py --worlds 2 --dims 64 --rows 20000,40000,80000 --k 16 --m 1 --method pic \
        --pic-nlist 512 --warmup-rows 4096 --out bench/results/memory-pic-ivf.json   # PIC, IVF graph

Each rank runs what a round runs (rounds.py): extract.extract_features over a synthetic loader (an
identity trunk: the batches are the features; feature dim = PCA dim, as in the paper), then
cluster.stage.run_clustering(..., overwrite_features=True) with k=256, m=4, 2 Lloyd iterations.
The stages are marked by wrapping the entry points run_clustering calls (fit_pca,
hierarchical_kmeans, RoutePlan); the code itself is not changed. The rows are isotropic Gaussian:
the super-clusters come out balanced (recv_rows_max in the JSON: the most rows a rank received),
as the planner assumes.

Measured: the kernel's peak resident set (VmHWM in /proc/self/status), reset at every stage
boundary (`echo 5 > /proc/self/clear_refs`): a stage's peak is exact, not sampled. Baseline: the
rank's RSS after an unmeasured warm-up round on 16k rows (torch, gloo, faiss, matplotlib and the
BLAS buffers loaded and touched, process groups built), a gc and malloc_trim. The features are NOT
subtracted: they are allocated inside the measured EXTRACT stage and stay resident through CLUSTER
(the whitening overwrites them in place), so every stage's peak includes them, as does the planned
figure: plan.memory.stage_memory for the same inputs (host bytes; device bytes on CUDA, measured
by torch.cuda.max_memory_allocated reset per stage: faiss's GPU index lives outside torch's
allocator, hence --backend torch there). The row is the fullest rank's peak.
Two settings make the measure the code's, not the allocator's or the transport's:
  MALLOC_MMAP_THRESHOLD_=65536  glibc maps every block from 64 KiB up on its own, so a freed tensor
                                leaves the resident set; by default glibc raises that threshold
                                (up to 32 MiB) as blocks are freed, and freed tensors of earlier
                                stages stay resident (--glibc-default measures that).
  --route-chunk-mb 4            the rows travel in many rounds, as in the paper run (24.6 GB per rank
                                in 256 MiB rounds); in a single round gloo adds a few MB at random.
The measures (issue 12): measured <= 1.15 x planned on every row; growth linear in the rows per
rank: the growth per row from 40k to 80k at most 1.1 x the growth per row from 20k to 40k.
Results: bench/results/memory.json (with the machine, date and settings).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages are importable
    sys.path.insert(0, str(ROOT))

from bench.ranks import run_ranks  # noqa: E402
from bench.record import write_record  # noqa: E402

STAGES = ("extract", "pca", "level1", "route", "level2", "return")
RESULTS = ROOT / "bench" / "results" / "memory.json"
KEY_CHARS = 11  # keys like YFCC photo ids (plan.PlanInputs.key_chars)
RATIO_MAX, LINEAR_MAX = 1.15, 1.1
MMAP_THRESHOLD = 64 << 10  # glibc: allocations from 64 KiB up are mappings of their own (see the docstring)


# ----------------------------------------------------------------------------- per-rank measurement


def _status_kib(name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1))


class Meter:
    """Peak memory per stage: VmHWM (host) and torch's max allocated (CUDA), both reset at each mark."""

    def __init__(self, device: torch.device):
        self.device, self.stage, self.host, self.cuda = device, None, {}, {}
        self.baseline_host = self.baseline_cuda = 0

    def _reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self._reset()
        self.baseline_host = _status_kib("VmRSS") * 1024
        if self.device.type == "cuda":
            self.baseline_cuda = torch.cuda.memory_allocated(self.device)

    def mark(self, stage) -> None:
        """Close the current stage (its peak since the last mark) and open `stage` (None: stop)."""
        if self.stage is not None:
            host = _status_kib("VmHWM") * 1024 - self.baseline_host
            self.host[self.stage] = max(self.host.get(self.stage, 0), host)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - self.baseline_cuda
                self.cuda[self.stage] = max(self.cuda.get(self.stage, 0), peak)
        self.stage = stage
        self._reset()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _instrument(meter: Meter) -> dict:
    """Stage marks around the entry points run_clustering calls; returns what the rank saw."""
    from dist_cluster.cluster import hierarchy, stage
    seen = {}
    fit_pca, hier = stage.fit_pca, stage.hierarchical_kmeans

    class MarkedRoutePlan(hierarchy.RoutePlan):
        def __init__(self, *args, **kwargs):
            meter.mark("route")
            super().__init__(*args, **kwargs)
            seen["recv_rows"] = int(self.recv_total.sum())

        def send_rows(self, *args, **kwargs):
            out = super().send_rows(*args, **kwargs)
            meter.mark("level2")
            return out

        def return_labels(self, *args, **kwargs):
            meter.mark("return")
            return super().return_labels(*args, **kwargs)

    def marked_fit_pca(*args, **kwargs):
        meter.mark("pca")
        return fit_pca(*args, **kwargs)

    def marked_hier(*args, **kwargs):
        meter.mark("level1")
        return hier(*args, **kwargs)

    stage.fit_pca, stage.hierarchical_kmeans, hierarchy.RoutePlan = marked_fit_pca, marked_hier, MarkedRoutePlan
    from dist_cluster.cluster import pic  # cluster.method=pic: level1 is its k-NN graph, level2 the rest
    real_pic, real_power = stage.pic, pic.power_iterations

    def marked_pic(*args, **kwargs):
        meter.mark("level1")
        return real_pic(*args, **kwargs)

    def marked_power(*args, **kwargs):
        meter.mark("level2")
        return real_power(*args, **kwargs)
    stage.pic, pic.power_iterations = marked_pic, marked_power
    return seen


class SyntheticLoader:
    """Batches of isotropic Gaussian rows (the 'images' an identity trunk turns into features) and
    keys; generated on the fly, so nothing but the current batch is held."""

    def __init__(self, rows: int, dim: int, rank: int, batch: int = 512, seed: int = 0):
        self.rows, self.dim, self.rank, self.batch, self.seed = rows, dim, rank, batch, seed

    def __len__(self) -> int:
        return -(-self.rows // self.batch)

    def __iter__(self):
        for b in range(len(self)):
            lo, hi = b * self.batch, min(self.rows, (b + 1) * self.batch)
            rng = np.random.default_rng([self.seed, self.rank, b])
            x = torch.from_numpy(rng.standard_normal((hi - lo, self.dim), dtype=np.float32))
            yield x, [f"{self.rank:02d}{i:0{KEY_CHARS - 2}d}" for i in range(lo, hi)], None


class NullLogger:
    def event(self, *args, **kwargs) -> dict:
        return {}


def _cluster_cfg(args, memmap_dir: str):
    from omegaconf import OmegaConf

    from dist_cluster.config import ClusterConfig
    return OmegaConf.structured(ClusterConfig(k=args.k, m=args.m, pca_dim=args.dim, niter=args.niter,
                                              backend=args.backend, memmap_gb=args.memmap_gb,
                                              memmap_dir=memmap_dir, route_chunk_mb=args.route_chunk_mb,
                                              init_samples_per_rank=args.init_samples, method=args.method,
                                              super_method=args.super_method,
                                              pic_nlist=args.pic_nlist, pic_nprobe=args.pic_nprobe))


def _one_round(rows: int, rank: int, device: torch.device, cfg, run_dir: str, meter=None):
    """EXTRACT + CLUSTER as rounds.py runs them; the features are released after."""
    from dist_cluster.cluster.extract import extract_features
    from dist_cluster.cluster.stage import run_clustering
    if meter is not None:
        meter.mark("extract")
    feats, keys, _ = extract_features(torch.nn.Identity(), SyntheticLoader(rows, cfg.pca_dim, rank), rows,
                                      cfg.pca_dim, device, cfg, bf16=False, tag="bench")
    state = run_clustering(feats, keys, cfg, 0, run_dir, NullLogger(), seed=0, device=device,
                           overwrite_features=True)
    if meter is not None:
        meter.mark(None)
    return state


def _rank_main(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from dist_cluster.cluster.kmeans import resolve_backend
    from dist_cluster.runtime import distributed
    env = distributed.init(backend="auto", device=args.device)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            cfg = _cluster_cfg(args, tmp)
            _one_round(max(args.warmup_rows, 2 * args.k), rank, env.device, cfg, f"{tmp}/warm")
            meter = Meter(env.device)
            seen = _instrument(meter)
            meter.start()
            start = time.perf_counter()
            state = _one_round(args.rows, rank, env.device, cfg, f"{tmp}/run", meter)
            return dict(host=meter.host, cuda=meter.cuda, baseline_host=meter.baseline_host,
                        recv_rows=seen.get("recv_rows", args.rows), seconds=time.perf_counter() - start,
                        super_sizes=state.super_sizes.tolist(), backend=resolve_backend(args.backend, env.device))
    finally:
        distributed.shutdown()


# ----------------------------------------------------------------------------- the planner's figure


def planned(args, rows: int, world: int, dim: int, backend: str) -> dict:
    """plan.memory.stage_memory for this run's inputs: host bytes on CPU, device bytes on CUDA."""
    from dist_cluster.plan.memory import MemoryInputs, stage_memory
    stages = stage_memory(MemoryInputs(rows=rows, world=world, feature_dim=dim, pca_dim=dim, k=args.k, m=args.m,
                                       method=args.method, super_method=args.super_method,
                                       pic_nlist=args.pic_nlist, pic_nprobe=args.pic_nprobe,
                                       device=args.device, backend=backend, memmap_gb=args.memmap_gb,
                                       route_chunk_bytes=args.route_chunk_mb << 20, key_chars=KEY_CHARS))
    place = "device" if args.device == "cuda" else "host"
    return {name: getattr(s, place) for name, s in stages.items()}


def run_case(args, rows: int, world: int, dim: int) -> list[dict]:
    """One run on `world` fresh ranks; one row per stage, the fullest rank's measured peak."""
    from dist_cluster.runtime.distributed import free_port
    case = argparse.Namespace(**{**vars(args), "rows": rows, "dim": dim})
    if args.dry_run:
        per_rank = [dict(host={}, cuda={}, recv_rows=rows, backend=_default_backend(args), seconds=0.0)]
    else:
        per_rank = run_ranks(_rank_main, world, (world, free_port(), case), timeout_s=args.timeout)
    backend = per_rank[0]["backend"]
    plan = planned(args, rows, world, dim, backend)
    measured_key = "cuda" if args.device == "cuda" else "host"
    out = []
    for stage in STAGES:
        values = [r[measured_key].get(stage) for r in per_rank]
        measured = max(values) if all(v is not None for v in values) else None
        out.append(dict(stage=stage, rows_per_rank=rows, world=world, dim=dim, measured_peak_bytes=measured,
                        planned_peak_bytes=plan[stage], measured_per_rank=values,
                        ratio=None if measured is None else measured / plan[stage],
                        recv_rows_max=max(r["recv_rows"] for r in per_rank),
                        seconds=max(r["seconds"] for r in per_rank)))
    return out


def _default_backend(args) -> str:
    from dist_cluster.cluster.kmeans import resolve_backend
    return resolve_backend(args.backend, torch.device(args.device))


def linearity(rows: list[dict]) -> list[dict]:
    """Per (world, dim, stage): the measured growth per row from the middle to the largest size over
    the growth per row from the smallest to the middle one (20k -> 40k -> 80k rows: the 40k -> 80k
    increment over twice the 20k -> 40k one); 1 when linear, at most LINEAR_MAX to pass."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["world"], r["dim"], r["stage"]), {})[r["rows_per_rank"]] = r["measured_peak_bytes"]
    for (world, dim, stage), by_rows in groups.items():
        sizes = sorted(by_rows)
        if len(sizes) != 3 or any(by_rows[s] is None for s in sizes):
            continue
        (s1, s2, s3), (a, b, c) = sizes, [by_rows[s] for s in sizes]
        ratio = ((c - b) / (s3 - s2)) / ((b - a) / (s2 - s1)) if b != a else float("inf")
        out.append(dict(world=world, dim=dim, stage=stage, rows=sizes, increment_ratio=ratio, ok=ratio <= LINEAR_MAX))
    return out


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def print_table(rows: list[dict], lin: list[dict]) -> None:
    print(f"{'W':>2} {'dim':>5} {'rows':>7} {'stage':<8}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>7}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['world']:>2} {r['dim']:>5} {r['rows_per_rank']:>7} {r['stage']:<8}"
              f"{_mib(r['measured_peak_bytes']):>14}{_mib(r['planned_peak_bytes']):>13}{ratio:>7}")
    for x in lin:
        print(f"linearity W={x['world']} dim={x['dim']} {x['stage']:<7} growth per row 40k->80k / 20k->40k "
              f"{x['increment_ratio']:.3f} ({'ok' if x['ok'] else 'NOT linear'})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="W=2, d=256 only")
    p.add_argument("--dry-run", action="store_true", help="planned figures only, nothing run")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--dims", default="256,1024", help="feature dim = PCA dim")
    p.add_argument("--rows", default="20000,40000,80000", help="rows per rank")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--backend", default="auto", help="k-means E-step: auto | faiss | torch")
    p.add_argument("--method", default="kmeans", choices=("kmeans", "sinkhorn", "pic"), help="cluster.method")
    p.add_argument("--super-method", default="", choices=("", "kmeans", "sinkhorn"),
                   help="cluster.super_method: level 1's method ('' = --method)")
    p.add_argument("--pic-nlist", type=int, default=0, help="cluster.pic_nlist: PIC's IVF cells (0: exact search)")
    p.add_argument("--pic-nprobe", type=int, default=16, help="cluster.pic_nprobe")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--memmap-gb", type=float, default=16.0)
    p.add_argument("--route-chunk-mb", type=int, default=4,
                   help="routing round (MiB): small, so the rows travel in many rounds as in the paper run "
                        "(24.6 GB per rank in 256 MiB rounds)")
    p.add_argument("--init-samples", type=int, default=10000)
    p.add_argument("--warmup-rows", type=int, default=16384,
                   help="rows of the unmeasured warm-up round (>= faiss's 4096-query BLAS block per slice)")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold on (freed blocks up to 32 MiB may stay resident)")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.worlds, args.dims = "2", "256"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.glibc_default:  # inherited by the spawned ranks (glibc reads it at start)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    rows = []
    for world in map(int, args.worlds.split(",")):
        for dim in map(int, args.dims.split(",")):
            for n in map(int, args.rows.split(",")):
                rows += run_case(args, n, world, dim)
                last = rows[-1]
                print(f"W={world} dim={dim} rows={n}: {last['seconds']:.1f} s", flush=True)
    lin = linearity(rows)
    doc = {"rows": rows, "linearity": lin, "device": args.device, "dry_run": args.dry_run,
           "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
           "malloc_mmap_threshold": None if args.glibc_default else MMAP_THRESHOLD,
           "measures": {"ratio_max": RATIO_MAX, "increment_ratio_max": LINEAR_MAX,
                        "all_ratios_ok": all(r["ratio"] is None or r["ratio"] <= RATIO_MAX for r in rows),
                        "all_linear": all(x["ok"] for x in lin)}}
    print_table(rows, lin)
    return write_record(args.out, doc)


if __name__ == "__main__":
    main()
