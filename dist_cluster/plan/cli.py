"""`python -m dist_cluster.plan --images 96e6 --gpus 64`: the planner (planner.py) from the command line,
its table and its JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from dist_cluster.plan import planner
from dist_cluster.plan.costs import Rate, Rates, arch_cost, default_rates, measured_rates
from dist_cluster.plan.planner import GiB, PlanInputs, StageRow, plan, summary


def _fmt_bytes(value: float, unit: float) -> str:
    return "-" if value == 0 else f"{value / unit:,.2f}"


def _fmt_seconds(seconds: float) -> str:
    if seconds == 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def format_table(inputs: PlanInputs, rows: list[StageRow], rates: Rates, bench_notes: tuple = ()) -> str:
    head = ["stage", "GPU GiB", "RAM GiB", "disk GiB", "net/step GB", "net/round GB", "storage GB", "time/round"]
    body = [[r.stage, _fmt_bytes(r.gpu_bytes, GiB), _fmt_bytes(r.ram_bytes, GiB), _fmt_bytes(r.disk_bytes, GiB),
             _fmt_bytes(r.net_bytes_step, 1e9), _fmt_bytes(r.net_bytes_round, 1e9),
             _fmt_bytes(r.storage_bytes, 1e9), _fmt_seconds(r.seconds_round)] for r in rows]
    widths = [max(len(str(line[i])) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = summary(inputs, rows)
    lines += ["", f"{inputs.images:,} images, {inputs.gpus} GPUs on {inputs.nodes} nodes, {inputs.arch} "
              f"{inputs.image_size}px, k={inputs.k}, m={inputs.m}, {inputs.rotations} rotations, "
              f"{total['rounds']} rounds x {inputs.reassign} epochs",
              f"total {_fmt_seconds(total['seconds_total'])}: {_fmt_seconds(total['seconds_per_epoch'])} per epoch,"
              f" {_fmt_seconds(total['seconds_cluster_per_round'])} extract+cluster per round "
              f"({total['extract_cluster_share']:.1%} of a round; PCA to RETURN {total['cluster_share']:.1%})",
              f"per rank: GPU {total['peak_gpu_bytes_per_rank'] / GiB:,.2f} GiB ({total['peak_gpu_stage']}), RAM "
              f"{total['peak_ram_bytes_per_rank'] / GiB:,.2f} GiB; "
              f"per node: RAM {total['peak_ram_bytes_per_node'] / GiB:,.1f} GiB, local disk "
              f"{total['peak_disk_bytes_per_node'] / GiB:,.1f} GiB; shards {total['shards_bytes'] / 1e12:,.2f} TB, "
              f"shared storage {total['storage_bytes_total'] / 1e12:,.2f} TB, training reads "
              f"{total['read_bytes_s_train'] / 1e9:,.2f} GB/s", "", "notes:"]
    lines += [f"  {r.stage}: {note}" for r in rows for note in r.notes]
    lines += ["throughputs:"] + [f"  {name} = {v['value']:.4g} ({v['source']})" for name, v in rates.sources().items()]
    lines += [f"  {note}" for note in bench_notes]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=planner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = PlanInputs.__dataclass_fields__
    for name in ("images", "gpus"):
        parser.add_argument(f"--{name}", type=float, required=True)
    for name in ("nodes", "image_size", "k", "m", "rotations", "feature_dim", "pca_dim", "batch", "epochs",
                 "reassign", "niter", "workers", "key_chars"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=fields[name].default)
    for name in ("memmap_gb", "bytes_per_image"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=fields[name].default)
    parser.add_argument("--arch", default=fields["arch"].default, choices=("vgg16_bn", "resnet50", "smallvgg"))
    parser.add_argument("--no-sobel", action="store_true")
    parser.add_argument("--all-rotations", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="activations in float32 (no bf16 autocast)")
    parser.add_argument("--bench", default="bench/results", help="measured throughputs (loader/kmeans/train.json)")
    parser.add_argument("--bench-device", default="cuda", choices=("cuda", "cpu"),
                        help="the device the planned run uses (its memory: GPU or host): k-means and train "
                             "measurements made on another device are not used")
    parser.add_argument("--kmeans-backend", default="faiss", choices=("faiss", "torch"))
    parser.add_argument("--method", default="kmeans", choices=("kmeans", "sinkhorn", "pic"))
    parser.add_argument("--super-method", default="", choices=("", "kmeans", "sinkhorn"),
                        help="level 1's method when it differs from --method")
    for name in ("sinkhorn_iters", "pic_knn", "pic_iters", "pic_nlist", "pic_nprobe"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=fields[name].default)
    parser.add_argument("--train-img-s", type=float, help="override: training rows/s per GPU")
    parser.add_argument("--loader-img-s", type=float, help="override: loader img/s per rank")
    parser.add_argument("--net-gb-s", type=float, help="override: GB/s per rank between nodes")
    parser.add_argument("--nvlink-gb-s", type=float, help="override: GB/s per rank inside a node")
    parser.add_argument("--json", help="write the plan here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = {f.name for f in PlanInputs.__dataclass_fields__.values()}
    values = {k: v for k, v in vars(args).items() if k in names - {"sobel", "all_rotations", "bf16"}}
    try:
        inputs = PlanInputs(**values, sobel=not args.no_sobel, all_rotations=args.all_rotations, bf16=not args.fp32,
                            device=args.bench_device)
    except ValueError as err:  # a shape that cannot work: say which, not a traceback
        raise SystemExit(f"dist_cluster.plan: {err}") from None
    cost = arch_cost(inputs.arch, inputs.image_size, inputs.sobel, inputs.feature_dim)
    rates = default_rates(cost, math.ceil(inputs.gpus / inputs.nodes), inputs.workers)
    rates, bench_notes = measured_rates(rates, args.bench, inputs.workers, inputs.image_size, args.bench_device)
    for flag, name, scale in (("train_img_s", "train_rows_s", 1), ("loader_img_s", "loader_img_s", 1),
                              ("net_gb_s", "net_bytes_s", 1e9), ("nvlink_gb_s", "intra_bytes_s", 1e9)):
        if getattr(args, flag) is not None:
            rates = replace(rates, **{name: Rate(getattr(args, flag) * scale, f"--{flag.replace('_', '-')}")})
    rows = plan(inputs, rates)
    print(format_table(inputs, rows, rates, bench_notes))
    result = {"inputs": asdict(inputs), "stages": [asdict(r) for r in rows], "summary": summary(inputs, rows),
              "rates": rates.sources(), "bench_notes": bench_notes}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
