#!/usr/bin/env bash
# The one script for a lent GPU machine (no network there): build, CUDA tests, benchmarks, report.
#
#   bench/gpu_check.sh                 # on the GPU machine, from anywhere; results under $OUT (or a temp dir)
#   bench/gpu_check.sh --cpu-dry-run   # here: the same stages at smoke sizes, no build (checks the wiring)
#
# Stages, each time-boxed with `timeout` (seconds; override with the env vars named):
#   1. environment (nvidia-smi, versions)
#   2. build: pip install --no-build-isolation --no-deps .  (TORCH_CUDA_ARCH_LIST defaults to 9.0;
#      GPU_CHECK_BUILD_S=600)
#   3. tests: pytest python_tests (GPU_CHECK_TEST_S=240). Failures are recorded, the run goes on;
#      --maxfail=10 rather than -x, so one failure does not hide the others.
#   4. benchmarks, MOLE_BENCH_GPU_QUICK=1, one pytest per suite (a suite that runs out of time loses
#      only its own JSON), the decode-at-dense-speed goals first: decode (MoLE pinned vs VRAM vs
#      dense, 410M-4E batch 1 and 32) 150 s, limits+lut_gather (zero-copy fetch) 60 s, table (DMA)
#      45 s, combine (lut_combine on VRAM) 60 s, quant 30 s, e2e 410M-4E 60 s: 405 s at most
#      (GPU_CHECK_BENCH_SCALE=2 doubles every box).
#   5. report: the JSON merged into gpu.json, RESULTS.md + plots rendered, the summary table printed last.
#
# $OUT receives at most 6 files: gpu.json (merged pytest-benchmark JSON: copy it to
# bench/results/gpu.json and run `python bench/report.py` to put it into bench/RESULTS.md),
# RESULTS.md, report.tar.gz (RESULTS.md + plots/ + the per-suite JSON), tests.log, bench.log,
# gpu_check.log (everything this script printed).
set -euo pipefail

DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d /tmp/mole_gpu_check.XXXXXX)}"
WORK="$(mktemp -d /tmp/mole_gpu_work.XXXXXX)"  # run pytest from here: the installed package, not the source tree
mkdir -p "$OUT" "$WORK/json" "$WORK/report/plots"
exec > >(tee "$OUT/gpu_check.log") 2>&1
SCALE="${GPU_CHECK_BENCH_SCALE:-1}"
FAILED=()  # stages that failed; reported at the end, never stop the run

stage() { echo; echo "=== $* ($(date +%T))"; }
record() {  # record <name> <exit code>; pytest's 5 (nothing selected, e.g. a shape smoke mode omits) is no failure
  local why="exit $2"
  [[ "$2" -eq 124 ]] && why="timed out"
  if [[ "$2" -ne 0 && "$2" -ne 5 ]]; then
    FAILED+=("$1 ($why)")
  fi
  return 0
}

if [[ $DRY -eq 1 ]]; then
  export MOLE_BENCH_SMOKE=1  # tiny sizes: the stages run, the numbers mean nothing
  echo "CPU dry run: smoke sizes, no build; OUT=$OUT"
else
  export MOLE_BENCH_GPU_QUICK=1
fi
export PYTHONUNBUFFERED=1

stage "1. environment"
(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
  || echo "nvidia-smi: not available") 2>&1
"$PY" - <<'PY' || true
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| CPUs", os.cpu_count(), "| threads", torch.get_num_threads())
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
PY
(cd "$REPO" && git log -1 --format='commit %H %cd' 2>/dev/null && git status --short | head -20) || true

stage "2. build"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
[[ -d /usr/local/cuda ]] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [[ $DRY -eq 1 ]]; then
  echo "dry run: would run: (cd $REPO && timeout ${GPU_CHECK_BUILD_S:-600} $PY -m pip install --no-build-isolation --no-deps .)"
else
  rc=0
  (cd "$REPO" && timeout "${GPU_CHECK_BUILD_S:-600}" "$PY" -m pip install --no-build-isolation --no-deps . 2>&1 | tail -25) || rc=$?
  record build $rc
fi
rc=0
(cd "$WORK" && "$PY" -c "import mole_kernels as m; print('mole_kernels from', m.__file__); print('build_info', m.build_info())") || rc=$?
record import $rc
if [[ $rc -ne 0 ]]; then
  echo "mole_kernels does not import: nothing more to run"
fi

if [[ $rc -eq 0 ]]; then
  stage "3. tests"
  TEST_ARGS=("$REPO/python_tests" -q -rfEs --maxfail=10 -p no:cacheprovider)
  [[ $DRY -eq 1 ]] && TEST_ARGS=("$REPO/python_tests" -q -rfEs -p no:cacheprovider -k cuda)  # the CUDA tests skip here
  rc=0
  (cd "$WORK" && timeout "${GPU_CHECK_TEST_S:-240}" "$PY" -m pytest "${TEST_ARGS[@]}" > "$OUT/tests.log" 2>&1) || rc=$?
  tail -15 "$OUT/tests.log"
  record tests $rc

  stage "4. benchmarks"
  bench() {  # bench <name> <seconds> <pytest args...>
    local name=$1 secs=$(( $2 * SCALE )) rc=0
    shift 2
    echo "--- $name (time box ${secs} s)"
    (cd "$WORK" && timeout "$secs" "$PY" -m pytest "$@" -q -p no:cacheprovider --benchmark-json="$WORK/json/$name.json" \
       --benchmark-columns=median,rounds --benchmark-sort=name >> "$OUT/bench.log" 2>&1) || rc=$?
    tail -1 "$OUT/bench.log"
    record "bench $name" $rc
  }
  B="$REPO/bench"
  bench decode 150 "$B/bench_decode.py"
  bench micro 60 "$B/bench_limits.py" "$B/bench_lut_gather.py"
  bench table 45 "$B/bench_table.py"
  bench combine 60 "$B/bench_combine.py"
  bench quant 30 "$B/bench_quant.py"
  # The e2e suite per model shape (ids start with it: "410M-4E-dense-1"): the goal's shape only, the
  # LUT (9.9 GB at the full vocabulary) placed in VRAM, pinned RAM and a file.
  bench e2e-410M-4E 60 "$B/bench_e2e.py" -k "410M-4E-"

  stage "5. report"
  shopt -s nullglob
  jsons=("$WORK"/json/*.json)
  if [[ ${#jsons[@]} -eq 0 ]]; then
    echo "no benchmark JSON was written"
    record report 1
  else
    rc=0
    timeout 60 "$PY" "$B/report.py" "${jsons[@]}" --merge-to "$OUT/gpu.json" || rc=$?
    cp "${jsons[@]}" "$WORK/report/"
    (timeout 120 "$PY" "$B/report.py" "${jsons[@]}" --out "$WORK/report/RESULTS.md" --plots "$WORK/report/plots" \
       --summary > "$WORK/summary.txt" 2>&1 && cp "$WORK/report/RESULTS.md" "$OUT/RESULTS.md") || rc=$?
    tar -C "$WORK" -czf "$OUT/report.tar.gz" report || rc=$?
    record report $rc
  fi
fi

echo
echo "=== done ($(date +%T)); files in $OUT:"
ls -la "$OUT"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "FAILED stages: ${FAILED[*]}"
else
  echo "all stages passed"
fi
echo
[[ -f "$WORK/summary.txt" ]] && tail -n +2 "$WORK/summary.txt"  # the short table, last
exit 0  # failures are in the log and the list above; the files under $OUT are what matter
