#!/usr/bin/env bash
# Create (once) the project venv and install dist_cluster with its test tools; print the venv's python.
#   source <(bash scripts/setup.sh --env)     # or: PY=$(bash scripts/setup.sh)
# The venv lives outside the clone (DIST_CLUSTER_VENV, default ~/.cache/dist_cluster/venv) so fresh
# clones (CI) reuse it; torch 2.14.1 + torchvision 0.29.1 come from this machine's local wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DIST_CLUSTER_VENV:-$HOME/.cache/dist_cluster/venv}
STAMP="$VENV/.dist_cluster-$(sha1sum setup.cfg | cut -c1-12)"
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" >&2 || python3 -m venv "$VENV" >&2
fi
if [ ! -f "$STAMP" ]; then
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 >&2
  # the cpu extra brings faiss-cpu; never add [gpu] here (both install the `faiss` module)
  "$VENV/bin/pip" install -q -e '.[dev,cpu]' >&2
  touch "$STAMP"
else
  # a fresh clone at another path: re-point the editable install (cheap, no downloads)
  "$VENV/bin/pip" install -q --no-deps -e . >&2
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "installing Debian's dataset-fashion-mnist (the default dataset)" >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  ($SUDO apt-get install -y -q dataset-fashion-mnist >&2 2>&1 || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q dataset-fashion-mnist >&2; }) \
    || { case "${CI:-}" in
           ""|0|false) echo "warning: could not install dataset-fashion-mnist; fmnist commands will say so" >&2 ;;
           # CI must not go on without it: tests/test_shards.py, test_report.py, test_slurm.py read it
           *) echo "error: could not install dataset-fashion-mnist, which CI needs" >&2; exit 1 ;;
         esac; }
fi
echo "$VENV/bin/python"
