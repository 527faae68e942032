"""One decode benchmark case in several fresh processes: the spread between processes (issue 24).

    python bench/across_processes.py "demo-B1-compiled" [--processes 6] [--key mole-host-compiled]

On this 2-core VM a decode ratio's paired median moves more from one process to the next (memory layout,
the VM's state) than its 90 % interval inside one process says: the demo's compiled B = 1 ratio was 1.016 in
one process and 1.059 in another. This runs ``pytest bench/bench_decode.py -k CASE`` in `--processes` fresh
processes, one after the other, and prints each process's paired [median, lo, hi] (bench/conftest.py
``paired_ratio``) for `--key` (default: every paired ratio of the case), then the median of the per-process
medians with a 90 % bootstrap interval over the processes (``median_interval``), and their range. With
`--bound X`, each ratio's verdict across processes: met when that interval lies under X, missed when above,
else unresolved (the rule bench_decode applies to one process's rounds; the A/A control's line shows the
harness's own floor across processes).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE))  # bench/conftest.py's median_interval
from conftest import median_interval  # noqa: E402


def one_process(case: str, out: str) -> dict:
    """The case's `paired` extra_info from one fresh pytest process."""
    cmd = [sys.executable, "-m", "pytest", str(HERE / "bench_decode.py"), "-k", case, "-q", "-p", "no:randomly",
           f"--benchmark-json={out}"]
    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"across_processes: {' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    benches = json.load(open(out))["benchmarks"]
    if len(benches) != 1:
        raise SystemExit(f"across_processes: -k {case!r} selected {len(benches)} benchmarks; name exactly one "
                         "(e.g. demo-B1-compiled)")
    return benches[0]["extra_info"]["paired"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", help="the -k expression of one bench_decode case, e.g. demo-B1-compiled")
    ap.add_argument("--processes", type=int, default=6, help="fresh processes, one after the other (default 6)")
    ap.add_argument("--key", action="append", help="a paired ratio to report (repeatable; default: all)")
    ap.add_argument("--bound", type=float, help="a goal's bound (ratio <= X): print each ratio's verdict")
    args = ap.parse_args()
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    if args.bound is not None and not args.bound > 0:
        ap.error("--bound must be a positive ratio")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            runs.append(one_process(args.case, os.path.join(tmp, f"{i}.json")))
            print(f"process {i + 1}/{args.processes}: " + ", ".join(
                f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in runs[-1].items() if not args.key or k in args.key),
                flush=True)
    print(f"{args.case}, {args.processes} processes (load {os.getloadavg()[0]:.1f}): median of the per-process "
          "paired medians [90 % interval over processes], lowest..highest")
    for k in runs[0]:
        if args.key and k not in args.key:
            continue
        meds = [r[k][0] for r in runs]
        m, lo, hi = median_interval(meds)
        verdict = "" if args.bound is None else "  " + (
            "met" if hi <= args.bound else "missed" if lo > args.bound else "unresolved") + f" (<= {args.bound})"
        print(f"  {k:24s} {m:.3f} [{lo:.3f}, {hi:.3f}], {min(meds):.3f}..{max(meds):.3f}{verdict}")


if __name__ == "__main__":
    main()
