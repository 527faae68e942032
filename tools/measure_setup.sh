#!/usr/bin/env bash
# Measures what the README's "What it costs" states, the way a new user meets it: a fresh clone
# (of this checkout's HEAD), a fresh virtual environment that already has a CPU-only torch, then
#   1. `pip install .`               (from the clone's root)
#   2. `mole-kernels demo`           (from another folder)
#   3. `pytest python_tests`         (the test tools installed first, not timed)
#   4. `MOLE_BENCH_SMOKE=1 pytest bench --benchmark-disable`
# and prints, per step, the wall time, the CPU time (user + system, the step's child processes
# included) and the load average around it, with the machine. On a busy machine the wall time
# grows with the load; the CPU time hardly moves, and divided by the cores it is about what an idle
# machine takes (a build runs MAX_JOBS = all cores at a time).
#
#   tools/measure_setup.sh [TORCH]     TORCH: what pip installs as the preinstalled torch
#                                      (default: torch from https://download.pytorch.org/whl/cpu;
#                                      a wheel file or another requirement works too)
#   MEASURE_SKIP_TESTS=1 tools/measure_setup.sh ...   steps 1 and 2 only
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH=${1:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/mole_measure_XXXXXX")
trap 'rm -rf "$work"' EXIT

say() { printf '%s\n' "$*"; }
load() { cut -d' ' -f1 /proc/loadavg; }

# step NAME DIR COMMAND...: runs COMMAND in DIR, its output into $work/NAME.log, and prints one line
step() {
  local name=$1 dir=$2; shift 2
  local before status=ok; before=$(load)
  # A failing step is timed all the same (a test that failed under load costs what it cost), and
  # says so; the steps after it still run.
  (cd "$dir" && /usr/bin/time -f "%e %U %S" -o "$work/$name.time" "$@" > "$work/$name.log" 2>&1) || status=FAILED
  read -r wall user sys < <(grep -E '^[0-9.]+ [0-9.]+ [0-9.]+$' "$work/$name.time")
  printf '%-34s wall %6.0f s   CPU %6.0f s (%4.1f min)   load %s -> %s   %s\n' "$name" "$wall" \
    "$(echo "$user + $sys" | bc)" "$(echo "($user + $sys) / 60" | bc -l)" "$before" "$(load)" "$status"
  if [ "$status" != ok ]; then grep -E "^(FAILED|ERROR)|passed|failed" "$work/$name.log" | tail -8 | sed 's/^/    /'; fi
}

say "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/ {print $2}') GB RAM, $(uname -sr)"
say "commit:  $(git -C "$ROOT" rev-parse --short HEAD)$( [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ] && echo ' (uncommitted changes are NOT measured: a clone has HEAD only)')"
git clone --quiet "$ROOT" "$work/clone"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
if [ -n "$TORCH" ]; then
  python -m pip install --quiet "$TORCH"
else
  python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
say "python:  $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__)') preinstalled (not timed)"
mkdir "$work/elsewhere"

step "pip install ." "$work/clone" python -m pip install .
grep -h "^mole_kernels build:" "$work/pip install ..log" 2>/dev/null | sed 's/^/    /' || true
step "mole-kernels demo" "$work/elsewhere" mole-kernels demo
if [ "${MEASURE_SKIP_TESTS:-0}" != 1 ]; then
  python -m pip install --quiet pytest pytest-benchmark hypothesis matplotlib
  step "pytest python_tests" "$work/clone" pytest python_tests -q -p no:randomly
  tail -1 "$work/pytest python_tests.log" | sed 's/^/    /'
  step "pytest bench (smoke)" "$work/clone" env MOLE_BENCH_SMOKE=1 pytest bench --benchmark-disable -q -p no:randomly
  tail -1 "$work/pytest bench (smoke).log" | sed 's/^/    /'
fi
