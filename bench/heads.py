"""Head-gradient overlap: the training step with the sub heads' all_reduce started inside backward
(RoutedHeads(overlap=True), the default) against the blocking reduce after backward (overlap=False).

    python bench/heads.py                          # 2 gloo ranks, D 1024, 20000 sub classes
    python bench/heads.py --rows 64 --depth 8 --steps 10 --out /tmp/heads.json

W > S, so the ranks share one sub head (one super class: S = 1) and every step sums its D x sub
gradient (82 MB at the defaults) over the pair. The trunk is `depth` Linear(D, D) layers: its
backward is the work the reduce can hide behind. Both modes run on the same ranks, steps
interleaved in pairs whose order alternates (overlap blocking, blocking overlap, ...), so a loaded
machine slows both alike. Prints the median ms per step and per sync_grads call (the wait after
backward) of each mode, and the median over pairs of the step-time ratio (robust to load drift).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranks import run_ranks  # noqa: E402
from dist_cluster.runtime import distributed  # noqa: E402

MODES = {"overlap": True, "blocking": False}


class MLPTrunk(nn.Sequential):
    """depth x Linear(D, D) with ReLUs between: backward work proportional to depth."""

    def __init__(self, dim: int, depth: int):
        layers = []
        for i in range(depth):
            layers += [nn.Linear(dim, dim)] + ([nn.ReLU()] if i < depth - 1 else [])
        super().__init__(*layers)
        self.feature_dim = dim


def _timed_sync(heads, seconds: list):
    """heads.sync_grads, recording how long each call waits (the reduce left after backward)."""
    real = heads.sync_grads

    def sync():
        start = time.perf_counter()
        real()
        seconds.append(time.perf_counter() - start)
    return sync


def bench_rank(rank: int, world: int, port: int, args) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_cluster.train.heads import RoutedHeads, TrunkAndSuperHead
    from dist_cluster.train.targets import Targets
    from dist_cluster.train.trainer import sgd, train_step
    cfg = OmegaConf.create({"train": {"bf16": False, "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0}})
    distributed.init(backend="gloo", device="cpu")
    try:
        torch.manual_seed(0)
        module = TrunkAndSuperHead(MLPTrunk(args.feature_dim, args.depth), 1)
        model, trunk_opt = DDP(module), sgd(module.parameters(), cfg.train)
        gen = torch.Generator().manual_seed(rank)
        targets = Targets(images=torch.randn(args.rows, args.feature_dim, generator=gen),
                          super_class=torch.zeros(args.rows, dtype=torch.long),
                          sub_local=torch.randint(args.sub_classes, (args.rows,), generator=gen),
                          super_weight=torch.ones(args.rows), sub_weight=torch.ones(args.rows))
        runs = {}
        for name, overlap in MODES.items():
            heads = RoutedHeads(args.feature_dim, 1, args.sub_classes, seed=0, overlap=overlap)
            runs[name] = dict(heads=heads, opt=sgd(heads.parameters(), cfg.train), step=[], sync=[])
            heads.sync_grads = _timed_sync(heads, runs[name]["sync"])
        for i in range(args.warmup + args.steps):
            for run in (list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]):
                start = time.perf_counter()
                train_step(model, run["heads"], targets, trunk_opt, run["opt"], 0.0, cfg, torch.device("cpu"))
                run["step"].append(time.perf_counter() - start)
        return {name: {key: run[key][args.warmup:] for key in ("step", "sync")} for name, run in runs.items()}
    finally:
        distributed.shutdown()


def report(results: list[dict], args) -> dict:
    """Per mode: median over steps of the slowest rank's time (a step ends when every rank's does)."""
    rows = {}
    for name in MODES:
        step = [max(r[name]["step"][i] for r in results) for i in range(args.steps)]
        sync = [max(r[name]["sync"][i] for r in results) for i in range(args.steps)]
        rows[name] = {"step_ms": 1000 * statistics.median(step), "sync_grads_ms": 1000 * statistics.median(sync)}
    head_mb = args.feature_dim * args.sub_classes * 4 / 1e6
    print(f"\nhead gradient overlap: {len(results)} gloo ranks sharing one head of {head_mb:.0f} MB of gradient, "
          f"trunk {args.depth} x Linear({args.feature_dim}), {args.rows} rows per rank, {args.steps} steps")
    print("| mode | ms/step (median) | sync_grads ms (median) |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['step_ms']:.1f} | {row['sync_grads_ms']:.1f} |")
    pairs = [max(r["overlap"]["step"][i] for r in results) / max(r["blocking"]["step"][i] for r in results)
             for i in range(args.steps)]
    ratio = statistics.median(pairs)
    print(f"overlap / blocking step time, median over {args.steps} pairs: {ratio:.3f} "
          f"(quartiles {statistics.quantiles(pairs, n=4)[0]:.3f} .. {statistics.quantiles(pairs, n=4)[2]:.3f})")
    return {"args": vars(args), "rows": rows, "overlap_over_blocking": ratio, "pair_ratios": pairs,
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--feature-dim", type=int, default=1024)
    parser.add_argument("--sub-classes", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=64, help="rows per rank per step")
    parser.add_argument("--depth", type=int, default=8, help="Linear(D, D) layers in the trunk")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default="", help="write the results as JSON here (default: print only)")
    args = parser.parse_args()
    results = run_ranks(bench_rank, args.world, (args.world, distributed.free_port(), args), timeout_s=1800)
    record = report(results, args)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
