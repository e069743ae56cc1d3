#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (benchmarks/gpu/requirements-device.txt) for its Python 3.12 /
# manylinux x86_64 into benchmarks/gpu/wheels/, and copy the golden fixture into benchmarks/gpu/golden/ (the
# ../shared folder beside the checkout does not travel). Both folders are git-ignored; name them in the device
# call's `carry`. Run here, where pip reaches the registry; nothing is installed.
#
#   bash benchmarks/gpu/fetch_wheels.sh            # download (skips wheels already there), check, print sizes
#   bash benchmarks/gpu/fetch_wheels.sh --no-cucim # without cuCIM (16 MB): relabel_sequential falls back
#   bash benchmarks/gpu/fetch_wheels.sh --clean    # empty wheels/ first
#
# The pip line is the device README's, exactly (pip matches manylinux_2_N exactly: N = 24 and 34 are added for
# wheels tagged only so). The whole transfer (working tree + carried folders) must stay under 64 MiB.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WHEELS="$HERE/wheels"
GOLDEN_DST="$HERE/golden"
PY="${PYTHON:-python3}"
REQ="$HERE/requirements-device.txt"
cucim=1
for arg in "$@"; do
  case "$arg" in
    --no-cucim) cucim=0 ;;
    --clean) rm -rf "$WHEELS" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$WHEELS"

mapfile -t reqs < <(grep -vE '^\s*(#|$)' "$REQ" | sed 's/\s*#.*//')
if [[ $cucim == 0 ]]; then
  mapfile -t reqs < <(printf '%s\n' "${reqs[@]}" | grep -v '^cucim')
  rm -f "$WHEELS"/cucim_cu13-*.whl
fi

# wheel file name prefix of a requirement (PEP 427: name normalised to lowercase with '_')
prefix() { local n="${1%%==*}"; n="${n,,}"; echo "${n//[-.]/_}-${1##*==}-"; }
missing=()
for r in "${reqs[@]}"; do
  compgen -G "$WHEELS/$(prefix "$r")*.whl" >/dev/null || missing+=("$r")
done
if ((${#missing[@]})); then
  echo "downloading ${#missing[@]} wheel(s): ${missing[*]}"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64 \
    -d "$WHEELS" "${missing[@]}"
fi

# one version of each: two versions of one name stop the whole install on the device
dups=$(ls "$WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [[ -n "$dups" ]]; then echo "ERROR: several versions of: $dups (delete the old ones)" >&2; exit 1; fi
for r in "${reqs[@]}"; do
  compgen -G "$WHEELS/$(prefix "$r")*.whl" >/dev/null || { echo "ERROR: no wheel for $r" >&2; exit 1; }
done

# the golden fixture, when it is beside the checkout
GOLDEN_SRC="$ROOT/../shared/fixtures/cryosiam_golden"  # tests/fixtures/ has it too (travels in the tree)
if [[ -d "$GOLDEN_SRC" ]]; then
  rm -rf "$GOLDEN_DST" && cp -r "$GOLDEN_SRC" "$GOLDEN_DST"
else
  echo "note: $GOLDEN_SRC not found: the golden GPU tests will skip on the device"
fi

wheels_mib=$(du -sm "$WHEELS" | cut -f1)
golden_mib=$( [[ -d "$GOLDEN_DST" ]] && du -sm "$GOLDEN_DST" | cut -f1 || echo 0)
tree_mib=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
total=$((wheels_mib + golden_mib + tree_mib))
ls -S -s --block-size=K "$WHEELS" | head -12
echo "wheels ${wheels_mib} MiB + golden ${golden_mib} MiB + working tree ${tree_mib} MiB = ${total} MiB (limit 64)"
if ((total >= 64)); then echo "ERROR: over the 64 MiB a device call carries; try --no-cucim" >&2; exit 1; fi
echo "device call: carry [\"benchmarks/gpu/wheels\", \"benchmarks/gpu/golden\"], command: bash benchmarks/gpu/run_device.sh"
