#!/usr/bin/env bash
# Set up, build the Fashion-MNIST shards, pre-train DeeperCluster on 2 CPU ranks, evaluate.
#   bash scripts/quickstart.sh [key=value ...]     # overrides go to launch/train.py
# Re-running resumes the training from RUN/checkpoints/last.pt and re-evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
BIN=$(dirname "$PY")
for split in train test; do
  [ -f data/fmnist/$split/manifest.json ] || "$PY" shards/build.py fmnist --split $split --out data/fmnist/$split --workers 2
done
RUN=runs/fmnist
for arg in "$@"; do case "$arg" in run_dir=*) RUN=${arg#run_dir=} ;; esac; done
"$BIN/torchrun" --standalone --nproc_per_node 2 launch/train.py --config configs/fmnist.yaml "$@"
# probes fitted on all 60k train images (the bench/quality.py protocol); per-layer probes at 1024 dims
"$PY" launch/eval.py --run "$RUN" --train data/fmnist/train --test data/fmnist/test --max-train 0 --layer-dims 1024
echo "results: $RUN/eval.json  report: $RUN/report/index.html"
