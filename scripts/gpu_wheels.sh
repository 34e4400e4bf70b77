#!/usr/bin/env bash
# Fetch, here, the wheels the (offline) GPU machine lacks: scripts/gpu_wheels.txt, for CPython 3.12
# on manylinux x86-64, into .whl/ (git-ignored; carried to the GPU machine, where they go in with
#   pip install --no-index --no-deps --target DIR .whl/*.whl).
#   bash scripts/gpu_wheels.sh            # download what is missing (idempotent), list files + total
#   bash scripts/gpu_wheels.sh --check    # no network: each pinned name has exactly one wheel, of
#                                         # the pinned version (exit 1 listing what is not)
# Environment: GPU_WHEELS_DIR (default .whl/ in the checkout), GPU_WHEELS_LIST (default
# scripts/gpu_wheels.txt), GPU_WHEELS_PYTHON (default python3: its pip downloads).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# resolved before anything changes directory, so a relative GPU_WHEELS_DIR means the caller's cwd
DIR=$(realpath -m "${GPU_WHEELS_DIR:-$ROOT/.whl}")
LIST=$(realpath -m "${GPU_WHEELS_LIST:-$ROOT/scripts/gpu_wheels.txt}")
PY=${GPU_WHEELS_PYTHON:-python3}
# the folder travels with the working tree to the GPU machine, whose carry limit is 64 MiB in all
MAX_BYTES=20000000

die() { echo "gpu_wheels: $*" >&2; exit 1; }
# wheel file names spell the project name with runs of -_. as _ and any case (PEP 427 / PEP 503)
norm() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/_/g'; }
[ -f "$LIST" ] || die "no list $LIST"
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$' || true)
[ "${#PINS[@]}" -gt 0 ] || die "$LIST pins nothing"
for pin in "${PINS[@]}"; do
  [[ "$pin" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!]+$ ]] || die "not name==version in $LIST: $pin"
done

# wheels in DIR whose project name is $1 (any version), one path a line
wheels_of() {
  local want f b; want=$(norm "$1")
  for f in "$DIR"/*.whl; do
    [ -e "$f" ] || continue
    b=$(basename "$f")
    [ "$(norm "${b%%-*}")" = "$want" ] && echo "$f"
  done
  return 0
}
version_of() { local b; b=$(basename "$1"); b=${b#*-}; echo "${b%%-*}"; }

# prints what is wrong for each pin; returns 1 if anything is
check() {
  local pin name ver bad=0 found
  for pin in "${PINS[@]}"; do
    name=${pin%%==*}; ver=${pin#*==}
    mapfile -t found < <(wheels_of "$name")
    if [ "${#found[@]}" -eq 0 ]; then
      echo "missing: $pin (no wheel in $DIR)"; bad=1
    elif [ "${#found[@]}" -gt 1 ]; then
      echo "ambiguous: $pin has ${#found[@]} wheels: ${found[*]##*/}"; bad=1
    elif [ "$(version_of "${found[0]}")" != "$ver" ]; then
      echo "wrong version: $pin but ${found[0]##*/}"; bad=1
    fi
  done
  return $bad
}

summary() {
  local f size total=0
  for f in "$DIR"/*.whl; do
    [ -e "$f" ] || continue
    size=$(stat -c %s "$f"); total=$((total + size))
    printf '%10d  %s\n' "$size" "${f##*/}"
  done
  printf '%10d  total bytes in %s (limit %d)\n' "$total" "$DIR" "$MAX_BYTES"
  [ "$total" -le "$MAX_BYTES" ] || die "$DIR holds $total bytes, over the $MAX_BYTES limit: too big to carry to the GPU machine"
}

if [ "${1:-}" = "--check" ]; then
  if ! problems=$(check); then
    echo "$problems" >&2
    die "$DIR does not match $LIST (run: bash scripts/gpu_wheels.sh)"
  fi
  echo "gpu_wheels: $DIR has one wheel per pin of $LIST (${#PINS[@]})"
  exit 0
fi
[ $# -eq 0 ] || die "usage: bash scripts/gpu_wheels.sh [--check]"

mkdir -p "$DIR"
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; ver=${pin#*==}
  have=""
  mapfile -t found < <(wheels_of "$name")   # (paths may hold spaces: no word splitting)
  for f in ${found[@]+"${found[@]}"}; do
    if [ "$(version_of "$f")" = "$ver" ]; then have=$f
    else echo "removing stale ${f##*/} (pinned: $pin)"; rm -f "$f"; fi
  done
  if [ -n "$have" ]; then echo "have ${have##*/}"; continue; fi
  echo "downloading $pin"
  # --no-deps: the dependencies are pinned in the list themselves (or present on the machine)
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$DIR" "$pin"; then
    # sdist-only projects (antlr4-python3-runtime 4.9.3 is one): build the wheel here. Only a pure
    # wheel (none-any) is kept: one compiled by this machine's Python would not fit Python 3.12.
    # --no-binary names the project alone, so the build backend (setuptools) still comes as a wheel.
    echo "no wheel on the index for $pin: building it from its sdist"
    "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w "$DIR" "$pin" \
      || die "could not download or build $pin (no network to PyPI?)"
    mapfile -t found < <(wheels_of "$name")
    for f in ${found[@]+"${found[@]}"}; do
      [[ "$f" == *-none-any.whl ]] || { rm -f "$f"; die "$pin built a platform wheel ${f##*/}; only pure-Python ones are built here"; }
    done
  fi
done
if ! problems=$(check); then echo "$problems" >&2; die "download left $DIR incomplete"; fi
summary
