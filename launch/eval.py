"""Evaluate a run's frozen backbone: RUN/eval.json, RUN/eval.md and the report RUN/report/index.html.

    python launch/eval.py --run RUN --train data/fmnist/train --test data/fmnist/test [--checkpoint PATH] [--seed 0] [--max-train N]
    torchrun --standalone --nproc_per_node 2 launch/eval.py --run-dir RUN --train ... --test ...   # ranks split the extraction

(--run-dir is --run for torchrun, whose own parser takes `--run` for an abbreviation of its --run-path.)

What each number means: dist_cluster/evaluation/evaluate.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_cluster.evaluation.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
