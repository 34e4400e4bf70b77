"""Training-step benchmark: where a step's time goes, and the pipeline against the model alone.

    python bench/train.py --shards data/fmnist/train                    # 2 CPU ranks, configs/fmnist.yaml
    python bench/train.py --synthetic-jpeg 4096 --decode cpu,device --world 1 --steps 30 \
        model.arch=vgg16_bn data.image_size=224 data.resize=256 data.batch_size=48 \
        data.num_workers=8 dist.device=cuda                             # on a GPU machine

Per rank, the real trainer step (dist_cluster.trainer.train_step) is timed in phases: data wait
(next batch from the streaming loader), targets (rotation + label lookup), forward (DDP trunk +
super head), routing (the sub-head all_to_all and CE), backward (+ head gradient sync), optimizer.
Then the same step on one in-memory batch repeated (no loader): the model-only ceiling. The goal is
pipeline img/s >= 90% of model-only. Cluster labels are pseudo-random per key (speed, not learning).
--decode cpu,device times the pipeline once per data.decode mode, side by side: JPEGs decoded by
the loader workers, or batched on the run's device (nvjpeg on CUDA; dist_cluster/data/device_decode.py).
--synthetic-jpeg N: N random 256-320 px JPEGs, built once into bench/runs/ (bench/synthetic.py),
are the --shards. Prints a table (img/s summed over ranks and per rank, i.e. per GPU) and writes
bench/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ranks import run_ranks  # noqa: E402
from bench.synthetic import synthetic_jpeg_shards  # noqa: E402
from dist_cluster.config import load_config  # noqa: E402
from dist_cluster.runtime import distributed  # noqa: E402
from dist_cluster.train.targets import LabelTable, make_targets  # noqa: E402
from dist_cluster.train.trainer import PhaseTimer, train_step  # noqa: E402

PHASES = ("data", "targets", "forward", "routing", "backward", "optimizer")


class HashedLabels(LabelTable):
    """Deterministic pseudo cluster labels from the key: no clustering needed to time a step."""

    def __init__(self, k: int, m: int):
        super().__init__(None, None, None, None, None, k, m, "none")

    def lookup(self, keys, labels=None):
        codes = torch.tensor([zlib.crc32(key.encode()) for key in keys], dtype=torch.long)
        per_super = self.k // self.m
        sup = codes % self.m
        return sup, sup * per_super + (codes // self.m) % per_super


def time_steps(run, batches, table, steps: int, warmup: int) -> dict:
    """Phase seconds summed over `steps` timed steps (after `warmup` untimed ones)."""
    cfg, device = run.cfg, run.device
    timer, images_done = PhaseTimer(device), 0
    generator = torch.Generator().manual_seed(0)
    run.model.train()
    for i in range(warmup + steps):
        if i == warmup:
            timer, images_done = PhaseTimer(device), 0
            wall = time.perf_counter()
        timer.start()
        images, keys, _ = next(batches)
        images = images.to(device, non_blocking=True)
        timer.mark("data")
        targets = make_targets(images, keys, table, cfg.train.rotations, cfg.train.all_rotations, generator,
                               device=device, channels_last=cfg.model.channels_last)
        timer.mark("targets")
        train_step(run.model, run.heads, targets, run.trunk_opt, run.head_opt, cfg.train.lr, cfg, device, timer)
        images_done += len(targets.super_class)
    wall = time.perf_counter() - wall
    return {"seconds": timer.seconds, "wall": wall, "steps": steps, "images": images_done,
            "img_per_s": images_done / wall}


def repeat_one(batch):
    while True:
        yield batch


def bench_rank(rank: int, world: int, port: int, args) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads))
    base = [f"data.train={args.shards}", f"run_dir={args.run_dir}"] + args.overrides
    cfgs = {mode: load_config(args.config, base + [f"data.decode={mode}"]) for mode in args.decode}
    cfg = cfgs[args.decode[0]]
    with distributed.session(cfg.dist):
        from dist_cluster.run.rounds import Run
        run = Run(cfg)
        run.new_heads(0)
        table = HashedLabels(cfg.cluster.k, cfg.cluster.m)
        steps = min(args.steps, run.steps - args.warmup)
        results = {}
        for mode in args.decode:
            run.cfg = cfgs[mode]  # only data.decode differs, which Run.loader reads on each call
            results[f"pipeline_{mode}"] = time_steps(run, iter(run.loader(0, train=True)), table, steps, args.warmup)
        first = next(iter(run.loader(0, train=True)))
        results["model_only"] = time_steps(run, repeat_one(first), table, steps, args.warmup)
        return results


def report(results: list[dict], args, cfg_desc: str) -> dict:
    world = len(results)
    rows = {}
    for name in results[0]:  # pipeline_<decode mode>..., model_only
        per_rank = [r[name] for r in results]
        rows[name] = {
            "img_per_s_global": sum(r["img_per_s"] for r in per_rank),
            "img_per_s_per_rank": sum(r["img_per_s"] for r in per_rank) / world,
            "ms_per_step": 1000 * max(r["wall"] / r["steps"] for r in per_rank),
            "phase_ms": {p: 1000 * max(r["seconds"].get(p, 0.0) / r["steps"] for r in per_rank)
                         for p in PHASES},
            "steps": per_rank[0]["steps"],
        }
    model = rows["model_only"]["img_per_s_global"]
    ratios = {name[len("pipeline_"):]: row["img_per_s_global"] / model
              for name, row in rows.items() if name.startswith("pipeline_")}
    print(f"\ntrain step, {world} rank(s), {cfg_desc}")
    print("| run | img/s (all ranks) | img/s per rank | ms/step | " + " | ".join(f"{p} ms" for p in PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for name, row in rows.items():
        phases = " | ".join(f"{row['phase_ms'][p]:.1f}" for p in PHASES)
        print(f"| {name} | {row['img_per_s_global']:.0f} | {row['img_per_s_per_rank']:.0f} | "
              f"{row['ms_per_step']:.1f} | {phases} |")
    for mode, ratio in ratios.items():
        print(f"pipeline ({mode} decode) / model-only throughput: {ratio:.3f} (goal >= 0.90)")
    return {"world": world, "config": cfg_desc, "shards": args.shards, "rows": rows,
            "pipeline_over_model": ratios, "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/fmnist/train")
    parser.add_argument("--synthetic-jpeg", type=int, default=0, metavar="N",
                        help="use N synthetic 256-320 px JPEGs (built once into bench/runs/) as --shards")
    parser.add_argument("--decode", default="cpu", type=lambda text: text.split(","),
                        help="data.decode mode(s) to time the pipeline with: cpu, device or cpu,device")
    parser.add_argument("--config", default=str(ROOT / "configs" / "fmnist.yaml"))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--run-dir", default="/tmp/dist_cluster_bench_train")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if any(mode not in ("cpu", "device") for mode in args.decode):
        parser.error(f"--decode: cpu, device or cpu,device; got {','.join(args.decode)}")
    if args.synthetic_jpeg:
        args.shards = str(synthetic_jpeg_shards(args.synthetic_jpeg))
    results = run_ranks(bench_rank, args.world, (args.world, distributed.free_port(), args), timeout_s=1800)
    desc = f"{Path(args.config).name} {' '.join(args.overrides)}".strip()
    record = report(results, args, desc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
