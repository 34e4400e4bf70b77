"""Compare runs: their evaluations, train times, config differences and training curves in one table.

    python launch/compare.py runs/fmnist runs/other [--out DIR]     # DIR/compare.md, DIR/compare.html
    python launch/compare.py bench/runs/*                           # after bench/quality.py or a sweep

What each column means: dist_cluster/evaluation/compare.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_cluster.evaluation.compare import main  # noqa: E402

if __name__ == "__main__":
    main()
