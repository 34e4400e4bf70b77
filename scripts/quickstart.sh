#!/usr/bin/env bash
# Set up, build the Fashion-MNIST shards, pre-train DeeperCluster on 2 CPU ranks, evaluate on the same 2 ranks.
#   bash scripts/quickstart.sh [key=value ...]     # overrides go to launch/train.py
#   DIST_CLUSTER_VENV=/tmp/fresh-venv bash scripts/quickstart.sh run_dir=runs/qs   # time it from a fresh venv
# Re-running resumes the training from RUN/checkpoints/last.pt and re-evaluates.
# Prints the wall time of set-up, training and evaluation at the end (the README's Quickstart numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=$(bash scripts/setup.sh)
BIN=$(dirname "$PY")
for split in train test; do
  [ -f data/fmnist/$split/manifest.json ] || "$PY" shards/build.py fmnist --split $split --out data/fmnist/$split --workers 2
done
RUN=runs/fmnist
for arg in "$@"; do case "$arg" in run_dir=*) RUN=${arg#run_dir=} ;; esac; done
setup_s=$((SECONDS - start))
"$BIN/torchrun" --standalone --nproc_per_node 2 launch/train.py --config configs/fmnist.yaml "$@"
train_s=$((SECONDS - start - setup_s))
# linear probe and kNN fitted on all 60k train images, features extracted and probes fitted on both
# ranks; no per-layer probes here (they would double the evaluation: bench/quality.py runs them)
"$BIN/torchrun" --standalone --nproc_per_node 2 launch/eval.py --run-dir "$RUN" --train data/fmnist/train \
  --test data/fmnist/test --max-train 0 --layer-dims 0
eval_s=$((SECONDS - start - setup_s - train_s))
echo "results: $RUN/eval.json  report: $RUN/report/index.html"
echo "quickstart: set-up ${setup_s} s, training ${train_s} s, evaluation ${eval_s} s, total $((SECONDS - start)) s"
