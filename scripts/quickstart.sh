#!/usr/bin/env bash
# Set up, build the Fashion-MNIST shards, pre-train DeeperCluster on 2 CPU ranks, evaluate.
#   bash scripts/quickstart.sh [key=value ...]     # overrides go to launch/train.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
BIN=$(dirname "$PY")
for split in train test; do
  [ -f data/fmnist/$split/manifest.json ] || "$PY" shards/build.py fmnist --split $split --out data/fmnist/$split --workers 2
done
"$BIN/torchrun" --standalone --nproc_per_node 2 launch/train.py --config configs/fmnist.yaml "$@"
