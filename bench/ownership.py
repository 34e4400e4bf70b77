"""What the static split of super-clusters and sub heads over ranks would cost on real level-1 sizes,
against the split by rows that the code uses (distributed.ownership with loads).

    python bench/ownership.py                                   # every bench/runs/*/clusters/round_*/sizes.json
    python bench/ownership.py runs/fmnist --worlds 2,4,8,64 --rotations 4

Level-2 k-means and the sub-head forward/backward both cost in proportion to the rows a rank holds,
and a stage lasts as long as its busiest rank: the cost of a split is its imbalance (busiest rank's
rows over the mean, distributed.imbalance; 1.0 = even). Level 2 splits the m super-clusters; the
sub heads split the R x m super-classes, whose rows follow the super-cluster sizes when every image
is seen once per epoch (train.balance weight | none). Prints a table, writes bench/results/ownership.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_cluster.runtime.distributed import imbalance, ownership  # noqa: E402


def super_sizes(paths: list[str]) -> list[tuple[str, list[int]]]:
    """(label, level-1 sizes) of every clustering round found under the given run directories."""
    files = []
    for path in paths:
        files += sorted(Path(path).glob("clusters/round_*/sizes.json"))
    out = []
    for f in files:
        sizes = json.loads(f.read_text())["super_sizes"]
        if len(sizes) > 1:
            out.append((f"{f.parents[2].name}/{f.parent.name}", [int(n) for n in sizes]))
    return out


def costs(sizes: list[int], world: int, rotations: int) -> dict:
    """Imbalance of level 2 and of the sub heads, static split vs split by rows."""
    heads = [sizes[s % len(sizes)] for s in range(rotations * len(sizes))]
    return {"level2_static": imbalance(ownership(len(sizes), world), sizes, world),
            "level2_by_rows": imbalance(ownership(len(sizes), world, sizes), sizes, world),
            "heads_static": imbalance(ownership(len(heads), world), heads, world),
            "heads_by_rows": imbalance(ownership(len(heads), world, heads), heads, world)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories (default: bench/runs/*)")
    parser.add_argument("--worlds", default="2,4,8,16,64")
    parser.add_argument("--rotations", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ownership.json"))
    args = parser.parse_args()
    found = super_sizes(args.runs or [str(p) for p in sorted((ROOT / "bench" / "runs").glob("*"))])
    if not found:
        raise SystemExit("no clusters/round_*/sizes.json with m > 1 under the given runs")
    rows = []
    print(f"{len(found)} clustering rounds; largest super-cluster share: "
          f"{min(max(s) / sum(s) for _, s in found):.2f} to {max(max(s) / sum(s) for _, s in found):.2f}")
    print("| W | level 2 static | level 2 by rows | sub heads static | sub heads by rows |  (mean / worst over rounds)")
    print("|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        per_round = [costs(sizes, world, args.rotations) for _, sizes in found]
        row = {"world": world, "rounds": len(per_round)}
        for key in per_round[0]:
            values = np.array([c[key] for c in per_round])
            row[key] = {"mean": float(values.mean()), "worst": float(values.max())}
        rows.append(row)
        print(f"| {world} | " + " | ".join(f"{row[k]['mean']:.3f} / {row[k]['worst']:.3f}" for k in per_round[0])
              + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": [{"run": label, "super_sizes": s} for label, s in found],
                                          "rotations": args.rotations, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
