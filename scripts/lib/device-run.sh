# Sourced by the scripts that run on another machine from a copy of the tree (gpu-bench.sh, pool-bench-split.sh):
# run from the repository root, outputs under ${OUT:-bench/results}, that machine's python (PYTHON overrides)
# importing this tree. Sets: here, out, py.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$here"
out="${OUT:-$here/bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
